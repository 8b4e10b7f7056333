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
import functools
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common

SCRIPT = "train_cmsf_self.py"
RESUMABLE = common.RUNTIME_FLAGS  # the flags a resumed run may change
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



# ============ the 2Q method: memories, constraint, loss, step =====================================

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
def two_queue_constraint(target, target_prev, bank_embeddings, previous_embeddings,
                         previous_labels, k, k_prime, search_dtype=None):
    """The 2Q constraint. C = the k' nearest neighbours of t' (previous-visit embedding of each
    image, B x d) among the rows of M' (previous_embeddings, M x d) whose image had a previous
    visit (previous_labels 0; -1 never matches); the constrained neighbours are the min(k, k')
    members of C most similar to t (B x d) in the bank (bank_embeddings, M x d: the same slots).
    Returns (candidate slots C (B, k'), their validity, constrained slots (B, min(k, k')),
    validity)."""
    query_labels = torch.zeros(target.shape[0], dtype=torch.long, device=target.device)
    _, candidates, candidates_valid = common.knn_search(target_prev, previous_embeddings, k_prime,
                                                        query_labels=query_labels,
                                                        key_labels=previous_labels,
                                                        search_dtype=search_dtype)
    sims = torch.einsum("bd,bkd->bk", target, bank_embeddings[candidates].float())  # (B, k')
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



class CMSFMemory(torch.nn.Module):
    """What CMSF remembers, replicated and identical on every rank (each step enqueues the global
    batch). d = embedding size, M = --mem-bank-size, N = training images:
      bank           M x d  the targets t of the last M images (+ their labels, dataset indices)
      store          N x d  every image's target at its latest visit (PreviousVisitStore)
      previous_bank  M x d  2Q only, M': for each bank slot, its image's visit before that one
      cluster_of_image  N   CMSF-KM only: the image's k-means cluster (-1: none yet)
      other_modality N x D  cross-modal only: (another modality's embeddings, has one (N,) bool)
    Each is saved in checkpoints under its own name (main's to_save)."""

    def __init__(self, constraint, bank, store, k, k_prime, search_dtype=None, previous_bank=None,
                 cluster_of_image=None, other_modality=None):
        super().__init__()
        self.constraint, self.k, self.k_prime, self.search_dtype = (constraint, k, k_prime,
                                                                    search_dtype)
        self.bank, self.store, self.previous_bank = bank, store, previous_bank
        self.cluster_of_image, self.other_modality = cluster_of_image, other_modality

    @torch.no_grad()
    def enqueue(self, target, labels, indices):
        """Add the global batch of targets t (this rank's: B x d): t' = the previous visits, read
        BEFORE this visit is recorded; t into the bank and t' into M' (lockstep: the same slots);
        then t into the store. Returns this rank's (t' (B, d) float32, visited before (B,))."""
        global_target, global_labels, global_indices = (common.all_gather(x)
                                                        for x in (target, labels, indices))
        global_prev, global_visited = self.store.lookup(global_indices)  # (G, d), (G,)
        self.bank.enqueue(global_target, global_labels, global_indices)
        if self.previous_bank is not None:
            # label 0 marks slots whose image had a previous visit, -1 (never searched) the others
            self.previous_bank.enqueue(global_prev, torch.where(global_visited, 0, -1),
                                       global_indices)
        self.store.record(global_indices, global_target)
        mine = slice(common.get_rank() * target.shape[0], (common.get_rank() + 1) * target.shape[0])
        return global_prev[mine], global_visited[mine]

    @torch.no_grad()
    def neighbours(self, target, indices, previous):
        """Both neighbour sets of t (B, d), after enqueue: "unconstrained" (B, k) = top-k of t in
        the bank (which holds t itself); "constrained" (B, k) + "constrained_valid" = top-k within
        the constraint set C, plain MSF's neighbours for the rows without one
        ("constrained_rows" False). `previous`: what enqueue returned."""
        _, unconstrained, _ = common.knn_search(target, self.bank.embeddings, self.k,
                                                search_dtype=self.search_dtype)
        found = {"unconstrained": unconstrained}
        if self.constraint == "2q":  # C = neighbours of t' among M'
            target_prev, constrained_rows = previous
            (found["candidates"], found["candidates_valid"], constrained,
             constrained_valid) = two_queue_constraint(
                target, target_prev, self.bank.embeddings, self.previous_bank.embeddings,
                self.previous_bank.labels, self.k, self.k_prime, self.search_dtype)
        elif self.constraint == "embeddings":  # C = neighbours in the other modality
            other_embeddings, has_embedding = self.other_modality
            constrained_rows = has_embedding[indices]
            (found["candidates"], found["candidates_valid"], constrained,
             constrained_valid) = cross_modal_constraint(target, indices, self.bank,
                                                         other_embeddings, has_embedding, self.k,
                                                         self.k_prime, self.search_dtype)
        else:  # kmeans: C = the bank entries of the sample's cluster
            constrained, constrained_valid, constrained_rows, found["slot_clusters"] = (
                kmeans_constraint(target, indices, self.bank, self.cluster_of_image, self.k,
                                  self.search_dtype))
        found["constrained"], found["constrained_valid"] = complete_constrained(
            constrained, constrained_valid, constrained_rows, unconstrained, self.k)
        found["constrained_rows"] = constrained_rows
        return found

    @torch.no_grad()
    def constraint_sizes(self, found, indices, rows=64):
        """|C| of the first `rows` samples (M for those without a constraint); print steps only."""
        if self.constraint == "kmeans":
            sample_clusters = self.cluster_of_image[indices][:rows, None]
            size = (found["slot_clusters"].unsqueeze(0) == sample_clusters).sum(1)
        else:
            size = found["candidates_valid"][:rows].sum(1)
        return torch.where(found["constrained_rows"][:rows], size, self.bank.size)


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



