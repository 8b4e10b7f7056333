"""eval_linear.py: standardisation + linear head against float64, the lr steps, top-k
accuracy, the backbone-unchanged check, --train-list, and the script end to end (augmented, cached
features, resume, two processes)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import eval_linear
from conftest import run_script, assert_usage_error


def test_standardisation_and_head_match_float64_reference():
    gen = torch.Generator().manual_seed(0)
    # > 65536 rows: the float64 accumulation runs over several chunks
    train = torch.randn(70_000, 6, generator=gen) * torch.tensor([1, 2, 3, 4, 5, 6.]) + 3
    head = eval_linear.LinearHead(6, 4)
    head.set_standardisation(train)
    x = train.double().numpy()
    normalized = x / np.linalg.norm(x, axis=1, keepdims=True)
    mean, var = normalized.mean(0), normalized.var(0, ddof=1)
    np.testing.assert_allclose(head.mean.numpy(), mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(head.inv_std.numpy(), 1 / np.sqrt(var + 1e-5), rtol=1e-5)

    queries = torch.randn(9, 6, generator=gen) * 4
    q = queries.double().numpy()
    weight, bias = head.linear.weight.detach().double().numpy(), head.linear.bias.detach().double().numpy()
    expected = ((q / np.linalg.norm(q, axis=1, keepdims=True) - mean) / np.sqrt(var + 1e-5)) @ weight.T + bias
    np.testing.assert_allclose(head(queries).detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    assert [n for n, _ in head.named_parameters()] == ["linear.weight", "linear.bias"]  # statistics stay fixed


def test_lr_steps_at_15_and_30():
    lrs = [eval_linear.lr_at_epoch(0.01, epoch, [15, 30]) for epoch in range(40)]
    assert lrs[:15] == [0.01] * 15
    assert lrs[15:30] == pytest.approx([0.001] * 15) and lrs[30:] == pytest.approx([0.0001] * 10)


def test_topk_accuracy_against_reference():
    gen = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(50, 8, generator=gen), torch.randint(0, 8, (50,), generator=gen)
    ranks = [(logits[i] > logits[i, labels[i]]).sum().item() for i in range(50)]  # 0 = best
    top1, top5 = eval_linear.topk_accuracy(logits, labels)
    assert top1 == pytest.approx(100 * np.mean([r < 1 for r in ranks]))
    assert top5 == pytest.approx(100 * np.mean([r < 5 for r in ranks]))


def test_backbone_unchanged_check_catches_changes():
    backbone, _ = common.build_backbone("resnet10", 16)
    reference = {k: v.clone() for k, v in backbone.state_dict().items()}
    eval_linear.check_backbone_unchanged(backbone, reference)  # unchanged: passes
    with torch.no_grad():
        backbone.layer3[0].conv1.weight[0, 0, 0, 0] += 1e-6
    with pytest.raises(RuntimeError, match="layer3.0.conv1.weight"):
        eval_linear.check_backbone_unchanged(backbone, reference)
    backbone.load_state_dict(reference)
    backbone.train()
    backbone(torch.randn(2, 3, 16, 16))  # a forward in train mode moves BatchNorm running statistics
    with pytest.raises(RuntimeError, match="bn1.running_mean"):
        eval_linear.check_backbone_unchanged(backbone, reference)


# ---------------------------------------------------------------- --train-list

def write_named_imagefolder(root, classes=3, per_class=6):
    """ImageNet-like names (<wnid>_<n>.JPEG, unique across classes) with synthetic shapes."""
    shapes = common.SyntheticShapes("train", classes * per_class, image_size=16, num_classes=classes)
    for split in ("train", "val"):
        for i in range(len(shapes)):
            image, label = shapes[i]
            folder = os.path.join(root, split, f"n{label:08d}")
            os.makedirs(folder, exist_ok=True)
            image.save(os.path.join(folder, f"n{label:08d}_{i}.JPEG"), format="JPEG")
    return str(root)


def test_read_subset_list_matches_file_names(tmp_path):
    root = write_named_imagefolder(tmp_path / "data")
    dataset, _ = common.build_dataset("imagefolder", root, "train")
    list_file = tmp_path / "1percent.txt"
    list_file.write_text("n00000000_0.JPEG\nn00000001_4.JPEG\n\nn00000002_17.JPEG\nn99999999_1.JPEG\n")
    indices, unmatched = common.read_subset_list(str(list_file), dataset)
    names = [os.path.basename(dataset.samples[i][0]) for i in indices]
    assert sorted(names) == ["n00000000_0.JPEG", "n00000001_4.JPEG", "n00000002_17.JPEG"]
    assert unmatched == ["n99999999_1.JPEG"]
    list_file.write_text("nothing_here.JPEG\n")
    with pytest.raises(common.UsageError, match="none of the 1 names"):
        common.read_subset_list(str(list_file), dataset)
    list_file.write_text("\n  \n")
    with pytest.raises(common.UsageError, match="is empty"):
        common.read_subset_list(str(list_file), dataset)
    with pytest.raises(common.UsageError, match="does not exist"):
        common.read_subset_list(str(tmp_path / "absent.txt"), dataset)


def test_train_list_script_reports_unmatched(tmp_path):
    root = write_named_imagefolder(tmp_path / "data")
    list_file = tmp_path / "subset.txt"
    list_file.write_text("\n".join([f"n{i % 3:08d}_{i}.JPEG" for i in range(0, 18, 2)] + ["missing_1.JPEG"]))
    result = run_script("eval_linear.py", "--dataset", "imagefolder", "--data", root, "--arch", "resnet10",
                        "--image-size", "16", "--batch-size", "4", "--workers", "0", "--epochs", "1",
                        "--train-list", list_file, "--cached-features", "--output-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "10 names, 9 images matched, 1 not found in the train folder (e.g. missing_1.JPEG)" in result.stdout
    results = json.loads((tmp_path / "out" / "linear_results.json").read_text())
    assert results["train_images"] == 9 and results["unmatched_names"] == 1
    bad = run_script("eval_linear.py", "--dataset", "synthetic", "--synthetic-images", "16", "--arch", "resnet10",
                     "--image-size", "16", "--workers", "0", "--train-list", list_file, "--output-dir", tmp_path / "o2")
    assert_usage_error(bad, "--train-list", "imagefolder")


# ---------------------------------------------------------------- the script

def linear_argv(output_dir, *extra, epochs=2):
    return ["--dataset", "synthetic", "--synthetic-images", "64", "--arch", "resnet10", "--image-size", "16",
            "--batch-size", "16", "--workers", "0", "--print-freq", "2", "--epochs", str(epochs),
            "--output-dir", str(output_dir), *map(str, extra)]


def reference_val_accuracy(output_dir, weights=None):
    """Top-1 of the saved head on val features computed here, independently of the script."""
    torch.manual_seed(0)
    backbone, feat_dim = common.build_backbone("resnet10", 16)
    if weights:
        common.load_backbone_weights(backbone, str(weights))
    backbone.eval()
    val, num_classes = common.build_dataset("synthetic", None, "val", image_size=16, synthetic_images=64)
    transform = common.eval_transform(16)
    images = torch.stack([transform(val[i][0]) for i in range(len(val))])
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    head = eval_linear.LinearHead(feat_dim, num_classes)
    head.load_state_dict(torch.load(os.path.join(output_dir, "checkpoint.pth"))["head"])
    with torch.no_grad():
        predictions = head(backbone(images)).argmax(dim=1)
    return 100 * (predictions == labels).double().mean().item()


def test_eval_linear_augmented_end_to_end(tmp_path):
    torch.manual_seed(0)
    encoder = common.build_encoder("resnet10", 16)
    torch.save(common.torchvision_state_dict(encoder.backbone, "resnet10"), tmp_path / "backbone.pth")
    result = run_script("eval_linear.py", *linear_argv(tmp_path / "out", "--weights", tmp_path / "backbone.pth"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backbone unchanged (checked)" in result.stdout and "augmented images" in result.stdout
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(0 <= r["val_top1"] <= 100 for r in log)
    assert log[0]["train_loss"] > 0 and log[0]["lr"] == 0.01
    results = json.loads((tmp_path / "out" / "linear_results.json").read_text())
    assert results["final_top1"] == pytest.approx(log[-1]["val_top1"])
    assert results["best"]["top1"] == pytest.approx(max(r["val_top1"] for r in log))
    assert results["final_top1"] == pytest.approx(reference_val_accuracy(tmp_path / "out", tmp_path / "backbone.pth"))


def test_eval_linear_cached_features_resume_is_exact(tmp_path):
    straight = run_script("eval_linear.py", *linear_argv(tmp_path / "straight", "--cached-features", "--lr", "0.5"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_script("eval_linear.py", *linear_argv(tmp_path / "resumed", "--cached-features", "--lr", "0.5",
                                                       epochs=1))
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_script("eval_linear.py", *linear_argv(tmp_path / "resumed", "--cached-features", "--lr", "0.5"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed the head" in second.stdout and "at epoch 2" in second.stdout
    a = torch.load(tmp_path / "straight" / "checkpoint.pth")["head"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pth")["head"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    results = json.loads((tmp_path / "straight" / "linear_results.json").read_text())
    assert results["weights"] == "random init" and results["mode"] == "cached center-crop features"
    assert results["final_top1"] == pytest.approx(reference_val_accuracy(tmp_path / "straight"))
    other = run_script("eval_linear.py", *linear_argv(tmp_path / "resumed", "--lr", "0.5"))
    assert_usage_error(other, "--cached-features")


def test_eval_linear_two_processes_match_one(tmp_path):
    """DDP of the head: 2 processes x 8 images = 1 process x 16 (same global batch, same crops)."""
    one = run_script("eval_linear.py", *linear_argv(tmp_path / "one", epochs=1))
    two = run_script("eval_linear.py", *linear_argv(tmp_path / "two", epochs=1), nproc=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-3000:])
    a = torch.load(tmp_path / "one" / "checkpoint.pth")["head"]
    b = torch.load(tmp_path / "two" / "checkpoint.pth")["head"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- --protocol semi

def test_semi_protocol_adapts_batchnorm_only_and_trains_the_head(tmp_path):
    root = write_named_imagefolder(tmp_path / "data", classes=3, per_class=8)
    (tmp_path / "10percent.txt").write_text("\n".join(f"n{i % 3:08d}_{i}.JPEG" for i in range(0, 24, 2)) + "\n")
    torch.manual_seed(0)
    backbone = common.build_backbone("resnet10", 16)[0]
    torch.save({"script": "train_msf.py", "args": {"arch": "resnet10", "image_size": 16},
                "online": {"0.backbone." + k: v for k, v in backbone.state_dict().items()}}, tmp_path / "ckpt.pth")
    result = run_script("eval_linear.py", "--protocol", "semi", "--dataset", "imagefolder", "--data", root,
                        "--weights", tmp_path / "ckpt.pth", "--train-list", tmp_path / "10percent.txt",
                        "--batch-size", "4", "--workers", "0", "--epochs", "2", "--output-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backbone weights unchanged (checked), BatchNorm statistics adapted" in result.stdout
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pth")
    assert checkpoint["args"]["lr"] == 0.001 and checkpoint["args"]["lr_drops"] == [15]
    adapted = checkpoint["backbone"]
    parameters = {name for name, _ in backbone.named_parameters()}
    for key, value in backbone.state_dict().items():
        if key in parameters:
            assert torch.equal(adapted[key], value), key  # weights byte-identical
    changed = [k for k in adapted if "running_" in k and not torch.equal(adapted[k], backbone.state_dict()[k])]
    assert len(changed) == len([k for k in adapted if "running_" in k])  # every BatchNorm adapted
    head = eval_linear.SemiHead(512, 3)
    head.load_state_dict(checkpoint["head"])
    assert [type(m).__name__ for m in head.linear] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    torch.manual_seed(0)
    fresh = eval_linear.SemiHead(512, 3)
    assert not torch.equal(head.linear[0].weight, fresh.linear[0].weight)  # the head trained
    assert head.linear[1].running_mean.abs().sum() > 0

    # the reported top-1: the saved head on features of the adapted backbone in eval mode, computed here
    model = common.build_backbone("resnet10", 16)[0]
    summary = common.load_backbone_weights(model, str(tmp_path / "out" / "checkpoint.pth"))
    assert "prefix 'backbone.'" in summary
    model.eval()
    head.eval()
    val, _ = common.build_dataset("imagefolder", root, "val")
    transform = common.eval_transform(16)
    images = torch.stack([transform(val[i][0]) for i in range(len(val))])
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        expected = 100 * (head(model(images)).argmax(1) == labels).double().mean().item()
    results = json.loads((tmp_path / "out" / "linear_results.json").read_text())
    assert results["protocol"] == "semi" and results["train_images"] == 12
    assert results["final_top1"] == pytest.approx(expected, abs=1e-4)

    (tmp_path / "empty.txt").write_text("")
    for list_file, message in ((tmp_path / "empty.txt", "is empty"), (tmp_path / "absent.txt", "does not exist")):
        bad = run_script("eval_linear.py", "--protocol", "semi", "--dataset", "imagefolder", "--data", root,
                         "--weights", tmp_path / "ckpt.pth", "--train-list", list_file, "--workers", "0",
                         "--output-dir", tmp_path / "bad")
        assert_usage_error(bad, "--train-list", message)
        assert not (tmp_path / "bad").exists()
