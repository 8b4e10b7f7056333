"""Watching a run: the online k-NN monitor (same numbers as eval_knn.py, and as a float64 brute
force on its subsets), the provenance in args.json, and the TensorBoard logger (a resume without
doubled points)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import REPO_ROOT, run_script


def trained_backbone(run_dir):
    backbone, _ = common.build_backbone("resnet10", 16)
    common.load_backbone_weights(backbone, str(run_dir / "checkpoint.pth"))
    return backbone


def synthetic_monitor(train_images, val_images, batch_size=256):
    train_base, num_classes = common.build_dataset("synthetic", None, "train", image_size=16,
                                                   synthetic_images=64)
    val_base, _ = common.build_dataset("synthetic", None, "val", image_size=16, synthetic_images=64)
    return common.KnnMonitor(train_base, val_base, num_classes, 16, train_images, val_images,
                             batch_size, workers=0, device=torch.device("cpu"), seed=3)


def test_monitor_equals_eval_knn_on_the_whole_split(tmp_path, tiny_msf_run):
    """Subsets as large as the splits: the monitor's numbers are eval_knn.py's, exactly."""
    run_dir = tiny_msf_run[0]
    result = run_script("eval_knn.py", "--dataset", "synthetic", "--synthetic-images", 64,
                        "--arch", "resnet10", "--image-size", 16, "--weights",
                        run_dir / "checkpoint.pth", "--workers", 0, "--output-dir", tmp_path / "knn")
    assert result.returncode == 0, result.stderr[-3000:]
    reference = json.loads((tmp_path / "knn" / "knn_results.json").read_text())["accuracy"]
    monitor = synthetic_monitor(train_images=10_000, val_images=10_000)
    assert (len(monitor.train_indices), len(monitor.val_indices)) == (64, 12)
    accuracy, seconds = monitor(trained_backbone(run_dir))
    assert accuracy == {"knn_top1": reference["1"]["majority_top1"],
                        "knn_top20": reference["20"]["majority_top1"]}
    assert seconds > 0


def brute_force_knn_accuracy(backbone, base, train_indices, val_indices, image_size, ks):
    """float64 reference: features image by image (eval transform, eval mode), cosine similarity,
    the k most similar train images, majority vote, ties to the class of the nearest tied one."""
    transform = common.eval_transform(image_size)
    backbone.eval()

    def features(dataset, indices):
        with torch.no_grad():
            rows = [backbone(transform(dataset[i][0]).unsqueeze(0)).double()[0] for i in indices]
        return F.normalize(torch.stack(rows), dim=1), [dataset[i][1] for i in indices]

    train_features, train_labels = features(base["train"], train_indices)
    val_features, val_labels = features(base["val"], val_indices)
    similarity = val_features @ train_features.T
    accuracy = {}
    for k in ks:
        correct = 0
        for row, label in zip(similarity, val_labels):
            nearest = [train_labels[j] for j in row.argsort(descending=True)[:k].tolist()]
            counts = {c: nearest.count(c) for c in nearest}
            best = max(counts.values())
            predicted = next(c for c in nearest if counts[c] == best)
            correct += predicted == label
        accuracy[f"knn_top{k}"] = 100 * correct / len(val_labels)
    return accuracy


def test_monitor_on_subsets_against_float64_brute_force(tiny_msf_run):
    monitor = synthetic_monitor(train_images=40, val_images=9, batch_size=16)
    # fixed, seeded, sorted subsets: the same at every call and on every rank
    assert monitor.train_indices == synthetic_monitor(40, 9).train_indices
    assert len(monitor.train_indices) == 40
    assert monitor.train_indices == sorted(set(monitor.train_indices))
    assert len(monitor.val_indices) == 9 and monitor.train_indices != list(range(40))
    backbone = trained_backbone(tiny_msf_run[0])
    backbone.train()
    running_mean = backbone.bn1.running_mean.clone()
    accuracy, _ = monitor(backbone)
    assert backbone.training  # back in train mode
    # eval mode inside: BatchNorm statistics untouched
    torch.testing.assert_close(backbone.bn1.running_mean, running_mean, rtol=0, atol=0)
    assert all(p.grad is None for p in backbone.parameters())
    base = {split: common.build_dataset("synthetic", None, split, image_size=16,
                                        synthetic_images=64)[0] for split in ("train", "val")}
    reference = brute_force_knn_accuracy(backbone, base, monitor.train_indices, monitor.val_indices,
                                         16, (1, 20))
    assert accuracy == pytest.approx(reference, rel=1e-6)  # float32 mean; one image is 11 %


def test_monitor_flags_and_bad_input(tmp_path):
    import argparse
    args = common.add_monitor_args(argparse.ArgumentParser()).parse_args([])
    assert (args.knn_every, args.knn_train_images, args.knn_val_images, args.tensorboard) == (
        None, 50_000, 10_000, False)
    with pytest.raises(common.UsageError, match="--knn-train-images"):
        synthetic_monitor(train_images=10, val_images=5)  # fewer than k = 20
    flags = dict(vars(args), dataset="imagefolder", data=str(tmp_path), download=False,
                 image_size=16, synthetic_images=None, batch_size=8, workers=0, seed=0)
    (tmp_path / "train").mkdir()
    # no val/ folder: the default turns the monitor off, an explicit --knn-every is an error
    assert common.knn_monitor_from_args(argparse.Namespace(**flags), None, 3, "cpu", 0, None) is None
    with pytest.raises(common.UsageError, match="--knn-every 0"):
        common.knn_monitor_from_args(argparse.Namespace(**dict(flags, knn_every=2)), None, 3,
                                     torch.device("cpu"), 0, None)
    off = argparse.Namespace(**dict(flags, knn_every=0))
    assert common.knn_monitor_from_args(off, None, 3, "cpu", 0, None) is None


def test_default_monitor_keeps_the_k_values_its_train_images_allow():
    import argparse
    train_base, num_classes = common.build_dataset("synthetic", None, "train", image_size=16,
                                                   synthetic_images=64)
    flags = dict(vars(common.add_monitor_args(argparse.ArgumentParser()).parse_args([])),
                 dataset="synthetic", data=None, download=False, image_size=16,
                 synthetic_images=64, batch_size=8, seed=0)
    for train_images, ks in ((12, (1,)), (19, (1,)), (20, (1, 20)), (64, (1, 20))):
        args = argparse.Namespace(**dict(flags, knn_train_images=train_images))
        monitor = common.knn_monitor_from_args(args, train_base, num_classes, torch.device("cpu"),
                                               0, None)
        assert monitor.ks == ks and len(monitor.train_indices) == train_images
        line = monitor.cost_line(2, len(train_base))
        assert (f"k = 1 (not k = 20: more than its {train_images} train images)" in line) == (
            ks == (1,)), line
    accuracy, _ = common.knn_monitor_from_args(
        argparse.Namespace(**dict(flags, knn_train_images=12)), train_base, num_classes,
        torch.device("cpu"), 0, None)(common.build_backbone("resnet10", 16)[0])
    assert set(accuracy) == {"knn_top1"} and 0 <= accuracy["knn_top1"] <= 100
    # asked for explicitly, a monitor that cannot run is an error
    with pytest.raises(common.UsageError, match="fewer than k = 20; raise --knn-train-images"):
        common.knn_monitor_from_args(argparse.Namespace(**dict(flags, knn_train_images=12,
                                                               knn_every=2)),
                                     train_base, num_classes, torch.device("cpu"), 0, None)


def test_monitor_cost_estimate_at_imagenet_scale():
    """The default (every 2 epochs, 50,000 + 10,000 images) against 1,281,167 training images per
    epoch: 60,000 forward passes per 2 x 4 x 1.28M forward-equivalents (GPU bound) or 60,000 image
    loads per 2 x 1.28M (loading bound)."""
    class Sized(torch.utils.data.Dataset):
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    monitor = common.KnnMonitor(Sized(1_281_167), Sized(50_000), 1000, 224, 50_000, 10_000, 256,
                                0, "cpu")
    line = monitor.cost_line(common.KNN_EVERY_DEFAULT, 1_281_167)
    low = 100 * 60_000 / (60_000 + 4 * 2 * 1_281_167)
    high = 100 * 60_000 / (60_000 + 2 * 1_281_167)
    assert f"about {low:.1f}-{high:.1f} % of the training time" in line and (low, high) > (0.5, 2.2)
    assert high < 3  # "a few percent" at most


# ---------------------------------------------------------------- provenance

def test_args_json_of_a_training_run_holds_the_provenance(tiny_msf_run):
    run_dir, result = tiny_msf_run
    record = json.loads((run_dir / "args.json").read_text())
    assert record["script"] == "train_msf.py" and record["topk"] == 3  # the arguments stay
    assert record["command"][0].endswith("train_msf.py")
    assert record["command"][-2:] == ["--output-dir", str(run_dir)]
    assert record["host"] == socket.gethostname() and record["world_size"] == 1
    versions = record["versions"]
    assert versions["torch"] == torch.__version__ and versions["python"] == sys.version.split()[0]
    assert {"torchvision", "numpy"} <= set(versions)
    if torch.version.cuda:
        assert versions["cuda"] == torch.version.cuda
    head = None
    if shutil.which("git"):
        head = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True,
                              text=True)
    if head is not None and head.returncode == 0:  # the tests run from a checkout
        assert record["git"]["commit"] == head.stdout.strip()
        assert isinstance(record["git"]["dirty"], bool)
    assert "slurm" not in record
    first_line = result.stdout.splitlines()[0]  # the provenance line comes first in the log
    assert first_line.startswith("run: git ") and "1 process(es)" in first_line


def test_provenance_with_slurm_ids_and_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git executable
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setattr(sys, "argv", ["train_x.py", "--epochs", "3"])
    common.save_args({"epochs": 3}, str(tmp_path), "train_x.py")
    record = json.loads((tmp_path / "args.json").read_text())
    assert "git" not in record and record["command"] == ["train_x.py", "--epochs", "3"]
    assert record["slurm"]["job_id"] == "4242" and record["slurm"]["array_task_id"] == "2"
    assert record["slurm"]["array_job_id"] == "4240" and "restart_count" not in record["slurm"]
    assert record["epochs"] == 3 and record["script"] == "train_x.py"
    line = common.provenance_line(record)
    assert line.startswith("run: git: none") and "SLURM job 4242 task 2" in line
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # written atomically


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_state_dirty_flag(tmp_path):
    def git(*argv):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
                        *argv], check=True, capture_output=True)

    assert common._git_state(str(tmp_path)) is None  # not a checkout
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "c")
    state = common._git_state(str(tmp_path))
    assert state["dirty"] is False and len(state["commit"]) == 40
    (tmp_path / "output.log").write_text("untracked outputs do not make the code dirty")
    assert common._git_state(str(tmp_path))["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert common._git_state(str(tmp_path)) == {"commit": state["commit"], "dirty": True}


# ---------------------------------------------------------------- TensorBoard

def scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(log_dir)
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_tensorboard_scalars_per_epoch_and_a_resume_without_doubled_points(tmp_path):
    logger = common.TensorboardLogger(str(tmp_path))
    for epoch in (1, 2, 3):  # epoch 3 was logged, but the run died before its checkpoint
        logger.log({"epoch": epoch, "loss": 1.0 * epoch, "purity_at_k": {"5": 0.1 * epoch},
                    "hist": [1, 2], "note": "text"})
    logger.close()
    time.sleep(1.1)  # event file names hold the time in seconds
    logger = common.TensorboardLogger(str(tmp_path), start_epoch=2)  # resumed after 2 epochs
    for epoch in (3, 4):
        logger.log({"epoch": epoch, "loss": 10.0 * epoch})
    logger.close()
    log_dir = str(tmp_path / "tensorboard")
    assert len(os.listdir(log_dir)) == 2  # the same folder, continued
    assert scalars(log_dir, "loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    purity = scalars(log_dir, "purity_at_k/5")  # the dict entry; epoch 3 purged
    assert [step for step, _ in purity] == [1, 2]
    assert [value for _, value in purity] == pytest.approx([0.1, 0.2])


def test_tensorboard_missing_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(common.UsageError, match="pip install tensorboard"):
        common.TensorboardLogger(str(tmp_path))
    assert not os.listdir(tmp_path)
