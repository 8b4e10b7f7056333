#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (Debian/Ubuntu, as root) so that slurm/submit.py and
# tests/test_slurm.py can be tried without a real cluster. Idempotent: run it as often as you like.
#
#   sudo bash slurm/start_local_cluster.sh          # installs slurmctld slurmd slurm-client munge if missing
#   sinfo                                           # -> the node is idle
#   bash slurm/start_local_cluster.sh --stop        # stops the daemons it started
#
# The configuration goes to /etc/slurm/slurm.conf (the path the SLURM commands read by default, so no
# SLURM_CONF is needed); state, spool and logs go to $SLURM_LOCAL_DIR (default /tmp/slurm-local).
set -euo pipefail

STATE_DIR="${SLURM_LOCAL_DIR:-/tmp/slurm-local}"
CONF=/etc/slurm/slurm.conf

if [[ $(id -u) -ne 0 ]]; then
    echo "error: start_local_cluster.sh installs packages and starts daemons: run it as root (sudo)" >&2
    exit 2
fi

stop_daemon() {  # stop_daemon PIDFILE: stop the daemon this script started, if it is running
    local pid_file=$1 pid
    pid=$(cat "$pid_file" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    rm -f "$pid_file"
}

if [[ ${1:-} == --stop ]]; then
    stop_daemon "$STATE_DIR/slurmd.pid"
    stop_daemon "$STATE_DIR/slurmctld.pid"
    echo "slurmd and slurmctld stopped (munged left running)"
    exit 0
fi

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    echo "installing slurmctld slurmd slurm-client munge ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurmctld slurmd slurm-client munge </dev/null >/dev/null
fi

# 2. munge: the daemon that authenticates every SLURM message; the package normally creates the key
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge: /etc/munge/munge.key
    chmod 600 /etc/munge/munge.key
fi
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge
    chown munge: /run/munge
    runuser -u munge -- munged
    for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# 3. configuration: one node, every CPU of this machine (at least 2, so a 2-task job always fits),
# no cgroups (proctrack/pgid, task/none: works in containers), no accounting daemon.
host=$(hostname -s)
if ! getent hosts "$host" >/dev/null; then
    # the daemons, and torch.distributed (MASTER_ADDR = the node name), must resolve the node name
    echo "127.0.0.1 $host" >> /etc/hosts
fi
cpus=$(nproc)
(( cpus < 2 )) && cpus=2
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p "$STATE_DIR/state" "$STATE_DIR/spool" "$STATE_DIR/log" /etc/slurm
new_conf=$(cat <<EOF
# written by slurm/start_local_cluster.sh
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
ReturnToService=2
# short waits so that a requeued job restarts within seconds (cred_expire also delays a requeued job)
AuthInfo=cred_expire=10
KillWait=5
MinJobAge=600
# a requeued job becomes eligible ~cred_expire s later, but only a scheduling pass starts it: every
# 60 s by default (and 30 s for backfill), which the tests would spend waiting
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
if [[ ! -f $CONF ]] || [[ $(cat "$CONF") != "$new_conf" ]]; then
    # a changed configuration (new host name, new state dir): restart the daemons on it
    stop_daemon "$STATE_DIR/slurmd.pid"
    stop_daemon "$STATE_DIR/slurmctld.pid"
    printf '%s\n' "$new_conf" > "$CONF"
fi

# 4. daemons
if ! [[ -s $STATE_DIR/slurmctld.pid ]] || ! kill -0 "$(cat "$STATE_DIR/slurmctld.pid")" 2>/dev/null; then
    slurmctld -f "$CONF"
fi
if ! [[ -s $STATE_DIR/slurmd.pid ]] || ! kill -0 "$(cat "$STATE_DIR/slurmd.pid")" 2>/dev/null; then
    slurmd -f "$CONF"
fi

# 5. wait until the node takes jobs
state=""
for _ in $(seq 120); do
    state=$(sinfo --noheader --nodes "$host" --format %t 2>/dev/null | head -n 1 || true)
    case $state in
        idle | mix | alloc | comp) break ;;
        drain* | down*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
done
case $state in
    idle | mix | alloc | comp) ;;
    *)
        echo "error: node $host is '$state' after 60 s; see $STATE_DIR/log/slurmctld.log and slurmd.log" >&2
        exit 1
        ;;
esac
sinfo
echo "one-node SLURM cluster up: config $CONF, logs $STATE_DIR/log"