def train_one_epoch(args, epoch, loader, logger, online, target_encoder, optimizer, lr_schedule,
                    memory, device, autocast_dtype, scaler, stopper):
    """One epoch of CMSF. Returns the epoch's averages, or None when the run must stop mid-epoch."""
    iters = loader.sampler.iters_per_epoch
    channels_last = device.type == "cuda"  # GPU convolutions run faster in NHWC
    online_encoder = common.unwrap(online)[0]
    for it, (views, labels, indices) in logger.log_every(loader, logger.start_iter):
        step = epoch * iters + it
        common.set_lr(optimizer, lr_schedule[step])
        views = common.prepare_views(views, device, channels_last)
        target_view, query_crops = views[0], views[1:]  # query crops: the query view + local crops
        labels, indices = labels.to(device, non_blocking=True), indices.to(device,
                                                                           non_blocking=True)

        with common.autocast(device, autocast_dtype):
            queries = online(query_crops)  # (crops x B, d)
        queries = F.normalize(queries.float(), dim=1).view(len(query_crops), -1, queries.shape[1])

        with torch.no_grad():
            common.ema_update_(target_encoder, online_encoder, args.ema)
            shuffled, unshuffle_index = common.batch_shuffle(target_view, args.seed, step)
            with common.autocast(device, autocast_dtype):
                target = target_encoder(shuffled)
            target = common.batch_unshuffle(F.normalize(target.float(), dim=1), unshuffle_index)
            # Enqueue first: the bank then holds t itself, its own nearest neighbour.
            previous = memory.enqueue(target, labels, indices)
            found = memory.neighbours(target, indices, previous)

        loss = cmsf_loss(queries, memory.bank, found).mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        # Logged, never trained on: purity (true labels) of both neighbour sets and the fraction
        # of samples without a constraint (plain MSF); at print steps the posters' diagnostics.
        bank_labels = memory.bank.labels
        logger.update(loss=loss,
                      purity_constrained=common.purity(bank_labels[found["constrained"]], labels,
                                                       found["constrained_valid"]),
                      purity_unconstrained=common.purity(bank_labels[found["unconstrained"]],
                                                         labels),
                      msf_fallback=1.0 - found["constrained_rows"].float().mean())
        if (it + 1) % args.print_freq == 0 or it + 1 == iters:
            logger.update(**common.neighbour_diagnostics(
                target, labels, memory.bank.embeddings, bank_labels, found["constrained"],
                found["constrained_valid"], constraint_size=memory.constraint_sizes(found,
                                                                                    indices)))
            common.check_finite(loss, epoch, it)
        logger.step(it, lr=lr_schedule[step])
        # SLURM's signal, --checkpoint-minutes, --stop-after-iters
        if stopper.checkpoint_if_due(it, iters, epoch, loss, logger):
            return None
    return logger.averages()


