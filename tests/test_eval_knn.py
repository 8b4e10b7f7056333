"""eval_knn.py: majority (with its tie-break) and weighted votes against a brute-force float64
reference, chunked = unchunked search, DDP feature extraction order, and the script end to end."""
import json
import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import common
import eval_knn
from conftest import REPO_ROOT, assert_usage_error, free_port, run_script

T = 0.07


def reference_predictions(train, train_labels, queries, k, num_classes, temperature=T):
    """float64 brute force: full similarity matrix, sorted neighbours, votes in plain Python."""
    sims = queries.double() @ train.double().T
    order = sims.argsort(dim=1, descending=True)[:, :k]
    majority, weighted = [], []
    for row in range(queries.shape[0]):
        labels = [int(train_labels[j]) for j in order[row]]
        counts = Counter(labels)
        top = max(counts.values())
        majority.append(next(c for c in labels if counts[c] == top))  # tied class of the nearest neighbour
        scores = np.zeros(num_classes)
        for j in order[row]:
            scores[int(train_labels[j])] += np.exp(float(sims[row, j]) / temperature)
        weighted.append(int(scores.argmax()))
    return torch.tensor(majority), torch.tensor(weighted)


def random_problem(seed, num_train=97, num_queries=41, dim=6, num_classes=4):
    gen = torch.Generator().manual_seed(seed)
    train = F.normalize(torch.randn(num_train, dim, generator=gen), dim=1)
    queries = F.normalize(torch.randn(num_queries, dim, generator=gen), dim=1)
    train_labels = torch.randint(0, num_classes, (num_train,), generator=gen)
    return train, train_labels, queries


def test_majority_vote_tie_break_by_hand():
    neighbour_labels = torch.tensor([[2, 1, 1, 2], [0, 1, 2, 3], [3, 1, 1, 0], [1, 2, 2, 1]])
    # ties: {1, 2} -> nearest is 2; all tied -> nearest 0; clear winner 1; {1, 2} -> nearest is 1
    assert common.majority_vote(neighbour_labels, 4).tolist() == [2, 0, 1, 1]


def test_votes_match_float64_reference_and_chunking_changes_nothing():
    train, train_labels, queries = random_problem(0)
    ks = [1, 4, 10, 20]
    unchunked = common.knn_predict(train, train_labels, queries, ks, 4, T, train_chunk_size=10**6,
                                     query_chunk_size=10**6)
    chunked = common.knn_predict(train, train_labels, queries, ks, 4, T, train_chunk_size=7, query_chunk_size=5)
    ties_seen = 0
    for k in ks:
        majority, weighted = reference_predictions(train, train_labels, queries, k, 4)
        assert torch.equal(unchunked[k][0], majority), k
        assert torch.equal(unchunked[k][1], weighted), k
        assert torch.equal(chunked[k][0], majority) and torch.equal(chunked[k][1], weighted), k
        sims = queries.double() @ train.double().T
        for row in sims.argsort(dim=1, descending=True)[:, :k]:
            counts = sorted(Counter(train_labels[row].tolist()).values(), reverse=True)
            ties_seen += len(counts) > 1 and counts[0] == counts[1]
    assert ties_seen >= 10  # the tie-break was really exercised
    # accuracy = fraction of exact label matches of these predictions
    val_labels = torch.randint(0, 4, (queries.shape[0],), generator=torch.Generator().manual_seed(1))
    expected = (reference_predictions(train, train_labels, queries, 20, 4)[0] == val_labels).double().mean()
    assert (chunked[20][0] == val_labels).float().mean().item() == pytest_approx(expected.item())


def pytest_approx(value):
    import pytest
    return pytest.approx(value, abs=1e-6)


def test_weighted_vote_by_hand():
    sims = torch.tensor([[0.9, 0.5, 0.5]])
    labels = torch.tensor([[0, 1, 1]])
    # exp(0.9/T) = 3.85e5 > 2 exp(0.5/T) = 2.5e3: one close neighbour beats two far ones
    assert common.weighted_vote(sims, labels, 2, T).item() == 0
    assert common.majority_vote(labels, 2).item() == 1


# ---------------------------------------------------------------- DDP feature extraction

