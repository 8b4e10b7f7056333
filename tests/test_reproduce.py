"""`slurm/submit.py --reproduce ROW`: a paper row's whole chain (training, every evaluation of the
row, the report) at toy scale on a real one-node SLURM cluster, checked against the same scripts run
by hand; a preempted training, a failed stage submitted again alone, `--status`, `--local`, and the
bad input that must stop before anything is submitted.

The SLURM tests need a running cluster (`sudo bash slurm/start_local_cluster.sh`) and skip without
one (fail under CI=true), as tests/test_slurm.py does.
"""
import concurrent.futures
import contextlib
import io
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

# pytest-xdist: meant to put these tests in one worker with tests/test_slurm.py (their jobs share
# the one-node cluster)
pytestmark = pytest.mark.xdist_group("slurm")

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


# 12 iterations per epoch: the preemption check (every 10 iterations) after the USR2 sent at the
# end of epoch 1 saves mid-epoch 2
SEMI_TRAIN = ["--arch", "resnet10", "--image-size", "16", "--batch-size", "4", "--mem-bank-size",
              "8", "--topk", "3", "--epochs", "2", "--workers", "0", "--pseudo-batch-size", "4",
              "--knn-every", "0"]
SEMI_EVAL = ["--epochs", "2", "--batch-size", "4", "--k", "1", "3"]