def main(args):
    device = common.start_training(args)  # distributed init, flag checks, seeds, provenance
    autocast_dtype = common.amp_dtype(args.amp, device)  # None: float32
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    workers = common.default_workers(args.workers)

    # ============ data: [target view, query view, local query crops...] ============
    base, num_classes = common.build_dataset(args.dataset, args.data, "train", args.download,
                                             args.image_size, args.synthetic_images)
    check_args(args, len(base))
    local_batch_size = common.check_dataset_size(len(base), args, common.get_world_size())
    other_modality = None
    if args.constraint == "embeddings":
        other_modality = tuple(x.to(device) for x in read_other_modality_embeddings(
            args.constraint_embeddings, common.dataset_relative_paths(base),
            getattr(torch, args.store_dtype)))
        if common.is_main_process():
            missing = int((~other_modality[1]).sum())
            print(f"--constraint-embeddings {args.constraint_embeddings}: "
                  f"{other_modality[0].shape[1]}-d embeddings of {len(base) - missing} images; "
                  f"{missing} without one use plain MSF", flush=True)
    on_device = common.resolve_on_device(args.augment_on, device)
    two_views = common.two_view_transform(args.augmentation, args.image_size,
                                          on_device).view_transforms
    local_crops = [common.strong_augmentation(args.local_crops_size, scale=LOCAL_CROP_SCALE,
                                              on_device=on_device)
                   for _ in range(args.local_crops_number)]
    dataset = common.IndexedDataset(base, common.MultiViewTransform(two_views + local_crops))
    sampler = common.ResumableSampler(len(dataset), args.batch_size, seed=args.seed)
    loader = common.make_train_loader(dataset, sampler, workers, device)

    # ============ networks: online = encoder + predictor, target = EMA copy of the encoder =====
    online, target_encoder = common.build_online_and_target(args.arch, args.image_size, args.seed,
                                                            device, device.type == "cuda",
                                                            args.bn_batch_size, local_batch_size,
                                                            online_class=OnlineNetwork)
    encoder = online[0]
    optimizer, lr_schedule = common.sgd_with_cosine_schedule(online.parameters(), args,
                                                             sampler.iters_per_epoch)

    # ============ memories: bank, previous-visit store, M' (2Q) or clusters (CMSF-KM) ========
    store_dtype = getattr(torch, args.store_dtype)
    memory_bank = common.MemoryBank(args.mem_bank_size, encoder.embed_dim,
                                    getattr(torch, args.bank_dtype), seed=args.seed).to(device)
    store = PreviousVisitStore(len(dataset), encoder.embed_dim, store_dtype).to(device)
    previous_bank = (common.MemoryBank(args.mem_bank_size, encoder.embed_dim, store_dtype,
                                       seed=args.seed + 1).to(device)
                     if args.constraint == "2q" else None)
    clusters = ClusterAssignment(len(dataset)).to(device)
    memory = CMSFMemory(args.constraint, memory_bank, store, args.topk, args.topk_prime,
                        getattr(torch, args.search_dtype), previous_bank,
                        clusters.cluster_of_image, other_modality)
    knn_monitor = common.knn_monitor_from_args(args, base, num_classes, device, workers,
                                               autocast_dtype)

    # ============ resume: what a checkpoint holds ============
    to_save = {"online": online, "target": target_encoder, "optimizer": optimizer,
               "memory_bank": memory_bank, "store": store, "clusters": clusters, "scaler": scaler}
    if previous_bank is not None:
        to_save["previous_bank"] = previous_bank
    resumed = common.restart_from_checkpoint(args, SCRIPT, RESUMABLE, to_save)
    start_epoch, start_iter, metrics = resumed["epoch"], resumed["iteration"], resumed["metrics"]
    tensorboard = (common.TensorboardLogger(args.output_dir, start_epoch) if args.tensorboard
                   else None)
    if resumed["log_record"] is not None:  # a kill may have cut that epoch's tail: write it again
        common.write_epoch_outputs(args, SCRIPT, start_epoch, resumed["log_record"], online,
                                   target_encoder, encoder.backbone, tensorboard)
    if start_epoch >= args.epochs:
        return
    if common.is_main_process():
        mib = 2 ** 20
        upstream = 2 * len(dataset) * encoder.embed_dim * 4
        second = (f" + M' {args.mem_bank_size} x {encoder.embed_dim} {args.store_dtype} "
                  f"({previous_bank.embeddings.nbytes / mib:.1f} "
                  f"MiB)" if previous_bank is not None else "")
        print(f"{SCRIPT}: {args.arch}, {len(dataset)} images, {common.get_world_size()} "
              f"process(es) on {device}, global batch {args.batch_size}, "
              f"{sampler.iters_per_epoch} it/epoch, bank {args.mem_bank_size} x "
              f"{encoder.embed_dim} {args.bank_dtype} "
              f"({memory_bank.embeddings.nbytes / mib:.1f} MiB), constraint {args.constraint}, "
              f"k={args.topk}, k'={args.topk_prime}, {args.augmentation}, "
              f"{args.local_crops_number} local crops of {args.local_crops_size} px, amp "
              f"{common.amp_name(autocast_dtype)}, {workers} loader "
              f"workers\nprevious-visit store {len(dataset)} x {encoder.embed_dim} "
              f"{args.store_dtype} ({store.nbytes / mib:.1f} MiB){second}; upstream keeps 2 x N x "
              f"d float32 ({upstream / mib:.1f} MiB)", flush=True)

    # ============ training ============
    online_ddp = common.ddp(online)
    stopper = common.TrainingStopper(args, SCRIPT, device, to_save)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, start_iter)
        logger = common.MetricLogger(f"Epoch [{epoch + 1}/{args.epochs}]",
                                     sampler.iters_per_epoch, args.batch_size, args.print_freq,
                                     start_iter, metrics)
        start = time.time()
        # CMSF-KM: new clusters at each epoch start (a resumed epoch keeps its clusters)
        extra = (recluster(clusters, store, args, epoch)
                 if args.constraint == "kmeans" and epoch > 0 and start_iter == 0 else {})
        stats = train_one_epoch(args, epoch, loader, logger, online_ddp, target_encoder, optimizer,
                                lr_schedule, memory, device, autocast_dtype, scaler, stopper)
        if stats is None:  # stopped mid-epoch (--stop-after-iters); checkpoint written
            break
        start_iter, metrics = 0, None
        record = {"epoch": epoch + 1, **stats, **extra,
                  "lr": float(lr_schedule[epoch * sampler.iters_per_epoch]),
                  "epoch_seconds": round(time.time() - start, 1)}
        # the epoch tail, in an order a kill at any point can repeat (see write_epoch_outputs)
        common.run_knn_monitor(knn_monitor, epoch, encoder.backbone, record)
        common.save_training_state(args, SCRIPT, epoch + 1, 0, to_save, log_record=record)
        common.write_epoch_outputs(args, SCRIPT, epoch + 1, record, online, target_encoder,
                                   encoder.backbone, tensorboard)
        if stopper.after_epoch(epoch):
            break
    common.finish_training(args, stopper, tensorboard)


