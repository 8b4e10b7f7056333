"""`slurm/submit.py --reproduce ROW`: a paper row's whole chain (training, every evaluation of the
row, the report) at toy scale on a real one-node SLURM cluster, checked against the same scripts run
by hand; a preempted training, a failed stage submitted again alone, `--status`, `--local`, and the
bad input that must stop before anything is submitted.

The SLURM tests need a running cluster (`sudo bash slurm/start_local_cluster.sh`) and skip without
one (fail under CI=true), as tests/test_slurm.py does.
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

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS_DIR)
from conftest import REPO_ROOT, assert_usage_error, run_script, write_imagefolder  # noqa: E402
from test_slurm import CPU_JOB, JOB_TIMEOUT_S, cluster_problem, launch  # noqa: E402

sys.path.insert(0, os.path.join(REPO_ROOT, "slurm"))
import submit  # noqa: E402

SUBMIT = os.path.join(REPO_ROOT, "slurm", "submit.py")
# The MSF (s/s) row at toy scale: 64 synthetic images, 4 iterations, evaluations just as small
TOY_DATA = ["--dataset", "synthetic", "--synthetic-images", "64", "--arch", "resnet10",
            "--image-size", "16", "--workers", "0"]
TOY_MSF = [*TOY_DATA, "--epochs", "1", "--batch-size", "16", "--mem-bank-size", "40", "--topk", "3"]
TOY_EVAL = ["--epochs", "2", "--batch-size", "16"]


@pytest.fixture(scope="module")
def slurm_cluster():
    problem = cluster_problem()
    if problem and os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {problem}", pytrace=False)
    if problem:
        pytest.skip(problem)


def state_of(output_dir):
    return json.loads(open(os.path.join(output_dir, "reproduce.json")).read())


def wait_for_report(output_dir):
    """Block until the chain's report job has ended (submitit's result file, squeue's state)."""
    report = state_of(output_dir)["stages"]["report"]
    job = submitit.SlurmJob(folder=report["job_folder"], job_id=report["job_id"])
    submit.wait_for_results(job, timeout_s=JOB_TIMEOUT_S)


def status_of(output_dir, in_process=False):
    """{stage: state} as `--status` prints it (in_process: the same lines, without the seconds a
    new interpreter takes, for a state that lasts only seconds)."""
    if in_process:
        stdout = "\n".join(submit.reproduce.status_lines(output_dir))
    else:
        stdout = launch("--status", output_dir, cwd=output_dir)
    return dict(re.findall(r"^  (\S+) +job +\S+  (\S+)", stdout, re.M))


def measured(report):
    return {m["metric"]: m["measured"] for m in report["metrics"]}


