"""MSF: Mean Shift for Self-Supervised Learning (Koohpayegani, Tejankar & Pirsiavash, ICCV 2021).

An online encoder sees one view of an image; a momentum (EMA) target encoder sees another. The
target embedding is enqueued into a memory bank, its k nearest neighbours there are found (itself
included), and the online prediction is pulled towards all k:  loss = 1/k sum_j dist(q, z_j).
With k = 1 this is BYOL with an asymmetric loss.

Paper rows (ResNet-50, ImageNet, 200 epochs, batch 256; linear / 1-NN / 20-NN):
  MSF w/s (1M)    72.4 / 62.0 / 64.9   python train_msf.py --data /imagenet
  MSF w/s (256K)  72.2 / 62.1 / 65.1   python train_msf.py --data /imagenet --mem-bank-size 256000
  MSF w/s (128K)  72.1 / 62.0 / 65.2   python train_msf.py --data /imagenet --mem-bank-size 128000
  MSF (s/s)       71.4 / 60.6 / 64.0   python train_msf.py --data /imagenet --augmentation strong/strong
  MSF w/w         66.3 / 54.6 / 57.4   python train_msf.py --data /imagenet --augmentation weak/weak
  BYOL-asym       69.3 / 55.0 / 59.2   python train_msf.py --data /imagenet --topk 1
Multi-GPU: torchrun --nproc_per_node 8 train_msf.py ...  (--batch-size is the global batch).
"""
import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F

import common

SCRIPT = "train_msf.py"


