"""train_cmsf_sup.py: the same-label constraint (top-k and top-all) against float64 brute force,
noisy labels (exact counts, reproducible, file parsing), and the script on 1 and 2 processes with
exact resume."""
import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import common
import train_cmsf_sup as sup
from conftest import run_script, write_imagefolder

DIM = 8


def filled_bank(size, labels, seed=0):
    """A MemoryBank whose first len(labels) slots hold random unit vectors with these labels and dataset
    indices 100, 101, ...; the remaining slots stay empty (label -1, index -1)."""
    bank = common.MemoryBank(size, DIM, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.as_tensor(labels)
    bank.enqueue(F.normalize(torch.randn(len(labels), DIM, generator=gen), dim=1), labels,
                 torch.arange(len(labels)) + 100)
    return bank


def random_queries(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, DIM, generator=gen), dim=1),
            F.normalize(torch.randn(n, DIM, generator=gen), dim=1))


def test_constrained_topk_stays_in_class_and_averages_over_valid_neighbours():
    """Class 0: 12 entries, class 1: 6, class 2: 2 (< k = 5), class 3: none; 6 empty slots."""
    bank_labels = [0] * 12 + [1] * 6 + [2] * 2
    bank = filled_bank(26, torch.tensor(bank_labels)[torch.randperm(20, generator=torch.Generator().manual_seed(3))])
    query, target = random_queries(8, seed=1)
    labels = torch.tensor([0, 1, 2, 3, 0, 2, 1, 0])
    loss, slots, valid = sup.constrained_topk_loss(query, target, labels, bank, k=5)

    q, t, z = query.double(), target.double(), bank.embeddings.double()
    for i in range(8):
        members = (bank.labels == labels[i]).nonzero().squeeze(1).tolist()
        members.sort(key=lambda j: -float(t[i] @ z[j]))
        expected = members[:5]
        assert valid[i].sum().item() == len(expected)
        assert sorted(slots[i][valid[i]].tolist()) == sorted(expected)
        assert torch.all(bank.labels[slots[i][valid[i]]] == labels[i])  # never another class
        reference = sum(2 - 2 * float(q[i] @ z[j]) for j in expected) / len(expected) if expected else 0.0
        assert loss[i].item() == pytest.approx(reference, abs=1e-5)
    assert valid[2].sum() == 2 and valid[3].sum() == 0 and loss[3] == 0  # a class with 2 and with 0 entries


def test_top_all_loss_and_purity_match_brute_force():
    gen = torch.Generator().manual_seed(5)
    num_classes = 4
    bank = filled_bank(40, torch.randint(0, num_classes, (33,), generator=gen))  # 7 empty slots
    query, _ = random_queries(10, seed=2)
    query.requires_grad_(True)
    labels = torch.randint(0, num_classes, (10,), generator=gen)
    loss, counts = sup.top_all_loss(query, labels, bank, num_classes)

    q, z = query.detach().double(), bank.embeddings.double()
    reference = torch.stack([(2 - 2 * z[bank.labels == labels[i]] @ q[i]).mean() for i in range(10)])
    assert torch.allclose(loss.double(), reference, atol=1e-5)
    assert torch.equal(counts, torch.stack([(bank.labels == c).sum() for c in labels]))
    loss.sum().backward()  # d loss_i / d q_i = -2 x (class mean)
    class_means = torch.stack([z[bank.labels == labels[i]].mean(0) for i in range(10)])
    assert torch.allclose(query.grad.double(), -2 * class_means, atol=1e-5)

    # purity against clean labels: clean label of dataset index 100 + j is clean_of_bank[j]
    clean_labels = torch.full((200,), -5)
    clean_labels[100:133] = torch.randint(0, num_classes, (33,), generator=gen)
    sample_clean = torch.randint(0, num_classes, (10,), generator=gen)
    purity = sup.top_all_purity(labels, sample_clean, bank, clean_labels, num_classes)
    same = total = 0
    for i in range(10):
        members = (bank.labels == labels[i]).nonzero().squeeze(1)
        same += int((clean_labels[bank.indices[members]] == sample_clean[i]).sum())
        total += len(members)
    assert purity.item() == pytest.approx(same / total)


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5, 0.333, 1.0, 0.0])
def test_label_noise_changes_exactly_round_fraction_n_labels(fraction):
    clean = torch.arange(1003) % 7
    noisy = sup.make_noisy_labels(clean, 7, fraction, seed=11)
    changed = noisy != clean
    assert changed.sum().item() == round(fraction * 1003)  # every chosen label moved to ANOTHER class
    assert noisy.min() >= 0 and noisy.max() < 7
    assert torch.equal(noisy, sup.make_noisy_labels(clean, 7, fraction, seed=11))  # reproducible
    if 0 < fraction < 1:
        assert not torch.equal(noisy, sup.make_noisy_labels(clean, 7, fraction, seed=12))


