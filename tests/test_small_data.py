"""A user's smallest smoke run: an 8-image ImageFolder (train/ and val/; grayscale JPEGs, RGBA PNGs,
5 x 7 px images) trained with the default flags, in every training script. The defaults that cannot
serve such data adapt and say so in one line each (the batch size, the monitor's k); the same values
asked for explicitly stay errors."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import assert_usage_error, run_script

SCRIPTS = ("train_msf.py", "train_cmsf_self.py", "train_cmsf_sup.py", "train_cmsf_semi.py")
# only what keeps a CPU test short: the model, the image size, the epochs, no loader processes
SMALL = ("--arch", "resnet10", "--image-size", "16", "--epochs", "2", "--workers", "0")


def write_mixed_imagefolder(root):
    """root/{train,val}/class_{0,1}/: per class a 5 x 7 px RGB JPEG, a grayscale JPEG, an RGBA
    PNG and a 20 x 24 px JPEG: 8 images per split."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            pixels = lambda h, w, ch: rng.integers(0, 256, (h, w, ch), dtype=np.uint8)  # noqa
            Image.fromarray(pixels(7, 5, 3)).save(folder / "tiny_rgb.jpg")
            Image.fromarray(pixels(7, 5, 1)[..., 0]).save(folder / "grey.jpg")
            Image.fromarray(pixels(6, 9, 4), mode="RGBA").save(folder / "alpha.png")
            Image.fromarray(pixels(24, 20, 3)).save(folder / "larger.jpg")
    (root / "labeled.txt").write_text("class_0/grey.jpg\nclass_1/alpha.png\n")
    return root


@pytest.fixture(scope="module")
def mixed_imagefolder(tmp_path_factory):
    return write_mixed_imagefolder(tmp_path_factory.mktemp("mixed") / "data")


def script_flags(script, data):
    return ["--data", data, *(["--labeled-list", data / "labeled.txt"]
                              if script == "train_cmsf_semi.py" else [])]


@pytest.mark.parametrize("script", SCRIPTS)
def test_default_flags_train_on_eight_mixed_images(script, mixed_imagefolder, tmp_path):
    out = tmp_path / "out"
    result = run_script(script, *script_flags(script, mixed_imagefolder), *SMALL,
                        "--output-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert ("note: the default --batch-size 256 is larger than the 8 training images; using "
            "--batch-size 8 (the learning rate scales with it)") in lines
    monitor = [line for line in lines if line.startswith("k-NN monitor every 2 epoch(s)")]
    assert len(monitor) == 1 and "k = 1 (not k = 20: more than its 8 train images)" in monitor[0]
    assert "warning" not in result.stdout + result.stderr
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert "knn_top1" in records[1] and "knn_top20" not in records[1]
    assert 0 <= records[1]["knn_top1"] <= 100 and np.isfinite(records[1]["loss"])
    saved = json.loads((out / "args.json").read_text())
    assert saved["batch_size"] == 8 and "_given" not in saved
    # the same command resumes the finished run (the adapted batch size is the saved one)
    again = run_script(script, *script_flags(script, mixed_imagefolder), *SMALL,
                       "--output-dir", out)
    assert again.returncode == 0 and "is complete (2 epochs); nothing to do" in again.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_explicit_values_that_do_not_fit_stay_errors(script, mixed_imagefolder, tmp_path):
    flags = [*script_flags(script, mixed_imagefolder), *SMALL]
    assert_usage_error(run_script(script, *flags, "--batch-size", "16", "--output-dir",
                                  tmp_path / "a"),
                       "the dataset has 8 images, fewer than --batch-size 16")
    assert_usage_error(run_script(script, *flags, "--knn-every", "2", "--output-dir",
                                  tmp_path / "b"),
                       "8 train images are fewer than k = 20")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
