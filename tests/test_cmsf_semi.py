"""train_cmsf_semi.py: labeled subsets (SimCLR lists, per-class fractions), the pseudo-labeler
(learns separable clusters, never sees empty cache slots), threshold and unconstrained fallback against
float64 brute force, and the script on 1 and 2 processes with exact resume."""
import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import common
import train_cmsf_semi as semi
from conftest import run_script

DIM = 16


def write_named_imagefolder(root, names_per_class):
    """root/train/<class>/<name>: SimCLR-style unique file names (n0000000c_i.JPEG)."""
    rng = np.random.default_rng(0)
    for c, names in enumerate(names_per_class):
        folder = os.path.join(root, "train", f"n{c:08d}")
        os.makedirs(folder, exist_ok=True)
        for name in names:
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(os.path.join(folder, name))
    return str(root)


def test_labeled_list_matches_basenames_and_reports_missing(tmp_path, capsys):
    names = [[f"n{c:08d}_{i}.JPEG" for i in range(4)] for c in range(3)]
    root = write_named_imagefolder(tmp_path / "data", names)
    dataset, num_classes = common.build_dataset("imagefolder", root, "train")
    listed = ["n00000000_1.JPEG", "n00000002_3.JPEG", "n00000001_0.JPEG", "n09999999_7.JPEG", "ghost.JPEG"]
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n\n")
    mask, not_found = semi.read_labeled_list(str(tmp_path / "list.txt"), dataset)
    chosen = sorted(os.path.basename(dataset.samples[i][0]) for i in mask.nonzero().squeeze(1).tolist())
    assert chosen == sorted(listed[:3]) and not_found == listed[3:]

    # through the script's entry point the missing names are reported (count and first names)
    class Args:
        labeled_list, labeled_fraction, seed = str(tmp_path / "list.txt"), None, 0
    assert torch.equal(semi.labeled_subset(Args, dataset, num_classes, common.dataset_targets(dataset)), mask)
    assert "warning: 2 names in" in capsys.readouterr().out
    (tmp_path / "none.txt").write_text("ghost.JPEG\nother.JPEG\n")
    with pytest.raises(common.UsageError, match=r"none of the 2 names .* ghost.JPEG"):
        semi.read_labeled_list(str(tmp_path / "none.txt"), dataset)
    with pytest.raises(common.UsageError, match="does not exist"):
        semi.read_labeled_list(str(tmp_path / "absent.txt"), dataset)
    synthetic, _ = common.build_dataset("synthetic", None, "train", synthetic_images=10, image_size=16)
    with pytest.raises(common.UsageError, match="labeled-fraction"):
        semi.read_labeled_list(str(tmp_path / "list.txt"), synthetic)


def test_labeled_list_warning_text(tmp_path, capsys):
    root = write_named_imagefolder(tmp_path / "data", [["a_1.JPEG", "a_2.JPEG"], ["b_1.JPEG"]])
    dataset, num_classes = common.build_dataset("imagefolder", root, "train")
    (tmp_path / "list.txt").write_text("a_2.JPEG\nx_1.JPEG\ny_1.JPEG\n")

    class Args:
        labeled_list, labeled_fraction, seed = str(tmp_path / "list.txt"), None, 0
    mask = semi.labeled_subset(Args, dataset, num_classes, common.dataset_targets(dataset))
    assert mask.tolist() == [False, True, False]
    out = capsys.readouterr().out
    assert "warning: 2 names in" in out and "(first: x_1.JPEG, y_1.JPEG)" in out
    Args.labeled_fraction = 0.5
    with pytest.raises(common.UsageError, match="exactly one of"):
        semi.labeled_subset(Args, dataset, num_classes, common.dataset_targets(dataset))


