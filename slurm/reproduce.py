"""One paper row end to end: the stages of `slurm/submit.py --reproduce ROW`, their state, and the
report that puts each measured number beside the paper's.

A chain lives in its output folder: reproduce.json (the row, the flags, every stage's command and
job id; written atomically), one folder per stage (train/, knn/, linear/, ...), jobs/<job id>/
(submitit's logs and result files), and at the end report.md, report.json and curves.png. A stage
is finished when its job wrote a successful result; it is active while SLURM still runs or queues
it; else it failed (or was never submitted) and the next run of the same command submits it again.

This module submits nothing itself (slurm/submit.py does, with submitit); the report job imports it
to write the report.
"""
import json
import os
import pickle
import re
import shlex
import subprocess
import sys
import time

SLURM_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(SLURM_DIR)
if SLURM_DIR not in sys.path:
    sys.path.insert(0, SLURM_DIR)
import paper_rows  # noqa: E402

STATE_FILE = "reproduce.json"
# The evaluations a row can have: script, its own flags, and the subset list each one reads
EVALUATIONS = {
    "knn": ("eval_knn.py", []),
    "linear": ("eval_linear.py", []),
    "linear_1pct": ("eval_linear.py", ["--train-list", "1percent.txt"]),
    "linear_10pct": ("eval_linear.py", ["--train-list", "10percent.txt"]),
    "semi_10pct": ("eval_linear.py", ["--protocol", "semi", "--train-list", "10percent.txt"]),
    "semi_knn_10pct": ("eval_knn.py", ["--train-list", "10percent.txt"]),
    "semi_1pct": ("eval_linear.py", ["--protocol", "semi", "--train-list", "1percent.txt"]),
    "semi_knn_1pct": ("eval_knn.py", ["--train-list", "1percent.txt"]),
}
TRANSFER_DATASETS = ("food101", "cifar10", "cifar100", "sun397", "cars", "aircraft", "dtd", "pets",
                     "caltech101", "flowers")
# Flags of the training command that describe the data, the network or where it runs: they reach
# the evaluations too (the recipe flags, --epochs --lr --batch-size ..., stay with the training)
EVALUATION_FLAGS = ("--data", "--dataset", "--download", "--synthetic-images", "--arch",
                    "--image-size", "--workers", "--device", "--deterministic",
                    "--no-deterministic")
DATA_WORDS = ("$IMNET", "$CIFAR", "$STL")
LIST_WORDS = {"10percent.txt": "--train-list-10pct", "1percent.txt": "--train-list-1pct"}
EXAMPLE_FILES = ("noisy.txt", "other.pt")  # in a row's command; the user names the real file
# Flags that name this chain's own files: the chain sets them
OWN_FLAGS = ("--output-dir", "--weights", "--resume")
# squeue states of a job that will still run (or is running)
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                 "COMPLETING", "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD"}


def parse_flags(words):
    """['--a', '1', '--b', '--c', 'x', 'y'] -> [('--a', ['1']), ('--b', []), ('--c', ['x', 'y'])].
    """
    flags = []
    for word in words:
        if word.startswith("--"):
            flag, sep, value = word.partition("=")
            flags.append((flag, [value] if sep else []))
        elif flags:
            flags[-1][1].append(word)
        else:
            raise UsageError(f"{word!r} is not a flag; give flags after the row name, e.g. "
                             f"--epochs 2")
    return flags


def merge_flags(flags, overrides):
    """The row's flags with each override replacing the same flag (or appended)."""
    merged = list(flags)
    for flag, values in overrides:
        opposite = {"--deterministic": "--no-deterministic",
                    "--no-deterministic": "--deterministic"}.get(flag)
        merged = [(f, v) for f, v in merged if f != opposite]
        for i, (f, _) in enumerate(merged):
            if f == flag:
                merged[i] = (flag, values)
                break
        else:
            merged.append((flag, values))
    return merged


def flag_words(flags):
    return [word for flag, values in flags for word in (flag, *values)]


