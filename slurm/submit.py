"""Send any of the seven scripts to SLURM with submitit (DINO's run_with_submitit.py, for every
script).

    python slurm/submit.py [SLURM options] SCRIPT.py [SCRIPT options]

The script's own parser reads SCRIPT options, so every option works unchanged. One task per GPU;
torch.distributed is initialised from the job's environment (submitit's
TorchDistributedEnvironment). When SLURM warns a job (USR2, --signal-delay-s before the time limit
or a preemption), the training scripts save <output-dir>/checkpoint.pth and hand over to submitit,
which requeues the job through Trainer.checkpoint(); the requeued job resumes from that checkpoint.

  # ImageNet, 2 nodes x 8 GPUs, 3-day slots, requeued until done
  python slurm/submit.py --nodes 2 --gpus-per-node 8 --cpus-per-task 10 --mem-gb 400 --partition P
  \\
      --time 4320 train_msf.py --data /imagenet --output-dir runs/msf
  # a CPU-only job of 2 processes (gloo)
  python slurm/submit.py --gpus-per-node 0 --tasks-per-node 2 train_msf.py --dataset synthetic
  # transfer evaluation: one array task per dataset, then a job that writes the table
  python slurm/submit.py --array --gpus-per-node 1 transfer_eval.py --weights
  runs/msf/backbone_torchvision.pth \\
      --data-root /data/transfer --output-dir runs/msf/transfer
  # try a launch on this machine without SLURM
  python slurm/submit.py --local --gpus-per-node 0 --tasks-per-node 2 --wait train_msf.py --dataset
  synthetic

Job logs go to --job-dir (default output/slurm/%j, %j = the job id); --output-dir of the script
defaults to that folder too.

One row of the papers' tables (slurm/paper_rows.py), end to end: the training, then every
evaluation of the row (afterok), then a job that writes report.md beside the paper's numbers
(afterany). Re-running the same command submits only the stages that have not finished.

  python slurm/submit.py --reproduce list
  python slurm/submit.py --reproduce msf-ws-256k --gpus-per-node 8 --data /imagenet \
      --output-dir runs/msf-ws-256k
  python slurm/submit.py --status runs/msf-ws-256k
"""
import argparse
import copy
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time

import submitit

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in (REPO_ROOT, os.path.join(REPO_ROOT, "slurm")):  # also when imported from elsewhere
    if folder not in sys.path:
        sys.path.insert(0, folder)
import common  # noqa: E402
import paper_rows  # noqa: E402
import reproduce  # noqa: E402

# squeue states of a job that will not run again (REQUEUED, PENDING, COMPLETING, ... will)
ENDED_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


def get_args_parser():
    p = argparse.ArgumentParser(
        "slurm/submit.py",
        usage="python slurm/submit.py [SLURM options] SCRIPT.py [SCRIPT options]",
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_slurm_options(p)
    p.add_argument("--job-dir", default=os.path.join("output", "slurm", "%j"),
                   help="submitit's folder of this job (logs, pickles); %%j = job id")
    p.add_argument("--array", action="store_true",
                   help="transfer_eval.py: one array task per name in --datasets, then a job that "
                        "collects the table (results.md, results.json) into --output-dir")
    p.add_argument("--local", action="store_true",
                   help="run on this machine with submitit's local executor instead of SLURM")
    p.add_argument("--wait", action="store_true",
                   help="block until the job is done and print its result")
    p.add_argument("script", help="one of the suite's scripts, e.g. train_msf.py")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own options")
    return p


def add_slurm_options(p, constraint_flag="--constraint"):
    """The options of the job itself (resources, partition, requeue), shared with --reproduce
    (where --constraint is the training script's, so SLURM's is --slurm-constraint)."""
    p.add_argument("--nodes", type=int, default=1, help="nodes of the job")
    p.add_argument("--gpus-per-node", type=int, default=1,
                   help="one task per GPU; 0 = a CPU job (gloo) with --tasks-per-node tasks per "
                        "node")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node of a CPU job (None: 1); a GPU job runs --gpus-per-node")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per process (None: SLURM's default)")
    p.add_argument("--mem-gb", type=float, default=None,
                   help="memory per node, GB (None: SLURM's default)")
    p.add_argument("--time", type=int, default=4320,
                   help="time limit of one run of the job, minutes")
    p.add_argument("--partition", default=None, help="SLURM partition; None: the cluster's default")
    p.add_argument("--account", default=None, help="SLURM account to charge")
    p.add_argument("--qos", default=None, help="SLURM quality of service")
    p.add_argument(constraint_flag, dest="constraint", default=None,
                   help="node features, e.g. volta32gb")
    p.add_argument("--exclude", default=None, help="nodes not to use")
    p.add_argument("--comment", default=None, help="SLURM job comment")
    p.add_argument("--job-name", default=None, help="None: the script's name")
    p.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch parameter, e.g. --slurm-extra mail-type=END (repeatable)")
    p.add_argument("--signal-delay-s", type=int, default=120,
                   help="SLURM sends USR2 this long before the time limit: time to save a "
                        "checkpoint")
    p.add_argument("--max-num-timeout", type=int, default=20,
                   help="requeues after reaching the time limit before giving up (preemptions: "
                        "unlimited)")


