"""Transfer evaluation on 10 datasets: L2-regularised logistic regression on frozen features.

Protocol (as in the MSF paper, following Kornblith et al. 2019): images resized to 224
(bicubic) and center-cropped, no augmentation; pooled features of the frozen backbone (eval mode);
features standardised with the training set's statistics; multinomial logistic regression with an
L2 penalty fitted by full-batch L-BFGS; the penalty is chosen among 45 values log-spaced in
[1e-6, 1e5] on a validation split, the model is refit on train+val and scored on the test split.
Metric: mean per-class accuracy for Aircraft, Pets, Caltech101, Flowers; top-1 for the others.

Splits (--seed fixes every random one):
  food101, cifar10, cifar100, cars  official train / test; val = random 20 % of train
  pets                              official trainval / test; val = random 20 % of trainval
  aircraft                          official train / val / test (variant level, 100 classes)
  dtd                               official train / val / test of partition 1
  flowers                           official train / val / test
  sun397      torchvision has no split: per class, random 50 images for train and 50 for test
              (the size of the 10 official partitions); val = random 20 % of train
  caltech101  torchvision has no split: per class, random 30 images for train, the rest for
              test (common practice; torchvision drops BACKGROUND_Google, so 101 classes);
              val = random 20 % of train
  (on tiny data a class gives at most half its images to train.)

--data-root holds one sub-folder per dataset, exactly what torchvision reads (--download fetches
all but Cars):
  food-101/{images/<class>/<id>.jpg, meta/train.json, meta/test.json}
  cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
  cifar-100-python/{train, test, meta}
  SUN397/{ClassName.txt, <letter>/<class>/sun_*.jpg}
  stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/*.jpg,
                 cars_test_annos_withlabels.mat, cars_test/*.jpg}
  fgvc-aircraft-2013b/data/{images/*.jpg, variants.txt, images_variant_{train,val,test}.txt}
  dtd/dtd/{images/<class>/*.jpg, labels/{train,val,test}1.txt}
  oxford-iiit-pet/{images/*.jpg, annotations/{trainval,test}.txt}
  caltech101/101_ObjectCategories/<class>/image_NNNN.jpg
  flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}

Outputs in --output-dir: features/<name>_<split>.pt (reused while weights, arch, image size and
seed match), <name>.json per dataset, results.md + results.json (the table next to the MSF poster).
Each dataset can run as its own job (--datasets cars); `--collect` then builds the table.

  torchrun --nproc_per_node=8 transfer_eval.py --arch resnet50 \\
      --weights runs/msf/backbone_torchvision.pth --data-root /data/transfer --output-dir runs/msf/transfer
  python transfer_eval.py --collect --output-dir runs/msf/transfer
"""
import argparse
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torchvision import transforms

import common

# name -> (torchvision class, metric, short column name, where to get it)
DATASETS = {
    "food101": ("Food101", "top1", "Food", "--download"),
    "cifar10": ("CIFAR10", "top1", "C10", "--download"),
    "cifar100": ("CIFAR100", "top1", "C100", "--download"),
    "sun397": ("SUN397", "top1", "SUN", "--download"),
    "cars": ("StanfordCars", "top1", "Cars",
             "the official link is dead, so --download cannot fetch it: get the images and devkit from a "
             "mirror (e.g. Kaggle 'stanford-cars-dataset') plus cars_test_annos_withlabels.mat"),
    "aircraft": ("FGVCAircraft", "mean_per_class", "Aircraft", "--download"),
    "dtd": ("DTD", "top1", "DTD", "--download"),
    "pets": ("OxfordIIITPet", "mean_per_class", "Pets", "--download"),
    "caltech101": ("Caltech101", "mean_per_class", "Caltech", "--download"),
    "flowers": ("Flowers102", "mean_per_class", "Flowers", "--download"),
}
LAYOUTS = {
    "food101": "food-101/{images/<class>/*.jpg, meta/train.json, meta/test.json}",
    "cifar10": "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
    "cifar100": "cifar-100-python/{train, test, meta}",
    "sun397": "SUN397/{ClassName.txt, <letter>/<class>/sun_*.jpg}",
    "cars": "stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, "
            "cars_test_annos_withlabels.mat, cars_test/}",
    "aircraft": "fgvc-aircraft-2013b/data/{images/, variants.txt, images_variant_{train,val,test}.txt}",
    "dtd": "dtd/dtd/{images/<class>/*.jpg, labels/{train,val,test}1.txt}",
    "pets": "oxford-iiit-pet/{images/*.jpg, annotations/{trainval,test}.txt}",
    "caltech101": "caltech101/101_ObjectCategories/<class>/image_NNNN.jpg",
    "flowers": "flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}",
}
# MSF row of the MSF poster (ResNet-50, ImageNet, 200 epochs); its mean is 75.8.
POSTER_MSF = {"food101": 70.7, "cifar10": 92.0, "cifar100": 76.1, "sun397": 59.0, "cars": 60.9,
              "aircraft": 53.5, "dtd": 72.1, "pets": 89.2, "caltech101": 92.1, "flowers": 92.4}