def flag_value(flags, name):
    return next((values for flag, values in flags if flag == name), None)


class UsageError(Exception):
    """Bad input: slurm/submit.py prints it as one `error:` line, as it does common.UsageError."""


def plan_chain(row, output_dir, data, train_lists, transfer_root, skip, overrides, eval_args,
               options_of):
    """The stages of a row: {stage: {"script", "argv", "output_dir", "after"}} in submission order,
    or a UsageError naming the missing input. `options_of(script)` is the set of flags it takes."""
    script, *row_words = row.command.split()[1:]
    override_flags = parse_flags(overrides)
    for flag, _ in override_flags + parse_flags(eval_args):
        if flag in OWN_FLAGS:
            raise UsageError(f"{flag} is set by the chain (its stages write into "
                             f"--output-dir {output_dir}); drop it")
    trains = script.startswith("train_")
    flags = merge_flags(parse_flags(row_words), override_flags)
    unknown = [flag for flag, _ in override_flags
               if flag not in options_of(script) and flag not in EVALUATION_FLAGS]
    if unknown:
        raise UsageError(f"{script} has no {unknown[0]} (row {row.name}); see python "
                         f"{script} --help (flags of the evaluations only go in --eval-args)")
    synthetic = flag_value(flags, "--dataset") == ["synthetic"]
    if synthetic:  # built-in data: no path to fill in
        flags = [(f, v) for f, v in flags if f != "--data"]
    lists = {"10percent.txt": train_lists.get("10pct"), "1percent.txt": train_lists.get("1pct")}

    def fill(words, needed_by):
        filled = []
        for word in words:
            if word in DATA_WORDS:
                if not data:
                    raise UsageError(f"row {row.name} reads {word} (its command: "
                                     f"{row.command}): give --data /path/to/the/data, or "
                                     f"--dataset synthetic after the row name to try it")
                word = data
            elif word in LIST_WORDS:
                if not lists[word]:
                    raise UsageError(
                        f"{needed_by} of row {row.name} reads SimCLR's {word} (one image file "
                        f"name per line): give {LIST_WORDS[word]} FILE"
                        + (f", or --skip {needed_by}" if needed_by in EVALUATIONS else ""))
                word = lists[word]
            elif word in EXAMPLE_FILES:
                flag = next(f for f, v in flags if word in v)
                raise UsageError(f"row {row.name} names the example file {word} "
                                 f"({flag}): give your file after the row name, e.g. "
                                 f"{flag} /path/to/{word}")
            filled.append(word)
        return filled

    stages = {}
    train_dir = os.path.join(output_dir, "train")
    if trains:
        stages["train"] = {"script": script, "output_dir": train_dir, "after": None,
                           "argv": fill(flag_words(flags), "training")
                           + ["--output-dir", train_dir]}
    shared = [(f, v) for f, v in flags if f in EVALUATION_FLAGS]
    eval_flags = parse_flags(eval_args)
    evaluations = [name for name in row.evaluations if name != "transfer"]
    for name in skip:
        if name not in row.evaluations:
            raise UsageError(f"--skip {name}: row {row.name} has no such evaluation; its "
                             f"evaluations: {', '.join(row.evaluations)}")
    for name in evaluations:
        if name in skip:
            continue
        eval_script, own = EVALUATIONS[name]
        accepted = options_of(eval_script)
        words = own + flag_words([(f, v) for f, v in shared + eval_flags if f in accepted])
        if trains:
            words += ["--weights", os.path.join(train_dir, "checkpoint.pth")]
        stage_dir = os.path.join(output_dir, name)
        stages[name] = {"script": eval_script, "output_dir": stage_dir,
                        "after": "train" if trains else None,
                        "argv": fill(words, name) + ["--output-dir", stage_dir]}
    wants_transfer = "transfer" in row.evaluations and "transfer" not in skip
    if wants_transfer and not transfer_root:
        raise UsageError(f"row {row.name} has the paper's transfer numbers: give "
                         f"--transfer-root DIR (one folder per dataset, see transfer_eval.py "
                         f"--help), or --skip transfer")
    if transfer_root and "transfer" not in skip:
        if not trains:
            raise UsageError(f"row {row.name} trains nothing to transfer; drop "
                             f"--transfer-root")
        accepted = options_of("transfer_eval.py")
        words = flag_words([(f, v) for f, v in shared + eval_flags
                            if f in accepted and f != "--datasets"])
        names = flag_value(eval_flags, "--datasets")
        names = names[0].split(",") if names else TRANSFER_DATASETS
        unknown = [name for name in names if name not in TRANSFER_DATASETS]
        if unknown:
            raise UsageError(f"--datasets {unknown[0]}: not a transfer dataset; choose from "
                             f"{','.join(TRANSFER_DATASETS)}")
        transfer_dir = os.path.join(output_dir, "transfer")
        for dataset in names:
            stages[f"transfer_{dataset}"] = {
                "script": "transfer_eval.py", "output_dir": transfer_dir, "after": "train",
                "argv": ["--data-root", transfer_root, "--datasets", dataset, *words, "--weights",
                         os.path.join(train_dir, "checkpoint.pth"), "--output-dir", transfer_dir]}
    unused = [flag for flag, _ in eval_flags
              if not any(flag in options_of(stage["script"])
                         for name, stage in stages.items() if name != "train")]
    if unused:
        raise UsageError(f"--eval-args {unused[0]}: no evaluation of row {row.name} takes "
                         f"it")
    return stages


