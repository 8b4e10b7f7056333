"""Shared toolbox of the MSF / CMSF scripts: a flat set of small, documented functions.

Sections: errors and entry point | networks and EMA | memory bank, nearest neighbours, loss |
distributed | data | checkpoints | schedules, seeding and logging | evaluation helpers.
Every script imports this one file; copy it together with a script to fork a method.
"""
import datetime
import functools
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections import OrderedDict, defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- errors and entry point

class UsageError(Exception):
    """Bad input from the user: printed as one line `error: ...` and the script exits with code 2."""


def run_main(main, parser):
    """Parse the command line with `parser` (a parent parser, add_help=False) and run `main(args)`.

    A UsageError, also one raised inside a DataLoader worker or on another rank, becomes a single
    line on stderr and exit code 2 instead of a traceback."""
    import argparse
    full_parser = argparse.ArgumentParser(parents=[parser], description=parser.description,
                                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    args = full_parser.parse_args()
    try:
        main(args)
    except UsageError as e:
        # DataLoader workers re-raise as "Caught UsageError in DataLoader worker ... Original Traceback";
        # the user only needs the last line.
        message = str(e).strip().splitlines()[-1]
        message = message.split("UsageError: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------- networks and EMA

def build_backbone(arch, image_size):
    """A torchvision ResNet with its classifier removed; returns (backbone, feature size).

    Inputs of 64 px or less get the CIFAR stem (3x3 conv, stride 1, no max-pool), as is usual for
    small images: the ImageNet stem would shrink a 32 px image to 8 px before the first block."""
    if arch == "resnet10":  # a small torchvision ResNet for tests and laptop runs
        backbone = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    elif arch in torchvision.models.list_models(module=torchvision.models) and arch.startswith(
            ("resnet", "wide_resnet", "resnext")):
        backbone = torchvision.models.get_model(arch)
    else:
        raise UsageError(f"unknown --arch {arch!r}; use a torchvision ResNet such as resnet18, "
                         "resnet50, wide_resnet50_2, or resnet10 for quick tests")
    feat_dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    if image_size <= 64:
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        backbone.maxpool = nn.Identity()
    return backbone, feat_dim


def mlp(in_dim, hidden_dim, out_dim):
    """Linear - BatchNorm1d - ReLU - Linear: the projection and prediction heads of MSF/BYOL."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def build_encoder(arch, image_size):
    """Backbone + projection MLP (feat -> 2 feat -> feat/4), the network shared by the online and
    target branches. Attributes: .backbone, .projection, .feat_dim, .embed_dim."""
    backbone, feat_dim = build_backbone(arch, image_size)
    encoder = nn.Sequential(OrderedDict(backbone=backbone,
                                        projection=mlp(feat_dim, 2 * feat_dim, feat_dim // 4)))
    encoder.feat_dim, encoder.embed_dim = feat_dim, feat_dim // 4
    return encoder


def build_predictor(encoder):
    """Prediction MLP of the online branch: d -> 2 feat -> d."""
    return mlp(encoder.embed_dim, 2 * encoder.feat_dim, encoder.embed_dim)


@torch.no_grad()
def ema_update_(target, online, momentum):
    """theta_target <- m theta_target + (1 - m) theta_online, parameters only (the target's BatchNorm
    keeps its own running statistics). One fused foreach kernel instead of a Python loop."""
    target_params = list(target.parameters())
    online_params = [p.detach() for p in online.parameters()]
    torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)


def torchvision_state_dict(backbone, arch):
    """The backbone as a plain torchvision ResNet state dict (fc = zeros: it is untrained), so that
    `torchvision.models.<arch>()` loads it with strict=True (small-stem models need the same stem)."""
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    reference = (torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])  # keeps its fc
                 if arch == "resnet10" else torchvision.models.get_model(arch))
    fc = getattr(reference, "fc", None)
    if isinstance(fc, nn.Linear):
        state["fc.weight"] = torch.zeros_like(fc.weight)
        state["fc.bias"] = torch.zeros_like(fc.bias)
    return state


# ---------------------------------------------------------------- memory bank, neighbours, loss

class MemoryBank(nn.Module):
    """FIFO queue of the last `size` target embeddings with their labels and dataset indices.

    Starts as random unit vectors with label -1 (never a real label) and index -1 (empty). Any size
    works: a batch that runs past the end wraps around to the front. Embeddings may be stored in half
    precision (`dtype`) to halve memory; reads are cast back to float32 by the callers. Being a
    module, its state (pointer included) goes into the checkpoint with `state_dict()`."""

    def __init__(self, size, dim, dtype=torch.float32, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        initial = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("embeddings", initial.to(dtype))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("indices", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self):
        return self.embeddings.shape[0]

    @torch.no_grad()
    def enqueue(self, embeddings, labels=None, indices=None):
        """Write a (global) batch at the pointer, wrapping around; returns the slots written."""
        n = embeddings.shape[0]
        if n > self.size:  # only the newest `size` rows survive
            embeddings = embeddings[-self.size:]
            labels = None if labels is None else labels[-self.size:]
            indices = None if indices is None else indices[-self.size:]
            n = self.size
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.embeddings[slots] = embeddings.to(self.embeddings.dtype)
        self.labels[slots] = -1 if labels is None else labels.to(self.labels.dtype)
        self.indices[slots] = -1 if indices is None else indices.to(self.indices.dtype)
        self.ptr.copy_((self.ptr + n) % self.size)
        return slots


@functools.lru_cache(maxsize=None)
def _bf16_matmul_is_fast(device_type):
    """Whether a bfloat16 matmul runs several times faster than a float32 one: tensor cores (CUDA,
    Ampere and later) or AVX512-BF16 through oneDNN (CPU). Elsewhere bf16 is emulated and slower."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.cpu._is_avx512_bf16_supported()
    return False


def _chunked_topk(queries, keys, k, chunk_size, query_labels, key_labels, dtype):
    """Top-k of the scores queries @ keys.T computed in `dtype`, one (B, chunk) block at a time: each
    block's top-k is kept and one last top-k merges them. Returns (scores in `dtype`, key indices)."""
    q = queries.to(dtype)  # .to() returns the tensor itself when the dtype already matches: no copy
    free_rows = None if query_labels is None else (query_labels < 0).unsqueeze(1)
    block_sims, block_idx = [], []
    for start in range(0, keys.shape[0], chunk_size):
        chunk = keys[start:start + chunk_size]
        sims = q @ chunk.to(dtype).T
        if query_labels is not None:
            allowed = query_labels.unsqueeze(1) == key_labels[start:start + chunk_size].unsqueeze(0)
            sims.masked_fill_(allowed.logical_or_(free_rows).logical_not_(), -math.inf)
        sims, idx = sims.topk(min(k, chunk.shape[0]), dim=1)
        block_sims.append(sims)
        block_idx.append(idx.add_(start))
    sims, idx = torch.cat(block_sims, dim=1), torch.cat(block_idx, dim=1)
    if len(block_sims) > 1:
        sims, order = sims.topk(min(k, sims.shape[1]), dim=1)
        idx = idx.gather(1, order)
    return sims, idx


def _exact_scores(queries, keys, idx):
    """float32 q_i . keys[idx[i, j]] as an elementwise product and sum (no matmul, so no TF32), in row
    blocks of at most 2^20 gathered elements (4 MiB)."""
    q = queries.float()
    rows = max(1, (1 << 20) // max(1, idx.shape[1] * keys.shape[1]))
    return torch.cat([(keys[idx[s:s + rows]].float() * q[s:s + rows].unsqueeze(1)).sum(dim=2)
                      for s in range(0, q.shape[0], rows)])


# Rows of a batch that the bf16 prefilter searches again in float32 on a GPU, whatever the data: a
# fixed share keeps the work (and the absence of host synchronisation) independent of the data. It
# covers the largest share of uncertain rows measured (18 %, on a near-collapsed bank).
PREFILTER_RESCAN_FRACTION = 0.25


def _host_waits_for(device_type):
    """Whether reading a tensor's value on the host makes the CPU wait for queued device work
    (GPUs). On the CPU nothing is queued, so code may branch on values there at no cost."""
    return device_type != "cpu"


def _exact_search_bf16_prefilter(queries, keys, k, chunk_size, query_labels, key_labels):
    """The float32 top-k at bfloat16 matmul speed. bf16 scores pick max(4k, 48) candidates per query,
    which are rescored in float32. A bf16 score is within err = (4u + d 2^-23) |q| max|key| of the
    float32 one (u = 2^-8: inputs and output rounded to bf16; float32 accumulation), and every key left
    out has a bf16 score <= the last candidate's, so a true score <= last + err: when that is below the
    k-th float32 score, the top k are certainly among the candidates. Uncertain rows (measured: none
    of 256 rows on random 512-d unit vectors, k = 5, M = 131072, nor of 4096 on a trained synthetic
    run's bank; 5-18 % of rows on a near-collapsed bank) are searched again in float32: on the CPU
    exactly those rows. On a GPU, their number must not steer the work (reading it would make the
    CPU wait for the GPU): a fixed share of the batch (PREFILTER_RESCAN_FRACTION), the least certain
    rows first, is searched again and replaces the uncertain ones. If more rows than that are
    uncertain, the surplus (the most nearly certified) keeps the float32 top-k of its candidates,
    which can differ from the exact one only by keys scoring within err of the k-th."""
    dim = keys.shape[1]
    if queries.is_cuda:  # the bound assumes float32 accumulation inside the bf16 matmul
        reduced = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    # the bf16 copy of a key chunk is chunk x d: at most 32 MiB of it at a time (eval: d = 2048)
    bf16_chunk_size = min(chunk_size, max(1024, (1 << 24) // dim))
    try:
        candidate_sims, candidates = _chunked_topk(queries, keys, max(4 * k, 48), bf16_chunk_size,
                                                   query_labels, key_labels, torch.bfloat16)
    finally:
        if queries.is_cuda:
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced
    sims = _exact_scores(queries, keys, candidates)
    sims = sims.masked_fill_(torch.isneginf(candidate_sims), -math.inf)
    sims, order = sims.topk(k, dim=1)
    idx = candidates.gather(1, order)
    key_norm = torch.stack([torch.linalg.vector_norm(chunk, dim=1, dtype=torch.float32).max()
                            for chunk in keys.split(chunk_size)]).max()
    query_norm = torch.linalg.vector_norm(queries.float(), dim=1)
    err = (4 * 2.0 ** -8 + dim * 2.0 ** -23) * query_norm * key_norm
    last = candidate_sims[:, -1].float()
    excess = last + err - sims[:, -1]  # >= 0: a left-out key might beat the k-th
    unsure = torch.isfinite(last) & (excess >= 0)
    if _host_waits_for(queries.device.type):
        rescan_rows = min(queries.shape[0], math.ceil(PREFILTER_RESCAN_FRACTION * queries.shape[0]))
        least_sure_first = excess.masked_fill(~unsure, -math.inf)
        rescan = least_sure_first.topk(rescan_rows).indices
    else:
        rescan = unsure.nonzero().squeeze(1)
    if rescan.shape[0] == 0:
        return sims, idx
    rescan_labels = None if query_labels is None else query_labels[rescan]
    rescan_sims, rescan_idx = _chunked_topk(queries[rescan], keys, k, chunk_size, rescan_labels,
                                            key_labels, torch.float32)
    replace = unsure[rescan].unsqueeze(1)
    sims[rescan] = torch.where(replace, rescan_sims, sims[rescan])
    idx[rescan] = torch.where(replace, rescan_idx, idx[rescan])
    return sims, idx


def knn_search(queries, keys, k, chunk_size=None, query_labels=None, key_labels=None,
               search_dtype=None):
    """Top-k keys by largest dot product for each query (smallest 2 - 2 q.k for unit vectors).

    The keys are scanned in chunks so the score matrix never exceeds B x chunk_size (default: B x chunk
    <= 2^22 elements on CPU, where bigger blocks are mmapped and page-faulted afresh each chunk; 2^26 on
    GPU, to amortise kernel launches). With labels, query i may only pick keys whose label equals
    query_labels[i] (a query label < 0 means unconstrained). Returns (sims, idx, valid), each (B, k)
    float32 / long / bool, sorted by similarity; slots without an allowed key have sims = -inf, idx = 0
    and valid = False. `search_dtype` None or float32: the exact float32 top-k (where bf16 matmuls are
    fast, through a bf16 prefilter whose result is certified, see _exact_search_bf16_prefilter);
    bfloat16 / float16: the scores themselves in that precision (approximate, near-ties may swap)."""
    budget = 1 << 26 if queries.is_cuda else 1 << 22
    chunk_size = chunk_size or max(1024, budget // max(1, queries.shape[0]))
    if (search_dtype in (None, torch.float32) and queries.shape[0] > 0 and keys.shape[0] > max(4 * k, 48)
            and _bf16_matmul_is_fast(queries.device.type)):
        sims, idx = _exact_search_bf16_prefilter(queries, keys, k, chunk_size, query_labels, key_labels)
    else:
        sims, idx = _chunked_topk(queries, keys, k, chunk_size, query_labels, key_labels,
                                  search_dtype or torch.float32)
        sims = sims.float()
    valid = torch.isfinite(sims)
    return sims, idx.masked_fill_(~valid, 0), valid


def mean_shift_loss(query, neighbours, valid=None):
    """Per-sample MSF loss: mean over the valid neighbours z_j of dist(q, z_j) = 2 - 2 q.z_j.

    query (B, d) and neighbours (B, k, d) are unit vectors; computed in float32. Only the k gathered
    rows enter, never the full B x M matrix. A sample with no valid neighbour gets loss 0."""
    sims = torch.einsum("bd,bkd->bk", query.float(), neighbours.float())
    dists = 2 - 2 * sims
    if valid is None:
        return dists.mean(dim=1)
    valid = valid.to(dists.dtype)
    return (dists * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)


@torch.no_grad()
def purity(neighbour_labels, labels, valid=None):
    """Fraction of (valid) neighbours whose label equals the sample's label (logged, never trained on)."""
    same = (neighbour_labels == labels.unsqueeze(1)).float()
    if valid is None:
        return same.mean()
    valid = valid.float()
    return (same * valid).sum() / valid.sum().clamp(min=1)


# ---------------------------------------------------------------- distributed

def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process():
    return get_rank() == 0


def _slurm_to_torch_env():
    """Inside an srun step of several tasks (a bare `srun python script.py`), derive the variables
    of torch.distributed from SLURM's. Only a step makes processes: the shell of an sbatch script
    (SLURM_NTASKS=8, SLURM_PROCID=0, no SLURM_STEP_NUM_TASKS) is one process, and treating it as
    rank 0 of 8 would wait forever for ranks that never start. Variables already set (torchrun,
    submitit) win."""
    step_tasks = os.environ.get("SLURM_STEP_NUM_TASKS")
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or step_tasks is None:
        return
    if _env_int("SLURM_STEP_NUM_TASKS") < 2:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = step_tasks
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:  # rank 0 runs on the step's first node
        import subprocess
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
        try:
            nodes = subprocess.check_output(["scontrol", "show", "hostnames", nodelist], text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise UsageError(f"cannot name rank 0's node of this srun step ('scontrol show "
                             f"hostnames {nodelist}' failed: {e}); export MASTER_ADDR=<first node> "
                             "before srun")
        os.environ["MASTER_ADDR"] = nodes.split()[0]
    job_step = _env_int("SLURM_JOB_ID", 0) * 7 + _env_int("SLURM_STEP_ID", 0)
    os.environ.setdefault("MASTER_PORT", str(20000 + job_step % 20000))


def _env_int(name, default=None):
    """An integer environment variable; a malformed one is a usage error, not a traceback."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer; "
                         "unset or fix it")


def _check_torch_env():
    """(rank, world size) of this process from RANK / WORLD_SIZE, refusing what would hang in
    init_process_group: a rank outside the world, half of the pair, a world the srun step
    contradicts (torchrun under srun legitimately runs several processes per task, so it is
    exempt), a missing rendezvous address."""
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    if (rank is None) != (world_size is None) and (world_size or 1) > 1:
        raise UsageError(f"RANK={rank} and WORLD_SIZE={world_size}: set both (torchrun does) "
                         "or neither")
    rank, world_size = rank or 0, world_size or 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"RANK={rank} but WORLD_SIZE={world_size}: a rank must be in "
                         "0..WORLD_SIZE-1; unset RANK and WORLD_SIZE to run one process")
    step_tasks = _env_int("SLURM_STEP_NUM_TASKS")
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if (step_tasks is not None and world_size != step_tasks and not under_torchrun
            and "SLURM_PROCID" in os.environ):
        raise UsageError(f"WORLD_SIZE={world_size} but this srun step runs {step_tasks} task(s) "
                         f"(SLURM_STEP_NUM_TASKS): launch with srun --ntasks {world_size}, or "
                         "unset WORLD_SIZE and RANK")
    if world_size > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise UsageError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set: "
                             "launch with torchrun or srun, or unset WORLD_SIZE to run one process")
    return rank, world_size


def select_device(device_arg, local_rank=0, world_size=1):
    """--device: auto (a GPU if one is visible, else the CPU), cpu, cuda (cuda:LOCAL_RANK modulo the
    visible GPUs) or cuda:N (one process on GPU N). Anything else is a usage error."""
    name = device_arg or "auto"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not (name == "cuda" or name.startswith("cuda:") and name[5:].isdigit()):
        raise UsageError(f"--device {device_arg}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device_arg}: no CUDA GPU visible; use --device cpu")
    count = torch.cuda.device_count()
    if name == "cuda":
        return torch.device("cuda", local_rank % count)
    index = int(name[5:])
    if index >= count:
        raise UsageError(f"--device {device_arg}: {count} CUDA GPU(s) visible, "
                         f"cuda:0 to cuda:{count - 1}")
    if world_size > 1:
        raise UsageError(f"--device {device_arg} names one GPU, but {world_size} processes run; "
                         "use --device cuda (each process takes cuda:LOCAL_RANK)")
    return torch.device("cuda", index)


def init_distributed(device_arg=None):
    """Initialise torch.distributed from torchrun's, srun's or submitit's environment, or run as a
    single process; inputs that would make init_process_group wait forever are usage errors.
    Returns the torch.device this process computes on (see select_device). NCCL on GPUs, gloo on
    the CPU."""
    _slurm_to_torch_env()
    _, world_size = _check_torch_env()
    device = select_device(device_arg, _env_int("LOCAL_RANK", 0), world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        on_gpu = device.type == "cuda"
        dist.init_process_group(backend="nccl" if on_gpu else "gloo", init_method="env://",
                                **({"device_id": device} if on_gpu else {}))
    return device


@torch.no_grad()
def all_gather(tensor):
    """Concatenate `tensor` from every rank along dim 0, in rank order (no gradient)."""
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


@torch.no_grad()
def batch_shuffle(x, seed, step):
    """MoCo's shuffle-BN: deal the global batch out to the ranks in a random order, so that the target
    encoder's BatchNorm statistics on each rank mix images of all ranks. The permutation comes from
    (seed, step) through a generator on x's device, so every rank draws the same one without a
    broadcast or a blocking host-to-device copy, and resume stays exact.
    Returns (this rank's shuffled images, the index that undoes the shuffle)."""
    world_size = get_world_size()
    if world_size == 1:
        return x, None
    gathered = all_gather(x)
    generator = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + step)
    permutation = torch.randperm(gathered.shape[0], generator=generator, device=x.device)
    unshuffle_index = torch.argsort(permutation)
    local = permutation.view(world_size, -1)[get_rank()]
    return gathered[local], unshuffle_index


@torch.no_grad()
def batch_unshuffle(x, unshuffle_index):
    """Inverse of batch_shuffle: gather the outputs and give each rank back the rows of its own images."""
    if unshuffle_index is None:
        return x
    gathered = all_gather(x)
    local = unshuffle_index.view(get_world_size(), -1)[get_rank()]
    return gathered[local]


def reduce_mean(value):
    """Average a float over ranks (for logging)."""
    if get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item() / get_world_size()


# ---------------------------------------------------------------- data

def load_rgb_image(path):
    """PIL loader that names the file when it cannot be read (a corrupt JPEG in a 1.28M-image folder
    should cost one line to find, not a traceback from inside a worker)."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # PIL raises many types for broken files
        raise UsageError(f"cannot read image {path} ({type(e).__name__}: {e}); remove or replace the file") from None


SYNTHETIC_SPLIT_IDS = {"train": 0, "val": 1}
SYNTHETIC_DEFAULT_SIZES = {"train": 5000, "val": 1000}


def _regular_polygon(r, theta, sides):
    # inside a regular polygon of circumradius 1 iff the projection on the nearest edge normal <= apothem
    sector = 2 * np.pi / sides
    return r * np.cos(theta % sector - sector / 2) <= np.cos(sector / 2)


# Each shape: (u, v, r, theta) local coordinates of a unit-size shape centred at 0 -> bool mask.
SYNTHETIC_SHAPES = {
    "circle": lambda u, v, r, t: r <= 0.85,
    "square": lambda u, v, r, t: np.maximum(abs(u), abs(v)) <= 0.7,
    "triangle": lambda u, v, r, t: _regular_polygon(r, t, 3),
    "cross": lambda u, v, r, t: (np.minimum(abs(u), abs(v)) <= 0.25) & (np.maximum(abs(u), abs(v)) <= 0.9),
    "ring": lambda u, v, r, t: (r <= 0.9) & (r >= 0.55),
    "star": lambda u, v, r, t: r <= 0.55 + 0.4 * np.cos(5 * t),
    "bar": lambda u, v, r, t: (u / 0.95) ** 2 + (v / 0.35) ** 2 <= 1,
    "chevron": lambda u, v, r, t: (abs(u) <= 0.9) & (abs(v + 0.2 - 0.8 * abs(u)) <= 0.25),
    "hexagon": lambda u, v, r, t: _regular_polygon(r, t, 6),
    "half_disk": lambda u, v, r, t: (np.hypot(u, v + 0.4) <= 0.95) & (v >= -0.4),
}


@functools.lru_cache(maxsize=8)
def _pixel_grid(n):
    """Pixel-centre coordinates (y, x) in [-1, 1], float32, shared by all images of one size."""
    centres = ((np.arange(n) + 0.5) / n * 2 - 1).astype(np.float32)
    return np.meshgrid(centres, centres, indexing="ij")


# Grey levels (0..1). The shape is always light on a dark background and the per-image variation of
# both is small, inside what ColorJitter(0.4, 0.4, 0.4, 0.1) does to a view: colour must not tell two
# images apart, or self-supervised training matches views by colour instead of shape.
SYNTHETIC_BACKGROUND = (0.22, 0.28)
SYNTHETIC_FOREGROUND = (0.75, 0.85)
SYNTHETIC_TINT = 0.02  # per-channel offset of both, so images are not exactly grey
SYNTHETIC_NOISE = (0.08, 0.16)  # std of the per-pixel noise; a crop resamples it, so it is no identity cue


def render_synthetic_image(rng, shape_name, image_size):
    """One RGB uint8 image (H, W, 3): a near-uniform dark background, the light shape (random position,
    scale 0.5-0.8 of the half-width, rotation), a few small dim specks, then per-pixel noise.
    The shape is large and near the centre so that a 20 %-area crop still shows most of it, and nothing
    else in the image is big enough to survive a crop: the only cue shared by two crops of one image is
    the shape and its pose. Coordinates in [-1, 1]; drawn at twice the size and 2x2-averaged to
    anti-alias edges. Random scalars are Python floats so that arithmetic with the float32 grid stays
    float32 (2x faster)."""
    def uniform(low, high, size=None):
        value = rng.uniform(low, high, size)  # a Python float already when size is None
        return value if size is None else value.tolist()

    y, x = _pixel_grid(2 * image_size)
    bg = uniform(*SYNTHETIC_BACKGROUND) + rng.uniform(-SYNTHETIC_TINT, SYNTHETIC_TINT, 3)
    fg = uniform(*SYNTHETIC_FOREGROUND) + rng.uniform(-SYNTHETIC_TINT, SYNTHETIC_TINT, 3)
    image = np.empty((2 * image_size, 2 * image_size, 3), np.float32)
    image[:] = bg
    # specks: small dim blobs anywhere (also on the shape), a class-independent distraction
    for _ in range(rng.integers(3, 9)):
        cx, cy = uniform(-1, 1, 2)
        image[(x - cx) ** 2 + (y - cy) ** 2 <= uniform(0.04, 0.09) ** 2] = uniform(0.35, 0.65)
    scale = uniform(0.5, 0.8)
    cx, cy = uniform(-0.3, 0.3, 2)
    angle = uniform(0, 2 * np.pi)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    u = (x - cx) * cos + (y - cy) * sin
    v = (y - cy) * cos - (x - cx) * sin
    image[SYNTHETIC_SHAPES[shape_name](u, v, np.hypot(u, v), np.arctan2(v, u))] = fg
    image = (image[0::2, 0::2] + image[1::2, 0::2] + image[0::2, 1::2] + image[1::2, 1::2]) / 4
    image += rng.normal(0, uniform(*SYNTHETIC_NOISE), image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


class SyntheticShapes(torch.utils.data.Dataset):
    """Procedurally generated shape classification: no download, deterministic by (seed, split, index).

    Image i shows shape class i % num_classes; grey levels, pose, specks and noise come from a numpy
    Generator seeded with (seed, split, i), so each image is rendered on the fly, identically every
    time and on every worker. Every image has nearly the same light-on-dark grey levels, so colour tells
    neither classes nor images apart and an encoder has to learn shape. Returns (PIL RGB image, int
    label) like torchvision sets.
    """

    def __init__(self, split="train", num_images=None, image_size=32, num_classes=10, seed=0):
        if split not in SYNTHETIC_SPLIT_IDS:
            raise UsageError(f"synthetic split {split!r} is unknown; use one of {list(SYNTHETIC_SPLIT_IDS)}")
        if not 2 <= num_classes <= len(SYNTHETIC_SHAPES):
            raise UsageError(f"synthetic num_classes={num_classes}; use 2..{len(SYNTHETIC_SHAPES)}")
        if image_size < 8:
            raise UsageError(f"synthetic image_size={image_size} is too small to draw shapes; use >= 8")
        self.split, self.image_size, self.seed = split, image_size, seed
        self.num_images = SYNTHETIC_DEFAULT_SIZES[split] if num_images is None else num_images
        self.classes = list(SYNTHETIC_SHAPES)[:num_classes]
        self.targets = [i % num_classes for i in range(self.num_images)]  # balanced by construction

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic images")
        rng = np.random.default_rng([self.seed, SYNTHETIC_SPLIT_IDS[self.split], index])
        label = self.targets[index]
        pixels = render_synthetic_image(rng, self.classes[label], self.image_size)
        return Image.fromarray(pixels), label


def build_dataset(name, root, split, download=False, image_size=None, synthetic_images=None):
    """A dataset of (PIL image, label) and its number of classes.

    name: imagefolder (root/train/<class>/*.JPEG and root/val/...), cifar10, cifar100, stl10 (the
    torchvision classes, read from root; --download fetches them), or synthetic (built in, no files).
    split: "train" or "val" (the test split for cifar/stl10). synthetic_images sets the synthetic train
    size (val gets a fifth of it); the default is 5000 / 1000."""
    if name == "synthetic":
        num_images = None if not synthetic_images else max(1, synthetic_images // (1 if split == "train" else 5))
        dataset = SyntheticShapes(split=split, num_images=num_images, image_size=image_size or 32)
        return dataset, len(dataset.classes)
    if root is None:
        raise UsageError(f"--data is required for --dataset {name}; pass the dataset's root folder")
    if not os.path.isdir(root) and not download:
        raise UsageError(f"--data {root} does not exist; pass the folder that holds the dataset")
    if name == "imagefolder":
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise UsageError(f"{root} has no '{split}/' folder; an ImageFolder root needs "
                             f"{split}/<class name>/<image files>")
        try:
            dataset = torchvision.datasets.ImageFolder(folder, loader=load_rgb_image)
        except FileNotFoundError as e:
            raise UsageError(f"{folder}: {str(e).splitlines()[0]} (every class folder needs at least one "
                             "image; remove empty class folders)") from None
        return dataset, len(dataset.classes)
    try:
        if name in ("cifar10", "cifar100"):
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            dataset = cls(root, train=(split == "train"), download=download)
        elif name == "stl10":
            dataset = torchvision.datasets.STL10(root, split="train" if split == "train" else "test",
                                                 download=download)
            dataset.targets = [int(t) for t in dataset.labels]
        else:
            raise UsageError(f"unknown --dataset {name!r}; use imagefolder, cifar10, cifar100, stl10 or synthetic")
    except RuntimeError as e:
        raise UsageError(f"{name} not found under {root} ({str(e).splitlines()[0]}); "
                         "put the torchvision files there or add --download") from None
    return dataset, len(dataset.classes)


def dataset_targets(dataset):
    """The label of every image, read without decoding any image."""
    return torch.as_tensor(dataset.targets, dtype=torch.long)


def sample_seed(seed, epoch, index):
    """Seed of the augmentation of image `index` in `epoch`: resume and any number of workers or ranks
    see exactly the same crops."""
    return (seed * 1_000_003 + epoch * 2_654_435_761 + index * 40_503) % (2 ** 63)


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a (PIL image, label) dataset: returns (transformed view(s), label, dataset index).

    Items are requested as (index, augmentation seed) by ResumableSampler; the transform runs under
    that seed. `labels` overrides the base dataset's labels (noisy or pseudo labels)."""

    def __init__(self, base, transform, labels=None):
        self.base, self.transform, self.labels = base, transform, labels

    def __len__(self):
        return len(self.base)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, label = self.base[index]
        if self.labels is not None:
            label = int(self.labels[index])
        if seed is None:
            return self.transform(image), label, index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            views = self.transform(image)
        return views, label, index


class ResumableSampler(torch.utils.data.Sampler):
    """Per-epoch seeded shuffle of the whole dataset, cut into equal global batches (the remainder is
    dropped, as every rank must see the same number of steps), dealt to the ranks, and started at any
    iteration, so a resumed epoch continues with exactly the images it would have seen.
    Yields (index, augmentation seed) pairs for IndexedDataset."""

    def __init__(self, num_samples, global_batch_size, seed=0, rank=None, world_size=None):
        self.num_samples, self.global_batch_size, self.seed = num_samples, global_batch_size, seed
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.local_batch_size = global_batch_size // self.world_size
        self.iters_per_epoch = num_samples // global_batch_size
        self.epoch, self.start_iter = 0, 0

    def set_epoch(self, epoch, start_iter=0):
        self.epoch, self.start_iter = epoch, start_iter

    def epoch_indices(self):
        """(iters_per_epoch, world_size, local_batch) dataset indices of the current epoch."""
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        used = self.iters_per_epoch * self.global_batch_size
        return order[:used].view(self.iters_per_epoch, self.world_size, self.local_batch_size)

    def __iter__(self):
        local = self.epoch_indices()[self.start_iter:, self.rank].reshape(-1).tolist()
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in local])

    def __len__(self):
        return (self.iters_per_epoch - self.start_iter) * self.local_batch_size


def make_train_loader(dataset, sampler, workers, device):
    return torch.utils.data.DataLoader(
        dataset, batch_size=sampler.local_batch_size, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)


def _normalize():
    return [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def weak_augmentation(image_size, scale=(0.2, 1.0)):
    """Random resized crop + horizontal flip (the 'weak' target view of MSF w/s)."""
    return transforms.Compose([transforms.RandomResizedCrop(image_size, scale=scale),
                               transforms.RandomHorizontalFlip(), *_normalize()])


def strong_augmentation(image_size, scale=(0.2, 1.0)):
    """MoCo v2: crop, colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur sigma in [0.1, 2] (p 0.5),
    flip. The blur kernel is ~10 % of the image side (23 px at 224), as in BYOL/SimCLR."""
    kernel_size = 2 * max(1, round(0.05 * image_size)) + 1
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=scale),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([transforms.GaussianBlur(kernel_size, sigma=(0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(), *_normalize()])


AUGMENTATIONS = ("weak/strong", "strong/strong", "weak/weak", "strong/weak")


class MultiViewTransform:
    """Applies each transform to the same image: [target view, query view, extra query crops...]."""

    def __init__(self, view_transforms):
        self.view_transforms = view_transforms

    def __call__(self, image):
        return [t(image) for t in self.view_transforms]


def two_view_transform(augmentation, image_size):
    """`augmentation` is 'target/query', e.g. weak/strong (the paper's MSF w/s default)."""
    if augmentation not in AUGMENTATIONS:
        raise UsageError(f"unknown --augmentation {augmentation!r}; choose one of {', '.join(AUGMENTATIONS)}")
    target_name, query_name = augmentation.split("/")
    make = {"weak": weak_augmentation, "strong": strong_augmentation}
    return MultiViewTransform([make[target_name](image_size), make[query_name](image_size)])


def eval_transform(image_size):
    """Resize(256) + CenterCrop(224), scaled to other image sizes by the same 256/224 ratio."""
    return transforms.Compose([transforms.Resize(round(image_size * 256 / 224)),
                               transforms.CenterCrop(image_size), *_normalize()])


# ---------------------------------------------------------------- checkpoints

def atomic_write(path, write):
    """Write a file atomically: `write(f)` fills a temp file (binary) in the same folder, which is
    fsynced and renamed over `path`. A process killed while writing leaves the previous file intact;
    temp files of earlier killed writers are removed. Used for checkpoints, JSON results and caches."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = ".tmp_" + os.path.basename(path)
    fd, tmp_path = tempfile.mkstemp(prefix=prefix, dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes it 0600: keep the usual permissions of a new file
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        for name in os.listdir(folder):  # temp files left by writers that were killed mid-write
            if name.startswith(prefix):
                os.remove(os.path.join(folder, name))
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def save_checkpoint(state, path):
    """torch.save `state` to `path` atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(state, f))


def write_json(path, record):
    """Write `record` as indented JSON to `path` atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))


def load_checkpoint(path, script=None, arch=None):
    """Load a checkpoint written by save_checkpoint and check it belongs to this script and arch."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist; check --resume")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"cannot load checkpoint {path} ({type(e).__name__}); the file is damaged or "
                         "not a checkpoint of this suite") from None
    if not isinstance(checkpoint, dict) or "script" not in checkpoint:
        raise UsageError(f"{path} is not a training checkpoint of this suite (no 'script' entry)")
    if script is not None and checkpoint["script"] != script:
        raise UsageError(f"{path} was written by {checkpoint['script']}, not {script}; resume it with "
                         f"{checkpoint['script']} or use another --output-dir")
    if arch is not None and checkpoint["args"]["arch"] != arch:
        raise UsageError(f"{path} holds a {checkpoint['args']['arch']} model but --arch is {arch}; "
                         f"pass --arch {checkpoint['args']['arch']} or use another --output-dir")
    return checkpoint


def rng_states():
    """CPU (and CUDA) RNG states of every rank, gathered to all ranks, for exact resume."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if get_world_size() == 1:
        return [state]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def set_rng_states(states):
    state = states[get_rank() % len(states)]
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class PreemptionHandler:
    """Turns SLURM's warning signal (USR2, sent `signal_delay_s` before preemption or the time limit)
    into a checkpoint at the next iteration boundary.

    The handler only sets a flag; `should_stop()` (called every few iterations) agrees on it across
    ranks. After the training script has saved its checkpoint, `exit()` hands over to the handler that
    was installed before ours: under submitit that one requeues the job (rank 0) and the requeued job
    resumes from the checkpoint. Without submitit, the process exits with code 3 and a message. Install
    it before the first DataLoader iterator: forked workers inherit it (else a worker would run
    submitit's requeue itself). Under submitit, TERM is left to submitit, which ignores it on purpose."""

    def __init__(self):
        self.signal_received = None
        self.previous_usr2 = signal.getsignal(signal.SIGUSR2)
        self.under_submitit = callable(self.previous_usr2)
        signal.signal(signal.SIGUSR2, self._on_signal)
        if not self.under_submitit:  # submitit ignores TERM on purpose (SLURM sends it before a requeue)
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signal_received = signum
        print(f"[rank {get_rank()}] received {signal.Signals(signum).name}: saving a checkpoint at the "
              "end of this iteration", flush=True)

    def poll(self, device, checkpoint_due=False):
        """Agree across ranks on (stop now, save now): any rank that got the signal, or whose clock
        says a periodic checkpoint is due, decides for all."""
        flags = torch.tensor([float(self.signal_received is not None), float(checkpoint_due)], device=device)
        if get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, save = flags.tolist()
        return bool(stop), bool(save)

    def exit(self, checkpoint_path):
        if self.under_submitit:
            if is_main_process():
                self.previous_usr2(signal.SIGUSR2, None)  # submitit: resubmit, requeue, exit
            sys.exit(0)  # other ranks: rank 0 has saved; the requeued job restarts every task
        if is_main_process():
            print(f"stopped by a signal after saving {checkpoint_path}; run the same command again to "
                  "resume", flush=True)
        sys.exit(3)


def check_finite(loss, epoch, it):
    """Stop before anything is saved once the loss is NaN/inf (a failed run never overwrites a good
    checkpoint). Reads the loss from the GPU: call it at print steps and before saving, not every step."""
    if not torch.isfinite(loss).item():
        raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1} iteration {it + 1}; the last "
                                 "good checkpoint is kept. Lower --lr or use --amp bf16/none.")


def checkpoint_mid_epoch(args, preemption, save, loss, epoch, it, iters_per_epoch, last_save):
    """After iteration `it` of a training loop: every 10 iterations (every one with --stop-after-iters)
    the ranks agree whether SLURM's signal came (save, then requeue/exit), a --checkpoint-minutes save
    is due, or this run's --stop-after-iters budget is spent (save, then leave the epoch). `save(epoch,
    next_iteration)` is the script's full-state checkpoint; the epoch's last iteration is left to the
    end-of-epoch save. Returns (time of the last save, whether to leave the epoch now)."""
    args.iters_this_run += 1
    if (it + 1) % 10 and not args.stop_after_iters:
        return last_save, False
    stop, save_due = preemption.poll(args.device_obj, time.time() - last_save > args.checkpoint_minutes * 60)
    out_of_budget = bool(args.stop_after_iters) and args.iters_this_run >= args.stop_after_iters
    if not (stop or save_due or out_of_budget) or it + 1 == iters_per_epoch:
        return last_save, False
    check_finite(loss, epoch, it)
    path = save(epoch, it + 1)
    if stop:
        preemption.exit(path)
    return time.time(), out_of_budget


# ---------------------------------------------------------------- schedules, seeding, logging

def cosine_schedule(base_value, epochs, iters_per_epoch, final_value=0.0, per_epoch=True):
    """Value for every iteration: cosine from base_value to final_value, stepped once per epoch (the
    papers' setting) or per iteration."""
    steps = np.arange(epochs * iters_per_epoch)
    progress = (steps // iters_per_epoch) / epochs if per_epoch else steps / (epochs * iters_per_epoch)
    return final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * progress))


def fix_random_seeds(seed):
    torch.manual_seed(seed + get_rank())
    np.random.seed((seed + get_rank()) % 2 ** 32)


class MetricLogger:
    """Progress lines that read well in a SLURM log: running averages, lr, images/s and ETA.

    Values are accumulated as tensors so that logging does not synchronise the GPU every step; they
    are read (and averaged over ranks) only when a line is printed."""

    def __init__(self, header, total_iters, global_batch_size, print_freq=10, start_iter=0):
        self.header, self.total_iters, self.print_freq = header, total_iters, print_freq
        self.global_batch_size, self.start_iter = global_batch_size, start_iter
        self.sums, self.counts = defaultdict(float), defaultdict(int)
        self.window = defaultdict(lambda: deque(maxlen=print_freq))
        self.start_time = self.last_time = time.time()
        self.last_iter = start_iter

    def update(self, **values):
        for name, value in values.items():
            value = value.detach() if torch.is_tensor(value) else value
            self.sums[name] = self.sums[name] + value
            self.counts[name] += 1
            self.window[name].append(value)

    def averages(self):
        """Epoch averages over all ranks (one float each)."""
        return {name: reduce_mean(float(self.sums[name]) / self.counts[name]) for name in self.sums}

    def step(self, iteration, lr=None):
        """Call after each iteration (0-based); prints every print_freq iterations and at the end."""
        done = iteration + 1
        if done % self.print_freq and done != self.total_iters:
            return
        now = time.time()
        seconds_per_iter = (now - self.last_time) / max(1, done - self.last_iter)
        self.last_time, self.last_iter = now, done
        eta = datetime.timedelta(seconds=int(seconds_per_iter * (self.total_iters - done)))
        parts = [f"{self.header} [{done:>{len(str(self.total_iters))}}/{self.total_iters}]"]
        for name in self.sums:
            recent = reduce_mean(float(sum(float(v) for v in self.window[name]) / len(self.window[name])))
            parts.append(f"{name} {recent:.4f} ({reduce_mean(float(self.sums[name]) / self.counts[name]):.4f})")
        if lr is not None:
            parts.append(f"lr {lr:.5f}")
        parts.append(f"img/s {self.global_batch_size / max(seconds_per_iter, 1e-9):.0f}")
        parts.append(f"eta {eta}")
        if is_main_process():
            print("  ".join(parts), flush=True)


def plain_args(args):
    """The user's arguments as a dict of plain types (they go into checkpoints loaded with
    weights_only); the run-time objects the scripts hang on `args` are left out."""
    return {k: v for k, v in vars(args).items()
            if not k.endswith("_obj") and k not in ("autocast_dtype", "channels_last", "iters_this_run")}


def save_epoch_weights(output_dir, script, args_dict, epoch, save_every, online, target, backbone, arch):
    """End-of-epoch outputs besides checkpoint.pth (rank 0): a weights-only checkpoint_EEEE.pth every
    `save_every` epochs (small: no bank, no optimizer) and backbone_torchvision.pth."""
    if save_every and epoch % save_every == 0:
        save_checkpoint({"script": script, "args": args_dict, "epoch": epoch, "online": online.state_dict(),
                         "target": target.state_dict()}, os.path.join(output_dir, f"checkpoint_{epoch:04d}.pth"))
    save_checkpoint(torchvision_state_dict(backbone, arch), os.path.join(output_dir, "backbone_torchvision.pth"))


def append_json_log(output_dir, record):
    """One JSON line per epoch in <output_dir>/log.jsonl (rank 0 only)."""
    if is_main_process():
        with open(os.path.join(output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def save_args(args, output_dir, script):
    """args.json: every argument plus the versions that produced the run."""
    if is_main_process():
        record = dict(args if isinstance(args, dict) else vars(args), script=script, world_size=get_world_size(),
                      versions={"torch": torch.__version__, "torchvision": torchvision.__version__,
                                "numpy": np.__version__, "python": sys.version.split()[0]})
        with open(os.path.join(output_dir, "args.json"), "w") as f:
            json.dump(record, f, indent=2)


def amp_name(dtype):
    """How a script's start-up line names its autocast dtype: bfloat16, float16 or off."""
    return "off" if dtype is None else str(dtype).removeprefix("torch.")


def has_native_bf16(device):
    """Whether `device` computes bfloat16 in hardware: CUDA compute capability 8.0 (Ampere) or
    later. torch.cuda.is_bf16_supported() also answers yes where bf16 is only emulated (V100, T4:
    slower than float16 and float32), so the capability is what decides."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def amp_dtype(amp, device):
    """--amp: the autocast dtype, or None for float32. Default (None): bf16 on GPUs with native
    bf16, fp16 (with a GradScaler) on older GPUs, float32 on the CPU. `none`: float32 anywhere."""
    if amp not in (None, "bf16", "fp16", "none"):
        raise UsageError(f"--amp {amp}: expected bf16, fp16 or none")
    if amp is None:
        amp = "none" if device.type != "cuda" else "bf16" if has_native_bf16(device) else "fp16"
    elif amp == "bf16" and device.type == "cuda" and not has_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise UsageError(f"--amp bf16: this GPU (compute capability {major}.{minor}) has no native "
                         "bfloat16 (needs 8.0, Ampere or later); use --amp fp16 or --amp none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


# ---------------------------------------------------------------- evaluation helpers

# Prefix parts that mark the momentum/target copy of a network (never the one to evaluate), and the
# parts that mark the online/query copy (preferred when both hold a full backbone).
_TARGET_PARTS = {"target", "target_encoder", "encoder_t", "encoder_k", "teacher", "momentum_encoder",
                 "key_encoder", "model_ema", "ema", "memory_bank", "optimizer"}
_ONLINE_PARTS = {"online", "encoder_q", "query_encoder", "student", "backbone"}


def _flatten_tensors(tree, prefix=""):
    """Every tensor of a nested dict as {"outer.inner.key": tensor}."""
    flat = {}
    for key, value in tree.items():
        if torch.is_tensor(value):
            flat[prefix + str(key)] = value
        elif isinstance(value, dict):
            flat.update(_flatten_tensors(value, f"{prefix}{key}."))
    return flat


def _describe_format(checkpoint, prefix):
    if isinstance(checkpoint, dict) and "script" in checkpoint:
        epoch = f", epoch {checkpoint['epoch']}" if "epoch" in checkpoint else ""
        return f"training checkpoint of {checkpoint['script']}{epoch}, prefix '{prefix}'"
    if prefix == "":
        return "torchvision state dict"
    return f"released/other checkpoint, prefix '{prefix}'"


def load_backbone_weights(backbone, path):
    """Load the backbone weights of any checkpoint format into `backbone` (fc = Identity), strictly.

    Formats: our training checkpoints ("online" = Sequential(encoder, predictor), keys
    "0.backbone.*"; also the weights-only checkpoint_EEEE.pth), a plain torchvision ResNet state dict
    (fc.* ignored), and the authors' released MSF/CMSF checkpoints (backbone inside "state_dict" or
    "model" under prefixes such as encoder_q.module., module.encoder_q., encoder_q.0., module.encoder.;
    projection/predictor/fc keys are ignored). How: every tensor of the (nested) file gets a dotted
    name; for each prefix we count the backbone's keys found under it, and take the prefix covering
    most of them, preferring the online/query network over the target/momentum one.
    Strict: every backbone tensor must be found with the right shape (only BatchNorm's
    num_batches_tracked counter may be absent), else UsageError. Returns a one-line summary."""
    if not os.path.isfile(path):
        raise UsageError(f"--weights {path} does not exist; pass a checkpoint file")
    note = ""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:
        # Released checkpoints may pickle argparse Namespaces etc., which weights_only refuses.
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
            note = "; the file holds Python objects, loaded with weights_only=False: use files you trust"
        except Exception:
            raise UsageError(f"cannot load {path} ({type(safe_error).__name__}); the file is damaged or not "
                             "a PyTorch checkpoint") from None
    if not isinstance(checkpoint, dict):
        raise UsageError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict or state dict")
    tensors = _flatten_tensors(checkpoint)
    expected = backbone.state_dict()
    # Candidate prefixes: whatever precedes a backbone key name at a "." boundary.
    coverage = defaultdict(set)
    for name in tensors:
        for key in expected:
            if name == key or name.endswith("." + key):
                coverage[name[:len(name) - len(key)]].add(key)
    required = {k for k in expected if not k.endswith("num_batches_tracked")}

    def preference(prefix):
        parts = set(prefix.rstrip(".").split("."))
        return (len(coverage[prefix] & required), not (parts & _TARGET_PARTS), bool(parts & _ONLINE_PARTS))

    if max((len(c & required) for c in coverage.values()), default=0) < max(1, len(required) // 10):
        examples = ", ".join(list(tensors)[:5]) or "none"
        raise UsageError(f"no backbone weights in {path} (found keys like {examples}); pass a checkpoint "
                         "holding a ResNet of this --arch")
    ranked = sorted(coverage, key=preference, reverse=True)
    prefix = ranked[0]
    if len(ranked) > 1 and preference(ranked[1]) == preference(prefix):
        raise UsageError(f"{path} holds several complete backbones (prefixes '{prefix}', '{ranked[1]}'); "
                         "save the one to evaluate as a torchvision state dict")
    missing = sorted(required - coverage[prefix], key=list(expected).index)
    if missing:
        raise UsageError(f"{path} misses {len(missing)} backbone weights under prefix '{prefix}' (e.g. "
                         f"{', '.join(missing[:4])}); check --arch")
    state = {}
    for key, current in expected.items():
        value = tensors.get(prefix + key)
        if value is None:  # a num_batches_tracked counter: unused in eval mode
            value = current
        if value.shape != current.shape:
            raise UsageError(f"{prefix + key} has shape {tuple(value.shape)} in {path} but {tuple(current.shape)} "
                             "in the backbone; check --arch and --image-size (<= 64 px uses the small stem)")
        state[key] = value
    backbone.load_state_dict(state, strict=True)
    ignored = len(tensors) - len(coverage[prefix])
    return (f"loaded {len(coverage[prefix])} backbone tensors from {path} (format: "
            f"{_describe_format(checkpoint, prefix)}; {ignored} other tensors ignored){note}")


_default_amp_dtype = amp_dtype  # extract_features' argument of the same name shadows it


@torch.no_grad()
def extract_features(backbone, dataset, batch_size, workers, device, amp_dtype=None, print_freq=50,
                     header="features"):
    """Pooled features of every image of `dataset` (items (image, label) or (image, label, index)),
    with the backbone in eval mode. Returns (features float32 (N, feat), labels long (N,)) in dataset
    order, on `device`, on every rank.

    Under DDP each rank takes a contiguous shard of ceil(N / world) images (the last ranks get fewer,
    possibly none); the padded shards are all-gathered and the valid rows form the prefix [0, N), so
    nothing is duplicated or lost. `batch_size` is global (split over ranks). `amp_dtype`: a torch
    dtype, or an --amp value (None = bf16 on GPU / float32 on CPU, "bf16", "fp16", "none")."""
    if amp_dtype is None or isinstance(amp_dtype, str):
        amp_dtype = _default_amp_dtype(amp_dtype, device)
    world_size, rank = get_world_size(), get_rank()
    num_images = len(dataset)
    if num_images == 0:
        raise UsageError("the dataset to extract features from is empty; check --data and the split")
    shard = math.ceil(num_images / world_size)
    start, end = min(rank * shard, num_images), min((rank + 1) * shard, num_images)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(start, end)), batch_size=max(1, batch_size // world_size),
        shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    was_training = backbone.training
    backbone.eval()

    def forward(images):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return backbone(images.to(device, non_blocking=True)).float()

    feat_dim = forward(dataset[0][0].unsqueeze(0)).shape[1]  # on every rank, even one with no images
    features = torch.zeros(shard, feat_dim, device=device)
    labels = torch.full((shard,), -1, dtype=torch.long, device=device)
    done, tick, tick_images = 0, time.time(), 0
    for it, batch in enumerate(loader):
        images, batch_labels = batch[0], batch[1]
        features[done:done + len(images)] = forward(images)
        labels[done:done + len(images)] = torch.as_tensor(batch_labels).to(device)
        done += len(images)
        tick_images += len(images)
        if is_main_process() and ((it + 1) % print_freq == 0 or it + 1 == len(loader)):
            now = time.time()
            print(f"{header} [{it + 1}/{len(loader)}]  {tick_images * world_size / max(now - tick, 1e-9):.0f} img/s",
                  flush=True)
            tick, tick_images = now, 0
    backbone.train(was_training)
    if world_size > 1:
        all_features = torch.empty(world_size * shard, feat_dim, device=device)
        all_labels = torch.empty(world_size * shard, dtype=torch.long, device=device)
        dist.all_gather(list(all_features.split(shard)), features)
        dist.all_gather(list(all_labels.split(shard)), labels)
        features, labels = all_features, all_labels
    return features[:num_images], labels[:num_images]
