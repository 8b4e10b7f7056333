"""The head's exact search (common.knn_search, search_dtype None / float32): its neighbours and the
loss equal a float64 brute force (up to exact ties)."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import train_msf


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


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


def test_msf_loss_equals_float64_reference():
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
def test_exact_search_equals_float64(k):
    queries, keys = unit(40, 128, seed=4), unit(5000, 128, seed=5)
    keys[:40] = queries  # each query's own row, as t in the bank
    sims, idx, valid = common.knn_search(queries, keys, k, chunk_size=1024)
    assert_same_as_float64(queries, keys, k, sims, idx, valid)
    assert torch.all(sims[:, :-1] >= sims[:, 1:])


def test_exact_ties_may_pick_either_copy_with_the_same_loss():
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


def test_label_constrained_search_matches_brute_force():
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
