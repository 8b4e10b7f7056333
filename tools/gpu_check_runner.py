"""Runs repository scripts in this process, as `python script.py args` would, with the probes of
tools/gpu_check.py around each training step; one JSON result per run (and per rank).

    python tools/gpu_check_runner.py PLAN.json        (torchrun: one process per GPU)

PLAN.json is a list of runs, each {"name", "script", "argv", "result"} plus, for a training
script, {"iters_per_epoch", "print_freq", "stop_after", "timed_from"}. For those the probes:
- on CUDA, torch.cuda.set_sync_debug_mode("error") during every iteration that is not a print
  step (print steps read values on purpose), so any host sync raises where it happens;
- the loss of the first iteration (the first `loss` given to MetricLogger.update), read at the end;
- iterations [timed_from, stop_after) timed between two device synchronisations (outside the
  checked windows), with the time spent waiting for the loader;
- torch.cuda.max_memory_allocated at the end;
- after `stop_after` iterations the script is left at once (no checkpoint is written).
A run that fails records one line (its error and where it happened) and the next run starts.
"""
import json
import os
import runpy
import sys
import time
import traceback

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

import common  # noqa: E402

TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


class IterationsDone(Exception):
    """The planned iterations ran: leave the script before its epoch tail."""


def synchronize():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def set_sync_check(on):
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_sync_debug_mode("error" if on else 0)