def test_labeled_fraction_is_per_class_seeded_and_at_least_one():
    sizes = [1, 5, 20, 101, 7]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])[torch.randperm(134)]
    mask = semi.select_labeled_fraction(labels, 6, 0.1, seed=3)  # class 5 has no image at all
    per_class = torch.bincount(labels[mask], minlength=6).tolist()
    assert per_class == [max(1, round(0.1 * n)) for n in sizes] + [0]
    assert torch.equal(mask, semi.select_labeled_fraction(labels, 6, 0.1, seed=3))
    assert not torch.equal(mask, semi.select_labeled_fraction(labels, 6, 0.1, seed=4))
    assert semi.select_labeled_fraction(labels, 6, 1.0, seed=0).all()
    with pytest.raises(common.UsageError, match="labeled-fraction"):
        semi.select_labeled_fraction(labels, 6, 0.0, seed=0)


def sphere_clusters(n, num_classes, seed, spread=0.35):
    """Gaussian clusters on the unit sphere: normalise(centre_c + spread x noise); fixed centres."""
    centres = F.normalize(torch.randn(num_classes, DIM, generator=torch.Generator().manual_seed(99)), dim=1)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return F.normalize(centres[labels] + spread * torch.randn(n, DIM, generator=gen), dim=1), labels