VAL_FRACTION = 0.2
SUN397_PER_CLASS = 50  # train and test images per class, as in the official partitions
CALTECH101_TRAIN_PER_CLASS = 30


def get_args_parser():
    parser = argparse.ArgumentParser("Transfer evaluation: logistic regression on frozen features of 10 "
                                     "datasets", add_help=False)
    parser.add_argument("--weights", default=None, help="backbone weights: a checkpoint of our training "
                        "scripts, a torchvision ResNet state dict, or a released MSF/CMSF checkpoint")
    parser.add_argument("--arch", default="resnet50", help="torchvision ResNet of the weights")
    parser.add_argument("--data-root", default=None, help="folder with one torchvision sub-folder per "
                        "dataset (layout in this file's docstring)")
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma-separated subset of {','.join(DATASETS)}")
    parser.add_argument("--download", action="store_true", help="let torchvision download missing "
                        "datasets into --data-root (all but cars)")
    parser.add_argument("--output-dir", default="transfer", help="features cache, per-dataset JSON, table")
    parser.add_argument("--image-size", default=224, type=int, help="resize (bicubic) + center crop size")
    parser.add_argument("--batch-size", default=256, type=int, help="GLOBAL batch size of feature extraction")
    parser.add_argument("--workers", default=8, type=int, help="data loading workers per process")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                        help="autocast for feature extraction; None: bf16 on GPU, none on CPU")
    parser.add_argument("--print-freq", default=50, type=int, help="batches between extraction progress lines")
    parser.add_argument("--seed", default=0, type=int, help="seed of the random val/train/test splits")
    parser.add_argument("--wd-grid-size", default=45, type=int,
                        help="number of weight decays, log-spaced in [1e-6, 1e5]")
    parser.add_argument("--max-iter", default=1000, type=int, help="L-BFGS iterations per fit")
    parser.add_argument("--solver-dtype", default="float32", choices=["float32", "float64"],
                        help="precision of the logistic regression fit")
    parser.add_argument("--collect", action="store_true",
                        help="only build results.md/results.json from the <name>.json in --output-dir")
    return parser


def main(args):
    if args.collect:
        print(collect(args.output_dir), flush=True)
        return
    names = parse_dataset_names(args.datasets)
    if args.weights is None or not os.path.isfile(args.weights):
        raise common.UsageError(f"--weights {args.weights} is not a file; pass the backbone checkpoint to evaluate")
    if args.data_root is None:
        raise common.UsageError("--data-root is required: the folder that holds the datasets' sub-folders")
    if args.wd_grid_size < 2:
        raise common.UsageError("--wd-grid-size must be at least 2 (the grid spans [1e-6, 1e5])")
    device = common.init_distributed(args.device)
    backbone, _ = common.build_backbone(args.arch, args.image_size)
    log(common.load_backbone_weights(backbone, args.weights))
    backbone.to(device).eval()
    cache_key = {"weights_sha256": file_sha256(args.weights), "arch": args.arch,
                 "image_size": args.image_size, "seed": args.seed}

    # Phase 1, every rank: features (the extraction is shared across ranks). Every dataset that needs
    # extracting is opened first, so a missing one stops the run before hours of work on the others.
    # Fitting waits for phase 2 so that no rank idles in a collective while another one fits.
    to_extract = [name for name in names if not features_are_cached(args.output_dir, name, cache_key)]
    splits = {name: open_splits(name, args) for name in to_extract}
    for name in names:
        if name in splits:
            extract_and_cache(name, splits[name], backbone, args, device, cache_key)
        else:
            log(f"[{name}] reusing cached features in {os.path.join(args.output_dir, 'features')}")
    if not common.is_main_process():
        return
    # Phase 2, main process: one logistic regression grid per dataset (seconds to minutes on a GPU).
    for name in names:
        result = evaluate_dataset(name, args, device)
        write_json(os.path.join(args.output_dir, f"{name}.json"), result)
        print(f"[{name}] test {result['metric']} {result['test_accuracy']:.2f} "
              f"(wd {result['best_wd']:.1e}, val {result['val_accuracy']:.2f})", flush=True)
    print(collect(args.output_dir), flush=True)


