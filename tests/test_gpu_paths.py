"""GPU code paths checked on the CPU: the precision each kind of hardware gets, rank discovery that
fails at once instead of hanging, --device parsing, and the host synchronisations of the neighbour
search and the cross-rank shuffle (none allowed: each makes the CPU wait for the GPU's queue)."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import REPO_ROOT, assert_usage_error, run_script
from host_syncs import host_syncs

DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                  "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID",
                  "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_STEP_NODELIST",
                  "SLURM_JOB_NODELIST")


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---------------------------------------------------------------- precision by hardware

@pytest.fixture
def gpu_capability(monkeypatch):
    """Pretend a CUDA GPU of a given compute capability is present."""
    def set_capability(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    return set_capability


@pytest.mark.parametrize("capability, expected", [
    ((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16),
    ((7, 0), torch.float16)])
def test_default_amp_follows_native_bf16(gpu_capability, capability, expected):
    gpu_capability(capability)
    cuda = torch.device("cuda", 0)
    assert common.amp_dtype(None, cuda) is expected
    assert common.amp_dtype("fp16", cuda) is torch.float16
    assert common.amp_dtype("none", cuda) is None
    assert common.amp_name(common.amp_dtype(None, cuda)) == str(expected).removeprefix("torch.")


def test_bf16_on_a_gpu_without_native_bf16_is_a_usage_error(gpu_capability, monkeypatch):
    gpu_capability((7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    with pytest.raises(common.UsageError, match=r"compute capability 7\.0.*--amp fp16"):
        common.amp_dtype("bf16", torch.device("cuda", 0))
    gpu_capability((8, 6))
    assert common.amp_dtype("bf16", torch.device("cuda", 0)) is torch.bfloat16


def test_cpu_defaults_to_float32_and_takes_what_is_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: pytest.fail("asked a GPU"))
    cpu = torch.device("cpu")
    assert common.amp_dtype(None, cpu) is None and common.amp_name(None) == "off"
    assert common.amp_dtype("bf16", cpu) is torch.bfloat16 and common.amp_dtype("none", cpu) is None
    with pytest.raises(common.UsageError, match="expected bf16, fp16 or none"):
        common.amp_dtype("fp8", cpu)


# ---------------------------------------------------------------- rank discovery and --device

@pytest.fixture
def clean_env(monkeypatch):
    """No distributed variables during the test, and none left after it: the code under test sets
    some in os.environ itself, which monkeypatch would not undo."""
    saved = {name: os.environ.get(name) for name in DIST_VARIABLES}
    for name in DIST_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_sbatch_shell_without_srun_step_is_one_process(clean_env):
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_JOB_NODELIST", "node[1-2]")
    assert common.init_distributed("cpu") == torch.device("cpu")
    assert common.get_world_size() == 1 and "WORLD_SIZE" not in os.environ


def test_srun_step_sets_torch_variables(clean_env):
    for name, value in dict(SLURM_NTASKS="4", SLURM_STEP_NUM_TASKS="4", SLURM_STEP_ID="2",
                            SLURM_PROCID="3", SLURM_LOCALID="1", SLURM_JOB_ID="1234",
                            MASTER_ADDR="nodeA").items():
        clean_env.setenv(name, value)
    common._slurm_to_torch_env()
    assert [os.environ[name] for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")] == ["3", "4", "1"]
    assert os.environ["MASTER_ADDR"] == "nodeA"
    assert os.environ["MASTER_PORT"] == str(20000 + 1234 * 7 + 2)
    assert common._check_torch_env() == (3, 4)


def test_srun_step_without_scontrol_is_a_usage_error(clean_env):
    for name, value in dict(SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="0",
                            SLURM_STEP_NODELIST="n[1-2]", PATH="/nonexistent").items():
        clean_env.setenv(name, value)
    with pytest.raises(common.UsageError, match="export MASTER_ADDR"):
        common._slurm_to_torch_env()


@pytest.mark.parametrize("env, message", [
    (dict(WORLD_SIZE="4", RANK="0", SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="2", MASTER_ADDR="a",
          MASTER_PORT="1"), "runs 2 task"),
    (dict(WORLD_SIZE="2", RANK="2", MASTER_ADDR="a", MASTER_PORT="1"), "RANK=2 but WORLD_SIZE=2"),
    (dict(WORLD_SIZE="2", MASTER_ADDR="a", MASTER_PORT="1"), "set both"),
    (dict(WORLD_SIZE="2", RANK="1"), "MASTER_ADDR and MASTER_PORT not set"),
    (dict(WORLD_SIZE="two", RANK="1"), "not an integer"),
])
def test_contradictory_worlds_are_usage_errors_not_waits(clean_env, env, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(common.UsageError, match=message):
        common.init_distributed("cpu")


def test_torchrun_under_srun_may_run_more_processes_than_tasks(clean_env):
    for name, value in dict(WORLD_SIZE="8", RANK="5", SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="1",
                            TORCHELASTIC_RUN_ID="x", MASTER_ADDR="a", MASTER_PORT="1").items():
        clean_env.setenv(name, value)
    assert common._check_torch_env() == (5, 8)


def test_device_argument(monkeypatch):
    assert common.select_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cuda0", "mps"):
        with pytest.raises(common.UsageError, match="expected auto, cpu, cuda or cuda:N"):
            common.select_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.select_device("auto") == torch.device("cpu") == common.select_device(None)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(common.UsageError, match="no CUDA GPU visible; use --device cpu"):
            common.select_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert common.select_device("auto", local_rank=3) == torch.device("cuda", 1)
    assert common.select_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(common.UsageError, match="2 CUDA GPU"):
        common.select_device("cuda:2")
    with pytest.raises(common.UsageError, match="use --device cuda"):
        common.select_device("cuda:0", world_size=2)


def test_cuda_without_gpu_is_a_usage_error_from_init_distributed(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(common.UsageError, match="no CUDA GPU visible"):
        common.init_distributed("cuda")


def test_eval_knn_in_sbatch_shell_runs_as_one_process(tmp_path):
    """`python eval_knn.py` in an sbatch script with --ntasks 8 and no srun: one process that
    finishes."""
    argv = ["--dataset", "synthetic", "--synthetic-images", "64", "--arch", "resnet10",
            "--image-size", "16", "--batch-size", "16", "--workers", "0", "--k", "1", "3",
            "--output-dir", tmp_path / "out"]
    env = {"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "n[1-8]"}
    result = run_script("eval_knn.py", *argv, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "knn_results.json").is_file()
    bad = run_script("eval_knn.py", *argv, "--device", "cuda:x", env=env, timeout=240)
    assert_usage_error(bad, "--device cuda:x")


# ---------------------------------------------------------------- host synchronisations

def test_host_syncs_sees_each_kind_of_sync():
    x = torch.arange(6.0)
    with host_syncs() as syncs:
        x.sum().item()
        x[x > 2]
        x.nonzero()
        if x.any():
            pass
        x.to("cpu")
        x.tolist()
        x[torch.tensor(1)]
        x[torch.tensor([1, 2])]  # a long index tensor: no sync
        x.to(torch.float64)  # a dtype, not a device: no sync
    kinds = [entry.split(" ", 1)[1] for entry in syncs]
    mask_index = "indexing with a bool mask or 0-d tensor"
    assert kinds == [".item()", mask_index, ".nonzero()", "bool(tensor)", ".to(cpu)", ".tolist()",
                     mask_index], syncs
    assert all(entry.startswith("test_gpu_paths.py:") for entry in syncs)
    assert torch.Tensor.item is not None and x.sum().item() == 15.0  # patches removed


@pytest.mark.parametrize("path", ["float32", "bfloat16-scores", "labels"])
def test_knn_search_has_no_host_sync(path):
    queries, keys = unit(16, 32, seed=1), unit(700, 32, seed=2)
    labels = torch.arange(16) % 4 - 1 if "labels" in path else None
    key_labels = torch.arange(700) % 3 if "labels" in path else None
    search_dtype = torch.bfloat16 if path == "bfloat16-scores" else None
    with host_syncs() as syncs:
        sims, idx, valid = common.knn_search(queries, keys, 5, chunk_size=256, query_labels=labels,
                                             key_labels=key_labels, search_dtype=search_dtype)
    assert syncs == []
    exact = queries.double() @ keys.double().T
    if labels is not None:
        allowed = (labels.unsqueeze(1) == key_labels.unsqueeze(0)) | (labels.unsqueeze(1) < 0)
        exact = exact.masked_fill(~allowed, -math.inf)
    if search_dtype is None:
        assert torch.equal(idx, exact.topk(5, dim=1).indices) and valid.all()


def test_batch_shuffle_draws_on_the_device_without_host_sync(monkeypatch):
    """Two ranks simulated in one process: the permutation is drawn on x's device by a generator on
    that device, the same as a fresh draw from (seed, step), and shuffle + unshuffle is the
    identity."""
    rank_rows = {0: torch.arange(0.0, 4.0).unsqueeze(1), 1: torch.arange(4.0, 8.0).unsqueeze(1)}
    monkeypatch.setattr(common, "get_world_size", lambda: 2)
    monkeypatch.setattr(common, "all_gather", lambda t: torch.cat([t, t + 4]))
    draws = []
    randperm = torch.randperm

    def recording_randperm(n, generator=None, device=None, **kwargs):
        draws.append((generator.device, device))
        return randperm(n, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch, "randperm", recording_randperm)
    monkeypatch.setattr(common, "get_rank", lambda: 0)
    with host_syncs() as syncs:
        shuffled, unshuffle_index = common.batch_shuffle(rank_rows[0], seed=3, step=11)
    assert syncs == [] and draws == [(torch.device("cpu"), torch.device("cpu"))]
    expected = randperm(8, generator=torch.Generator().manual_seed(3 * 1_000_003 + 11))
    assert torch.equal(shuffled[:, 0].long(), expected[:4])
    torch.testing.assert_close(unshuffle_index, torch.argsort(expected))
    # the target outputs: each rank computed on the images it was dealt (here: their ids)
    outputs = expected.float().unsqueeze(1)
    monkeypatch.setattr(common, "all_gather", lambda t: torch.cat([t, outputs[4:]]))
    with host_syncs() as syncs:
        back = common.batch_unshuffle(outputs[:4], unshuffle_index)
    assert syncs == [] and torch.equal(back, rank_rows[0])  # rank 0 gets its own images back


def test_launcher_task_goes_through_the_error_wrapper(tmp_path, monkeypatch, capsys):
    """A submitit task (slurm/submit.py's Trainer) runs the script's main through the same wrapper as
    a direct run: bad input is one `error:` line and exit code 2, not a traceback in the SLURM log."""
    import importlib.util
    import types
    import submitit
    spec = importlib.util.spec_from_file_location("submit", os.path.join(REPO_ROOT, "slurm", "submit.py"))
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    paths = types.SimpleNamespace(result_pickle=tmp_path / "result.pkl")
    fake_env = types.SimpleNamespace(job_id="123", global_rank=0, num_tasks=1, num_nodes=1, paths=paths)
    monkeypatch.setattr(submitit, "JobEnvironment", lambda: fake_env)
    monkeypatch.setattr(submitit.helpers.TorchDistributedEnvironment, "__init__", lambda self: None)
    monkeypatch.setattr(submitit.helpers.TorchDistributedEnvironment, "export", lambda self, **kw: self)
    script = os.path.join(REPO_ROOT, "train_msf.py")
    module = submit.import_script(script)
    args = module.get_args_parser().parse_args(
        ["--dataset", "synthetic", "--epochs", "0", "--output-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stop:
        submit.Trainer(script, args)()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --epochs 0") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