def test_pseudo_labeler_learns_clusters_and_never_sees_empty_slots():
    num_classes = 5
    train_x, train_y = sphere_clusters(300, num_classes, seed=1)
    test_x, test_y = sphere_clusters(500, num_classes, seed=2)
    cache = common.MemoryBank(400, DIM, seed=0)  # 100 slots stay empty (random vectors, label -1)
    cache.enqueue(train_x[:150], train_y[:150], torch.arange(150))
    cache.enqueue(train_x[150:], train_y[150:], torch.arange(150, 300))
    labeler = semi.build_pseudo_labeler(DIM, num_classes, seed=0)
    seen = []
    hook = labeler[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    assert semi.train_pseudo_labeler(labeler, cache, epochs=10, lr=0.01, batch_size=32, seed=0) is not None
    hook.remove()
    seen = torch.cat(seen)
    assert seen.shape[0] == 10 * 300 + 300  # 10 epochs (no size-1 tail here) + the BatchNorm pass
    distance_to_filled = torch.cdist(seen.double(), train_x.double()).min(dim=1).values
    assert distance_to_filled.max() < 1e-6  # only filled slots were ever fed to the labeler

    _, predicted = semi.assign_labels(labeler, test_x, test_y, torch.zeros(500, dtype=torch.bool), 0.0, True)
    accuracy = (predicted == test_y).float().mean().item()
    assert accuracy > 0.8, accuracy  # chance is 0.2

    # the BatchNorm running statistics are exactly those of the filled cache (eval mode is consistent)
    hidden = labeler[0](train_x).double()
    assert torch.allclose(labeler[1].running_mean.double(), hidden.mean(0), atol=1e-5)
    assert torch.allclose(labeler[1].running_var.double(), hidden.var(0), rtol=1e-4, atol=1e-7)


def test_pseudo_labeler_skips_an_empty_cache():
    labeler = semi.build_pseudo_labeler(DIM, 3, seed=0)
    before = {k: v.clone() for k, v in labeler.state_dict().items()}
    cache = common.MemoryBank(20, DIM, seed=0)  # nothing filled
    assert semi.train_pseudo_labeler(labeler, cache, epochs=2, lr=0.01, batch_size=8, seed=0) is None
    assert all(torch.equal(before[k], v) for k, v in labeler.state_dict().items())


def test_threshold_assigns_true_pseudo_or_unknown():
    num_classes = 4
    labeler = semi.build_pseudo_labeler(DIM, num_classes, seed=0)
    with torch.no_grad():  # large weights: a spread of confidences on both sides of the threshold
        for p in labeler.parameters():
            p.mul_(6)
    labeler.eval()
    x, true = sphere_clusters(200, num_classes, seed=5)
    is_labeled = torch.arange(200) % 3 == 0
    assigned, predicted = semi.assign_labels(labeler, x, true, is_labeled, 0.85, True)
    probabilities = torch.softmax(labeler(x).double(), dim=1)
    confidence, argmax = probabilities.max(dim=1)
    expected = torch.where(is_labeled, true, torch.where(confidence >= 0.85, argmax, -1))
    assert torch.equal(assigned, expected) and torch.equal(predicted, argmax)
    unlabeled_confident = (~is_labeled & (confidence >= 0.85)).sum()
    assert 0 < unlabeled_confident < (~is_labeled).sum()  # both branches exercised
    # before the first labeler round, every unlabeled image is unknown
    assigned, predicted = semi.assign_labels(labeler, x, true, is_labeled, 0.85, False)
    assert torch.equal(assigned, torch.where(is_labeled, true, -1)) and torch.all(predicted == -1)


def test_unknown_label_falls_back_to_unconstrained_msf():
    gen = torch.Generator().manual_seed(7)
    bank = common.MemoryBank(30, DIM, seed=0)  # 5 empty slots (label -1) stay searchable when unconstrained
    bank.enqueue(F.normalize(torch.randn(25, DIM, generator=gen), dim=1), torch.randint(-1, 3, (25,), generator=gen),
                 torch.arange(25))
    query = F.normalize(torch.randn(6, DIM, generator=gen), dim=1)
    target = F.normalize(torch.randn(6, DIM, generator=gen), dim=1)
    assigned = torch.tensor([-1, 0, 1, -1, 2, 0])
    loss, slots, valid = semi.semi_cmsf_loss(query, target, assigned, bank, k=4)
    q, t, z = query.double(), target.double(), bank.embeddings.double()
    for i in range(6):
        allowed = range(30) if assigned[i] < 0 else (bank.labels == assigned[i]).nonzero().squeeze(1).tolist()
        expected = sorted(allowed, key=lambda j: -float(t[i] @ z[j]))[:4]
        assert sorted(slots[i][valid[i]].tolist()) == sorted(expected), i
        reference = sum(2 - 2 * float(q[i] @ z[j]) for j in expected) / len(expected)
        assert loss[i].item() == pytest.approx(reference, abs=1e-5)
        if assigned[i] >= 0:
            assert torch.all(bank.labels[slots[i][valid[i]]] == assigned[i])


# ---------------------------------------------------------------- the script

def tiny_args(output_dir, *extra, epochs=2):
    return ["--dataset", "synthetic", "--synthetic-images", "64", "--arch", "resnet10", "--image-size", "16",
            "--batch-size", "16", "--mem-bank-size", "48", "--workers", "0", "--print-freq", "1",
            "--labeled-fraction", "0.25", "--threshold", "0.3", "--pseudo-batch-size", "16",
            "--epochs", str(epochs), "--output-dir", str(output_dir), *map(str, extra)]

def run_in_process(module, argv):
    """Run module.main(argv) inside the test process (no interpreter start-up, which dominates a tiny
    run here), restoring the signal handlers its PreemptionHandler installs."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        module.main(module.get_args_parser().parse_args([str(a) for a in argv]))
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)



@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """2 epochs (8 steps, labeler rounds after steps 2, 4, 6, 8), uninterrupted."""
    out = tmp_path_factory.mktemp("semi_straight")
    result = run_script("train_cmsf_semi.py", *tiny_args(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_script_runs_and_logs_pseudo_label_quality(straight_run):
    out, result = straight_run
    assert "64 images (20 labeled, 31.25%)" in result.stdout and "labeled cache 80" in result.stdout
    assert "epoch 2: pseudo-labels on unlabeled images: coverage" in result.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [record["labeler_rounds"] for record in log] == [2, 4]
    for record in log:
        assert 0 <= record["pseudo_coverage"] <= 1 and 0 <= record["pseudo_argmax_accuracy"] <= 1
        assert 0 < record["purity"] <= 1 and 0 < record["constrained"] <= 1
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    is_labeled = checkpoint["is_labeled"]
    assert is_labeled.sum() == 20
    cache, bank = checkpoint["cache"], checkpoint["memory_bank"]
    filled = cache["indices"] >= 0
    assert filled.sum() == 40 and torch.all(is_labeled[cache["indices"][filled]])  # 2 epochs x 20 labeled
    assert torch.equal(cache["labels"][filled], cache["indices"][filled] % 10)  # true labels
    # bank: labeled entries carry their true label; unlabeled ones a pseudo-label or -1
    labeled_slots = is_labeled[bank["indices"]]
    assert torch.equal(bank["labels"][labeled_slots], bank["indices"][labeled_slots] % 10)
    assert bank["labels"].min() >= -1


def test_resume_is_bit_identical(straight_run, tmp_path, capsys):
    """Stop after 6 steps (epoch 2, just after its mid-epoch labeler round), resume, compare everything
    with the straight subprocess run (both halves run in-process)."""
    straight, _ = straight_run
    resumed = tmp_path / "resumed"
    run_in_process(semi, tiny_args(resumed, "--stop-after-iters", "6"))
    assert "stopped after 6 iterations" in capsys.readouterr().out
    assert torch.load(resumed / "checkpoint.pth", weights_only=True)["labeler"]["rounds"] == 3
    run_in_process(semi, tiny_args(resumed))
    assert "resumed from" in capsys.readouterr().out
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(resumed / "checkpoint.pth", weights_only=True)
    for part in ("online", "target", "memory_bank", "cache", "pseudo_labeler"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), (part, name)
    assert a["labeler"] == b["labeler"] and a["labeler"]["rounds"] == 4
    with pytest.raises(common.UsageError, match="--labeled-fraction 0.25"):
        run_in_process(semi, tiny_args(resumed, "--labeled-fraction", "0.5", epochs=3))


def test_two_processes(straight_run, tmp_path):
    """2 processes (gloo): the labeled cache is filled from the gathered global batch, so it matches the
    1-process run's labels and indices slot for slot; the labeler runs on both ranks."""
    straight, _ = straight_run
    out = tmp_path / "two"
    result = run_script("train_cmsf_semi.py", *tiny_args(out), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and result.stdout.count("epoch 2: pseudo-labels") == 1
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(out / "checkpoint.pth", weights_only=True)
    for name in ("labels", "indices", "ptr"):
        assert torch.equal(a["cache"][name], b["cache"][name]), name
    assert torch.equal(a["memory_bank"]["indices"], b["memory_bank"]["indices"])
    assert b["labeler"]["rounds"] == 4


def test_labeled_list_with_no_match_is_a_usage_error(tmp_path):
    root = write_named_imagefolder(tmp_path / "data", [["a_1.JPEG", "a_2.JPEG"], ["b_1.JPEG", "b_2.JPEG"]])
    (tmp_path / "list.txt").write_text("n01440764_10026.JPEG\n")
    argv = ["--data", root, "--labeled-list", str(tmp_path / "list.txt"), "--arch", "resnet10", "--image-size", "16",
            "--batch-size", "2", "--workers", "0", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(common.UsageError, match="none of the 1 names .*n01440764_10026.JPEG"):
        run_in_process(semi, argv)


def test_labeled_list_end_to_end(tmp_path, capsys):
    """--labeled-list on an ImageFolder: listed images are the labeled ones, unknown names reported."""
    names = [[f"n{c:08d}_{i}.JPEG" for i in range(6)] for c in range(2)]
    root = write_named_imagefolder(tmp_path / "data", names)
    (tmp_path / "list.txt").write_text("n00000000_1.JPEG\nn00000001_4.JPEG\nn00000001_5.JPEG\nmissing_1.JPEG\n")
    out = tmp_path / "out"
    run_in_process(semi, ["--data", root, "--labeled-list", tmp_path / "list.txt", "--arch", "resnet10",
                          "--image-size", "16", "--batch-size", "4", "--mem-bank-size", "8", "--topk", "3",
                          "--epochs", "1", "--workers", "0", "--pseudo-batch-size", "4", "--output-dir", out])
    stdout = capsys.readouterr().out
    assert "warning: 1 names in" in stdout and "(first: missing_1.JPEG)" in stdout
    assert "12 images (3 labeled, 25.00%)" in stdout and "labeled cache 12" in stdout
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    dataset, _ = common.build_dataset("imagefolder", root, "train")
    labeled = {os.path.basename(dataset.samples[i][0]) for i in checkpoint["is_labeled"].nonzero().squeeze(1).tolist()}
    assert labeled == {"n00000000_1.JPEG", "n00000001_4.JPEG", "n00000001_5.JPEG"}
    assert checkpoint["labeler"]["rounds"] >= 1  # the round after step 1 is skipped if < 2 labeled are cached