def log(message):
    if common.is_main_process():
        print(message, flush=True)


def parse_dataset_names(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names:
        raise common.UsageError(f"--datasets {text!r}: unknown {unknown}; choose from {','.join(DATASETS)}")
    return names


# ---------------------------------------------------------------- data and splits

def to_rgb(image):
    # some Caltech101 / SUN397 images are grayscale or CMYK
    return image.convert("RGB")


def transfer_transform(image_size):
    """Resize(224, bicubic) + CenterCrop(224) (both scaled to --image-size), ImageNet normalisation."""
    return transforms.Compose([
        to_rgb,
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])


def random_split(n, fraction, seed):
    """Seeded split of range(n): (kept indices, held-out indices), round(fraction * n) held out, sorted."""
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = round(fraction * n)
    return sorted(permutation[n_held:]), sorted(permutation[:n_held])


def per_class_split(labels, train_per_class, test_per_class, seed):
    """Seeded per-class split of positions 0..len(labels)-1: each class gives min(train_per_class,
    half its images) to train and then up to test_per_class (None = all the rest) to test."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    train, test = [], []
    for c in labels.unique().tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)].tolist()
        n_train = min(train_per_class, len(members) // 2)
        rest = members[n_train:]
        train += members[:n_train]
        test += rest if test_per_class is None else rest[:test_per_class]
    return sorted(train), sorted(test)


def open_dataset(name, root, transform, download, **split_kwargs):
    """The torchvision dataset class of `name`; missing files become a one-line UsageError."""
    cls = getattr(torchvision.datasets, DATASETS[name][0])
    try:
        return cls(root, transform=transform, download=download, **split_kwargs)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise common.UsageError(
            f"{name}: dataset not found or incomplete under {root} ({str(e).splitlines()[0]}); expected "
            f"{os.path.join(root, LAYOUTS[name])}; to get it: {DATASETS[name][3]}") from None


# official (train, test) constructor arguments of the datasets whose val split is cut from train
TRAIN_TEST_KWARGS = {
    "food101": ({"split": "train"}, {"split": "test"}),
    "cifar10": ({"train": True}, {"train": False}),
    "cifar100": ({"train": True}, {"train": False}),
    "cars": ({"split": "train"}, {"split": "test"}),
    "pets": ({"split": "trainval"}, {"split": "test"}),
}


def build_splits(name, root, image_size, seed, download):
    """{'train', 'val', 'test'} datasets of (image tensor, label) for one transfer dataset (see docstring)."""
    transform = transfer_transform(image_size)
    download = download and name != "cars"  # StanfordCars.download() always raises (dead link)
    if name in ("aircraft", "dtd", "flowers"):  # official val split
        extra = {"partition": 1} if name == "dtd" else {}
        return {split: open_dataset(name, root, transform, download, split=split, **extra)
                for split in ("train", "val", "test")}
    if name in TRAIN_TEST_KWARGS:
        train_kwargs, test_kwargs = TRAIN_TEST_KWARGS[name]
        train_full = open_dataset(name, root, transform, download, **train_kwargs)
        test = open_dataset(name, root, transform, download, **test_kwargs)
    else:  # sun397, caltech101: one pool of images, split per class here
        pool = open_dataset(name, root, transform, download)
        if name == "sun397":
            # rglob order depends on the file system: sort by path so the split is the same everywhere
            order = sorted(range(len(pool)), key=lambda i: str(pool._image_files[i]))
            labels = [pool._labels[i] for i in order]
            train_pos, test_pos = per_class_split(labels, SUN397_PER_CLASS, SUN397_PER_CLASS, seed)
        else:
            order = list(range(len(pool)))
            train_pos, test_pos = per_class_split(pool.y, CALTECH101_TRAIN_PER_CLASS, None, seed)
        train_full = torch.utils.data.Subset(pool, [order[p] for p in train_pos])
        test = torch.utils.data.Subset(pool, [order[p] for p in test_pos])
    train, val = random_split(len(train_full), VAL_FRACTION, seed)
    return {"train": torch.utils.data.Subset(train_full, train), "val": torch.utils.data.Subset(train_full, val),
            "test": test}


# ---------------------------------------------------------------- features

def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def feature_path(output_dir, name, split):
    return os.path.join(output_dir, "features", f"{name}_{split}.pt")


def features_are_cached(output_dir, name, cache_key):
    """True if train/val/test features of `name` exist for these weights, arch, image size and seed.
    Under DDP rank 0 decides, so that every rank joins the same extractions."""
    valid = True
    for split in ("train", "val", "test"):
        path = feature_path(output_dir, name, split)
        valid = valid and os.path.isfile(path) and torch.load(
            path, map_location="cpu", mmap=True, weights_only=True).get("key") == cache_key
    if common.get_world_size() > 1:
        decision = [valid]
        dist.broadcast_object_list(decision, src=0)
        valid = decision[0]
    return valid


def open_splits(name, args):
    """build_splits for this run; with --download under DDP one rank downloads while the others wait."""
    if args.download and common.get_world_size() > 1:
        if common.is_main_process():
            build_splits(name, args.data_root, args.image_size, args.seed, download=True)
        dist.barrier()
    splits = build_splits(name, args.data_root, args.image_size, args.seed, download=args.download)
    log(f"[{name}] images: " + ", ".join(f"{s} {len(d)}" for s, d in splits.items()))
    return splits


def extract_and_cache(name, splits, backbone, args, device, cache_key):
    """Frozen-backbone features of every split, saved (atomically) as features/<name>_<split>.pt."""
    for split, dataset in splits.items():
        start = time.time()
        features, labels = common.extract_features(backbone, dataset, args.batch_size, args.workers, device,
                                                   args.amp, args.print_freq, header=f"[{name}] {split}")
        if common.is_main_process():
            print(f"[{name}] {split} features {tuple(features.shape)} in {time.time() - start:.0f}s", flush=True)
            path = feature_path(args.output_dir, name, split)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save({"features": features.float().cpu(), "labels": labels.long().cpu(), "key": cache_key},
                       path + ".tmp")
            os.replace(path + ".tmp", path)


def load_features(output_dir, name, split):
    cached = torch.load(feature_path(output_dir, name, split), map_location="cpu", weights_only=True)
    return cached["features"], cached["labels"]


# ---------------------------------------------------------------- logistic regression

def standardize(train_features, *other_features):
    """Subtract the train mean, divide by the train std (1 where a feature is constant)."""
    mean = train_features.mean(dim=0)
    std = train_features.std(dim=0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return [(x - mean) / std for x in (train_features, *other_features)]


def logistic_objective(features, labels, weight, bias, wd):
    # mean_i CE(W x_i + b, y_i) + wd/2 * ||W||^2   (the bias is not penalised)
    return F.cross_entropy(features @ weight.T + bias, labels) + 0.5 * wd * weight.pow(2).sum()


def fit_logistic_regression(features, labels, num_classes, wd, max_iter=1000, init=None):
    """Minimise logistic_objective by full-batch L-BFGS (strong-Wolfe line search) on the features'
    device and dtype. init: (weight, bias) to warm-start from. Returns (weight, bias, iterations)."""
    if init is None:
        # start at the optimum for W = 0 (bias = log class frequencies): the bias is unpenalised and
        # badly scaled against W when wd is large, and float32 losses stop L-BFGS before it gets there
        weight = features.new_zeros(num_classes, features.shape[1])
        counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(features.dtype)
        bias = torch.log(counts / counts.sum())
    else:
        weight, bias = init[0].detach().clone(), init[1].detach().clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=50,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = logistic_objective(features, labels, weight, bias, wd)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    iterations = optimizer.state[weight].get("n_iter", 0)
    return weight.detach(), bias.detach(), iterations


def predict(features, weight, bias):
    return (features @ weight.T + bias).argmax(dim=1)


def top1_accuracy(predictions, labels):
    return 100.0 * (predictions == labels).double().mean().item()


def mean_per_class_accuracy(predictions, labels):
    """Average over the classes present in `labels` of the accuracy on that class's samples."""
    counts = torch.bincount(labels)
    correct = torch.bincount(labels[predictions == labels], minlength=len(counts))
    present = counts > 0
    return 100.0 * (correct[present].double() / counts[present].double()).mean().item()


def accuracy(metric, predictions, labels):
    return top1_accuracy(predictions, labels) if metric == "top1" else mean_per_class_accuracy(predictions, labels)


def wd_grid(size):
    """`size` weight decays log-spaced in [1e-6, 1e5], largest first (warm starts go from the simplest
    model to the least regularised one)."""
    return [10 ** (5 - 11 * i / (size - 1)) for i in range(size)]


def evaluate_dataset(name, args, device):
    """Choose the weight decay on val, refit on train+val, score on test. Returns the JSON record."""
    metric = DATASETS[name][1]
    dtype = getattr(torch, args.solver_dtype)
    data = {}
    for split in ("train", "val", "test"):
        features, labels = load_features(args.output_dir, name, split)
        data[split] = (features.to(device, dtype), labels.to(device))
    empty = [split for split, (_, labels) in data.items() if len(labels) == 0]
    if empty:
        raise common.UsageError(f"{name}: the {'/'.join(empty)} split is empty; the dataset is too small")
    num_classes = int(max(labels.max() for _, labels in data.values())) + 1
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = data["train"], data["val"], data["test"]

    train_std, val_std = standardize(train_x, val_x)
    val_scores, params = [], None
    for wd in wd_grid(args.wd_grid_size):
        start = time.time()
        *params, iterations = fit_logistic_regression(train_std, train_y, num_classes, wd, args.max_iter, params)
        val_scores.append(accuracy(metric, predict(val_std, *params), val_y))
        print(f"[{name}] wd {wd:.1e}  val {val_scores[-1]:6.2f}  ({iterations} L-BFGS iterations, "
              f"{time.time() - start:.1f}s)", flush=True)
    best = max(range(len(val_scores)), key=lambda i: (val_scores[i], -i))  # ties: the larger wd
    best_wd = wd_grid(args.wd_grid_size)[best]

    trainval_x, trainval_y = torch.cat([train_x, val_x]), torch.cat([train_y, val_y])
    trainval_std, test_std = standardize(trainval_x, test_x)
    weight, bias, _ = fit_logistic_regression(trainval_std, trainval_y, num_classes, best_wd, args.max_iter)
    test_accuracy = accuracy(metric, predict(test_std, weight, bias), test_y)
    return {"dataset": name, "metric": metric, "test_accuracy": test_accuracy, "best_wd": best_wd,
            "val_accuracy": val_scores[best], "n_train": len(train_y), "n_val": len(val_y),
            "n_test": len(test_y), "num_classes": num_classes, "feature_dim": train_x.shape[1],
            "val_accuracy_per_wd": dict(zip((f"{wd:.3e}" for wd in wd_grid(args.wd_grid_size)), val_scores)),
            "weights": os.path.abspath(args.weights), "arch": args.arch, "image_size": args.image_size,
            "seed": args.seed, "solver_dtype": args.solver_dtype}


# ---------------------------------------------------------------- results table

def write_json(path, record):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)


