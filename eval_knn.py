"""k-NN evaluation of a frozen backbone: classify each val image by its nearest train images.

Protocol (the authors'): train and val images Resize(256) + CenterCrop(224) (scaled by 256/224 for other
--image-size), pooled features of the frozen backbone in eval mode, L2-normalised. For each k in --k:
  majority vote   the most frequent label among the k nearest train images (cosine similarity); a tie
                  between classes goes to the tied class of the nearest neighbour (deterministic;
                  upstream breaks ties at random). k = 1 is plain 1-NN.
  weighted vote   DINO's: class score = sum over the k neighbours of exp(similarity / T), T = 0.07.
The search is a chunked matmul + top-k (common.knn_search): val queries in chunks of --query-chunk-size
against train features in chunks of --train-chunk-size, so at most one query-chunk x train-chunk score
matrix exists at a time, never val x train. Features live on the GPU when there is one
(ImageNet: 1.28M x 2048 is 5.2 GB in --feature-dtype float16, 10.5 GB in float32).
Features are cached in --cache-dir (keyed by the weights file and its mtime, arch, dataset, split,
image size, feature dtype) and reused by the next run; peak memory is printed.

Paper rows (ResNet-50, ImageNet; 1-NN / 20-NN), weights from train_msf.py / train_cmsf_self.py:
  random init   1.5 / 2.0   python eval_knn.py --data /imagenet --arch resnet50
  any trained row           python eval_knn.py --data /imagenet --arch resnet50 \\
                                --weights runs/msf/checkpoint.pth --output-dir runs/msf/knn
  (BYOL-asym 55.0 / 59.2, MSF s/s 60.6 / 64.0, MSF w/s 1M 62.0 / 64.9, 256K 62.1 / 65.1,
   MSF w/w 54.6 / 57.4, CMSF self 2Q 63.2 / 66.4, CMSF multi-crop 62.3 / 66.2)
Multi-GPU feature extraction: torchrun --nproc_per_node 8 eval_knn.py ... (the search runs on rank 0).
Laptop: python eval_knn.py --dataset synthetic --arch resnet18 --image-size 32 --weights runs/msf/checkpoint.pth
"""
import argparse
import hashlib
import json
import os
import resource
import time

import torch
import torch.nn.functional as F

import common

SCRIPT = "eval_knn.py"


def get_args_parser():
    p = argparse.ArgumentParser("k-NN evaluation", description=__doc__.split("\n")[0], add_help=False)
    p.add_argument("--weights", default=None, help="checkpoint of our training scripts, torchvision ResNet "
                   "state dict, or released MSF/CMSF checkpoint (absent: random init)")
    p.add_argument("--data", default=None, help="dataset root (ImageFolder root with train/ and val/, or torchvision root)")
    p.add_argument("--dataset", default="imagefolder",
                   choices=["imagefolder", "cifar10", "cifar100", "stl10", "synthetic"], help="dataset format")
    p.add_argument("--download", action="store_true", help="download cifar/stl10 if missing")
    p.add_argument("--synthetic-images", type=int, default=5000, help="training images of --dataset synthetic")
    p.add_argument("--arch", default="resnet50", help="torchvision ResNet of the weights")
    p.add_argument("--image-size", type=int, default=224, help="center-crop size; <= 64 uses the small-image stem")
    p.add_argument("--k", type=int, nargs="+", default=[1, 20], help="numbers of neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="T of the weighted vote exp(sim / T)")
    p.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"],
                   help="storage precision of the features (float16 halves memory and cache size)")
    p.add_argument("--train-chunk-size", type=int, default=65536, help="train features per score block")
    p.add_argument("--query-chunk-size", type=int, default=1024, help="val features per score block")
    p.add_argument("--cache-dir", default=None, help="feature cache; None: <output-dir>/features")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size of feature extraction")
    p.add_argument("--workers", type=int, default=8, help="data-loading processes per process")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="mixed precision of feature extraction; None: bf16 on GPU, none on CPU")
    p.add_argument("--output-dir", default="./output/knn", help="knn_results.json and the feature cache")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init (no --weights)")
    p.add_argument("--print-freq", type=int, default=50, help="batches between progress lines")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


# ---------------------------------------------------------------- features and cache

def cache_key(args, split):
    """Everything that determines the features of `split`; a changed weights file (mtime) or
    setting gives a new cache file."""
    weights = None
    if args.weights:
        stat = os.stat(args.weights)
        weights = {"path": os.path.abspath(args.weights), "mtime_ns": stat.st_mtime_ns, "bytes": stat.st_size}
    return {"weights": weights or f"random init (seed {args.seed})", "arch": args.arch,
            "dataset": args.dataset, "data": os.path.abspath(args.data) if args.data else None,
            "synthetic_images": args.synthetic_images if args.dataset == "synthetic" else None,
            "split": split, "image_size": args.image_size, "feature_dtype": args.feature_dtype,
            "amp": str(args.autocast_dtype)}


