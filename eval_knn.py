"""k-NN evaluation of a frozen backbone: classify each val image by its nearest train images.

Protocol (the MSF paper's): train and val images Resize(256) + CenterCrop(224) (scaled by 256/224
for other
--image-size), pooled features of the frozen backbone in eval mode, L2-normalised. For each k in
--k:
  majority vote   the most frequent label among the k nearest train images (cosine similarity); a
  tie
                  between classes goes to the tied class of the nearest neighbour (deterministic;
                  upstream breaks ties at random). k = 1 is plain 1-NN.
  weighted vote   DINO's: class score = sum over the k neighbours of exp(similarity / T), T = 0.07.
The search is a chunked matmul + top-k (common.knn_search): val queries in chunks of
--query-chunk-size against train features in chunks of --train-chunk-size, so at most one
query-chunk x train-chunk score matrix exists at a time, never val x train. Features live on the GPU
when there is one (ImageNet: 1.28M x 2048 is 5.2 GB in --feature-dtype float16, 10.5 GB in float32).
Features are cached in --cache-dir (keyed by the weights file's size and content hash, arch,
dataset, split, subset list, image size, feature dtype; --cache-dir none turns it off) and reused by
the next run; peak memory is printed. --arch and --image-size are read from our training
checkpoints.

Semi-supervised k-NN (the CMSF semi rows): --train-list 10percent.txt (or 1percent.txt) makes the
labeled subset, not all of train, the database; k = 1, 5, 10, 20 are reported.

Paper rows (ResNet-50, ImageNet; 1-NN / 20-NN), weights from train_msf.py / train_cmsf_self.py:
  random init   1.5 / 2.0   python eval_knn.py --data /imagenet --arch resnet50
  any trained row           python eval_knn.py --data /imagenet \\
                                --weights runs/msf/checkpoint.pth --output-dir runs/msf/knn
  (BYOL-asym 55.0 / 59.2, MSF s/s 60.6 / 64.0, MSF w/s 1M 62.0 / 64.9, 256K 62.1 / 65.1,
   MSF w/w 54.6 / 57.4, CMSF self 2Q 63.2 / 66.4, CMSF multi-crop 62.3 / 66.2)
Multi-GPU feature extraction: torchrun --nproc_per_node 8 eval_knn.py ... (the search runs on rank
0).
Laptop: python eval_knn.py --dataset synthetic --weights runs/msf/checkpoint.pth
"""
import argparse
import os
import resource
import time

import torch
import torch.nn.functional as F

import common

SCRIPT = "eval_knn.py"


def get_args_parser():
    p = argparse.ArgumentParser("k-NN evaluation", description=__doc__.split("\n")[0],
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
    p.add_argument("--arch", default=None,
                   help="torchvision ResNet of the weights (None: read from our training "
                        "checkpoints, else resnet50)")
    p.add_argument("--image-size", type=int, default=None,
                   help="center-crop size; <= 64 uses the small-image stem (None: read from our "
                        "training checkpoints, else 224)")
    p.add_argument("--train-list", default=None,
                   help="use only the train images named in this file as the database "
                        "(semi-supervised k-NN: SimCLR's 1percent.txt / 10percent.txt, one file "
                        "name per line); needs --dataset imagefolder")
    p.add_argument("--k", type=int, nargs="+", default=None,
                   help="numbers of neighbours (None: 1 20; with --train-list: 1 5 10 20)")
    p.add_argument("--temperature", type=float, default=0.07,
                   help="T of the weighted vote exp(sim / T)")
    p.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"],
                   help="storage precision of the features (float16 halves memory and cache size)")
    p.add_argument("--train-chunk-size", type=int, default=65536,
                   help="train features per score block")
    p.add_argument("--query-chunk-size", type=int, default=1024,
                   help="val features per score block")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache (None: <output-dir>/features; 'none': no cache)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="global batch size of feature extraction")
    p.add_argument("--workers", type=int, default=8, help="data-loading processes per process")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="mixed precision of feature extraction; None: bf16 on GPU, none on CPU")
    p.add_argument("--output-dir", default="./output/knn",
                   help="knn_results.json and the feature cache")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init (no --weights)")
    p.add_argument("--print-freq", type=int, default=50, help="batches between progress lines")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


# ---------------------------------------------------------------- features and cache

