"""Transfer evaluation on 10 datasets: logistic regression on frozen features (linear transfer).

Protocol (the MSF paper's transfer table follows BYOL's linear transfer protocol, after Kornblith et
al. 2019; the closest public code, our reference, is linear.py of Ericsson et al.'s ssl-transfer):
images Resize(224, bicubic) of the shorter side + CenterCrop(224), ImageNet mean/std, no
augmentation; pooled features of the frozen backbone (eval mode), RAW: no standardisation, no
L2-normalisation. Classifier: multinomial logistic regression minimising
    sum_i CE(W x_i + b, y_i) + wd/2 * ||W||^2        (bias not penalised)
i.e. scikit-learn's LogisticRegression(C=1/wd), solved to convergence by full-batch L-BFGS (float64
by default; iterations and the final gradient are reported per fit). wd in logspace(-6, 5, 45);
the best wd by val score (ties: the smaller wd, as the reference), refit on train+val, scored on
test. Metric: mean per-class accuracy for Aircraft, Pets, Caltech101, Flowers; top-1 for the others.

Splits (numpy seed --seed, 0 as in the reference):
  aircraft, dtd, flowers            official train / val / test (aircraft: variants, 100 classes;
                                    dtd: partition 1)
  food101, cifar10, cifar100, cars  official train / test; val = random 20 % of train
  pets                              official trainval / test; val = random 20 % of trainval
  sun397      official partition 01: Training_01.txt / Testing_01.txt (classes: ClassName.txt),
              from the dataset's Partitions archive; val = random 20 % of train
  caltech101  102 classes with BACKGROUND_Google (torchvision's class drops it). The reference
              split: np.random.seed(seed); for each class of 101_ObjectCategories in sorted order,
              np.random.choice(its images, 30) with replacement: the drawn images are train (a
              duplicate draw counts once: 2416 train, 6728 test images for seed 0, the reference's
              split files), the rest test. --caltech101-splits DIR uses DIR/train.txt, DIR/test.txt
              instead (lines "Class/image_XXXX.jpg label"). val = random 20 % of train
  random 20 %: np.random.seed(seed); np.random.shuffle(range(n)); the first floor(0.2 n) are val.

--data-root holds one sub-folder per dataset, what torchvision reads (--download fetches all but
Cars and SUN397's partition files):
  food-101/{images/<class>/<id>.jpg, meta/train.json, meta/test.json}
  cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
  cifar-100-python/{train, test, meta}
  SUN397/{ClassName.txt, Training_01.txt, Testing_01.txt, <letter>/<class>/sun_*.jpg}
  stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/*.jpg,
                 cars_test_annos_withlabels.mat, cars_test/*.jpg}
  fgvc-aircraft-2013b/data/{images/*.jpg, variants.txt, images_variant_{train,val,test}.txt}
  dtd/dtd/{images/<class>/*.jpg, labels/{train,val,test}1.txt}
  oxford-iiit-pet/{images/*.jpg, annotations/{trainval,test}.txt}
  caltech101/101_ObjectCategories/<class>/image_NNNN.jpg
  flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}

Outputs in --output-dir: <name>.json per dataset (best wd, val score per wd, L-BFGS iterations),
results.md + results.json (the table next to the MSF poster). Features are cached in --cache-dir
(default <output-dir>/features; keyed by the weights file's content hash, arch, image size, split
settings; 'none' turns the cache off). --arch and --image-size are read from our training
checkpoints. Each dataset can run as its own job (--datasets cars); `--collect` builds the table.

  torchrun --nproc_per_node=8 transfer_eval.py --arch resnet50 \\
      --weights runs/msf/backbone_torchvision.pth --data-root /data/transfer --output-dir
      runs/msf/transfer
  python transfer_eval.py --collect --output-dir runs/msf/transfer
"""
import argparse
import json
import os
import time