def get_args_parser():
    p = argparse.ArgumentParser("MSF", description=__doc__.split("\n")[0], add_help=False)
    p.add_argument("--data", default=None, help="dataset root (ImageFolder root with train/, or torchvision root)")
    p.add_argument("--dataset", default="imagefolder",
                   choices=["imagefolder", "cifar10", "cifar100", "stl10", "synthetic"], help="dataset format")
    p.add_argument("--download", action="store_true", help="download cifar/stl10 if missing")
    p.add_argument("--synthetic-images", type=int, default=5000, help="training images of --dataset synthetic")
    p.add_argument("--arch", default="resnet50", help="torchvision ResNet (resnet18, resnet50, ...)")
    p.add_argument("--image-size", type=int, default=224, help="crop size; <= 64 uses the small-image stem")
    p.add_argument("--epochs", type=int, default=200, help="training epochs (cosine schedule over them)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size over all processes")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate for batch 256, scaled linearly")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--wd", type=float, default=1e-4, help="weight decay (all trainable parameters)")
    p.add_argument("--ema", type=float, default=0.99, help="target EMA momentum m (constant)")
    p.add_argument("--topk", type=int, default=5, help="number of nearest neighbours k")
    p.add_argument("--mem-bank-size", type=int, default=1_024_000, help="memory bank size M")
    p.add_argument("--bank-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="storage precision of the memory bank (half halves its memory)")
    p.add_argument("--search-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="precision of the neighbour-search matmul (the loss stays float32)")
    p.add_argument("--augmentation", default="weak/strong", choices=common.AUGMENTATIONS,
                   help="target/query augmentations")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="mixed precision; None: bf16 on GPU, none on CPU")
    p.add_argument("--workers", type=int, default=8, help="data-loading processes per GPU/process")
    p.add_argument("--output-dir", default="./output/msf", help="checkpoints, logs; resumes from here")
    p.add_argument("--resume", default=None, help="checkpoint to resume from; None: <output-dir>/checkpoint.pth if it exists")
    p.add_argument("--save-every", type=int, default=10, help="keep a weights-only copy every N epochs")
    p.add_argument("--checkpoint-minutes", type=float, default=30,
                   help="also save checkpoint.pth every N minutes within an epoch")
    p.add_argument("--stop-after-iters", type=int, default=0,
                   help="save a checkpoint and exit after this many iterations of this run (0: never); "
                        "for fixed time slots")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, augmentations and order")
    p.add_argument("--print-freq", type=int, default=50, help="iterations between progress lines")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


def msf_loss(query, target, memory_bank, k, search_dtype=None):
    """The MSF loss (paper eq. 1): mean over the k nearest neighbours z_j of the target t in the bank
    (which already holds t) of dist(q, z_j) = 2 - 2 q.z_j. Returns (per-sample loss, neighbour slots)."""
    _, neighbour_slots, _ = common.knn_search(target, memory_bank.embeddings, k, search_dtype=search_dtype)
    neighbours = memory_bank.embeddings[neighbour_slots]
    return common.mean_shift_loss(query, neighbours), neighbour_slots


def train_one_epoch(args, epoch, loader, models, optimizer, scaler, memory_bank, lr_schedule,
                    start_iter, preemption, save):
    online, target_encoder = models["online"], models["target"]
    iters = loader.sampler.iters_per_epoch
    logger = common.MetricLogger(f"Epoch [{epoch + 1}/{args.epochs}]", iters, args.batch_size,
                                 args.print_freq, start_iter)
    device, autocast_dtype = args.device_obj, args.autocast_dtype
    last_save = time.time()
    for it, (views, labels, indices) in enumerate(loader, start=start_iter):
        step = epoch * iters + it
        for group in optimizer.param_groups:
            group["lr"] = float(lr_schedule[step])  # a numpy float would make the checkpoint unloadable (weights_only)
        target_view, query_view = (v.to(device, non_blocking=True) for v in views[:2])
        if args.channels_last:
            target_view = target_view.to(memory_format=torch.channels_last)
            query_view = query_view.to(memory_format=torch.channels_last)
        labels, indices = labels.to(device, non_blocking=True), indices.to(device, non_blocking=True)

        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            query = online(query_view)
        query = F.normalize(query.float(), dim=1)

        with torch.no_grad():
            common.ema_update_(target_encoder, models["online_encoder"], args.ema)
            shuffled, unshuffle_index = common.batch_shuffle(target_view, args.seed, step)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                target = target_encoder(shuffled)
            target = common.batch_unshuffle(F.normalize(target.float(), dim=1), unshuffle_index)
            # Enqueue first: the bank then holds t itself, its own nearest neighbour.
            memory_bank.enqueue(common.all_gather(target), common.all_gather(labels), common.all_gather(indices))

        loss_per_sample, neighbour_slots = msf_loss(query, target, memory_bank, args.topk, args.search_dtype_obj)
        loss = loss_per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        logger.update(loss=loss, purity=common.purity(memory_bank.labels[neighbour_slots], labels))
        logger.step(it, lr=lr_schedule[step])
        if (it + 1) % args.print_freq == 0 or it + 1 == iters:
            common.check_finite(loss, epoch, it)
        last_save, leave_epoch = common.checkpoint_mid_epoch(args, preemption, save, loss, epoch, it, iters, last_save)
        if leave_epoch:  # --stop-after-iters reached: checkpoint written
            return None
    return logger.averages()


def main(args):
    device = common.init_distributed(args.device)
    world_size, rank = common.get_world_size(), common.get_rank()
    common.fix_random_seeds(args.seed)
    if args.batch_size < world_size or args.batch_size % world_size:
        raise common.UsageError(f"--batch-size {args.batch_size} (global) must be a positive multiple of the "
                                f"number of processes ({world_size}); use e.g. {world_size * max(1, args.batch_size // world_size)}")
    if not 1 <= args.topk <= args.mem_bank_size:
        raise common.UsageError(f"--topk {args.topk} must be between 1 and --mem-bank-size ({args.mem_bank_size})")
    args.device_obj = device
    args.autocast_dtype = common.amp_dtype(args.amp, device)
    args.search_dtype_obj = getattr(torch, args.search_dtype)
    args.channels_last = device.type == "cuda"
    args.iters_this_run = 0

    # ---- data
    base, _ = common.build_dataset(args.dataset, args.data, "train", args.download, args.image_size,
                                 args.synthetic_images)
    if len(base) < args.batch_size:
        raise common.UsageError(f"the dataset has {len(base)} images, fewer than --batch-size {args.batch_size}")
    dataset = common.IndexedDataset(base, common.two_view_transform(args.augmentation, args.image_size))
    sampler = common.ResumableSampler(len(dataset), args.batch_size, seed=args.seed)
    loader = common.make_train_loader(dataset, sampler, args.workers, device)

    # ---- networks: online = encoder + predictor (trained), target = EMA copy of the encoder
    with torch.random.fork_rng(devices=[]):  # same initial weights on every rank: the target is
        torch.manual_seed(args.seed)          # copied from them before DDP broadcasts rank 0's
        encoder = common.build_encoder(args.arch, args.image_size)
    online = torch.nn.Sequential(encoder, common.build_predictor(encoder)).to(device)
    target_encoder = copy.deepcopy(encoder).to(device)
    for p in target_encoder.parameters():
        p.requires_grad_(False)
    if args.channels_last:
        online, target_encoder = online.to(memory_format=torch.channels_last), target_encoder.to(memory_format=torch.channels_last)
    online_ddp = torch.nn.parallel.DistributedDataParallel(online) if world_size > 1 else online
    models = {"online": online_ddp, "online_encoder": online[0], "target": target_encoder}
    memory_bank = common.MemoryBank(args.mem_bank_size, encoder.embed_dim, getattr(torch, args.bank_dtype),
                                    seed=args.seed).to(device)

    lr = args.lr * args.batch_size / 256
    optimizer = torch.optim.SGD(online.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=args.autocast_dtype == torch.float16)
    lr_schedule = common.cosine_schedule(lr, args.epochs, sampler.iters_per_epoch)

    # ---- resume
    os.makedirs(args.output_dir, exist_ok=True)
    latest = os.path.join(args.output_dir, "checkpoint.pth")
    start_epoch, start_iter = 0, 0
    resume_path = args.resume or (latest if os.path.exists(latest) else None)
    if resume_path:
        ckpt = common.load_checkpoint(resume_path, SCRIPT, args.arch)
        try:
            online.load_state_dict(ckpt["online"])
            target_encoder.load_state_dict(ckpt["target"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            memory_bank.load_state_dict(ckpt["memory_bank"])
        except (RuntimeError, ValueError) as e:  # shapes differ: another --image-size stem, --mem-bank-size...
            raise common.UsageError(f"{resume_path} does not fit this run ({str(e).strip().splitlines()[-1].strip()}); "
                                    "resume with the --arch, --image-size and --mem-bank-size it was trained with, "
                                    "or use another --output-dir") from None
        common.set_rng_states(ckpt["rng"])
        start_epoch, start_iter = ckpt["epoch"], ckpt["iteration"]
        if rank == 0:
            print(f"resumed from {resume_path} at epoch {start_epoch + 1}, iteration {start_iter}", flush=True)
    common.save_args(common.plain_args(args), args.output_dir, SCRIPT)
    if rank == 0:
        print(f"{SCRIPT}: {args.arch}, {len(dataset)} images, {world_size} process(es) on {device}, "
              f"global batch {args.batch_size}, {sampler.iters_per_epoch} it/epoch, bank {args.mem_bank_size} x "
              f"{encoder.embed_dim} {args.bank_dtype} ({memory_bank.embeddings.nbytes / 2**20:.1f} MiB), "
              f"k={args.topk}, {args.augmentation}, amp {common.amp_name(args.autocast_dtype)}", flush=True)

    def save(epoch, iteration):
        """Full state for exact resume (called on all ranks: the RNG states are gathered)."""
        state = {"script": SCRIPT, "args": common.plain_args(args), "epoch": epoch, "iteration": iteration,
                 "online": online.state_dict(), "target": target_encoder.state_dict(),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "memory_bank": memory_bank.state_dict(), "rng": common.rng_states()}
        if iteration == sampler.iters_per_epoch:  # an epoch boundary: store as the start of the next
            state["epoch"], state["iteration"] = epoch + 1, 0
        if rank == 0:
            common.save_checkpoint(state, latest)
        return latest

    preemption = common.PreemptionHandler()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, start_iter)
        start = time.time()
        stats = train_one_epoch(args, epoch, loader, models, optimizer, scaler, memory_bank, lr_schedule,
                                start_iter, preemption, save)
        if stats is None:  # --stop-after-iters reached mid-epoch; checkpoint already written
            if rank == 0:
                print(f"stopped after {args.iters_this_run} iterations as asked (--stop-after-iters); "
                      "run the same command again to continue", flush=True)
            return
        start_iter = 0
        save(epoch, sampler.iters_per_epoch)
        if rank == 0:
            common.save_epoch_weights(args.output_dir, SCRIPT, common.plain_args(args), epoch + 1, args.save_every,
                                      online, target_encoder, encoder.backbone, args.arch)
        common.append_json_log(args.output_dir, {"epoch": epoch + 1, **stats, "lr": float(lr_schedule[epoch * sampler.iters_per_epoch]),
                                                 "epoch_seconds": round(time.time() - start, 1)})
        if preemption.poll(device)[0]:
            preemption.exit(latest)
        if args.stop_after_iters and args.iters_this_run >= args.stop_after_iters and epoch + 1 < args.epochs:
            if rank == 0:
                print(f"stopped after {args.iters_this_run} iterations as asked (--stop-after-iters)", flush=True)
            return
    if rank == 0:
        print(f"done: {args.epochs} epochs; weights in {latest} and "
              f"{os.path.join(args.output_dir, 'backbone_torchvision.pth')}", flush=True)


if __name__ == "__main__":
    common.run_main(main, get_args_parser())
