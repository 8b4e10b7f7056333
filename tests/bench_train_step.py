"""Benchmark: images/s of one full MSF training step, ours vs upstream-style, and of the data loader.

Run directly (not collected by pytest):
  python tests/bench_train_step.py                      # GPU: ResNet-50, 224 px, batch 256
  python tests/bench_train_step.py --arch resnet18 --image-size 64 --batch 32 --steps 3   # a CPU-sized run
Synthetic tensors already on the device, so the numbers are the model + head, not the loader.

  ours:     bf16 autocast (GPU), channels_last (GPU), fused foreach EMA, memory bank without clone, exact
            top-k on t only (common.knn_search), loss on the k gathered rows, purity.
  upstream: fp32, contiguous NCHW, a Python loop for the EMA, bank and label bank cloned every step, full
            B x M fp32 `2 - 2 * einsum` distance matrices for t and q, purity from the cloned labels.
The loader row: images/s of the weak + strong ImageNet augmentation pipeline (decode + 2 views) for
one worker process, on generated JPEGs of ImageNet's typical size (500 x 375).
"""
import argparse
import copy
import io
import os
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def build(arch, image_size, device, bank_size):
    encoder = common.build_encoder(arch, image_size)
    online = torch.nn.Sequential(encoder, common.build_predictor(encoder)).to(device)
    target = copy.deepcopy(encoder).to(device)
    for p in target.parameters():
        p.requires_grad_(False)
    bank = common.MemoryBank(bank_size, encoder.embed_dim).to(device)
    optimizer = torch.optim.SGD(online.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    return online, target, bank, optimizer


def our_step(online, target, bank, optimizer, x_t, x_q, labels, k, amp_dtype):
    with torch.autocast(x_q.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        q = online(x_q)
    q = F.normalize(q.float(), dim=1)
    with torch.no_grad():
        common.ema_update_(target, online[0], 0.99)
        with torch.autocast(x_q.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            t = target(x_t)
        t = F.normalize(t.float(), dim=1)
        bank.enqueue(t, labels)
        _, slots, _ = common.knn_search(t, bank.embeddings, k)
        purity = common.purity(bank.labels[slots], labels)
    loss = common.mean_shift_loss(q, bank.embeddings[slots]).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return purity


def upstream_step(online, target, bank, optimizer, x_t, x_q, labels, k):
    q = F.normalize(online(x_q), dim=1)
    with torch.no_grad():
        for p_t, p_q in zip(target.parameters(), online[0].parameters()):
            p_t.data = p_t.data * 0.99 + p_q.data * 0.01
        t = F.normalize(target(x_t), dim=1)
        bank.enqueue(t, labels)  # upstream enqueues before the search too
        targets, labels_queue = bank.embeddings.clone().detach(), bank.labels.clone().detach()
        dist_t = 2 - 2 * torch.einsum("bc,kc->bk", t, targets)
        _, nn_index = dist_t.topk(k, dim=1, largest=False)
    dist_q = 2 - 2 * torch.einsum("bc,kc->bk", q, targets)
    loss = torch.gather(dist_q, 1, nn_index).mean()
    nn_labels = torch.gather(labels_queue.unsqueeze(0).expand(t.shape[0], -1), 1, nn_index)
    purity = (nn_labels == labels.unsqueeze(1)).float().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return purity


def time_steps(step, steps, sync):
    step()  # warm-up (cudnn autotune, allocator)
    step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def loader_images_per_second(image_size, seconds):
    """Augmentation throughput of one worker: JPEG decode + weak view + strong view."""
    transform = common.two_view_transform("weak/strong", image_size)
    g = torch.Generator().manual_seed(0)
    jpegs = []
    for _ in range(16):
        pixels = (torch.rand(375, 500, 3, generator=g) * 255).byte().numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        transform(Image.open(io.BytesIO(jpegs[count % len(jpegs)])).convert("RGB"))
        count += 1
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bank-size", type=int, default=1_024_000)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--loader-seconds", type=float, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    x_q = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    labels = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}: {args.arch}, {args.image_size} px, batch {args.batch}, M={args.bank_size}, k={args.topk}, "
          f"mean of {args.steps} steps")
    rows = []

    online, target, bank, optimizer = build(args.arch, args.image_size, device, args.bank_size)
    seconds = time_steps(lambda: upstream_step(online, target, bank, optimizer, x_t, x_q, labels, args.topk), args.steps, sync)
    rows.append(("upstream-style (fp32, NCHW, clone, B x M for t and q)", seconds))
    del online, target, bank, optimizer

    amp = torch.bfloat16 if device.type == "cuda" else None
    online, target, bank, optimizer = build(args.arch, args.image_size, device, args.bank_size)
    xt, xq = x_t, x_q
    if device.type == "cuda":
        online, target = online.to(memory_format=torch.channels_last), target.to(memory_format=torch.channels_last)
        xt, xq = x_t.to(memory_format=torch.channels_last), x_q.to(memory_format=torch.channels_last)
    seconds = time_steps(lambda: our_step(online, target, bank, optimizer, xt, xq, labels, args.topk, amp), args.steps, sync)
    rows.append((f"ours ({'bf16, channels_last' if amp else 'fp32'}, fused EMA, no clone, gathered k rows)", seconds))

    print(f"| step | ms/step | images/s | vs upstream |\n|---|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {1000 * seconds:.1f} | {args.batch / seconds:.1f} | {rows[0][1] / seconds:.2f}x |")
    if args.loader_seconds > 0:
        rate = loader_images_per_second(args.image_size, args.loader_seconds)
        print(f"\ndata loader, weak + strong views of a 500x375 JPEG at {args.image_size} px: "
              f"{rate:.0f} images/s per worker process")


if __name__ == "__main__":
    main()