# ---------------------------------------------------------------- state

def read_state(output_dir):
    path = os.path.join(output_dir, STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_atomically(path, text):
    """Write a file through a temp file and a rename: a reader never sees half of it. (Not
    common.atomic_write: common imports torch, which the report job has no use for.)"""
    temp = f"{path}.tmp{os.getpid()}"
    with open(temp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def write_json(path, record):
    write_atomically(path, json.dumps(record, indent=2) + "\n")


def write_state(output_dir, state):
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, STATE_FILE), state)


def result_path(stage):
    job_id = stage["job_id"]
    return os.path.join(stage["job_folder"].replace("%j", job_id), f"{job_id}_0_result.pkl")


def squeue_state(job_id):
    """SLURM's state of a job (squeue; sacct once squeue has forgotten it), or 'UNKNOWN'."""
    for command in (["squeue", "--noheader", "--states=all", "--format=%T", "--jobs", job_id],
                    ["sacct", "--noheader", "--allocations", "--parsable2", "--format=State",
                     "--jobs", job_id]):
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out:
            return out[0].split()[0]  # sacct: "CANCELLED by 0" -> CANCELLED
    return "UNKNOWN"


def stage_state(stage):
    """('FINISHED' | 'FAILED' | an active squeue state | 'NOT SUBMITTED', detail)."""
    if not stage.get("job_id"):
        return "NOT SUBMITTED", ""
    path = result_path(stage)
    if os.path.isfile(path):
        try:
            with open(path, "rb") as f:
                outcome = pickle.load(f)[0]
        except Exception as e:  # a result file cut short: the job did not finish cleanly
            return "FAILED", f"unreadable result {path} ({type(e).__name__})"
        if outcome == "success":
            return "FINISHED", ""
        return "FAILED", f"the job raised; see {stage_log(stage, 'err')}"
    if stage.get("local"):
        try:
            os.kill(int(stage["job_id"]), 0)
            return "RUNNING", "local process"
        except (OSError, ValueError):
            return "FAILED", f"ended without a result; see {stage_log(stage, 'err')}"
    live = squeue_state(stage["job_id"])
    if live in ACTIVE_STATES:
        return live, ""
    return "FAILED", f"SLURM: {live}, no result; see {stage_log(stage, 'err')}"


