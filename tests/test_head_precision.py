"""The fast head gives the same results. The exact search (search_dtype None / float32)
goes through a bfloat16 prefilter with float32 rescoring where bf16 matmuls are fast (common.knn_search);
its neighbours and loss must equal a float64 brute force (up to exact ties) on either path."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import train_msf


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(params=["bf16-prefilter", "float32-matmul"])
def search_path(request, monkeypatch):
    """Run a test on both exact paths, whatever this CPU's bf16 speed."""
    fast = request.param == "bf16-prefilter"
    monkeypatch.setattr(common, "_bf16_matmul_is_fast", lambda device_type: fast)
    return request.param


def count_float32_rescans(monkeypatch):
    """Rows searched again in float32 by the prefilter (the rows its bound could not certify)."""
    rows = []
    original = common._chunked_topk

    def counting(queries, keys, k, chunk_size, query_labels, key_labels, dtype):
        if dtype == torch.float32:
            rows.append(queries.shape[0])
        return original(queries, keys, k, chunk_size, query_labels, key_labels, dtype)

    monkeypatch.setattr(common, "_chunked_topk", counting)
    return rows


def assert_same_as_float64(queries, keys, k, sims, idx, valid, tie_tol=1e-6):
    """Scores within 1e-5 of float64; chosen sets equal the float64 top-k except where a swapped key
    ties (within float32 rounding) with the k-th float64 score."""
    exact = queries.double() @ keys.double().T
    ref_sims, ref_idx = exact.topk(k, dim=1)
    assert valid.all()
    torch.testing.assert_close(sims.double(), ref_sims, atol=1e-5, rtol=0)
    for i in range(queries.shape[0]):
        ours, ref = set(idx[i].tolist()), set(ref_idx[i].tolist())
        for key in ours ^ ref:  # only ties may differ
            assert abs(exact[i, key] - ref_sims[i, -1]) <= tie_tol, (i, key)


def test_msf_loss_equals_float64_reference(search_path):
    B, M, d, k = 32, 3000, 64, 5
    bank = common.MemoryBank(M, d, seed=0)
    bank.enqueue(unit(1000, d, seed=1))
    q, t = unit(B, d, seed=2), unit(B, d, seed=3)
    bank.enqueue(t)  # as in training: t first, so it is its own nearest neighbour
    loss, slots = train_msf.msf_loss(q, t, bank, k)

    bank64 = bank.embeddings.double()
    nearest = (t.double() @ bank64.T).topk(k, dim=1).indices
    expected = (2 - 2 * torch.einsum("bd,bkd->bk", q.double(), bank64[nearest])).mean(dim=1)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=0)
    assert all(set(slots[i].tolist()) == set(nearest[i].tolist()) for i in range(B))


@pytest.mark.parametrize("k", [1, 5, 20])
def test_exact_search_equals_float64_on_both_paths(search_path, k):
    queries, keys = unit(40, 128, seed=4), unit(5000, 128, seed=5)
    keys[:40] = queries  # each query's own row, as t in the bank
    sims, idx, valid = common.knn_search(queries, keys, k, chunk_size=1024)
    assert_same_as_float64(queries, keys, k, sims, idx, valid)
    assert torch.all(sims[:, :-1] >= sims[:, 1:])


def test_prefilter_and_float32_matmul_agree(monkeypatch):
    queries, keys = unit(64, 256, seed=6), unit(20000, 256, seed=7)
    labels, key_labels = torch.randint(-1, 50, (64,)), torch.randint(0, 50, (20000,))
    results = {}
    for fast in (True, False):
        monkeypatch.setattr(common, "_bf16_matmul_is_fast", lambda device_type, fast=fast: fast)
        results[fast] = (common.knn_search(queries, keys, 5),
                         common.knn_search(queries, keys, 5, query_labels=labels, key_labels=key_labels))
    for (fast_sims, fast_idx, fast_valid), (sims, idx, valid) in zip(results[True], results[False]):
        assert torch.equal(fast_idx, idx) and torch.equal(fast_valid, valid)  # no ties in continuous data
        torch.testing.assert_close(fast_sims, sims, atol=1e-6, rtol=0)


