"""Benchmark: how often the bf16 search picks the same neighbours as the exact float32 search, on the
memory bank of a trained run.

Run directly (not collected by pytest):
  python tests/bench_search_precision.py OUTPUT_DIR/checkpoint.pth [--topk 1 5 10 20]
  python tests/bench_search_precision.py --random 131072 512          # random unit vectors instead
The queries are the bank's own filled rows, as in training, where the target t sits in the bank when
it is searched. For each k it prints: the float32 search (common.knn_search's exact path) against a
float64 brute force (rows with the same top-k set; rows differing beyond a tie), and the bf16
search (search_dtype
bfloat16) against float32: rows with the same top-k set, mean overlap |A & B| / k, same nearest
neighbour, and the mean float32 score lost by the bf16 choice (mean over the k chosen).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def load_bank(path):
    checkpoint = common.load_checkpoint(path)
    if "memory_bank" not in checkpoint:
        raise common.UsageError(f"{path} holds no memory_bank; pass the checkpoint.pth of a training run")
    bank = checkpoint["memory_bank"]
    filled = bank["indices"] >= 0
    return bank["embeddings"].float(), filled, checkpoint.get("script"), checkpoint.get("epoch")


def set_overlap(a, b):
    """Per row |set(a_i) & set(b_i)| for (Q, k) index tensors."""
    return (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).sum(dim=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="checkpoint.pth of a training run (has memory_bank)")
    parser.add_argument("--random", type=int, nargs=2, metavar=("M", "D"), help="random unit vectors instead")
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--max-queries", type=int, default=4096)
    parser.add_argument("--tie-tolerance", type=float, default=1e-6,
                        help="float64 score gap below which a different pick counts as a tie")
    args = parser.parse_args()
    if (args.checkpoint is None) == (args.random is None):
        raise SystemExit("error: pass a checkpoint path or --random M D (one of them)")
    if args.random:
        gen = torch.Generator().manual_seed(0)
        keys = F.normalize(torch.randn(*args.random, generator=gen), dim=1)
        queries = keys[:args.max_queries]
        source = f"random unit vectors, M = {args.random[0]}, d = {args.random[1]}"
    else:
        keys, filled, script, epoch = load_bank(args.checkpoint)
        queries = keys[filled][:args.max_queries]
        source = (f"{args.checkpoint} ({script}, after epoch {epoch}): bank {tuple(keys.shape)}, "
                  f"{int(filled.sum())} filled rows")
    print(f"{source}; {queries.shape[0]} queries (bank rows)")
    exact64 = queries.double() @ keys.double().T
    print("| k | fp32 = fp64 sets | fp32 non-tie diffs | bf16 = fp32 sets "
          "| bf16 mean overlap | bf16 same nearest | fp32 score lost by bf16 |")
    print("|---|---|---|---|---|---|---|")
    for k in args.topk:
        ref_sims, ref_idx = exact64.topk(k, dim=1)
        sims32, idx32, _ = common.knn_search(queries, keys, k)
        same64 = set_overlap(idx32, ref_idx) == k
        # a row that differs from float64 must differ only by keys tied with the k-th score
        chosen64 = exact64.gather(1, idx32)
        non_tie = (~same64 & ((chosen64 - ref_sims[:, -1:]).abs().amin(dim=1) > args.tie_tolerance)).sum()
        _, idx16, _ = common.knn_search(queries, keys, k, search_dtype=torch.bfloat16)
        overlap = set_overlap(idx16, idx32)
        same_nearest = (idx16[:, 0] == idx32[:, 0]).float().mean()
        lost = (exact64.gather(1, idx32).mean(1) - exact64.gather(1, idx16).mean(1)).mean()
        print(f"| {k} | {same64.float().mean():.4f} | {int(non_tie)} | "
              f"{(overlap == k).float().mean():.4f} | {overlap.float().mean() / k:.4f} | {same_nearest:.4f} | "
              f"{lost:.2e} |")


if __name__ == "__main__":
    main()