def wall_seconds(stage):
    """Seconds from the job's first start to its successful end (requeues included), from the
    timestamps of submitit's log lines; None before it has finished."""
    if not stage.get("job_id") or not os.path.isfile(stage_log(stage, "out")):
        return None
    with open(stage_log(stage, "out"), errors="replace") as f:
        stamps = re.findall(r"^submitit INFO \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\) - "
                            r"(Starting|Job completed successfully)", f.read(), re.M)
    starts = [t for t, what in stamps if what == "Starting"]
    ends = [t for t, what in stamps if what != "Starting"]
    if not starts or not ends:
        return None
    seconds = [time.mktime(time.strptime(t, "%Y-%m-%d %H:%M:%S")) for t in (starts[0], ends[-1])]
    return seconds[1] - seconds[0]


def stage_log(stage, kind):
    job_id = stage["job_id"]
    return os.path.join(stage["job_folder"].replace("%j", job_id), f"{job_id}_0_log.{kind}")


def status_lines(output_dir):
    state = read_state(output_dir)
    if state is None:
        raise UsageError(f"{output_dir} holds no {STATE_FILE}: give the --output-dir of a "
                         f"`slurm/submit.py --reproduce` chain")
    lines = [f"row {state['row']} in {output_dir}"]
    for name, stage in state["stages"].items():
        value, detail = stage_state(stage)
        job = stage.get("job_id") or "-"
        lines.append(f"  {name:20s} job {job:>10s}  {value}" + (f"  ({detail})" if detail else ""))
    report = os.path.join(output_dir, "report.md")
    lines.append(f"report: {report}" if os.path.isfile(report) else "report: not written yet")
    return lines


# ---------------------------------------------------------------- report

def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def measured_metrics(stages, output_dir):
    """{metric: measured value} from the result files the stages wrote."""
    measured = {}
    for name, stage in stages.items():
        if name.startswith("transfer_"):
            result = read_json(os.path.join(stage["output_dir"], f"{name[9:]}.json"))
            if result is not None:
                measured[name] = result["test_accuracy"]
            continue
        if name == "train":
            continue
        script = stage["script"]
        result = read_json(os.path.join(stage["output_dir"], "knn_results.json"
                                        if script == "eval_knn.py" else "linear_results.json"))
        if result is None:
            continue
        if name == "knn":
            measured["knn_1"] = result["accuracy"]["1"]["majority_top1"]
            measured["knn_20"] = result["accuracy"]["20"]["majority_top1"]
        elif script == "eval_knn.py":  # the semi k-NN rows: k = 1 on the labeled subset
            measured[name] = result["accuracy"]["1"]["majority_top1"]
        else:
            measured[name] = result["final_top1"]
    transfer = [measured[f"transfer_{n}"] for n in TRANSFER_DATASETS if f"transfer_{n}" in measured]
    if len(transfer) == len(TRANSFER_DATASETS):
        measured["transfer_mean"] = sum(transfer) / len(transfer)
    return measured


def training_provenance(stages, resources):
    """Commit, command, processes, GPU, wall time and requeues of the training stage."""
    stage = stages.get("train")
    if stage is None:
        return {"training": "none (this row evaluates a random initialisation)"}
    record = read_json(os.path.join(stage["output_dir"], "args.json")) or {}  # args + provenance
    git = record.get("git", {})
    log_path = os.path.join(stage["output_dir"], "log.jsonl")
    epochs = []
    if os.path.isfile(log_path):
        with open(log_path) as f:
            epochs = [json.loads(line) for line in f if line.strip()]
    logs = ""
    if stage.get("job_id"):
        folder = stage["job_folder"].replace("%j", stage["job_id"])
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.endswith((".out", ".err")):
                    with open(os.path.join(folder, name), errors="replace") as f:
                        logs += f.read()
    return {"commit": git.get("commit"), "dirty": git.get("dirty"),
            "command": " ".join(["python", stage["script"], *stage["argv"]]),
            "resources": resources,
            "processes": record.get("world_size"),
            "gpu": record.get("versions", {}).get("gpu", "none"),
            "host": record.get("host"), "slurm_job": stage.get("job_id"),
            "wall_seconds": wall_seconds(stage), "epochs": len(epochs),
            "training_seconds": round(sum(e.get("epoch_seconds", 0) for e in epochs), 1),
            "requeues": logs.count("Requeued job")}


