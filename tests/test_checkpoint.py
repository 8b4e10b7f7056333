"""Checkpoints: atomic writes that survive a kill mid-write, clear errors on loading the wrong file,
and the torchvision export of the backbone."""
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
import torchvision

import common
from conftest import REPO_ROOT, script_env

WRITER = """
import sys, torch, common
path, big = sys.argv[1], torch.zeros(12_500_000)  # 50 MB: a write takes long enough to be interrupted
for step in range(10_000):
    big.fill_(step)
    common.save_checkpoint({"script": "writer.py", "args": {"arch": "none"}, "step": step, "big": big}, path)
    print(step, flush=True)
"""


def test_kill_while_writing_leaves_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "checkpoint.pth"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                              env=script_env(), cwd=REPO_ROOT)
    try:
        assert writer.stdout.readline().strip() == "0"  # one complete checkpoint exists
        deadline = time.time() + 60
        while not any(name.startswith(".tmp_") for name in os.listdir(tmp_path)):  # next write under way
            assert time.time() < deadline and writer.poll() is None
            time.sleep(0.001)
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".tmp_")]
    checkpoint = common.load_checkpoint(str(path), script="writer.py")
    step = checkpoint["step"]
    assert torch.all(checkpoint["big"] == step) and checkpoint["big"].numel() == 12_500_000
    # killed mid-write: the interrupted temp file is still there (a kill cannot clean it up) and was
    # never renamed over the checkpoint, which holds the last complete step
    assert len(leftovers) == 1
    # the next successful save removes the killed writer's temp file (it may hold a whole memory bank)
    common.save_checkpoint({"script": "writer.py", "step": step + 1}, str(path))
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp_")]
    assert common.load_checkpoint(str(path), script="writer.py")["step"] == step + 1


def test_save_is_atomic_and_readable_by_others(tmp_path):
    path = tmp_path / "checkpoint.pth"
    common.save_checkpoint({"script": "a.py", "args": {"arch": "resnet10"}, "x": torch.arange(3)}, str(path))
    common.save_checkpoint({"script": "a.py", "args": {"arch": "resnet10"}, "x": torch.arange(4)}, str(path))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temp file left behind
    assert torch.equal(common.load_checkpoint(str(path), "a.py", "resnet10")["x"], torch.arange(4))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_load_checkpoint_errors(tmp_path):
    good = tmp_path / "good.pth"
    common.save_checkpoint({"script": "train_msf.py", "args": {"arch": "resnet10"}}, str(good))
    with pytest.raises(common.UsageError, match="written by train_msf.py, not train_cmsf_sup.py"):
        common.load_checkpoint(str(good), "train_cmsf_sup.py", "resnet10")
    with pytest.raises(common.UsageError, match="holds a resnet10 model but --arch is resnet50"):
        common.load_checkpoint(str(good), "train_msf.py", "resnet50")
    with pytest.raises(common.UsageError, match="does not exist"):
        common.load_checkpoint(str(tmp_path / "missing.pth"))
    weights_only = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1)}, weights_only)
    with pytest.raises(common.UsageError, match="not a training checkpoint"):
        common.load_checkpoint(str(weights_only))
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(good.read_bytes()[:100])
    with pytest.raises(common.UsageError, match="damaged"):
        common.load_checkpoint(str(damaged))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_export_of_full_size_stem(arch):
    backbone, feat_dim = common.build_backbone(arch, 224)
    reference = torchvision.models.get_model(arch)
    reference.load_state_dict(common.torchvision_state_dict(backbone, arch), strict=True)
    assert feat_dim == reference.fc.in_features
    reference.fc = torch.nn.Identity()
    backbone.eval(), reference.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), backbone(x), rtol=0, atol=0)


def test_torchvision_export_of_small_stem():
    backbone, _ = common.build_backbone("resnet18", 32)
    reference = torchvision.models.resnet18()
    reference.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the small-image stem
    reference.maxpool = torch.nn.Identity()
    reference.load_state_dict(common.torchvision_state_dict(backbone, "resnet18"), strict=True)
    with pytest.raises(RuntimeError, match="conv1.weight"):  # the 224-px stem does not fit
        torchvision.models.resnet18().load_state_dict(common.torchvision_state_dict(backbone, "resnet18"))
