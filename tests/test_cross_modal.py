"""The cross-modal constraint of train_cmsf_self.py: reading the --constraint-embeddings file, the
constraint against a float64 brute force, and tools/write_embeddings.py on tiny data."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import common
import train_cmsf_self as cmsf
from conftest import REPO_ROOT, run_script


def unit(*shape, generator):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def top(scores, candidates, n):
    """The n candidates of largest score, as a set (float64 scores, random data: no ties)."""
    return set(sorted(candidates, key=lambda c: -scores[c])[:n])


# ---------------------------------------------------------------- the file

def test_read_matches_names_in_any_order(tmp_path):
    """Rows come back in dataset order, L2-normalised; names missing from the file have no
    embedding (plain MSF), names not in the dataset are ignored, './a/b' matches 'a/b'."""
    generator = torch.Generator().manual_seed(0)
    dataset_paths = [f"class_{i % 3}/img_{i}.jpg" for i in range(10)]
    in_file = [7, 2, 9, 0, 4, 5, 1]  # images 3, 6 and 8 are missing
    names = [("./" if i == 2 else "") + dataset_paths[i] for i in in_file] + ["class_9/other.jpg"]
    embeddings = 3 * torch.randn(len(names), 5, generator=generator, dtype=torch.float64)
    torch.save({"paths": names, "embeddings": embeddings.half()}, tmp_path / "other.pth")

    result, has_embedding = cmsf.read_other_modality_embeddings(str(tmp_path / "other.pth"),
                                                                dataset_paths)
    assert result.shape == (10, 5) and result.dtype == torch.float32
    assert has_embedding.tolist() == [i in in_file for i in range(10)]
    for row, image in enumerate(in_file):
        expected = F.normalize(embeddings[row].half().double(), dim=0)
        torch.testing.assert_close(result[image].double(), expected, rtol=0, atol=1e-6)
    assert torch.all(result[~has_embedding] == 0)
    half, _ = cmsf.read_other_modality_embeddings(str(tmp_path / "other.pth"), dataset_paths,
                                                  dtype=torch.float16)
    assert half.dtype == torch.float16


@pytest.mark.parametrize("contents,fragment", [
    (None, "no such file"),
    (b"not a torch file", "cannot be read"),
    ([1, 2], "must hold a dict"),
    ({"paths": ["a"]}, "must hold a dict"),
    ({"paths": "a", "embeddings": torch.ones(1, 2)}, "list of strings"),
    ({"paths": ["a", "b"], "embeddings": torch.ones(3, 2)}, "2 x D"),
    ({"paths": ["a"], "embeddings": torch.ones(1, 2, dtype=torch.long)}, "floating tensor"),
    ({"paths": ["a", "a"], "embeddings": torch.ones(2, 2)}, "twice"),
    ({"paths": ["a", "b"], "embeddings": torch.tensor([[1.0, 0.0], [float("nan"), 1.0]])},
     "non-finite or zero (first: b)"),
    ({"paths": ["a", "b"], "embeddings": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}, "zero"),
    ({"paths": ["x/1.jpg"], "embeddings": torch.ones(1, 2)}, "none of its 1 paths"),
])
def test_bad_files_are_one_line_usage_errors(tmp_path, contents, fragment):
    path = tmp_path / "other.pth"
    if isinstance(contents, bytes):
        path.write_bytes(contents)
    elif contents is not None:
        torch.save(contents, path)
    with pytest.raises(common.UsageError, match="--constraint-embeddings") as error:
        cmsf.read_other_modality_embeddings(str(path), ["a", "b", "c"])
    assert fragment in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- the constraint

def test_cross_modal_constraint_matches_brute_force():
    """C = top-k' of the image's other embedding among the other embeddings of the bank's images
    (empty slots and images without one excluded), constrained = top-min(k, k') of C by t.
    Then complete_constrained gives rows without an embedding their plain neighbours."""
    generator = torch.Generator().manual_seed(1)
    num_images, bank_size, dim, other_dim, batch = 60, 40, 8, 5, 6
    other = unit(num_images, other_dim, generator=generator)
    has_embedding = torch.rand(num_images, generator=generator) < 0.7
    other[~has_embedding] = 0
    for k, k_prime in [(3, 6), (5, 5), (4, 2)]:
        memory_bank = common.MemoryBank(bank_size, dim, seed=2)
        memory_bank.embeddings.copy_(unit(bank_size, dim, generator=generator))
        memory_bank.indices.copy_(torch.randperm(num_images, generator=generator)[:bank_size])
        memory_bank.indices[:5] = -1  # empty slots
        indices = memory_bank.indices[5:5 + batch].clone()  # in the bank, as after the enqueue
        noise = 0.1 * unit(batch, dim, generator=generator)
        target = F.normalize(memory_bank.embeddings[5:5 + batch].double() + noise, dim=1)

        found = cmsf.cross_modal_constraint(target.float(), indices, memory_bank, other.float(),
                                            has_embedding, k, k_prime)
        candidates, candidates_valid, constrained, constrained_valid = found
        assert candidates.shape == (batch, k_prime)
        assert constrained.shape == (batch, min(k, k_prime))
        allowed = [s for s in range(bank_size)
                   if memory_bank.indices[s] >= 0 and has_embedding[memory_bank.indices[s]]]
        slot_other = other[memory_bank.indices.clamp(min=0)]
        for i in range(batch):
            if not has_embedding[indices[i]]:
                continue
            ref_candidates = top(slot_other @ other[indices[i]], allowed, k_prime)
            ref_constrained = top(memory_bank.embeddings.double() @ target[i], ref_candidates,
                                  min(k, k_prime))
            assert candidates_valid[i].all() and constrained_valid[i].all()
            assert set(candidates[i].tolist()) == ref_candidates
            assert set(constrained[i].tolist()) == ref_constrained
            assert 5 + i in ref_candidates  # the image itself (same other embedding) is in C

        constrained_rows = has_embedding[indices]
        assert constrained_rows.any() and not constrained_rows.all()
        _, unconstrained, _ = common.knn_search(target.float(), memory_bank.embeddings, k)
        slots, valid = cmsf.complete_constrained(constrained, constrained_valid, constrained_rows,
                                                 unconstrained, k)
        assert slots.shape == (batch, k)
        assert torch.equal(slots[~constrained_rows], unconstrained[~constrained_rows])
        assert valid[~constrained_rows].all()


def test_slots_without_an_embedding_are_never_in_c():
    """Only 2 bank images have an embedding: C has 2 valid members, whatever k'."""
    generator = torch.Generator().manual_seed(3)
    memory_bank = common.MemoryBank(20, 8, seed=0)
    memory_bank.indices.copy_(torch.arange(20))
    memory_bank.indices[10:] = -1
    has_embedding = torch.zeros(30, dtype=torch.bool)
    has_embedding[[3, 7, 15, 25]] = True  # 15 and 25 are not in the bank
    other = unit(30, 4, generator=generator).float()
    target = unit(3, 8, generator=generator).float()
    candidates, candidates_valid, _, _ = cmsf.cross_modal_constraint(
        target, torch.tensor([3, 7, 15]), memory_bank, other, has_embedding, k=5, k_prime=5)
    assert candidates_valid.sum(1).tolist() == [2, 2, 2]
    for i in range(3):
        assert set(candidates[i][candidates_valid[i]].tolist()) == {3, 7}


# ---------------------------------------------------------------- tools/write_embeddings.py

@pytest.fixture
def backbone_file(tmp_path):
    torch.manual_seed(0)
    backbone, _ = common.build_backbone("resnet10", 16)
    path = tmp_path / "backbone_torchvision.pth"
    torch.save(common.torchvision_state_dict(backbone, "resnet10"), path)
    return str(path), backbone.eval()


def tool_args(weights, output, *extra):
    return ["--weights", weights, "--arch", "resnet10", "--image-size", "16", "--output", output,
            "--workers", "0", "--batch-size", "8", "--device", "cpu", *extra]


def test_write_embeddings_on_an_imagefolder(tmp_path, tiny_imagefolder, backbone_file):
    weights, backbone = backbone_file
    output = str(tmp_path / "other.pth")
    result = run_script("tools/write_embeddings.py",
                        *tool_args(weights, output, "--data", tiny_imagefolder, "--dtype",
                                   "float32"))
    assert result.returncode == 0, result.stderr[-3000:]
    written = torch.load(output, weights_only=True)
    base, _ = common.build_dataset("imagefolder", tiny_imagefolder, "train")
    assert written["paths"] == [f"class_{c}/img_{i}.jpg" for c in range(3) for i in range(8)]
    assert written["paths"] == common.dataset_relative_paths(base)
    transform = common.eval_transform(16)
    images = torch.stack([transform(base[i][0]) for i in range(len(base))])
    with torch.no_grad():
        expected = F.normalize(backbone(images), dim=1)
    torch.testing.assert_close(written["embeddings"], expected, rtol=0, atol=1e-5)
    embeddings, has_embedding = cmsf.read_other_modality_embeddings(
        output, common.dataset_relative_paths(base))
    assert has_embedding.all()
    torch.testing.assert_close(embeddings, expected, rtol=0, atol=1e-5)


def test_write_embeddings_on_synthetic_data_and_bad_weights(tmp_path, backbone_file):
    weights, _ = backbone_file
    output = str(tmp_path / "synthetic.pth")
    result = run_script("tools/write_embeddings.py",
                        *tool_args(weights, output, "--dataset", "synthetic", "--synthetic-images",
                                   "6"))
    assert result.returncode == 0, result.stderr[-3000:]
    written = torch.load(output, weights_only=True)
    assert written["paths"] == ["0", "1", "2", "3", "4", "5"]
    assert written["embeddings"].dtype == torch.float16 and written["embeddings"].shape == (6, 512)
    torch.testing.assert_close(written["embeddings"].float().norm(dim=1), torch.ones(6), rtol=0,
                               atol=1e-3)
    # bad input: one UsageError line (run_main turns it into exit code 2), nothing written
    spec = importlib.util.spec_from_file_location(
        "write_embeddings", os.path.join(REPO_ROOT, "tools", "write_embeddings.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for weights_path, output_path, fragment in [
            (str(tmp_path / "missing.pth"), str(tmp_path / "never.pth"), "does not exist"),
            (weights, str(tmp_path / "no_folder" / "never.pth"), "create it first")]:
        argv = tool_args(weights_path, output_path, "--dataset", "synthetic",
                         "--synthetic-images", "6")
        with pytest.raises(common.UsageError, match=fragment):
            tool.main(tool.get_args_parser().parse_args(argv))
        assert not os.path.exists(output_path)


def _embeddings_file(path, labels, informative, seed=0):
    """{"paths": dataset index names, "embeddings"}: one-hot class + noise, or pure noise."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), 16, generator=generator)
    embeddings = noise * 0.3 + (torch.nn.functional.one_hot(labels, 16).float() * 3 if informative else 0)
    torch.save({"paths": [str(i) for i in range(len(labels))], "embeddings": embeddings}, path)
    return str(path)


@pytest.mark.parametrize("informative", [True, False])
def test_script_with_cross_modal_constraint(tmp_path, informative):
    """A short synthetic run: neighbours constrained by a class-encoding other modality are much purer
    than the plain ones; with an embedding that encodes nothing they are not."""
    import json
    import signal
    import train_cmsf_self
    base, _ = common.build_dataset("synthetic", None, "train", image_size=16, synthetic_images=96)
    labels = common.dataset_targets(base)
    path = _embeddings_file(tmp_path / "other.pt", labels, informative)
    out = tmp_path / "out"
    argv = ["--dataset", "synthetic", "--synthetic-images", "96", "--arch", "resnet10", "--image-size", "16",
            "--batch-size", "16", "--mem-bank-size", "96", "--workers", "0", "--print-freq", "2",
            "--epochs", "2", "--knn-every", "0", "--topk", "3", "--topk-prime", "5",
            "--constraint", "embeddings", "--constraint-embeddings", path, "--output-dir", str(out)]
    try:
        train_cmsf_self.main(train_cmsf_self.get_args_parser().parse_args(argv))
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    last = log[-1]
    assert last["msf_fallback"] == 0.0  # every image has an embedding
    # the posters' diagnostics, one group per epoch: plain and constrained purity at k, rank histogram
    assert set(last["purity_at_k"]) == {"1", "5", "10", "20", "50"}
    assert set(last["purity_constrained_at_k"]) == {"1"}  # the k = 3 constrained neighbours: k <= 3
    assert abs(sum(last["rank_histogram"].values()) - 1) < 1e-6 and 1 <= last["constraint_set_size"] <= 5
    if informative:
        assert last["purity_constrained"] > last["purity_unconstrained"] + 0.3, last
        assert last["purity_constrained"] > 0.9
    else:
        assert last["purity_constrained"] < last["purity_unconstrained"] + 0.15, last
