"""Proves the suite on a GPU node in minutes: every trainer and evaluation on CUDA, no host syncs,
speed and memory in one table.

    python tools/gpu_check.py                        # this node's GPUs, stops after 8 minutes
    python tools/gpu_check.py --time-limit 30        # the whole matrix
    python tools/gpu_check.py --device cpu           # tiny sizes on the CPU (checks the tool)

Rows (each isolated: a row that fails says why in one line, the others still run), in-process
checks first, then script runs:
- Ghost BatchNorm: a batch of 256 in groups of 64 equals four BatchNorms (bf16, fp16);
- the loader: the two-stage pipeline's device half per batch, its worker side per core;
- the k-NN search of eval_knn (1.28M x 2048 float16 random features, 50,000 queries), CMSF-KM's
  k-means (1.28M x 128 into 50,000 clusters, one epoch), transfer_eval's L-BFGS fit;
- with two or more GPUs, a 2-process NCCL Ghost BatchNorm run equals the 1-process run (float64,
  as the gloo test does; gloo on the CPU);
- eval_knn.py, eval_linear.py (both protocols) for one epoch of a few steps on synthetic images;
- every trainer variant for a few dozen steps at real scale (ResNet-50, 224 px, batch 256 per GPU
  or the largest that fits, banks of 1,024,000 (MSF) and 128,000 (CMSF)) on synthetic images or
  --data, each in bf16 (where native), fp16 (GradScaler) and fp32, channels_last; every variant
  also runs its first step on the CPU in float32, the reference its first CUDA loss must be
  close to.
Training rows run through tools/gpu_check_runner.py (a host sync outside print steps fails the
row and names the line; img/s, data ms/it, max_memory_allocated). Rows the time limit leaves out
are listed as "not reached". Writes <output-dir>/gpu_check.md and gpu_check.json; exit code 1 when
a row failed.
"""
import argparse
import copy
import datetime
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402

RUNNER = os.path.join(REPO_ROOT, "tools", "gpu_check_runner.py")
PRINT_FREQ = 10  # the trainers' preemption poll (a deliberate sync every 10 iterations) then
# falls on print steps, which the sync check leaves out

# The sizes the papers train and evaluate at; --scale multiplies the counts (not the dimensions).
REAL_SIZES = dict(msf_bank=1_024_000, cmsf_bank=128_000, knn_database=1_281_167,
                  knn_queries=50_000, knn_dim=2048, kmeans_points=1_281_167, kmeans_dim=128,
                  kmeans_clusters=50_000, transfer_samples=40_000, transfer_dim=2048,
                  transfer_classes=100, loader_images=256)
MINIMUM_SIZES = dict(knn_queries=64, loader_images=8, transfer_samples=200,
                     transfer_classes=10)  # tiny runs still measure something
DEFAULTS = {"cuda": dict(arch="resnet50", image_size=224, batch_size=256, steps=20, scale=1.0),
            "cpu": dict(arch="resnet10", image_size=8, batch_size=8, steps=2, scale=1 / 4000)}

# |first CUDA loss - first CPU float32 loss| <= relative * |CPU loss| + absolute. bf16 keeps 8
# significant bits, fp16 11: every layer's output is rounded by up to 0.4 % / 0.05 %, and through
# the network (BatchNorm renormalising) the embeddings, and so the loss, move by percents / tenths
# of a percent. On the CPU at the test's tiny sizes (BatchNorm over 2 samples, where rounding shows
# most) bf16 moved the first loss by up to 3.4 % and fp16 by up to 0.8 %: the bounds are 5 % and
# 2 %, while a wrong view, neighbour set or loss term moves it by more. fp32 on CUDA runs cuDNN's
# convolutions in TF32 (11 bits, float32 sums): 1 %. CPU float32 rows against the CPU reference:
# the same pinned kernels compute the same bits.
LOSS_TOLERANCE = {"cuda bf16": (0.05, 1e-3), "cuda fp16": (0.02, 1e-4),
                  "cuda fp32": (0.01, 1e-4), "cpu bf16": (0.05, 1e-3),
                  "cpu fp16": (0.02, 1e-4), "cpu fp32": (0.0, 0.0)}

# Every trainer variant: (row name, script, extra flags, epochs). Flags in braces are filled from
# the sizes of the run. Two epochs where the constraint needs the first one's embeddings.
TRAINERS = [
    ("msf w/s", "train_msf.py", ["--mem-bank-size", "{msf_bank}"], 1),
    ("msf s/s", "train_msf.py", ["--mem-bank-size", "{msf_bank}",
                                 "--augmentation", "strong/strong"], 1),
    ("cmsf_self 2q", "train_cmsf_self.py", ["--mem-bank-size", "{cmsf_bank}"], 2),
    ("cmsf_self kmeans", "train_cmsf_self.py", ["--mem-bank-size", "{cmsf_bank}",
                                                "--constraint", "kmeans",
                                                "--num-clusters", "{train_clusters}"], 2),
    ("cmsf_self embeddings", "train_cmsf_self.py", ["--mem-bank-size", "{cmsf_bank}",
                                                    "--constraint", "embeddings",
                                                    "--constraint-embeddings", "{embeddings}"], 1),
    ("cmsf_self multi-crop 2+6", "train_cmsf_self.py", ["--mem-bank-size", "{cmsf_bank}",
                                                        "--local-crops-number", "6",
                                                        "--local-crops-size", "{local_crop}"], 1),
    ("cmsf_sup k=10", "train_cmsf_sup.py", ["--mem-bank-size", "{cmsf_bank}"], 1),
    ("cmsf_sup top-all", "train_cmsf_sup.py", ["--mem-bank-size", "{cmsf_bank}",
                                               "--topk", "0"], 1),
    ("cmsf_sup xent", "train_cmsf_sup.py", ["--mem-bank-size", "{cmsf_bank}",
                                            "--loss", "xent"], 1),
    ("cmsf_sup noisy 25 %", "train_cmsf_sup.py", ["--mem-bank-size", "{cmsf_bank}",
                                                  "--label-noise", "0.25"], 1),
    ("cmsf_semi 10 %", "train_cmsf_semi.py", ["--mem-bank-size", "{cmsf_bank}",
                                              "--labeled-fraction", "0.1"], 1),
]
PRECISIONS = ("bf16", "fp16", "fp32")
AMP_FLAG = {"bf16": "bf16", "fp16": "fp16", "fp32": "none"}