class LabelledTensors(torch.utils.data.Dataset):
    """Image i is a constant tensor of value i; items (image, label, index) like IndexedDataset."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((3, 4, 4), float(i)), i % 3, i


def tiny_backbone():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten())


def _extract_worker(rank, port, out_dir, sizes):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    sys.path.insert(0, REPO_ROOT)
    torch.set_num_threads(1)
    device = common.init_distributed("cpu")
    results = {n: common.extract_features(tiny_backbone(), LabelledTensors(n), 4, 0, device) for n in sizes}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_extract_features_two_processes_keep_dataset_order(tmp_path):
    sizes = [7, 8, 1]  # odd, even, and one image (rank 1 gets an empty shard)
    mp.spawn(_extract_worker, args=(free_port(), str(tmp_path), sizes), nprocs=2, join=True)
    backbone = tiny_backbone()
    backbone.train()  # extract_features must switch to eval mode (BatchNorm running statistics) ...
    for n in sizes:
        features, labels = common.extract_features(backbone, LabelledTensors(n), 3, 0, torch.device("cpu"))
        assert backbone.training  # ... and restore the mode afterwards
        images = torch.stack([LabelledTensors(n)[i][0] for i in range(n)])
        backbone.eval()
        with torch.no_grad():
            expected = backbone(images)
        backbone.train()
        assert features.dtype == torch.float32 and features.shape == (n, 5)
        torch.testing.assert_close(features, expected)
        assert labels.tolist() == [i % 3 for i in range(n)]
        for rank in range(2):
            ddp_features, ddp_labels = torch.load(tmp_path / f"rank{rank}.pt")[n]
            torch.testing.assert_close(ddp_features, expected)
            assert ddp_labels.tolist() == labels.tolist()


# ---------------------------------------------------------------- the script

def knn_argv(output_dir, *extra):
    return ["--dataset", "synthetic", "--synthetic-images", "64", "--arch", "resnet10", "--image-size", "16",
            "--batch-size", "16", "--workers", "0", "--k", "1", "3", "20", "--output-dir", str(output_dir),
            *map(str, extra)]


def test_eval_knn_script_end_to_end_with_cache(tmp_path):
    torch.manual_seed(0)
    encoder = common.build_encoder("resnet10", 16)
    online = torch.nn.Sequential(encoder, common.build_predictor(encoder))
    torch.save({"script": "train_msf.py", "epoch": 1, "online": online.state_dict()}, tmp_path / "ckpt.pth")

    first = run_script("eval_knn.py", *knn_argv(tmp_path / "out", "--weights", tmp_path / "ckpt.pth"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "loaded" in first.stdout and "peak memory" in first.stdout and "| 20 |" in first.stdout
    results = json.loads((tmp_path / "out" / "knn_results.json").read_text())
    assert results["train_images"] == 64 and results["val_images"] == 12 and results["feature_dim"] == 512
    # the reported accuracies are those of the brute-force reference on the cached features
    cache = {}
    for name in os.listdir(tmp_path / "out" / "features"):
        entry = torch.load(tmp_path / "out" / "features" / name)
        cache[entry["key"]["split"]] = entry
    train, val = cache["train"], cache["val"]
    torch.testing.assert_close(train["features"].norm(dim=1), torch.ones(64))
    for k in (1, 3, 20):
        majority, weighted = reference_predictions(train["features"], train["labels"], val["features"], k, 10)
        assert results["accuracy"][str(k)]["majority_top1"] == pytest_approx(
            100 * (majority == val["labels"]).double().mean().item())
        assert results["accuracy"][str(k)]["weighted_top1"] == pytest_approx(
            100 * (weighted == val["labels"]).double().mean().item())

    again = run_script("eval_knn.py", *knn_argv(tmp_path / "out", "--weights", tmp_path / "ckpt.pth"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("cached features") == 2 and "train features [" not in again.stdout
    assert json.loads((tmp_path / "out" / "knn_results.json").read_text())["accuracy"] == results["accuracy"]


def test_eval_knn_random_init_float16(tmp_path):
    result = run_script("eval_knn.py", *knn_argv(tmp_path / "out", "--feature-dtype", "float16"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "random init" in result.stdout
    results = json.loads((tmp_path / "out" / "knn_results.json").read_text())
    assert results["weights"] == "random init" and results["feature_dtype"] == "float16"
    (name,) = [n for n in os.listdir(tmp_path / "out" / "features") if "_train_" in n]
    assert torch.load(tmp_path / "out" / "features" / name)["features"].dtype == torch.float16


# ---------------------------------------------------------------- --train-list, cache keys

def approx_percent(value):
    return pytest.approx(value, abs=1e-4)  # the script averages in float32


def cached_entries(cache_dir):
    entries = [torch.load(os.path.join(cache_dir, name)) for name in os.listdir(cache_dir)]
    return {entry["key"]["split"]: entry for entry in entries}


def test_eval_knn_train_list_uses_the_subset_as_database(tmp_path):
    from test_eval_linear import write_named_imagefolder
    root = write_named_imagefolder(tmp_path / "data", classes=3, per_class=20)
    subset = [f"n{i % 3:08d}_{i}.JPEG" for i in range(0, 60, 2)]  # 30 of the 60 train images
    (tmp_path / "10percent.txt").write_text("\n".join(subset + ["n00000009_999.JPEG"]) + "\n")
    result = run_script("eval_knn.py", "--dataset", "imagefolder", "--data", root, "--arch", "resnet10",
                        "--image-size", "16", "--workers", "0", "--train-list", tmp_path / "10percent.txt",
                        "--output-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "30 train images are the database; 1 names not found" in result.stdout
    results = json.loads((tmp_path / "out" / "knn_results.json").read_text())
    assert results["train_images"] == 30 and list(results["accuracy"]) == ["1", "5", "10", "20"]
    cache = cached_entries(tmp_path / "out" / "features")
    train, val = cache["train"], cache["val"]
    assert train["features"].shape[0] == 30 and val["features"].shape[0] == 60
    assert sorted(train["labels"].tolist()) == sorted(int(name[1:9]) for name in subset)
    for k in (1, 5, 10, 20):  # the reported numbers are the float64 brute force's on the subset
        majority, weighted = reference_predictions(train["features"], train["labels"], val["features"], k, 3)
        assert results["accuracy"][str(k)]["majority_top1"] == approx_percent(
            100 * (majority == val["labels"]).double().mean().item())
        assert results["accuracy"][str(k)]["weighted_top1"] == approx_percent(
            100 * (weighted == val["labels"]).double().mean().item())
    (tmp_path / "empty.txt").write_text("\n\n")
    bad = run_script("eval_knn.py", "--dataset", "imagefolder", "--data", root, "--arch", "resnet10",
                     "--image-size", "16", "--workers", "0", "--train-list", tmp_path / "empty.txt",
                     "--output-dir", tmp_path / "out2", "--cache-dir", "none")
    assert_usage_error(bad, "--train-list", "is empty")


def test_knn_predict_on_a_subset_database_matches_float64_brute_force():
    train, train_labels, queries = random_problem(5, num_train=200)
    subset = torch.randperm(200, generator=torch.Generator().manual_seed(0))[:37]
    predictions = common.knn_predict(train[subset], train_labels[subset], queries, [1, 5, 10, 20], 4, T,
                                     train_chunk_size=11, query_chunk_size=7)
    for k in (1, 5, 10, 20):
        majority, weighted = reference_predictions(train[subset], train_labels[subset], queries, k, 4)
        assert torch.equal(predictions[k][0], majority) and torch.equal(predictions[k][1], weighted)


def test_stale_cache_is_not_reused_after_the_checkpoint_is_rewritten_and_cache_can_be_off(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "backbone.pth"
    torch.save(common.build_backbone("resnet10", 16)[0].state_dict(), weights)
    first = run_script("eval_knn.py", *knn_argv(tmp_path / "out", "--weights", weights))
    assert first.returncode == 0, first.stderr[-3000:]
    before = cached_entries(tmp_path / "out" / "features")["val"]["features"]
    stat = os.stat(weights)
    torch.manual_seed(1)
    torch.save(common.build_backbone("resnet10", 16)[0].state_dict(), weights)  # same path and size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even the same mtime
    second = run_script("eval_knn.py", *knn_argv(tmp_path / "out", "--weights", weights))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "cached features" not in second.stdout
    entries = [torch.load(tmp_path / "out" / "features" / n) for n in os.listdir(tmp_path / "out" / "features")]
    after = [e["features"] for e in entries if e["key"]["split"] == "val" and not torch.equal(e["features"], before)]
    assert len(entries) == 4 and len(after) == 1
    off = run_script("eval_knn.py", *knn_argv(tmp_path / "off", "--weights", weights, "--cache-dir", "none"))
    assert off.returncode == 0, off.stderr[-3000:]
    assert not (tmp_path / "off" / "features").exists() and os.listdir(tmp_path / "off") == ["knn_results.json"]
    assert json.loads((tmp_path / "off" / "knn_results.json").read_text())["accuracy"] == json.loads(
        (tmp_path / "out" / "knn_results.json").read_text())["accuracy"]


def test_channels_last_features_equal_contiguous_ones_on_cpu():
    """The GPU layout path (channels_last weights and images) runs here on CPU, forced."""
    torch.manual_seed(0)
    backbone = common.build_backbone("resnet10", 16)[0]
    dataset = common.IndexedDataset(common.SyntheticShapes("val", 12, image_size=16, num_classes=3),
                                    common.eval_transform(16))
    cpu = torch.device("cpu")
    plain, labels = common.extract_features(backbone, dataset, 5, 0, cpu)
    assert not common.uses_channels_last(backbone)
    backbone = common.prepare_eval_backbone(backbone, cpu, channels_last=True)
    assert common.uses_channels_last(backbone) and backbone.conv1.weight.is_contiguous(
        memory_format=torch.channels_last)
    fast, fast_labels = common.extract_features(backbone, dataset, 5, 0, cpu)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    assert torch.equal(labels, fast_labels)
