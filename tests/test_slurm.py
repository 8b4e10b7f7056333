"""slurm/submit.py on a real SLURM cluster: a 2-task DDP job, a preempted and requeued job, and the
transfer-evaluation array with its collect step.

Needs a running cluster with a node of >= 2 CPUs (`sudo bash slurm/start_local_cluster.sh` starts a
one-node one). Without one the tests skip with the reason; under CI=true (.ci/run starts the cluster)
they fail instead, so they cannot silently vanish. About 5 minutes on 2 CPU cores.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import submitit
import torch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS_DIR)
from conftest import REPO_ROOT, run_script, script_env  # noqa: E402
from transfer_fixtures import make_transfer_fixtures  # noqa: E402

sys.path.insert(0, os.path.join(REPO_ROOT, "slurm"))
import submit  # noqa: E402

# pytest-xdist: all SLURM tests in one worker, so their jobs queue one after another on the
# one-node cluster instead of competing for its CPUs with each other
pytestmark = pytest.mark.xdist_group("slurm")

START_HINT = "start one with: sudo bash slurm/start_local_cluster.sh"
# 192 synthetic images, global batch 16: 12 iterations per epoch, so the preemption check (every 10
# iterations) saves mid-epoch.
MSF_ARGS = ["--dataset", "synthetic", "--synthetic-images", "192", "--arch", "resnet10", "--image-size", "16",
            "--batch-size", "16", "--mem-bank-size", "40", "--topk", "3", "--workers", "1", "--print-freq", "4",
            "--epochs", "3"]
CPU_JOB = ["--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "30"]
JOB_TIMEOUT_S = 600


def cluster_problem():
    """Why jobs cannot run here, or None."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return f"SLURM is not installed (no sinfo/sbatch); {START_HINT}"
    try:
        out = subprocess.run(["sinfo", "--noheader", "--format=%t %c"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer in 30 s; {START_HINT}"
    if out.returncode != 0:
        return f"no SLURM controller answers ({out.stderr.strip()}); {START_HINT}"
    nodes = [line.split() for line in out.stdout.splitlines() if line.strip()]
    usable = [cpus for state, cpus in nodes if state.rstrip("*") in ("idle", "mix", "alloc", "comp")]
    if not any(int(cpus.rstrip("+")) >= 2 for cpus in usable):
        return f"no SLURM node with >= 2 CPUs takes jobs (sinfo: {nodes}); {START_HINT}"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    problem = cluster_problem()
    if problem and os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {problem}", pytrace=False)
    if problem:
        pytest.skip(problem)


def launch(*argv, cwd):
    """Run slurm/submit.py as a user would; returns its stdout (fails the test on a non-zero exit)."""
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "slurm", "submit.py"), *map(str, argv)],
                            capture_output=True, text=True, env=script_env(), cwd=cwd, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result.stdout


def submitted_job_id(stdout):
    return re.search(r"submitted job (\d+):", stdout).group(1)


def read_logs(jobs_root, job_id, tasks=2):
    """stdout and stderr of every task of a job submitted with --job-dir jobs_root/%j."""
    folder = os.path.join(jobs_root, job_id)
    return "".join(open(os.path.join(folder, f"{job_id}_{t}_log.{ext}")).read()
                   for t in range(tasks) for ext in ("out", "err"))


def load_weights(output_dir):
    checkpoint = torch.load(os.path.join(output_dir, "checkpoint.pth"), map_location="cpu", weights_only=True)
    return checkpoint["online"], checkpoint["target"], checkpoint["memory_bank"]["embeddings"]