class RowFailed(Exception):
    """A row's check did not hold; the message is the row's one line."""


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda",
                   help="cuda (every GPU of this node) or cpu (tiny sizes: checks the tool)")
    p.add_argument("--time-limit", type=float, default=8.0,
                   help="minutes; rows not started by then are listed as not reached")
    p.add_argument("--output-dir", default="output/gpu_check",
                   help="gpu_check.md, gpu_check.json, one log per script run")
    p.add_argument("--data", default=None,
                   help="an ImageFolder root (train/) for the trainers; default: synthetic images")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                   help="precisions of the training rows")
    p.add_argument("--arch", default=None, help="default: resnet50 on cuda, resnet10 on cpu")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 / 8")
    p.add_argument("--batch-size", type=int, default=None,
                   help="per GPU, halved on out-of-memory down to 64; default: 256 / 8")
    p.add_argument("--steps", type=int, default=None,
                   help="training iterations per epoch of each row (the second half is timed; a "
                        "multiple of 20 keeps the semi-supervised labeler round, a sync, on a "
                        "print step); default: 20 / 2")
    p.add_argument("--scale", type=float, default=None,
                   help="multiplies banks, k-NN database, k-means points and transfer samples; "
                        "default: 1 / 0.00025")
    p.add_argument("--workers", type=int, default=None,
                   help="loader processes per training process; default: the scripts' (cuda), "
                        "0 (cpu)")
    return p


# ---------------------------------------------------------------- set-up

def resolve_config(args):
    """The run's sizes and device, every input checked (UsageError) before anything runs."""
    if args.device not in ("cuda", "cpu"):
        raise common.UsageError(f"--device {args.device}: expected cuda or cpu")
    device = common.select_device(args.device)
    if args.time_limit < 0:
        raise common.UsageError(f"--time-limit {args.time_limit} must be 0 or more minutes")
    defaults = DEFAULTS[device.type]
    config = argparse.Namespace(**{name: getattr(args, name) if getattr(args, name) is not None
                                   else value for name, value in defaults.items()})
    for name in ("image_size", "batch_size", "steps"):
        if getattr(config, name) < 1:
            raise common.UsageError(f"--{name.replace('_', '-')} {getattr(config, name)} must "
                                    "be at least 1")
    if config.scale <= 0:
        raise common.UsageError(f"--scale {config.scale} must be positive")
    if args.data is not None and not os.path.isdir(os.path.join(args.data, "train")):
        raise common.UsageError(f"--data {args.data} has no train/ folder; pass an ImageFolder "
                                "root (train/<class>/<images>)")
    config.device, config.data, config.precisions = device, args.data, args.precisions
    config.gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    config.workers = args.workers if args.workers is not None else (
        None if device.type == "cuda" else 0)
    config.sizes = {name: value if name.endswith("_dim")
                    else max(MINIMUM_SIZES.get(name, 1), round(value * config.scale))
                    for name, value in REAL_SIZES.items()}
    config.output_dir = os.path.abspath(args.output_dir)
    config.time_limit_s = 60 * args.time_limit
    return config


def environment(config):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "cpu_cores": cores,
            "gpus": config.gpus, "cores_per_gpu": cores // config.gpus}
    if config.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(config.device)
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        info["gpu"] = "none (--device cpu)"
    return info


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device):
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def peak_gib(device, base=0):
    if device.type != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated(device) - base) / 2 ** 30, 2)


def one_line(error):
    """An exception as one line: its type, message and the innermost repository frame."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(f.filename).startswith(REPO_ROOT)]
    at = f" at {os.path.relpath(frames[-1].filename, REPO_ROOT)}:{frames[-1].lineno}" if frames \
        else ""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {(lines[-1] if lines else '')[:240]}{at}"


# ---------------------------------------------------------------- in-process rows

def ghost_bn_row(config, dtype):
    """Batch 256, bn groups of 64: output, input and parameter gradients, running statistics
    equal four separate BatchNorms over the quarters, with half-precision activations in
    channels_last as in the trainers. Tolerance: 2 units in the last place of the dtype."""
    device, generator = config.device, torch.Generator().manual_seed(0)
    bn = torch.nn.BatchNorm2d(64)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(64, generator=generator))
        bn.bias.copy_(torch.randn(64, generator=generator))
    bn = bn.to(device)
    separate = [copy.deepcopy(bn) for _ in range(4)]
    ghost = common.convert_batchnorm(copy.deepcopy(bn), 64, local_batch_size=256, world_size=1)
    x = torch.randn(256, 64, 7, 7, generator=generator).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(256, 64, 7, 7, generator=generator).to(device, dtype)
    x_ghost, x_separate = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast(device.type, dtype=dtype):
        out = ghost(x_ghost)
        expected = torch.cat([m(part) for m, part in zip(separate, x_separate.split(64))])
    (out.float() * upstream.float()).sum().backward()
    (expected.float() * upstream.float()).sum().backward()
    eps = torch.finfo(dtype).eps
    pairs = {"output": (out, expected), "input gradient": (x_ghost.grad, x_separate.grad),
             "weight gradient": (ghost.weight.grad, sum(m.weight.grad for m in separate)),
             "running mean": (ghost.running_mean,
                              torch.stack([m.running_mean for m in separate]).mean(0)),
             "running var": (ghost.running_var,
                             torch.stack([m.running_var for m in separate]).mean(0))}
    worst = {}
    for name, (got, want) in pairs.items():
        got, want = got.detach().float(), want.detach().float()
        scale = want.abs().max().clamp(min=1)
        worst[name] = float((got - want).abs().max() / scale)
        if worst[name] > 2 * eps:
            raise RowFailed(f"{name} differs by {worst[name]:.2e} of its largest value "
                            f"(tolerance {2 * eps:.1e})")
    return {"result": "equal to 4 BatchNorms: max difference / largest value "
                      + ", ".join(f"{name} {value:.1e}" for name, value in worst.items())
                      + f" (tolerance {2 * eps:.1e})", "max_relative_difference": worst}


def ghost_bn_network():
    """resnet10 encoder + predictor in float64 (BatchNorm2d in the backbone, BatchNorm1d in the
    heads), the same weights every call."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = common.build_encoder("resnet10", 16)
        return torch.nn.Sequential(encoder, common.build_predictor(encoder)).double()


