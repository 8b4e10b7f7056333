"""Benchmark: eval_knn's search at ImageNet scale (1.28M x 2048 train features, 50K val queries).

Run directly (not collected by pytest):
  python tests/bench_knn_eval.py                                   # GPU: 1,281,167 x 2048, float16
  python tests/bench_knn_eval.py --train 131072 --queries 2048     # a CPU-sized run
Random unit vectors stand in for features (the search cost does not depend on their values). Prints
queries/s (val features classified per second, 1-NN and 20-NN with both votes), the bytes of the
train features (the only large buffer) and the peak memory of the search on top of them: CUDA
max_memory_allocated, or on CPU the growth of the resident set (VmHWM after clear_refs, taken after
the features were built and the heap trimmed). The score block is at most query_chunk x train_chunk.
"""
import argparse
import ctypes
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def _proc_status_bytes(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def reset_peak_rss():
    """Trim the heap, reset the kernel's peak-RSS mark (Linux >= 4.0), return the current RSS (bytes)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _proc_status_bytes("VmRSS")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train", type=int, default=None, help="train features (default 1,281,167 on GPU)")
    parser.add_argument("--queries", type=int, default=None, help="val queries (default 50,000 on GPU)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--dtype", default=None, choices=["float16", "float32"],
                        help="feature storage (default float16 on GPU, float32 on CPU)")
    parser.add_argument("--query-chunk", type=int, default=None)
    parser.add_argument("--train-chunk", type=int, default=65536)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n_train = args.train or (1_281_167 if gpu else 131_072)
    n_query = args.queries or (50_000 if gpu else 2048)
    dtype = getattr(torch, args.dtype or ("float16" if gpu else "float32"))
    query_chunk = args.query_chunk or (4096 if gpu else 512)

    train = torch.empty(n_train, args.dim, dtype=dtype, device=device)
    for start in range(0, n_train, 65536):  # fill in slices: no float32 copy of the whole table
        block = torch.randn(min(65536, n_train - start), args.dim, device=device)
        train[start:start + block.shape[0]] = F.normalize(block, dim=1).to(dtype)
    train_labels = torch.randint(0, 1000, (n_train,), device=device)
    queries = F.normalize(torch.randn(n_query, args.dim, device=device), dim=1).to(dtype)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    common.knn_predict(train, train_labels, queries[:query_chunk], [1, 20], 1000,
                         train_chunk_size=args.train_chunk, query_chunk_size=query_chunk)  # warm-up
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    common.knn_predict(train, train_labels, queries, [1, 20], 1000,
                         train_chunk_size=args.train_chunk, query_chunk_size=query_chunk)
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if gpu:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        where = torch.cuda.get_device_name()
    else:
        peak = (_proc_status_bytes("VmHWM") - base) / 2**30
        where = f"CPU ({torch.get_num_threads()} threads)"
    print(f"{where}: train {n_train} x {args.dim} {str(dtype).split('.')[-1]}, {n_query} queries, "
          f"chunks {query_chunk} x {args.train_chunk}")
    print("| train features | features GiB | queries | seconds | queries/s | search peak GiB (beyond features) |")
    print("|---|---|---|---|---|---|")
    print(f"| {n_train} x {args.dim} | {train.nbytes / 2**30:.2f} | {n_query} | {seconds:.1f} | "
          f"{n_query / seconds:.0f} | {peak:.3f} |")


if __name__ == "__main__":
    main()
