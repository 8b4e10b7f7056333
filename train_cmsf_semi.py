"""CMSF, semi-supervised: mean shift constrained by true labels (labeled subset) and pseudo-labels.

Constrained Mean Shift (Navaneet, Koohpayegani, Tejankar, Pourahmadi, Subramanya & Pirsiavash, ECCV
2022).

MSF (train_msf.py) on all images, with the neighbour search of each target t restricted to bank
entries carrying t's label. Labeled images use their true label; unlabeled ones the prediction of a
small pseudo-labeler (MLP on the normalised target embedding, trained twice per epoch on a cache of
labeled target embeddings) when its softmax confidence is >= --threshold, else no label: such
samples fall back to unconstrained MSF. loss = mean over the k nearest (same-label) entries of
dist(q, z_j).

Rows (ResNet-50, ImageNet, 200 epochs, k = 10, M = 128K, weak/strong, BatchNorm over 64 images;
top-1 of the authors' semi-supervised protocol, `eval_linear.py --protocol semi --train-list
10percent.txt`): `python train_cmsf_semi.py --data /imagenet --labeled-list 10percent.txt` plus
  CMSF (pseudo), fp32, batch 256            69.9   --amp none
  CMSF (pseudo), mixed precision, batch 768 70.5   --batch-size 768 --amp bf16 (the authors: fp16)
  CMSF (labels only), fp32                  68.6   --amp none --threshold 1.01
  1 % labels, CMSF (pseudo)                  n/a   --labeled-list 1percent.txt --amp none
  MSF                                       67.4   python train_msf.py --data /imagenet --amp none \
                                                     --mem-bank-size 128000 --topk 10
  other data: a seeded per-class fraction, e.g. --dataset cifar10 --data /cifar --labeled-fraction
  0.1
The 1 % / 10 % lists are the standard SimCLR subset files (one file name per line,
n01440764_10026.JPEG). We read "68.6" as CMSF without pseudo-labels (only labeled images
constrained): a threshold above 1 gives that, as no prediction is ever that confident. The MSF row's
exact setting is not published; the command above is our closest match.
Multi-GPU: torchrun --nproc_per_node 8 train_cmsf_semi.py ...  (--batch-size is the global batch).
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common

SCRIPT = "train_cmsf_semi.py"
RESUMABLE = common.RUNTIME_FLAGS  # the flags a resumed run may change


def get_args_parser():
    p = argparse.ArgumentParser("CMSF-semi", description=__doc__.split("\n")[0], add_help=False)
    p.add_argument("--data", default=None,
                   help="dataset root (ImageFolder root with train/, or torchvision root)")
    p.add_argument("--dataset", default="imagefolder",
                   choices=["imagefolder", "cifar10", "cifar100", "stl10", "synthetic"],
                   help="dataset format")
    p.add_argument("--download", action="store_true", help="download cifar/stl10 if missing")
    p.add_argument("--synthetic-images", type=int, default=5000,
                   help="training images of --dataset synthetic")
    p.add_argument("--labeled-list", default=None,
                   help="SimCLR-style subset file: one image file name per line (e.g. "
                        "n01440764_10026.JPEG), matched against the file names of the ImageFolder "
                        "train set")
    p.add_argument("--labeled-fraction", type=float, default=None,
                   help="instead of a list: label this fraction of every class (seeded by --seed, "
                        ">= 1 per class)")
    p.add_argument("--threshold", type=float, default=0.85,
                   help="softmax confidence a pseudo-label needs to constrain an unlabeled image")
    p.add_argument("--pseudo-epochs", type=int, default=10,
                   help="pseudo-labeler epochs per training round")
    p.add_argument("--pseudo-lr", type=float, default=0.01, help="pseudo-labeler SGD learning rate")
    p.add_argument("--pseudo-batch-size", type=int, default=256, help="pseudo-labeler batch size")
    p.add_argument("--cache-size", type=int, default=0,
                   help="FIFO cache of labeled target embeddings the pseudo-labeler trains on (0: "
                        "4 x the labeled images, at most 128,000)")
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
    p.add_argument("--topk", type=int, default=10, help="number of nearest neighbours k")
    p.add_argument("--mem-bank-size", type=int, default=128_000, help="memory bank size M")
    p.add_argument("--bank-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="storage precision of the memory bank and the labeled cache")
    p.add_argument("--search-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="precision of the neighbour-search matmul (the loss stays float32)")
    p.add_argument("--augmentation", default="weak/strong", choices=common.AUGMENTATIONS,
                   help="target/query augmentations")
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
    p.add_argument("--output-dir", default="./output/cmsf_semi",
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


# ---------------------------------------------------------------- the constrained loss

def semi_cmsf_loss(query, target, assigned_labels, memory_bank, k, search_dtype=None):
    """Semi-supervised CMSF loss: mean over the k nearest bank entries z_j of t that carry t's
    assigned label of dist(q, z_j) = 2 - 2 q.z_j; a sample whose label is unknown (-1) searches the
    whole bank (plain MSF). Returns (per-sample loss, neighbour slots (B, k), valid (B, k))."""
    _, neighbour_slots, valid = common.knn_search(target, memory_bank.embeddings, k,
                                                  query_labels=assigned_labels,
                                                  key_labels=memory_bank.labels,
                                                  search_dtype=search_dtype)
    neighbours = memory_bank.embeddings[neighbour_slots]
    return common.mean_shift_loss(query, neighbours, valid), neighbour_slots, valid


# ---------------------------------------------------------------- pseudo-labels

def build_pseudo_labeler(embed_dim, num_classes, seed):
    """Linear(d, 2d) - BN - ReLU - Linear(2d, classes), initialised from `seed` alone so that every
    rank builds the same one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return common.mlp(embed_dim, 2 * embed_dim, num_classes)