def cache_path(cache_dir, key):
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{key['dataset']}_{key['split']}_{key['image_size']}px_{key['arch']}_{digest}.pt")


def normalized_features(backbone, args, split, device):
    """(L2-normalised features in --feature-dtype, labels, num_classes) of one split, from the cache
    when there is a matching file, else extracted (all ranks) and cached (rank 0)."""
    key = cache_key(args, split)
    path = cache_path(args.cache_dir, key)
    if os.path.isfile(path):
        cached = torch.load(path, map_location=device, weights_only=True)
        if cached["key"] == key:
            if common.is_main_process():
                print(f"{split}: cached features {tuple(cached['features'].shape)} from {path}", flush=True)
            return cached["features"], cached["labels"], cached["num_classes"]
    base, num_classes = common.build_dataset(args.dataset, args.data, split, args.download, args.image_size,
                                             args.synthetic_images)
    dataset = common.IndexedDataset(base, common.eval_transform(args.image_size))
    start = time.time()
    features, labels = common.extract_features(backbone, dataset, args.batch_size, args.workers, device,
                                               args.autocast_dtype, args.print_freq, header=f"{split} features")
    features = F.normalize(features, dim=1).to(getattr(torch, args.feature_dtype))
    if common.is_main_process():
        print(f"{split}: {tuple(features.shape)} features in {time.time() - start:.0f}s", flush=True)
        os.makedirs(args.cache_dir, exist_ok=True)
        common.save_checkpoint({"key": key, "features": features.cpu(), "labels": labels.cpu(),
                                "num_classes": num_classes}, path)
    return features, labels, num_classes


def peak_memory_mib(device):
    """Peak GPU memory allocated by torch, or the peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # Linux reports KiB


def main(args):
    device = common.init_distributed(args.device)
    if min(args.k) < 1:
        raise common.UsageError(f"--k {args.k}: every k must be at least 1")
    if args.temperature <= 0:
        raise common.UsageError(f"--temperature {args.temperature} must be positive")
    if args.weights and not os.path.isfile(args.weights):
        raise common.UsageError(f"--weights {args.weights} does not exist; pass a checkpoint file or omit it "
                                "for a random-init baseline")
    args.cache_dir = args.cache_dir or os.path.join(args.output_dir, "features")
    args.autocast_dtype = common.amp_dtype(args.amp, device)
    common.fix_random_seeds(args.seed)
    torch.manual_seed(args.seed)  # the same random init on every rank
    start = time.time()

    backbone, _ = common.build_backbone(args.arch, args.image_size)
    source = common.load_backbone_weights(backbone, args.weights) if args.weights else \
        f"random init (seed {args.seed}): no --weights given"
    backbone.to(device)
    if common.is_main_process():
        print(f"{SCRIPT}: {args.arch} {args.image_size}px; {source}", flush=True)
    train_features, train_labels, num_classes = normalized_features(backbone, args, "train", device)
    val_features, val_labels, _ = normalized_features(backbone, args, "val", device)
    if not common.is_main_process():
        return  # rank 0 searches; the others only helped extract
    if max(args.k) > train_features.shape[0]:
        raise common.UsageError(f"--k {max(args.k)} exceeds the {train_features.shape[0]} train images; use smaller k")

    predictions = common.knn_predict(train_features, train_labels, val_features, sorted(set(args.k)), num_classes,
                              args.temperature, args.train_chunk_size, args.query_chunk_size,
                              print_freq=args.print_freq)
    accuracy = {k: {"majority_top1": 100 * (majority == val_labels).float().mean().item(),
                    "weighted_top1": 100 * (weighted == val_labels).float().mean().item()}
                for k, (majority, weighted) in predictions.items()}
    results = {"weights": args.weights or "random init", "source": source, "arch": args.arch,
               "dataset": args.dataset, "image_size": args.image_size, "train_images": len(train_labels),
               "val_images": len(val_labels), "feature_dim": train_features.shape[1],
               "feature_dtype": args.feature_dtype, "temperature": args.temperature,
               "tie_break": "class of the nearest neighbour among tied classes",
               "accuracy": {str(k): v for k, v in accuracy.items()},
               "peak_memory_mib": round(peak_memory_mib(device), 1), "seconds": round(time.time() - start, 1)}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "knn_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    label = "random init" if not args.weights else args.weights
    print(f"\nk-NN on {args.dataset} val ({len(val_labels)} images, {len(train_labels)} train), {label}:")
    print(f"| k | majority top-1 | weighted top-1 (T={args.temperature}) |\n|---|---|---|")
    for k, acc in accuracy.items():
        print(f"| {k} | {acc['majority_top1']:.2f} | {acc['weighted_top1']:.2f} |")
    memory_kind = "GPU max_memory_allocated" if device.type == "cuda" else "process peak RSS"
    print(f"peak memory {results['peak_memory_mib']:.0f} MiB ({memory_kind}); "
          f"results in {os.path.join(args.output_dir, 'knn_results.json')}", flush=True)


if __name__ == "__main__":
    common.run_main(main, get_args_parser())
