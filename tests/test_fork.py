"""A researcher forks one script: a copy of train_msf.py with a new flag that changes what it
computes trains, stops and resumes exactly without any change to common.py, and the fork's own
resume rule (its RESUMABLE) decides whether the flag may change on resume."""
import os

import torch

from conftest import REPO_ROOT, assert_usage_error, run_script, tiny_msf_args
from test_resume import assert_same_log

FORK = "train_msf_scaled.py"


def write_fork(folder, resumable_extra=""):
    """train_msf.py with --loss-scale S (the loss is multiplied by S), saved as its own script."""
    source = open(os.path.join(REPO_ROOT, "train_msf.py")).read()
    edits = [
        ('SCRIPT = "train_msf.py"', f'SCRIPT = "{FORK}"'),
        ("RESUMABLE = common.RUNTIME_FLAGS", f"RESUMABLE = common.RUNTIME_FLAGS{resumable_extra}"),
        ('    common.add_monitor_args(p)\n',
         '    p.add_argument("--loss-scale", type=float, default=1.0, help="loss multiplier")\n'
         '    common.add_monitor_args(p)\n'),
        ("        loss = loss_per_sample.mean()\n",
         "        loss = loss_per_sample.mean() * args.loss_scale\n"),
    ]
    for old, new in edits:
        assert source.count(old) == 1, old  # the fork edits what it means to
        source = source.replace(old, new)
    path = folder / FORK
    path.write_text(source)
    return str(path)


def weights(output_dir):
    return torch.load(output_dir / "checkpoint.pth", map_location="cpu", weights_only=True)["online"]


def test_forked_script_trains_and_resumes_exactly(tmp_path, tiny_msf_run):
    fork = write_fork(tmp_path)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = ["--loss-scale", "4"]
    assert run_script(fork, *tiny_msf_args(straight, *args)).returncode == 0
    first = run_script(fork, *tiny_msf_args(stopped, *args, "--stop-after-iters", 3))
    assert first.returncode == 0 and "stopped after 3 iterations" in first.stdout, first.stderr
    resumed = run_script(fork, *tiny_msf_args(stopped, *args))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr
    a, b = weights(straight), weights(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert_same_log(stopped, straight)

    # the flag changes the computation: train_msf.py itself (scale 1, same flags) ends elsewhere
    c = weights(tiny_msf_run[0])
    assert any(not torch.equal(a[name], c[name]) for name in a if a[name].is_floating_point())

    # the fork's own rule: --loss-scale is not in its RESUMABLE, so another value is refused
    assert_usage_error(run_script(fork, *tiny_msf_args(stopped, "--loss-scale", "2", "--epochs",
                                                       3)), "--loss-scale 4.0", "--loss-scale 2.0")


def test_forks_resume_rule_can_allow_its_flag(tmp_path):
    fork = write_fork(tmp_path, resumable_extra=' | {"loss_scale"}')
    output_dir = tmp_path / "run"
    first = run_script(fork, *tiny_msf_args(output_dir, "--loss-scale", "4",
                                            "--stop-after-iters", 2))
    assert first.returncode == 0, first.stderr
    resumed = run_script(fork, *tiny_msf_args(output_dir, "--loss-scale", "2"))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr
