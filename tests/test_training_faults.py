"""Bad input and faults, the same in all four training scripts: one `error:` line that names the fix,
a non-zero exit, and the run's files (checkpoint.pth, args.json, log.jsonl) byte-identical
afterwards; kills at every point of the epoch tail are repaired by the rerun; a damaged checkpoint
costs one checkpoint interval."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import common
import train_cmsf_self
import train_cmsf_semi
import train_cmsf_sup
import train_msf
from conftest import REPO_ROOT, script_env, write_imagefolder

SCRIPTS = {"train_msf.py": train_msf, "train_cmsf_self.py": train_cmsf_self,
           "train_cmsf_sup.py": train_cmsf_sup, "train_cmsf_semi.py": train_cmsf_semi}
OWN_ARGS = {"train_msf.py": ["--topk", "3"], "train_cmsf_self.py": [], "train_cmsf_sup.py": [],
            "train_cmsf_semi.py": ["--labeled-fraction", "0.25", "--threshold", "0.3",
                                   "--pseudo-batch-size", "16"]}
RUN_FILES = ("checkpoint.pth", "checkpoint_previous.pth", "args.json", "log.jsonl")


def tiny_args(script, output_dir, *extra):
    """2 epochs x 4 iterations on 64 synthetic 16 px images, weights file every epoch."""
    return ["--dataset", "synthetic", "--synthetic-images", "64", "--arch", "resnet10",
            "--image-size", "16", "--batch-size", "16", "--mem-bank-size", "48", "--workers", "0",
            "--print-freq", "1", "--epochs", "2", "--save-every", "1", "--output-dir", str(output_dir),
            *OWN_ARGS[script], *map(str, extra)]


def run_cli(script, argv, monkeypatch, capsys):
    """The script's command line in this process (common.run_main: error line + exit code).
    Returns (exit code, stdout, stderr)."""
    module = SCRIPTS[script]
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    code = 0
    try:
        common.run_main(module.main, module.get_args_parser())
    except SystemExit as e:
        code = e.code
    finally:  # the PreemptionHandler installs these; leave the test process as it was
        import signal
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def run_in_progress(tmp_path_factory):
    """Per script: a run stopped in the middle of epoch 2 (iteration 2 of 4), with checkpoint.pth,
    checkpoint_previous.pth, checkpoint_0001.pth, args.json and one log line."""
    runs = {}
    for script in SCRIPTS:
        output_dir = tmp_path_factory.mktemp(script.removesuffix(".py")) / "run"
        result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script),
                                 *tiny_args(script, output_dir, "--stop-after-iters", 6)],
                                capture_output=True, text=True, env=script_env(), cwd=REPO_ROOT,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[script] = output_dir
    return runs


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in RUN_FILES if (folder / name).exists()}


BAD_INPUTS = {
    # name: (function of the run folder -> argv overrides, fragments of the error line, exit code)
    "bank smaller than the batch": (lambda d: ["--mem-bank-size", 8],
                                    ["--mem-bank-size 8", "--batch-size 16", "use --mem-bank-size 16"], 2),
    "another --mem-bank-size on resume": (lambda d: ["--mem-bank-size", 64],
                                          ["--mem-bank-size 48", "--mem-bank-size 64", "another --output-dir"], 2),
    "another --image-size stem on resume": (lambda d: ["--image-size", 72],
                                            ["--image-size 16", "--image-size 72"], 2),
    "another --image-size, same stem": (lambda d: ["--image-size", 24], ["--image-size 16", "--image-size 24"], 2),
    "another --batch-size mid-epoch": (lambda d: ["--batch-size", 8], ["--batch-size 16", "--batch-size 8"], 2),
    "weights-only epoch file": (lambda d: ["--resume", d / "checkpoint_0001.pth"],
                                ["weights-only", "checkpoint.pth"], 2),
    "--epochs 0": (lambda d: ["--epochs", 0], ["--epochs 0", "at least 1"], 2),
    "negative --lr": (lambda d: ["--lr", -0.1], ["--lr -0.1", "positive"], 2),
    "dataset smaller than the batch": (lambda d: ["--synthetic-images", 10],
                                       ["10 images", "lower --batch-size to at most 10"], 2),
    "--device gpu": (lambda d: ["--device", "gpu"], ["--device gpu"], 2),
    "--device cuda without a GPU": (lambda d: ["--device", "cuda"], ["--device cpu"], 2),
    "damaged checkpoint named by --resume": (lambda d: ["--resume", damaged_copy(d)],
                                             ["damaged", "checkpoint_previous.pth"], 2),
}


def damaged_copy(folder):
    data = (folder / "checkpoint.pth").read_bytes()
    (folder / "damaged.pth").write_bytes(data[:len(data) // 2])
    return folder / "damaged.pth"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_bad_input_is_one_error_line_and_changes_nothing(tmp_path, run_in_progress, monkeypatch, capsys,
                                                         script, case):
    if "cuda" in case and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    folder = tmp_path / "run"
    shutil.copytree(run_in_progress[script], folder)
    before = snapshot(folder)
    make_argv, fragments, exit_code = BAD_INPUTS[case]
    code, _, err = run_cli(script, tiny_args(script, folder) + make_argv(folder), monkeypatch, capsys)
    assert code == exit_code, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment.lower() in err.lower(), (fragment, err)
    assert snapshot(folder) == before


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_diverging_run_exits_non_zero_and_writes_nothing(tmp_path, monkeypatch, capsys, script):
    folder = tmp_path / "run"
    code, _, err = run_cli(script, tiny_args(script, folder, "--lr", "1e30"), monkeypatch, capsys)
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and "not finite" in err and "Lower --lr" in err, err
    assert not folder.exists() or not os.listdir(folder)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_output_dir_that_cannot_be_created(tmp_path, monkeypatch, capsys, script):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(script, tiny_args(script, blocker / "out"), monkeypatch, capsys)
    assert code == 2 and err.startswith("error: cannot write to --output-dir"), err
    assert "choose a folder" in err and blocker.read_text() == "not a folder"


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_unreadable_image_in_a_loader_worker(tmp_path, monkeypatch, capsys, script):
    root = write_imagefolder(tmp_path / "data", images_per_class=8)
    (tmp_path / "data" / "train" / "class_1" / "broken.jpg").write_bytes(b"not a JPEG at all")
    argv = tiny_args(script, tmp_path / "out", "--dataset", "imagefolder", "--data", root,
                     "--batch-size", 25, "--workers", 2, "--mem-bank-size", 50, "--synthetic-images", 64)
    if script == "train_cmsf_semi.py":
        argv += ["--labeled-fraction", "0.5"]
    code, _, err = run_cli(script, argv, monkeypatch, capsys)
    assert code == 2 and "broken.jpg" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, run_in_progress, monkeypatch,
                                                                  capsys, script):
    folder = tmp_path / "run"
    shutil.copytree(run_in_progress[script], folder)
    previous = torch.load(folder / "checkpoint_previous.pth", weights_only=True)
    data = (folder / "checkpoint.pth").read_bytes()
    (folder / "checkpoint.pth").write_bytes(data[:len(data) // 3])  # a truncated copy
    code, out, err = run_cli(script, tiny_args(script, folder), monkeypatch, capsys)
    assert code == 0, err
    assert "damaged" in out and f"resumed from {folder / 'checkpoint_previous.pth'}" in out
    assert f"at epoch {previous['epoch'] + 1}, iteration {previous['iteration']}" in out
    final = torch.load(folder / "checkpoint.pth", weights_only=True)
    assert (final["epoch"], final["iteration"]) == (2, 0)
    log = [json.loads(line)["epoch"] for line in (folder / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2]


def test_finished_run_says_complete(tmp_path, run_in_progress, monkeypatch, capsys):
    folder = tmp_path / "run"
    shutil.copytree(run_in_progress["train_msf.py"], folder)
    assert run_cli("train_msf.py", tiny_args("train_msf.py", folder), monkeypatch, capsys)[0] == 0
    before = snapshot(folder)
    code, out, _ = run_cli("train_msf.py", tiny_args("train_msf.py", folder), monkeypatch, capsys)
    assert code == 0 and "is complete (2 epochs); nothing to do" in out and "resumed" not in out
    assert snapshot(folder) == before


# ---------------------------------------------------------------- kill -9 in the epoch tail

KILL_AT = {  # the first call of this function (in epoch 1's tail) kills the process with SIGKILL
    "after checkpoint.pth": "common.write_epoch_outputs",
    "after the epoch weights": "common.append_json_log",
    "after the log line": "common.TrainingStopper.after_epoch",
}
KILLER = """
import os, runpy, signal, sys
import common
owner_name, _, attribute = sys.argv[1].rpartition(".")
owner = common if owner_name == "common" else getattr(common, owner_name.split(".")[1])
original = getattr(owner, attribute)
def kill_instead(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
setattr(owner, attribute, kill_instead)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    runs = {}
    for script in ("train_msf.py", "train_cmsf_self.py"):
        output_dir = tmp_path_factory.mktemp("straight") / "run"
        result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *tiny_args(script, output_dir)],
                                capture_output=True, text=True, env=script_env(), cwd=REPO_ROOT, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[script] = output_dir
    return runs