def where(error):
    """'file:line `code`' of the innermost frame of `error` in the repository (not torch), and the
    torch frame below it, if any."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if os.path.abspath(f.filename).startswith(REPO_ROOT)
            and os.path.abspath(f.filename) != os.path.abspath(__file__)]
    inner = [f for f in frames if os.path.abspath(f.filename).startswith(TORCH_DIR)]
    text = ""
    if ours:
        frame = ours[-1]
        text = f"{os.path.relpath(frame.filename, REPO_ROOT)}:{frame.lineno} `{frame.line}`"
    if inner:
        frame = inner[-1]
        text += f" (in torch/{os.path.relpath(frame.filename, TORCH_DIR)}:{frame.lineno})"
    return text


def error_line(error):
    message = str(error).strip().splitlines()
    message = message[-1] if message else type(error).__name__
    if "synchroniz" in message:
        return f"host sync at {where(error)}: {message[:160]}"
    return f"{type(error).__name__}: {message[:240]} at {where(error)}"


def probe(plan, state):
    """Wrap common.MetricLogger.log_every and update for one training run; returns the undo."""
    original_log_every, original_update = common.MetricLogger.log_every, common.MetricLogger.update
    iters, print_freq = plan["iters_per_epoch"], plan["print_freq"]
    timed_from = plan.get("timed_from")

    def log_every(self, loader, start_iter=0):
        batches = original_log_every(self, loader, start_iter)
        while True:
            done = state["iterations"]
            if done == timed_from:
                synchronize()
                state["timed_start"] = time.perf_counter()
            if done == plan["stop_after"]:
                synchronize()
                state["timed_end"] = time.perf_counter()
                raise IterationsDone
            waited = time.perf_counter()
            try:
                it, batch = next(batches)
            except StopIteration:
                return
            if timed_from is not None and done >= timed_from:
                state["data_seconds"] += time.perf_counter() - waited
            state["iterations"] += 1
            print_step = (it + 1) % print_freq == 0 or it + 1 == iters
            set_sync_check(not print_step)
            try:
                yield it, batch
            finally:
                set_sync_check(False)

    def update(self, **values):
        if state["first_loss"] is None and "loss" in values:
            state["first_loss"] = values["loss"].detach().clone()  # read at the end: no sync now
        return original_update(self, **values)

    common.MetricLogger.log_every, common.MetricLogger.update = log_every, update

    def undo():
        common.MetricLogger.log_every, common.MetricLogger.update = (original_log_every,
                                                                     original_update)
    return undo


def probe_features(state):
    """Time common.extract_features (the evaluations' feature pass): images and seconds."""
    original = getattr(common, "extract_features", None)
    if original is None:  # renamed: the row then reports no feature rate, nothing else changes
        return lambda: None

    def extract_features(backbone, dataset, *args, **kwargs):
        synchronize()
        start = time.perf_counter()
        out = original(backbone, dataset, *args, **kwargs)
        synchronize()
        state["feature_seconds"] += time.perf_counter() - start
        state["feature_images"] += len(dataset)
        return out

    common.extract_features = extract_features

    def undo():
        common.extract_features = original
    return undo


def run_one(plan):
    training = "stop_after" in plan
    state = {"iterations": 0, "first_loss": None, "data_seconds": 0.0, "timed_start": None,
             "timed_end": None, "feature_seconds": 0.0, "feature_images": 0}
    result = {"name": plan["name"], "status": "passed", "error": None}
    undo = probe(plan, state) if training else probe_features(state)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    argv0, streams = sys.argv, (sys.stdout, sys.stderr)
    sys.argv = [plan["script"], *plan["argv"]]
    rank = int(os.environ.get("RANK", 0))
    log = open(plan["log"] + (f".rank{rank}" if rank else ""), "w")
    sys.stdout = sys.stderr = log  # the script's lines, its `error:` line included
    start = time.perf_counter()
    try:
        runpy.run_path(os.path.join(REPO_ROOT, plan["script"]), run_name="__main__")
        if training:
            result.update(status="failed", error=f"the script ended after {state['iterations']} "
                                                 f"of {plan['stop_after']} iterations")
    except IterationsDone:
        pass
    except SystemExit as stop:  # the script's own exit: its `error:` line says why
        if stop.code not in (0, None):
            result.update(status="failed", error=f"exit code {stop.code}")
    except BaseException as error:  # noqa: B036 - any failure is this run's result, not ours
        set_sync_check(False)
        result.update(status="failed", error=error_line(error))
        traceback.print_exc()
        if isinstance(error, KeyboardInterrupt):
            raise
    finally:
        sys.argv, (sys.stdout, sys.stderr) = argv0, streams
        log.close()
        undo()
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["iterations"] = state["iterations"]
    if state["first_loss"] is not None:
        result["first_loss"] = float(state["first_loss"])
    timed = plan["stop_after"] - plan["timed_from"] if plan.get("timed_from") is not None else 0
    if timed > 0 and state["timed_end"] is not None:
        result["timed_iterations"] = timed
        result["seconds_per_iteration"] = (state["timed_end"] - state["timed_start"]) / timed
        result["data_seconds_per_iteration"] = state["data_seconds"] / timed
    if state["feature_seconds"] > 0:
        result["features_images_per_second"] = state["feature_images"] / state["feature_seconds"]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        result["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
    return result


def run_ghost_bn(plan):
    """gpu_check's 2-process Ghost BatchNorm row: both ranks (the second one forked)."""
    import gpu_check
    start, streams = time.perf_counter(), (sys.stdout, sys.stderr)
    with open(plan["log"], "w") as log:
        sys.stdout = sys.stderr = log
        try:
            code = gpu_check.ghost_bn_worker(plan["ghost_bn"], plan["device"], plan["port"])
        finally:
            sys.stdout, sys.stderr = streams
    error = None if code == 0 else f"a rank failed: {gpu_check.last_error_line(plan['log'])}"
    return {"name": plan["name"], "status": "passed" if code == 0 else "failed", "error": error,
            "seconds": round(time.perf_counter() - start, 2)}


def main():
    if len(sys.argv) != 2 or not os.path.isfile(sys.argv[1]):
        print("error: usage: python tools/gpu_check_runner.py PLAN.json (tools/gpu_check.py "
              "writes the plan and runs this)", file=sys.stderr)
        return 2
    with open(sys.argv[1]) as f:
        plans = json.load(f)
    rank = int(os.environ.get("RANK", 0))
    failed = False
    for plan in plans:
        result = run_ghost_bn(plan) if "ghost_bn" in plan else run_one(plan)
        failed = failed or result["status"] != "passed"
        with open(plan["result"] + (f".rank{rank}" if rank else ""), "w") as f:
            json.dump(result, f)
        print(f"[gpu_check_runner] {plan['name']}: {result['status']}"
              + (f" ({result['error']})" if result["error"] else ""), flush=True)
    return 1 if failed else 0  # under torchrun a failed rank stops the others


if __name__ == "__main__":
    sys.exit(main())
