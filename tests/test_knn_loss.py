"""MSF: nearest-neighbour search, the mean-shift loss and purity, against float64 brute force."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
import train_msf


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def brute_force_knn(queries, keys, k, query_labels=None, key_labels=None):
    """float64, one query at a time: (sorted similarities, set of indices) of the allowed top-k."""
    q, keys64 = queries.double(), keys.double()
    result = []
    for i in range(q.shape[0]):
        allowed = torch.ones(keys.shape[0], dtype=torch.bool)
        if query_labels is not None and query_labels[i] >= 0:
            allowed = key_labels == query_labels[i]
        candidates = allowed.nonzero().flatten()
        sims = keys64[candidates] @ q[i]
        order = sims.argsort(descending=True)[:k]
        result.append((sims[order], set(candidates[order].tolist())))
    return result


def assert_matches_brute_force(sims, idx, valid, reference, k):
    for i, (ref_sims, ref_idx) in enumerate(reference):
        n = len(ref_idx)
        assert valid[i].tolist() == [True] * n + [False] * (k - n)
        torch.testing.assert_close(sims[i, :n].double(), ref_sims, atol=1e-5, rtol=0)
        assert set(idx[i, :n].tolist()) == ref_idx
        assert torch.all(sims[i, n:] == -math.inf) and torch.all(idx[i, n:] == 0)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 50, 64, 97, 1000])
def test_chunked_search_equals_unchunked_and_brute_force(chunk_size):
    queries, keys, k = unit(9, 16, seed=0), unit(97, 16, seed=1), 5
    sims, idx, valid = common.knn_search(queries, keys, k, chunk_size=chunk_size)
    full_sims, full_idx, _ = common.knn_search(queries, keys, k, chunk_size=10 ** 6)
    assert sims.shape == idx.shape == valid.shape == (9, k) and valid.all()
    torch.testing.assert_close(sims, full_sims, atol=1e-6, rtol=0)
    assert torch.equal(idx, full_idx)  # sorted by similarity, no ties with continuous data
    assert torch.all(sims[:, :-1] >= sims[:, 1:])
    assert_matches_brute_force(sims, idx, valid, brute_force_knn(queries, keys, k), k)


def test_search_uses_dot_product_not_distance_of_unnormalised_keys():
    # largest q.k is asked for; a long key wins even if its direction is a bit off
    queries = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [3.0, 1.0], [-1.0, 0.0]])
    sims, idx, _ = common.knn_search(queries, keys, 2)
    assert idx.tolist() == [[1, 0]] and sims.tolist() == [[3.0, 1.0]]


@pytest.mark.parametrize("chunk_size", [4, 13, 1000])
def test_label_constrained_search(chunk_size):
    k, num_keys = 4, 60
    queries, keys = unit(12, 8, seed=2), unit(num_keys, 8, seed=3)
    # label 0: many keys, label 1: only 2 keys (fewer than k), label 2: none, label 3: plenty
    key_labels = torch.tensor([0] * 30 + [1] * 2 + [3] * 28)[torch.randperm(num_keys, generator=torch.Generator().manual_seed(4))]
    query_labels = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2, 3, -1, -1, 0])
    sims, idx, valid = common.knn_search(queries, keys, k, chunk_size=chunk_size,
                                         query_labels=query_labels, key_labels=key_labels)
    reference = brute_force_knn(queries, keys, k, query_labels, key_labels)
    assert_matches_brute_force(sims, idx, valid, reference, k)
    for i, label in enumerate(query_labels.tolist()):
        if label >= 0:  # never another label
            assert torch.all(key_labels[idx[i][valid[i]]] == label)
    assert valid.sum(1).tolist() == [4, 2, 0, 4, 4, 4, 2, 0, 4, 4, 4, 4]
    # unconstrained rows are the plain search
    free = query_labels < 0
    plain_sims, plain_idx, _ = common.knn_search(queries[free], keys, k)
    assert torch.equal(idx[free], plain_idx)
    torch.testing.assert_close(sims[free], plain_sims, atol=1e-6, rtol=0)  # matmul shape: ulp differences


def test_half_precision_keys_and_bf16_search():
    queries, keys = unit(6, 32, seed=5), unit(200, 32, seed=6)
    sims, idx, _ = common.knn_search(queries, keys.half(), 3, chunk_size=64)
    reference = brute_force_knn(queries, keys.half().float(), 3)
    for i, (ref_sims, ref_idx) in enumerate(reference):
        assert set(idx[i].tolist()) == ref_idx
        torch.testing.assert_close(sims[i].double(), ref_sims, atol=1e-5, rtol=0)
    bf_sims, _, _ = common.knn_search(queries, keys, 3, search_dtype=torch.bfloat16)
    assert bf_sims.dtype == torch.float32
    torch.testing.assert_close(bf_sims.double(), torch.stack([r[0] for r in brute_force_knn(queries, keys, 3)]),
                               atol=2e-2, rtol=0)


def test_mean_shift_loss_against_float64():
    B, k, d = 10, 4, 16
    q, z = unit(B, d, seed=7), unit(B, k, d, seed=8)
    reference = torch.stack([torch.stack([2 - 2 * q[i].double() @ z[i, j].double() for j in range(k)]).mean()
                             for i in range(B)])
    torch.testing.assert_close(common.mean_shift_loss(q, z).double(), reference, atol=1e-6, rtol=0)

    valid = torch.rand(B, k, generator=torch.Generator().manual_seed(9)) < 0.6
    valid[0] = False  # no valid neighbour -> loss 0
    valid[1] = True
    expected = []
    for i in range(B):
        dists = [2 - 2 * q[i].double() @ z[i, j].double() for j in range(k) if valid[i, j]]
        expected.append(sum(dists) / len(dists) if dists else torch.tensor(0.0, dtype=torch.float64))
    loss = common.mean_shift_loss(q, z, valid)
    torch.testing.assert_close(loss.double(), torch.stack(expected), atol=1e-6, rtol=0)
    assert loss[0] == 0


def test_mean_shift_loss_gradient_flows_only_to_query():
    q = unit(3, 8, seed=10).requires_grad_()
    z = unit(3, 2, 8, seed=11)
    common.mean_shift_loss(q, z).sum().backward()
    # d/dq mean_j (2 - 2 q.z_j) = -2 mean_j z_j
    torch.testing.assert_close(q.grad, -2 * z.mean(1))


def test_purity_against_brute_force():
    gen = torch.Generator().manual_seed(12)
    labels = torch.randint(0, 3, (20,), generator=gen)
    neighbour_labels = torch.randint(-1, 3, (20, 5), generator=gen)
    valid = torch.rand(20, 5, generator=gen) < 0.7
    same = [[int(neighbour_labels[i, j] == labels[i]) for j in range(5)] for i in range(20)]
    assert common.purity(neighbour_labels, labels).item() == pytest.approx(sum(map(sum, same)) / 100)
    hits = sum(same[i][j] for i in range(20) for j in range(5) if valid[i, j])
    assert common.purity(neighbour_labels, labels, valid).item() == pytest.approx(hits / valid.sum().item())


def test_msf_loss_against_float64_brute_force():
    B, M, d, k = 6, 50, 16, 5
    bank = common.MemoryBank(M, d, seed=1)
    bank.enqueue(unit(30, d, seed=13), torch.arange(30) % 3, torch.arange(30))
    q, t = unit(B, d, seed=14), unit(B, d, seed=15)
    bank.enqueue(t, torch.arange(B) % 3, torch.arange(100, 100 + B))  # as in training: t enqueued first
    loss, slots = train_msf.msf_loss(q, t, bank, k)

    bank64 = bank.embeddings.double()
    for i in range(B):
        dists = 2 - 2 * bank64 @ t[i].double()
        nearest = dists.argsort()[:k]
        assert set(slots[i].tolist()) == set(nearest.tolist())
        assert bank.indices[nearest[0]] == 100 + i  # t is its own nearest neighbour
        expected = (2 - 2 * bank64[nearest] @ q[i].double()).mean()
        assert loss[i].item() == pytest.approx(expected.item(), abs=1e-6)
    # purity counts t itself, so it is at least 1/k
    per_sample = (bank.labels[slots] == (torch.arange(B) % 3).unsqueeze(1)).float().mean(1)
    assert torch.all(per_sample >= 1 / k)


def test_k1_msf_loss_is_byol_asymmetric():
    B, M, d = 8, 40, 16
    bank = common.MemoryBank(M, d, seed=2)
    bank.enqueue(unit(37, d, seed=16))
    q, t = unit(B, d, seed=17), unit(B, d, seed=18)
    bank.enqueue(t)
    loss, slots = train_msf.msf_loss(q, t, bank, 1)
    byol_asym = 2 - 2 * (q.double() * t.double()).sum(1)
    torch.testing.assert_close(loss.double(), byol_asym, atol=1e-6, rtol=0)
    expected_slots = (37 + torch.arange(B)) % M
    assert torch.equal(slots[:, 0], expected_slots)