def import_script(path):
    """Import a script of the suite as a module, its folder first on sys.path (for `import common`).
    Runs inside the job too, so it uses nothing of the repo: the job unpickles Trainer before the
    repo is on its sys.path."""
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_script(path):
    if not (path.endswith(".py") and os.path.isfile(path)):
        raise common.UsageError(f"{path} is not a Python file; give the script to run, e.g. "
                                f"train_msf.py")
    module = import_script(path)
    if not (hasattr(module, "get_args_parser") and hasattr(module, "main")):
        raise common.UsageError(f"{path} has no get_args_parser() and main(args); only the suite's "
                                "scripts can be submitted")
    return module


class Trainer:
    """What every task of the job runs: the script's main(args) in the job's torch.distributed
    setting.

    checkpoint() is called by submitit on global rank 0 when SLURM signals the job (after the
    training script saved checkpoint.pth); the job is requeued with the same arguments and the
    script resumes from <output-dir>/checkpoint.pth. `command` is the submitting command line: the
    job sets sys.argv to it, so the script's args.json records what the user typed, not submitit's
    own command."""

    def __init__(self, script_path, args, command=None):
        self.script_path = script_path
        self.args = args
        self.command = command

    def __call__(self):
        job_env = submitit.JobEnvironment()
        # A requeued job may find this task's result file of the run before (an error of a rank that
        # was stopped for the requeue): remove it, so that waiting for all results waits for this
        # run.
        job_env.paths.result_pickle.unlink(missing_ok=True)
        # CUDA_VISIBLE_DEVICES stays as SLURM set it (all GPUs of the node, as under torchrun):
        # common.init_distributed picks cuda:LOCAL_RANK.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                              overwrite=True)
        # main() adds fields to args; a requeue resubmits the clean ones
        args = copy.deepcopy(self.args)
        if getattr(self, "command", None):  # absent in jobs pickled by an older submit.py
            sys.argv = list(self.command)
        if getattr(args, "output_dir", None):
            args.output_dir = args.output_dir.replace("%j", str(job_env.job_id))
        if job_env.global_rank == 0:
            print(f"{os.path.basename(self.script_path)} in job {job_env.job_id} "
                  f"({job_env.num_tasks} tasks on {job_env.num_nodes} node(s)), output dir "
                  f"{getattr(args, 'output_dir', None)}", flush=True)
        common.apply_determinism(args)  # as run_main does, before the script makes a tensor
        return common.run_guarded(import_script(self.script_path).main, args)  # as a direct run

    def checkpoint(self):
        return submitit.helpers.DelayedSubmission(
            type(self)(self.script_path, self.args, getattr(self, "command", None)))


class Collector:
    """The step after a transfer array: transfer_eval.collect(output_dir) writes and returns the
    table."""

    def __init__(self, script_path, output_dir):
        self.script_path = script_path
        self.output_dir = output_dir

    def __call__(self):
        table = import_script(self.script_path).collect(self.output_dir)
        print(table, flush=True)
        return table


def parse_extra(items):
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise common.UsageError(f"--slurm-extra {item!r} is not KEY=VALUE; e.g. --slurm-extra "
                                    f"mail-type=END")
        extra[key.strip().lstrip("-")] = value
    return extra


