"""common.load_backbone_weights: our training checkpoints, torchvision state dicts and the authors'
released MSF/CMSF layouts all load the exact backbone tensors; anything incomplete is a clear error."""
import argparse

import pytest
import torch

import common
from conftest import run_script, assert_usage_error

ARCH, SIZE = "resnet10", 16


def random_encoder(seed):
    torch.manual_seed(seed)
    encoder = common.build_encoder(ARCH, SIZE)
    for name, buffer in encoder.named_buffers():  # non-trivial BatchNorm statistics must load too
        if "running" in name:
            buffer.uniform_(0.5, 1.5)
    return encoder


def fresh_backbone():
    torch.manual_seed(123)
    return common.build_backbone(ARCH, SIZE)[0]


def assert_same_backbone(backbone, reference):
    expected = reference.state_dict()
    loaded = backbone.state_dict()
    assert loaded.keys() == expected.keys()
    for key in expected:
        assert torch.equal(loaded[key], expected[key]), key


def prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


def test_training_checkpoint_takes_the_online_backbone(tmp_path):
    online_encoder, target_encoder = random_encoder(0), random_encoder(1)
    online = torch.nn.Sequential(online_encoder, common.build_predictor(online_encoder))
    full = {"script": "train_msf.py", "args": {"arch": ARCH}, "epoch": 3, "iteration": 0,
            "online": online.state_dict(), "target": target_encoder.state_dict(),
            "optimizer": {"state": {}, "param_groups": []}, "memory_bank": {"embeddings": torch.randn(8, 4)}}
    weights_only = {"script": "train_msf.py", "args": {"arch": ARCH}, "epoch": 10,
                    "online": online.state_dict(), "target": target_encoder.state_dict()}
    for name, checkpoint in (("checkpoint.pth", full), ("checkpoint_0010.pth", weights_only)):
        torch.save(checkpoint, tmp_path / name)
        backbone = fresh_backbone()
        summary = common.load_backbone_weights(backbone, str(tmp_path / name))
        assert_same_backbone(backbone, online_encoder.backbone)
        assert f"loaded {len(backbone.state_dict())} backbone tensors" in summary
        assert "training checkpoint of train_msf.py" in summary and "online.0.backbone." in summary


def test_torchvision_state_dict_ignores_fc(tmp_path):
    encoder = random_encoder(2)
    state = dict(encoder.backbone.state_dict(), **{"fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)})
    torch.save(state, tmp_path / "tv.pth")
    backbone = fresh_backbone()
    summary = common.load_backbone_weights(backbone, str(tmp_path / "tv.pth"))
    assert_same_backbone(backbone, encoder.backbone)
    assert "torchvision state dict" in summary and "2 other tensors ignored" in summary


@pytest.mark.parametrize("entry,query_prefix,target_prefix", [
    ("state_dict", "encoder_q.module.", "encoder_t.module."),   # MSF: DataParallel inside the encoder
    ("state_dict", "module.encoder_q.", "module.encoder_k."),   # DataParallel around the whole model
    ("state_dict", "encoder_q.0.", "encoder_t.0."),             # encoder = Sequential(resnet, projection)
    ("model", "module.encoder.", None),                         # supervised CMSF-style single encoder
])
def test_released_checkpoint_layouts(tmp_path, entry, query_prefix, target_prefix):
    query, target = random_encoder(3), random_encoder(4)
    state = prefixed(query.backbone.state_dict(), query_prefix)
    if query_prefix.endswith("0."):  # the projection is the second module of the Sequential
        state.update(prefixed(query.projection.state_dict(), query_prefix[:-2] + "1."))
    else:  # resnet whose fc was replaced by the projection MLP
        state.update(prefixed(query.projection.state_dict(), query_prefix + "fc."))
    if target_prefix:
        state.update(prefixed(target.backbone.state_dict(), target_prefix))
    state.update({"module.predict_q.0.weight": torch.randn(4, 4), "queue": torch.randn(16, 4)})
    torch.save({"epoch": 200, entry: state, "optimizer": {"state": {}}}, tmp_path / "released.pth.tar")
    backbone = fresh_backbone()
    summary = common.load_backbone_weights(backbone, str(tmp_path / "released.pth.tar"))
    assert_same_backbone(backbone, query.backbone)
    assert f"prefix '{entry}.{query_prefix}'" in summary


def test_released_checkpoint_with_python_objects_and_old_batchnorm(tmp_path):
    """Released files may pickle an argparse Namespace (weights_only refuses it) and predate
    BatchNorm's num_batches_tracked counter."""
    query = random_encoder(5)
    state = {k: v for k, v in prefixed(query.backbone.state_dict(), "module.encoder_q.").items()
             if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state, "args": argparse.Namespace(arch="resnet50")}, tmp_path / "old.pth")
    backbone = fresh_backbone()
    summary = common.load_backbone_weights(backbone, str(tmp_path / "old.pth"))
    for key, value in query.backbone.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(backbone.state_dict()[key], value)
    assert "weights_only=False" in summary


def test_no_backbone_is_a_clear_error(tmp_path):
    encoder = random_encoder(6)
    torch.save({"state_dict": prefixed(encoder.projection.state_dict(), "module.projection.")}, tmp_path / "head.pth")
    with pytest.raises(common.UsageError, match=r"no backbone weights in .*head\.pth \(found keys like "
                                                r"state_dict\.module\.projection\.0\.weight"):
        common.load_backbone_weights(fresh_backbone(), str(tmp_path / "head.pth"))


def test_missing_and_misshapen_keys_are_clear_errors(tmp_path):
    encoder = random_encoder(7)
    state = prefixed(encoder.backbone.state_dict(), "module.encoder_q.")
    del state["module.encoder_q.layer4.0.conv2.weight"], state["module.encoder_q.layer4.0.bn2.bias"]
    torch.save({"state_dict": state}, tmp_path / "partial.pth")
    with pytest.raises(common.UsageError, match=r"partial\.pth misses 2 backbone weights .*layer4\.0\.conv2\.weight, "
                                                r"layer4\.0\.bn2\.bias"):
        common.load_backbone_weights(fresh_backbone(), str(tmp_path / "partial.pth"))
    # a 16 px (small-stem, 3x3 conv1) checkpoint into a 224 px backbone (7x7 conv1)
    torch.save(encoder.backbone.state_dict(), tmp_path / "small_stem.pth")
    with pytest.raises(common.UsageError, match=r"conv1\.weight has shape \(64, 3, 3, 3\) .* \(64, 3, 7, 7\).*--image-size"):
        common.load_backbone_weights(common.build_backbone(ARCH, 224)[0], str(tmp_path / "small_stem.pth"))
    with pytest.raises(common.UsageError, match="does not exist"):
        common.load_backbone_weights(fresh_backbone(), str(tmp_path / "absent.pth"))


def test_script_reports_a_file_without_backbone_in_one_line(tmp_path):
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(3, 3)}}, tmp_path / "empty.pth")
    result = run_script("eval_knn.py", "--dataset", "synthetic", "--synthetic-images", "16", "--arch", ARCH,
                        "--image-size", str(SIZE), "--workers", "0", "--weights", tmp_path / "empty.pth",
                        "--output-dir", tmp_path / "out")
    assert_usage_error(result, "no backbone weights in", "empty.pth")