def hand_runs(folder, train_script, train_flags, evaluations):
    """The row's scripts run by hand, as a researcher would: {metric: value} from their JSON."""
    train_dir = os.path.join(folder, "train")
    result = run_script(train_script, *train_flags, "--output-dir", train_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    values = {}
    for name, script, flags in evaluations:
        out = os.path.join(folder, name)
        result = run_script(script, *flags, "--weights", os.path.join(train_dir, "checkpoint.pth"),
                            "--output-dir", out)
        assert result.returncode == 0, result.stderr[-3000:]
        if script == "eval_knn.py":
            accuracy = json.load(open(os.path.join(out, "knn_results.json")))["accuracy"]
            values.update({f"{name}_1" if name == "knn" else name: accuracy["1"]["majority_top1"]})
            if name == "knn":
                values["knn_20"] = accuracy["20"]["majority_top1"]
        else:
            values[name] = json.load(open(os.path.join(out, "linear_results.json")))["final_top1"]
    return values


@pytest.fixture(scope="module")
def msf_chain(slurm_cluster, tmp_path_factory):
    """The MSF (s/s) row on SLURM, first with its linear stage made to fail (a file where its output
    folder goes), then the same command again once the file is gone: (folder, first report,
    --status after the first run, --status while the second run goes, stdout of the second run)."""
    root = tmp_path_factory.mktemp("reproduce_msf")
    output_dir = str(root / "runs" / "msf-ss")
    command = ["--reproduce", "msf-ss", *CPU_JOB, "--output-dir", output_dir, *TOY_MSF,
               "--eval-args", " ".join(TOY_EVAL)]
    os.makedirs(output_dir)
    blocker = os.path.join(output_dir, "linear")
    open(blocker, "w").write("not a folder: eval_linear.py cannot write its results here\n")
    launch(*command, "--wait", cwd=root)
    first_report = json.load(open(os.path.join(output_dir, "report.json")))
    failed_status = status_of(output_dir)
    os.remove(blocker)
    rerun = launch(*command, cwd=root)
    half_status = status_of(output_dir, in_process=True)
    wait_for_report(output_dir)
    return output_dir, first_report, failed_status, half_status, rerun


@pytest.mark.xdist_group("slurm")
def test_msf_row_chain_reports_the_numbers_of_the_scripts_run_by_hand(msf_chain, tmp_path):
    output_dir, _, _, _, _ = msf_chain
    report = json.load(open(os.path.join(output_dir, "report.json")))
    assert report["row"] == "msf-ss"
    assert {name: s["state"] for name, s in report["stages"].items()} == {
        "train": "FINISHED", "knn": "FINISHED", "linear": "FINISHED"}
    by_hand = hand_runs(str(tmp_path), "train_msf.py",
                        ["--amp", "none", "--augmentation", "strong/strong", *TOY_MSF],
                        [("knn", "eval_knn.py", TOY_DATA),
                         ("linear", "eval_linear.py", [*TOY_DATA, *TOY_EVAL])])
    assert measured(report) == by_hand
    assert set(by_hand) == {"knn_1", "knn_20", "linear"}
    paper = {m["metric"]: (m["paper"], m["difference"]) for m in report["metrics"]}
    assert paper["linear"] == (71.4, pytest.approx(by_hand["linear"] - 71.4))
    assert paper["knn_20"] == (64.0, pytest.approx(by_hand["knn_20"] - 64.0))
    markdown = open(os.path.join(output_dir, "report.md")).read()
    assert f"| linear | {by_hand['linear']:.2f} | 71.40 | {by_hand['linear'] - 71.4:+.2f} |" \
        in markdown
    provenance = report["provenance"]
    assert provenance["commit"] == subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"],
                                                  capture_output=True, text=True).stdout.strip()
    assert provenance["epochs"] == 1 and provenance["requeues"] == 0
    assert provenance["command"].startswith("python train_msf.py --amp none --augmentation "
                                            "strong/strong --dataset synthetic")
    assert provenance["processes"] == 1 and provenance["training_seconds"] > 0
    assert os.path.getsize(os.path.join(output_dir, "curves.png")) > 1000
    assert "![training curves](curves.png)" in markdown


@pytest.mark.xdist_group("slurm")
def test_failed_stage_is_submitted_again_alone_and_status_names_every_state(msf_chain):
    output_dir, first_report, failed_status, half_status, rerun = msf_chain
    # the first run: linear failed, the others finished, and the report says so
    assert failed_status == {"train": "FINISHED", "knn": "FINISHED", "linear": "FAILED",
                             "report": "FINISHED"}
    assert first_report["stages"]["linear"]["state"] == "FAILED"
    assert measured(first_report)["linear"] is None and measured(first_report)["knn_1"] >= 0
    # the same command again: only linear (and the report after it) were submitted
    assert re.search(r"^train: finished \(job \d+\), reused$", rerun, re.M)
    assert re.search(r"^knn: finished \(job \d+\), reused$", rerun, re.M)
    assert re.search(r"^linear: job \d+ failed \(.*\); submitted again$", rerun, re.M)
    assert sorted(re.findall(r"^(\w+): submitted job \d+$", rerun, re.M)) == ["linear", "report"]
    assert first_report["stages"]["train"]["job_id"] == state_of(output_dir)["stages"]["train"][
        "job_id"]
    # while it ran: half finished
    assert half_status["train"] == half_status["knn"] == "FINISHED"
    assert half_status["linear"] in ("PENDING", "RUNNING") and half_status["report"] == "PENDING"
    assert status_of(output_dir) == dict.fromkeys(["train", "knn", "linear", "report"],
                                                  "FINISHED")
    # and once more: nothing left to do, nothing submitted
    again = launch(*json.load(open(os.path.join(output_dir, "reproduce.json")))["command"][1:],
                   cwd=output_dir)
    assert "submitted job" not in again and "every stage has finished" in again


