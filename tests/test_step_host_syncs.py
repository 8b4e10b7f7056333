"""No host synchronisation in a training step (outside print steps) of any trainer: nothing between
the loader and the optimizer step makes the CPU wait for the GPU. Counted on the CPU with
host_syncs (every call that WOULD wait on a GPU tensor), with the GPU code paths forced on."""
import signal

import pytest

import common
import train_cmsf_self
import train_cmsf_semi
import train_cmsf_sup
import train_msf
from host_syncs import host_syncs

CASES = {  # name: (module, extra flags)
    "msf": (train_msf, ["--topk", "3"]),
    "cmsf_self 2q": (train_cmsf_self, []),
    "cmsf_self kmeans": (train_cmsf_self, ["--constraint", "kmeans", "--num-clusters", "4"]),
    "cmsf_sup": (train_cmsf_sup, ["--label-noise", "0.25"]),
    "cmsf_sup top-all": (train_cmsf_sup, ["--topk", "0"]),
    "cmsf_sup xent": (train_cmsf_sup, ["--loss", "xent"]),
    "cmsf_semi": (train_cmsf_semi, ["--labeled-fraction", "0.25", "--threshold", "0.3",
                                    "--pseudo-batch-size", "16"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_has_no_host_sync(tmp_path, monkeypatch, case):
    module, extra = CASES[case]
    monkeypatch.setattr(train_cmsf_self, "bf16_matmul_is_fast", lambda device_type: True)
    recorded, calls = [], []
    original = common.MetricLogger.log_every

    def log_every(self, loader, start_iter=0):
        calls.append(1)
        for it, batch in original(self, loader, start_iter):
            if len(calls) == 2 and it == 0:  # epoch 2 (constraints and pseudo-labels active), step 1
                with host_syncs() as syncs:
                    yield it, batch  # the step runs while the generator waits here
                recorded.append(list(syncs))
            else:
                yield it, batch

    monkeypatch.setattr(common.MetricLogger, "log_every", log_every)
    argv = ["--dataset", "synthetic", "--synthetic-images", "64", "--arch", "resnet10", "--image-size", "16",
            "--batch-size", "16", "--mem-bank-size", "48", "--workers", "0", "--print-freq", "100",
            "--epochs", "2", "--knn-every", "0", "--output-dir", str(tmp_path), *extra]
    try:
        module.main(module.get_args_parser().parse_args(argv))
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert len(recorded) == 1  # the step was observed
    assert recorded[0] == [], recorded[0]