def test_label_noise_picks_other_classes_uniformly():
    clean = torch.arange(21000) % 7
    noisy = sup.make_noisy_labels(clean, 7, 0.5, seed=0)
    offsets = ((noisy - clean) % 7)[noisy != clean]
    counts = torch.bincount(offsets, minlength=7)
    assert counts[0] == 0 and offsets.numel() == 10500
    assert torch.all((counts[1:] - 1750).abs() < 175), counts  # 1750 expected each, sd ~38


def test_label_noise_rejects_bad_fraction():
    with pytest.raises(common.UsageError, match="label-noise"):
        sup.make_noisy_labels(torch.zeros(5, dtype=torch.long), 3, 1.5, seed=0)


def write_label_file(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_noisy_label_file_parsing(tmp_path):
    root = write_imagefolder(tmp_path / "data", classes=3, images_per_class=3, splits=("train",))
    dataset, _ = common.build_dataset("imagefolder", root, "train")
    relative = [os.path.relpath(p, dataset.root) for p, _ in dataset.samples]
    # class folder names and class indices both work; blank lines are skipped
    wanted = [(i * 2) % 3 for i in range(len(relative))]
    lines = [f"{p} {'class_%d' % c if i % 2 else c}" for i, (p, c) in enumerate(zip(relative, wanted))]
    labels = sup.read_noisy_label_file(write_label_file(tmp_path / "ok.txt", lines[:4] + [""] + lines[4:]), dataset)
    assert labels.tolist() == wanted

    unknown = lines + ["class_0/not_there.jpg 1", "class_9/x.jpg 0"]
    with pytest.raises(common.UsageError, match=r"2 paths .* are not images .*class_0/not_there.jpg"):
        sup.read_noisy_label_file(write_label_file(tmp_path / "unknown.txt", unknown), dataset)
    with pytest.raises(common.UsageError, match=r"2 of 9 training images have no line .*first: class_"):
        sup.read_noisy_label_file(write_label_file(tmp_path / "missing.txt", lines[:-2]), dataset)
    with pytest.raises(common.UsageError, match="more than once"):
        sup.read_noisy_label_file(write_label_file(tmp_path / "dup.txt", lines + lines[:1]), dataset)
    with pytest.raises(common.UsageError, match=r"line 1: label 'dog'"):
        sup.read_noisy_label_file(write_label_file(tmp_path / "bad.txt", [f"{relative[0]} dog"] + lines[1:]), dataset)
    with pytest.raises(common.UsageError, match="line 2: expected"):
        sup.read_noisy_label_file(write_label_file(tmp_path / "short.txt", lines[:1] + ["lonely"]), dataset)
    synthetic, _ = common.build_dataset("synthetic", None, "train", synthetic_images=10, image_size=16)
    with pytest.raises(common.UsageError, match="imagefolder"):
        sup.read_noisy_label_file(str(tmp_path / "ok.txt"), synthetic)


# ---------------------------------------------------------------- the script

def tiny_args(output_dir, *extra, epochs=2):
    return ["--dataset", "synthetic", "--synthetic-images", "64", "--arch", "resnet10", "--image-size", "16",
            "--batch-size", "16", "--mem-bank-size", "48", "--workers", "0", "--print-freq", "1",
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



NOISE = ("--label-noise", "0.25")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """2 epochs (8 steps) with 25 % label noise, uninterrupted."""
    out = tmp_path_factory.mktemp("sup_straight")
    result = run_script("train_cmsf_sup.py", *tiny_args(out, *NOISE))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_script_runs_logs_noise_and_clean_purity(straight_run):
    out, result = straight_run
    assert "noisy training labels: 16 of 64 (25.00%)" in result.stdout
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    clean = torch.arange(64) % 10  # the synthetic labels
    assert torch.equal(checkpoint["train_labels"], sup.make_noisy_labels(clean, 10, 0.25, seed=0))
    assert torch.equal(checkpoint["memory_bank"]["labels"],
                       checkpoint["train_labels"][checkpoint["memory_bank"]["indices"]])  # bank holds noisy labels
    log = [line for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and '"purity"' in log[0] and '"neighbours"' in log[0]


def test_resume_is_bit_identical(straight_run, tmp_path, capsys):
    """Stop after 3 steps, resume, compare with the straight subprocess run (both halves run in-process)."""
    straight, _ = straight_run
    resumed = tmp_path / "resumed"
    run_in_process(sup, tiny_args(resumed, *NOISE, "--stop-after-iters", "3"))
    assert "stopped after 3 iterations" in capsys.readouterr().out
    assert torch.load(resumed / "checkpoint.pth", weights_only=True)["iteration"] == 3
    run_in_process(sup, tiny_args(resumed, *NOISE))
    assert "resumed from" in capsys.readouterr().out
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(resumed / "checkpoint.pth", weights_only=True)
    for part in ("online", "target", "memory_bank"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), (part, name)
    assert torch.equal(a["train_labels"], b["train_labels"])
    # changing the noise on resume is refused rather than mixing two label sets (in-process: no startup)
    with pytest.raises(common.UsageError, match="--label-noise"):
        run_in_process(sup, tiny_args(resumed, "--label-noise", "0.5", epochs=3))


def test_two_processes_top_all(straight_run, tmp_path):
    """Top-all on 2 processes (gloo): the bank's labels and indices match the 1-process run (same sampler
    order, all-gathered before enqueue); purity of a top-all set with noisy labels is below 1."""
    straight, _ = straight_run
    out = tmp_path / "two"
    result = run_script("train_cmsf_sup.py", *tiny_args(out, *NOISE, "--topk", "0"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "k=all same-label" in result.stdout
    a = torch.load(straight / "checkpoint.pth", weights_only=True)["memory_bank"]
    b = torch.load(out / "checkpoint.pth", weights_only=True)["memory_bank"]
    for name in ("labels", "indices", "ptr"):
        assert torch.equal(a[name], b[name]), name
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(0 < record["purity"] < 1 for record in log)


def test_noisy_label_file_end_to_end(tmp_path, capsys):
    """--noisy-labels on an ImageFolder: the file's labels reach the bank and the checkpoint."""
    root = write_imagefolder(tmp_path / "data", classes=3, images_per_class=8, splits=("train",))
    dataset, _ = common.build_dataset("imagefolder", root, "train")
    flipped = [(c + 1) % 3 if i % 4 == 0 else c for i, (_, c) in enumerate(dataset.samples)]  # 6 of 24 noisy
    lines = [f"{os.path.relpath(p, dataset.root)} {y}" for (p, _), y in zip(dataset.samples, flipped)]
    label_file = write_label_file(tmp_path / "noisy.txt", lines)
    out = tmp_path / "out"
    run_in_process(sup, ["--data", root, "--noisy-labels", label_file, "--arch", "resnet10", "--image-size", "16",
                         "--batch-size", "8", "--mem-bank-size", "16", "--topk", "3", "--epochs", "1",
                         "--workers", "0", "--output-dir", out])
    assert f"noisy training labels: 6 of 24 (25.00%) from {label_file}" in capsys.readouterr().out
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["train_labels"].tolist() == flipped
    bank = checkpoint["memory_bank"]
    assert torch.equal(bank["labels"], torch.tensor(flipped)[bank["indices"]])


@pytest.mark.parametrize("noise", ["0", "0.25"])
def test_xent_baseline_runs_and_resumes_exactly(tmp_path, noise, capsys):
    """--loss xent: the cross-entropy baseline on clean or noisy labels; stop + resume = straight."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ("--loss", "xent", "--label-noise", noise, "--knn-every", "0")
    run_in_process(sup, tiny_args(straight, *extra))
    run_in_process(sup, tiny_args(resumed, *extra, "--stop-after-iters", "3"))
    run_in_process(sup, tiny_args(resumed, *extra))
    a = torch.load(straight / "checkpoint.pth", weights_only=True)
    b = torch.load(resumed / "checkpoint.pth", weights_only=True)
    assert (a["epoch"], b["epoch"]) == (2, 2)
    assert a["online"]["1.weight"].shape == (10, 512)  # the linear classifier over 10 classes
    for name, value in a["online"].items():
        assert torch.equal(value, b["online"][name]), name
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert all(0 <= record["purity"] <= 1 and record["loss"] > 0 for record in log)
    torch.manual_seed(0)  # the initial weights, as the script builds them with --seed 0
    initial = sup.common.build_encoder("resnet10", 16)
    assert initial.backbone.conv1.weight.shape == a["online"]["0.backbone.conv1.weight"].shape
    assert not torch.equal(a["online"]["0.backbone.conv1.weight"], initial.backbone.conv1.weight)


def test_xent_baseline_two_processes(tmp_path):
    result = run_script("train_cmsf_sup.py", *tiny_args(tmp_path, "--loss", "xent", "--label-noise", "0.25",
                                                        "--knn-every", "0"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 2