def write_semi_imagefolder(root):
    """3 classes x 16 train (and val) images with unique file names, and a labeled list of 2 per
    class in SimCLR's format (one file name per line)."""
    write_imagefolder(root, classes=3, images_per_class=16)
    names = []
    for split in ("train", "val"):
        for c in range(3):
            folder = os.path.join(root, split, f"class_{c}")
            for i in range(16):
                name = f"n0000000{c}_{split}{i}.jpg"
                os.rename(os.path.join(folder, f"img_{i}.jpg"), os.path.join(folder, name))
                if split == "train" and i < 2:
                    names.append(name)
    labeled = os.path.join(os.path.dirname(root), "10percent.txt")
    open(labeled, "w").write("\n".join(names) + "\n")
    return labeled


SEMI_TRAIN = ["--arch", "resnet10", "--image-size", "16", "--batch-size", "4", "--mem-bank-size",
              "8", "--topk", "3", "--epochs", "3", "--workers", "0", "--pseudo-batch-size", "4"]
SEMI_EVAL = ["--epochs", "2", "--batch-size", "4", "--k", "1", "3"]


@pytest.mark.xdist_group("slurm")
def test_semi_row_preempted_in_training_ends_with_the_numbers_of_the_scripts_by_hand(
        slurm_cluster, tmp_path):
    data = str(tmp_path / "data")
    labeled = write_semi_imagefolder(data)
    output_dir = str(tmp_path / "runs" / "semi")
    stdout = launch("--reproduce", "semi-cmsf-pseudo", *CPU_JOB, "--output-dir", output_dir,
                    "--data", data, "--train-list-10pct", labeled, *SEMI_TRAIN,
                    "--eval-args", " ".join(SEMI_EVAL), cwd=tmp_path)
    assert sorted(re.findall(r"^(\w+): submitted job", stdout, re.M)) == [
        "report", "semi_10pct", "semi_knn_10pct", "train"]
    train_id = state_of(output_dir)["stages"]["train"]["job_id"]
    log = os.path.join(output_dir, "train", "log.jsonl")
    deadline = time.time() + JOB_TIMEOUT_S
    while not os.path.exists(log):  # signal once the first epoch is logged
        assert time.time() < deadline and submit.reproduce.squeue_state(train_id) in (
            "PENDING", "RUNNING"), open(os.path.join(output_dir, "jobs", train_id,
                                                     f"{train_id}_0_log.err")).read()[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", train_id], check=True)
    wait_for_report(output_dir)

    report = json.load(open(os.path.join(output_dir, "report.json")))
    assert {name: s["state"] for name, s in report["stages"].items()} == dict.fromkeys(
        ["train", "semi_10pct", "semi_knn_10pct"], "FINISHED")
    assert report["provenance"]["requeues"] == 1 and report["provenance"]["epochs"] == 3
    data_flags = ["--data", data, "--arch", "resnet10", "--image-size", "16", "--workers", "0"]
    by_hand = hand_runs(str(tmp_path / "hand"), "train_cmsf_semi.py",
                        ["--data", data, "--labeled-list", labeled, "--amp", "none",
                         *SEMI_TRAIN],
                        [("semi_10pct", "eval_linear.py",
                          ["--protocol", "semi", "--train-list", labeled, *data_flags,
                           "--epochs", "2", "--batch-size", "4"]),
                         ("semi_knn_10pct", "eval_knn.py",
                          ["--train-list", labeled, *data_flags, "--batch-size", "4", "--k", "1",
                           "3"])])
    assert measured(report) == by_hand
    assert {m["metric"]: m["paper"] for m in report["metrics"]} == {"semi_10pct": 69.9,
                                                                    "semi_knn_10pct": None}


def run_submit(*argv, cwd):
    return run_script(SUBMIT, *map(str, argv), cwd=str(cwd))


def test_local_chain_of_the_random_init_row_runs_every_evaluation_and_reports(tmp_path):
    output_dir = tmp_path / "random"
    result = run_submit("--reproduce", "random-init", "--local", "--output-dir", output_dir,
                        *TOY_DATA, "--eval-args", "--epochs 1 --batch-size 16", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(re.findall(r"^(\w+): submitted job", result.stdout, re.M)) == [
        "knn", "linear", "report"]
    report = json.load(open(output_dir / "report.json"))
    knn = json.load(open(output_dir / "knn" / "knn_results.json"))
    assert measured(report) == {
        "linear": json.load(open(output_dir / "linear" / "linear_results.json"))["final_top1"],
        "knn_1": knn["accuracy"]["1"]["majority_top1"],
        "knn_20": knn["accuracy"]["20"]["majority_top1"]}
    assert knn["weights"] == "random init"
    assert report["provenance"] == {"training": "none (this row evaluates a random "
                                                "initialisation)"}
    assert "no training curves" in open(output_dir / "report.md").read()


@pytest.mark.parametrize("argv, fragments", [
    (["--reproduce", "msf-ss-1m"], ["no paper row 'msf-ss-1m'", "closest: msf-ws-1m, msf-ss", "--reproduce "
                                                                                   "list"]),
    (["--reproduce", "msf-ss"], ["reads $IMNET", "give --data"]),
    (["--reproduce", "msf-ws-1m", *TOY_DATA], ["linear_1pct", "--train-list-1pct FILE",
                                               "--skip linear_1pct"]),
    (["--reproduce", "msf-ws-1m", *TOY_DATA, "--skip", "linear_1pct,linear_10pct"],
     ["transfer numbers", "--transfer-root DIR", "--skip transfer"]),
    (["--reproduce", "cmsf-sup-noisy-list", *TOY_DATA], ["example file noisy.txt",
                                                         "--noisy-labels /path/to/noisy.txt"]),
    (["--reproduce", "msf-ss", *TOY_DATA, "--no-such-flag", "1"], ["train_msf.py has no "
                                                                   "--no-such-flag"]),
    (["--reproduce", "msf-ss", *TOY_DATA, "--epochs", "two"], ["stage train", "--epochs",
                                                               "invalid int value"]),
    (["--reproduce", "msf-ss", *TOY_DATA, "--eval-args", "--pseudo-batch-size 2"],
     ["--eval-args --pseudo-batch-size", "no evaluation"]),
    (["--status", "."], ["holds no reproduce.json"]),
])
def test_bad_input_is_one_error_line_before_anything_is_submitted(tmp_path, argv, fragments):
    output = ["--output-dir", tmp_path / "run"] if argv[0] == "--reproduce" else []
    result = run_submit(*argv, *output, "--local", cwd=tmp_path)
    assert_usage_error(result, *fragments)
    assert os.listdir(tmp_path) == []  # nothing written, nothing submitted


def test_an_output_dir_of_another_row_or_other_flags_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    state = {"row": "msf-ww", "command": [], "overrides": [], "stages": {}}
    (run / "reproduce.json").write_text(json.dumps(state))
    result = run_submit("--reproduce", "msf-ss", "--local", "--output-dir", run, *TOY_DATA,
                        cwd=tmp_path)
    assert_usage_error(result, "holds a run of row msf-ww", "another --output-dir")
    (run / "reproduce.json").write_text(json.dumps({**state, "row": "msf-ss"}))
    result = run_submit("--reproduce", "msf-ss", "--local", "--output-dir", run, *TOY_DATA,
                        cwd=tmp_path)
    assert_usage_error(result, "holds row msf-ss run with the flags (none)",
                       "--dataset synthetic")
    assert sorted(os.listdir(run)) == ["reproduce.json"]
    shutil.rmtree(run)