def test_prefilter_falls_back_to_float32_when_bf16_cannot_decide(monkeypatch):
    """100 keys whose scores differ by far less than bf16 resolves (all round to 0.5): the bf16 top-48
    is an arbitrary pick among them, the bound cannot certify it, and the row is searched again in
    float32, so it still comes out exact. (With the bound set to 0 this test fails.)"""
    monkeypatch.setattr(common, "_bf16_matmul_is_fast", lambda device_type: True)
    rescanned = count_float32_rescans(monkeypatch)
    d, gen = 16, torch.Generator().manual_seed(8)
    query = torch.zeros(1, d)
    query[0, 0] = 1.0  # exact in bf16: a key's bf16 score is its first coordinate rounded to bf16
    close = 0.5 + 1.5e-5 * torch.arange(1, 101, dtype=torch.float64)  # all in (0.5, 0.5 + 2^-9)
    filler = -torch.rand(300, generator=gen, dtype=torch.float64)  # far below
    first = torch.cat([close, filler])
    rest = F.normalize(torch.randn(400, d - 1, generator=gen, dtype=torch.float64), dim=1)
    keys = torch.cat([first.unsqueeze(1), (1 - first ** 2).sqrt().unsqueeze(1) * rest], dim=1).float()
    keys = keys[torch.randperm(400, generator=gen)]
    assert torch.all((query.bfloat16() @ keys.bfloat16().T)[0].topk(100).values == 0.5)
    sims, idx, valid = common.knn_search(query, keys, 5, chunk_size=64)
    assert rescanned == [1]
    best = (query.double() @ keys.double().T).topk(5)
    assert idx[0].tolist() == best.indices[0].tolist() and valid.all()
    torch.testing.assert_close(sims.double(), best.values, atol=1e-6, rtol=0)


def test_prefilter_bound_scales_with_norms(monkeypatch):
    """Unnormalised queries and keys (eval features, a bank of raw vectors): still the exact top-k."""
    monkeypatch.setattr(common, "_bf16_matmul_is_fast", lambda device_type: True)
    gen = torch.Generator().manual_seed(11)
    queries = torch.randn(16, 48, generator=gen) * 7
    keys = torch.randn(3000, 48, generator=gen) * torch.rand(3000, 1, generator=gen) * 30
    sims, idx, valid = common.knn_search(queries, keys, 5, chunk_size=500)
    exact = queries.double() @ keys.double().T
    torch.testing.assert_close(sims.double(), exact.topk(5, dim=1).values, atol=1e-3, rtol=1e-5)
    assert torch.equal(idx, exact.topk(5, dim=1).indices)


def test_exact_ties_may_pick_either_copy_with_the_same_loss(search_path):
    """A bank holding identical copies (an image enqueued twice with the same embedding): which copy is
    chosen is arbitrary, the loss is the same."""
    B, d, k = 8, 32, 3
    t, q = unit(B, d, seed=12), unit(B, d, seed=13)
    bank = common.MemoryBank(600, d, seed=14)
    bank.enqueue(torch.cat([t, t, t]))  # three copies of every target
    loss, slots = train_msf.msf_loss(q, t, bank, k)
    torch.testing.assert_close(loss.double(), (2 - 2 * (q.double() * t.double()).sum(1)), atol=1e-5, rtol=0)
    for i in range(B):
        assert torch.allclose(bank.embeddings[slots[i]], t[i].expand(k, d))


def test_label_constrained_prefilter_matches_brute_force(search_path):
    queries, keys = unit(24, 64, seed=15), unit(4000, 64, seed=16)
    query_labels = torch.tensor([0, 1, 2, -1] * 6)
    key_labels = torch.randint(0, 3, (4000,), generator=torch.Generator().manual_seed(17))
    key_labels[:30] = 1  # label 3 has no key at all: those rows stay invalid
    query_labels[5] = 3
    sims, idx, valid = common.knn_search(queries, keys, 5, query_labels=query_labels, key_labels=key_labels)
    exact = queries.double() @ keys.double().T
    for i, label in enumerate(query_labels.tolist()):
        allowed = torch.ones(4000, dtype=torch.bool) if label < 0 else key_labels == label
        if not allowed.any():
            assert not valid[i].any() and torch.all(sims[i] == -math.inf) and torch.all(idx[i] == 0)
            continue
        ref = exact[i].masked_fill(~allowed, -math.inf).topk(5)
        assert idx[i].tolist() == ref.indices.tolist()
        torch.testing.assert_close(sims[i].double(), ref.values, atol=1e-5, rtol=0)
