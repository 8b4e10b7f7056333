"""Exact resume (CPU): a run stopped and resumed ends bit-identical to the uninterrupted run, whether it
stops at an epoch boundary, mid-epoch, by --stop-after-iters or by a preemption signal, and whatever the
number of data-loading workers (augmentations are seeded per sample)."""
import json
import signal
import subprocess

import pytest
import torch

from conftest import run_script, script_command, script_env, tiny_msf_args, REPO_ROOT


def load(output_dir):
    return torch.load(output_dir / "checkpoint.pth", weights_only=True)


def assert_same_final_state(output_dir, reference_dir):
    """Networks, optimizer (momentum buffers), bank (pointer included) and position: bit for bit."""
    got, want = load(output_dir), load(reference_dir)
    assert (got["epoch"], got["iteration"]) == (want["epoch"], want["iteration"]) == (2, 0)
    for part in ("online", "target", "memory_bank"):
        assert got[part].keys() == want[part].keys()
        for name, value in want[part].items():
            assert torch.equal(got[part][name], value), (part, name)
    for param_id, state in want["optimizer"]["state"].items():
        assert torch.equal(got["optimizer"]["state"][param_id]["momentum_buffer"], state["momentum_buffer"])
    assert torch.equal(torch.load(output_dir / "backbone_torchvision.pth")["conv1.weight"],
                       torch.load(reference_dir / "backbone_torchvision.pth")["conv1.weight"])


@pytest.mark.parametrize("stop_after,position,resume_workers", [
    (4, (1, 0), 0),   # at the epoch boundary (4 iterations per epoch)
    (2, (0, 2), 0),   # in the middle of epoch 1
    (6, (1, 2), 2),   # in the middle of epoch 2, resumed with 2 loader workers instead of 0
])
def test_stop_and_resume_is_bit_identical(tmp_path, tiny_msf_run, stop_after, position, resume_workers):
    result = run_script("train_msf.py", *tiny_msf_args(tmp_path, "--stop-after-iters", stop_after))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped after" in result.stdout
    stopped = load(tmp_path)
    assert (stopped["epoch"], stopped["iteration"]) == position
    result = run_script("train_msf.py", *tiny_msf_args(tmp_path), "--workers", resume_workers)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert_same_final_state(tmp_path, tiny_msf_run[0])
    assert_same_log(tmp_path, tiny_msf_run[0])


def assert_same_log(output_dir, reference_dir):
    """The resumed run's log.jsonl has the uninterrupted run's epoch averages: the interrupted epoch's
    running sums travel in the mid-epoch checkpoint, and only into that epoch."""
    def records(folder):
        return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    got, want = records(output_dir), records(reference_dir)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == [1, 2]
    for g, w in zip(got, want):
        for key in ("loss", "purity", "lr"):
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-9), (g["epoch"], key)
        assert g["purity_at_k"] == pytest.approx(w["purity_at_k"], rel=1e-6)


def test_loader_workers_do_not_change_the_run(tmp_path, tiny_msf_run):
    result = run_script("train_msf.py", *tiny_msf_args(tmp_path), "--workers", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_final_state(tmp_path, tiny_msf_run[0])


def test_sigusr2_saves_exits_3_and_rerun_resumes_exactly(tmp_path, tiny_msf_run):
    command = script_command("train_msf.py", *tiny_msf_args(tmp_path))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=script_env(), cwd=REPO_ROOT)
    output = []
    try:
        for line in process.stdout:  # wait until training runs (the handler is installed by then)
            output.append(line)
            if line.startswith("Epoch [1/2] [1/4]"):
                process.send_signal(signal.SIGUSR2)
                break
        output += process.stdout.readlines()
        process.wait(timeout=300)
    finally:
        process.kill()
    output = "".join(output)
    assert process.returncode == 3, output[-3000:]
    assert "received SIGUSR2" in output and "run the same command again" in output
    stopped = load(tmp_path)
    assert stopped["epoch"] * 4 + stopped["iteration"] < 8  # stopped early, at an iteration boundary
    result = run_script("train_msf.py", *tiny_msf_args(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    assert_same_final_state(tmp_path, tiny_msf_run[0])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_on_cpu_trains_and_resumes_exactly(tmp_path, amp):
    """The GPU's autocast paths run on the CPU too: bf16, and fp16 with the GradScaler (its scale is
    in the checkpoint). Stopping mid-epoch and resuming gives the uninterrupted run bit for bit."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # fp16 convolutions are slow on a CPU: 6 iterations of 8 images (2 epochs of 3), stop after 4
    small = ("--amp", amp, "--knn-every", 0, "--synthetic-images", 24, "--batch-size", 8)
    result = run_script("train_msf.py", *tiny_msf_args(straight, *small))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"amp {'bfloat16' if amp == 'bf16' else 'float16'}" in result.stdout
    assert "6 iterations" in result.stdout or "3 it/epoch" in result.stdout
    result = run_script("train_msf.py", *tiny_msf_args(resumed, *small, "--stop-after-iters", 4))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_script("train_msf.py", *tiny_msf_args(resumed, *small))
    assert result.returncode == 0 and "resumed from" in result.stdout, result.stderr[-3000:]
    got, want = load(resumed), load(straight)
    for part in ("online", "target", "memory_bank"):
        for name, value in want[part].items():
            assert torch.equal(got[part][name], value), (part, name)
    if amp == "fp16":
        assert want["scaler"]["scale"] > 0 and got["scaler"] == want["scaler"]