def make_executor(opts, folder, nodes, gpus_per_node, tasks_per_node, timeout_min, name, extra):
    cluster = "local" if opts.local else "slurm"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                     slurm_max_num_timeout=opts.max_num_timeout,
                                     local_max_num_timeout=opts.max_num_timeout)
    params = dict(nodes=nodes, tasks_per_node=tasks_per_node, timeout_min=timeout_min, name=name)
    if gpus_per_node:  # a CPU job asks for no GPU at all
        params["gpus_per_node"] = gpus_per_node
    if opts.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    if opts.local:
        executor.update_parameters(**params)  # the local executor signals 30 s before --time
        return executor
    slurm = {"partition": opts.partition, "account": opts.account, "qos": opts.qos,
             "constraint": opts.constraint, "exclude": opts.exclude, "comment": opts.comment}
    params.update({f"slurm_{k}": v for k, v in slurm.items() if v is not None})
    executor.update_parameters(**params, slurm_signal_delay_s=opts.signal_delay_s,
                               slurm_additional_parameters=extra)
    return executor


def job_state(job):
    """SLURM's state of the job from squeue (works without an accounting database, unlike sacct);
    'UNKNOWN' once squeue has forgotten it. Local jobs report submitit's own state."""
    if isinstance(job, submitit.local.local.LocalJob):
        return {"FINISHED": "COMPLETED", "INTERRUPTED": "FAILED"}.get(job.state, job.state)
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%T", "--jobs",
                          str(job.job_id)], capture_output=True, text=True).stdout.split()
    return out[0] if out else "UNKNOWN"


def wait_for_results(job, poll_s=2.0, grace_s=60.0, timeout_s=None):
    """job.results() (one value per task) once every task wrote its result file. submitit's own wait
    asks sacct, which needs SLURM's accounting database and hangs on a job that died without a
    result; this one raises instead."""
    tasks = [job.task(i) for i in range(job.num_tasks)]
    start, ended_since = time.time(), None
    while not all(task.paths.result_pickle.exists() for task in tasks):
        if job_state(job) in ENDED_STATES | {"UNKNOWN"}:
            ended_since = ended_since or time.time()
            if time.time() - ended_since > grace_s:
                raise submitit.core.utils.UncompletedJobError(
                    f"job {job.job_id} ended ({job_state(job)}) without a result; see "
                    f"{job.paths.stderr} and {job.paths.stdout}")
        else:
            ended_since = None
        if timeout_s is not None and time.time() - start > timeout_s:
            raise TimeoutError(f"job {job.job_id} not done after {timeout_s:.0f} s (state "
                               f"{job_state(job)})")
        time.sleep(poll_s)
    return job.results()


