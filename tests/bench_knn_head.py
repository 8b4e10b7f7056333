"""Benchmark: the MSF / CMSF nearest-neighbour head, ours vs an upstream-style formulation.

Run directly (not collected by pytest):
  python tests/bench_knn_head.py [--device cuda] [--bank-sizes 131072 1024000]
                                 [--rounds 3 --repeats 3]
Each variant runs in its own subprocess so that its peak memory is its own: CUDA
max_memory_allocated, or on CPU the growth of the resident set (VmHWM after clear_refs) over one step
run after a warm-up step and malloc_trim (so one-time library set-up is not counted, and memory the
warm-up freed must be faulted in again). The variants run one after the other `--rounds` times; on a
shared machine only ratios taken within one round are meaningful, so the table gives the median ms and
the median per-round ratios.

One step of the head = given q (online prediction, needs grad), t (target embedding), B x d, and the
batch labels:
  ours:     enqueue t (with labels) into the bank, top-k of t against the bank (common.knn_search:
            exact float32 result), gather the k rows, loss, purity, backward (only B x k x d touches q).
  upstream: as the authors' step (a reimplementation): enqueue, clone of the bank AND of the label bank,
            full fp32 `2 - 2 * einsum` B x M distance matrices for t and for q, top-k on t's, gather
            q's distances, purity from the cloned labels, loss, backward (through the B x M matrix).
  matmul:   one B x M x d matmul (t @ bank.T) at the search precision, the floor for a plain exact
            search; matmul-bf16: the same in bfloat16, for reference.
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def upstream_msf_head(q, t, labels, bank, bank_labels, k):
    """What the authors' code does each step (written here from a reading of their code)."""
    batch, size = t.shape[0], bank.shape[0]
    bank[:batch] = t  # enqueue first: the bank holds t
    bank_labels[:batch] = labels
    bank_copy, labels_copy = bank.clone().detach(), bank_labels.clone().detach()
    dist_t = 2 - 2 * torch.einsum("bc,kc->bk", t, bank_copy)  # B x M
    dist_q = 2 - 2 * torch.einsum("bc,kc->bk", q, bank_copy)  # B x M, kept for backward
    _, nn_index = dist_t.topk(k, dim=1, largest=False)
    nn_dist_q = torch.gather(dist_q, 1, nn_index)
    nn_labels = torch.gather(labels_copy.unsqueeze(0).expand(batch, size), 1, nn_index)
    purity = (nn_labels == labels.unsqueeze(1)).float().sum(dim=1).div(k).mean()
    loss = nn_dist_q.sum(dim=1).div(k).mean()
    loss.backward()
    return loss, purity


def our_msf_head(q, t, labels, memory_bank, k, search_dtype):
    memory_bank.enqueue(t, labels)
    _, slots, _ = common.knn_search(t, memory_bank.embeddings, k, search_dtype=search_dtype)
    loss = common.mean_shift_loss(q, memory_bank.embeddings[slots]).mean()
    purity = common.purity(memory_bank.labels[slots], labels)
    loss.backward()
    return loss, purity


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


