"""Ghost BatchNorm (common.convert_batchnorm): every BatchNorm normalises groups of bn_batch_size
samples, within a process or pooled over processes (2 gloo processes), against plain nn.BatchNorm
over the same groups and a float64 reference of the running statistics; the sizes that cannot work
are usage errors, and exported state dicts stay torchvision's."""
import copy
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torchvision

import common
from conftest import REPO_ROOT, free_port


def revert_batchnorm(module):
    """Inverse of convert_batchnorm (in place; returns it): plain nn.BatchNorm1d/2d modules sharing
    the same parameters and buffers, e.g. before exporting a backbone to other code."""
    def plain(ghost):
        bn = ghost.plain_class(ghost.num_features, ghost.eps, ghost.momentum, ghost.affine,
                               ghost.track_running_stats, device="meta")
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(bn, name, getattr(ghost, name))
        return bn.train(ghost.training)
    return common._replace_batchnorm(module, plain, (common.GhostBatchNorm,))


def random_batchnorm(kind, channels, seed):
    """A float64 BatchNorm with random affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    bn = kind(channels).double()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
        bn.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5)
    return bn


def reference_running_stats(x, running_mean, running_var, group_sizes, momentum=0.1):
    """float64: running <- (1 - m) running + m mean over groups of (mean, unbiased var)."""
    dims = [0] + list(range(2, x.dim()))
    means, variances = [], []
    for group in x.split(group_sizes):
        means.append(group.mean(dim=dims))
        variances.append(group.var(dim=dims, unbiased=True))
    new_mean = (1 - momentum) * running_mean + momentum * torch.stack(means).mean(0)
    new_var = (1 - momentum) * running_var + momentum * torch.stack(variances).mean(0)
    return new_mean, new_var


@pytest.mark.parametrize("kind,shape", [(nn.BatchNorm2d, (256, 6, 3, 3)),
                                        (nn.BatchNorm1d, (256, 6)),
                                        (nn.BatchNorm2d, (288, 6, 2, 2))])
def test_groups_of_64_equal_four_batchnorms(kind, shape):
    """Batch 256 on one process, bn_batch_size 64: the output and the gradients equal four separate
    BatchNorms over the quarters. A batch of 288 (not a multiple) adds a last group of 32."""
    generator = torch.Generator().manual_seed(0)
    bn = random_batchnorm(kind, shape[1], seed=1)
    initial_mean, initial_var = bn.running_mean.clone(), bn.running_var.clone()
    group_sizes = [64] * (shape[0] // 64) + ([shape[0] % 64] if shape[0] % 64 else [])
    separate = [copy.deepcopy(bn) for _ in group_sizes]
    ghost = common.convert_batchnorm(copy.deepcopy(bn), 64, local_batch_size=256,
                                     world_size=1)
    assert isinstance(ghost, common.GhostBatchNorm) and ghost.samples_per_rank == 64
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    upstream = torch.randn(*shape, generator=generator, dtype=torch.float64)  # d loss / d output
    x_ghost, x_separate = x.clone().requires_grad_(), x.clone().requires_grad_()

    out = ghost(x_ghost)
    expected = torch.cat([m(part) for m, part in zip(separate, x_separate.split(group_sizes))])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x_ghost.grad, x_separate.grad, rtol=0, atol=1e-11)
    for name in ("weight", "bias"):
        separate_grad = sum(getattr(m, name).grad for m in separate)
        torch.testing.assert_close(getattr(ghost, name).grad, separate_grad, rtol=0, atol=1e-10)

    ref_mean, ref_var = reference_running_stats(x, initial_mean, initial_var, group_sizes)
    torch.testing.assert_close(ghost.running_mean, ref_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(ghost.running_var, ref_var, rtol=0, atol=1e-12)
    assert ghost.num_batches_tracked.item() == 1
    # evaluation mode: the running statistics, exactly as a plain BatchNorm holding them
    plain = revert_batchnorm(copy.deepcopy(ghost)).eval()
    assert type(plain) is kind
    torch.testing.assert_close(ghost.eval()(x), plain(x), rtol=0, atol=0)


def test_amp_and_channels_last_run_on_cpu():
    """bf16 autocast and channels_last inputs (the GPU settings): same dtype and layout out, values
    close to the float32 result."""
    generator = torch.Generator().manual_seed(2)
    ghost = common.convert_batchnorm(nn.BatchNorm2d(8), 16, local_batch_size=64, world_size=1)
    x = torch.randn(64, 8, 4, 4, generator=generator).to(memory_format=torch.channels_last)
    reference = ghost(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ghost(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


def test_zero_leaves_modules_untouched_and_small_global_batch_is_one_group():
    encoder = common.build_encoder("resnet10", 16)
    modules = list(encoder.modules())
    assert common.convert_batchnorm(encoder, 0, local_batch_size=32, world_size=1) is encoder
    assert list(encoder.modules()) == modules
    # a global batch of 16 below bn_batch_size 64: normalised as a whole, like nn.BatchNorm
    assert common.ghost_batchnorm_layout(64, 16, 1) == (16, 1)
    assert common.ghost_batchnorm_layout(64, 8, 2) == (8, 2)
    bn = random_batchnorm(nn.BatchNorm1d, 5, seed=3)
    ghost = common.convert_batchnorm(copy.deepcopy(bn), 64, local_batch_size=16, world_size=1)
    x = torch.randn(16, 5, dtype=torch.float64)
    torch.testing.assert_close(ghost(x), bn(x), rtol=0, atol=0)
    torch.testing.assert_close(ghost.running_var, bn.running_var, rtol=0, atol=0)


@pytest.mark.parametrize("bn_batch_size,local,world,fragment", [
    (24, 64, 1, "divisor of 64 (1, 2, 4, 8, 16, 32, 64)"),  # 64 is not a multiple of 24
    (48, 32, 2, "64 (groups of processes)"),                   # 48 / 32 ranks: not whole
    (96, 32, 4, "64, 128 (groups of processes)"),              # 3 ranks per group do not divide 4
    (-1, 32, 1, "must be 0"),
])
def test_impossible_sizes_are_usage_errors(bn_batch_size, local, world, fragment):
    with pytest.raises(common.UsageError, match="bn-batch-size") as error:
        common.ghost_batchnorm_layout(bn_batch_size, local, world)
    assert fragment in str(error.value)


def test_export_stays_a_torchvision_state_dict(tmp_path):
    """Converted networks keep nn.BatchNorm's state-dict keys and shapes: the torchvision export
    loads strictly, checkpoints load back, and revert_batchnorm gives plain modules."""
    backbone, _ = common.build_backbone("resnet18", 224)
    keys = {k: v.shape for k, v in backbone.state_dict().items()}
    common.convert_batchnorm(backbone, 32, local_batch_size=64, world_size=1)
    assert sum(isinstance(m, common.GhostBatchNorm) for m in backbone.modules()) == 20
    assert {k: v.shape for k, v in backbone.state_dict().items()} == keys
    exported = common.torchvision_state_dict(backbone, "resnet18")
    torchvision.models.resnet18().load_state_dict(exported, strict=True)
    path = tmp_path / "backbone.pth"
    torch.save(exported, path)
    other, _ = common.build_backbone("resnet18", 224)
    common.convert_batchnorm(other, 32, local_batch_size=64, world_size=1)
    common.load_backbone_weights(other, str(path))
    revert_batchnorm(other)
    assert not any(isinstance(m, common.GhostBatchNorm) for m in other.modules())
    for name, value in backbone.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name


# ---------------------------------------------------------------- 2 processes

WORLD_SIZE, LOCAL_BATCH, STEPS = 2, 32, 2


def small_network():
    """resnet10 encoder + predictor (float64): BatchNorm2d in the backbone, BatchNorm1d in heads."""
    torch.manual_seed(0)
    encoder = common.build_encoder("resnet10", 16)
    return nn.Sequential(encoder, common.build_predictor(encoder)).double()


def step_data(step, global_batch):
    generator = torch.Generator().manual_seed(100 + step)
    images = torch.randn(global_batch, 3, 8, 8, generator=generator, dtype=torch.float64)
    weights = torch.randn(global_batch, 128, generator=generator, dtype=torch.float64)
    return images, weights


def run_steps(network, steps, global_batch, rows):
    """Forward `rows` of each step's global batch, backward loss = sum(out * weights). Returns the
    outputs, input gradients, parameter gradients (summed over steps) and the buffers."""
    outputs, input_grads = [], []
    for step in range(steps):
        images, weights = step_data(step, global_batch)
        images = images[rows].clone().requires_grad_()
        out = network(images)
        (out * weights[rows]).sum().backward()
        outputs.append(out.detach())
        input_grads.append(images.grad)
    return {"outputs": outputs, "input_grads": input_grads,
            "param_grads": {n: p.grad.clone() for n, p in network.named_parameters()},
            "buffers": {n: b.clone() for n, b in network.named_buffers()}}


def _worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    sys.path.insert(0, REPO_ROOT)
    torch.set_num_threads(1)
    common.init_distributed("cpu")
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {}
    network = common.convert_batchnorm(small_network(), 64, LOCAL_BATCH)  # 2 ranks x 32
    results["pooled"] = run_steps(network, STEPS, WORLD_SIZE * LOCAL_BATCH, rows)
    # global batch 2 x 8 below bn_batch_size 64: one group over both ranks
    small_rows = slice(rank * 8, (rank + 1) * 8)
    network = common.convert_batchnorm(small_network(), 64, 8)
    results["small"] = run_steps(network, 1, WORLD_SIZE * 8, small_rows)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ghost_bn")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("case,global_batch,steps", [("pooled", 64, STEPS), ("small", 16, 1)])
def test_two_processes_equal_one_batch(two_ranks, case, global_batch, steps):
    """2 processes x 32 with bn_batch_size 64 == one process with one BatchNorm batch of 64:
    outputs, gradients of a loss through every BatchNorm (input: each rank's rows; parameters:
    summed over ranks, as DDP's all-reduce does up to its 1/world) and running statistics, over 2
    steps.
    Also 2 x 8 (global batch 16 < 64) == one batch of 16."""
    reference = run_steps(small_network(), steps, global_batch, slice(None))
    ranks = [r[case] for r in two_ranks]
    for step in range(steps):
        for part in ("outputs", "input_grads"):
            pooled = torch.cat([r[part][step] for r in ranks])
            torch.testing.assert_close(pooled, reference[part][step], rtol=1e-9, atol=1e-9)
    for name, grad in reference["param_grads"].items():
        summed = ranks[0]["param_grads"][name] + ranks[1]["param_grads"][name]
        torch.testing.assert_close(summed, grad, rtol=1e-8, atol=1e-9, msg=name)
    assert any(name.endswith("running_var") for name in reference["buffers"])
    for name, buffer in reference["buffers"].items():
        for r in ranks:
            torch.testing.assert_close(r["buffers"][name], buffer, rtol=1e-9, atol=1e-10,
                                       msg=name)


@pytest.mark.parametrize("bn_batch_size, local_batch_size", [(64, 16), (4, 8)])
def test_two_forwards_before_one_backward(bn_batch_size, local_batch_size):
    """Multi-crop runs the online network twice in one step (the large crops, then the local ones)
    before one backward: the second forward's running-statistics update must not invalidate what
    the first saved for backward, and the gradients equal those of plain BatchNorm (one group per
    forward here: bn_batch_size >= the batch, or groups of 4 of 8)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)).double()
    ghost = common.convert_batchnorm(copy.deepcopy(plain), bn_batch_size, local_batch_size)
    x1 = torch.randn(local_batch_size, 6, dtype=torch.float64)
    x2 = torch.randn(2 * local_batch_size, 6, dtype=torch.float64)
    (ghost(x1).square().sum() + ghost(x2).square().sum()).backward()
    group = min(bn_batch_size, local_batch_size)
    reference = sum(plain(x.view(-1, group, 6)[i]).square().sum()
                    for x in (x1, x2) for i in range(x.shape[0] // group))
    reference.backward()
    for ours, theirs in zip(ghost.parameters(), plain.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-9)
