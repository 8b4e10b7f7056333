"""CMSF-KM clustering time per epoch: the old k-means (sequential greedy k-means++, float32
Lloyd) against train_cmsf_self.spherical_kmeans, measured here, plus an ESTIMATE for GPUs at
ImageNet scale.

  python tests/bench_kmeans.py [--points 65536 --dim 128 --clusters 2048 --device cpu]

The estimate counts FLOPs and bytes of each phase at ImageNet scale (1.28M images x 512-d,
ResNet-50's projection, into 50,000 clusters, 20 Lloyd rounds) and divides by a fraction of the
GPU's peak (EFFICIENCY); it is arithmetic, not a measurement.
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import train_cmsf_self as cmsf  # noqa: E402
from kmeans_reference import blobs, inertia, reference_spherical_kmeans  # noqa: E402

# Peak dense throughput (TFLOP/s: bf16 tensor core, float32 without TF32, float64 tensor core) and
# memory bandwidth (TB/s), from the vendors' data sheets (SXM parts).
GPUS = {"H100 SXM": dict(bf16=989, fp32=67, fp64=67, bandwidth=3.35),
        "A100 SXM 80GB": dict(bf16=312, fp32=19.5, fp64=19.5, bandwidth=2.04)}
EFFICIENCY = dict(flops=0.6, bandwidth=0.7)  # assumed fraction of peak reached
LAUNCH_SECONDS, SYNC_SECONDS = 5e-6, 20e-6  # one kernel launch; one host round trip


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device):
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def estimate(gpu, n, dim, k, iters, sample_per_cluster=16, recheck_fraction=0.01):
    """Seconds (old seeding, old Lloyd, new seeding, new Lloyd) on `gpu`, from FLOP and byte
    counts."""
    spec = GPUS[gpu]

    def flops(count, kind):
        return count / (spec[kind] * 1e12 * EFFICIENCY["flops"])

    def moved(count):
        return count / (spec["bandwidth"] * 1e12 * EFFICIENCY["bandwidth"])

    sample, trials = min(n, sample_per_cluster * k), 2 + int(math.log(k))
    # old seeding: k sequential steps; each reads the float32 sample for a (sample x trials) matmul,
    # runs a float64 cumsum / minimum / sum over sample x trials, ~15 launches and 2 host syncs
    old_step = (moved(sample * dim * 4 + sample * trials * 8 * 4 + sample * 8 * 3)
                + 15 * LAUNCH_SECONDS + 2 * SYNC_SECONDS)
    old_seed = k * old_step
    # old Lloyd round: float32 (n x k x d) matmul, float32 scores written and read by argmax
    old_round = flops(2 * n * k * dim, "fp32") + moved(n * k * 4 * 2 + n * dim * 4 * 2)
    # new seeding: ~D ln(k / 2D) + 2D rounds (D = SEED_BATCH_DIVISOR); over all rounds
    # sample x k x trials candidate distances
    # (bf16 matmul, then ~6 float32 passes: write, 2 - 2x, clamp, minus, clamp, sum)
    divisor = cmsf.SEED_BATCH_DIVISOR
    rounds = divisor * math.log(max(k / (2 * divisor), 1)) + 2 * divisor
    new_seed = (flops(2 * sample * k * trials * dim, "bf16") + moved(sample * k * trials * 4 * 6)
                + flops(2 * sample * k * dim, "fp32") + moved(sample * k * 4 * 2)
                + rounds * 40 * LAUNCH_SECONDS)
    # new Lloyd round: bf16 matmul, bf16 scores written then read by top-2 (counted as 3 passes),
    # centroids re-read per chunk, fixed-point sums (read points, write and atomically add int64),
    # float64 re-check of the rows with a near-tie (assumed 1 %), two host syncs
    chunks = math.ceil(n / ((1 << 27) // k))
    new_round = (flops(2 * n * k * dim, "bf16") + moved(n * k * 2 * 3 + chunks * k * dim * 2)
                 + moved(n * dim * (2 + 8 + 8)) + flops(2 * recheck_fraction * n * k * dim, "fp64")
                 + 2 * SYNC_SECONDS)
    return old_seed, iters * old_round, new_seed, iters * new_round


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-old", action="store_true", help="time only the new implementation")
    args = parser.parse_args()
    device = torch.device(args.device)
    points = blobs(args.points, args.dim, 2 * args.clusters, seed=0).to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} threads, bf16 matmul fast: " \
        f"{cmsf.bf16_matmul_is_fast('cpu')}"
    print(f"measured: {args.points} x {args.dim} into {args.clusters} clusters, {args.iters} Lloyd "
          f"rounds at most, on {where}")
    generator = torch.Generator(device=device).manual_seed(0)
    _, seed_seconds = timed(lambda: cmsf._kmeans_seed(points, args.clusters, generator), device)
    (_, new_centroids), new_seconds = timed(
        lambda: cmsf.spherical_kmeans(points, args.clusters, args.iters, seed=0), device)
    rows = [("new (batched greedy k-means++, certified low-precision Lloyd)", new_seconds,
             inertia(points, new_centroids), f"seeding {seed_seconds:.1f} s")]
    if not args.skip_old:
        (_, old_centroids), old_seconds = timed(
            lambda: reference_spherical_kmeans(points, args.clusters, args.iters, seed=0), device)
        rows.insert(0, ("old (sequential greedy k-means++, float32 Lloyd)", old_seconds,
                        inertia(points, old_centroids), ""))
    print("| implementation | seconds per epoch | inertia (sum of 1 - cos) | note |")
    print("|---|---|---|---|")
    for name, seconds, value, note in rows:
        print(f"| {name} | {seconds:.1f} | {value:.1f} | {note} |")

    n, dim, k = 1_281_167, common.build_encoder("resnet50", 224).embed_dim, 50_000
    print(f"\nESTIMATE (arithmetic from FLOP and byte counts, not measured): ImageNet {n} x {dim} "
          f"into {k} clusters, {args.iters} Lloyd rounds, one GPU, at {EFFICIENCY['flops']:.0%} of "
          f"peak FLOP/s and {EFFICIENCY['bandwidth']:.0%} of peak bandwidth")
    print("| GPU | old seeding s | old Lloyd s | old total s | new seeding s | new Lloyd s "
          "| new total s |")
    print("|---|---|---|---|---|---|---|")
    for gpu in GPUS:
        old_seed, old_lloyd, new_seed, new_lloyd = estimate(gpu, n, dim, k, args.iters)
        print(f"| {gpu} | {old_seed:.0f} | {old_lloyd:.0f} | {old_seed + old_lloyd:.0f} "
              f"| {new_seed:.1f} | {new_lloyd:.1f} | {new_seed + new_lloyd:.1f} |")
    print("With R ranks the new Lloyd rounds divide by R (each assigns n / R points); "
          "seeding does not.")


if __name__ == "__main__":
    main()
