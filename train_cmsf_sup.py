"""CMSF, supervised and noisy-supervised: mean shift constrained to neighbours of the same label.

Constrained Mean Shift (Navaneet, Koohpayegani, Tejankar, Pourahmadi, Subramanya & Pirsiavash, ECCV
2022).

MSF (train_msf.py) with the neighbour search restricted to bank entries that carry the sample's own
(possibly noisy) training label: loss = mean over the k nearest same-label entries z_j of the target
t of dist(q, z_j). The search still picks the nearest within the class, so a few wrong labels in the
class only add a few far-away candidates (robustness to label noise). `--topk 0` ("top-all") pulls q
towards every same-label entry in the bank.

Rows (ResNet-50, ImageNet, 200 epochs, batch 256, M = 128K, weak/strong, BatchNorm over 64 images,
float32). The papers and posters give no numbers for these rows (the CMSF poster shows a figure
only: "relatively robust to label noise"): `python train_cmsf_sup.py --data /imagenet --amp none`
plus
  supervised, k = 10      (no more flags)
  supervised, top-all     --topk 0
  noisy 5/10/25/50 %      --label-noise 0.05 (0.10, 0.25, 0.50)
  fixed noisy list        --noisy-labels noisy_25.txt
  Xent baseline           --loss xent --label-noise 0.25 (the same labels, cross-entropy)
For comparison (MSF poster): MSF w/s (128K) 72.1 / 62.0 / 65.2 linear / 1-NN / 20-NN.
Multi-GPU: torchrun --nproc_per_node 8 train_cmsf_sup.py ...  (--batch-size is the global batch).
Purity in the log is measured against the CLEAN labels, so with noise it shows how often the
same-noisy-label neighbours are truly of the sample's class.
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F

import common

SCRIPT = "train_cmsf_sup.py"
RESUMABLE = common.RUNTIME_FLAGS  # the flags a resumed run may change


def get_args_parser():
    p = argparse.ArgumentParser("CMSF-sup", description=__doc__.split("\n")[0], add_help=False)
    p.add_argument("--data", default=None,
                   help="dataset root (ImageFolder root with train/, or torchvision root)")
    p.add_argument("--dataset", default="imagefolder",
                   choices=["imagefolder", "cifar10", "cifar100", "stl10", "synthetic"],
                   help="dataset format")
    p.add_argument("--download", action="store_true", help="download cifar/stl10 if missing")
    p.add_argument("--synthetic-images", type=int, default=5000,
                   help="training images of --dataset synthetic")
    p.add_argument("--label-noise", type=float, default=0.0,
                   help="replace exactly round(FRACTION x N) training labels by a uniformly random "
                        "other class (seeded by --seed)")
    p.add_argument("--noisy-labels", default=None,
                   help="file of 'relative/path label' lines (path relative to the train folder; "
                        "label = class folder name, or class index when it is not a folder name) "
                        "giving the training label of every image (imagefolder only)")
    p.add_argument("--loss", default="cmsf", choices=["cmsf", "xent"],
                   help="cmsf: the supervised CMSF loss; xent: the cross-entropy baseline (a "
                        "linear classifier on the backbone, same labels, schedule and query "
                        "augmentation)")
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
    p.add_argument("--topk", type=int, default=10,
                   help="number of same-label nearest neighbours k; 0 = all same-label bank "
                        "entries (top-all)")
    p.add_argument("--mem-bank-size", type=int, default=128_000, help="memory bank size M")
    p.add_argument("--bank-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="storage precision of the memory bank (half halves its memory)")
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
    p.add_argument("--output-dir", default="./output/cmsf_sup",
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

def constrained_topk_loss(query, target, labels, memory_bank, k, search_dtype=None):
    """Supervised CMSF loss (paper eq. 1 with C = same label): mean over the k nearest bank entries
    z_j of t among those with the sample's label, of dist(q, z_j) = 2 - 2 q.z_j. A class with fewer
    than k entries in the bank averages over the ones it has (never filled with other classes).
    Returns (per-sample loss, neighbour slots (B, k), valid (B, k))."""
    _, neighbour_slots, valid = common.knn_search(target, memory_bank.embeddings, k,
                                                  query_labels=labels,
                                                  key_labels=memory_bank.labels,
                                                  search_dtype=search_dtype)
    neighbours = memory_bank.embeddings[neighbour_slots]
    return common.mean_shift_loss(query, neighbours, valid), neighbour_slots, valid


def top_all_loss(query, labels, memory_bank, num_classes):
    """Top-all: mean over ALL bank entries z_j of the sample's class of 2 - 2 q.z_j, which is
    exactly 2 - 2 q.mean_j(z_j); the per-class means come from one index_add over the bank instead
    of a B x M matrix (empty slots, label -1, add zero: no boolean mask, no host sync). Returns
    (per-sample loss, number of same-class entries per sample)."""
    filled = (memory_bank.labels >= 0).float()  # (M,)
    bank_labels = memory_bank.labels.clamp(min=0)
    class_sums = torch.zeros(num_classes, memory_bank.embeddings.shape[1], device=query.device)
    class_sums.index_add_(0, bank_labels, memory_bank.embeddings.float() * filled.unsqueeze(1))
    class_counts = torch.zeros(num_classes, device=query.device).index_add_(0, bank_labels, filled)
    counts = class_counts[labels].long()
    class_means = class_sums[labels] / counts.clamp(min=1).unsqueeze(1)
    loss = 2 - 2 * (query.float() * class_means).sum(dim=1)
    return loss * (counts > 0), counts  # no entry of the class: no pull, as in mean_shift_loss


@torch.no_grad()
def clean_labels_of_slots(memory_bank, slots, clean_labels):
    """Clean label of the images held in bank `slots` (-1 for slots never written)."""
    indices = memory_bank.indices[slots]
    return torch.where(indices >= 0, clean_labels[indices.clamp(min=0)], -1)


@torch.no_grad()
def top_all_purity(labels, clean, memory_bank, clean_labels, num_classes):
    """Purity of top-all: over all same-(training)-label bank entries of every sample, the fraction
    whose clean label equals the sample's clean label. Counts the bank's (training label, clean
    label) pairs in a classes x classes table (no B x M matrix, no host sync)."""
    filled = (memory_bank.labels >= 0).float()
    bank_clean = clean_labels_of_slots(memory_bank,
                                       torch.arange(memory_bank.size, device=filled.device),
                                       clean_labels)
    pairs = memory_bank.labels.clamp(min=0) * num_classes + bank_clean.clamp(min=0)
    table = torch.zeros(num_classes * num_classes, device=filled.device).index_add_(0, pairs,
                                                                                    filled)
    table = table.view(num_classes, num_classes)  # [training label, clean label] -> count
    same = table[labels, clean]
    total = table.sum(dim=1)[labels]
    return same.sum() / total.sum().clamp(min=1)


# ---------------------------------------------------------------- training labels (clean or noisy)

def make_noisy_labels(clean_labels, num_classes, fraction, seed):
    """Exactly round(fraction x N) labels, chosen at random, each replaced by a uniformly random
    OTHER class (offset 1..C-1 modulo C). Reproducible: depends only on (labels, fraction, seed)."""
    if not 0.0 <= fraction <= 1.0:
        raise common.UsageError(f"--label-noise {fraction} must be a fraction in [0, 1], e.g. 0.25 "
                                f"for 25 %")
    if fraction > 0 and num_classes < 2:
        raise common.UsageError("--label-noise needs at least 2 classes")
    generator = torch.Generator().manual_seed(seed)
    num_noisy = round(fraction * len(clean_labels))
    chosen = torch.randperm(len(clean_labels), generator=generator)[:num_noisy]
    offsets = torch.randint(1, max(num_classes, 2), (num_noisy,), generator=generator)
    noisy = clean_labels.clone()
    noisy[chosen] = (clean_labels[chosen] + offsets) % num_classes
    return noisy


def read_noisy_label_file(path, dataset):
    """Training labels from a file of 'relative/path label' lines, one per training image of an
    ImageFolder (path relative to its train/ folder). Unknown paths, images without a line,
    duplicates and unknown labels are errors that name the first few offenders."""
    if not hasattr(dataset, "samples"):
        raise common.UsageError("--noisy-labels needs --dataset imagefolder (it names images by "
                                "path); use --label-noise for other datasets")
    if not os.path.isfile(path):
        raise common.UsageError(f"--noisy-labels {path} does not exist")
    index_of = {os.path.relpath(p, dataset.root).replace(os.sep, "/"): i
                for i, (p, _) in enumerate(dataset.samples)}
    num_classes = len(dataset.classes)
    labels = torch.full((len(dataset.samples),), -1, dtype=torch.long)
    unknown, duplicates = [], []
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.strip().rsplit(None, 1)
            if len(parts) != 2:
                raise common.UsageError(f"{path} line {line_number}: expected 'relative/path "
                                        f"label', got {line.strip()!r}")
            rel_path, token = parts[0].replace("\\", "/").removeprefix("./"), parts[1]
            if token in dataset.class_to_idx:
                label = dataset.class_to_idx[token]
            elif token.lstrip("-").isdigit() and 0 <= int(token) < num_classes:
                label = int(token)
            else:
                raise common.UsageError(
                    f"{path} line {line_number}: label {token!r} is neither a class folder name "
                    f"nor a class index in 0..{num_classes - 1}; write the class folder name (e.g. "
                    f"{dataset.classes[0]}) or its index")
            if rel_path not in index_of:
                unknown.append(rel_path)
            elif labels[index_of[rel_path]] >= 0:
                duplicates.append(rel_path)
            else:
                labels[index_of[rel_path]] = label
    missing = [p for p, i in index_of.items() if labels[i] < 0]
    for problem, names in (("are not images of the train folder", unknown),
                           ("appear more than once", duplicates)):
        if names:
            raise common.UsageError(f"{len(names)} paths in {path} {problem} (first: "
                                    f"{', '.join(names[:3])}); paths must be relative to "
                                    f"{dataset.root}, e.g. n01440764/n01440764_10026.JPEG")
    if missing:
        raise common.UsageError(f"{len(missing)} of {len(index_of)} training images have no line "
                                f"in {path} (first: {', '.join(missing[:3])}); the file must label "
                                f"every image")
    return labels


def training_labels(args, base, num_classes):
    """(clean labels, training labels) by dataset index; the training labels are what the bank
    stores."""
    clean_labels = common.dataset_targets(base)
    if args.noisy_labels and args.label_noise:
        raise common.UsageError("--noisy-labels and --label-noise are exclusive; pass one of them")
    if args.noisy_labels:
        return clean_labels, read_noisy_label_file(args.noisy_labels, base)
    return clean_labels, make_noisy_labels(clean_labels, num_classes, args.label_noise, args.seed)


class XentNetwork(torch.nn.Sequential):
    """The Xent baseline: [encoder, linear classifier]; logits = classifier(backbone(x)) (the
    encoder's projection is not used)."""

    def forward(self, images):
        return self[1](self[0].backbone(images))


# ---------------------------------------------------------------- training

def train_one_epoch(args, epoch, loader, logger, online, target_encoder, optimizer, lr_schedule,
                    memory_bank, clean_labels, num_classes, device, autocast_dtype, scaler,
                    stopper):
    """One epoch of CMSF-sup. Returns the epoch's averages, or None when the run must stop
    mid-epoch."""
    iters = loader.sampler.iters_per_epoch
    channels_last = device.type == "cuda"  # GPU convolutions run faster in NHWC
    online_encoder = common.unwrap(online)[0]
    for it, (views, labels, indices) in logger.log_every(loader, logger.start_iter):
        step = epoch * iters + it
        common.set_lr(optimizer, lr_schedule[step])
        target_view, query_view = common.prepare_views(views[:2], device, channels_last)
        labels, indices = labels.to(device, non_blocking=True), indices.to(device,
                                                                               non_blocking=True)

        clean = clean_labels[indices]
        # the baseline: a linear classifier's cross-entropy on the same labels
        if args.loss == "xent":
            with common.autocast(device, autocast_dtype):
                logits = online(query_view)
            loss_per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
            purity = (logits.argmax(dim=1) == clean).float().mean()  # train accuracy, clean labels
            counts = torch.zeros(1, device=device)
        else:
            with common.autocast(device, autocast_dtype):
                query = online(query_view)
            query = F.normalize(query.float(), dim=1)

            with torch.no_grad():
                common.ema_update_(target_encoder, online_encoder, args.ema)
                shuffled, unshuffle_index = common.batch_shuffle(target_view, args.seed, step)
                with common.autocast(device, autocast_dtype):
                    target = target_encoder(shuffled)
                target = common.batch_unshuffle(F.normalize(target.float(), dim=1), unshuffle_index)
                # Enqueue first (with the TRAINING labels): t is then its own nearest same-label
                # neighbour.
                memory_bank.enqueue(common.all_gather(target), common.all_gather(labels),
                                    common.all_gather(indices))

            if args.topk == 0:
                loss_per_sample, counts = top_all_loss(query, labels, memory_bank, num_classes)
                purity = top_all_purity(labels, clean, memory_bank, clean_labels, num_classes)
            else:
                loss_per_sample, neighbour_slots, valid = constrained_topk_loss(
                    query, target, labels, memory_bank, args.topk,
                    getattr(torch, args.search_dtype))
                counts = valid.sum(dim=1)
                purity = common.purity(clean_labels_of_slots(memory_bank, neighbour_slots,
                                                             clean_labels),
                                       clean, valid)
        loss = loss_per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        logger.update(loss=loss, purity=purity, neighbours=counts.float().mean())
        logger.step(it, lr=lr_schedule[step])
        if ((it + 1) % args.print_freq == 0 or it + 1 == iters) and args.loss == "cmsf":
            all_slots = torch.arange(args.mem_bank_size, device=device)
            bank_clean = clean_labels_of_slots(memory_bank, all_slots, clean_labels)
            logger.update(**common.neighbour_diagnostics(target, clean, memory_bank.embeddings,
                                                         bank_clean,
                                                         query_labels=labels,
                                                         key_labels=memory_bank.labels))
        if (it + 1) % args.print_freq == 0 or it + 1 == iters:
            common.check_finite(loss, epoch, it)
        # SLURM's signal, --checkpoint-minutes, --stop-after-iters
        if stopper.checkpoint_if_due(it, iters, epoch, loss, logger):
            return None
    return logger.averages()


def main(args):
    device = common.start_training(args, min_topk=0)  # distributed init, checks, seeds, provenance
    autocast_dtype = common.amp_dtype(args.amp, device)  # None: float32
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    workers = common.default_workers(args.workers)

    # ============ data: the loader yields the TRAINING (possibly noisy) labels; the clean ones
    # are kept for purity ============
    base, num_classes = common.build_dataset(args.dataset, args.data, "train", args.download,
                                             args.image_size, args.synthetic_images)
    local_batch_size = common.check_dataset_size(len(base), args, common.get_world_size())
    clean_labels, train_labels = training_labels(args, base, num_classes)
    views = common.two_view_transform(args.augmentation, args.image_size,
                                      common.resolve_on_device(args.augment_on, device))
    dataset = common.IndexedDataset(base, views, labels=train_labels)
    sampler = common.ResumableSampler(len(dataset), args.batch_size, seed=args.seed)
    loader = common.make_train_loader(dataset, sampler, workers, device)

    # ============ networks: online = encoder + predictor, target = EMA copy of the encoder =====
    online, target_encoder = common.build_online_and_target(args.arch, args.image_size, args.seed,
                                                            device, device.type == "cuda",
                                                            args.bn_batch_size, local_batch_size)
    encoder = online[0]
    if args.loss == "xent":  # a linear classifier replaces the predictor; the projection is unused
        online[1] = torch.nn.Linear(encoder.feat_dim, num_classes).to(device)
        encoder.projection.requires_grad_(False)
        online = XentNetwork(*online)
    memory_bank = common.MemoryBank(args.mem_bank_size, encoder.embed_dim,
                                    getattr(torch, args.bank_dtype), seed=args.seed).to(device)
    optimizer, lr_schedule = common.sgd_with_cosine_schedule(online.parameters(), args,
                                                             sampler.iters_per_epoch)
    knn_monitor = common.knn_monitor_from_args(args, base, num_classes, device, workers,
                                               autocast_dtype)

    # ============ resume: what a checkpoint holds ============
    to_save = {"online": online, "target": target_encoder, "optimizer": optimizer,
               "memory_bank": memory_bank, "scaler": scaler,
               "train_labels": common.MustMatch(train_labels, "--label-noise/--noisy-labels")}
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
        num_noisy = int((train_labels != clean_labels).sum())
        print(f"{SCRIPT}: {args.arch}, {len(dataset)} images, {num_classes} classes, "
              f"{common.get_world_size()} process(es) on {device}, global batch "
              f"{args.batch_size}, {sampler.iters_per_epoch} it/epoch, bank {args.mem_bank_size} "
              f"x {encoder.embed_dim} {args.bank_dtype} "
              f"({memory_bank.embeddings.nbytes / 2**20:.1f} MiB), "
              f"k={args.topk or 'all same-label'}, {args.augmentation}, amp "
              f"{common.amp_name(autocast_dtype)}, {workers} loader workers", flush=True)
        print(f"noisy training labels: {num_noisy} of {len(train_labels)} "
              f"({num_noisy / len(train_labels):.2%})"
              + (f" from {args.noisy_labels}" if args.noisy_labels
                 else f", --label-noise {args.label_noise}"),
              flush=True)

    # ============ training ============
    online_ddp = common.ddp(online)
    clean_labels = clean_labels.to(device)
    stopper = common.TrainingStopper(args, SCRIPT, device, to_save)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, start_iter)
        logger = common.MetricLogger(f"Epoch [{epoch + 1}/{args.epochs}]",
                                     sampler.iters_per_epoch, args.batch_size, args.print_freq,
                                     start_iter, metrics)
        start = time.time()
        stats = train_one_epoch(args, epoch, loader, logger, online_ddp, target_encoder, optimizer,
                                lr_schedule, memory_bank, clean_labels, num_classes, device,
                                autocast_dtype, scaler, stopper)
        if stats is None:  # stopped mid-epoch (--stop-after-iters); checkpoint written
            break
        start_iter, metrics = 0, None
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