# ============ variant: CMSF-KM (--constraint kmeans) ==============================================

class ClusterAssignment(torch.nn.Module):
    """CMSF-KM: the k-means cluster of every dataset index (-1: not clustered yet), checkpointed."""

    def __init__(self, num_images):
        super().__init__()
        self.register_buffer("cluster_of_image", torch.full((num_images,), -1, dtype=torch.long))



@torch.no_grad()
def kmeans_constraint(target, indices, memory_bank, cluster_of_image, k, search_dtype=None):
    """CMSF-KM's constraint: C = the bank entries whose image is in the sample's cluster; the
    constrained neighbours are the top-k of t in C. Cluster -1 (not clustered yet) is
    unconstrained. Returns (constrained slots (B, k), validity, constrained rows (B,), the cluster
    of every bank slot (M,))."""
    sample_clusters = cluster_of_image[indices]
    slot_clusters = torch.where(memory_bank.indices >= 0,
                                cluster_of_image[memory_bank.indices.clamp(min=0)], -1)
    _, constrained, constrained_valid = common.knn_search(
        target, memory_bank.embeddings, k, query_labels=sample_clusters, key_labels=slot_clusters,
        search_dtype=search_dtype)
    return constrained, constrained_valid, sample_clusters >= 0, slot_clusters


def recluster(clusters, store, args, epoch):
    """CMSF-KM at an epoch start: k-means of the store into clusters.cluster_of_image (in place);
    prints and returns the seconds taken and the clusters used."""
    start = time.time()
    clusters.cluster_of_image.copy_(cluster_store(store, args.num_clusters, args.kmeans_iters,
                                                  args.seed, epoch))
    assigned = clusters.cluster_of_image[clusters.cluster_of_image >= 0]
    stats = {"kmeans_seconds": round(time.time() - start, 1),
             "kmeans_clusters_used": int(assigned.unique().numel())}
    if common.is_main_process():
        print(f"k-means: {stats['kmeans_clusters_used']} non-empty clusters of "
              f"{assigned.numel()} images in {stats['kmeans_seconds']} s", flush=True)
    return stats


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


@functools.lru_cache(maxsize=None)
def bf16_matmul_is_fast(device_type):
    """Whether a bfloat16 matmul runs several times faster than a float32 one: tensor cores (CUDA,
    Ampere and later) or AVX512-BF16 through oneDNN (CPU). Elsewhere bf16 is emulated and slower."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.cpu._is_avx512_bf16_supported()
    return False


def _assignment_precision(device):
    """(matmul dtype, its unit roundoff) of the k-means assignment step: bf16 where bf16 matmuls are
    fast, fp16 on older GPUs (tensor cores), float32 elsewhere."""
    if bf16_matmul_is_fast(device.type):
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



# ============ variant: cross-modal (--constraint embeddings) ======================================

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
                           k_prime, search_dtype=None):
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
    slot_images = memory_bank.indices.clamp(min=0)
    slot_has_embedding = (memory_bank.indices >= 0) & has_embedding[slot_images]
    return two_queue_constraint(target, other_embeddings[indices].float(), memory_bank.embeddings,
                                other_embeddings[slot_images],  # (M, D)
                                torch.where(slot_has_embedding, 0, -1), k, k_prime, search_dtype)


if __name__ == "__main__":
    common.run_main(main, get_args_parser())