@torch.no_grad()
def assign_labels(pseudo_labeler, target, true_labels, is_labeled, threshold, labeler_ready):
    """Labels that constrain the search and go into the bank: labeled -> true label; unlabeled ->
    the pseudo-labeler's prediction if its softmax confidence >= threshold, else -1 (unknown).
    Before the first labeler round every unlabeled image is unknown. Returns (assigned, predicted);
    predicted is the argmax for every sample (-1 while the labeler is untrained), for logging."""
    if labeler_ready:
        pseudo_labeler.eval()
        confidence, predicted = pseudo_labeler(target.float()).softmax(dim=1).max(dim=1)
        pseudo = torch.where(confidence >= threshold, predicted, -1)
    else:
        predicted = torch.full_like(true_labels, -1)
        pseudo = predicted
    return torch.where(is_labeled, true_labels, pseudo), predicted


def train_pseudo_labeler(pseudo_labeler, cache, epochs, lr, batch_size, seed):
    """One round: cross-entropy on the FILLED cache slots only (index >= 0; never-written slots hold
    random vectors), `epochs` passes in a seeded order, with a fresh SGD (momentum 0.9, wd 1e-4);
    the weights carry over between rounds. The BatchNorm statistics are then recomputed on the whole
    cache. Every rank trains the same data in the same order; rank 0's result is then broadcast so
    that no GPU non-determinism can make the ranks' labels differ.
    Returns the mean loss of the last epoch (None if fewer than 2 slots are filled)."""
    filled = cache.indices >= 0
    embeddings, labels = cache.embeddings[filled].float(), cache.labels[filled]
    if labels.numel() < 2:
        return None
    optimizer = torch.optim.SGD(pseudo_labeler.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    pseudo_labeler.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(labels.numel(), generator=generator).to(labels.device)
            # BatchNorm needs 2 samples
            batches = [b for b in order.split(batch_size) if b.numel() >= 2]
            losses = []
            for batch in batches:
                loss = F.cross_entropy(pseudo_labeler(embeddings[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
        # Eval-mode BatchNorm needs the statistics of the whole cache, not an EMA over a few batches
        # (a small cache gives only ~10 updates per round): one exact pass, averaged over equal
        # chunks.
        batch_norms = [m for m in pseudo_labeler.modules() if isinstance(m, torch.nn.BatchNorm1d)]
        for bn in batch_norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        with torch.no_grad():
            for chunk in embeddings.tensor_split(-(-labels.numel() // 65536)):
                pseudo_labeler(chunk)
        for bn in batch_norms:
            bn.momentum = 0.1
    pseudo_labeler.eval()
    if common.get_world_size() > 1:
        for tensor in list(pseudo_labeler.parameters()) + list(pseudo_labeler.buffers()):
            dist.broadcast(tensor.data, src=0)
    return float(torch.stack(losses).mean())


# ---------------------------------------------------------------- the labeled subset

def read_labeled_list(path, dataset):
    """Mask of the images named in a SimCLR subset file (common.read_subset_list, the reader
    eval_linear.py and eval_knn.py use too). Returns (mask, names not found)."""
    if not hasattr(dataset, "samples"):
        raise common.UsageError("--labeled-list needs --dataset imagefolder (it names image "
                                "files); use --labeled-fraction for other datasets")
    indices, not_found = common.read_subset_list(path, dataset, flag="--labeled-list")
    mask = torch.zeros(len(dataset.samples), dtype=torch.bool)
    mask[indices] = True
    return mask, not_found


def select_labeled_fraction(labels, num_classes, fraction, seed):
    """Mask labeling round(fraction x n_c) images of every class c (at least 1), chosen with
    `seed`."""
    if not 0 < fraction <= 1:
        raise common.UsageError(f"--labeled-fraction {fraction} must be in (0, 1], e.g. 0.1 for 10 "
                                f"%")
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    class_sizes = torch.bincount(labels, minlength=num_classes).tolist()
    by_class = torch.argsort(labels, stable=True).split(class_sizes)
    for members in by_class:
        if members.numel():
            count = max(1, round(fraction * members.numel()))
            mask[members[torch.randperm(members.numel(), generator=generator)[:count]]] = True
    return mask


def labeled_subset(args, base, num_classes, true_labels):
    """Boolean mask (N,) of the labeled images, from --labeled-list or --labeled-fraction."""
    if (args.labeled_list is None) == (args.labeled_fraction is None):
        raise common.UsageError("pass exactly one of --labeled-list FILE (SimCLR 1 %/10 % lists) "
                                "and --labeled-fraction F")
    if args.labeled_fraction is not None:
        return select_labeled_fraction(true_labels, num_classes, args.labeled_fraction, args.seed)
    mask, not_found = read_labeled_list(args.labeled_list, base)
    if not_found and common.is_main_process():
        print(f"warning: {len(not_found)} names in {args.labeled_list} are not in the train folder "
              f"and are skipped (first: {', '.join(not_found[:5])})", flush=True)
    return mask


# ---------------------------------------------------------------- training

class LabelerProgress:
    """How many rounds the pseudo-labeler has trained (pseudo-labels are used from the first one on)
    and its last loss; checkpointed with the labeler."""

    def __init__(self):
        self.rounds, self.last_loss = 0, None

    def state_dict(self):
        return {"rounds": self.rounds, "last_loss": self.last_loss}

    def load_state_dict(self, state):
        self.rounds, self.last_loss = state["rounds"], state["last_loss"]


def train_one_epoch(args, epoch, loader, logger, online, target_encoder, optimizer, lr_schedule,
                    memory_bank, pseudo_labeler, cache, progress, true_labels, is_labeled, device,
                    autocast_dtype, scaler, stopper):
    """One epoch of CMSF-semi. Returns the epoch's averages, or None when the run must stop."""
    iters = loader.sampler.iters_per_epoch
    channels_last = device.type == "cuda"  # GPU convolutions run faster in NHWC
    labeler_rounds_at = {max(1, iters // 2), iters}  # mid-epoch and end
    online_encoder = common.unwrap(online)[0]
    # unlabeled images seen, with a confident pseudo-label, confident and right, argmax right
    counts = torch.zeros(4, dtype=torch.long, device=device)
    for it, (views, labels, indices) in logger.log_every(loader, logger.start_iter):
        step = epoch * iters + it
        common.set_lr(optimizer, lr_schedule[step])
        target_view, query_view = common.prepare_views(views[:2], device, channels_last)
        labels, indices = labels.to(device, non_blocking=True), indices.to(device,
                                                                               non_blocking=True)

        with common.autocast(device, autocast_dtype):
            query = online(query_view)
        query = F.normalize(query.float(), dim=1)

        with torch.no_grad():
            common.ema_update_(target_encoder, online_encoder, args.ema)
            shuffled, unshuffle_index = common.batch_shuffle(target_view, args.seed, step)
            with common.autocast(device, autocast_dtype):
                target = target_encoder(shuffled)
            target = common.batch_unshuffle(F.normalize(target.float(), dim=1), unshuffle_index)
            assigned, predicted = assign_labels(pseudo_labeler, target, labels, is_labeled[indices],
                                                args.threshold, progress.rounds > 0)
            # Everything below uses the gathered global batch: bank and cache identical on all
            # ranks.
            all_target, all_labels, all_indices = (common.all_gather(x) for x in (target, labels,
                                                                                  indices))
            all_assigned, all_predicted = common.all_gather(assigned), common.all_gather(predicted)
            # Enqueue first: t is then its own nearest same-label neighbour (or nearest, if
            # unknown).
            memory_bank.enqueue(all_target, all_assigned, all_indices)
            all_is_labeled = is_labeled[all_indices]
            cache.enqueue(all_target, all_labels, all_indices, keep=all_is_labeled)
            unlabeled = ~all_is_labeled
            confident = unlabeled & (all_assigned >= 0)
            counts += torch.stack([unlabeled.sum(), confident.sum(),
                                   (confident & (all_assigned == all_labels)).sum(),
                                   (unlabeled & (all_predicted == all_labels)).sum()])

        loss_per_sample, neighbour_slots, valid = semi_cmsf_loss(query, target, assigned,
                                                                 memory_bank,
                                                                 args.topk,
                                                                 getattr(torch, args.search_dtype))
        loss = loss_per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        neighbour_indices = memory_bank.indices[neighbour_slots]
        neighbour_true = torch.where(neighbour_indices >= 0,
                                     true_labels[neighbour_indices.clamp(min=0)], -1)
        logger.update(loss=loss, purity=common.purity(neighbour_true, labels, valid),
                      constrained=(assigned >= 0).float().mean())
        if it + 1 in labeler_rounds_at:
            labeler_loss = train_pseudo_labeler(pseudo_labeler, cache, args.pseudo_epochs,
                                                args.pseudo_lr,
                                                args.pseudo_batch_size,
                                                seed=args.seed * 1_000_003 + progress.rounds)
            # rounds > 0 means "trained at least once": pseudo-labels used
            if labeler_loss is not None:
                progress.rounds, progress.last_loss = progress.rounds + 1, labeler_loss
        logger.step(it, lr=lr_schedule[step])
        if (it + 1) % args.print_freq == 0 or it + 1 == iters:
            slot_images = memory_bank.indices
            bank_true = torch.where(slot_images >= 0, true_labels[slot_images.clamp(min=0)], -1)
            logger.update(**common.neighbour_diagnostics(target, labels, memory_bank.embeddings,
                                                         bank_true,
                                                         query_labels=assigned,
                                                         key_labels=memory_bank.labels))
            common.check_finite(loss, epoch, it)
        # SLURM's signal, --checkpoint-minutes, --stop-after-iters
        if stopper.checkpoint_if_due(it, iters, epoch, loss, logger):
            return None
    seen, covered, covered_right, argmax_right = counts.tolist()
    return {**logger.averages(),
            # unlabeled images given a confident pseudo-label
            "pseudo_coverage": covered / max(seen, 1),
            # of those confident labels
            "pseudo_accuracy": covered_right / covered if covered else None,
            "pseudo_argmax_accuracy": argmax_right / max(seen, 1),  # the labeler's plain accuracy
            "labeler_loss": progress.last_loss, "labeler_rounds": progress.rounds}


def main(args):
    device = common.start_training(args)  # distributed init, flag checks, seeds, provenance
    autocast_dtype = common.amp_dtype(args.amp, device)  # None: float32
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    workers = common.default_workers(args.workers)
    if args.pseudo_epochs < 1 or args.pseudo_batch_size < 2:
        raise common.UsageError("--pseudo-epochs must be >= 1 and --pseudo-batch-size >= 2 "
                                "(BatchNorm)")
    if args.threshold < 0:
        raise common.UsageError(f"--threshold {args.threshold} must be >= 0 (a softmax confidence; "
                                "> 1 disables pseudo-labels)")

    # ============ data: all images feed the loss; the loader yields true labels, used only where
    # is_labeled ============
    base, num_classes = common.build_dataset(args.dataset, args.data, "train", args.download,
                                             args.image_size, args.synthetic_images)
    local_batch_size = common.check_dataset_size(len(base), args, common.get_world_size())
    true_labels = common.dataset_targets(base)
    is_labeled = labeled_subset(args, base, num_classes, true_labels)
    cache_size = args.cache_size or min(128_000, 4 * int(is_labeled.sum()))
    if cache_size < 2:
        raise common.UsageError(f"--cache-size {args.cache_size} must be at least 2")
    views = common.two_view_transform(args.augmentation, args.image_size,
                                      common.resolve_on_device(args.augment_on, device))
    dataset = common.IndexedDataset(base, views)
    sampler = common.ResumableSampler(len(dataset), args.batch_size, seed=args.seed)
    loader = common.make_train_loader(dataset, sampler, workers, device)

    # ============ networks: online = encoder + predictor, target = EMA copy of the encoder =====
    online, target_encoder = common.build_online_and_target(args.arch, args.image_size, args.seed,
                                                            device, device.type == "cuda",
                                                            args.bn_batch_size, local_batch_size)
    encoder = online[0]
    bank_dtype = getattr(torch, args.bank_dtype)
    memory_bank = common.MemoryBank(args.mem_bank_size, encoder.embed_dim, bank_dtype,
                                    seed=args.seed).to(device)
    # A MemoryBank is exactly the FIFO the labeled cache needs; index -1 marks never-filled slots.
    cache = common.MemoryBank(cache_size, encoder.embed_dim, bank_dtype,
                              seed=args.seed).to(device)
    pseudo_labeler = build_pseudo_labeler(encoder.embed_dim, num_classes, args.seed).to(device)
    progress = LabelerProgress()
    optimizer, lr_schedule = common.sgd_with_cosine_schedule(online.parameters(), args,
                                                             sampler.iters_per_epoch)

    knn_monitor = common.knn_monitor_from_args(args, base, num_classes, device, workers,
                                               autocast_dtype)

    # ============ resume: what a checkpoint holds ============
    to_save = {"online": online, "target": target_encoder, "optimizer": optimizer,
               "memory_bank": memory_bank, "cache": cache, "pseudo_labeler": pseudo_labeler,
               "labeler": progress, "scaler": scaler,
               "is_labeled": common.MustMatch(is_labeled, "--labeled-list/--labeled-fraction")}
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
        num_labeled = int(is_labeled.sum())
        print(f"{SCRIPT}: {args.arch}, {len(dataset)} images ({num_labeled} labeled, "
              f"{num_labeled / len(dataset):.2%}), {num_classes} classes, "
              f"{common.get_world_size()} process(es) on {device}, global batch "
              f"{args.batch_size}, {sampler.iters_per_epoch} it/epoch, bank {args.mem_bank_size} "
              f"x {encoder.embed_dim} {args.bank_dtype} "
              f"({memory_bank.embeddings.nbytes / 2**20:.1f} MiB), labeled cache {cache_size}, "
              f"k={args.topk}, threshold {args.threshold}, {args.augmentation}, amp "
              f"{common.amp_name(autocast_dtype)}, {workers} loader workers", flush=True)

    # ============ training ============
    online_ddp = common.ddp(online)
    true_labels, is_labeled = true_labels.to(device), is_labeled.to(device)
    stopper = common.TrainingStopper(args, SCRIPT, device, to_save)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, start_iter)
        logger = common.MetricLogger(f"Epoch [{epoch + 1}/{args.epochs}]",
                                     sampler.iters_per_epoch, args.batch_size, args.print_freq,
                                     start_iter, metrics)
        start = time.time()
        stats = train_one_epoch(args, epoch, loader, logger, online_ddp, target_encoder, optimizer,
                                lr_schedule, memory_bank, pseudo_labeler, cache, progress,
                                true_labels, is_labeled, device, autocast_dtype, scaler, stopper)
        if stats is None:  # stopped mid-epoch (--stop-after-iters); checkpoint written
            break
        start_iter, metrics = 0, None
        if common.is_main_process():
            accuracy = stats["pseudo_accuracy"]
            print(f"epoch {epoch + 1}: pseudo-labels on unlabeled images: coverage "
                  f"{stats['pseudo_coverage']:.2%}, accuracy "
                  f"{'n/a' if accuracy is None else f'{accuracy:.2%}'} (argmax "
                  f"{stats['pseudo_argmax_accuracy']:.2%}); purity {stats['purity']:.4f}",
                  flush=True)
        record = {"epoch": epoch + 1, **stats,
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


if __name__ == "__main__":
    common.run_main(main, get_args_parser())
