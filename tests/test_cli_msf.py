"""train_msf.py from the command line: the outputs of a run on synthetic data, and bad input:
a one-line `error: ...`, exit code 2, and an existing checkpoint left byte-identical."""
import json
import math
import shutil

import pytest
import torch
import torchvision

import common
from conftest import assert_usage_error, run_script, tiny_msf_args, write_imagefolder


def test_cli_run_on_synthetic_data(tiny_msf_run):
    output_dir, result = tiny_msf_run
    assert "done: 2 epochs" in result.stdout
    progress = [line for line in result.stdout.splitlines() if line.startswith("Epoch [")]
    assert len(progress) == 8 and all(w in progress[-1] for w in ("loss", "purity", "lr", "img/s", "eta"))

    log = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [1, 2]
    for record in log:
        assert math.isfinite(record["loss"]) and 0 < record["loss"] < 4
        assert 1 / 3 - 1e-6 <= record["purity"] <= 1  # k = 3 and t is its own neighbour
    assert log[1]["lr"] < log[0]["lr"]  # cosine, per epoch

    args = json.loads((output_dir / "args.json").read_text())
    assert args["script"] == "train_msf.py" and args["topk"] == 3 and args["mem_bank_size"] == 40
    assert args["world_size"] == 1 and args["versions"]["torch"] == torch.__version__

    checkpoint = common.load_checkpoint(str(output_dir / "checkpoint.pth"), "train_msf.py", "resnet10")
    assert (checkpoint["epoch"], checkpoint["iteration"]) == (2, 0)
    assert checkpoint["memory_bank"]["embeddings"].shape == (40, 128)
    assert torch.all(checkpoint["memory_bank"]["indices"] >= 0)

    # the exported backbone is a plain torchvision ResNet (small stem) with the trained weights
    exported = torch.load(output_dir / "backbone_torchvision.pth", weights_only=True)
    resnet = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    resnet.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    resnet.maxpool = torch.nn.Identity()
    resnet.load_state_dict(exported, strict=True)
    resnet.fc = torch.nn.Identity()
    encoder = common.build_encoder("resnet10", 16)
    encoder.load_state_dict({k[2:]: v for k, v in checkpoint["online"].items() if k.startswith("0.")})
    resnet.eval(), encoder.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(resnet(x), encoder.backbone(x), rtol=0, atol=0)


def test_rerun_of_a_finished_run_changes_nothing(tmp_path, tiny_msf_run):
    output_dir = tmp_path / "out"
    shutil.copytree(tiny_msf_run[0], output_dir)
    before = (output_dir / "checkpoint.pth").read_bytes()
    result = run_script("train_msf.py", *tiny_msf_args(output_dir))
    assert result.returncode == 0 and "Epoch [" not in result.stdout, result.stderr[-3000:]
    assert (output_dir / "checkpoint.pth").read_bytes() == before


# ---------------------------------------------------------------- bad input

def imagefolder_with(root, problem):
    """A tiny ImageFolder (3 classes x 8 images) with one problem."""
    if problem == "no train":
        return write_imagefolder(root, splits=("val",))
    write_imagefolder(root)
    if problem == "empty class":
        (root / "train" / "class_empty").mkdir()
    if problem == "unreadable image":
        (root / "train" / "class_1" / "broken.jpg").write_bytes(b"not a JPEG at all")
    return str(root)


def fake_checkpoint(path, script, arch="resnet10"):
    torch.save({"script": script, "args": {"arch": arch}, "rng": []}, path)
    return str(path)


BAD_INPUTS = {
    # name: (function of tmp_path -> extra argv, fragments the error line must contain)
    "missing --data path": (lambda t: ["--dataset", "imagefolder", "--data", t / "nowhere"], ["nowhere", "does not exist"]),
    "--data not given": (lambda t: ["--dataset", "imagefolder"], ["--data is required"]),
    "root without train/": (lambda t: ["--dataset", "imagefolder", "--data", imagefolder_with(t / "d", "no train")],
                            ["train/"]),
    "class folder without images": (lambda t: ["--dataset", "imagefolder", "--data", imagefolder_with(t / "d", "empty class")],
                                    ["class_empty"]),
    "--resume of another script": (lambda t: ["--resume", fake_checkpoint(t / "sup.pth", "train_cmsf_sup.py")],
                                   ["train_cmsf_sup.py"]),
    "--resume of another architecture": (lambda t: ["--resume", fake_checkpoint(t / "r50.pth", "train_msf.py", "resnet50")],
                                         ["resnet50", "--arch"]),
    "auto-resume with another --arch": (lambda t: ["--arch", "resnet18"], ["--arch resnet10", "--arch resnet18"]),
    "auto-resume with another --image-size": (lambda t: ["--image-size", 72, "--epochs", 3], ["--image-size 16", "--image-size 72"]),
    "auto-resume with another --mem-bank-size": (lambda t: ["--mem-bank-size", 48, "--epochs", 3], ["--mem-bank-size"]),
    "--resume of a missing file": (lambda t: ["--resume", t / "missing.pth"], ["missing.pth", "does not exist"]),
    "--topk larger than the bank": (lambda t: ["--topk", 41], ["--topk 41", "40"]),
    "batch of zero": (lambda t: ["--batch-size", 0], ["--batch-size 0"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_error_and_overwrites_nothing(tmp_path, tiny_msf_run, case):
    make_argv, fragments = BAD_INPUTS[case]
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    shutil.copy(tiny_msf_run[0] / "checkpoint.pth", output_dir / "checkpoint.pth")  # a good, finished run
    before = (output_dir / "checkpoint.pth").read_bytes()
    argv = tiny_msf_args(output_dir) + [str(a) for a in make_argv(tmp_path)]  # later flags win
    result = run_script("train_msf.py", *argv)
    assert_usage_error(result, *fragments)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (output_dir / "checkpoint.pth").read_bytes() == before
    assert sorted(p.name for p in output_dir.iterdir() if p.name.endswith(".pth")) == ["checkpoint.pth"]


def test_batch_smaller_than_number_of_processes(tmp_path):
    """--batch-size 1 with 2 processes: every rank prints the one-line error and exits with 2
    (torchrun then reports the failed workers and exits 1 itself)."""
    result = run_script("train_msf.py", *tiny_msf_args(tmp_path), "--batch-size", 1, nproc=2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("--batch-size 1" in line and "2" in line for line in errors)
    assert "exitcode  : 2" in result.stderr  # torchrun's report of the workers' exit code
    assert not (tmp_path / "checkpoint.pth").exists()


def test_unreadable_image_error_names_the_file(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(common.UsageError, match="broken.jpg"):
        common.load_rgb_image(str(broken))