def normalized_features(backbone, args, split, device, weights_id):
    """(L2-normalised features in --feature-dtype, labels, num_classes) of one split (the train
    split restricted to --train-list), from the cache when there is a file with the same key, else
    extracted (all ranks) and cached (rank 0)."""
    subset = common.file_sha256(args.train_list) if args.train_list and split == "train" else None
    key = common.feature_cache_key(
        weights_id, arch=args.arch, dataset=args.dataset,
        data=os.path.abspath(args.data) if args.data else None,
        synthetic_images=args.synthetic_images if args.dataset == "synthetic" else None,
        split=split,
        train_list_sha256=subset, image_size=args.image_size, feature_dtype=args.feature_dtype,
        amp=str(args.autocast_dtype))
    path = common.feature_cache_path(args.cache_dir, key,
                                     f"{args.dataset}_{split}_{args.image_size}px_{args.arch}")
    cached = common.load_cached_features(path, key, device)
    if cached is not None:
        if common.is_main_process():
            print(f"{split}: cached features {tuple(cached['features'].shape)} from {path}",
                  flush=True)
        return cached["features"], cached["labels"], cached["num_classes"]
    base, num_classes = common.build_dataset(args.dataset, args.data, split, args.download,
                                             args.image_size,
                                             args.synthetic_images)
    if subset:
        indices, not_found = common.read_subset_list(args.train_list, base)
        if common.is_main_process():
            print(f"--train-list {args.train_list}: {len(indices)} train images are the database; "
                  f"{len(not_found)} names not found in the train folder"
                  + (f" (e.g. {', '.join(not_found[:3])})" if not_found else ""), flush=True)
        base = torch.utils.data.Subset(base, indices)
    dataset = common.IndexedDataset(base, common.eval_transform(args.image_size))
    start = time.time()
    features, labels = common.extract_features(backbone, dataset, args.batch_size, args.workers,
                                               device,
                                               args.autocast_dtype, args.print_freq,
                                               header=f"{split} features")
    features = F.normalize(features, dim=1).to(getattr(torch, args.feature_dtype))
    if common.is_main_process():
        print(f"{split}: {tuple(features.shape)} features in {time.time() - start:.0f}s",
              flush=True)
        common.save_cached_features(path, key, features=features, labels=labels,
                                    num_classes=num_classes)
    return features, labels, num_classes


def peak_memory_mib(device):
    """Peak GPU memory allocated by torch, or the peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # Linux reports KiB


def main(args):
    device = common.init_distributed(args.device)
    args.k = args.k or ([1, 5, 10, 20] if args.train_list else [1, 20])
    if min(args.k) < 1:
        raise common.UsageError(f"--k {args.k}: every k must be at least 1")
    if args.temperature <= 0:
        raise common.UsageError(f"--temperature {args.temperature} must be positive")
    if args.weights and not os.path.isfile(args.weights):
        raise common.UsageError(f"--weights {args.weights} does not exist; pass a checkpoint file "
                                "or omit it for a random-init baseline")
    if args.train_list and args.dataset != "imagefolder":
        raise common.UsageError("--train-list names image files; it needs --dataset imagefolder")
    checkpoint = common.read_weights_file(args.weights, args.unsafe_load) if args.weights else {}
    args.arch, args.image_size = common.resolve_arch_and_image_size(checkpoint, args.weights,
                                                                    args.arch,
                                                                    args.image_size)
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.output_dir, "features")
    args.autocast_dtype = common.amp_dtype(args.amp, device)
    common.fix_random_seeds(args.seed)
    torch.manual_seed(args.seed)  # the same random init on every rank
    start = time.time()

    backbone, _ = common.build_backbone(args.arch, args.image_size)
    source = common.load_backbone_weights(backbone, args.weights, checkpoint) if args.weights else \
        f"random init (seed {args.seed}): no --weights given"
    del checkpoint
    backbone = common.prepare_eval_backbone(backbone, device)
    if common.is_main_process():
        print(f"{SCRIPT}: {args.arch} {args.image_size}px; {source}", flush=True)
    weights_id = common.weights_identity(args.weights, args.seed)
    train_features, train_labels, num_classes = normalized_features(backbone, args, "train", device,
                                                                    weights_id)
    val_features, val_labels, _ = normalized_features(backbone, args, "val", device, weights_id)
    if not common.is_main_process():
        return  # rank 0 searches; the others only helped extract
    if max(args.k) > train_features.shape[0]:
        raise common.UsageError(f"--k {max(args.k)} exceeds the {train_features.shape[0]} train "
                                f"images; use smaller k")

    predictions = common.knn_predict(train_features, train_labels, val_features,
                                     sorted(set(args.k)), num_classes, args.temperature,
                                     args.train_chunk_size, args.query_chunk_size,
                                     print_freq=args.print_freq)
    accuracy = {k: {"majority_top1": 100 * (majority == val_labels).float().mean().item(),
                    "weighted_top1": 100 * (weighted == val_labels).float().mean().item()}
                for k, (majority, weighted) in predictions.items()}
    results = {"weights": args.weights or "random init", "source": source, "arch": args.arch,
               "dataset": args.dataset, "image_size": args.image_size,
               "train_list": args.train_list,
               "train_images": len(train_labels),
               "val_images": len(val_labels), "feature_dim": train_features.shape[1],
               "feature_dtype": args.feature_dtype, "temperature": args.temperature,
               "tie_break": "class of the nearest neighbour among tied classes",
               "accuracy": {str(k): v for k, v in accuracy.items()},
               "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads(),
               "peak_memory_mib": round(peak_memory_mib(device), 1),
               "seconds": round(time.time() - start, 1)}
    os.makedirs(args.output_dir, exist_ok=True)
    common.write_json(os.path.join(args.output_dir, "knn_results.json"), results)
    label = "random init" if not args.weights else args.weights
    print(f"\nk-NN on {args.dataset} val ({len(val_labels)} images, {len(train_labels)} train), "
          f"{label}:")
    print(f"| k | majority top-1 | weighted top-1 (T={args.temperature}) |\n|---|---|---|")
    for k, acc in accuracy.items():
        print(f"| {k} | {acc['majority_top1']:.2f} | {acc['weighted_top1']:.2f} |")
    memory_kind = "GPU max_memory_allocated" if device.type == "cuda" else "process peak RSS"
    print(f"peak memory {results['peak_memory_mib']:.0f} MiB ({memory_kind}); results in "
          f"{os.path.join(args.output_dir, 'knn_results.json')}", flush=True)


if __name__ == "__main__":
    common.run_main(main, get_args_parser())
