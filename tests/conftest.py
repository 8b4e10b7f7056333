"""Shared test helpers: repo root on sys.path, tiny on-disk ImageFolder, running scripts as subprocesses.

Everything is tiny (16 px images, resnet10, a few steps) because the CI machine has 2 shared CPU cores.
"""
import os
import socket
import subprocess
import sys

# The tests that run a script's main() in this process compare it with script runs, which pin the
# CPU kernels (common.DETERMINISTIC_CPU_ENV, checked below); torch reads these before its first use.
os.environ.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_CBWR="COMPATIBLE,STRICT")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

torch.set_num_threads(1)

import forkserver  # noqa: E402
import common  # noqa: E402

assert all(os.environ[k] == v for k, v in common.DETERMINISTIC_CPU_ENV.items())

# Base colour of each class of the tiny ImageFolder: noise on top keeps images distinct.
TINY_CLASS_COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 230]], dtype=np.float64)


def write_imagefolder(root, classes=3, images_per_class=8, splits=("train", "val"), size=16, seed=0):
    """root/<split>/class_<c>/img_<i>.jpg: each class a different base colour plus a class-specific
    stripe and pixel noise, so images are class-structured but all different. Returns root."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(images_per_class):
                pixels = TINY_CLASS_COLOURS[c % len(TINY_CLASS_COLOURS)] + rng.normal(0, 30, (size, size, 3))
                pixels[:, (c * 5) % size: (c * 5) % size + 3] = 255  # class stripe
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                image.save(os.path.join(folder, f"img_{i}.jpg"), format="JPEG", quality=95)
    return str(root)


@pytest.fixture
def tiny_imagefolder(tmp_path):
    """Path of an ImageFolder root with train/ and val/: 3 classes x 8 JPEGs of 16x16 px each."""
    return write_imagefolder(tmp_path / "imagefolder")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(env=None):
    """Environment for a script subprocess: one thread, no inherited torchrun variables."""
    full = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                         "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}  # as a user's shell
    full.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONPATH=REPO_ROOT + os.pathsep + full.get("PYTHONPATH", ""))
    full.update(env or {})
    return full


def script_command(script, *args, nproc=1):
    """The command line that runs a repo script with `nproc` processes (torchrun + gloo for nproc > 1)."""
    path = script if os.path.isabs(script) else os.path.join(REPO_ROOT, script)
    if nproc == 1:
        return [sys.executable, path, *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), path, *map(str, args)]


def run_script(script, *args, nproc=1, env=None, timeout=300, cwd=None):
    """Run a repo script (path relative to the repo root, or absolute) with `args`; returns the
    subprocess.CompletedProcess with text stdout/stderr (never raises on a non-zero exit). One
    process with the default environment goes through the fork server (forkserver.py: the same
    run without re-importing torch); other runs start a real interpreter."""
    command = script_command(script, *args, nproc=nproc)
    if nproc == 1 and env is None and os.environ.get("MSF_TESTS_FORKSERVER") != "0":
        return forkserver.run(command, script_env(), cwd or REPO_ROOT, timeout)
    return subprocess.run(command, capture_output=True, text=True, env=script_env(env),
                          timeout=timeout, cwd=cwd or REPO_ROOT)


def tiny_msf_args(output_dir, *extra, epochs=2):
    """argv of a tiny train_msf.py run on the built-in synthetic data (4 iterations per epoch)."""
    return ["--dataset", "synthetic", "--synthetic-images", "64", "--arch", "resnet10", "--image-size", "16",
            "--batch-size", "16", "--mem-bank-size", "40", "--topk", "3", "--workers", "0",
            "--print-freq", "1", "--epochs", str(epochs), "--output-dir", str(output_dir), *map(str, extra)]


@pytest.fixture(scope="session")
def tiny_msf_run(tmp_path_factory):
    """One finished tiny train_msf.py run (tiny_msf_args, 2 epochs x 4 iterations), shared by the tests
    that need a reference run or a good checkpoint: (output dir, CompletedProcess). Copy, never modify."""
    output_dir = tmp_path_factory.mktemp("tiny_msf_run") / "out"
    result = run_script("train_msf.py", *tiny_msf_args(output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result


def assert_usage_error(result, *fragments):
    """A script failed the way bad input should: exit code 2 and one line `error: ...` on stderr
    (containing each fragment, case-insensitive), no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) >= 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment.lower() in error_lines[0].lower(), (fragment, error_lines[0])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test fails: a missing install step or a cluster that did not start
    must not pass unnoticed (.ci/run sets CI=true)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"
