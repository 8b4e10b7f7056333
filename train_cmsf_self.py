"""CMSF: Constrained Mean Shift, self-supervised "2Q" variant (Tejankar, Koohpayegani & Pirsiavash,
2021).

MSF pulls the online prediction q towards the k nearest neighbours of the target t in a memory bank.
CMSF adds a second term whose neighbours are constrained to a set C found with a DIFFERENT view of
the same image: C = the k' nearest neighbours of t' (this image's target embedding from its previous
visit) among M' (the previous-visit embeddings of the images in the bank); the constrained
neighbours are the k members of C closest to t.  loss = (constrained MSF loss + unconstrained MSF
loss) / 2. Images without a previous visit (epoch 1) use plain MSF for both terms. `--constraint
kmeans` (CMSF-KM) instead clusters the per-image embeddings every epoch and constrains to the
sample's cluster.

Paper rows (ResNet-50, ImageNet, 200 epochs, batch 256, k = 5, k' = 5, M = 128K, BatchNorm over 64
images, float32; linear / 1-NN / 20-NN): `python train_cmsf_self.py --data /imagenet --amp none`
plus
  CMSF 2Q (128K)         73.0 / 63.2 / 66.4   (no more flags)
  CMSF-KM (128K)         72.9 / 63.2 / 66.2   --constraint kmeans
  CMSF 2Q + multi-crop   74.4 / 62.3 / 66.2   --local-crops-number 6
Cross-modal (the CMSF poster's "NNs in other modalities"; no table number): --constraint embeddings
--constraint-embeddings FILE, FILE from tools/write_embeddings.py or any {"paths", "embeddings"}
file. The multi-crop recipe is ours (upstream never released it): SwAV-style 2 x 224 (target +
query) plus 6 x 96 strong-augmented query crops with RandomResizedCrop scale (0.05, 0.2), all pulled
to the same neighbour sets. Multi-GPU: torchrun --nproc_per_node 8 train_cmsf_self.py ...
(--batch-size is global).
"""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common

SCRIPT = "train_cmsf_self.py"
# below the (0.2, 1) of the two large crops, as SwAV/DINO separate them
LOCAL_CROP_SCALE = (0.05, 0.2)


