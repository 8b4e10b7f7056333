"""Benchmark: the MSF / CMSF nearest-neighbour head, ours vs an upstream-style formulation.

Run directly (not collected by pytest):  python tests/bench_knn_head.py [--device cuda] [--bank-sizes 131072 1024000]
Each variant runs in its own subprocess so that its peak memory (CUDA max_memory_allocated, or the
growth of the process's peak RSS on CPU) is its own. Prints one table row per (variant, M).

One step of the head = given q (online prediction, needs grad) and t (target embedding), B x d:
  ours:     enqueue t into the bank, chunked top-k of t against the bank, gather the k rows, loss,
            backward (only B x k x d touches q).
  upstream: clone the bank, full fp32 B x M distance matrices for t AND q, top-k on t's, gather q's
            distances, loss, backward (through the B x M matrix), enqueue.
  matmul:   one B x M x d matmul (t @ bank.T) at the same precision, the floor for any exact search.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def upstream_msf_head(q, t, bank, k):
    """What the authors' code does each step (written here from the paper's description)."""
    bank_copy = bank.clone()
    dist_t = 2 - 2 * t @ bank_copy.T  # B x M
    dist_q = 2 - 2 * q @ bank_copy.T  # B x M, kept for backward
    _, nn_index = dist_t.topk(k, dim=1, largest=False)
    loss = dist_q.gather(1, nn_index).mean()
    loss.backward()
    bank[:t.shape[0]] = t  # enqueue (after the search, as upstream)
    return loss


def our_msf_head(q, t, memory_bank, k, search_dtype):
    memory_bank.enqueue(t)
    _, slots, _ = common.knn_search(t, memory_bank.embeddings, k, search_dtype=search_dtype)
    loss = common.mean_shift_loss(q, memory_bank.embeddings[slots]).mean()
    loss.backward()
    return loss


def our_label_head(q, t, labels, memory_bank, k, search_dtype):
    """CMSF supervised: the same search with a same-label constraint."""
    memory_bank.enqueue(t, labels)
    _, slots, valid = common.knn_search(t, memory_bank.embeddings, k, query_labels=labels,
                                        key_labels=memory_bank.labels, search_dtype=search_dtype)
    loss = common.mean_shift_loss(q, memory_bank.embeddings[slots], valid).mean()
    loss.backward()
    return loss


def our_2q_head(q, t, t_prev, memory_bank, prev_bank, k, k_prime, search_dtype):
    """CMSF 2Q: C = k' nearest of t' among the previous-visit bank; then the k of C closest to t."""
    memory_bank.enqueue(t)
    prev_bank.enqueue(t_prev)
    _, slots, _ = common.knn_search(t, memory_bank.embeddings, k, search_dtype=search_dtype)
    _, candidates, _ = common.knn_search(t_prev, prev_bank.embeddings, k_prime, search_dtype=search_dtype)
    candidate_sims = torch.einsum("bd,bcd->bc", t, memory_bank.embeddings[candidates].float())
    constrained = candidates.gather(1, candidate_sims.topk(min(k, k_prime), dim=1).indices)
    loss = 0.5 * (common.mean_shift_loss(q, memory_bank.embeddings[slots]).mean()
                  + common.mean_shift_loss(q, memory_bank.embeddings[constrained]).mean())
    loss.backward()
    return loss


def run_variant(variant, bank_size, batch, dim, k, device, repeats, bank_dtype, search_dtype):
    torch.manual_seed(0)
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    memory_bank = common.MemoryBank(bank_size, dim, dtype=getattr(torch, bank_dtype)).to(device)
    prev_bank = common.MemoryBank(bank_size, dim, dtype=getattr(torch, bank_dtype)).to(device)
    sdtype = getattr(torch, search_dtype)
    bank_fp32 = memory_bank.embeddings.float().clone()
    labels = torch.randint(0, 1000, (batch,), device=device)
    memory_bank.labels.copy_(torch.randint(0, 1000, (bank_size,)))

    def inputs():
        q = F.normalize(torch.randn(batch, dim, device=device), dim=1).requires_grad_()
        t = F.normalize(torch.randn(batch, dim, device=device), dim=1)
        return q, t

    def step():
        q, t = inputs()
        if variant == "upstream":
            upstream_msf_head(q, t, bank_fp32, k)
        elif variant == "ours":
            our_msf_head(q, t, memory_bank, k, sdtype)
        elif variant == "ours-label":
            our_label_head(q, t, labels, memory_bank, k, sdtype)
        elif variant == "ours-2q":
            our_2q_head(q, t, F.normalize(torch.randn_like(t), dim=1), memory_bank, prev_bank, k, 5, sdtype)
        elif variant == "matmul":
            (t.to(sdtype) @ bank_fp32.to(sdtype).T if sdtype != torch.float32 else t @ bank_fp32.T)

    if variant == "matmul" and sdtype != torch.float32:
        bank_fp32 = bank_fp32.to(sdtype)
    step()  # warm-up
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    times.sort()
    return {"variant": variant, "M": bank_size, "ms": 1000 * times[len(times) // 2], "peak_extra_MiB": peak / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bank-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bank-dtype", default="float32")
    parser.add_argument("--search-dtype", default="float32")
    parser.add_argument("--variants", nargs="+", default=["matmul", "ours", "upstream", "ours-label", "ours-2q"])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # child process: one variant, one M
        variant, size = args.worker.split(":")
        print(json.dumps(run_variant(variant, int(size), args.batch, args.dim, args.topk, args.device,
                                     args.repeats, args.bank_dtype, args.search_dtype)))
        return
    sizes = args.bank_sizes or ([131072, 1024000] if args.device.startswith("cuda") else [131072])
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}, "
          f"{torch.get_num_threads()} threads), B={args.batch}, d={args.dim}, k={args.topk}, "
          f"bank {args.bank_dtype}, search {args.search_dtype}; forward + backward, median of {args.repeats}")
    print(f"| {'head':<12} | {'M':>9} | {'ms':>9} | {'x matmul':>8} | {'upstream/this':>13} | {'peak extra MiB':>14} |")
    print(f"|{'-' * 14}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 15}|{'-' * 16}|")
    for size in sizes:
        rows = {}
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", f"{variant}:{size}"] + sys.argv[1:]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[variant] = json.loads(out.strip().splitlines()[-1])
        for variant, row in rows.items():
            vs_matmul = row["ms"] / rows["matmul"]["ms"] if "matmul" in rows else float("nan")
            speedup = rows["upstream"]["ms"] / row["ms"] if "upstream" in rows else float("nan")
            print(f"| {variant:<12} | {size:>9} | {row['ms']:>9.1f} | {vs_matmul:>8.2f} | {speedup:>13.2f} | "
                  f"{row['peak_extra_MiB']:>14.1f} |")
    # persistent buffers, at ImageNet scale
    n, d = 1_281_167, args.dim
    print("\nPersistent buffers (ImageNet N = 1,281,167, d = 512):")
    print("| buffer | ours | upstream |\n|---|---|---|")
    for size in sizes:
        print(f"| memory bank M={size} | {size * d * 4 / 2**20:.0f} MiB fp32 ({size * d * 2 / 2**20:.0f} MiB fp16) "
              f"| {size * d * 4 / 2**20:.0f} MiB + a {size * d * 4 / 2**20:.0f} MiB clone every step |")
    ours_store = n * d * 2 + 128_000 * d * 2
    print(f"| CMSF-2Q previous-visit store (M=128K) | {ours_store / 2**30:.2f} GiB (N x d fp16 + M' x d fp16) "
          f"| {2 * n * d * 4 / 2**30:.2f} GiB (2 x N x d fp32) |")


if __name__ == "__main__":
    main()
