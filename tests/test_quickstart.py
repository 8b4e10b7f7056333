"""tools/check_quickstart.py, the last step of the README's quick start: the expected numbers, the
measured spread and the flags they belong to agree with the README, and a result is called exact,
within the spread (exit 0) or outside it (exit 1, one error line)."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import check_quickstart  # noqa: E402


def quickstart_command():
    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)[0]


def run_tool(run_dir):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "check_quickstart.py"),
                           str(run_dir)], capture_output=True, text=True)


def fake_run(folder, top1, top20, **flags):
    (folder / "knn").mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps(dict(check_quickstart.QUICKSTART_FLAGS,
                                                      workers=2, **flags)))
    accuracy = {"1": {"majority_top1": top1, "weighted_top1": top1},
                "20": {"majority_top1": top20, "weighted_top1": 0.0}}
    (folder / "knn" / "knn_results.json").write_text(json.dumps(
        {"accuracy": accuracy, "cpu_kernels": "AVX2", "threads": 1}))
    return folder


def test_readme_command_and_numbers_match_the_tool():
    command = quickstart_command()
    parts = [shlex.split(p) for p in command.split("&&")]
    train = next(p for p in parts if "train_msf.py" in p[1:2])
    flags = {a[2:].replace("-", "_"): v for a, v in zip(train, train[1:]) if a.startswith("--")}
    for name, value in check_quickstart.QUICKSTART_FLAGS.items():
        if value is not None and name in flags:
            assert type(value)(flags[name]) == value, name
    assert {"synthetic_images", "epochs", "batch_size", "mem_bank_size", "lr", "ema"} <= set(flags)
    assert parts[-1][:2] == ["python", "tools/check_quickstart.py"]
    assert parts[-1][2] == flags["output_dir"]
    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    row = next(line for line in readme.splitlines() if line.startswith("| MSF, the command above"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert [float(c) for c in cells[1:3]] == list(check_quickstart.EXPECTED.values())
    for (lo, hi), expected in zip(check_quickstart.MEASURED_SPREAD.values(),
                                  check_quickstart.EXPECTED.values()):
        assert lo <= expected <= hi and hi - lo < 20
        assert f"{lo:.2f}" in readme and f"{hi:.2f}" in readme


def test_exact_within_and_outside_the_spread(tmp_path):
    e1, e20 = check_quickstart.EXPECTED.values()
    exact = run_tool(fake_run(tmp_path / "a", e1 + 1e-5, e20 - 1e-5))
    assert exact.returncode == 0 and "exactly the README's" in exact.stdout, exact
    (lo1, hi1), (lo20, hi20) = check_quickstart.MEASURED_SPREAD.values()
    within = run_tool(fake_run(tmp_path / "b", lo1, hi20))
    assert within.returncode == 0 and "within that, so the install works" in within.stdout
    assert f"{lo1:.2f} / {hi20:.2f}" in within.stdout
    outside = run_tool(fake_run(tmp_path / "c", lo1 - 0.25, e20))
    assert outside.returncode == 1 and outside.stdout == ""
    assert outside.stderr.startswith("error: ") and "is outside the range" in outside.stderr
    assert len(outside.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["other flags", "no run", "no eval"])
def test_bad_input_is_one_error_line(tmp_path, case):
    if case == "other flags":
        folder = fake_run(tmp_path / "run", 50.0, 50.0, epochs=3)
        fragment = "--epochs 3 (the quick start's: 12)"
    elif case == "no run":
        folder, fragment = tmp_path / "missing", "pass the quick start's --output-dir"
    else:
        folder = fake_run(tmp_path / "run", 50.0, 50.0)
        os.remove(folder / "knn" / "knn_results.json")
        fragment = "run the quick start's eval_knn.py command first"
    result = run_tool(folder)
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