def collect(output_dir):
    """Read every <name>.json in output_dir, write results.md and results.json, return the markdown."""
    results = {}
    for name in DATASETS:
        path = os.path.join(output_dir, f"{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                results[name] = json.load(f)["test_accuracy"]
    if not results:
        raise common.UsageError(f"no <dataset>.json results in {output_dir}; run transfer_eval.py "
                                "--datasets ... --output-dir there first")
    missing = [name for name in DATASETS if name not in results]
    mean = sum(results.values()) / len(results) if not missing else None
    poster_mean = sum(POSTER_MSF.values()) / len(POSTER_MSF)

    def row(label, values, row_mean):
        cells = [f"{values[n]:.1f}" if n in values else "–" for n in DATASETS]
        return f"| {label} | " + " | ".join(cells) + f" | {'–' if row_mean is None else f'{row_mean:.1f}'} |"

    lines = ["| | " + " | ".join(DATASETS[n][2] for n in DATASETS) + " | mean |",
             "|---" * (len(DATASETS) + 2) + "|",
             row("MSF (poster)", POSTER_MSF, poster_mean),
             row(f"this run ({os.path.basename(os.path.abspath(output_dir))})", results, mean)]
    if missing:
        lines.append(f"\nmissing (no mean until all 10 are done): {', '.join(missing)}")
    markdown = "\n".join(lines) + "\n"
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown)
    write_json(os.path.join(output_dir, "results.json"),
               {"test_accuracy": results, "mean": mean, "missing": missing,
                "metric": {n: DATASETS[n][1] for n in DATASETS},
                "poster_msf": POSTER_MSF, "poster_msf_mean": round(poster_mean, 2)})
    return markdown


if __name__ == "__main__":
    common.run_main(main, get_args_parser())