def wait_for_file(path, job_id):
    deadline = time.time() + JOB_TIMEOUT_S
    while not os.path.exists(path):
        assert time.time() < deadline and submit.reproduce.squeue_state(job_id) in (
            "PENDING", "RUNNING"), f"job {job_id} ended before {path} appeared"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def chains(slurm_cluster, tmp_path_factory):
    """Two rows on SLURM at once (their jobs share the cluster; the test waits for both):
    - the MSF (s/s) row, first with its linear stage made to fail (a file where its output folder
      goes), then the same command again once the file is gone;
    - the CMSF semi-supervised row on an ImageFolder with a 10 % list, its training sent SLURM's
      preemption warning (USR2) after the first epoch;
    and the same scripts run by hand meanwhile. Returns a dict of what the tests check."""
    root = tmp_path_factory.mktemp("reproduce")
    found = {}
    msf_dir = str(root / "runs" / "msf-ss")
    msf_command = ["--reproduce", "msf-ss", *CPU_JOB, "--output-dir", msf_dir, *TOY_MSF,
                   "--eval-args", " ".join(TOY_EVAL)]
    os.makedirs(msf_dir)
    blocker = os.path.join(msf_dir, "linear")
    open(blocker, "w").write("not a folder: eval_linear.py cannot write its results here\n")
    data = str(root / "data")
    labeled = write_semi_imagefolder(data)
    semi_dir = str(root / "runs" / "semi")
    semi_command = ["--reproduce", "semi-cmsf-pseudo", *CPU_JOB, "--output-dir", semi_dir,
                    "--data", data, "--train-list-10pct", labeled, *SEMI_TRAIN, "--eval-args",
                    " ".join(SEMI_EVAL)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both submissions at once
        semi_submitted = pool.submit(launch, *semi_command, cwd=root)
        pool.submit(launch, *msf_command, cwd=root).result()
        found["semi_stdout"] = semi_submitted.result()
    semi_train = state_of(semi_dir)["stages"]["train"]["job_id"]
    wait_for_file(os.path.join(semi_dir, "train", "log.jsonl"), semi_train)  # epoch 1 logged
    subprocess.run(["scancel", "--signal=USR2", semi_train], check=True)

    found["msf_by_hand"] = hand_runs(str(root / "hand_msf"), "train_msf.py",
                                     ["--amp", "none", "--augmentation", "strong/strong",
                                      *TOY_MSF],
                                     [("knn", "eval_knn.py", TOY_DATA),
                                      ("linear", "eval_linear.py", [*TOY_DATA, *TOY_EVAL])])
    data_flags = ["--data", data, "--arch", "resnet10", "--image-size", "16", "--workers", "0"]
    found["semi_by_hand"] = hand_runs(
        str(root / "hand_semi"), "train_cmsf_semi.py",
        ["--data", data, "--labeled-list", labeled, "--amp", "none", *SEMI_TRAIN],
        [("semi_10pct", "eval_linear.py", ["--protocol", "semi", "--train-list", labeled,
                                           *data_flags, "--epochs", "2", "--batch-size", "4"]),
         ("semi_knn_10pct", "eval_knn.py", ["--train-list", labeled, *data_flags,
                                            "--batch-size", "4", "--k", "1", "3"])])

    wait_for_report(msf_dir)
    found["msf_first_report"] = json.load(open(os.path.join(msf_dir, "report.json")))
    found["msf_failed_status"] = status_of(msf_dir, in_process=True)
    os.remove(blocker)
    found["msf_rerun"] = launch(*msf_command, cwd=root)
    found["msf_half_status"] = status_of(msf_dir, in_process=True)
    # the same command while linear and the report are on their way (in this process: a new
    # interpreter takes seconds, in which they could end)
    with contextlib.redirect_stdout(io.StringIO()) as again:
        submit.main(msf_command)
    found["msf_while_running"] = again.getvalue()
    wait_for_report(msf_dir)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the command, while semi finishes
        finished_status = pool.submit(status_of, msf_dir)
        wait_for_report(semi_dir)
        found["msf_finished_status"] = finished_status.result()
    found.update(msf_dir=msf_dir, semi_dir=semi_dir)
    return found


def test_rows_on_slurm_report_the_hand_run_numbers_survive_preemption_and_a_failed_stage(chains):
    # one test, so that the chains run once: pytest-xdist's grouping does not hold on pytest 9,
    # which would set the module fixture up again in another worker
    check_msf_row_reports_the_numbers_of_the_scripts_run_by_hand(chains)
    check_failed_stage_is_submitted_again_alone_and_status_names_every_state(chains)
    check_semi_row_preempted_in_training_ends_with_the_numbers_of_the_scripts_by_hand(chains)


def check_msf_row_reports_the_numbers_of_the_scripts_run_by_hand(chains):
    output_dir, by_hand = chains["msf_dir"], chains["msf_by_hand"]
    report = json.load(open(os.path.join(output_dir, "report.json")))
    assert report["row"] == "msf-ss"
    assert {name: s["state"] for name, s in report["stages"].items()} == {
        "train": "FINISHED", "knn": "FINISHED", "linear": "FINISHED"}
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
    assert provenance["processes"] == 1
    assert 0 < provenance["training_seconds"] <= provenance["wall_seconds"]
    assert os.path.getsize(os.path.join(output_dir, "curves.png")) > 1000
    assert "![training curves](curves.png)" in markdown


def check_failed_stage_is_submitted_again_alone_and_status_names_every_state(chains):
    output_dir, first_report = chains["msf_dir"], chains["msf_first_report"]
    rerun = chains["msf_rerun"]
    # the first run: linear failed, the others finished, and the report says so
    assert chains["msf_failed_status"] == {"train": "FINISHED", "knn": "FINISHED",
                                           "linear": "FAILED", "report": "FINISHED"}
    assert first_report["stages"]["linear"]["state"] == "FAILED"
    assert measured(first_report)["linear"] is None and measured(first_report)["knn_1"] >= 0
    # the same command again: only linear (and the report after it) were submitted
    assert re.search(r"^train: finished \(job \d+\), reused$", rerun, re.M)
    assert re.search(r"^knn: finished \(job \d+\), reused$", rerun, re.M)
    assert re.search(r"^linear: job \d+ failed \(.*\); submitted again$", rerun, re.M)
    assert sorted(re.findall(r"^(\w+): submitted job \d+$", rerun, re.M)) == ["linear", "report"]
    assert first_report["stages"]["train"]["job_id"] == \
        state_of(output_dir)["stages"]["train"]["job_id"]
    # while it ran: half finished; then finished
    half = chains["msf_half_status"]
    assert half["train"] == half["knn"] == "FINISHED"
    assert half["linear"] in ("PENDING", "RUNNING") and half["report"] == "PENDING"
    while_running = chains["msf_while_running"]
    assert "submitted" not in while_running
    assert re.search(r"^report: job \d+ (PENDING|RUNNING), left alone$", while_running, re.M)
    assert re.search(r"^train: finished \(job \d+\), reused$", while_running, re.M)
    assert chains["msf_finished_status"] == dict.fromkeys(["train", "knn", "linear", "report"],
                                                          "FINISHED")


def check_semi_row_preempted_in_training_ends_with_the_numbers_of_the_scripts_by_hand(chains):
    assert sorted(re.findall(r"^(\w+): submitted job", chains["semi_stdout"], re.M)) == [
        "report", "semi_10pct", "semi_knn_10pct", "train"]
    report = json.load(open(os.path.join(chains["semi_dir"], "report.json")))
    assert {name: s["state"] for name, s in report["stages"].items()} == dict.fromkeys(
        ["train", "semi_10pct", "semi_knn_10pct"], "FINISHED")
    assert report["provenance"]["requeues"] == 1 and report["provenance"]["epochs"] == 2
    # the wall time spans both runs of the job: at least the seconds of both epochs
    assert report["provenance"]["wall_seconds"] > report["provenance"]["training_seconds"]
    train_log = open(os.path.join(chains["semi_dir"], "jobs", report["stages"]["train"]["job_id"],
                                  f"{report['stages']['train']['job_id']}_0_log.out")).read()
    assert re.search(r"resumed from .*checkpoint\.pth at epoch 2, iteration 10\b", train_log)
    assert measured(report) == chains["semi_by_hand"]
    assert {m["metric"]: m["paper"] for m in report["metrics"]} == {"semi_10pct": 69.9,
                                                                    "semi_knn_10pct": None}


def run_submit(*argv, cwd):
    return run_script(SUBMIT, *map(str, argv), cwd=str(cwd))


def test_local_chain_runs_the_stages_here_and_reports_what_they_wrote(tmp_path):
    # the random-init row (no training), its linear stage skipped: k-NN, then the report
    output_dir = tmp_path / "random"
    result = run_submit("--reproduce", "random-init", "--local", "--output-dir", output_dir,
                        *TOY_DATA, "--skip", "linear", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.findall(r"^(\w+): submitted job", result.stdout, re.M) == ["knn", "report"]
    report = json.load(open(output_dir / "report.json"))
    knn = json.load(open(output_dir / "knn" / "knn_results.json"))
    assert knn["weights"] == "random init" and knn["train_images"] == 64
    assert measured(report) == {"linear": None,  # skipped: the paper's number stays beside none
                                "knn_1": knn["accuracy"]["1"]["majority_top1"],
                                "knn_20": knn["accuracy"]["20"]["majority_top1"]}
    assert {m["metric"]: m["paper"] for m in report["metrics"]} == {
        "linear": 5.1, "knn_1": 1.5, "knn_20": 2.0}
    assert report["provenance"] == {"training": "none (this row evaluates a random "
                                                "initialisation)"}
    assert "no training curves" in open(output_dir / "report.md").read()
    assert [line.split()[0] for line in submit.reproduce.status_lines(str(output_dir))[1:3]] == [
        "knn", "report"]
    assert all(line.endswith("FINISHED") for line in
               submit.reproduce.status_lines(str(output_dir))[1:3])


def plan(name, *words, transfer_root=None, lists=None, skip=(), eval_args=()):
    modules = {}

    def options_of(script):
        path = os.path.join(REPO_ROOT, script)
        modules.setdefault(script, submit.load_script(path))
        return set(submit.script_parser(modules[script], path)._option_string_actions)
    return submit.reproduce.plan_chain(submit.paper_rows.ROWS_BY_NAME[name], "/runs/x", "/data",
                                       lists or {}, transfer_root, list(skip), list(words),
                                       list(eval_args), options_of)


def test_overrides_reach_every_stage_they_apply_to():
    stages = plan("msf-ws-1m", "--arch", "resnet18", "--image-size", "32", "--epochs", "3",
                  "--lr", "0.1", lists={"1pct": "/l/1.txt", "10pct": "/l/10.txt"},
                  transfer_root="/transfer", eval_args=["--datasets", "dtd,pets", "--epochs", "5"])
    assert list(stages) == ["train", "knn", "linear", "linear_1pct", "linear_10pct",
                            "transfer_dtd", "transfer_pets"]
    assert stages["train"]["argv"] == ["--data", "/data", "--amp", "none", "--arch", "resnet18",
                                       "--image-size", "32", "--epochs", "3", "--lr", "0.1",
                                       "--output-dir", "/runs/x/train"]
    weights = ["--weights", "/runs/x/train/checkpoint.pth"]
    data = ["--data", "/data", "--arch", "resnet18", "--image-size", "32"]
    # the network and data reach the evaluations; the training recipe (--epochs, --lr) does not,
    # --eval-args go to the evaluations that take them
    assert stages["knn"]["argv"] == [*data, *weights, "--output-dir", "/runs/x/knn"]
    assert stages["linear_1pct"]["argv"] == ["--train-list", "/l/1.txt", *data, "--epochs", "5",
                                             *weights, "--output-dir", "/runs/x/linear_1pct"]
    assert stages["transfer_pets"]["argv"] == ["--data-root", "/transfer", "--datasets", "pets",
                                               "--arch", "resnet18", "--image-size", "32",
                                               *weights, "--output-dir", "/runs/x/transfer"]
    assert all(stages[name]["after"] == "train" for name in stages if name != "train")


def test_semi_rows_fill_the_labeled_list_in_training_and_evaluation():
    stages = plan("semi-cmsf-pseudo-1pct", lists={"1pct": "/l/1.txt"})
    assert stages["train"]["argv"][:4] == ["--data", "/data", "--labeled-list", "/l/1.txt"]
    assert stages["semi_1pct"]["argv"][:4] == ["--protocol", "semi", "--train-list", "/l/1.txt"]
    assert stages["semi_knn_1pct"]["argv"][:2] == ["--train-list", "/l/1.txt"]
    # the random-init row trains nothing: its evaluations load no weights
    stages = plan("random-init", "--dataset", "synthetic")
    assert list(stages) == ["knn", "linear"]
    assert stages["knn"]["argv"] == ["--dataset", "synthetic", "--output-dir", "/runs/x/knn"]


def test_report_without_matplotlib_says_so_in_one_line(tmp_path):
    # a finished local chain's files, its report written again where matplotlib cannot import
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    (run / "train" / "log.jsonl").write_text('{"epoch": 1, "loss": 1.0, "epoch_seconds": 2.5}\n')
    state = {"row": "msf-ss", "command": ["slurm/submit.py"], "overrides": [], "stages": {
        "train": {"script": "train_msf.py", "argv": [], "output_dir": str(run / "train")}}}
    (run / "reproduce.json").write_text(json.dumps(state))
    code = ("import sys; sys.modules['matplotlib'] = None; sys.path.insert(0, sys.argv[1]); "
            "import reproduce; reproduce.write_report(sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, os.path.join(REPO_ROOT, "slurm"), str(run)],
                   check=True)
    markdown = (run / "report.md").read_text()
    assert markdown.splitlines()[-1] == ("curves not drawn: matplotlib is not installed "
                                         "(pip install matplotlib)")
    report = json.loads((run / "report.json").read_text())
    assert report["curves"] is None and report["provenance"]["training_seconds"] == 2.5
    assert report["stages"]["train"]["state"] == "NOT SUBMITTED"
    assert not (run / "curves.png").exists()


@pytest.mark.parametrize("argv, fragments", [
    (["--reproduce", "msf-ss-1m"], ["no paper row 'msf-ss-1m'", "closest: msf-ws-1m, msf-ss",
                                    "--reproduce list"]),
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
