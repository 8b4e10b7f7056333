"""transfer_eval.py: the L-BFGS logistic regression against scikit-learn and a float64 Newton solve, the
metrics and the reference splits against plain re-implementations, and the whole script on tiny copies
of the 10 datasets."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import common
import transfer_eval
from conftest import assert_usage_error, run_script
from transfer_fixtures import (ALL_NAMES, CALTECH101_FOLDERS, make_transfer_fixtures,
                               patch_torchvision_checksums)


def newton_reference(features, labels, num_classes, wd, steps=30):
    """float64 Newton's method on sum CE + wd/2 ||W||^2 with the closed-form gradient and Hessian of
    softmax regression. Parameters V = [W | b] (classes x (dim + 1)), features augmented with a 1.
    The bias is not penalised, so it is defined up to a constant: the pseudo-inverse step keeps it at
    zero mean."""
    n, dim = features.shape
    x = torch.cat([features.double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    onehot = torch.nn.functional.one_hot(labels, num_classes).double()
    penalised = torch.ones(num_classes, dim + 1, dtype=torch.float64)
    penalised[:, dim] = 0
    params = torch.zeros(num_classes, dim + 1, dtype=torch.float64)
    for _ in range(steps):
        probs = torch.softmax(x @ params.T, dim=1)
        gradient = (probs - onehot).T @ x + wd * penalised * params
        # d^2 CE / dV[c, j] dV[d, k] = mean_i (p_ic [c = d] - p_ic p_id) x_ij x_ik
        curvature = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        hessian = torch.einsum("icd,ij,ik->cjdk", curvature, x, x).reshape(
            num_classes * (dim + 1), num_classes * (dim + 1))
        hessian += torch.diag(wd * penalised.flatten())
        params = params - (torch.linalg.pinv(hessian) @ gradient.flatten()).view_as(params)
    assert gradient.abs().max() < 1e-10
    logits = x @ params.T
    loss = (torch.logsumexp(logits, dim=1) - logits[torch.arange(n), labels]).sum()
    loss = loss + 0.5 * wd * (params[:, :dim] ** 2).sum()
    return params[:, :dim], params[:, dim], loss.item()


def relative_error(value, reference):
    return ((value.double() - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("wd", [1e-4, 1e-2, 1.0, 1e3])
def test_lbfgs_reaches_the_newton_optimum(wd):
    generator = torch.Generator().manual_seed(0)
    n, dim, num_classes = 90, 6, 4
    features = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    ref_weight, ref_bias, ref_loss = newton_reference(features, labels, num_classes, wd)

    weight, bias, iterations, gradient = transfer_eval.fit_logistic_regression(
        features, labels, num_classes, wd, tol=1e-9)
    assert gradient <= 1e-7 and 0 < iterations < 2000  # float64 line searches stall near 1e-8
    loss = transfer_eval.logistic_objective(features, labels, weight, bias, wd).item()
    assert abs(loss - ref_loss) < 1e-8 * abs(ref_loss)
    assert relative_error(weight, ref_weight) < 1e-6
    assert relative_error(bias - bias.mean(), ref_bias) < 1e-6

    # warm start from another penalty's solution lands on the same optimum; float32 close to it
    init = transfer_eval.fit_logistic_regression(features, labels, num_classes, wd * 100)[:2]
    weight, _, _, _ = transfer_eval.fit_logistic_regression(features, labels, num_classes, wd, tol=1e-9,
                                                            init=init)
    assert relative_error(weight, ref_weight) < 1e-6
    weight32, bias32, _, _ = transfer_eval.fit_logistic_regression(features.float(), labels, num_classes, wd)
    assert weight32.dtype == torch.float32
    assert relative_error(weight32, ref_weight) < 1e-2
    assert relative_error(bias32 - bias32.mean(), ref_bias) < 1e-2


@pytest.mark.parametrize("wd", np.logspace(-6, 5, 45)[[0, 12, 20, 28, 36, 44]].tolist())
def test_lbfgs_equals_sklearn_logistic_regression(wd):
    """The reference's classifier: LogisticRegression(C=1/wd) (multinomial with lbfgs), run here to
    convergence, on raw random features: the same predictions and coefficients."""
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(0)
    n, dim, num_classes = 150, 10, 5
    features = rng.normal(size=(n, dim)) * 2 + 1
    labels = rng.integers(0, num_classes, n)
    reference = LogisticRegression(C=1 / wd, tol=1e-12, max_iter=100_000).fit(features, labels)
    weight, bias, iterations, gradient = transfer_eval.fit_logistic_regression(
        torch.tensor(features), torch.tensor(labels), num_classes, wd, max_iter=5000, tol=1e-9)
    assert gradient <= 1e-6 and iterations < 5000  # 1e-6: --tol's default
    coef_error = np.abs(weight.numpy() - reference.coef_).max() / np.abs(reference.coef_).max()
    bias_error = np.abs((bias - bias.mean()).numpy() - (reference.intercept_ - reference.intercept_.mean())).max()
    assert coef_error < 2e-5 and bias_error < 2e-5, (coef_error, bias_error)
    queries = rng.normal(size=(400, dim)) * 2 + 1
    ours = transfer_eval.predict(torch.tensor(queries), weight, bias).numpy()
    assert (ours == reference.predict(queries)).all()


def test_accuracies_match_plain_loops():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 6, (200,), generator=generator)
    labels[labels == 3] = 4  # class 3 absent: it must not count as a class with accuracy 0
    predictions = torch.where(torch.rand(200, generator=generator) < 0.6, labels,
                              torch.randint(0, 6, (200,), generator=generator))
    pairs = list(zip(predictions.tolist(), labels.tolist()))
    per_class = []
    for c in sorted(set(labels.tolist())):
        members = [p for p, y in pairs if y == c]
        per_class.append(sum(p == c for p in members) / len(members))
    expected_mean_per_class = 100 * sum(per_class) / len(per_class)
    expected_top1 = 100 * sum(p == y for p, y in pairs) / len(pairs)
    mean_per_class = transfer_eval.mean_per_class_accuracy(predictions, labels)
    assert mean_per_class == pytest.approx(expected_mean_per_class, abs=1e-9)
    assert transfer_eval.top1_accuracy(predictions, labels) == pytest.approx(expected_top1, abs=1e-9)
    assert abs(expected_mean_per_class - expected_top1) > 0.1  # the two metrics really differ here


def test_val_split_is_the_reference_numpy_split():
    """The reference: indices = list(range(n)); np.random.seed(0); np.random.shuffle(indices);
    val = indices[:floor(0.2 n)], train = the rest."""
    for n in (103, 5, 1000):
        np.random.seed(0)
        indices = list(range(n))
        np.random.shuffle(indices)
        n_val = int(np.floor(0.2 * n))
        train, val = transfer_eval.reference_val_split(n, 0)
        assert val == sorted(indices[:n_val]) and train == sorted(indices[n_val:])
    assert transfer_eval.reference_val_split(103, 1)[1] != transfer_eval.reference_val_split(103, 0)[1]


def reference_caltech101_split(root, num_train_per_class=30):
    """The reference's procedure, from its description: ImageFolder (sorted) order of
    101_ObjectCategories; np.random.seed(0); per class np.random.choice(its indices, 30) with
    replacement; the drawn images (each once) train, the rest test. Returns file paths."""
    categories = os.path.join(root, "caltech101", "101_ObjectCategories")
    paths, labels = [], []
    for label, folder in enumerate(sorted(os.listdir(categories))):
        for name in sorted(os.listdir(os.path.join(categories, folder))):
            paths.append(os.path.join(categories, folder, name))
            labels.append(label)
    np.random.seed(0)
    train = []
    for c in range(max(labels) + 1):
        train.extend(np.random.choice([i for i, y in enumerate(labels) if y == c], num_train_per_class))
    train = set(int(i) for i in train)
    test = set(range(len(paths))) - train
    return sorted(paths[i] for i in train), sorted(paths[i] for i in test), labels


def dataset_paths(dataset):
    return sorted(dataset.dataset.samples[i][0] for i in dataset.indices)


def test_caltech101_split_is_the_reference_procedure(tmp_path):
    root = make_transfer_fixtures(tmp_path / "data", ["caltech101"])
    expected_train, expected_test, labels = reference_caltech101_split(str(root), num_train_per_class=5)
    transform = transfer_eval.transfer_transform(8)
    train_pos, test_pos = transfer_eval.caltech101_reference_split(labels, len(CALTECH101_FOLDERS), 0, 5)
    categories = os.path.join(str(root), "caltech101", "101_ObjectCategories")
    import torchvision
    pool = torchvision.datasets.ImageFolder(categories)
    assert pool.classes == sorted(CALTECH101_FOLDERS) and pool.classes[0] == "BACKGROUND_Google"
    assert sorted(pool.samples[i][0] for i in train_pos) == expected_train
    assert sorted(pool.samples[i][0] for i in test_pos) == expected_test
    assert len(train_pos) < 5 * len(CALTECH101_FOLDERS)  # duplicate draws occurred and count once
    # the script's split (30 draws per class, as the reference) equals the reference procedure too
    expected_train, expected_test, _ = reference_caltech101_split(str(root))
    train, test = transfer_eval.caltech101_splits(str(root), transform, 0)
    assert dataset_paths(train) == expected_train and dataset_paths(test) == expected_test
    assert len(set(pool.targets[i] for i in train.indices)) == 4  # BACKGROUND_Google is a class


def test_caltech101_split_files_are_used_as_given(tmp_path):
    root = make_transfer_fixtures(tmp_path / "data", ["caltech101"])
    splits = tmp_path / "caltech101-splits"
    splits.mkdir()
    (splits / "train.txt").write_text("BACKGROUND_Google/image_0002.jpg 0\naccordion/image_0003.jpg 2\n")
    (splits / "test.txt").write_text("airplanes/image_0001.jpg 3\n")
    transform = transfer_eval.transfer_transform(8)
    train, test = transfer_eval.caltech101_splits(str(root), transform, 0, str(splits))
    categories = os.path.join(str(root), "caltech101", "101_ObjectCategories")
    assert train.samples == [(os.path.join(categories, "BACKGROUND_Google/image_0002.jpg"), 0),
                             (os.path.join(categories, "accordion/image_0003.jpg"), 2)]
    assert test.samples == [(os.path.join(categories, "airplanes/image_0001.jpg"), 3)]
    assert train[1][0].shape == (3, 8, 8)
    (splits / "test.txt").unlink()
    with pytest.raises(common.UsageError, match="missing .*test.txt"):
        transfer_eval.caltech101_splits(str(root), transform, 0, str(splits))


def test_sun397_uses_the_partition_files_as_given(tmp_path):
    root = make_transfer_fixtures(tmp_path / "data", ["sun397"])
    base = os.path.join(str(root), "SUN397")
    train, test = transfer_eval.sun397_splits(str(root), transfer_eval.transfer_transform(8))
    classes = sorted(["abbey", "bakery/shop", "canyon"])
    for dataset, partition in ((train, "Training_01.txt"), (test, "Testing_01.txt")):
        lines = [line.strip() for line in open(os.path.join(base, partition)) if line.strip()]
        expected = [(os.path.join(base, line[1:]), classes.index(os.path.dirname(line)[3:])) for line in lines]
        assert dataset.samples == expected
    assert len(train) == 12 and len(test) == 12 and train[0][0].shape == (3, 8, 8)
    os.remove(os.path.join(base, "Testing_01.txt"))
    with pytest.raises(common.UsageError, match="missing Testing_01.txt .*Partitions archive") as error:
        transfer_eval.sun397_splits(str(root), transfer_eval.transfer_transform(8))
    assert "\n" not in str(error.value)


def test_wd_grid_is_the_reference_logspace():
    grid = transfer_eval.wd_grid(45)
    assert len(grid) == 45 and grid[0] == pytest.approx(1e5) and grid[-1] == pytest.approx(1e-6)
    assert sorted(grid) == pytest.approx(np.logspace(-6, 5, 45).tolist(), rel=1e-12)
    ratios = [math.log10(a / b) for a, b in zip(grid, grid[1:])]
    assert all(r == pytest.approx(11 / 44) for r in ratios)


def run_args(tmp_path, *extra):
    return transfer_eval.get_args_parser().parse_args(list(extra) + ["--output-dir", str(tmp_path / "out")])


def test_end_to_end_on_all_ten_datasets(tmp_path, monkeypatch, capsys):
    root = make_transfer_fixtures(tmp_path / "data")
    patch_torchvision_checksums(monkeypatch, root)
    backbone, _ = common.build_backbone("resnet18", 16)
    weights = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), weights)
    args = run_args(tmp_path, "--weights", str(weights), "--arch", "resnet18", "--image-size", "16",
                    "--data-root", str(root), "--wd-grid-size", "3", "--batch-size", "16", "--workers", "0",
                    "--device", "cpu")
    transfer_eval.main(args)
    printed = capsys.readouterr().out

    expected_sizes = {  # (train, val, test) of the fixtures under the documented splits
        "food101": (20, 4, 9), "cifar10": (24, 6, 9), "cifar100": (20, 4, 9), "sun397": (10, 2, 12),
        "cars": (20, 4, 9), "aircraft": (18, 6, 9), "dtd": (18, 6, 9), "pets": (20, 4, 9),
        "caltech101": (69, 17, 74), "flowers": (18, 6, 9)}
    out = tmp_path / "out"
    results = {}
    for name in ALL_NAMES:
        record = json.loads((out / f"{name}.json").read_text())
        assert (record["n_train"], record["n_val"], record["n_test"]) == expected_sizes[name]
        assert record["metric"] == ("mean_per_class" if name in ("aircraft", "pets", "caltech101", "flowers")
                                    else "top1")
        assert record["best_wd"] in [pytest.approx(w) for w in transfer_eval.wd_grid(3)]
        assert record["num_classes"] == (4 if name == "caltech101" else 3) and record["feature_dim"] == 512
        assert not record["not_converged"] and record["refit_iterations"] > 0
        assert 0 <= record["test_accuracy"] <= 100
        results[name] = record["test_accuracy"]
        for split in ("train", "val", "test"):
            assert len([f for f in os.listdir(out / "features") if f.startswith(f"{name}_{split}_")]) == 1
    # classes differ in colour: even random features separate them better than chance (33 %)
    assert sum(results.values()) / 10 > 50

    summary = json.loads((out / "results.json").read_text())
    assert summary["missing"] == [] and summary["mean"] == pytest.approx(sum(results.values()) / 10)
    markdown = (out / "results.md").read_text()
    for column in ("Food", "C10", "C100", "SUN", "Cars", "Aircraft", "DTD", "Pets", "Caltech", "Flowers"):
        assert column in markdown
    assert "| MSF (poster) | 70.7 | 92.0 | 76.1 | 59.0 | 60.9 | 53.5 | 72.1 | 89.2 | 92.1 | 92.4 | 75.8 |" in markdown
    assert f"{summary['mean']:.1f} |" in markdown.splitlines()[3]
    assert markdown in printed

    # second run reuses every cached feature file and reproduces the numbers; --collect alone too
    transfer_eval.main(run_args(tmp_path, "--weights", str(weights), "--arch", "resnet18", "--image-size", "16",
                                "--data-root", str(root), "--wd-grid-size", "3", "--workers", "0",
                                "--device", "cpu", "--max-iter", "100", "--datasets", "cifar10,flowers"))
    printed = capsys.readouterr().out
    assert printed.count("reusing cached features") == 2
    assert json.loads((out / "cifar10.json").read_text())["test_accuracy"] == results["cifar10"]
    assert transfer_eval.collect(str(out)) == markdown
    transfer_eval.main(run_args(tmp_path, "--collect"))
    assert markdown in capsys.readouterr().out


def cache_file(folder, name, split):
    (path,) = [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(f"{name}_{split}_")]
    return path


def test_cache_is_invalidated_by_other_weights_and_collect_reports_missing(tmp_path, monkeypatch, capsys):
    root = make_transfer_fixtures(tmp_path / "data", ["dtd"])
    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        backbone, _ = common.build_backbone("resnet18", 8)
        weights.append(tmp_path / f"backbone{seed}.pth")
        torch.save(backbone.state_dict(), weights[-1])
    common_args = ["--arch", "resnet18", "--image-size", "8", "--data-root", str(root), "--datasets", "dtd",
                   "--wd-grid-size", "2", "--workers", "0", "--device", "cpu", "--max-iter", "50"]
    transfer_eval.main(run_args(tmp_path, "--weights", str(weights[0]), *common_args))
    first = torch.load(cache_file(tmp_path / "out" / "features", "dtd", "test"))["features"]
    os.remove(cache_file(tmp_path / "out" / "features", "dtd", "test"))
    transfer_eval.main(run_args(tmp_path, "--weights", str(weights[1]), *common_args))
    assert "reusing cached features" not in capsys.readouterr().out
    second = torch.load(cache_file(tmp_path / "out" / "features", "dtd", "test"))["features"]
    assert not torch.allclose(first, second)

    markdown = transfer_eval.collect(str(tmp_path / "out"))
    assert "missing (no mean until all 10 are done): food101" in markdown
    assert json.loads((tmp_path / "out" / "results.json").read_text())["mean"] is None


def test_missing_files_give_one_line_usage_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for name, layout_part, hint in (("flowers", "flowers-102/", "--download"),
                                    ("sun397", "SUN397", "Partitions archive"),
                                    ("cifar10", "cifar-10-batches-py/", "--download")):
        with pytest.raises(common.UsageError, match=f"{name}: .*{layout_part}.*{hint}") as error:
            transfer_eval.build_splits(name, str(empty), 16, 0, download=False)
        assert "\n" not in str(error.value)
    with pytest.raises(common.UsageError, match="stanford_cars/.*link is dead"):
        transfer_eval.build_splits("cars", str(empty), 16, 0, download=True)
    with pytest.raises(common.UsageError, match="unknown"):
        transfer_eval.parse_dataset_names("cifar10,imagenet")
    with pytest.raises(common.UsageError, match="no <dataset>.json"):
        transfer_eval.collect(str(empty))


def test_two_processes_extract_the_single_process_features(tmp_path):
    root = make_transfer_fixtures(tmp_path / "data", ["dtd", "caltech101"])
    backbone, _ = common.build_backbone("resnet18", 8)
    weights = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), weights)
    argv = ["--weights", weights, "--arch", "resnet18", "--image-size", "8", "--data-root", root,
            "--datasets", "dtd,caltech101", "--wd-grid-size", "2", "--batch-size", "8", "--workers", "0",
            "--device", "cpu", "--max-iter", "50"]
    one, two = tmp_path / "one", tmp_path / "two"
    transfer_eval.main(transfer_eval.get_args_parser().parse_args(list(map(str, argv)) + ["--output-dir", str(one)]))
    # caltech101's cache is already there for the 2-process run (rank 0 decides to reuse it on both
    # ranks); dtd is extracted by 2 ranks with uneven shards (9 test images: 5 + 4)
    (two / "features").mkdir(parents=True)
    for split in ("train", "val", "test"):
        shutil.copy(cache_file(one / "features", "caltech101", split), two / "features")
    result = run_script("transfer_eval.py", *argv, "--output-dir", two, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("[caltech101] reusing cached features") == 1  # printed by rank 0 only
    assert result.stdout.count("[dtd] test top1") == 1
    for split in ("train", "val", "test"):
        one_cache = torch.load(cache_file(one / "features", "dtd", split))
        two_cache = torch.load(cache_file(two / "features", "dtd", split))
        assert torch.equal(one_cache["labels"], two_cache["labels"])
        assert torch.allclose(one_cache["features"], two_cache["features"], atol=1e-5)
    for name in ("dtd", "caltech101"):
        expected = json.loads((one / f"{name}.json").read_text())["test_accuracy"]
        assert json.loads((two / f"{name}.json").read_text())["test_accuracy"] == pytest.approx(expected)


def test_command_line_missing_dataset_is_a_one_line_error(tmp_path):
    backbone, _ = common.build_backbone("resnet18", 8)
    torch.save(backbone.state_dict(), tmp_path / "backbone.pth")
    result = run_script("transfer_eval.py", "--weights", tmp_path / "backbone.pth", "--arch", "resnet18",
                        "--image-size", "8", "--data-root", tmp_path, "--datasets", "dtd,cars",
                        "--output-dir", tmp_path / "out", "--device", "cpu")
    assert_usage_error(result, "dtd: dataset not found", "dtd/dtd/{images/")
