"""Plot the epoch logs (log.jsonl) of training runs: one PNG per run, or several runs overlaid.

    python tools/plot_logs.py runs/msf                          # -> runs/msf/log.png
    python tools/plot_logs.py runs/msf runs/cmsf -o compare.png # both runs in one figure

Panels, each only when some run logged its keys: loss (every key with "loss" in its name), purity
(purity, purity_constrained, purity_unconstrained, ...), k-NN accuracy (knn_top1, knn_top20, ...),
learning rate, seconds (epoch_seconds, data_seconds, knn_seconds, ...), one panel per other number,
and for dict- or list-valued keys the curve of the last epoch that logged them: purity versus k
(purity_at_ks: {"1": 0.9, "5": 0.8} or [0.9, ...] for k = 1, 2, ...) and histograms (any key with
"hist" in its name: a list of counts, or counts per named bin such as rank_histogram: {"1": 30,
"2-5": 12, ..., ">1000": 0}). Needs matplotlib.
"""
import argparse
import json
import math
import os
import sys

SCALAR_GROUPS = (  # (panel title, does a key belong to it)
    ("loss", lambda key: "loss" in key),
    ("purity", lambda key: key.startswith("purity")),
    ("k-NN accuracy (%)", lambda key: key.startswith("knn_") and not key.endswith("seconds")),
    ("learning rate", lambda key: key == "lr"),
    ("seconds per epoch", lambda key: key.endswith("seconds") or key.endswith("_time")),
)


class UsageError(Exception):
    """Bad input: printed as one line `error: ...`, exit code 2."""


def get_args_parser():
    p = argparse.ArgumentParser("plot_logs", description=__doc__.split("\n")[0], add_help=False)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="output folders of training runs (holding log.jsonl), or log.jsonl files")
    p.add_argument("-o", "--output", default=None,
                   help="one PNG overlaying all runs; not given: RUN_DIR/log.png for each run")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG")
    return p


def log_path(run):
    return run if os.path.isfile(run) else os.path.join(run, "log.jsonl")


def read_log(run):
    """The epoch records of a run, one per epoch (a later line for the same epoch wins), sorted."""
    path = log_path(run)
    if not os.path.isfile(path):
        raise UsageError(f"{path} does not exist; pass the --output-dir of a training run")
    by_epoch = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # e.g. a line cut short by a killed process
                print(f"warning: {path}:{number} is not JSON; skipped", file=sys.stderr)
                continue
            if isinstance(record, dict) and "epoch" in record:
                by_epoch[record["epoch"]] = record
    if not by_epoch:
        raise UsageError(f"{path} holds no epoch records yet; plot it after the first epoch")
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def as_curve(value):
    """(x, y, tick labels or None) of a dict- or list-valued log entry, or None when it holds no
    numbers. Dicts with numeric keys: sorted as numbers ({"5": 0.8}); other dicts: categories in
    their order ({"1": 3, "2-5": 7, ">1000": 0}, a binned histogram); lists: [y0, y1, ...]
    (x = 0, 1, ...; the caller shifts "at_k" lists to k = 1, 2, ...) or [[x, y], ...] pairs."""
    if isinstance(value, dict) and value:
        try:
            pairs = sorted((float(key), y) for key, y in value.items())
        except (ValueError, TypeError):  # category names: keep their order, label the ticks
            ys = list(value.values())
            if not all(is_number(y) for y in ys):
                return None
            return list(range(len(ys))), ys, [str(key) for key in value]
    elif isinstance(value, list) and value and all(isinstance(v, list) and len(v) == 2
                                                   for v in value):
        pairs = [tuple(v) for v in value]
    elif isinstance(value, list) and value:
        pairs = list(enumerate(value))
    else:
        return None
    if not all(is_number(x) and is_number(y) for x, y in pairs):
        return None
    return [x for x, _ in pairs], [y for _, y in pairs], None


def panels_of(runs):
    """[(title, kind, keys)] for the keys the runs logged; kind "scalar" (per epoch) or
    "curve"/"hist" (a dict or list: the last epoch's value)."""
    scalar_keys, curve_keys = [], []
    for records in runs:
        for record in records:
            for key, value in record.items():
                if key == "epoch":
                    continue
                if is_number(value) and key not in scalar_keys:
                    scalar_keys.append(key)
                elif as_curve(value) is not None and key not in curve_keys:
                    curve_keys.append(key)
    panels, placed = [], set()
    for title, belongs in SCALAR_GROUPS:
        keys = [key for key in scalar_keys if belongs(key) and key not in placed]
        if keys:
            panels.append((title, "scalar", keys))
            placed.update(keys)
    panels += [(key, "scalar", [key]) for key in scalar_keys if key not in placed]
    for key in curve_keys:
        panels.append((key, "hist" if "hist" in key else "curve", [key]))
    return panels


def draw(runs, names, output, dpi):
    """One figure of all panels, every run in its own colour, saved as a PNG at `output`."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("matplotlib is not installed; pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels_of(runs)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (title, kind, keys) in zip(axes.flat, panels):
        for run_index, (records, name) in enumerate(zip(runs, names)):
            colour = colours[run_index % len(colours)]
            label_run = f"{name}: " if len(runs) > 1 else ""
            if kind == "scalar":
                for key_index, key in enumerate(keys):
                    points = [(r["epoch"], r[key]) for r in records if is_number(r.get(key))]
                    if points:
                        ax.plot(*zip(*points), styles[key_index % len(styles)], color=colour,
                                marker="." if len(points) < 30 else None, label=label_run + key)
                ax.set_xlabel("epoch")
                continue
            key = keys[0]
            last = next((r for r in reversed(records) if as_curve(r.get(key)) is not None), None)
            if last is None:
                continue
            x, y, ticks = as_curve(last[key])
            if isinstance(last[key], list) and not isinstance(last[key][0], list) and "at_k" in key:
                x = [v + 1 for v in x]  # a plain list of purity at k = 1, 2, ...
            label = f"{label_run}epoch {last['epoch']}"
            if kind == "hist":
                width = 0.8 / len(runs)
                ax.bar([v - 0.4 + width * (run_index + 0.5) for v in x], y, width=width,
                       color=colour, label=label)
                ax.set_xlabel("bin")
                if ticks:
                    ax.set_xticks(x, ticks, fontsize="small")
            else:
                ax.plot(x, y, "-o", color=colour, label=label)
                if ticks:
                    ax.set_xticks(x, ticks, fontsize="small")
                ax.set_xlabel("k" if "at_k" in key else "")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    figure.tight_layout()
    figure.savefig(output, dpi=dpi)
    plt.close(figure)
    return output


def run_names(runs):
    """Legend names: the folder names, or the full paths where two folders share a name."""
    folders = [os.path.dirname(run) if os.path.isfile(run) else run for run in runs]
    names = [os.path.basename(os.path.normpath(f)) or f for f in folders]
    return names if len(set(names)) == len(names) else [os.path.normpath(f) for f in folders]


def main(args):
    logs = [read_log(run) for run in args.runs]
    if args.output:
        print(draw(logs, run_names(args.runs), args.output, args.dpi))
        return
    for run, records in zip(args.runs, logs):
        output = os.path.join(os.path.dirname(log_path(run)), "log.png")
        print(draw([records], run_names([run]), output, args.dpi))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[get_args_parser()],
                                     description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    try:
        main(parser.parse_args())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
