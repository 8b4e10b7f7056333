"""CMSF-KM's spherical k-means, made fast on GPUs: the same cluster quality as the sequential
greedy k-means++ it replaced, exact assignments from reduced-precision scores, no per-cluster host
synchronisation in the seeding, and a result split over ranks identical to the one-process one."""
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import common
import train_cmsf_self as cmsf
from conftest import REPO_ROOT, free_port
from host_syncs import host_syncs
from kmeans_reference import blobs, inertia, reference_spherical_kmeans


@pytest.fixture(params=["float32", "bf16"])
def assignment_precision(request, monkeypatch):
    """Run on the float32 path and on the bf16 path a GPU takes (slow but correct on a CPU)."""
    monkeypatch.setattr(cmsf, "bf16_matmul_is_fast", lambda device_type: request.param == "bf16")
    return request.param


@pytest.mark.parametrize("n, dim, num_blobs, k", [(4000, 32, 40, 50), (4000, 32, 200, 100),
                                                   (8000, 64, 1000, 256)])
def test_inertia_matches_the_sequential_implementation(n, dim, num_blobs, k):
    """Over 3 seeds, the total inertia is within 1 % of the old sequential greedy k-means++ one
    (measured: -0.8 % to +0.6 % per run)."""
    ours, reference = 0.0, 0.0
    for seed in range(3):
        points = blobs(n, dim, num_blobs, seed)
        ours += inertia(points, cmsf.spherical_kmeans(points, k, 20, seed)[1])
        reference += inertia(points, reference_spherical_kmeans(points, k, 20, seed)[1])
    assert ours <= 1.01 * reference, (ours, reference)


def test_recovers_separated_clusters_on_both_precisions(assignment_precision):
    generator = torch.Generator().manual_seed(5)
    centres = F.normalize(torch.randn(12, 24, generator=generator, dtype=torch.float64), dim=1)
    truth = torch.arange(12).repeat_interleave(25)
    points = F.normalize(centres[truth] + 0.03 * torch.randn(300, 24, generator=generator,
                                                            dtype=torch.float64), dim=1)
    for seed in range(3):
        assignments, centroids = cmsf.spherical_kmeans(points.float(), 12, iters=20, seed=seed)
        assert len(set(zip(truth.tolist(), assignments.tolist()))) == 12  # a bijection of clusters
        for t in range(12):
            reference = F.normalize(points[truth == t].mean(0), dim=0)
            cluster = assignments[truth == t][0]
            assert torch.allclose(centroids[cluster].double(), reference, atol=1e-6)


def test_assignment_is_the_float64_argmax_despite_near_ties(assignment_precision):
    """Centroids in near-tied pairs (2e-4 apart: far below bf16 resolution): every point still goes
    to the float64 argmax, because the rows bf16 cannot decide are recomputed in float64."""
    generator = torch.Generator().manual_seed(6)
    base = F.normalize(torch.randn(20, 48, generator=generator, dtype=torch.float64), dim=1)
    noise = torch.randn(20, 48, generator=generator, dtype=torch.float64)
    twins = F.normalize(base + 2e-4 * noise, dim=1)
    centroids = torch.cat([base, twins]).float()
    noise = torch.randn(2000, 48, generator=generator, dtype=torch.float64)
    nearest_base = base[torch.randint(20, (2000,), generator=generator)]
    points = F.normalize(nearest_base + 0.05 * noise, dim=1)
    points = points.float()
    assignments = cmsf._assign_to_centroids(points, centroids, chunk_size=300)
    exact = (points.double() @ centroids.double().T).argmax(dim=1)
    assert torch.equal(assignments, exact)
    if assignment_precision == "bf16":  # the check matters: plain bf16 gets many of them wrong
        plain = (points.bfloat16() @ centroids.bfloat16().T).argmax(dim=1)
        assert (plain != exact).sum() > 100


def test_seeding_has_no_per_cluster_host_sync_and_kmeans_one_per_round():
    points = blobs(3000, 16, 100, 7)
    generator = torch.Generator().manual_seed(0)
    with host_syncs() as syncs:
        cmsf._kmeans_seed(points, 300, generator)
    assert syncs == []
    with host_syncs() as syncs:
        assignments, _ = cmsf.spherical_kmeans(points, 300, iters=5, seed=0)
    # per Lloyd round: the rows to re-check in float64 (nonzero) and "did anything change" (item)
    assert len(syncs) == 2 * 5, syncs


def test_cluster_store_passes_the_seed_and_epoch():
    points = blobs(500, 16, 10, 8)
    store = cmsf.PreviousVisitStore(600, 16)
    store.record(torch.arange(100, 600), points)
    clusters = cmsf.cluster_store(store, 10, iters=10, seed=3, epoch=4)
    expected, _ = cmsf.spherical_kmeans(points, 10, 10, seed=3 * 1_000_003 + 4)
    assert torch.all(clusters[:100] == -1) and torch.equal(clusters[100:], expected)


# ---------------------------------------------------------------- split over ranks

def _sharded_worker(rank, port, out_dir, points):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    sys.path.insert(0, REPO_ROOT)
    torch.set_num_threads(1)
    common.init_distributed("cpu")
    calls = []
    original = cmsf._assign_to_centroids

    def recording(shard, centroids, chunk_size):
        calls.append(shard.shape[0])
        return original(shard, centroids, chunk_size)

    cmsf._assign_to_centroids = recording
    assignments, centroids = cmsf.spherical_kmeans(points, 40, iters=20, seed=9)
    torch.save((assignments, centroids, calls), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_ranks_give_the_one_process_result(tmp_path):
    points = blobs(1001, 16, 60, 9)  # odd: the shards differ in size
    mp.spawn(_sharded_worker, args=(free_port(), str(tmp_path), points), nprocs=2)
    one_assignments, one_centroids = cmsf.spherical_kmeans(points, 40, iters=20, seed=9)
    for rank in range(2):
        assignments, centroids, calls = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(assignments, one_assignments) and torch.equal(centroids, one_centroids)
        assert set(calls) == {500 + rank}  # each rank assigned only its half
