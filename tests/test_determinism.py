"""--deterministic (default on for a CPU run): every script pins torch's CPU kernels to AVX2 and one
thread before its first tensor operation, so that a CPU run computes the same bits on any x86-64
machine with AVX2; the provenance line and args.json say which kernels ran. A variable the user set
wins; --no-deterministic leaves torch's own choice."""
import json
import subprocess
import sys

import pytest

import common
from conftest import assert_usage_error, run_script, script_env

SCRIPTS = {"train_msf.py": [], "train_cmsf_self.py": [], "train_cmsf_sup.py": [],
           "train_cmsf_semi.py": ["--labeled-fraction", "0.5"]}
# 4 images for a batch of 8: the run stops with an error right after its provenance line
TOO_SMALL = ["--dataset", "synthetic", "--synthetic-images", "4", "--batch-size", "8", "--arch",
             "resnet10", "--image-size", "16", "--workers", "0"]


def native_kernels():
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {k: v for k, v in script_env().items() if k not in common.DETERMINISTIC_CPU_ENV}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True).stdout.strip()


def provenance_of(result):
    return next(line for line in result.stdout.splitlines() if line.startswith("run: "))


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_cpu_run_pins_the_kernels_and_one_thread(script, tmp_path):
    result = run_script(script, *TOO_SMALL, *SCRIPTS[script], "--output-dir", tmp_path / "o",
                        env={"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
    assert_usage_error(result, "fewer than --batch-size 8")
    assert provenance_of(result).endswith("CPU kernels AVX2, 1 thread(s)"), provenance_of(result)


def test_no_deterministic_and_the_users_variables(tmp_path):
    result = run_script("train_msf.py", *TOO_SMALL, "--no-deterministic", "--output-dir", tmp_path,
                        env={"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
    native = native_kernels()
    assert provenance_of(result).endswith(f"CPU kernels {native}, 2 thread(s)")
    result = run_script("train_msf.py", *TOO_SMALL, "--output-dir", tmp_path,
                        env={"ATEN_CPU_CAPABILITY": "default"})
    assert provenance_of(result).endswith("CPU kernels DEFAULT, 1 thread(s)")
    result = run_script("train_msf.py", *TOO_SMALL, "--device", "cpu", "--deterministic",
                        "--output-dir", tmp_path)
    assert provenance_of(result).endswith("CPU kernels AVX2, 1 thread(s)")


def test_args_json_records_the_kernels(tiny_msf_run):
    record = json.loads((tiny_msf_run[0] / "args.json").read_text())
    assert record["deterministic"] is None  # the default: on, as the run was on the CPU
    assert record["cpu"] == {"kernels": "AVX2", "threads": 1, **common.DETERMINISTIC_CPU_ENV}


def test_eval_knn_records_the_kernels(tiny_msf_run, tmp_path):
    result = run_script("eval_knn.py", "--dataset", "synthetic", "--synthetic-images", 64,
                        "--arch", "resnet10", "--image-size", 16, "--weights",
                        tiny_msf_run[0] / "checkpoint.pth", "--workers", 0, "--output-dir",
                        tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "knn_results.json").read_text())
    assert (results["cpu_kernels"], results["threads"]) == ("AVX2", 1)
