"""tools/plot_logs.py: a PNG with the panels of the keys a log holds, several runs overlaid, the
one-line error when matplotlib is missing."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, run_script

PLOT = "tools/plot_logs.py"


def write_log(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def cmsf_like_records(epochs):
    """Epoch records as train_cmsf_self.py writes them, with a k-NN monitor, data time, purity
    versus k (a dict) and rank histograms (a list, and a dict of named bins)."""
    return [{"epoch": e, "loss": 2 - 0.1 * e, "purity_constrained": 0.3 + 0.02 * e,
             "purity_unconstrained": 0.25 + 0.02 * e, "lr": 0.05 / e, "epoch_seconds": 30.0 + e,
             "data_seconds": 3.0, "knn_top1": 10.0 + e, "knn_top20": 12.0 + e, "knn_seconds": 4.0,
             "purity_at_ks": {"1": 0.9, "5": 0.7, "20": 0.5},
             "constrained_rank_hist": [5, 4, 3, 2, 1, e],
             "rank_histogram": {"1": 30, "2-5": 12, "6-10": 4, ">1000": e}}
            for e in range(1, epochs + 1)]


def image_stats(path):
    pixels = np.asarray(Image.open(path).convert("RGB"))
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    return pixels.shape, pixels.std(), colours


def test_one_png_per_run(tmp_path):
    run = write_log(tmp_path / "cmsf", cmsf_like_records(6))
    result = run_script(PLOT, run, "--dpi", 50)
    assert result.returncode == 0, result.stderr
    # 8 panels: loss, purity, k-NN, lr, seconds, purity_at_ks, two histograms -> 3 x 3 grid
    shape, std, colours = image_stats(run / "log.png")
    assert shape == (round(3 * 3.4 * 50), 3 * 5 * 50, 3)
    assert std > 10 and colours > 20  # drawn, not blank


def test_panels_only_for_keys_present():
    import importlib.util
    spec = importlib.util.spec_from_file_location("plot_logs", f"{REPO_ROOT}/{PLOT}")
    plot_logs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_logs)
    msf = [{"epoch": 1, "loss": 1.0, "purity": 0.4, "lr": 0.05, "epoch_seconds": 3.0}]
    titles = [title for title, _, _ in plot_logs.panels_of([msf])]
    assert titles == ["loss", "purity", "learning rate", "seconds per epoch"]
    panels = plot_logs.panels_of([cmsf_like_records(2), msf])
    assert ("purity", "scalar", ["purity_constrained", "purity_unconstrained", "purity"]) in panels
    assert ("k-NN accuracy (%)", "scalar", ["knn_top1", "knn_top20"]) in panels
    seconds = ["epoch_seconds", "data_seconds", "knn_seconds"]
    assert ("seconds per epoch", "scalar", seconds) in panels
    assert ("purity_at_ks", "curve", ["purity_at_ks"]) in panels
    assert ("constrained_rank_hist", "hist", ["constrained_rank_hist"]) in panels
    assert ("rank_histogram", "hist", ["rank_histogram"]) in panels
    # dict/list entries of other shapes: numbers -> curves, anything else is left out
    curve = plot_logs.as_curve
    assert curve({"1": 0.9, "10": 0.5, "5": 0.7}) == ([1.0, 5.0, 10.0], [0.9, 0.7, 0.5], None)
    assert plot_logs.as_curve([[1, 0.9], [5, 0.7]]) == ([1, 5], [0.9, 0.7], None)
    assert plot_logs.as_curve([3, 2]) == ([0, 1], [3, 2], None)
    assert curve({"1": 3, "2-5": 7, ">1000": 0}) == ([0, 1, 2], [3, 7, 0], ["1", "2-5", ">1000"])
    assert plot_logs.as_curve({"a": "x"}) is None and plot_logs.as_curve(["x"]) is None
    assert plot_logs.as_curve([]) is None and plot_logs.as_curve({}) is None


def test_two_runs_overlaid(tmp_path):
    first = write_log(tmp_path / "msf", [{"epoch": e, "loss": 1.5 - 0.1 * e, "purity": 0.3,
                                          "lr": 0.05} for e in range(1, 5)])
    # a resumed run may log an epoch twice: the later line wins; a cut-off last line is skipped
    second = write_log(tmp_path / "cmsf", cmsf_like_records(3))
    with open(second / "log.jsonl", "a") as f:
        f.write('{"epoch": 3, "loss": 0.5}\n{"epoch": 4, "lo')
    result = run_script(PLOT, first, second, "-o", tmp_path / "both.png", "--dpi", 50)
    assert result.returncode == 0, result.stderr
    assert "log.jsonl:5 is not JSON; skipped" in result.stderr
    shape, std, colours = image_stats(tmp_path / "both.png")
    assert shape == (round(3 * 3.4 * 50), 3 * 5 * 50, 3) and std > 10 and colours > 20
    pixels = np.asarray(Image.open(tmp_path / "both.png").convert("RGB")).reshape(-1, 3).astype(int)
    # both runs' line colours (matplotlib's first two: blue 1f77b4, orange ff7f0e) are drawn
    for colour in ((0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)):
        assert (np.abs(pixels - colour).sum(axis=1) < 30).sum() > 50
    assert not (first / "log.png").exists()


def test_bad_input(tmp_path):
    result = run_script(PLOT, tmp_path / "nowhere")
    assert result.returncode == 2 and result.stderr.strip().startswith("error: ")
    assert "log.jsonl" in result.stderr
    empty = write_log(tmp_path / "empty", [])
    result = run_script(PLOT, empty)
    assert result.returncode == 2 and "no epoch records" in result.stderr


def test_missing_matplotlib_is_one_line_error(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    # a sitecustomize that blocks the import, as if matplotlib were not installed
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    run = write_log(tmp_path / "run", cmsf_like_records(2))
    result = run_script(PLOT, run, env={"PYTHONPATH": f"{shim}:{REPO_ROOT}"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: matplotlib is not installed; pip install matplotlib"
    assert not (run / "log.png").exists()
