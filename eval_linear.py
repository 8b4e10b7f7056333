"""Linear evaluation of a frozen backbone (the MSF/CompRess protocol), and the authors'
semi-supervised fine-tune protocol (--protocol semi).

The backbone is frozen and in eval mode (BatchNorm uses its running statistics). The head is
  L2-normalise -> fixed standardisation -> Linear,
where the standardisation uses the per-dimension mean and variance of the normalised TRAIN features,
computed once with the val transform: z = (x / |x| - mean) / sqrt(var + 1e-5). SGD lr 0.01 (not
scaled with the batch), momentum 0.9, wd 1e-4, batch 256, 40 epochs, lr x 0.1 at epochs 15 and 30.
Train images: RandomResizedCrop + horizontal flip; val: Resize(256) + CenterCrop(224) (scaled for
other
--image-size). Top-1 / top-5 on val after every epoch; final and best reported. The backbone is
frozen, so val features are extracted once and every epoch scores the head on them (what a per-epoch
val pass would compute). After training, the backbone's weights are compared with the loaded ones
(MoCo's sanity check).

--train-list FILE trains on a subset (the 1 % / 10 % ImageNet files of SimCLR: one image file name
per line, e.g. n01440764_10026.JPEG); names not found in the train folder are reported.

--protocol semi (the CMSF semi-supervised rows 67.4 ... 70.5 use it, not the linear probe): the
backbone's weights stay frozen (its forward runs under no_grad) but it is in TRAIN mode while the
head trains, so its BatchNorm running statistics adapt to the labeled subset; it is evaluated in
eval mode with those statistics. Head: L2-normalise -> fixed standardisation (of the subset's
features, computed once) -> Linear(c, c) -> BatchNorm1d(c) -> ReLU -> Linear(c, classes). SGD lr
0.001, momentum 0.9, wd 1e-4, 20 epochs, lr x 0.1 at epoch 15; train aug RandomResizedCrop + flip.
Val is scored once, after training. checkpoint.pth holds the head and the backbone with its adapted
statistics ("backbone", loadable with --weights). Under DDP the ranks' BatchNorm statistics are
averaged after every epoch.
  python eval_linear.py --protocol semi --data /imagenet --train-list 10percent.txt \\
      --weights runs/cmsf_semi/checkpoint.pth --output-dir runs/cmsf_semi/semi_eval
--cached-features is a faster approximation: the head trains on center-crop features extracted once
(no augmentation), minutes instead of hours.

Paper rows (ResNet-50, ImageNet, linear top-1), weights from train_msf.py / train_cmsf_self.py:
  random init 5.1          python eval_linear.py --data /imagenet --arch resnet50 --output-dir
  runs/random/linear every trained row        torchrun --nproc_per_node 8 eval_linear.py --data
  /imagenet \\
                               --weights runs/msf/checkpoint.pth --output-dir runs/msf/linear
  (BYOL-asym 69.3, MSF s/s 71.4, MSF w/s 1M 72.4, 256K 72.2, w/w 66.3, CMSF self 2Q 73.0, multi-crop
  74.4) 1 % / 10 % (MSF w/s 55.5 / 66.5): add --train-list 1percent.txt (or 10percent.txt) and a
  separate
                               --output-dir
--arch and --image-size are read from our training checkpoints.
Laptop: python eval_linear.py --dataset synthetic --epochs 10 \\
            --batch-size 64 --weights runs/msf/checkpoint.pth --cached-features
The head resumes from <output-dir>/checkpoint.pth (written atomically every epoch and on
SIGUSR2/TERM).
"""
import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

import common

SCRIPT = "eval_linear.py"
# The flags a resumed evaluation must keep (what its head is trained on); the others may change.
KEPT = {"weights", "train_list", "cached_features", "image_size", "protocol", "arch"}


