"""MSF under DDP (2 CPU processes, gloo): all-gather before enqueue, the cross-rank shuffle-BN, and a
2-process train_msf.py run against a 1-process run with the same global batch."""
import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import common
from conftest import REPO_ROOT, free_port, run_script, tiny_msf_args

WORLD_SIZE, LOCAL_BATCH, BANK_SIZE, DIM, STEPS = 2, 3, 10, 4, 4


def global_batch(step):
    """The same global batch on every rank: (embeddings, labels, dataset indices)."""
    gen = torch.Generator().manual_seed(step)
    n = WORLD_SIZE * LOCAL_BATCH
    return (F.normalize(torch.randn(n, DIM, generator=gen), dim=1), torch.randint(0, 5, (n,), generator=gen),
            torch.arange(n) + 100 * step)


def _init(rank, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    sys.path.insert(0, REPO_ROOT)
    torch.set_num_threads(1)
    device = common.init_distributed("cpu")
    assert device.type == "cpu" and common.get_world_size() == WORLD_SIZE and common.get_rank() == rank


def _worker(rank, port, out_dir, argv):
    _init(rank, port)
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {"gathered": common.all_gather(torch.full((2, 3), float(rank))),
               "mean": common.reduce_mean(rank + 1.0)}
    # bank fed with this rank's share of each global batch, all-gathered as in train_msf
    bank = common.MemoryBank(BANK_SIZE, DIM, seed=0)
    for step in range(STEPS):
        emb, labels, indices = (t[mine] for t in global_batch(step))
        bank.enqueue(common.all_gather(emb), common.all_gather(labels), common.all_gather(indices))
    results["bank"] = bank.state_dict()
    # shuffle / unshuffle: rows carry their global id; a row-wise function commutes with the shuffle
    results["shuffled_ids"], results["roundtrip_ok"] = [], []
    local = torch.arange(rank * 4, rank * 4 + 4, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    for step in range(6):
        shuffled, unshuffle_index = common.batch_shuffle(local, seed=5, step=step)
        results["shuffled_ids"].append(shuffled[:, 0].long())
        back = common.batch_unshuffle(shuffled * 2 + 1, unshuffle_index)
        results["roundtrip_ok"].append(torch.equal(back, local * 2 + 1))
    # preemption: a signal on one rank stops all ranks
    handler = common.PreemptionHandler()
    handler.signal_received = 12 if rank == 1 else None
    results["poll"] = handler.poll(torch.device("cpu"))
    results["train_msf"] = _run_train_msf(argv)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Spawn 2 gloo processes once; each tests the primitives, then runs a tiny train_msf.main."""
    out_dir = tmp_path_factory.mktemp("ddp")
    argv = tiny_msf_args(out_dir / "train_msf", "--device", "cpu", epochs=1)
    mp.spawn(_worker, args=(free_port(), str(out_dir), argv), nprocs=WORLD_SIZE)
    return out_dir, [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def test_gather_bank_shuffle_with_two_processes(two_ranks):
    ranks = two_ranks[1]
    # single-process reference: the whole global batch enqueued at once
    reference = common.MemoryBank(BANK_SIZE, DIM, seed=0)
    for step in range(STEPS):
        reference.enqueue(*global_batch(step))
    for r, result in enumerate(ranks):
        assert torch.equal(result["gathered"], torch.tensor([0.0] * 6 + [1.0] * 6).view(4, 3))
        assert result["mean"] == 1.5
        for name, value in reference.state_dict().items():
            assert torch.equal(result["bank"][name], value), (r, name)
        assert all(result["roundtrip_ok"]), r
        assert result["poll"] == (True, False)
    # the shuffle deals the 8 global rows out as a permutation, mixing ranks, differently per step
    mixed = 0
    for step in range(6):
        ids = [ranks[r]["shuffled_ids"][step] for r in range(WORLD_SIZE)]
        assert sorted(torch.cat(ids).tolist()) == list(range(8))
        mixed += any(i >= 4 for i in ids[0].tolist())
    assert mixed >= 3
    assert len({tuple(ranks[0]["shuffled_ids"][s].tolist()) for s in range(6)}) > 1


def test_shuffle_is_identity_on_one_process():
    x = torch.randn(4, 3)
    shuffled, index = common.batch_shuffle(x, 0, 0)
    assert shuffled is x and index is None and common.batch_unshuffle(x, index) is x
    assert torch.equal(common.all_gather(x), x)


def _run_train_msf(argv):
    """train_msf.main on this rank; returns the bank and the networks' parameters this rank holds."""
    import train_msf
    seen = {}

    class RecordingBank(common.MemoryBank):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["bank"] = self

    original_ema_update = common.ema_update_

    def recording_ema_update(target, online, momentum):
        seen["target"], seen["online"] = target, online
        original_ema_update(target, online, momentum)

    common.MemoryBank, common.ema_update_ = RecordingBank, recording_ema_update
    train_msf.main(train_msf.get_args_parser().parse_args(argv))
    return {"bank": seen["bank"].state_dict(),
            "online": {n: p.detach().clone() for n, p in seen["online"].named_parameters()},
            "target": {n: p.detach().clone() for n, p in seen["target"].named_parameters()}}


def test_train_msf_two_ranks_hold_the_same_bank_and_weights(two_ranks):
    """A few real train_msf steps under DDP: the bank (gathered before enqueue), the online encoder's
    parameters (DDP) and the target's (an EMA of them, copied from the same initial weights) are
    identical on both ranks. BatchNorm running statistics are per rank (DDP broadcasts rank 0's at the
    start of each forward, the target keeps its own), so they are not compared."""
    out_dir, ranks = two_ranks
    ranks = [r["train_msf"] for r in ranks]
    for part in ("bank", "online", "target"):
        for name, value in ranks[0][part].items():
            assert torch.equal(ranks[1][part][name], value), (part, name)
    checkpoint = torch.load(out_dir / "train_msf" / "checkpoint.pth", weights_only=True)
    for name, value in ranks[0]["bank"].items():
        assert torch.equal(checkpoint["memory_bank"][name], value), name
    assert torch.all(checkpoint["memory_bank"]["indices"] >= 0)


def test_train_msf_script_two_processes_vs_one(tmp_path, tiny_msf_run):
    """train_msf.py under torchrun with 2 processes vs 1 process, same global batch of 16 (8 steps).

    What matches exactly: the images of every step (same sampler order, per-sample seeded augmentation),
    hence the labels and dataset indices in the bank and its pointer. With the default --bn-batch-size
    64 every BatchNorm normalises over the global batch of 16 on both (statistics all-reduced across
    the 2 ranks), so embeddings and weights agree up to float rounding; with --bn-batch-size 0 each rank
    normalises its own 8 images and the run is a different model."""
    one = tiny_msf_run[0]
    result = run_script("train_msf.py", *tiny_msf_args(tmp_path / "ghost"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    result = run_script("train_msf.py", *tiny_msf_args(tmp_path / "per_rank", "--bn-batch-size", 0), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    want = torch.load(one / "checkpoint.pth", weights_only=True)
    ghost = torch.load(tmp_path / "ghost" / "checkpoint.pth", weights_only=True)
    per_rank = torch.load(tmp_path / "per_rank" / "checkpoint.pth", weights_only=True)
    for got in (ghost, per_rank):
        for name in ("labels", "indices", "ptr"):
            assert torch.equal(want["memory_bank"][name], got["memory_bank"][name]), name
    assert torch.all(want["memory_bank"]["indices"] >= 0)  # 8 steps x 16 > 40: every slot written

    def gap(got):
        return max((got["online"][k].double() - v.double()).abs().max().item()
                   for k, v in want["online"].items() if v.is_floating_point())
    torch.testing.assert_close(ghost["memory_bank"]["embeddings"], want["memory_bank"]["embeddings"],
                               rtol=1e-4, atol=1e-4)
    assert gap(ghost) < 1e-3 and gap(per_rank) > 100 * gap(ghost), (gap(ghost), gap(per_rank))
    out = tmp_path / "ghost"
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # rank 0 alone logs, once per epoch
    assert json.loads((out / "args.json").read_text())["world_size"] == 2