import numpy as np
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
             "the official link is dead, so --download cannot fetch it: get the images and devkit "
             "from a mirror (e.g. Kaggle 'stanford-cars-dataset') plus "
             "cars_test_annos_withlabels.mat"),
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
    "sun397": "SUN397/{ClassName.txt, Training_01.txt, Testing_01.txt, <letter>/<class>/sun_*.jpg}",
    "cars": "stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, "
            "cars_test_annos_withlabels.mat, cars_test/}",
    "aircraft": "fgvc-aircraft-2013b/data/{images/, variants.txt, "
                "images_variant_{train,val,test}.txt}",
    "dtd": "dtd/dtd/{images/<class>/*.jpg, labels/{train,val,test}1.txt}",
    "pets": "oxford-iiit-pet/{images/*.jpg, annotations/{trainval,test}.txt}",
    "caltech101": "caltech101/101_ObjectCategories/<class>/image_NNNN.jpg (102 classes)",
    "flowers": "flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}",
}
# MSF row of the MSF poster (ResNet-50, ImageNet, 200 epochs); its mean is 75.8.
POSTER_MSF = {"food101": 70.7, "cifar10": 92.0, "cifar100": 76.1, "sun397": 59.0, "cars": 60.9,
              "aircraft": 53.5, "dtd": 72.1, "pets": 89.2, "caltech101": 92.1, "flowers": 92.4}
VAL_FRACTION = 0.2
CALTECH101_TRAIN_PER_CLASS = 30
SUN397_PARTITIONS_URL = "https://vision.princeton.edu/projects/2010/SUN/download/Partitions.zip"


def get_args_parser():
    parser = argparse.ArgumentParser("Transfer evaluation: logistic regression on frozen features "
                                     "of 10 datasets", add_help=False)
    parser.add_argument("--weights", default=None,
                        help="backbone weights: a checkpoint of our training scripts, a "
                             "torchvision ResNet state dict, or a released MSF/CMSF checkpoint")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="load a --weights file that pickles Python objects besides tensors "
                             "(old third-party releases); this can run code: trusted files only")
    parser.add_argument("--arch", default=None,
                        help="torchvision ResNet of the weights (None: read from our training "
                             "checkpoints, else resnet50)")
    parser.add_argument("--data-root", default=None,
                        help="folder with one torchvision sub-folder per dataset (layout in this "
                             "file's docstring)")
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma-separated subset of {','.join(DATASETS)}")
    parser.add_argument("--download", action="store_true",
                        help="let torchvision download missing datasets into --data-root (all but "
                             "cars and SUN397's partition files)")
    parser.add_argument("--caltech101-splits", default=None,
                        help="folder with train.txt and test.txt (lines 'Class/image_XXXX.jpg "
                             "label') to use instead of drawing the split")
    parser.add_argument("--output-dir", default="transfer", help="per-dataset JSON and the table")
    parser.add_argument("--cache-dir", default=None,
                        help="feature cache (None: <output-dir>/features; 'none': no cache)")
    parser.add_argument("--image-size", default=None, type=int,
                        help="resize (bicubic) + center crop size (None: read from our training "
                             "checkpoints, else 224)")
    parser.add_argument("--batch-size", default=256, type=int,
                        help="GLOBAL batch size of feature extraction")
    parser.add_argument("--workers", default=8, type=int, help="data loading workers per process")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                        help="autocast for feature extraction; None: bf16 on GPU, none on CPU")
    parser.add_argument("--print-freq", default=50, type=int,
                        help="batches between extraction progress lines")
    parser.add_argument("--seed", default=0, type=int,
                        help="numpy seed of the Caltech101 split and the random 20 %% val splits "
                             "(the reference uses 0)")
    parser.add_argument("--wd-grid-size", default=45, type=int,
                        help="number of weight decays, log-spaced in [1e-6, 1e5]")
    parser.add_argument("--max-iter", default=2000, type=int,
                        help="L-BFGS iterations per fit at most")
    parser.add_argument("--tol", default=1e-6, type=float,
                        help="L-BFGS stops when every gradient entry of the per-sample objective "
                             "(the sum objective / n) is below this")
    parser.add_argument("--solver-dtype", default="float64", choices=["float32", "float64"],
                        help="precision of the logistic regression fit")
    parser.add_argument("--collect", action="store_true",
                        help="only build results.md/results.json from the <name>.json in "
                             "--output-dir")
    return parser