def ghost_bn_steps(network, rows, device, steps=2, global_batch=64):
    """Two steps of forward(rows of the step's global batch), backward of sum(out * weights):
    outputs, input gradients, parameter gradients (summed over steps) and buffers, on the CPU."""
    outputs, input_grads = [], []
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 + step)
        images = torch.randn(global_batch, 3, 8, 8, generator=generator, dtype=torch.float64)
        weights = torch.randn(global_batch, 128, generator=generator, dtype=torch.float64)
        images = images[rows].to(device).requires_grad_()
        out = network(images)
        (out * weights[rows].to(device)).sum().backward()
        outputs.append(out.detach().cpu())
        input_grads.append(images.grad.cpu())
    return {"outputs": outputs, "input_grads": input_grads,
            "param_grads": {n: p.grad.cpu() for n, p in network.named_parameters()},
            "buffers": {n: b.cpu() for n, b in network.named_buffers()}}


def ghost_bn_plan(config):
    """The runner plan of the 2-process Ghost BatchNorm row (its ranks write rank0.pt, rank1.pt)."""
    folder = os.path.join(config.output_dir, "ghost_bn_2proc")
    return {"name": "ghost BN 2 processes", "ghost_bn": folder, "device": config.device.type,
            "port": str(free_port()), "result": os.path.join(folder, "result.json"),
            "log": os.path.join(folder, "log.txt")}


def ghost_bn_compare(config, folder):
    """2 processes x 32 (NCCL on GPUs, gloo on the CPU) with --bn-batch-size 64 against one
    process with one batch of 64, in float64: outputs, input gradients, parameter gradients
    (summed over the ranks, as DDP's all-reduce does up to 1 / world) and running statistics
    within 1e-9 + 1e-8 x |value|, as tests/test_ghost_bn.py asks of gloo."""
    ranks = [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    reference = ghost_bn_steps(ghost_bn_network().to(config.device), slice(None), config.device)
    pairs = []
    for step in range(2):
        for part in ("outputs", "input_grads"):
            pairs.append((f"step {step + 1} {part}", torch.cat([r[part][step] for r in ranks]),
                          reference[part][step]))
    for name, grad in reference["param_grads"].items():
        pairs.append((f"{name} gradient", ranks[0]["param_grads"][name]
                      + ranks[1]["param_grads"][name], grad))
    for name, buffer in reference["buffers"].items():
        if buffer.is_floating_point():
            pairs += [(f"{name} (rank {r})", ranks[r]["buffers"][name], buffer) for r in range(2)]
    worst = 0.0
    for what, got, want in pairs:
        excess = float(((got - want).abs() - 1e-8 * want.abs()).max())
        worst = max(worst, float((got - want).abs().max()))
        if excess > 1e-9:
            raise RowFailed(f"{what} differs by more than 1e-9 + 1e-8 x |value| "
                            f"(max difference {float((got - want).abs().max()):.1e})")
    backend = "NCCL" if config.device.type == "cuda" else "gloo"
    return {"result": f"2 {backend} processes x 32 = 1 process x 64: outputs, gradients, running "
                      f"statistics within {worst:.1e} (tolerance 1e-9 + 1e-8 x |value|)",
            "max_difference": worst}


def ghost_bn_worker(folder, device_name, port):
    """The 2 ranks of the row ghost_bn_compare checks, run by gpu_check_runner.py before anything
    else in its process: rank 1 is a fork of rank 0 (no second interpreter start; CUDA is not
    initialised before the fork). Returns the exit code (rank 0)."""
    os.makedirs(folder, exist_ok=True)
    saved = {name: os.environ.get(name) for name in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                     "RANK", "LOCAL_RANK")}
    os.environ.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    child = os.fork()
    rank = 1 if child == 0 else 0
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    code = 0
    try:
        device = common.init_distributed(device_name)
        network = common.convert_batchnorm(ghost_bn_network(), 64, 32).to(device)
        results = ghost_bn_steps(network, slice(rank * 32, (rank + 1) * 32), device)
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
        torch.distributed.destroy_process_group()
    except Exception:  # this rank's traceback goes to the row's log
        traceback.print_exc()
        code = 1
    if child == 0:
        sys.stdout.flush()
        os._exit(code)
    _, status = os.waitpid(child, 0)
    for name, value in saved.items():  # the runner's next runs are single-process again
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return code or int(status != 0)