def get_args_parser():
    p = argparse.ArgumentParser("CMSF self-supervised", description=__doc__.split("\n")[0],
                                add_help=False)
    p.add_argument("--data", default=None,
                   help="dataset root (ImageFolder root with train/, or torchvision root)")
    p.add_argument("--dataset", default="imagefolder",
                   choices=["imagefolder", "cifar10", "cifar100", "stl10", "synthetic"],
                   help="dataset format")
    p.add_argument("--download", action="store_true", help="download cifar/stl10 if missing")
    p.add_argument("--synthetic-images", type=int, default=5000,
                   help="training images of --dataset synthetic")
    p.add_argument("--arch", default="resnet50",
                   help="torchvision ResNet (resnet18, resnet50, ...)")
    p.add_argument("--image-size", type=int, default=224,
                   help="crop size; <= 64 uses the small-image stem")
    p.add_argument("--epochs", type=int, default=200,
                   help="training epochs (cosine schedule over them)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="global batch size over all processes")
    p.add_argument("--lr", type=float, default=0.05,
                   help="learning rate for batch 256, scaled linearly")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--wd", type=float, default=1e-4, help="weight decay (all trainable parameters)")
    p.add_argument("--ema", type=float, default=0.99, help="target EMA momentum m (constant)")
    p.add_argument("--topk", type=int, default=5,
                   help="number of nearest neighbours k (both terms)")
    p.add_argument("--topk-prime", type=int, default=5,
                   help="2Q: size k' of the constraint set C (neighbours of t' in M')")
    p.add_argument("--constraint", default="2q", choices=["2q", "kmeans", "embeddings"],
                   help="2q: previous-visit neighbours (CMSF); kmeans: same k-means cluster "
                        "(CMSF-KM); embeddings: neighbours in another modality "
                        "(--constraint-embeddings)")
    p.add_argument("--constraint-embeddings", default=None,
                   help="embeddings: torch file {'paths': [...], 'embeddings': N x D} of every "
                        "training image in another modality or model (tools/write_embeddings.py "
                        "writes one)")
    p.add_argument("--num-clusters", type=int, default=50_000, help="kmeans: number of clusters")
    p.add_argument("--kmeans-iters", type=int, default=20,
                   help="kmeans: Lloyd iterations per epoch")
    p.add_argument("--mem-bank-size", type=int, default=128_000, help="memory bank size M")
    p.add_argument("--bank-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="storage precision of the memory bank (half halves its memory)")
    p.add_argument("--store-dtype", default="float16", choices=["float32", "float16", "bfloat16"],
                   help="storage precision of the previous-visit store and of M' (half halves "
                        "their memory)")
    p.add_argument("--search-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="precision of the neighbour-search matmul (the loss stays float32)")
    p.add_argument("--augmentation", default="weak/strong", choices=common.AUGMENTATIONS,
                   help="target/query augmentations")
    p.add_argument("--local-crops-number", type=int, default=0,
                   help="extra small strong-augmented query crops per image (multi-crop; the 74.4 "
                        "row uses 6)")
    p.add_argument("--local-crops-size", type=int, default=96,
                   help="side of the extra query crops (96 for 224 images; scale it with "
                        "--image-size)")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="mixed precision; None: bf16 on GPU, none on CPU")
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading processes per process; None: 8, at most the CPUs per process")
    p.add_argument("--augment-on", default="auto", choices=["auto", "loader", "device"],
                   help="where colour jitter, grayscale, blur and normalisation run: in the loader "
                        "workers per image, or batched on the training device (auto: device on "
                        "GPU)")
    p.add_argument("--bn-batch-size", type=int, default=64,
                   help="samples each BatchNorm normalises over, independent of the number of GPUs "
                        "(the papers: 64 = 256 on 4 GPUs); 0: the per-process batch")
    p.add_argument("--output-dir", default="./output/cmsf_self",
                   help="checkpoints, logs; resumes from here")
    p.add_argument("--resume", default=None,
                   help="checkpoint to resume from; None: <output-dir>/checkpoint.pth if it exists")
    p.add_argument("--save-every", type=int, default=10,
                   help="keep a weights-only copy every N epochs")
    p.add_argument("--checkpoint-minutes", type=float, default=30,
                   help="also save checkpoint.pth every N minutes within an epoch")
    p.add_argument("--stop-after-iters", type=int, default=0,
                   help="save a checkpoint and exit after this many iterations of this run (0: "
                        "never); for fixed time slots")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of initialisation, augmentations and order")
    p.add_argument("--print-freq", type=int, default=50, help="iterations between progress lines")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    common.add_monitor_args(p)
    return p


class PreviousVisitStore(torch.nn.Module):
    """For every dataset index, the target embedding of that image's most recent visit: N x d.

    A row of zeros means "not visited yet" (stored rows are unit vectors, never zero, even in half
    precision), so no separate flag array is needed and the store is exactly N x d, half of
    upstream's 2 x N x d float32 table in float32 and a quarter of it in float16/bfloat16."""

    def __init__(self, num_images, dim, dtype=torch.float32):
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(num_images, dim, dtype=dtype))

    @property
    def nbytes(self):
        return self.embeddings.nbytes

    def lookup(self, indices):
        """(previous-visit embeddings as float32 (B, d), visited (B,) bool) of the given images."""
        rows = self.embeddings[indices]
        return rows.float(), (rows != 0).any(dim=1)

    @torch.no_grad()
    def record(self, indices, embeddings):
        self.embeddings[indices] = embeddings.to(self.embeddings.dtype)


class ClusterAssignment(torch.nn.Module):
    """CMSF-KM: the k-means cluster of every dataset index (-1: not clustered yet), checkpointed."""

    def __init__(self, num_images):
        super().__init__()
        self.register_buffer("cluster_of_image", torch.full((num_images,), -1, dtype=torch.long))


# Fixed-point scale of the centroid sums: integer addition is associative, so the sums (and the
# clusters) are bit-identical however the points are split over ranks, chunks or GPU threads.
# Components of unit vectors are <= 1, so 2^31 points fit in an int64 sum; resolution 2^-32.
KMEANS_FIXED_POINT = 2.0 ** 32


# Each seeding round adds (centres so far) / SEED_BATCH_DIVISOR centres: 8 lost up to 2.5 % of
# inertia against sequential greedy k-means++, 32 stays within 1 % (measured on blob mixtures).
SEED_BATCH_DIVISOR = 32


def _kmeans_seed(points, num_clusters, generator, sample_per_cluster=16):
    """Greedy k-means++ seeding in rounds. k-means++ draws each new centre with probability
    proportional to its squared distance 2 - 2 cos to the nearest centre so far; greedy k-means++
    (as scikit-learn) draws 2 + log K candidates and keeps the one that lowers the total distance
    most. Here each round adds a batch of centres at once (1/SEED_BATCH_DIVISOR of those chosen so
    far, at least one: up to 64 clusters this is exactly greedy k-means++), drawing batch x trials
    candidates without replacement (an exponential race: the largest d^2 / Exp(1)) and keeping the
    best of each group of `trials`. 50,000 clusters take about 280 rounds instead of 50,000
    sequential steps, and no step waits for the GPU. Runs on a random subsample of at most
    `sample_per_cluster` points per cluster. Returns the centres (K, d) float32."""
    n, device = points.shape[0], points.device
    order = torch.randperm(n, generator=generator, device=device)
    sample = points[order[:sample_per_cluster * num_clusters]].float()
    trials = 2 + int(math.log(num_clusters))
    dtype = _assignment_precision(device)[0]  # the seeds' quality does not need float32 distances
    centres = torch.empty(num_clusters, sample.shape[1], device=device)
    centres[:1] = sample[torch.randint(sample.shape[0], (1,), generator=generator, device=device)]
    nearest = (2 - 2 * sample @ centres[0]).clamp_(min=0)
    chosen = 1
    while chosen < num_clusters:
        batch = min(max(1, chosen // SEED_BATCH_DIVISOR), num_clusters - chosen)
        exponential = torch.empty_like(nearest).exponential_(generator=generator)
        race = nearest / exponential.clamp_(min=1e-30)
        candidates = sample[race.topk(min(batch * trials, sample.shape[0])).indices]
        chunk_size = max(1, (1 << 26) // candidates.shape[0])
        gain = torch.zeros(candidates.shape[0], device=device)  # total distance removed by each
        for part, rows in zip(nearest.split(chunk_size), sample.split(chunk_size)):
            dists = (2 - 2 * (rows.to(dtype) @ candidates.to(dtype).T).float()).clamp_(min=0)
            gain += (part.unsqueeze(1) - dists).clamp_(min=0).sum(dim=0)
        groups = gain[:batch * (candidates.shape[0] // batch)].view(-1, batch)
        new = candidates[groups.argmax(dim=0) * batch + torch.arange(batch, device=device)]
        centres[chosen:chosen + batch] = new
        nearest = torch.cat([
            torch.minimum(part, (2 - 2 * (rows @ new.T).amax(dim=1)).clamp_(min=0))
            for part, rows in zip(nearest.split(chunk_size), sample.split(chunk_size))])
        chosen += batch
    return centres


def _assignment_precision(device):
    """(matmul dtype, its unit roundoff) of the k-means assignment step: bf16 where bf16 matmuls are
    fast, fp16 on older GPUs (tensor cores), float32 elsewhere."""
    if common._bf16_matmul_is_fast(device.type):
        return torch.bfloat16, 2.0 ** -8
    if device.type == "cuda":
        return torch.float16, 2.0 ** -11
    return torch.float32, 0.0


def _assign_to_centroids(points, centroids, chunk_size):
    """Index of the centroid of largest dot product for each point: the argmax of the exact scores.
    Scores are computed in reduced precision (_assignment_precision); a score is then within
    err = (4u + d 2^-23) |p| max|c| of the exact one (inputs and output rounded, float32
    accumulation), so where the top-2 margin exceeds 2 err the reduced argmax is the exact one.
    The other rows (near-ties) are recomputed in float64. One host synchronisation per call."""
    dtype, unit_roundoff = _assignment_precision(points.device)
    dim = points.shape[1]
    max_norm = torch.linalg.vector_norm(centroids, dim=1).max()
    low_centroids = centroids.to(dtype)
    flags = {}
    if points.is_cuda:  # the bound assumes float32 accumulation inside the half-precision matmul
        flags = {name: getattr(torch.backends.cuda.matmul, name)
                 for name in ("allow_bf16_reduced_precision_reduction",
                              "allow_fp16_reduced_precision_reduction")}
        for name in flags:
            setattr(torch.backends.cuda.matmul, name, False)
    best, unsure = [], []
    try:
        for chunk in points.split(chunk_size):
            top2 = (chunk.to(dtype) @ low_centroids.T).topk(min(2, centroids.shape[0]), dim=1)
            best.append(top2.indices[:, 0])
            norms = torch.linalg.vector_norm(chunk.float(), dim=1)
            err = (4 * unit_roundoff + dim * 2.0 ** -23) * norms
            margin = (top2.values[:, 0] - top2.values[:, -1]).float()
            unsure.append((margin <= 2 * err * max_norm) & (top2.values.shape[1] > 1))
    finally:
        for name, value in flags.items():
            setattr(torch.backends.cuda.matmul, name, value)
    best, rows = torch.cat(best), torch.cat(unsure).nonzero().squeeze(1)
    for part in rows.split(max(1, chunk_size // 2)):  # chunk_size // 2: float64 is twice as wide
        best[part] = (points[part].double() @ centroids.double().T).argmax(dim=1)
    return best


@torch.no_grad()
def spherical_kmeans(points, num_clusters, iters=20, seed=0, chunk_size=None):
    """Cosine k-means of unit vectors: assign each point to the centroid of largest dot product,
    re-estimate each centroid as the normalised mean of its points; an empty cluster keeps its
    previous centroid; stops early when no assignment changes. Seeding: k-means++ in rounds
    (_kmeans_seed). Assignment: reduced-precision matmul certified exact (_assign_to_centroids),
    chunked so the score matrix stays below 2^27 entries.

    Under torch.distributed every rank must call this with the same points: each rank assigns its
    share of them, centroid sums and counts are all-reduced in fixed point, and every rank returns
    the same result, identical to the one-process result. Returns (assignments (n,) long,
    centroids (K, d) float32)."""
    n, dim, device = points.shape[0], points.shape[1], points.device
    num_clusters = min(num_clusters, n)
    chunk_size = chunk_size or max(1, (1 << 27) // num_clusters)
    world_size, rank = common.get_world_size(), common.get_rank()
    generator = torch.Generator(device=device).manual_seed(seed)
    centroids = _kmeans_seed(points, num_clusters, generator)
    if world_size > 1:  # every rank drew the same seeds; the broadcast makes it certain
        dist.broadcast(centroids, src=0)
    mine = slice(n * rank // world_size, n * (rank + 1) // world_size)
    my_points = points[mine]
    sum_rows = max(1, (1 << 22) // dim)
    assignments = torch.full((my_points.shape[0],), -1, dtype=torch.long, device=device)
    for _ in range(iters):
        new_assignments = _assign_to_centroids(my_points, centroids, chunk_size)
        sums = torch.zeros(num_clusters, dim, dtype=torch.long, device=device)
        for start in range(0, my_points.shape[0], sum_rows):
            rows = my_points[start:start + sum_rows].double()
            fixed = (rows * KMEANS_FIXED_POINT).round_().long()
            sums.index_add_(0, new_assignments[start:start + sum_rows], fixed)
        counts = torch.zeros(num_clusters, dtype=torch.long, device=device)
        counts.index_add_(0, new_assignments, torch.ones_like(new_assignments))
        changed = (new_assignments != assignments).sum().view(1)
        if world_size > 1:
            for total in (sums, counts, changed):
                dist.all_reduce(total)
        means = F.normalize(sums.double(), dim=1).float()
        centroids = torch.where((counts > 0).unsqueeze(1), means, centroids)
        assignments = new_assignments
        if changed.item() == 0:  # one host synchronisation per round
            break
    if world_size > 1:  # each rank fills its share, zeros elsewhere; the sum is the whole
        everyone = torch.zeros(n, dtype=torch.long, device=device)
        everyone[mine] = assignments
        dist.all_reduce(everyone)
        assignments = everyone
    return assignments, centroids


@torch.no_grad()
def cluster_store(store, num_clusters, iters, seed, epoch):
    """CMSF-KM: k-means of the per-image embeddings of every visited image; returns the cluster of
    every dataset index (-1: not visited, unconstrained). Every rank holds the whole store and calls
    this: spherical_kmeans splits the work over the ranks and gives all of them the same
    clusters."""
    visited_indices = (store.embeddings != 0).any(dim=1).nonzero().squeeze(1)
    cluster_of_image = torch.full((store.embeddings.shape[0],), -1, dtype=torch.long,
                                  device=store.embeddings.device)
    assignments, _ = spherical_kmeans(store.embeddings[visited_indices], num_clusters, iters,
                                      seed=seed * 1_000_003 + epoch)
    cluster_of_image[visited_indices] = assignments
    return cluster_of_image


class OnlineNetwork(torch.nn.Sequential):
    """Online encoder + predictor (same parameter names as train_msf.py's nn.Sequential). Its
    forward takes a list of query crops and runs each run of same-resolution crops as one batch
    (DINO's multi-crop wrapper), so that DDP sees a single forward per step. Returns (sum of
    batches, d)."""

    def forward(self, crops):
        outputs, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            outputs.append(super().forward(torch.cat(crops[start:end])))
            start = end
        return torch.cat(outputs)


@torch.no_grad()
def two_queue_constraint(target, target_prev, memory_bank, previous_bank, k, k_prime,
                         search_dtype=None):
    """The 2Q constraint. C = the k' nearest neighbours of t' (previous-visit embedding of each
    image) among the rows of M' (previous_bank) whose image had a previous visit (label 0; -1 never
    matches); the constrained neighbours are the min(k, k') members of C most similar to t.
    Returns (candidate slots C (B, k'), their validity, constrained slots (B, min(k, k')),
    validity)."""
    query_labels = torch.zeros(target.shape[0], dtype=torch.long, device=target.device)
    _, candidates, candidates_valid = common.knn_search(target_prev, previous_bank.embeddings,
                                                        k_prime,
                                                        query_labels=query_labels,
                                                        key_labels=previous_bank.labels,
                                                        search_dtype=search_dtype)
    sims = torch.einsum("bd,bkd->bk", target, memory_bank.embeddings[candidates].float())
    sims = sims.masked_fill(~candidates_valid, -math.inf)
    top_sims, order = sims.topk(min(k, k_prime), dim=1)
    return candidates, candidates_valid, candidates.gather(1, order), torch.isfinite(top_sims)


@torch.no_grad()
def complete_constrained(constrained, constrained_valid, constrained_rows, unconstrained, k):
    """Rows without a constraint (no previous visit / no cluster yet) take the unconstrained
    neighbours, i.e. plain MSF. With k' < k the constrained set has k' columns: as upstream, the
    other k - k' are the nearest unconstrained neighbours not already chosen. Invalid slots stay out
    of the loss."""
    rows = constrained_rows.unsqueeze(1)
    if constrained.shape[1] < k:
        already = ((unconstrained.unsqueeze(2) == constrained.unsqueeze(1))
                   & constrained_valid.unsqueeze(1)).any(2)
        # keeps the similarity order
        fresh_first = torch.sort(already.int(), dim=1, stable=True).indices
        padding = unconstrained.gather(1, fresh_first[:, :k - constrained.shape[1]])
        constrained = torch.cat([constrained, padding], dim=1)
        constrained_valid = torch.cat(
            [constrained_valid, torch.ones_like(padding, dtype=torch.bool)], dim=1)
    slots = torch.where(rows, constrained, unconstrained)
    valid = torch.where(rows, constrained_valid, torch.ones_like(constrained_valid))
    return slots, valid


def read_other_modality_embeddings(path, relative_paths, dtype=torch.float32):
    """Read --constraint-embeddings FILE: one embedding per training image from another modality or
    model, matched to the dataset by name. The file is a torch.save'd dict, loaded with
    weights_only=True:
        {"paths": [n names: common.dataset_relative_paths of the training set, e.g.
                   'n01440764/n01440764_10026.JPEG' (relative to the train/ folder), or '0', '1',
                   ... (the dataset index) for datasets without files],
         "embeddings": n x D floating tensor (any D, any scale: rows are L2-normalised here)}
    tools/write_embeddings.py writes one from a checkpoint. Returns (embeddings (N, D) `dtype`, unit
    rows in dataset order, zeros where missing; has_embedding (N,) bool). Images missing from the
    file fall back to plain MSF; extra names in the file are ignored."""
    def fail(problem):
        raise common.UsageError(f"--constraint-embeddings {path}: {problem}")

    if not os.path.isfile(path):
        fail("no such file; write one with tools/write_embeddings.py")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or foreign files
        fail(f"cannot be read ({type(e).__name__}); write it with torch.save, e.g. by "
             "tools/write_embeddings.py")
    if not isinstance(contents, dict) or not {"paths", "embeddings"} <= set(contents):
        fail("must hold a dict {'paths': [names], 'embeddings': N x D tensor} (see "
             "tools/write_embeddings.py)")
    names, embeddings = contents["paths"], contents["embeddings"]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        fail("'paths' must be a list of strings (image paths relative to the training folder)")
    if (not torch.is_tensor(embeddings) or embeddings.dim() != 2
            or not embeddings.is_floating_point() or embeddings.shape[0] != len(names)
            or embeddings.shape[1] == 0):
        shape = (tuple(embeddings.shape) if torch.is_tensor(embeddings)
                 else type(embeddings).__name__)
        fail(f"'embeddings' must be a floating tensor of {len(names)} x D (one row per path), "
             f"found {shape}")
    if len(set(names)) != len(names):
        fail("'paths' lists some images twice; keep one embedding per image")
    embeddings = embeddings.float()
    bad = ~torch.isfinite(embeddings).all(dim=1) | (embeddings.norm(dim=1) == 0)
    if bad.any():
        first = names[int(bad.nonzero()[0])]
        fail(f"{int(bad.sum())} embeddings are non-finite or zero (first: {first}); recompute them")
    row_of_name = {os.path.normpath(n).replace(os.sep, "/"): i for i, n in enumerate(names)}
    rows = torch.tensor([row_of_name.get(os.path.normpath(p).replace(os.sep, "/"), -1)
                         for p in relative_paths], dtype=torch.long)
    has_embedding = rows >= 0
    if not has_embedding.any():
        fail(f"none of its {len(names)} paths names a training image (file: {names[:1]}, dataset: "
             f"{list(relative_paths[:1])}); use paths relative to the training folder")
    result = torch.zeros(len(relative_paths), embeddings.shape[1], dtype=dtype)
    result[has_embedding] = F.normalize(embeddings[rows[has_embedding]], dim=1).to(dtype)
    return result, has_embedding


@torch.no_grad()
def cross_modal_constraint(target, indices, memory_bank, other_embeddings, has_embedding, k,
                           k_prime,
                           search_dtype=None):
    """The cross-modal constraint, the 2Q search with other-modality embeddings in place of the
    previous visit: C = the k' nearest neighbours of the image's other-modality embedding among the
    other-modality embeddings of the images now in the bank (found through the bank's dataset
    indices; empty slots, index -1, and images without an embedding are never in C); the
    constrained neighbours are the min(k, k') members of C most similar to t. The image itself is in
    the bank (enqueued first), so it is in C. Rows without an embedding (has_embedding[indices]
    False) are the ones complete_constrained gives plain MSF. Gathers an M x D copy of the keys each
    step (store other_embeddings in half precision to halve it).
    Returns (candidate slots C (B, k'), their validity, constrained slots (B, min(k, k')),
    validity), as two_queue_constraint."""
    import types
    slot_images = memory_bank.indices.clamp(min=0)
    slot_has_embedding = (memory_bank.indices >= 0) & has_embedding[slot_images]
    other_bank = types.SimpleNamespace(embeddings=other_embeddings[slot_images],  # (M, D)
                                       labels=torch.where(slot_has_embedding, 0, -1))
    return two_queue_constraint(target, other_embeddings[indices].float(), memory_bank, other_bank,
                                k,
                                k_prime, search_dtype)


@torch.no_grad()
def enqueue_and_find_neighbours(target, labels, indices, memory_bank, previous_bank, store,
                                cluster_of_image,
                                constraint, k, k_prime, search_dtype, other_modality=None):
    """One step of bookkeeping and search for the local targets t (B, d), after all-gathering the
    global batch so that every rank's bank, M' and store stay identical:
    1. t' = previous-visit embeddings of the global batch, read BEFORE this visit is recorded;
    2. enqueue t into the bank and t' into M' (lockstep: same slots), then record t in the store;
    3. unconstrained top-k of t in the bank (which holds t itself) and the constrained top-k.
    Returns a dict of (B, k) slot/valid tensors and the (B,) rows that are constrained."""
    global_target, global_labels, global_indices = (common.all_gather(x) for x in (target, labels,
                                                                                   indices))
    global_prev, global_visited = store.lookup(global_indices)
    memory_bank.enqueue(global_target, global_labels, global_indices)
    if previous_bank is not None:
        # label 0 marks slots whose image had a previous visit, -1 (never searched) the others
        previous_bank.enqueue(global_prev, torch.where(global_visited, 0, -1), global_indices)
    store.record(global_indices, global_target)

    rank_rows = slice(common.get_rank() * target.shape[0],
                      (common.get_rank() + 1) * target.shape[0])
    _, unconstrained, _ = common.knn_search(target, memory_bank.embeddings, k,
                                            search_dtype=search_dtype)
    found = {"unconstrained": unconstrained}
    if constraint == "2q":
        target_prev, constrained_rows = global_prev[rank_rows], global_visited[rank_rows]
        (found["candidates"], found["candidates_valid"], constrained,
         constrained_valid) = two_queue_constraint(
            target, target_prev, memory_bank, previous_bank, k, k_prime, search_dtype)
    elif constraint == "embeddings":  # C from the other modality's embeddings of the bank's images
        other_embeddings, has_embedding = other_modality
        constrained_rows = has_embedding[indices]  # images without one fall back to plain MSF
        (found["candidates"], found["candidates_valid"], constrained,
         constrained_valid) = cross_modal_constraint(
            target, indices, memory_bank, other_embeddings, has_embedding, k, k_prime, search_dtype)
    # kmeans: bank entries of the sample's cluster; cluster -1 (not clustered yet) is unconstrained
    else:
        sample_clusters = cluster_of_image[indices]
        slot_clusters = torch.where(memory_bank.indices >= 0,
                                    cluster_of_image[memory_bank.indices.clamp(min=0)], -1)
        _, constrained, constrained_valid = common.knn_search(
            target, memory_bank.embeddings, k, query_labels=sample_clusters,
            key_labels=slot_clusters,
            search_dtype=search_dtype)
        constrained_rows = sample_clusters >= 0
    found["constrained"], found["constrained_valid"] = complete_constrained(
        constrained, constrained_valid, constrained_rows, unconstrained, k)
    found["constrained_rows"] = constrained_rows
    return found


def cmsf_loss(queries, memory_bank, found):
    """The CMSF self-supervised loss, averaged over the query crops q of each image:
        L = 1/2 [ 1/|N_C(t)| sum_{z in N_C(t)} (2 - 2 q.z)  +  1/k sum_{z in N(t)} (2 - 2 q.z) ]
    N(t): top-k of t in the bank; N_C(t): top-k of t restricted to the constraint set C (both hold
    t).
    queries: (crops, B, d) unit vectors. Returns the per-sample loss (B,)."""
    constrained = memory_bank.embeddings[found["constrained"]]
    unconstrained = memory_bank.embeddings[found["unconstrained"]]
    per_crop = [(common.mean_shift_loss(q, constrained, found["constrained_valid"])
                 + common.mean_shift_loss(q, unconstrained)) / 2 for q in queries]
    return torch.stack(per_crop).mean(dim=0)


@torch.no_grad()
def rank_in_unconstrained_order(target, bank_embeddings, slots, valid, chunk_size=65536):
    """Mean rank (0 = nearest) of the given neighbours among all bank entries ordered by similarity
    to
    t: the count of entries strictly more similar. One B x M pass, so it is only run at print steps.
    The neighbours' own similarities come from the same matmul, so a neighbour never outranks
    itself."""
    sims = torch.cat([target @ chunk.float().T for chunk in bank_embeddings.split(chunk_size)],
                     dim=1)
    neighbour_sims = sims.gather(1, slots)
    ranks = torch.stack([(sims > neighbour_sims[:, j:j + 1]).sum(1) for j in range(slots.shape[1])],
                        dim=1)
    valid = valid.float()
    return (ranks.float() * valid).sum() / valid.sum().clamp(min=1)


def train_one_epoch(args, run, epoch, loader, online, target_encoder, optimizer, memory_bank,
                    previous_bank, store, cluster_of_image, other_modality, lr_schedule,
                    start_iter):
    """One epoch of CMSF. Returns the epoch's averages, or None when the run must stop mid-epoch."""
    iters = loader.sampler.iters_per_epoch
    logger = common.MetricLogger(f"Epoch [{epoch + 1}/{args.epochs}]", iters, args.batch_size,
                                 args.print_freq, start_iter, run.take_resumed_metrics())
    online_encoder = common.unwrap(online)[0]
    search_dtype = getattr(torch, args.search_dtype)
    for it, (views, labels, indices) in logger.log_every(loader, start_iter):
        step = epoch * iters + it
        common.set_lr(optimizer, lr_schedule[step])
        views = common.prepare_views(views, run.device, run.channels_last)
        target_view, query_crops = views[0], views[1:]  # query crops: the query view + local crops
        labels, indices = labels.to(run.device, non_blocking=True), indices.to(run.device,
                                                                               non_blocking=True)

        with run.autocast():
            queries = online(query_crops)
        queries = F.normalize(queries.float(), dim=1).view(len(query_crops), -1, queries.shape[1])

        with torch.no_grad():
            common.ema_update_(target_encoder, online_encoder, args.ema)
            shuffled, unshuffle_index = common.batch_shuffle(target_view, args.seed, step)
            with run.autocast():
                target = target_encoder(shuffled)
            target = common.batch_unshuffle(F.normalize(target.float(), dim=1), unshuffle_index)
            # Enqueue first (inside): the bank then holds t itself, its own nearest neighbour.
            found = enqueue_and_find_neighbours(target, labels, indices, memory_bank, previous_bank,
                                                store,
                                                cluster_of_image, args.constraint, args.topk,
                                                args.topk_prime, search_dtype, other_modality)

        loss_per_sample = cmsf_loss(queries, memory_bank, found)
        loss = loss_per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(optimizer)
        run.scaler.update()

        # Logged, never trained on: purity (true labels) of the neighbour sets of both terms, the
        # fraction of samples without a constraint (plain MSF), and at print steps the mean rank of
        # the constrained neighbours in the unconstrained ordering (how far down the plain list).
        logger.update(loss=loss,
                      purity_constrained=common.purity(memory_bank.labels[found["constrained"]],
                                                       labels,
                                                       found["constrained_valid"]),
                      purity_unconstrained=common.purity(memory_bank.labels[found["unconstrained"]],
                                                         labels),
                      msf_fallback=1.0 - found["constrained_rows"].float().mean())
        if (it + 1) % args.print_freq == 0 or it + 1 == iters:
            logger.update(constrained_rank=rank_in_unconstrained_order(
                target, memory_bank.embeddings, found["constrained"], found["constrained_valid"]))
            if args.constraint == "kmeans":  # C = the bank entries of the sample's cluster
                slot_clusters = torch.where(memory_bank.indices >= 0,
                                            cluster_of_image[memory_bank.indices.clamp(min=0)], -1)
                size = (slot_clusters.unsqueeze(0) == cluster_of_image[indices][:64, None]).sum(1)
            else:
                size = found["candidates_valid"].sum(1)
            size = torch.where(found["constrained_rows"][:64], size[:64], args.mem_bank_size)
            logger.update(**common.neighbour_diagnostics(
                target, labels, memory_bank.embeddings, memory_bank.labels, found["constrained"],
                found["constrained_valid"], constraint_size=size))
            common.check_finite(loss, epoch, it)
        logger.step(it, lr=lr_schedule[step])
        action = run.poll(it, iters)  # SLURM's signal, --checkpoint-minutes, --stop-after-iters
        if action and run.save_mid_epoch(action, epoch, it, loss, logger):
            return None
    return logger.averages()


def check_args(args, num_images):
    """The checks of this script's own flags (the shared ones are common.check_training_args)."""
    if not 1 <= args.topk_prime <= args.mem_bank_size:
        raise common.UsageError(f"--topk-prime {args.topk_prime} must be between 1 and "
                                f"--mem-bank-size ({args.mem_bank_size})")
    if args.constraint == "kmeans" and not 1 <= args.num_clusters <= num_images:
        raise common.UsageError(f"--num-clusters {args.num_clusters} must be between 1 and the "
                                f"number of training images ({num_images}); lower it")
    if (args.constraint == "embeddings") != (args.constraint_embeddings is not None):
        raise common.UsageError("--constraint embeddings and --constraint-embeddings FILE go "
                                "together; pass both (or neither)")
    if args.kmeans_iters < 1:
        raise common.UsageError(f"--kmeans-iters {args.kmeans_iters} must be at least 1")
    if args.local_crops_number < 0:
        raise common.UsageError(f"--local-crops-number {args.local_crops_number} must be 0 or more")
    if args.local_crops_number and not 1 <= args.local_crops_size <= args.image_size:
        raise common.UsageError(f"--local-crops-size {args.local_crops_size} must be between 1 and "
                                f"--image-size ({args.image_size}); use about 96/224 of it, e.g. "
                                f"{max(1, round(args.image_size * 96 / 224))}")


def main(args):
    run = common.TrainingRun(args, SCRIPT)  # distributed init, device, precision; checks the flags

    # ---- data: [target view, query view, local query crops...]
    base, num_classes = common.build_dataset(args.dataset, args.data, "train", args.download,
                                             args.image_size, args.synthetic_images)
    check_args(args, len(base))
    run.fit_to_dataset(len(base), args)
    other_modality = None
    if args.constraint == "embeddings":
        other_modality = tuple(x.to(run.device) for x in read_other_modality_embeddings(
            args.constraint_embeddings, common.dataset_relative_paths(base),
            getattr(torch, args.store_dtype)))
        if run.rank == 0:
            missing = int((~other_modality[1]).sum())
            print(f"--constraint-embeddings {args.constraint_embeddings}: "
                  f"{other_modality[0].shape[1]}-d embeddings of {len(base) - missing} images; "
                  f"{missing} without one use plain MSF",
                  flush=True)
    two_views = common.two_view_transform(args.augmentation, args.image_size,
                                          run.augment_on_device).view_transforms
    local_crops = [common.strong_augmentation(args.local_crops_size, scale=LOCAL_CROP_SCALE,
                                              on_device=run.augment_on_device)
                   for _ in range(args.local_crops_number)]
    dataset = common.IndexedDataset(base, common.MultiViewTransform(two_views + local_crops))
    sampler = common.ResumableSampler(len(dataset), args.batch_size, seed=args.seed)
    loader = common.make_train_loader(dataset, sampler, run.workers, run.device)

    # ---- networks: online = encoder + predictor (trained), target = EMA copy of the encoder
    online, target_encoder = common.build_online_and_target(args.arch, args.image_size, args.seed,
                                                            run.device, run.channels_last,
                                                            args.bn_batch_size,
                                                            run.local_batch_size,
                                                            online_class=OnlineNetwork)
    encoder = online[0]

    # ---- memories, replicated and identical on every rank: bank, previous-visit store, and M'
    # (2Q, lockstep with the bank) or the k-means cluster of every image (CMSF-KM)
    store_dtype = getattr(torch, args.store_dtype)
    memory_bank = common.MemoryBank(args.mem_bank_size, encoder.embed_dim,
                                    getattr(torch, args.bank_dtype),
                                    seed=args.seed).to(run.device)
    store = PreviousVisitStore(len(dataset), encoder.embed_dim, store_dtype).to(run.device)
    previous_bank = (common.MemoryBank(args.mem_bank_size, encoder.embed_dim, store_dtype,
                                       seed=args.seed + 1).to(run.device)
                     if args.constraint == "2q" else None)
    clusters = ClusterAssignment(len(dataset)).to(run.device)
    optimizer, lr_schedule = common.sgd_with_cosine_schedule(online.parameters(), args,
                                                             sampler.iters_per_epoch)

    run.track(online=online, target=target_encoder, optimizer=optimizer, memory_bank=memory_bank,
              store=store, clusters=clusters)
    if previous_bank is not None:
        run.track(previous_bank=previous_bank)
    run.add_knn_monitor(args, base, num_classes)
    start_epoch, start_iter = run.resume(args.resume)
    if run.rank == 0 and not run.already_complete:
        mib = 2 ** 20
        upstream = 2 * len(dataset) * encoder.embed_dim * 4
        second = (f" + M' {args.mem_bank_size} x {encoder.embed_dim} {args.store_dtype} "
                  f"({previous_bank.embeddings.nbytes / mib:.1f} "
                  f"MiB)" if previous_bank is not None else "")
        print(f"{SCRIPT}: {args.arch}, {len(dataset)} images, {run.world_size} process(es) on "
              f"{run.device}, global batch {args.batch_size}, {sampler.iters_per_epoch} it/epoch, "
              f"bank {args.mem_bank_size} x {encoder.embed_dim} {args.bank_dtype} "
              f"({memory_bank.embeddings.nbytes / mib:.1f} MiB), constraint {args.constraint}, "
              f"k={args.topk}, k'={args.topk_prime}, {args.augmentation}, "
              f"{args.local_crops_number} local crops of {args.local_crops_size} px, amp "
              f"{common.amp_name(run.autocast_dtype)}, {run.workers} loader "
              f"workers\nprevious-visit store {len(dataset)} x {encoder.embed_dim} "
              f"{args.store_dtype} ({store.nbytes / mib:.1f} MiB){second}; upstream keeps 2 x N x "
              f"d float32 ({upstream / mib:.1f} MiB)", flush=True)

    online_ddp = run.ddp(online)
    run.start_epoch_loop()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, start_iter)
        start = time.time()
        extra = {}
        # a resumed epoch keeps its clusters
        if args.constraint == "kmeans" and epoch > 0 and start_iter == 0:
            clusters.cluster_of_image.copy_(cluster_store(store, args.num_clusters,
                                                          args.kmeans_iters,
                                                          args.seed, epoch))
            assigned = clusters.cluster_of_image[clusters.cluster_of_image >= 0]
            extra = {"kmeans_seconds": round(time.time() - start, 1),
                     "kmeans_clusters_used": int(assigned.unique().numel())}
            if run.rank == 0:
                print(f"k-means: {extra['kmeans_clusters_used']} non-empty clusters of "
                      f"{assigned.numel()} images in {extra['kmeans_seconds']} s", flush=True)
        stats = train_one_epoch(args, run, epoch, loader, online_ddp, target_encoder, optimizer,
                                memory_bank, previous_bank, store, clusters.cluster_of_image,
                                other_modality, lr_schedule, start_iter)
        if stats is None:  # stopped mid-epoch (--stop-after-iters); checkpoint written
            break
        start_iter = 0
        record = {"epoch": epoch + 1, **stats, **extra,
                  "lr": float(lr_schedule[epoch * sampler.iters_per_epoch]),
                  "epoch_seconds": round(time.time() - start, 1)}
        run.end_epoch(epoch, record, encoder.backbone)
        if run.should_stop_after_epoch(epoch):
            break
    run.finish()


if __name__ == "__main__":
    common.run_main(main, get_args_parser())