def main(args):
    if args.collect:
        print(collect(args.output_dir), flush=True)
        return
    names = parse_dataset_names(args.datasets)
    if args.weights is None or not os.path.isfile(args.weights):
        raise common.UsageError(f"--weights {args.weights} is not a file; pass the backbone "
                                f"checkpoint to evaluate")
    if args.data_root is None:
        raise common.UsageError("--data-root is required: the folder that holds the datasets' "
                                "sub-folders")
    if args.wd_grid_size < 2:
        raise common.UsageError("--wd-grid-size must be at least 2 (the grid spans [1e-6, 1e5])")
    if args.caltech101_splits is not None:
        caltech101_split_files(args.caltech101_splits)  # fail now, not after hours of extraction
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.output_dir, "features")
    checkpoint = common.read_weights_file(args.weights, args.unsafe_load)
    args.arch, args.image_size = common.resolve_arch_and_image_size(checkpoint, args.weights,
                                                                    args.arch,
                                                                    args.image_size)
    device = common.init_distributed(args.device)
    backbone, _ = common.build_backbone(args.arch, args.image_size)
    log(common.load_backbone_weights(backbone, args.weights, checkpoint))
    del checkpoint
    backbone = common.prepare_eval_backbone(backbone, device).eval()
    weights_id = common.weights_identity(args.weights)
    keys = {name: {split: cache_key(weights_id, name, split, args) for split in ("train", "val",
                                                                                 "test")}
            for name in names}

    # Phase 1, every rank: features (the extraction is shared across ranks). Every dataset that
    # needs extracting is opened first, so a missing one stops the run before hours of work on the
    # others.
    # Fitting waits for phase 2 so that no rank idles in a collective while another one fits.
    to_extract = [name for name in names if not features_are_cached(args.cache_dir, keys[name])]
    splits = {name: open_splits(name, args) for name in to_extract}
    in_memory = {}  # features kept here when the cache is off
    for name in names:
        if name in splits:
            in_memory[name] = extract_and_cache(name, splits[name], backbone, args, device,
                                                keys[name])
        else:
            log(f"[{name}] reusing cached features in {args.cache_dir}")
    if not common.is_main_process():
        return
    # Phase 2, main process: one logistic regression grid per dataset (seconds to minutes on a GPU).
    os.makedirs(args.output_dir, exist_ok=True)
    for name in names:
        data = in_memory.get(name) or load_features(args.cache_dir, keys[name])
        result = evaluate_dataset(name, data, args, device)
        common.write_json(os.path.join(args.output_dir, f"{name}.json"), result)
        print(f"[{name}] test {result['metric']} {result['test_accuracy']:.2f} (wd "
              f"{result['best_wd']:.1e}, val {result['val_accuracy']:.2f}; refit "
              f"{result['refit_iterations']} L-BFGS iterations)",
              flush=True)
    print(collect(args.output_dir), flush=True)


def log(message):
    if common.is_main_process():
        print(message, flush=True)