@pytest.mark.parametrize("script, point", [("train_msf.py", point) for point in KILL_AT]
                         + [("train_cmsf_self.py", "after checkpoint.pth")])
def test_kill_in_the_epoch_tail_is_repaired_by_the_rerun(tmp_path, straight_runs, script, point):
    folder = tmp_path / "run"
    command = [sys.executable, "-c", KILLER, KILL_AT[point], os.path.join(REPO_ROOT, script),
               *tiny_args(script, folder)]
    killed = subprocess.run(command, capture_output=True, text=True, env=script_env(), cwd=REPO_ROOT,
                            timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *tiny_args(script, folder)],
                            capture_output=True, text=True, env=script_env(), cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = straight_runs[script]
    names = sorted(os.listdir(folder))
    assert not [n for n in names if n.startswith(".tmp")], names
    assert names == sorted(os.listdir(reference))
    for name in ("checkpoint_0001.pth", "checkpoint_0002.pth", "backbone_torchvision.pth"):
        got, want = torch.load(folder / name, weights_only=True), torch.load(reference / name, weights_only=True)
        weights = (lambda c: c["online"]) if "online" in want else (lambda c: c)
        assert all(torch.equal(weights(got)[k], v) for k, v in weights(want).items()), name
    epochs = [json.loads(line)["epoch"] for line in (folder / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


NAN_ON_RANK_1 = """
import os, runpy, sys
import torch
import common
if os.environ.get("RANK") == "1":  # only this rank's loss turns NaN
    plain = common.mean_shift_loss
    common.mean_shift_loss = lambda *args, **kwargs: plain(*args, **kwargs) * float("nan")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_nan_on_one_rank_stops_both_ranks_with_one_error(tmp_path):
    """Only rank 1's loss is NaN: both ranks stop at the same step (the finiteness check is agreed by
    an all-reduce), rank 0 prints the one error line, nothing is saved, no rank waits for the other."""
    import time
    from conftest import run_script
    wrapper = tmp_path / "nan_on_rank_1.py"
    wrapper.write_text(NAN_ON_RANK_1)
    start = time.time()
    result = run_script(str(wrapper), os.path.join(REPO_ROOT, "train_msf.py"),
                        *tiny_args("train_msf.py", tmp_path / "out"), "--knn-every", 0, nproc=2,
                        timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "not finite" in errors[0] and "iteration 1" in errors[0], result.stderr[-3000:]
    assert "exitcode  : 1" in result.stderr  # torchrun's report: our RunFailed exit code
    assert "Traceback (most recent call last):\n  File" not in result.stdout
    assert not (tmp_path / "out" / "checkpoint.pth").exists()
    assert time.time() - start < 120
