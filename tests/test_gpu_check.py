"""tools/gpu_check.py on the CPU at tiny sizes, so that the GPU check cannot rot: every row runs
and reports real values (finite first losses equal to the CPU float32 reference's, images/s,
Ghost BatchNorm differences within tolerance), a broken row fails with one line while the others
pass, the time limit leaves rows "not reached", and bad input is one error line."""
import importlib.util
import json
import math
import os

import pytest

import common
from conftest import REPO_ROOT


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "tools",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load_tool("gpu_check")
TINY = ["--device", "cpu", "--arch", "resnet10", "--image-size", "8", "--batch-size", "8",
        "--steps", "1", "--precisions", "fp32"]


def read_report(folder):
    with open(os.path.join(folder, "gpu_check.json")) as f:
        record = json.load(f)
    with open(os.path.join(folder, "gpu_check.md")) as f:
        markdown = f.read()
    return record, {row["name"]: row for row in record["rows"]}, markdown


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One tiny CPU run with two rows broken on purpose: the k-NN search raises, and an extra MSF
    variant has a flag the script rejects."""
    folder = tmp_path_factory.mktemp("gpu_check")
    patch = pytest.MonkeyPatch()
    broken = ("msf broken", "train_msf.py", ["--mem-bank-size", "{msf_bank}", "--topk", "0"], 1)
    patch.setattr(gpu_check, "TRAINERS", gpu_check.TRAINERS + [broken])

    def failing_knn_predict(*args, **kwargs):
        raise RuntimeError("deliberately broken search")

    patch.setattr(common, "knn_predict", failing_knn_predict)
    try:
        code = gpu_check.main(TINY + ["--output-dir", str(folder), "--time-limit", "10"])
    finally:
        patch.undo()
    return code, read_report(folder)


def test_every_trainer_variant_runs_and_matches_its_cpu_reference(cpu_run):
    code, (record, rows, markdown) = cpu_run
    assert code == 1  # the two broken rows
    assert record["not_reached"] == [] and record["device"] == "cpu"
    for name, script, flags, epochs in gpu_check.TRAINERS:
        row, reference = rows[f"{name} fp32"], rows[f"{name} cpu fp32 reference"]
        assert row["device"] == "cpu" and row["batch_per_gpu"] == 8
        assert row["status"] == "passed" and reference["status"] == "passed", (row, reference)
        assert math.isfinite(row["first_loss"]) and 0 < row["first_loss"] < 4
        # float32 with the same pinned kernels: the same bits as the separate reference run
        assert row["first_loss"] == reference["first_loss"] == row["reference_loss"]
        assert row["loss_check"] == "exact" and row["loss_difference"] == 0
        assert row["images_per_second_per_gpu"] > 0 and row["data_ms_per_iteration"] >= 0
        # 1 step per epoch; 2q and kmeans reach epoch 2, where the constraint is active
        assert row["iterations"] == epochs and reference["iterations"] == 1
        assert f"| {name} fp32 | cpu | passed | 8 |" in markdown
    losses = {rows[f"{name} fp32"]["first_loss"] for name, *_ in gpu_check.TRAINERS}
    assert len(losses) >= 6  # the variants compute different losses, not one number repeated


def test_broken_rows_fail_with_one_line_and_the_others_pass(cpu_run):
    code, (record, rows, markdown) = cpu_run
    failed = {name for name, row in rows.items() if row["status"] != "passed"}
    assert failed == {"msf broken fp32", "msf broken cpu fp32 reference", "eval_knn search"}
    for name in ("msf broken fp32", "msf broken cpu fp32 reference"):
        assert "exit code 2: error: --topk 0" in rows[name]["error"], rows[name]["error"]
    assert rows["eval_knn search"]["error"].startswith(
        "RuntimeError: deliberately broken search at tests/test_gpu_check.py:")
    assert all("\n" not in (row.get("error") or "") for row in rows.values())


def test_checks_report_their_measurements(cpu_run):
    _, (record, rows, _) = cpu_run
    for dtype, eps in (("bf16", 2 ** -7), ("fp16", 2 ** -10)):
        differences = rows[f"ghost BN {dtype}: 256 = 4 x 64"]["max_relative_difference"]
        assert set(differences) == {"output", "input gradient", "weight gradient",
                                    "running mean", "running var"}
        assert all(0 <= value <= 2 * eps for value in differences.values()), differences
    assert rows["ghost BN 2 processes = 1"]["max_difference"] <= 1e-9
    assert "gloo" in rows["ghost BN 2 processes = 1"]["result"]
    loader = rows["loader: device half vs worker side"]
    assert loader["device_images_per_second"] > 0
    assert loader["worker_images_per_second_per_core"] > 0
    kmeans = rows["CMSF-KM k-means epoch"]
    assert kmeans["seconds_per_epoch"] > 0 and kmeans["clusters_used"] >= 2
    assert rows["transfer_eval L-BFGS fit"]["gradient"] <= 1e-4
    for name in ("eval_knn", "eval_linear linear", "eval_linear semi"):
        assert rows[name]["status"] == "passed" and rows[name]["features_images_per_second"] > 0
    assert "1-NN / 20-NN" in rows["eval_knn"]["result"]
    assert "backbone unchanged: True" in rows["eval_linear linear"]["result"]
    assert record["sizes"]["msf_bank"] == 256 and record["sizes"]["cmsf_bank"] == 32


def test_time_limit_stops_the_running_script_and_leaves_the_rest_not_reached(tmp_path,
                                                                             monkeypatch):
    """Only the script rows (one runner process on the CPU), 3 seconds: the runner is killed at the
    limit, the run it was in is "stopped", the later ones are "not reached"."""
    build_rows = gpu_check.build_rows
    monkeypatch.setattr(gpu_check, "build_rows",
                        lambda config: [r for r in build_rows(config) if r["kind"] != "check"])
    code = gpu_check.main(TINY + ["--output-dir", str(tmp_path), "--time-limit", "0.05"])
    record, rows, markdown = read_report(tmp_path)
    statuses = [row["status"] for row in record["rows"]]
    assert code == 1 and statuses.count("stopped") == 1, statuses
    stopped = statuses.index("stopped")
    assert set(statuses[:stopped]) <= {"passed"} and set(statuses[stopped + 1:]) == {"not reached"}
    assert record["rows"][stopped]["error"] == "stopped at the time limit"
    trainer_rows = [f"{name} fp32" for name, *_ in gpu_check.TRAINERS]
    assert set(trainer_rows) <= set(record["not_reached"])  # 3 s cannot reach them
    assert all("first_loss" not in rows[name] for name in record["not_reached"])
    assert 3 <= record["elapsed_s"] < 3 + 10  # killed at the limit, not at the end of its work
    assert "Not reached within the time limit: " in markdown


def test_runner_names_the_line_of_a_host_sync():
    runner = load_tool("gpu_check_runner")
    try:
        raise RuntimeError("called a synchronizing CUDA operation")  # torch's message
    except RuntimeError as error:
        line = runner.error_line(error)
    assert line.startswith("host sync at tests/test_gpu_check.py:")
    assert "raise RuntimeError" in line


@pytest.mark.parametrize("argv, fragment", [
    (["--device", "tpu"], "--device tpu"), (["--device", "cpu", "--steps", "0"], "--steps 0"),
    (["--device", "cpu", "--data", "/nonexistent"], "no train/ folder"),
    (["--device", "cpu", "--time-limit", "-1"], "--time-limit -1")])
def test_bad_input_is_one_error_line(tmp_path, capsys, argv, fragment):
    assert gpu_check.main(argv + ["--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "out").exists()


def test_data_without_images_is_one_error_line(tmp_path, capsys):
    (tmp_path / "data" / "train" / "empty_class").mkdir(parents=True)
    argv = ["--device", "cpu", "--data", str(tmp_path / "data"), "--output-dir",
            str(tmp_path / "out")]
    assert gpu_check.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "class folder" in err[0], err
    assert not (tmp_path / "out").exists()