def _proc_status_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def trim_heap():
    """Give the heap's free pages back to the kernel (glibc), so reusing them shows in the RSS again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark (Linux >= 4.0) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _proc_status_bytes("VmRSS")


def peak_rss():
    return _proc_status_bytes("VmHWM")


def run_variant(variant, bank_size, batch, dim, k, device, repeats, bank_dtype, search_dtype):
    torch.manual_seed(0)
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    memory_bank = common.MemoryBank(bank_size, dim, dtype=getattr(torch, bank_dtype)).to(device)
    prev_bank = common.MemoryBank(bank_size, dim, dtype=getattr(torch, bank_dtype)).to(device)
    sdtype = getattr(torch, search_dtype)
    bank_fp32 = memory_bank.embeddings.float().clone() if variant in ("upstream", "matmul", "matmul-bf16") else None
    bank_labels = torch.randint(0, 1000, (bank_size,), device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    memory_bank.labels.copy_(bank_labels)

    def inputs():
        q = F.normalize(torch.randn(batch, dim, device=device), dim=1).requires_grad_()
        t = F.normalize(torch.randn(batch, dim, device=device), dim=1)
        return q, t

    def step():
        q, t = inputs()
        if variant == "upstream":
            upstream_msf_head(q, t, labels, bank_fp32, bank_labels, k)
        elif variant == "ours":
            our_msf_head(q, t, labels, memory_bank, k, sdtype)
        elif variant == "ours-label":
            our_label_head(q, t, labels, memory_bank, k, sdtype)
        elif variant == "ours-2q":
            our_2q_head(q, t, F.normalize(torch.randn_like(t), dim=1), memory_bank, prev_bank, k, 5, sdtype)
        elif variant in ("matmul", "matmul-bf16"):
            t.to(bank_fp32.dtype) @ bank_fp32.T

    if variant == "matmul" and sdtype != torch.float32:
        bank_fp32 = bank_fp32.to(sdtype)
    if variant == "matmul-bf16":
        bank_fp32 = bank_fp32.to(torch.bfloat16)
    step()  # warm-up
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sync()
    if device.type == "cpu":
        trim_heap()
        rss_before = reset_peak_rss()
        step()
        peak = peak_rss() - rss_before
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    times.sort()
    return {"variant": variant, "M": bank_size, "ms": 1000 * times[len(times) // 2], "peak_extra_MiB": peak / 2**20}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return "CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bank-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant and round (median)")
    parser.add_argument("--rounds", type=int, default=3, help="times the whole set of variants is run")
    parser.add_argument("--bank-dtype", default="float32")
    parser.add_argument("--search-dtype", default="float32")
    parser.add_argument("--variants", nargs="+",
                        default=["matmul", "matmul-bf16", "ours", "upstream", "ours-label", "ours-2q"])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # child process: one variant, one M
        variant, size = args.worker.split(":")
        print(json.dumps(run_variant(variant, int(size), args.batch, args.dim, args.topk, args.device,
                                     args.repeats, args.bank_dtype, args.search_dtype)))
        return
    sizes = args.bank_sizes or ([131072, 1024000] if args.device.startswith("cuda") else [131072])
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"device {args.device} ({where}, {torch.get_num_threads()} threads), B={args.batch}, d={args.dim}, "
          f"k={args.topk}, bank {args.bank_dtype}, search {args.search_dtype}; forward + backward; median over "
          f"{args.rounds} rounds of the median of {args.repeats} steps; load average before: {os.getloadavg()}")
    print(f"| {'head':<12} | {'M':>9} | {'ms':>9} | {'x matmul':>8} | {'upstream/this':>13} | {'peak extra MiB':>14} |")
    print(f"|{'-' * 14}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 15}|{'-' * 16}|")
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    for size in sizes:
        rounds = []
        for _ in range(args.rounds):
            rows = {}
            for variant in args.variants:
                cmd = [sys.executable, __file__, "--worker", f"{variant}:{size}"] + sys.argv[1:]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                rows[variant] = json.loads(out.strip().splitlines()[-1])
            rounds.append(rows)
        for variant in args.variants:
            ms = median([r[variant]["ms"] for r in rounds])
            nan = float("nan")
            vs_matmul = median([r[variant]["ms"] / r["matmul"]["ms"] for r in rounds]) if "matmul" in rows else nan
            speedup = median([r["upstream"]["ms"] / r[variant]["ms"] for r in rounds]) if "upstream" in rows else nan
            peak = max(r[variant]["peak_extra_MiB"] for r in rounds)
            print(f"| {variant:<12} | {size:>9} | {ms:>9.1f} | {vs_matmul:>8.2f} | {speedup:>13.2f} | {peak:>14.1f} |")
    print(f"load average after: {os.getloadavg()}")
    print_persistent_buffers(args.dim, sizes)


def print_persistent_buffers(d, sizes, n=1_281_167, cmsf_bank=128_000):
    """Bytes of every buffer kept across steps, at ImageNet scale: ours are the buffers of
    common.MemoryBank (embeddings M x d, labels and indices M int64) and train_cmsf_self's
    PreviousVisitStore (N x d) plus M' (a second MemoryBank); upstream keeps an M x d fp32 bank with
    M int64 labels (cloned, both, every step) and for CMSF a 2 x N x d fp32 table."""
    gib = 2 ** 30

    def bank_bytes(m, elem):
        return m * d * elem + 2 * m * 8

    print(f"\nPersistent buffers (ImageNet N = {n:,}, d = {d}):")
    print("| buffers | ours | upstream | ours / upstream |\n|---|---|---|---|")
    for size in sizes:
        upstream = size * d * 4 + size * 8
        for name, elem in (("float32", 4), ("float16", 2)):
            print(f"| MSF, bank M = {size:,} ({name}) | {bank_bytes(size, elem) / 2**20:.0f} MiB | "
                  f"{upstream / 2**20:.0f} MiB (+ {upstream / 2**20:.0f} MiB cloned every step) | "
                  f"{bank_bytes(size, elem) / upstream:.2f} |")
    upstream = cmsf_bank * d * 4 + cmsf_bank * 8 + 2 * n * d * 4
    for store_name, store_elem in (("float32 (default)", 4), ("float16 / bfloat16", 2)):
        ours = bank_bytes(cmsf_bank, 4) + n * d * store_elem + bank_bytes(cmsf_bank, store_elem)
        print(f"| CMSF-2Q, M = M' = {cmsf_bank:,}, --store-dtype {store_name}: bank + N x d store + M' "
              f"| {ours / gib:.2f} GiB | {upstream / gib:.2f} GiB (bank + 2 x N x d fp32) | {ours / upstream:.2f} |")


if __name__ == "__main__":
    main()