def parse_dataset_names(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names:
        raise common.UsageError(f"--datasets {text!r}: unknown {unknown}; choose from "
                                f"{','.join(DATASETS)}")
    return names


# ---------------------------------------------------------------- data and splits

def transfer_transform(image_size):
    """Resize(224, bicubic) + CenterCrop(224) (both scaled to --image-size), ImageNet
    normalisation."""
    return transforms.Compose([
        common.to_rgb,  # some Caltech101 / SUN397 images are grayscale or CMYK
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])


class ImageList(torch.utils.data.Dataset):
    """Images given as a list of (path, label)."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform
        self.targets = [label for _, label in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return self.transform(common.load_rgb_image(path)), label


def reference_val_split(n, seed, fraction=VAL_FRACTION):
    """The reference's val split of range(n): np.random.seed(seed); shuffle; the first
    floor(fraction * n) indices are val, the rest train. Returns (train, val), each sorted."""
    indices = list(range(n))
    # the stream of np.random.seed(seed) + np.random.shuffle
    np.random.RandomState(seed).shuffle(indices)
    n_val = int(np.floor(fraction * n))
    return sorted(indices[n_val:]), sorted(indices[:n_val])


def caltech101_reference_split(labels, num_classes, seed,
                               train_per_class=CALTECH101_TRAIN_PER_CLASS):
    """The reference's Caltech101 split of positions 0..len(labels)-1 (labels in ImageFolder order):
    per class in label order, np.random.choice(its positions, train_per_class) WITH replacement from
    one np.random.seed(seed) stream; the drawn positions (each once) are train, the rest test."""
    rng = np.random.RandomState(seed)  # the stream of np.random.seed(seed) + np.random.choice
    labels = np.asarray(labels)
    train = set()
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members):
            train.update(rng.choice(members, train_per_class).tolist())
    return sorted(train), sorted(set(range(len(labels))) - train)


def caltech101_split_files(folder):
    """(train.txt, test.txt) of --caltech101-splits, checked to exist."""
    paths = tuple(os.path.join(folder, f"{split}.txt") for split in ("train", "test"))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise common.UsageError(f"--caltech101-splits {folder}: missing {', '.join(missing)}; the "
                                "folder must hold train.txt and test.txt with lines "
                                "'Class/image_XXXX.jpg label'")
    return paths


def read_caltech101_split_file(path, categories):
    samples = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise common.UsageError(f"{path} line {number}: {line.strip()!r} is not "
                                        "'Class/image_XXXX.jpg label'")
            image = os.path.join(categories, parts[0])
            if not os.path.isfile(image):
                raise common.UsageError(f"{path} line {number}: {image} does not exist; the split "
                                        f"files must name images under {categories}")
            samples.append((image, int(parts[1])))
    return samples


def caltech101_splits(root, transform, seed, split_folder=None):
    """(train, test) datasets of Caltech101 with its 102 classes (see the docstring)."""
    categories = os.path.join(root, "caltech101", "101_ObjectCategories")
    if not os.path.isdir(categories):
        raise common.UsageError(f"caltech101: {categories} not found; expected "
                                f"{os.path.join(root, LAYOUTS['caltech101'])}; to get it: "
                                f"--download")
    if split_folder is not None:
        train_file, test_file = caltech101_split_files(split_folder)
        return (ImageList(read_caltech101_split_file(train_file, categories), transform),
                ImageList(read_caltech101_split_file(test_file, categories), transform))
    pool = torchvision.datasets.ImageFolder(categories, transform=transform,
                                            loader=common.load_rgb_image)
    train, test = caltech101_reference_split(pool.targets, len(pool.classes), seed)
    return torch.utils.data.Subset(pool, train), torch.utils.data.Subset(pool, test)


def sun397_splits(root, transform):
    """(train, test) datasets of SUN397's official partition 01; classes from ClassName.txt (lines
    '/a/abbey', sorted by name as the reference does)."""
    base = os.path.join(root, "SUN397")
    files = [os.path.join(base, n) for n in ("ClassName.txt", "Training_01.txt", "Testing_01.txt")]
    missing = [os.path.basename(p) for p in files if not os.path.isfile(p)]
    if missing:
        raise common.UsageError(
            f"sun397: missing {', '.join(missing)} in {base}; the images and ClassName.txt come "
            f"with SUN397.tar.gz (--download), Training_01.txt and Testing_01.txt with the "
            f"Partitions archive of the dataset's site ({SUN397_PARTITIONS_URL}): unpack them into "
            f"{base}")
    with open(files[0]) as f:
        classes = sorted(line.strip()[3:] for line in f if line.strip())  # '/a/abbey' -> 'abbey'
    index_of = {name: i for i, name in enumerate(classes)}
    datasets = []
    for path in files[1:]:
        samples = []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                class_name = os.path.dirname(line)[3:]  # '/a/abbey/sun_x.jpg' -> 'abbey'
                if class_name not in index_of:
                    raise common.UsageError(f"{path} line {number}: class {class_name!r} of {line} "
                                            f"is not in {files[0]}")
                samples.append((os.path.join(base, line.lstrip("/")), index_of[class_name]))
        datasets.append(ImageList(samples, transform))
    return tuple(datasets)


def open_dataset(name, root, transform, download, **split_kwargs):
    """The torchvision dataset class of `name`; missing files become a one-line UsageError."""
    cls = getattr(torchvision.datasets, DATASETS[name][0])
    try:
        return cls(root, transform=transform, download=download, **split_kwargs)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise common.UsageError(
            f"{name}: dataset not found or incomplete under {root} ({str(e).splitlines()[0]}); "
            f"expected {os.path.join(root, LAYOUTS[name])}; to get it: "
            f"{DATASETS[name][3]}") from None


# official (train, test) constructor arguments of the datasets whose val split is cut from train
TRAIN_TEST_KWARGS = {
    "food101": ({"split": "train"}, {"split": "test"}),
    "cifar10": ({"train": True}, {"train": False}),
    "cifar100": ({"train": True}, {"train": False}),
    "cars": ({"split": "train"}, {"split": "test"}),
    "pets": ({"split": "trainval"}, {"split": "test"}),
}


def build_splits(name, root, image_size, seed, download, caltech101_split_folder=None):
    """{'train', 'val', 'test'} datasets of (image tensor, label) for one transfer dataset (see
    the module docstring)."""
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
    elif name == "sun397":
        if download:
            open_dataset(name, root, transform, download)  # images and ClassName.txt
        train_full, test = sun397_splits(root, transform)
    else:
        if download:
            open_dataset(name, root, transform, download)
        train_full, test = caltech101_splits(root, transform, seed, caltech101_split_folder)
    train, val = reference_val_split(len(train_full), seed)
    return {"train": torch.utils.data.Subset(train_full, train),
            "val": torch.utils.data.Subset(train_full, val),
            "test": test}


# ---------------------------------------------------------------- features

def cache_key(weights_id, name, split, args):
    """Everything that determines the features of one split (common.feature_cache_key)."""
    split_files = None
    if name == "caltech101" and args.caltech101_splits:
        split_files = [common.file_sha256(p)
                       for p in caltech101_split_files(args.caltech101_splits)]
    return common.feature_cache_key(weights_id, arch=args.arch, image_size=args.image_size,
                                    dataset=name,
                                    split=split, data_root=os.path.abspath(args.data_root),
                                    seed=args.seed,
                                    split_files=split_files)


def features_are_cached(cache_dir, keys):
    """True if train/val/test features exist under these keys. Under DDP rank 0 decides, so that
    every rank joins the same extractions."""
    valid = True
    for split, key in keys.items():
        path = common.feature_cache_path(cache_dir, key, f"{key['dataset']}_{split}")
        valid = valid and path is not None and os.path.isfile(path) and torch.load(
            path, map_location="cpu", mmap=True, weights_only=True).get("key") == key
    if common.get_world_size() > 1:
        decision = [valid]
        dist.broadcast_object_list(decision, src=0)
        valid = decision[0]
    return valid


def open_splits(name, args):
    """build_splits for this run; with --download under DDP one rank downloads while the others
    wait."""
    if args.download and common.get_world_size() > 1:
        if common.is_main_process():
            build_splits(name, args.data_root, args.image_size, args.seed, True,
                         args.caltech101_splits)
        dist.barrier()
    splits = build_splits(name, args.data_root, args.image_size, args.seed, args.download,
                          args.caltech101_splits)
    log(f"[{name}] images: " + ", ".join(f"{s} {len(d)}" for s, d in splits.items()))
    return splits


def extract_and_cache(name, splits, backbone, args, device, keys):
    """Frozen-backbone features of every split, cached (atomically) under their keys; returns
    {split: (features, labels)} on CPU when the cache is off (rank 0), else None."""
    kept = {}
    for split, dataset in splits.items():
        start = time.time()
        features, labels = common.extract_features(backbone, dataset, args.batch_size, args.workers,
                                                   device,
                                                   args.amp, args.print_freq,
                                                   header=f"[{name}] {split}")
        if common.is_main_process():
            print(f"[{name}] {split} features {tuple(features.shape)} in "
                  f"{time.time() - start:.0f}s", flush=True)
            path = common.feature_cache_path(args.cache_dir, keys[split], f"{name}_{split}")
            common.save_cached_features(path, keys[split], features=features.float(),
                                        labels=labels.long())
            if path is None:
                kept[split] = (features.float().cpu(), labels.long().cpu())
    return kept or None


def load_features(cache_dir, keys):
    data = {}
    for split, key in keys.items():
        path = common.feature_cache_path(cache_dir, key, f"{key['dataset']}_{split}")
        cached = torch.load(path, map_location="cpu", weights_only=True)
        data[split] = (cached["features"], cached["labels"])
    return data


# ---------------------------------------------------------------- logistic regression

def logistic_objective(features, labels, weight, bias, wd):
    """The reference's objective (scikit-learn's LogisticRegression(C=1/wd), multinomial):
    sum_i CE(W x_i + b, y_i) + wd/2 * ||W||^2, the bias not penalised."""
    cross_entropy = F.cross_entropy(features @ weight.T + bias, labels, reduction="sum")
    return cross_entropy + 0.5 * wd * weight.pow(2).sum()


def fit_logistic_regression(features, labels, num_classes, wd, max_iter=2000, tol=1e-6, init=None):
    """Minimise logistic_objective by full-batch L-BFGS (strong-Wolfe line search) on the features'
    device and dtype; it minimises the objective / n (same optimum, gradients of order 1), until
    every gradient entry is below `tol` or float64 can no longer lower the loss. For large wd the
    penalty's curvature wd / n dwarfs the bias's: L-BFGS runs on W * sqrt(wd / n) (a change of
    variables, same optimum) so both are of order 1. init: (weight, bias) to warm-start from.
    Returns (weight, bias, iterations, max |gradient| of the objective / n in W and b at the
    end)."""
    n = features.shape[0]
    scale = max(1.0, wd / n) ** 0.5
    if init is None:
        # start at the optimum for W = 0 (bias = log class frequencies)
        weight = features.new_zeros(num_classes, features.shape[1])
        counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(features.dtype)
        bias = torch.log(counts / counts.sum())
    else:
        weight, bias = init[0].detach().clone(), init[1].detach().clone()
    scaled_weight = (weight * scale).requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([scaled_weight, bias], lr=1, max_iter=max_iter, history_size=50,
                                  tolerance_grad=tol, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = logistic_objective(features, labels, scaled_weight / scale, bias, wd) / n
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
        closure()
    gradient = max(scaled_weight.grad.abs().max().item() * scale, bias.grad.abs().max().item())
    iterations = optimizer.state[scaled_weight].get("n_iter", 0)
    return (scaled_weight / scale).detach(), bias.detach(), iterations, gradient


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
    if metric == "top1":
        return top1_accuracy(predictions, labels)
    return mean_per_class_accuracy(predictions, labels)


def wd_grid(size):
    """`size` weight decays log-spaced in [1e-6, 1e5] (the reference's logspace(-6, 5, 45)), largest
    first: warm starts go from the simplest model to the least regularised one."""
    return np.logspace(-6, 5, size)[::-1].tolist()


class Classifier:
    """Logistic regression over the classes present in its training labels (a class without training
    images has no finite optimum; scikit-learn also fits only the classes it sees)."""

    def __init__(self, labels):
        self.classes = torch.unique(labels)

    def fit(self, features, labels, wd, args, init=None):
        targets = torch.searchsorted(self.classes, labels)
        *self.params, iterations, gradient = fit_logistic_regression(
            features, targets, len(self.classes), wd, args.max_iter, args.tol, init)
        return iterations, gradient

    def predict(self, features):
        return self.classes[predict(features, *self.params)]


def evaluate_dataset(name, data, args, device):
    """Choose the weight decay on val, refit on train+val, score on test. Returns the JSON
    record."""
    metric = DATASETS[name][1]
    dtype = getattr(torch, args.solver_dtype)
    empty = [split for split, (_, labels) in data.items() if len(labels) == 0]
    if empty:
        raise common.UsageError(f"{name}: the {'/'.join(empty)} split is empty; the dataset is too "
                                f"small")
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        (data[s][0].to(device, dtype), data[s][1].to(device)) for s in ("train", "val", "test"))
    num_classes = int(max(y.max() for y in (train_y, val_y, test_y))) + 1

    grid = wd_grid(args.wd_grid_size)
    val_scores, iterations, gradients = [], [], []
    classifier, init = Classifier(train_y), None
    for wd in grid:
        start = time.time()
        its, gradient = classifier.fit(train_x, train_y, wd, args, init)
        init = classifier.params
        val_scores.append(accuracy(metric, classifier.predict(val_x), val_y))
        iterations.append(its)
        gradients.append(gradient)
        print(f"[{name}] wd {wd:.1e}  val {val_scores[-1]:6.2f}  ({its} L-BFGS iterations, max "
              f"|grad| {gradient:.1e}, {time.time() - start:.1f}s)", flush=True)
    # the reference walks the grid upwards and keeps the first strict maximum: ties go to the
    # smaller wd
    best = max(range(len(grid)), key=lambda i: (val_scores[i], i))
    best_wd = grid[best]
    at_end = best in (0, len(grid) - 1)
    if at_end:
        print(f"[{name}] warning: the best wd {best_wd:.1e} is at the "
              f"{'largest' if best == 0 else 'smallest'} end of the grid [1e-6, 1e5]; the optimum "
              f"may lie outside it", flush=True)
    # L-BFGS stops at max |grad| <= tol, or earlier where float64 can no longer lower the loss
    # (large wd: a stiff problem); only a fit cut off by --max-iter is unconverged
    not_converged = [f"{wd:.1e}" for wd, its in zip(grid, iterations) if its >= args.max_iter]

    trainval_x, trainval_y = torch.cat([train_x, val_x]), torch.cat([train_y, val_y])
    refit = Classifier(trainval_y)
    refit_iterations, refit_gradient = refit.fit(trainval_x, trainval_y, best_wd, args)
    if refit_iterations >= args.max_iter:
        not_converged.append(f"refit {best_wd:.1e}")
    if not_converged:
        print(f"[{name}] warning: L-BFGS stopped at --max-iter {args.max_iter} before converging "
              f"for wd {', '.join(not_converged)}; raise --max-iter", flush=True)
    test_accuracy = accuracy(metric, refit.predict(test_x), test_y)
    return {"dataset": name, "metric": metric, "test_accuracy": test_accuracy, "best_wd": best_wd,
            "best_wd_at_grid_end": at_end, "val_accuracy": val_scores[best],
            "n_train": len(train_y),
            "n_val": len(val_y), "n_test": len(test_y), "num_classes": num_classes,
            "feature_dim": train_x.shape[1],
            "val_accuracy_per_wd": dict(zip((f"{wd:.3e}" for wd in grid), val_scores)),
            "lbfgs_iterations_per_wd": dict(zip((f"{wd:.3e}" for wd in grid), iterations)),
            "refit_iterations": refit_iterations, "refit_max_abs_gradient": refit_gradient,
            "not_converged": not_converged, "max_iter": args.max_iter, "tol": args.tol,
            "weights": os.path.abspath(args.weights), "arch": args.arch,
            "image_size": args.image_size,
            "seed": args.seed, "solver_dtype": args.solver_dtype,
            "caltech101_splits": args.caltech101_splits if name == "caltech101" else None}


# ---------------------------------------------------------------- results table

def collect(output_dir):
    """Read every <name>.json in output_dir, write results.md and results.json, return the
    markdown."""
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
        mean = "–" if row_mean is None else f"{row_mean:.1f}"
        return f"| {label} | " + " | ".join(cells) + f" | {mean} |"

    lines = ["| | " + " | ".join(DATASETS[n][2] for n in DATASETS) + " | mean |",
             "|---" * (len(DATASETS) + 2) + "|",
             row("MSF (poster)", POSTER_MSF, poster_mean),
             row(f"this run ({os.path.basename(os.path.abspath(output_dir))})", results, mean)]
    if missing:
        lines.append(f"\nmissing (no mean until all 10 are done): {', '.join(missing)}")
    markdown = "\n".join(lines) + "\n"
    common.atomic_write(os.path.join(output_dir, "results.md"),
                        lambda f: f.write(markdown.encode()))
    common.write_json(os.path.join(output_dir, "results.json"),
                      {"test_accuracy": results, "mean": mean, "missing": missing,
                       "metric": {n: DATASETS[n][1] for n in DATASETS},
                       "poster_msf": POSTER_MSF, "poster_msf_mean": round(poster_mean, 2)})
    return markdown


if __name__ == "__main__":
    common.run_main(main, get_args_parser())