def get_args_parser():
    p = argparse.ArgumentParser("Linear evaluation", description=__doc__.split("\n")[0],
                                add_help=False)
    p.add_argument("--weights", default=None,
                   help="checkpoint of our training scripts, torchvision ResNet state dict, or "
                        "released MSF/CMSF checkpoint (absent: random init)")
    p.add_argument("--data", default=None,
                   help="dataset root (ImageFolder root with train/ and val/, or torchvision root)")
    p.add_argument("--dataset", default="imagefolder",
                   choices=["imagefolder", "cifar10", "cifar100", "stl10", "synthetic"],
                   help="dataset format")
    p.add_argument("--download", action="store_true", help="download cifar/stl10 if missing")
    p.add_argument("--synthetic-images", type=int, default=5000,
                   help="training images of --dataset synthetic")
    p.add_argument("--unsafe-load", action="store_true",
                   help="load a --weights file that pickles Python objects besides tensors (old "
                        "third-party releases); this can run code: trusted files only")
    p.add_argument("--protocol", default="linear", choices=["linear", "semi"],
                   help="linear: frozen eval-mode backbone + linear head; semi: the authors' "
                        "semi-supervised protocol (BatchNorm statistics adapt, MLP head; see the "
                        "docstring)")
    p.add_argument("--arch", default=None,
                   help="torchvision ResNet of the weights (None: read from our training "
                        "checkpoints, else resnet50)")
    p.add_argument("--image-size", type=int, default=None,
                   help="crop size; <= 64 uses the small-image stem (None: read from our training "
                        "checkpoints, else 224)")
    p.add_argument("--train-list", default=None,
                   help="train on the images named in this file (1 %% / 10 %% subsets, SimCLR "
                        "format: one file name per line); needs --dataset imagefolder")
    p.add_argument("--cached-features", action="store_true",
                   help="faster approximation: train the head on center-crop features extracted "
                        "once instead of augmented images")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (None: 40 linear, 20 semi)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="global batch size over all processes")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate, not scaled with the batch size (None: 0.01 linear, 0.001 "
                        "semi)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--wd", type=float, default=1e-4, help="weight decay of the head")
    p.add_argument("--lr-drops", type=int, nargs="*", default=None,
                   help="epochs where lr is multiplied by 0.1 (None: 15 30 linear, 15 semi)")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="mixed precision of the backbone forward (the head is float32); None: bf16 "
                        "on GPU, none on CPU")
    p.add_argument("--workers", type=int, default=8, help="data-loading processes per process")
    p.add_argument("--output-dir", default="./output/linear",
                   help="checkpoint.pth, log.jsonl, linear_results.json")
    p.add_argument("--resume", default=None,
                   help="head checkpoint; None: <output-dir>/checkpoint.pth if it exists")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the head's initialisation and data order")
    p.add_argument("--print-freq", type=int, default=50, help="iterations between progress lines")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


# ---------------------------------------------------------------- the head

class LinearHead(nn.Module):
    """L2-normalise -> fixed standardisation (buffers, never trained) -> Linear."""

    def __init__(self, feat_dim, num_classes):
        super().__init__()
        self.register_buffer("mean", torch.zeros(feat_dim))
        self.register_buffer("inv_std", torch.ones(feat_dim))
        self.linear = nn.Linear(feat_dim, num_classes)

    @torch.no_grad()
    def set_standardisation(self, train_features, eps=1e-5):
        """Per-dimension mean and (unbiased) variance of the L2-normalised train features,
        accumulated in float64 over row chunks (1.28M x 2048 never needs a float64 copy)."""
        total = torch.zeros(train_features.shape[1], dtype=torch.float64,
                            device=train_features.device)
        total_sq = torch.zeros_like(total)
        for chunk in train_features.split(65536):
            normalized = F.normalize(chunk.float(), dim=1).double()
            total += normalized.sum(0)
            total_sq += normalized.square().sum(0)
        n = train_features.shape[0]
        mean = total / n
        var = (total_sq - n * mean.square()) / max(n - 1, 1)
        self.mean.copy_(mean.float())
        self.inv_std.copy_(var.clamp(min=0).add(eps).rsqrt().float())

    def standardise(self, features):
        return (F.normalize(features.float(), dim=1) - self.mean) * self.inv_std

    def forward(self, features):
        return self.linear(self.standardise(features))


class SemiHead(LinearHead):
    """The semi-supervised protocol's head: L2-normalise -> fixed standardisation -> Linear(c, c) ->
    BatchNorm1d(c) -> ReLU -> Linear(c, classes)."""

    def __init__(self, feat_dim, num_classes):
        super().__init__(feat_dim, num_classes)
        self.linear = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.BatchNorm1d(feat_dim),
                                    nn.ReLU(inplace=True),
                                    nn.Linear(feat_dim, num_classes))