def draw_curves(stages, output_dir):
    """(path of curves.png, None) or (None, why not): tools/plot_logs.py on the training log."""
    if "train" not in stages:
        return None, "no training curves (no training stage)"
    try:
        import matplotlib  # noqa: F401  (only to know whether plot_logs.py can draw)
    except ImportError:
        return None, "curves not drawn: matplotlib is not installed (pip install matplotlib)"
    path = os.path.join(output_dir, "curves.png")
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "plot_logs.py"),
                             stages["train"]["output_dir"], "-o", path],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return None, f"curves not drawn: {(result.stderr.strip().splitlines() or ['?'])[-1]}"
    return path, None


def number(value):
    return "–" if value is None else f"{value:.2f}"


def write_report(output_dir):
    """report.json and report.md of the chain in output_dir; returns the markdown."""
    state = read_state(output_dir)
    row = paper_rows.ROWS_BY_NAME[state["row"]]
    stages = state["stages"]
    if any(name.startswith("transfer_") for name in stages):
        transfer_dir = os.path.join(output_dir, "transfer")
        done = os.path.isdir(transfer_dir) and any(
            f"{name[9:]}.json" in os.listdir(transfer_dir) for name in stages
            if name.startswith("transfer_"))
        if done:  # results.md: the run's row beside the poster's
            subprocess.run([sys.executable, os.path.join(REPO_ROOT, "transfer_eval.py"),
                            "--collect", "--output-dir", transfer_dir], capture_output=True)
    measured = measured_metrics(stages, output_dir)
    metrics = []
    for metric in dict.fromkeys([*row.paper, *measured]):
        paper, value = row.paper.get(metric), measured.get(metric)
        difference = None if paper is None or value is None else value - paper
        metrics.append({"metric": metric, "measured": value, "paper": paper,
                        "difference": difference})
    stage_states = {}
    for name, stage in stages.items():
        value, detail = stage_state(stage)
        if name == "report":
            continue
        stage_states[name] = {"state": value, "detail": detail, "job_id": stage.get("job_id"),
                              "wall_seconds": wall_seconds(stage),
                              "command": " ".join(["python", stage["script"], *stage["argv"]])}
    provenance = training_provenance(stages, state.get("resources"))
    curves, curves_note = draw_curves(stages, output_dir)
    report = {"row": row.name, "title": row.title, "paper_command": row.command,
              "command": state["command"], "resources": state.get("resources"),
              "metrics": metrics, "stages": stage_states, "provenance": provenance,
              "curves": curves, "curves_note": curves_note,
              "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(os.path.join(output_dir, "report.json"), report)
    lines = [f"# {row.title} (`{row.name}`)", "",
             f"Paper's command: `{row.command}`", "",
             f"This chain: `{shlex.join(state['command'])}`", "",
             "| metric | measured | paper | difference |", "|---|---|---|---|"]
    for m in metrics:
        difference = "–" if m["difference"] is None else f"{m['difference']:+.2f}"
        lines.append(f"| {m['metric']} | {number(m['measured'])} | {number(m['paper'])} | "
                     f"{difference} |")
    lines += ["", "| stage | job | state | wall s | command |", "|---|---|---|---|---|"]
    for name, s in stage_states.items():
        detail = f" ({s['detail']})" if s["detail"] else ""
        wall = "–" if s["wall_seconds"] is None else f"{s['wall_seconds']:.0f}"
        lines.append(f"| {name} | {s['job_id'] or '-'} | {s['state']}{detail} | {wall} | "
                     f"`{s['command']}` |")
    lines += ["", "Provenance of the training: " + ", ".join(
        f"{key} {value}" for key, value in provenance.items() if value is not None), ""]
    lines.append(f"![training curves]({os.path.basename(curves)})" if curves else curves_note)
    markdown = "\n".join(lines) + "\n"
    write_atomically(os.path.join(output_dir, "report.md"), markdown)
    return markdown
