"""MSF: Mean Shift for Self-Supervised Learning (Koohpayegani, Tejankar & Pirsiavash, ICCV 2021).

An online encoder sees one view of an image; a momentum (EMA) target encoder sees another. The
target embedding is enqueued into a memory bank, its k nearest neighbours there are found (itself
included), and the online prediction is pulled towards all k:  loss = 1/k sum_j dist(q, z_j).
With k = 1 this is BYOL with an asymmetric loss.

Paper rows (ResNet-50, ImageNet, 200 epochs, batch 256, BatchNorm over 64 images, float32 as the
papers trained; linear / 1-NN / 20-NN): `python train_msf.py --data /imagenet --amp none` plus
  MSF w/s (1M)             72.4 / 62.0 / 64.9   (no more flags)
  MSF w/s (256K)           72.2 / 62.1 / 65.1   --mem-bank-size 256000
  MSF w/s (128K)           72.1 / 62.0 / 65.2   --mem-bank-size 128000
  MSF (s/s)                71.4 / 60.6 / 64.0   --augmentation strong/strong
  MSF w/w                  66.3 / 54.6 / 57.4   --augmentation weak/weak
  BYOL-asym (s/s, k = 1)   69.3 / 55.0 / 59.2   --augmentation strong/strong --topk 1
  BYOL-asym (w/s, k = 1)   69.5 / 55.8 / 59.1   --topk 1
  released checkpoint      72.4 / 62.5 / 65.7   --topk 10   (k = 10 with the 1M bank)
Multi-GPU: torchrun --nproc_per_node 8 train_msf.py ...  (--batch-size is the global batch).
"""
import argparse
import time

import torch
import torch.nn.functional as F

import common

SCRIPT = "train_msf.py"
RESUMABLE = common.RUNTIME_FLAGS  # the flags a resumed run may change


def get_args_parser():
    p = argparse.ArgumentParser("MSF", description=__doc__.split("\n")[0], add_help=False)
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
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading processes per process; None: 8, at most the CPUs per process")
    p.add_argument("--augment-on", default="auto", choices=["auto", "loader", "device"],
                   help="where colour jitter, grayscale, blur and normalisation run: in the loader "
                        "workers per image, or batched on the training device (auto: device on "
                        "GPU)")
    p.add_argument("--bn-batch-size", type=int, default=64,
                   help="samples each BatchNorm normalises over, independent of the number of GPUs "
                        "(the papers: 64 = 256 on 4 GPUs); 0: the per-process batch")
    p.add_argument("--output-dir", default="./output/msf",
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


def msf_loss(query, target, memory_bank, k, search_dtype=None):
    """The MSF loss (paper eq. 1): mean over the k nearest neighbours z_j of the target t in the
    bank (which already holds t) of dist(q, z_j) = 2 - 2 q.z_j. Returns (per-sample loss, neighbour
    slots)."""
    _, neighbour_slots, _ = common.knn_search(target, memory_bank.embeddings, k,
                                              search_dtype=search_dtype)
    neighbours = memory_bank.embeddings[neighbour_slots]
    return common.mean_shift_loss(query, neighbours), neighbour_slots


def train_one_epoch(args, epoch, loader, logger, online, target_encoder, optimizer, lr_schedule,
                    memory_bank, device, autocast_dtype, scaler, stopper):
    """One epoch of MSF. Returns the epoch's averages, or None when the run must stop mid-epoch."""
    iters = loader.sampler.iters_per_epoch
    channels_last = device.type == "cuda"  # GPU convolutions run faster in NHWC
    online_encoder = common.unwrap(online)[0]
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
            # Enqueue first: the bank then holds t itself, its own nearest neighbour.
            memory_bank.enqueue(common.all_gather(target), common.all_gather(labels),
                                common.all_gather(indices))

        loss_per_sample, neighbour_slots = msf_loss(query, target, memory_bank, args.topk,
                                                    getattr(torch, args.search_dtype))
        loss = loss_per_sample.mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        logger.update(loss=loss, purity=common.purity(memory_bank.labels[neighbour_slots], labels))
        logger.step(it, lr=lr_schedule[step])
        if (it + 1) % args.print_freq == 0 or it + 1 == iters:
            logger.update(**common.neighbour_diagnostics(target, labels, memory_bank.embeddings,
                                                         memory_bank.labels))
            common.check_finite(loss, epoch, it)
        # SLURM's signal, --checkpoint-minutes, --stop-after-iters
        if stopper.checkpoint_if_due(it, iters, epoch, loss, logger):
            return None
    return logger.averages()


def main(args):
    device = common.start_training(args)  # distributed init, flag checks, seeds, provenance
    autocast_dtype = common.amp_dtype(args.amp, device)  # None: float32
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    workers = common.default_workers(args.workers)

    # ============ data: two views of every image (target, query) ============
    base, num_classes = common.build_dataset(args.dataset, args.data, "train", args.download,
                                             args.image_size, args.synthetic_images)
    local_batch_size = common.check_dataset_size(len(base), args, common.get_world_size())
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
    memory_bank = common.MemoryBank(args.mem_bank_size, encoder.embed_dim,
                                    getattr(torch, args.bank_dtype), seed=args.seed).to(device)
    optimizer, lr_schedule = common.sgd_with_cosine_schedule(online.parameters(), args,
                                                             sampler.iters_per_epoch)
    knn_monitor = common.knn_monitor_from_args(args, base, num_classes, device, workers,
                                               autocast_dtype)

    # ============ resume: what a checkpoint holds ============
    to_save = {"online": online, "target": target_encoder, "optimizer": optimizer,
               "memory_bank": memory_bank, "scaler": scaler}
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
        print(f"{SCRIPT}: {args.arch}, {len(dataset)} images, {common.get_world_size()} "
              f"process(es) on {device}, global batch {args.batch_size}, "
              f"{sampler.iters_per_epoch} it/epoch, bank {args.mem_bank_size} x "
              f"{encoder.embed_dim} {args.bank_dtype} "
              f"({memory_bank.embeddings.nbytes / 2**20:.1f} MiB), k={args.topk}, "
              f"{args.augmentation}, amp {common.amp_name(autocast_dtype)}, {workers} "
              f"loader workers", flush=True)

    # ============ training ============
    online_ddp = common.ddp(online)
    stopper = common.TrainingStopper(args, SCRIPT, device, to_save)
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, start_iter)
        logger = common.MetricLogger(f"Epoch [{epoch + 1}/{args.epochs}]",
                                     sampler.iters_per_epoch, args.batch_size, args.print_freq,
                                     start_iter, metrics)
        start = time.time()
        stats = train_one_epoch(args, epoch, loader, logger, online_ddp, target_encoder, optimizer,
                                lr_schedule, memory_bank, device, autocast_dtype, scaler, stopper)
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