def write_jpegs(folder, count, seed=0):
    """JPEGs of ImageNet's typical size (500 x 375, quality 90): smooth colour fields plus fine
    texture, whose decode costs what a photograph's does (noise would be slower, flat colour
    faster)."""
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((500, 375), Image.BICUBIC)).astype(np.int16)
        pixels = pixels + rng.integers(-20, 21, (375, 500, 1))
        path = os.path.join(folder, f"{i:04d}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


class JpegFiles(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return common.load_rgb_image(self.paths[index]), 0


def loader_row(config, deadline):
    """The two-stage pipeline (two views, weak + strong) on 500 x 375 JPEGs: the worker side
    (decode, crops, flips, parameter draws, collation) on one core, and the device half (colour
    jitter, grayscale, blur, normalisation) per batch on the training device. Best of 3 rounds."""
    from torch.utils.data import default_collate
    folder = os.path.join(config.output_dir, "loader_jpegs")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    count = config.sizes["loader_images"]
    batch_size = min(config.batch_size, count)  # the device half sees the training batch
    views = common.two_view_transform("weak/strong", config.image_size, on_device=True)
    dataset = common.IndexedDataset(JpegFiles(write_jpegs(folder, count)), views)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one loader worker is one single-threaded process
    try:
        worker_seconds, batches = math.inf, []
        for _ in range(3):
            start, batches = time.perf_counter(), []
            for first in range(0, count, batch_size):
                batches.append(default_collate([dataset[(i, common.sample_seed(0, 0, i))]
                                                for i in range(first, min(first + batch_size,
                                                                          count))])[0])
            worker_seconds = min(worker_seconds, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    device_seconds = math.inf
    common.prepare_views(batches[0], config.device, channels_last=True)  # kernels, allocator
    for _ in range(3):
        synchronize(config.device)
        start = time.perf_counter()
        for views in batches:
            common.prepare_views(views, config.device, channels_last=True)
        synchronize(config.device)
        device_seconds = min(device_seconds, time.perf_counter() - start)
    shutil.rmtree(folder, ignore_errors=True)
    worker_rate, device_rate = count / worker_seconds, count / device_seconds
    cores = environment(config)["cores_per_gpu"]
    return {"result": f"device half {device_rate:.0f} images/s per {config.device.type}; worker "
                      f"side {worker_rate:.0f} images/s per core, {cores * worker_rate:.0f} with "
                      f"the {cores} cores per GPU ({config.image_size} px, 2 views)",
            "device_images_per_second": device_rate, "worker_images_per_second_per_core":
            worker_rate, "cores_per_gpu": cores}


def knn_search_row(config, deadline):
    """eval_knn's search (common.knn_predict with eval_knn's default chunks): random unit
    features, float16 on CUDA (eval_knn --feature-dtype float16), float32 on the CPU; 1-NN and
    20-NN with both votes."""
    device, sizes = config.device, config.sizes
    n, queries, dim = sizes["knn_database"], sizes["knn_queries"], sizes["knn_dim"]
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    database = torch.empty(n, dim, dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for start in range(0, n, 65536):  # filled in slices: no float32 copy of the whole table
        block = torch.randn(min(65536, n - start), dim, device=device, generator=generator)
        database[start:start + block.shape[0]] = F.normalize(block, dim=1).to(dtype)
    labels = torch.randint(0, 1000, (n,), device=device, generator=generator)
    query_features = F.normalize(torch.randn(queries, dim, device=device, generator=generator),
                                 dim=1).to(dtype)
    k = [1, min(20, n)]
    base = peak_reset(device)
    common.knn_predict(database, labels, query_features[:64], k, 1000)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    predictions = common.knn_predict(database, labels, query_features, k, 1000)
    synchronize(device)
    seconds = time.perf_counter() - start
    if any(p[0].shape[0] != queries for p in predictions.values()):
        raise RowFailed("knn_predict returned the wrong number of predictions")
    peak = peak_gib(device, base)
    memory = f", search peak {peak} GiB beyond the features" if peak is not None else ""
    return {"result": f"{n} x {dim} {str(dtype)[6:]} against {queries} queries: {seconds:.2f} s, "
                      f"{queries / seconds:.0f} queries/s{memory}",
            "search_seconds": seconds, "queries_per_second": queries / seconds,
            "search_peak_gib": peak}


def kmeans_row(config, deadline):
    """CMSF-KM's clustering, one epoch (20 Lloyd rounds at most) of train_cmsf_self's
    spherical_kmeans on unit vectors drawn around twice as many centres as clusters."""
    import train_cmsf_self
    device, sizes = config.device, config.sizes
    n, dim = sizes["kmeans_points"], sizes["kmeans_dim"]
    clusters = max(2, min(sizes["kmeans_clusters"], n // 4))
    generator = torch.Generator(device=device).manual_seed(0)
    centres = F.normalize(torch.randn(2 * clusters, dim, device=device, generator=generator), dim=1)
    owner = torch.randint(0, 2 * clusters, (n,), device=device, generator=generator)
    noise = torch.randn(n, dim, device=device, generator=generator)
    points = F.normalize(centres[owner] + 0.3 / math.sqrt(dim) * noise, dim=1)  # |noise| ~ 0.3
    del noise, owner
    base = peak_reset(device)
    start = time.perf_counter()
    assignments, centroids = train_cmsf_self.spherical_kmeans(points, clusters, 20, seed=0)
    synchronize(device)
    seconds = time.perf_counter() - start
    used = int(assignments.unique().numel())
    inertia = float((1 - (points * centroids[assignments]).sum(1)).sum())
    peak = peak_gib(device, base)
    return {"result": f"{n} x {dim} into {clusters} clusters: {seconds:.1f} s per epoch, {used} "
                      f"non-empty, inertia {inertia:.1f}"
                      + (f", peak {peak} GiB" if peak is not None else ""),
            "seconds_per_epoch": seconds, "clusters_used": used, "inertia": inertia}


def transfer_solver_row(config, deadline):
    """transfer_eval's L-BFGS logistic regression (float64, its default solver precision) on
    random class-structured features: one fit at weight decay 1 (the middle of the grid)."""
    import transfer_eval
    device, sizes = config.device, config.sizes
    classes, dim = sizes["transfer_classes"], sizes["transfer_dim"]
    n = sizes["transfer_samples"]
    generator = torch.Generator(device=device).manual_seed(0)
    means = torch.randn(classes, dim, device=device, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), device=device, generator=generator)
    features = (means[labels] + 3 * torch.randn(n, dim, device=device, generator=generator,
                                                dtype=torch.float64)).relu()  # pooled: >= 0
    synchronize(device)
    start = time.perf_counter()
    weight, bias, iterations, gradient = transfer_eval.fit_logistic_regression(features, labels,
                                                                               classes, 1.0)
    synchronize(device)
    seconds = time.perf_counter() - start
    if not math.isfinite(gradient) or gradient > 1e-4:
        raise RowFailed(f"the fit did not converge: max |gradient| {gradient:.1e} after "
                        f"{iterations} iterations")
    accuracy = float((transfer_eval.predict(features, weight, bias) == labels).float().mean())
    return {"result": f"{n} x {dim}, {classes} classes: {seconds:.2f} s per fit, {iterations} "
                      f"L-BFGS iterations, max |gradient| {gradient:.1e}, train accuracy "
                      f"{100 * accuracy:.1f} %", "seconds_per_fit": seconds,
            "iterations": iterations, "gradient": gradient}


# ---------------------------------------------------------------- script rows

def torchrun_command(nproc):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_error_line(log_path):
    """The script's `error:` line, else the last line of its log."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors[-1] if errors else lines[-1] if lines else "no output")[:300]


def run_logged(command, log_path, deadline, env=None):
    """Run `command` with its output in `log_path`, killed (with its process group) at the
    deadline. Returns (exit code or None when it was stopped, last error line)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                   env=full_env, start_new_session=True)
        try:
            code = process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            return None, "stopped at the time limit"
    return code, last_error_line(log_path)


def sizes_of_run(config, batch_size):
    """Per-run numbers the trainer flags name: banks, images, clusters, crops, embeddings."""
    global_batch = batch_size * config.gpus
    images = config.steps * global_batch if config.data is None else config.num_images
    return dict(config.sizes, images=images, train_clusters=max(2, images // 10),
                local_crop=max(1, round(config.image_size * 96 / 224)),
                embeddings=config.embeddings_file, global_batch=global_batch)


def trainer_plan(config, row, batch_size):
    """A runner plan for one trainer row, or for a variant's float32 CPU reference (the first
    iteration only)."""
    _, script, flags, epochs = row["variant"]
    reference, device_type, precision = row["kind"] == "reference", row["device"], row["precision"]
    folder = row_folder(config, row)
    if config.data is not None:
        epochs = 1  # an epoch of real data is longer than the row
    global_batch = batch_size * config.gpus
    values = sizes_of_run(config, batch_size)
    images = values["images"]
    data = (["--dataset", "synthetic", "--synthetic-images", str(images)] if config.data is None
            else ["--dataset", "imagefolder", "--data", config.data])
    argv = data + [
        "--arch", config.arch, "--image-size", str(config.image_size),
        "--batch-size", str(global_batch), "--epochs", str(epochs),
        "--amp", AMP_FLAG[precision], "--device", device_type, "--augment-on", "device",
        "--print-freq", str(PRINT_FREQ), "--knn-every", "0", "--seed", "0",
        # a quarter of the batch per BatchNorm: 64 of 256 as in the papers, the same code path
        # (groups within the process) at the tiny CPU sizes
        "--bn-batch-size", str(max(1, batch_size // 4)),
        "--output-dir", os.path.join(folder, "run")] + [f.format(**values) for f in flags]
    if config.workers is not None:
        argv += ["--workers", str(config.workers)]
    if reference and config.device.type == "cuda":
        argv += ["--no-deterministic"]  # all cores: the pin to one thread would take minutes
    iters = images // global_batch
    steps = min(config.steps, iters)
    total = 1 if reference else steps * epochs if config.data is None else steps
    return {"name": row["name"], "script": script, "argv": argv,
            "result": os.path.join(folder, "result.json"),
            "log": os.path.join(folder, "log.txt"), "iters_per_epoch": iters,
            "print_freq": PRINT_FREQ, "stop_after": total,
            "timed_from": None if reference else total - max(1, steps // 2)}


def eval_plans(config, folder):
    """eval_knn.py and eval_linear.py (both protocols) for a few steps on synthetic images at the
    row's architecture and image size (random init: the code path does not depend on the
    weights)."""
    images = max(32, 4 * config.batch_size)  # eval_knn's 20-NN needs 20 train images
    common_argv = ["--dataset", "synthetic", "--synthetic-images", str(images), "--arch",
                   config.arch, "--image-size", str(config.image_size), "--batch-size",
                   str(config.batch_size), "--device", config.device.type]
    if config.workers is not None:
        common_argv += ["--workers", str(config.workers)]
    plans = []
    for name, script, extra in [
            ("eval_knn", "eval_knn.py", ["--cache-dir", "none", "--feature-dtype",
                                         "float16" if config.device.type == "cuda"
                                         else "float32", "--k", "1", "20"]),
            ("eval_linear linear", "eval_linear.py", ["--epochs", "1"]),
            ("eval_linear semi", "eval_linear.py", ["--protocol", "semi", "--epochs", "1"])]:
        row_folder = os.path.join(folder, name.replace(" ", "_"))
        plans.append({"name": name, "script": script,
                      "argv": common_argv + extra + ["--output-dir",
                                                     os.path.join(row_folder, "run")],
                      "result": os.path.join(row_folder, "result.json"),
                      "log": os.path.join(row_folder, "log.txt")})
    return plans


def read_json(path):
    with open(path) as f:
        return json.load(f)


def run_plans(config, plans, deadline, nproc=1, threads=None):
    """Run plans in one runner process (under torchrun with nproc > 1). Returns one result per
    plan: the runner's (rank 0's, with the largest max_memory_allocated of all ranks), or a failure
    line for a plan it did not finish."""
    for plan in plans:
        os.makedirs(os.path.dirname(plan["result"]), exist_ok=True)
        for path in [plan["result"]] + [f"{plan['result']}.rank{r}" for r in range(1, nproc)]:
            if os.path.exists(path):
                os.remove(path)
    plan_path = plans[0]["result"] + ".plan.json"
    with open(plan_path, "w") as f:
        json.dump(plans, f)
    command = ([sys.executable] if nproc == 1 else torchrun_command(nproc)) + [RUNNER, plan_path]
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    if config.device.type == "cpu":  # the scripts' CPU pins, before the first tensor operation
        env.update({k: os.environ.get(k, v) for k, v in common.DETERMINISTIC_CPU_ENV.items()})
    code, error = run_logged(command, plans[0]["log"] + ".runner", deadline, env)
    results, first_missing = [], True
    for plan in plans:
        if not os.path.exists(plan["result"]):  # the process died in this run, or was stopped
            if code is None:
                results.append({"status": "stopped" if first_missing else "not reached",
                                "error": "stopped at the time limit" if first_missing else None})
            else:  # under torchrun a rank that failed stops the others: its error says why
                ranks = [f"{plan['result']}.rank{r}" for r in range(1, nproc)]
                errors = [read_json(path).get("error") for path in ranks if os.path.exists(path)]
                error = next((f"a rank: {e}" for e in errors if e), error)
                results.append({"status": "failed", "error": error if first_missing else
                                "not run: an earlier run of the same process crashed"})
            first_missing = False
            continue
        result = read_json(plan["result"])
        for r in range(1, nproc):
            path = f"{plan['result']}.rank{r}"
            if os.path.exists(path):
                other = read_json(path)
                result["max_memory_allocated"] = max(result.get("max_memory_allocated", 0),
                                                     other.get("max_memory_allocated", 0))
                if other["status"] != "passed" and result["status"] == "passed":
                    result.update(status="failed", error=f"rank {r}: {other['error']}")
        if result["status"] != "passed" and result.get("error", "").startswith("exit code"):
            result["error"] = f"{result['error']}: {last_error_line(plan['log'])}"
        results.append(result)
    return results


def trainer_row_result(config, row, result, batch_size):
    """A trainer row from its runner result: status, speed, memory, first loss."""
    row.update(status=result["status"], error=result.get("error"), batch_per_gpu=batch_size,
               iterations=result.get("iterations"))
    if result.get("seconds_per_iteration"):
        row["images_per_second_per_gpu"] = round(batch_size / result["seconds_per_iteration"], 1)
        row["data_ms_per_iteration"] = round(1000 * result["data_seconds_per_iteration"], 1)
    if result.get("max_memory_allocated") is not None:
        row["max_memory_gib"] = round(result["max_memory_allocated"] / 2 ** 30, 2)
    if "first_loss" in result:
        row["first_loss"] = result["first_loss"]
        if not math.isfinite(result["first_loss"]) and row["status"] == "passed":
            row.update(status="failed", error=f"first loss {result['first_loss']}")
    elif row["status"] == "passed":
        row.update(status="failed", error="no loss was logged in the first iteration")


def is_out_of_memory(result):
    return "OutOfMemoryError" in (result.get("error") or "") or "out of memory" in (
        result.get("error") or "")


# ---------------------------------------------------------------- the rows and the report

def build_rows(config):
    """The plain list of rows, in the order they run."""
    on = config.device.type
    rows = [dict(name="ghost BN bf16: 256 = 4 x 64", kind="check",
                 run=lambda c, d: ghost_bn_row(c, torch.bfloat16)),
            dict(name="ghost BN fp16: 256 = 4 x 64", kind="check",
                 run=lambda c, d: ghost_bn_row(c, torch.float16)),
            dict(name="loader: device half vs worker side", kind="check", run=loader_row),
            dict(name="eval_knn search", kind="check", run=knn_search_row),
            dict(name="CMSF-KM k-means epoch", kind="check", run=kmeans_row),
            dict(name="transfer_eval L-BFGS fit", kind="check", run=transfer_solver_row)]
    rows.append(dict(name="ghost BN 2 processes = 1", kind="ghost", plan=ghost_bn_plan(config)))
    for plan in eval_plans(config, os.path.join(config.output_dir, "eval")):
        rows.append(dict(name=plan["name"], kind="eval", plan=plan))
    for precision in config.precisions:
        for variant in TRAINERS:
            rows.append(dict(name=f"{variant[0]} {precision}", kind="train", variant=variant,
                             precision=precision, device=on))
            if precision == config.precisions[0]:  # its CPU float32 reference, once per variant
                rows.append(dict(name=f"{variant[0]} cpu fp32 reference", kind="reference",
                                 variant=variant, precision="fp32", device="cpu"))
    for row in rows:
        row.setdefault("device", on)
        row["status"] = "not reached"
        if row["kind"] == "ghost" and on == "cuda" and config.gpus < 2:
            row.update(status="skipped", error=f"needs 2 GPUs, {config.gpus} visible")
    return rows


def row_folder(config, row):
    safe = "".join(c if c.isalnum() else "_" for c in row["name"])
    return os.path.join(config.output_dir, "runs", safe)


def run_script_rows(config, rows, all_rows, deadline):
    """Trainer, reference and evaluation rows: on CUDA one runner process per row (under torchrun
    with several GPUs; a row that runs out of memory is retried with half the batch, down to 64);
    on the CPU one process for all of them (the import alone would cost seconds per row)."""
    batch_of = {}  # variant -> the batch its first row ran with, which its reference takes
    plans = [row["plan"] if "plan" in row else trainer_plan(config, row, config.batch_size)
             for row in rows]
    if config.device.type == "cpu":
        for row, result in zip(rows, run_plans(config, plans, deadline, threads=1)):
            finish_script_row(config, row, result, config.batch_size)
            if "seconds" in result:
                row["seconds"] = result["seconds"]
        return
    for row, plan in zip(rows, plans):
        if time.monotonic() >= deadline:
            return
        announce(row)
        start = time.monotonic()
        # the reference runs on as many ranks as its rows; the ghost row forks its second rank
        nproc = config.gpus if row["kind"] in ("train", "reference") else 1
        threads = max(1, config.environment["cpu_cores"] // nproc) if row["device"] == "cpu" \
            else None
        batch = config.batch_size
        if row["kind"] == "reference":
            batch = batch_of.get(row["variant"][0], batch)
            plan = trainer_plan(config, row, batch)
        result = run_plans(config, [plan], deadline, nproc, threads)[0]
        while row["kind"] == "train" and is_out_of_memory(result) and batch // 2 >= 64:
            batch //= 2  # the largest batch up to --batch-size that fits
            result = run_plans(config, [trainer_plan(config, row, batch)], deadline, nproc,
                               threads)[0]
        if row["kind"] == "train":
            batch_of.setdefault(row["variant"][0], batch)
        finish_script_row(config, row, result, batch)
        row["seconds"] = round(time.monotonic() - start, 1)
        write_report(config, all_rows)


def announce(row):
    print(f"gpu_check: {row['name']} ...", flush=True)


def finish_script_row(config, row, result, batch_size):
    output = os.path.join(os.path.dirname(row["plan"]["result"]) if "plan" in row
                          else row_folder(config, row), "run")
    try:
        fill_script_row(config, row, result, batch_size, output)
    finally:  # checkpoints of the 2-epoch rows: hundreds of MiB each at real scale
        shutil.rmtree(output, ignore_errors=True)


def fill_script_row(config, row, result, batch_size, output):
    if result["status"] in ("stopped", "not reached"):
        row.update(status=result["status"], error=result["error"])
        return
    if row["kind"] == "ghost":
        row.update(status=result["status"], error=result.get("error"))
        folder = row["plan"]["ghost_bn"]
        try:
            if result["status"] == "passed":
                row.update(ghost_bn_compare(config, folder))
        except RowFailed as e:
            row.update(status="failed", error=str(e))
        except Exception as e:  # noqa: BLE001 - the row's result
            row.update(status="failed", error=one_line(e))
        finally:  # 45 MiB per rank of float64 gradients
            for rank in range(2):
                path = os.path.join(folder, f"rank{rank}.pt")
                if os.path.exists(path):
                    os.remove(path)
        return
    if row["kind"] == "eval":
        row.update(status=result["status"], error=result.get("error"))
        if result.get("features_images_per_second"):
            row["features_images_per_second"] = round(result["features_images_per_second"], 1)
        if result.get("max_memory_allocated") is not None:
            row["max_memory_gib"] = round(result["max_memory_allocated"] / 2 ** 30, 2)
        row["result"] = eval_summary(row, output, result)
        return
    trainer_row_result(config, row, result, batch_size)


def eval_summary(row, output, result):
    """One line from the evaluation's own result file."""
    parts = []
    if row.get("features_images_per_second"):
        parts.append(f"features {row['features_images_per_second']:.0f} images/s")
    for name in ("knn_results.json", "linear_results.json"):
        path = os.path.join(output, name)
        if os.path.exists(path):
            values = read_json(path)
            if "accuracy" in values:
                parts.append("1-NN / 20-NN " + " / ".join(
                    f"{values['accuracy'][k]['majority_top1']:.1f}" for k in ("1", "20")
                    if k in values["accuracy"]))
            if "final_top1" in values:
                parts.append(f"top-1 {values['final_top1']:.1f} after {values['epochs']} epoch(s)"
                             f", backbone unchanged: {values['backbone_unchanged']}")
    if result.get("max_memory_allocated") is not None:
        parts.append(f"max mem {result['max_memory_allocated'] / 2 ** 30:.2f} GiB")
    parts.append(f"{result.get('seconds', 0):.1f} s")
    return ", ".join(parts)


def compare_losses(config, rows):
    """Each trainer row's first loss against its variant's CPU float32 reference."""
    references = {row["variant"][0]: row for row in rows if row["kind"] == "reference"}
    for row in rows:
        if row["kind"] != "train" or "first_loss" not in row:
            continue
        reference = references.get(row["variant"][0])
        if reference is None or "first_loss" not in reference:
            row["loss_check"] = "no reference"
            continue
        if reference.get("batch_per_gpu") != row.get("batch_per_gpu"):
            row["loss_check"] = "reference ran another batch"
            continue
        relative, absolute = LOSS_TOLERANCE[f"{row['device']} {row['precision']}"]
        tolerance = relative * abs(reference["first_loss"]) + absolute
        difference = abs(row["first_loss"] - reference["first_loss"])
        row.update(reference_loss=reference["first_loss"], loss_difference=difference,
                   loss_tolerance=tolerance)
        row["loss_check"] = ("exact" if difference == 0 else "close" if difference <= tolerance
                             else "off")
        if row["loss_check"] == "off" and row["status"] == "passed":
            row.update(status="failed", error=f"first loss {row['first_loss']:.5f} vs CPU float32 "
                                              f"{reference['first_loss']:.5f}: off by "
                                              f"{difference:.2e} > {tolerance:.2e}")


def cell(value, fmt="{}"):
    """A markdown table cell: a '|' in the text would end the cell."""
    return "" if value is None else fmt.format(value).replace("|", "\\|")


def write_report(config, rows):
    """gpu_check.md (two tables) and gpu_check.json, rewritten after every row."""
    compare_losses(config, rows)
    env = config.environment
    keep = [{k: v for k, v in row.items() if k not in ("run", "plan", "variant")} for row in rows]
    not_reached = [row["name"] for row in rows if row["status"] == "not reached"]
    elapsed = round(time.monotonic() - config.started, 1)
    record = {"command": config.command, "date": config.date, "device": config.device.type,
              "environment": env, "sizes": dict(arch=config.arch, image_size=config.image_size,
                                                batch_size=config.batch_size, steps=config.steps,
                                                scale=config.scale, **config.sizes),
              "loss_tolerance": {k: {"relative": v[0], "absolute": v[1]}
                                 for k, v in LOSS_TOLERANCE.items()},
              "time_limit_s": config.time_limit_s, "elapsed_s": elapsed, "rows": keep,
              "not_reached": not_reached}
    with open(os.path.join(config.output_dir, "gpu_check.json"), "w") as f:
        json.dump(record, f, indent=1)
    out = io.StringIO()
    out.write(f"# gpu_check: {env['gpu']} x {env['gpus']}, torch {env['torch']}, CUDA "
              f"{env['cuda']}, cuDNN {env['cudnn']}, {env['cpu_cores']} CPU cores\n\n"
              f"`{config.command}` on {config.date}: {elapsed:.0f} s of the "
              f"{config.time_limit_s:.0f} s limit; {config.arch}, {config.image_size} px, "
              f"{config.steps} iterations per epoch and row.\n\n")
    out.write("| training row | device | status | batch / GPU | img/s per GPU | data ms/it "
              "| max mem GiB | first loss | CPU fp32 loss | difference (tolerance) | note |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|\n")
    for row in rows:
        if row["kind"] not in ("train", "reference"):
            continue
        check = ""
        if "loss_difference" in row:
            check = f"{row['loss_difference']:.1e} ({row['loss_tolerance']:.1e}) " \
                    f"{row['loss_check']}"
        elif row.get("loss_check"):
            check = row["loss_check"]
        out.write(f"| {row['name']} | {row['device']} | {row['status']} | "
                  f"{cell(row.get('batch_per_gpu'))} | "
                  f"{cell(row.get('images_per_second_per_gpu'), '{:.0f}')} | "
                  f"{cell(row.get('data_ms_per_iteration'), '{:.0f}')} | "
                  f"{cell(row.get('max_memory_gib'), '{:.1f}')} | "
                  f"{cell(row.get('first_loss'), '{:.5f}')} | "
                  f"{cell(row.get('reference_loss'), '{:.5f}')} | {check} | "
                  f"{cell(row.get('error'))} |\n")
    out.write("\n| other row | device | status | result |\n|---|---|---|---|\n")
    for row in rows:
        if row["kind"] in ("train", "reference"):
            continue
        out.write(f"| {row['name']} | {row['device']} | {row['status']} | "
                  f"{cell(row.get('error') or row.get('result') or '')} |\n")
    if not_reached:
        out.write(f"\nNot reached within the time limit: {', '.join(not_reached)}.\n")
    with open(os.path.join(config.output_dir, "gpu_check.md"), "w") as f:
        f.write(out.getvalue())


def training_image_names(config):
    """The names of the images the trainer rows read (ImageFolder paths of --data, else synthetic
    indices); sets config.num_images. Bad --data is a UsageError."""
    if config.data is not None:
        base, _ = common.build_dataset("imagefolder", config.data, "train")
        config.num_images = len(base)
        return common.dataset_relative_paths(base)
    config.num_images = config.steps * config.batch_size * config.gpus
    return [str(i) for i in range(config.num_images)]


def write_other_modality(config, names):
    """The --constraint-embeddings file of the embeddings row: random 128-d embeddings, one per
    training image."""
    config.embeddings_file = os.path.join(config.output_dir, "other_modality.pt")
    generator = torch.Generator().manual_seed(0)
    torch.save({"paths": names, "embeddings": torch.randn(len(names), 128, generator=generator)},
               config.embeddings_file)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        config = resolve_config(args)
        names = training_image_names(config)
    except common.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config.started = time.monotonic()
    deadline = config.started + config.time_limit_s
    config.command = "python tools/gpu_check.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])
    config.date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    os.makedirs(config.output_dir, exist_ok=True)
    config.environment = environment(config)
    write_other_modality(config, names)
    rows = build_rows(config)
    if config.device.type == "cuda" and not common.has_native_bf16(config.device):
        for row in rows:
            if row.get("precision") == "bf16" and row["kind"] == "train":
                row.update(status="skipped", error="no native bf16 on compute capability "
                                                   f"{config.environment['compute_capability']}")
    write_report(config, rows)
    script_rows = [row for row in rows if row["kind"] != "check" and row["status"] == "not reached"]
    for row in rows:
        if row["kind"] != "check":
            continue
        if time.monotonic() >= deadline:
            break
        announce(row)
        start = time.monotonic()
        try:
            metrics = row["run"](config, deadline)
            row.update(status=metrics.pop("status", "passed"), **metrics)
        except RowFailed as e:
            row.update(status="failed", error=str(e))
        except Exception as e:  # any failure is the row's result; the others still run
            row.update(status="failed", error=one_line(e))
        row["seconds"] = round(time.monotonic() - start, 1)
        if config.device.type == "cuda":
            torch.cuda.empty_cache()  # the script rows' processes get the whole GPU
        write_report(config, rows)
    if time.monotonic() < deadline:
        run_script_rows(config, script_rows, rows, deadline)
    write_report(config, rows)
    with open(os.path.join(config.output_dir, "gpu_check.md")) as f:
        print(f.read())
    failed = [row["name"] for row in rows if row["status"] in ("failed", "stopped")]
    print(f"gpu_check: {len(failed)} row(s) failed"
          + (f" ({', '.join(failed)})" if failed else "")
          + f"; report in {os.path.join(config.output_dir, 'gpu_check.md')}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