def assert_same_weights(output_dir, reference_dir):
    online, target, bank = load_weights(output_dir)
    ref_online, ref_target, ref_bank = load_weights(reference_dir)
    for state, ref_state in ((online, ref_online), (target, ref_target)):
        assert state.keys() == ref_state.keys()
        different = [name for name in state if not torch.equal(state[name], ref_state[name])]
        assert not different, different[:5]
    assert torch.equal(bank, ref_bank)


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory):
    """The same training with 2 local processes (torchrun, gloo): the weights SLURM must reproduce."""
    output_dir = tmp_path_factory.mktemp("torchrun") / "msf"
    result = run_script("train_msf.py", *MSF_ARGS, "--output-dir", output_dir, nproc=2, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return str(output_dir)


def test_two_task_job_matches_two_local_processes(tmp_path, torchrun_reference):
    # no --output-dir: the script writes into the job's folder
    stdout = launch(*CPU_JOB, "--tasks-per-node", "2", "--job-dir", tmp_path / "jobs" / "%j", "--wait",
                    "train_msf.py", *MSF_ARGS, cwd=tmp_path)
    job_id = submitted_job_id(stdout)
    job_folder = tmp_path / "jobs" / job_id
    logs = read_logs(tmp_path / "jobs", job_id)
    assert "2 process(es) on cpu" in logs and "done: 3 epochs" in logs
    assert_same_weights(job_folder, torchrun_reference)
    assert len(open(job_folder / "log.jsonl").readlines()) == 3


def test_preempted_job_is_requeued_and_resumes_to_the_same_weights(tmp_path, torchrun_reference):
    output_dir = tmp_path / "run"
    stdout = launch(*CPU_JOB, "--tasks-per-node", "2", "--job-dir", tmp_path / "jobs" / "%j",
                    "train_msf.py", *MSF_ARGS, "--output-dir", output_dir, cwd=tmp_path)
    job_id = submitted_job_id(stdout)
    job = submitit.SlurmJob(folder=tmp_path / "jobs" / "%j", job_id=job_id, tasks=(0, 1))
    try:
        # signal once the first epoch is logged: training runs, the preemption handler is installed
        deadline = time.time() + JOB_TIMEOUT_S
        while not (output_dir / "log.jsonl").exists():
            assert time.time() < deadline and submit.job_state(job) not in submit.ENDED_STATES, \
                read_logs(tmp_path / "jobs", job_id)[-3000:]
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what SLURM sends before preempting
        submit.wait_for_results(job, timeout_s=JOB_TIMEOUT_S)
    finally:
        subprocess.run(["scancel", job_id])
    logs = read_logs(tmp_path / "jobs", job_id)
    assert "Requeued job" in logs
    # the checkpoint was written at the first check after the signal, mid-epoch, not at an epoch end
    assert re.search(r"resumed from .*checkpoint\.pth at epoch [23], iteration 10\b", logs), logs[-3000:]
    assert "done: 3 epochs" in logs
    assert_same_weights(output_dir, torchrun_reference)
    last_epoch = json.loads(open(output_dir / "log.jsonl").readlines()[-1])
    reference_last_epoch = json.loads(open(os.path.join(torchrun_reference, "log.jsonl")).readlines()[-1])
    assert last_epoch["epoch"] == 3 and last_epoch["loss"] == reference_last_epoch["loss"]


def test_transfer_array_and_collected_table(tmp_path):
    names = ["dtd", "caltech101", "pets"]  # fixtures torchvision reads without checksum patches
    data_root = make_transfer_fixtures(tmp_path / "data", names)
    backbone, _ = submit.common.build_backbone("resnet18", 16)
    weights = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), weights)
    output_dir = tmp_path / "transfer"
    stdout = launch(*CPU_JOB, "--array", "--job-dir", tmp_path / "jobs" / "%j", "--wait",
                    "transfer_eval.py", "--weights", weights, "--arch", "resnet18", "--image-size", "16",
                    "--data-root", data_root, "--datasets", ",".join(names), "--wd-grid-size", "3",
                    "--batch-size", "16", "--workers", "0", "--device", "cpu", "--max-iter", "100",
                    "--output-dir", output_dir, cwd=tmp_path)

    # one array task per dataset, each with its own result, then the collect job
    array_id = re.search(r"submitted 3 tasks \((\d+)_0: dtd, \1_1: caltech101, \1_2: pets\)", stdout).group(1)
    for index in range(3):
        assert (tmp_path / "jobs" / f"{array_id}_{index}" / f"{array_id}_{index}_0_result.pkl").is_file()
    collect_id = re.search(rf"submitted job (\d+): collects the table after array {array_id}", stdout).group(1)
    assert int(collect_id) > int(array_id)

    accuracies = {name: json.loads((output_dir / f"{name}.json").read_text())["test_accuracy"] for name in names}
    summary = json.loads((output_dir / "results.json").read_text())
    assert summary["test_accuracy"] == accuracies
    table = (output_dir / "results.md").read_text()
    assert table in stdout
    header = [cell.strip() for cell in table.splitlines()[0].split("|")]
    row = [cell.strip() for cell in table.splitlines()[3].split("|")]
    for name, column in (("dtd", "DTD"), ("caltech101", "Caltech"), ("pets", "Pets")):
        assert row[header.index(column)] == f"{accuracies[name]:.1f}"
    assert row[header.index("Food")] == "–"
