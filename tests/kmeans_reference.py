"""The k-means of train_cmsf_self.py before it was made fast on GPUs, kept (only re-wrapped) as the
reference for cluster quality (tests/test_kmeans.py) and speed (tests/bench_kmeans.py): sequential
greedy k-means++ seeding (one step per cluster, two host synchronisations each) and float32 Lloyd
rounds."""
import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def reference_spherical_kmeans(points, num_clusters, iters=20, seed=0, chunk_size=None):
    points = points.float()
    n = points.shape[0]
    num_clusters = min(num_clusters, n)
    chunk_size = chunk_size or max(1, (1 << 27) // num_clusters)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)[:min(n, 16 * num_clusters)]
    sample = points[order.to(points.device)]
    num_candidates = 2 + int(math.log(num_clusters))
    uniforms = torch.rand(num_clusters, num_candidates, generator=generator,
                          dtype=torch.float64).to(points.device)
    chosen = torch.empty(num_clusters, dtype=torch.long, device=points.device)
    chosen[0] = (uniforms[0, 0] * sample.shape[0]).long().clamp(max=sample.shape[0] - 1)
    nearest_dist = (2 - 2 * sample @ sample[chosen[0]]).clamp(min=0).double()
    for c in range(1, num_clusters):
        cumulative = nearest_dist.cumsum(0)
        candidates = torch.searchsorted(cumulative, uniforms[c] * cumulative[-1], right=True)
        candidates = candidates.clamp(max=sample.shape[0] - 1)
        dists = torch.minimum(nearest_dist.unsqueeze(1),
                              (2 - 2 * sample @ sample[candidates].T).clamp(min=0).double())
        best = dists.sum(0).argmin()
        chosen[c] = candidates[best]
        nearest_dist = dists[:, best]
    centroids = sample[chosen].clone()

    assignments = torch.full((n,), -1, dtype=torch.long, device=points.device)
    for _ in range(iters):
        new_assignments = torch.cat([(chunk @ centroids.T).argmax(dim=1)
                                     for chunk in points.split(chunk_size)])
        sums = torch.zeros_like(centroids).index_add_(0, new_assignments, points)
        non_empty = sums.norm(dim=1) > 0
        centroids = torch.where(non_empty.unsqueeze(1), F.normalize(sums, dim=1), centroids)
        converged = torch.equal(new_assignments, assignments)
        assignments = new_assignments
        if converged:
            break
    return assignments, centroids


def blobs(n, dim, num_blobs, seed):
    """Unit vectors around `num_blobs` random directions with spreads from tight to loose: a test
    set where seeding matters (float32)."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_blobs, dim, generator=generator), dim=1)
    spread = 0.1 + 0.5 * torch.rand(num_blobs, 1, generator=generator)
    which = torch.randint(num_blobs, (n,), generator=generator)
    noise = torch.randn(n, dim, generator=generator) / dim ** 0.5
    return F.normalize(centres[which] + spread[which] * noise, dim=1)


def inertia(points, centroids):
    """Sum over points of 1 - cos to the nearest centroid (half the k-means objective 2 - 2 cos)."""
    return float((1 - (points.double() @ centroids.double().T).amax(dim=1)).sum())