def lr_at_epoch(base_lr, epoch, drops):
    """Step schedule: x 0.1 at each epoch listed in `drops` (0-based epochs, as MultiStepLR)."""
    return base_lr * 0.1 ** sum(epoch >= d for d in drops)


@torch.no_grad()
def topk_accuracy(logits, labels, ks=(1, 5)):
    """Percent of rows whose label is among the k highest logits, for each k (capped at
    #classes)."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels.unsqueeze(1)
    return [100 * hits[:, :k].any(dim=1).float().mean().item() for k in ks]


@torch.no_grad()
def evaluate(head, val_features, val_labels, chunk_size=8192):
    logits = torch.cat([head(chunk) for chunk in val_features.split(chunk_size)])
    return topk_accuracy(logits, val_labels)


def check_backbone_unchanged(backbone, reference_state, weights_only=False):
    """MoCo's sanity check, strict: every tensor of the backbone (BatchNorm statistics included;
    with weights_only=True, as in the semi protocol, only the parameters) must equal the state
    loaded before training. Raises RuntimeError naming the changed tensors."""
    current = backbone.state_dict()
    names = {name for name, _ in backbone.named_parameters()} if weights_only else reference_state
    changed = [k for k, v in reference_state.items()
               if k in names and not torch.equal(current[k].detach().cpu(), v)]
    if changed:
        raise RuntimeError(f"the frozen backbone changed during linear evaluation ({len(changed)} "
                           f"tensors, e.g. {', '.join(changed[:4])}); the probe is invalid")


# ---------------------------------------------------------------- data

def train_augmentation(image_size):
    return transforms.Compose([transforms.RandomResizedCrop(image_size),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               transforms.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])


# ---------------------------------------------------------------- training

def average_batchnorm_statistics(module):
    """Average the BatchNorm running statistics over the ranks (semi protocol under DDP: each rank
    adapted them on its own shard)."""
    if common.get_world_size() > 1:
        for name, buffer in module.named_buffers():
            if "running_" in name:
                torch.distributed.all_reduce(buffer)
                buffer /= common.get_world_size()


def train_one_epoch(args, device, epoch, batches, iters, start_iter, features_of, head, optimizer,
                    lr,
                    preemption, save):
    """One epoch over `batches` of (inputs, labels): images (augmented mode) or cached features."""
    logger = common.MetricLogger(f"Epoch [{epoch + 1}/{args.epochs}]", iters, args.batch_size,
                                 args.print_freq, start_iter)
    for group in optimizer.param_groups:
        group["lr"] = lr
    for it, (inputs, labels) in enumerate(batches, start=start_iter):
        features = features_of(inputs.to(device, non_blocking=True))
        loss = F.cross_entropy(head(features), labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        logger.update(loss=loss)
        logger.step(it, lr=lr)
        if (it + 1) % 10 == 0 and it + 1 < iters and preemption.poll(device)[0]:
            preemption.exit(save(epoch, it + 1))
    return logger.averages()


PROTOCOL_DEFAULTS = {"linear": {"epochs": 40, "lr": 0.01, "lr_drops": [15, 30]},
                     "semi": {"epochs": 20, "lr": 0.001, "lr_drops": [15]}}


def main(args):
    device = common.init_distributed(args.device)
    world_size, rank = common.get_world_size(), common.get_rank()
    for name, value in PROTOCOL_DEFAULTS[args.protocol].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    semi = args.protocol == "semi"
    if args.batch_size < world_size or args.batch_size % world_size:
        raise common.UsageError(f"--batch-size {args.batch_size} (global) must be a positive "
                                f"multiple of the number of processes ({world_size})")
    if args.weights and not os.path.isfile(args.weights):
        raise common.UsageError(f"--weights {args.weights} does not exist; pass a checkpoint file "
                                "or omit it for a random-init baseline")
    if semi and args.cached_features:
        raise common.UsageError("--cached-features cannot run --protocol semi (its BatchNorm "
                                "statistics adapt to augmented images); drop one of them")
    checkpoint = common.read_weights_file(args.weights, args.unsafe_load) if args.weights else {}
    args.arch, args.image_size = common.resolve_arch_and_image_size(checkpoint, args.weights,
                                                                    args.arch,
                                                                    args.image_size)
    autocast_dtype = common.amp_dtype(args.amp, device)
    common.fix_random_seeds(args.seed)
    torch.manual_seed(args.seed)  # the same random init (no --weights) on every rank
    log = print if rank == 0 else (lambda *a, **k: None)

    # ---- data (checked before anything is written)
    train_base, num_classes = common.build_dataset(args.dataset, args.data, "train", args.download,
                                                   args.image_size, args.synthetic_images)
    val_base, _ = common.build_dataset(args.dataset, args.data, "val", args.download,
                                       args.image_size,
                                       args.synthetic_images)
    unmatched = []
    if args.train_list:
        indices, unmatched = common.read_subset_list(args.train_list, train_base)
        log(f"--train-list {args.train_list}: {len(indices) + len(unmatched)} names, "
            f"{len(indices)} images matched, {len(unmatched)} not found in the train folder"
            + (f" (e.g. {', '.join(unmatched[:3])})" if unmatched else ""), flush=True)
        train_base = torch.utils.data.Subset(train_base, indices)
    if len(train_base) < args.batch_size:
        raise common.UsageError(f"{len(train_base)} training images, fewer than --batch-size "
                                f"{args.batch_size}")

    # ---- frozen backbone (weights frozen; in the semi protocol its BatchNorm statistics adapt)
    backbone, feat_dim = common.build_backbone(args.arch, args.image_size)
    source = common.load_backbone_weights(backbone, args.weights, checkpoint) if args.weights else \
        f"random init (seed {args.seed}): no --weights given"
    del checkpoint
    reference_state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    backbone = common.prepare_eval_backbone(backbone, device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    log(f"{SCRIPT}: {args.protocol} protocol, {args.arch} {args.image_size}px; {source}",
        flush=True)
    center_crop = common.eval_transform(args.image_size)
    sampler = common.ResumableSampler(len(train_base), args.batch_size, seed=args.seed)
    iters = sampler.iters_per_epoch

    # ---- head, optimizer, resume
    head = (SemiHead if semi else LinearHead)(feat_dim, num_classes).to(device)
    head_ddp = nn.parallel.DistributedDataParallel(head) if world_size > 1 else head
    optimizer = torch.optim.SGD(head.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.wd)
    to_save = {"head": head, "optimizer": optimizer}
    if semi:  # the BatchNorm statistics adapted so far
        to_save["backbone"] = backbone
    resumed = common.restart_from_checkpoint(args, SCRIPT, set(common.plain_args(args)) - KEPT,
                                             to_save, run_variables=["best"], announce=False)
    resume_path = resumed["path"]
    start_epoch, start_iter = resumed["epoch"], resumed["iteration"]
    best = resumed["best"] or {"top1": 0.0, "epoch": 0}
    if resume_path:
        log(f"resumed the head from {resume_path} at epoch {start_epoch + 1}, iteration "
            f"{start_iter}", flush=True)
    common.save_args(common.plain_args(args), args.output_dir, SCRIPT)

    # ---- features extracted once: standardisation statistics (and the cached-features training
    # set), val
    train_features = train_labels = val_features = val_labels = None
    if args.cached_features or not resume_path:
        train_features, train_labels = common.extract_features(
            backbone, common.IndexedDataset(train_base, center_crop), args.batch_size, args.workers,
            device,
            autocast_dtype, args.print_freq, header="train features (center crop)")
        if not resume_path:
            head.set_standardisation(train_features)
    # the backbone never changes: val features once, every epoch scores the head on them
    if not semi:
        val_features, val_labels = common.extract_features(
            backbone, common.IndexedDataset(val_base, center_crop), args.batch_size, args.workers,
            device,
            autocast_dtype, args.print_freq, header="val features")

    if args.cached_features:
        def epoch_batches(epoch, start_iter):
            sampler.set_epoch(epoch, start_iter)
            for batch_indices in sampler.epoch_indices()[start_iter:, rank]:
                batch_indices = batch_indices.to(device)
                yield train_features[batch_indices], train_labels[batch_indices]

        def features_of(features):
            return features
    else:
        train_features = train_labels = None  # only needed for the statistics
        dataset = common.IndexedDataset(train_base, train_augmentation(args.image_size))
        loader = common.make_train_loader(dataset, sampler, args.workers, device)
        memory_format = (torch.channels_last if common.uses_channels_last(backbone)
                         else torch.contiguous_format)

        def epoch_batches(epoch, start_iter):
            sampler.set_epoch(epoch, start_iter)
            return ((images, labels) for images, labels, _ in loader)

        @torch.no_grad()
        def features_of(images):
            # semi: BatchNorm uses and updates batch statistics; weights stay frozen
            backbone.train(semi)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                return backbone(images.contiguous(memory_format=memory_format)).float()

    log(f"{'cached center-crop features' if args.cached_features else 'augmented images'}: "
        f"{len(train_base)} train, {len(val_base)} val images, {num_classes} classes, {world_size} "
        f"process(es) on {device}, global batch {args.batch_size}, {iters} it/epoch", flush=True)

    def save(epoch, iteration):
        if iteration == iters:
            epoch, iteration = epoch + 1, 0
        common.save_training_state(args, SCRIPT, epoch, iteration, to_save, extra={"best": best})
        return common.checkpoint_path(args.output_dir)

    preemption = common.PreemptionHandler()
    for epoch in range(start_epoch, args.epochs):
        start = time.time()
        lr = lr_at_epoch(args.lr, epoch, args.lr_drops)
        head.train()
        stats = train_one_epoch(args, device, epoch, epoch_batches(epoch, start_iter), iters,
                                start_iter, features_of,
                                head_ddp, optimizer, lr, preemption, save)
        start_iter = 0
        head.eval()
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": stats["loss"]}
        if semi:
            backbone.eval()
            average_batchnorm_statistics(backbone)
            log(f"Epoch [{epoch + 1}/{args.epochs}] train loss {stats['loss']:.4f}", flush=True)
        else:
            top1, top5 = evaluate(head, val_features, val_labels)
            if top1 > best["top1"] or best["epoch"] == 0:
                best = {"top1": top1, "top5": top5, "epoch": epoch + 1}
            log(f"Epoch [{epoch + 1}/{args.epochs}] val top-1 {top1:.2f}  top-5 {top5:.2f}  (best "
                f"top-1 {best['top1']:.2f} at epoch {best['epoch']})", flush=True)
            record.update(val_top1=top1, val_top5=top5, best_top1=best["top1"])
        save(epoch, iters)
        common.append_json_log(args.output_dir,
                               dict(record, epoch_seconds=round(time.time() - start, 1)))
        if preemption.poll(device)[0]:
            preemption.exit(common.checkpoint_path(args.output_dir))

    backbone.eval()
    check_backbone_unchanged(backbone, reference_state, weights_only=semi)
    if semi:  # scored once, in eval mode with the adapted statistics
        val_features, val_labels = common.extract_features(
            backbone, common.IndexedDataset(val_base, center_crop), args.batch_size, args.workers,
            device,
            autocast_dtype, args.print_freq, header="val features (adapted BatchNorm statistics)")
    top1, top5 = evaluate(head, val_features, val_labels)
    if semi:
        best = {"top1": top1, "top5": top5, "epoch": args.epochs}
    results = {"weights": args.weights or "random init", "source": source, "arch": args.arch,
               "dataset": args.dataset, "image_size": args.image_size, "protocol": args.protocol,
               "mode": ("cached center-crop features" if args.cached_features
                        else "augmented images"),
               "train_list": args.train_list, "train_images": len(train_base),
               "unmatched_names": len(unmatched),
               "epochs": args.epochs, "lr": args.lr, "lr_drops": args.lr_drops, "final_top1": top1,
               "final_top5": top5, "best": best,
               "backbone_unchanged": "weights (BatchNorm statistics adapted)" if semi else True}
    if rank == 0:
        common.write_json(os.path.join(args.output_dir, "linear_results.json"), results)
        label = "random init" if not args.weights else args.weights
        checked = ("backbone weights unchanged (checked), BatchNorm statistics adapted" if semi
                   else "backbone unchanged (checked)")
        print(f"\n{args.protocol} evaluation on {args.dataset} ({results['mode']}), {label}; "
              f"{checked}:\n| | top-1 | top-5 |\n|---|---|---|\n| final (epoch {args.epochs}) | "
              f"{top1:.2f} | {top5:.2f} |\n| best (epoch {best['epoch']}) | {best['top1']:.2f} | "
              f"{best.get('top5', 0):.2f} |", flush=True)


if __name__ == "__main__":
    common.run_main(main, get_args_parser())