def script_parser(module, script_path):
    """The script's own parser (plus --deterministic), as the job parses its options."""
    parser = argparse.ArgumentParser(prog=f"slurm/submit.py [SLURM options] "
                                     f"{os.path.basename(script_path)}",
                                     parents=[module.get_args_parser()],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.set_defaults(output_dir=None)  # None = not given: the job folder
    return common.add_determinism_arg(parser)


def script_args_of(module, script_path, argv):
    return common.parse_args_noting_given(script_parser(module, script_path), argv)


def submit_command(argv):
    """The submitting command line, for the provenance in the job's args.json."""
    return [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]


def tasks_per_node_of(opts):
    """Processes per node of the job, after checking the resource options fit together."""
    if opts.gpus_per_node < 0 or opts.nodes < 1:
        raise common.UsageError("--gpus-per-node must be >= 0 and --nodes >= 1")
    if opts.gpus_per_node and opts.tasks_per_node not in (None, opts.gpus_per_node):
        raise common.UsageError(f"--tasks-per-node {opts.tasks_per_node} with --gpus-per-node "
                                f"{opts.gpus_per_node}: GPU jobs run one task per GPU; drop "
                                f"--tasks-per-node")
    if opts.local and opts.nodes > 1:
        raise common.UsageError("--local runs on this machine only: use --nodes 1")
    if not opts.local and shutil.which("sbatch") is None:
        raise common.UsageError("sbatch not found: run this on a SLURM login node, or pass --local "
                                "to try it here")
    return opts.gpus_per_node or opts.tasks_per_node or 1


def main(argv=None):
    # A job unpickles Trainer, whose code imports common: the repo must be on the job's path
    # whichever folder the command was typed in (sbatch and the local executor pass the
    # environment on)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if REPO_ROOT not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, *filter(None, paths)])
    words = sys.argv[1:] if argv is None else list(map(str, argv))
    if "--reproduce" in words or "--status" in words:
        return reproduce_main(words)
    opts = get_args_parser().parse_args(argv)
    script_path = os.path.abspath(opts.script)
    if not os.path.exists(script_path) and os.path.exists(os.path.join(REPO_ROOT, opts.script)):
        script_path = os.path.join(REPO_ROOT, opts.script)  # `train_msf.py` from outside the repo
    module = load_script(script_path)
    args = script_args_of(module, script_path, opts.script_args)
    job_dir = os.path.abspath(opts.job_dir)
    extra = parse_extra(opts.slurm_extra)
    tasks_per_node = tasks_per_node_of(opts)
    name = opts.job_name or os.path.splitext(os.path.basename(script_path))[0]
    if opts.array:
        return submit_array(opts, module, script_path, args, job_dir, tasks_per_node, name, extra,
                            argv)

    if hasattr(args, "output_dir"):
        args.output_dir = os.path.abspath(args.output_dir or job_dir)  # %j is replaced in the job
    executor = make_executor(opts, job_dir, opts.nodes, opts.gpus_per_node, tasks_per_node,
                             opts.time, name, extra)
    job = executor.submit(Trainer(script_path, args, submit_command(argv)))
    print(f"submitted job {job.job_id}: {opts.nodes} node(s) x {tasks_per_node} task(s)\n  output "
          f"dir {getattr(args, 'output_dir', '-').replace('%j', str(job.job_id))}\n  logs       "
          f"{job.paths.stdout} (task 0; task N writes _N_log.out)\n  errors     "
          f"{job.paths.stderr}", flush=True)
    if opts.wait:
        results = wait_for_results(job)
        print(f"job {job.job_id} done; result of task 0: {results[0]}", flush=True)
    return job


def submit_array(opts, module, script_path, args, job_dir, tasks_per_node, name, extra, argv=None):
    """One array task per dataset name of --datasets, then the collect step: a job that starts after
    the array ends (SLURM dependency afterany), or with --local this process once the tasks
    finished."""
    if not (hasattr(module, "collect") and isinstance(getattr(args, "datasets", None), str)):
        raise common.UsageError(f"--array needs a script with --datasets and collect() "
                                f"(transfer_eval.py), not {os.path.basename(script_path)}")
    if hasattr(module, "parse_dataset_names"):
        names = module.parse_dataset_names(args.datasets)
    else:
        names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    # every task writes <output-dir>/<name>.json into one folder, so it is fixed now
    output_dir = args.output_dir or job_dir.replace("%j",
                                                    f"{name}_{time.strftime('%Y%m%d-%H%M%S')}")
    args.output_dir = os.path.abspath(output_dir)
    executor = make_executor(opts, job_dir, opts.nodes, opts.gpus_per_node, tasks_per_node,
                             opts.time, name, extra)
    trainers = []
    for dataset in names:
        task_args = copy.deepcopy(args)
        task_args.datasets = dataset
        trainers.append(Trainer(script_path, task_args, submit_command(argv)))
    with executor.batch():
        jobs = [executor.submit(trainer) for trainer in trainers]
    print(f"submitted {len(jobs)} tasks "
          f"({', '.join(f'{j.job_id}: {n}' for j, n in zip(jobs, names))})\n  output dir "
          f"{args.output_dir}\n  logs       {os.path.dirname(jobs[0].paths.stdout)} ...",
          flush=True)
    collector = Collector(script_path, args.output_dir)
    if opts.local:  # no scheduler to run a dependent job: wait here
        for job in jobs:
            wait_for_results(job)
        table = collector()  # prints it
        return jobs, table
    array_id = str(jobs[0].job_id).split("_")[0]
    collect_executor = make_executor(opts, job_dir, 1, 0, 1, 30, f"{name}_collect",
                                     {**extra, "dependency": f"afterany:{array_id}"})
    collect_job = collect_executor.submit(collector)
    print(f"submitted job {collect_job.job_id}: collects the table after array {array_id} ends -> "
          f"{os.path.join(args.output_dir, 'results.md')}", flush=True)
    if opts.wait:
        table = wait_for_results(collect_job)[0]
        print(table, flush=True)
        return jobs, table
    return jobs, collect_job


# ---------------------------------------------------------------- one paper row, end to end

class Reporter:
    """The last job of a --reproduce chain: slurm/reproduce.py's write_report(output_dir) writes
    report.md and report.json (the measured numbers beside the paper's) and returns the markdown."""

    def __init__(self, reproduce_path, output_dir):
        self.reproduce_path = reproduce_path
        self.output_dir = output_dir

    def __call__(self):
        markdown = import_script(self.reproduce_path).write_report(self.output_dir)
        print(markdown, flush=True)
        return markdown


def get_reproduce_parser():
    p = argparse.ArgumentParser(
        "slurm/submit.py --reproduce", allow_abbrev=False,  # an abbreviation could eat a flag
        usage="python slurm/submit.py --reproduce ROW [SLURM options] [--data DIR] "
              "[--output-dir DIR] [FLAGS of the row's scripts]\n       python slurm/submit.py "
              "--status OUTPUT_DIR\n       python slurm/submit.py --reproduce list",
        description="Train one row of the papers' tables, run every evaluation of that row, and "
                    "write report.md with the paper's numbers beside the measured ones. Any other "
                    "flag (e.g. --dataset synthetic --arch resnet10 --image-size 16 --epochs 2) "
                    "replaces the row's: in the training, and in the evaluations for the data, "
                    "network and device flags. Re-running the same command submits only the "
                    "stages that have not finished.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--reproduce", metavar="ROW", default=None,
                   help="a row name (`--reproduce list` prints them)")
    p.add_argument("--status", metavar="OUTPUT_DIR", default=None,
                   help="print each stage's state and job id of the chain in OUTPUT_DIR")
    p.add_argument("--output-dir", default=None, help="the chain's folder (None: runs/ROW)")
    p.add_argument("--data", default=None,
                   help="the row's dataset ($IMNET, $CIFAR or $STL in its command)")
    p.add_argument("--train-list-10pct", default=None,
                   help="SimCLR's 10percent.txt, for rows that train or evaluate on 10 %% labels")
    p.add_argument("--train-list-1pct", default=None,
                   help="SimCLR's 1percent.txt, for rows that train or evaluate on 1 %% labels")
    p.add_argument("--transfer-root", default=None,
                   help="transfer_eval.py's --data-root: adds the 10-dataset transfer array")
    p.add_argument("--skip", action="append", default=[], metavar="EVALUATION",
                   help="leave out an evaluation of the row, e.g. --skip linear_1pct (repeatable, "
                        "or comma-separated)")
    p.add_argument("--eval-args", default="",
                   help="flags for the evaluations only, e.g. \"--epochs 5 --batch-size 32\" "
                        "(each goes to the evaluation scripts that take it)")
    add_slurm_options(p, constraint_flag="--slurm-constraint")
    p.add_argument("--local", action="store_true",
                   help="run the stages one after another on this machine (submitit's local "
                        "executor) instead of SLURM")
    p.add_argument("--wait", action="store_true", help="block until the report is written")
    return p


def script_path_of(script):
    return os.path.join(REPO_ROOT, script)


def reproduce_main(argv):
    """--reproduce / --status: returns the exit code."""
    opts, overrides = get_reproduce_parser().parse_known_args(argv)
    if opts.status:
        if opts.reproduce:
            raise common.UsageError("give --status OUTPUT_DIR or --reproduce ROW, not both")
        print("\n".join(reproduce.status_lines(os.path.abspath(opts.status))), flush=True)
        return 0
    if opts.reproduce == "list":
        print(paper_rows.listing(), flush=True)
        return 0
    row, closest = paper_rows.find_row(opts.reproduce)
    if row is None:
        hint = f"closest: {', '.join(closest)}; " if closest else ""
        raise common.UsageError(f"no paper row {opts.reproduce!r}; {hint}`python slurm/submit.py "
                                f"--reproduce list` prints them all")
    for flag, path, kind in (("--data", opts.data, os.path.exists),
                             ("--train-list-10pct", opts.train_list_10pct, os.path.isfile),
                             ("--train-list-1pct", opts.train_list_1pct, os.path.isfile),
                             ("--transfer-root", opts.transfer_root, os.path.isdir)):
        if path is not None and not kind(path):
            raise common.UsageError(f"{flag} {path} does not exist; give the path of the "
                                    f"{'folder' if kind is os.path.isdir else 'file'}")
    absolute = lambda path: path and os.path.abspath(path)  # noqa: E731
    output_dir = os.path.abspath(opts.output_dir or os.path.join("runs", row.name))
    parsers = StageParsers()
    skip = [name for item in opts.skip for name in item.split(",") if name]
    stages = reproduce.plan_chain(
        row, output_dir, absolute(opts.data),
        {"10pct": absolute(opts.train_list_10pct), "1pct": absolute(opts.train_list_1pct)},
        absolute(opts.transfer_root), skip, overrides, shlex.split(opts.eval_args),
        parsers.options_of)
    # every stage's command parsed now, so a bad value stops the chain before anything is submitted
    parsed = {name: parsers.parse(name, stage) for name, stage in stages.items()}
    previous = reproduce.read_state(output_dir)
    if previous and previous["row"] != row.name:
        raise common.UsageError(f"{output_dir} holds a run of row {previous['row']}; give "
                                f"another --output-dir for {row.name}")
    if previous and previous["overrides"] != overrides:
        raise common.UsageError(f"{output_dir} holds row {row.name} run with the flags "
                                f"{' '.join(previous['overrides']) or '(none)'}, not "
                                f"{' '.join(overrides) or '(none)'}; rerun with those, or give "
                                f"another --output-dir")
    tasks_per_node = tasks_per_node_of(opts)
    extra = parse_extra(opts.slurm_extra)
    state = {"row": row.name, "command": submit_command(argv), "overrides": overrides,
             "resources": f"{opts.nodes} node(s) x {opts.gpus_per_node} GPU(s), "
                          f"{tasks_per_node} task(s) per node" + (", local" if opts.local else ""),
             "stages": {}}
    stages["report"] = {"script": None, "argv": [], "output_dir": output_dir, "after": "all"}
    to_run, active = stages_to_run(stages, previous["stages"] if previous else {}, state)
    if not to_run:
        print(f"every stage has finished or is on its way; report: "
              f"{os.path.join(output_dir, 'report.md')}", flush=True)
        reproduce.write_state(output_dir, state)
        return 0
    if opts.local and active:
        raise common.UsageError(f"stage {next(iter(active))} of this chain still runs on this "
                                f"machine (process {next(iter(active.values()))}); rerun once it "
                                f"has ended")
    reproduce.write_state(output_dir, state)
    chain = Chain(opts, row, output_dir, state, tasks_per_node, extra,
                  {name: Trainer(script_path_of(stage["script"]), parsed[name],
                                 [script_path_of(stage["script"]), *stage["argv"]])
                   for name, stage in stages.items() if name != "report"})
    if opts.local:
        return chain.run_here(to_run)
    return chain.submit(to_run, active)


class StageParsers:
    """The parser of each stage's script (each script imported once), for checking and parsing
    the stage commands as the jobs will."""

    def __init__(self):
        self.modules = {}

    def parser_of(self, script):
        if script not in self.modules:
            self.modules[script] = load_script(script_path_of(script))
        return script_parser(self.modules[script], script_path_of(script))

    def options_of(self, script):
        return set(self.parser_of(script)._option_string_actions)

    def parse(self, name, stage):
        parser = self.parser_of(stage["script"])
        parser.exit_on_error = False  # a bad value: one error line, not argparse's usage text
        try:
            return common.parse_args_noting_given(parser, stage["argv"])
        except argparse.ArgumentError as e:
            raise common.UsageError(f"stage {name} ({stage['script']}): {e}") from None


def stages_to_run(stages, old_stages, state):
    """Which stages to submit, given the chain's earlier jobs: a finished one is reused, a queued
    or running one left alone (both keep their record in `state`), a failed one, one whose command
    changed and a new one are submitted; the report is submitted again whenever anything else is.
    Returns (stages to submit, {active stage: job id})."""
    to_run, active = [], {}
    for name, stage in stages.items():
        old = old_stages.get(name)
        reusable = old and old.get("job_id") and (name != "report" or not to_run)
        if reusable and old["argv"] != stage["argv"]:
            print(f"{name}: its command changed since job {old['job_id']}; submitted again",
                  flush=True)
        elif reusable:
            value, detail = reproduce.stage_state(old)
            if value == "FINISHED":
                print(f"{name}: finished (job {old['job_id']}), reused", flush=True)
                state["stages"][name] = old
                continue
            if value in reproduce.ACTIVE_STATES:
                print(f"{name}: job {old['job_id']} {value}, left alone", flush=True)
                state["stages"][name] = old
                active[name] = old["job_id"]
                continue
            print(f"{name}: job {old['job_id']} failed ({detail}); submitted again", flush=True)
        elif name == "report" and old and old.get("job_id") and not old.get("local"):
            value, _ = reproduce.stage_state(old)
            if value in reproduce.ACTIVE_STATES:  # it would report on the jobs replaced now
                subprocess.run(["scancel", old["job_id"]], capture_output=True)
        state["stages"][name] = dict(stage)  # a stage submitted again starts clean
        to_run.append(name)
    return to_run, active


class Chain:
    """Submits the stages of one row: on SLURM with dependencies, or here one after another."""

    def __init__(self, opts, row, output_dir, state, tasks_per_node, extra, trainers):
        self.opts, self.row, self.output_dir, self.state = opts, row, output_dir, state
        self.tasks_per_node, self.extra, self.trainers = tasks_per_node, extra, trainers
        self.job_folder = os.path.join(output_dir, "jobs", "%j")
        self.reporter = Reporter(os.path.join(REPO_ROOT, "slurm", "reproduce.py"), output_dir)

    def executor(self, name, after_ids=(), all_ended=False):
        extra = dict(self.extra)
        if after_ids:
            kind = "afterany" if all_ended else "afterok"
            extra["dependency"] = f"{kind}:" + ":".join(after_ids)
            if not all_ended:  # a failed training cancels its evaluations: the report still runs
                extra["kill-on-invalid-dep"] = "yes"
        if name == "report":
            return make_executor(self.opts, self.job_folder, 1, 0, 1, 30,
                                 f"{self.row.name}_report", extra)
        return make_executor(self.opts, self.job_folder, self.opts.nodes, self.opts.gpus_per_node,
                             self.tasks_per_node, self.opts.time, f"{self.row.name}_{name}", extra)

    def record(self, name, job):
        self.state["stages"][name].update(job_id=str(job.job_id), job_folder=self.job_folder,
                                          local=self.opts.local,
                                          submitted=time.strftime("%Y-%m-%d %H:%M:%S"))
        reproduce.write_state(self.output_dir, self.state)
        print(f"{name}: submitted job {job.job_id}", flush=True)

    def run_here(self, to_run):
        """--local: each stage waited for before the next; returns 1 if one failed."""
        failed = []
        for name in to_run:
            if self.state["stages"][name]["after"] == "train" and "train" in failed:
                print(f"{name}: not run (the training failed)", flush=True)
                continue
            job = self.executor(name).submit(self.trainers.get(name, self.reporter))
            self.record(name, job)
            try:
                wait_for_results(job, poll_s=0.2)
            except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError,
                    TimeoutError) as e:
                failed.append(name)
                print(f"{name}: failed ({str(e).strip().splitlines()[-1][:300]})", flush=True)
        print(f"report: {os.path.join(self.output_dir, 'report.md')}", flush=True)
        return 1 if failed else 0

    def submit(self, to_run, active):
        """SLURM: training, its evaluations (afterok), then the report (afterany of all)."""
        train_ids = [active["train"]] if "train" in active else []
        if "train" in to_run:
            job = self.executor("train").submit(self.trainers["train"])
            self.record("train", job)
            train_ids = [str(job.job_id)]
        evaluations = [name for name in to_run if name not in ("train", "report")]
        transfer = [name for name in evaluations if name.startswith("transfer_")]
        for name in evaluations:
            if name not in transfer:
                self.record(name, self.executor(name, train_ids).submit(self.trainers[name]))
        if transfer:  # one array, one task per dataset
            executor = self.executor(transfer[0], train_ids)
            with executor.batch():
                jobs = [executor.submit(self.trainers[name]) for name in transfer]
            for name, job in zip(transfer, jobs):
                self.record(name, job)
        ahead = [stage["job_id"] for name, stage in self.state["stages"].items()
                 if name != "report" and (name in to_run or name in active)]
        report_job = self.executor("report", ahead, all_ended=True).submit(self.reporter)
        self.record("report", report_job)
        report = os.path.join(self.output_dir, "report.md")
        print(f"report after jobs {', '.join(ahead) or '(none)'} end: {report}\n  status: python "
              f"slurm/submit.py --status {self.output_dir}", flush=True)
        if self.opts.wait:
            wait_for_results(report_job)
            print(f"report written: {report}", flush=True)
        return 0

if __name__ == "__main__":
    try:
        exit_code = main()
        sys.exit(exit_code if isinstance(exit_code, int) else 0)
    except (common.UsageError, reproduce.UsageError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
