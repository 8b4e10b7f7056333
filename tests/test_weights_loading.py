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


def test_python_objects_need_unsafe_load_and_old_batchnorm_loads(tmp_path):
    """Released files may pickle an argparse Namespace (weights_only refuses it): refused with a
    one-line error by default, loaded with unsafe_load=True; they may predate num_batches_tracked."""
    query = random_encoder(5)
    state = {k: v for k, v in prefixed(query.backbone.state_dict(), "module.encoder_q.").items()
             if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state, "args": argparse.Namespace(arch="resnet50")}, tmp_path / "old.pth")
    with pytest.raises(common.UsageError, match="pickles Python objects.*--unsafe-load"):
        common.load_backbone_weights(fresh_backbone(), str(tmp_path / "old.pth"))
    backbone = fresh_backbone()
    common.load_backbone_weights(backbone, str(tmp_path / "old.pth"), unsafe_load=True)
    for key, value in query.backbone.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(backbone.state_dict()[key], value)
    result = run_script("eval_knn.py", "--dataset", "synthetic", "--synthetic-images", "16", "--arch", ARCH,
                        "--image-size", str(SIZE), "--workers", "0", "--weights", tmp_path / "old.pth",
                        "--output-dir", tmp_path / "out")
    assert_usage_error(result, "pickles Python objects", "--unsafe-load")
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are checked
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(common.UsageError, match="damaged or not a PyTorch checkpoint"):
        common.load_backbone_weights(fresh_backbone(), str(tmp_path / "garbage.pth"), unsafe_load=True)


def test_larger_resnet_into_smaller_arch_names_the_leftovers(tmp_path):
    """Strict the other way: a resnet18 file into --arch resnet10 leaves layerN.1.* unused: an error."""
    torch.manual_seed(8)
    resnet18 = common.build_backbone("resnet18", SIZE)[0]
    online = {"0.backbone." + k: v for k, v in resnet18.state_dict().items()}
    torch.save({"script": "train_msf.py", "args": {"arch": "resnet18", "image_size": SIZE}, "online": online},
               tmp_path / "r18.pth")
    torch.save(resnet18.state_dict(), tmp_path / "r18_torchvision.pth")
    leftovers = len([k for k in resnet18.state_dict() if k not in fresh_backbone().state_dict()])
    assert leftovers > 4
    for name, prefix in (("r18.pth", "online.0.backbone."), ("r18_torchvision.pth", "")):
        with pytest.raises(common.UsageError) as error:
            common.load_backbone_weights(fresh_backbone(), str(tmp_path / name))
        message = str(error.value)
        assert f"holds {leftovers} backbone tensors under prefix '{prefix}'" in message
        assert f"{prefix}layer1.1.conv1.weight" in message and f"and {leftovers - 4} more" in message
    result = run_script("eval_knn.py", "--dataset", "synthetic", "--synthetic-images", "16", "--workers", "0",
                        "--arch", "resnet10", "--weights", tmp_path / "r18_torchvision.pth",
                        "--image-size", str(SIZE), "--output-dir", tmp_path / "out")
    assert_usage_error(result, "backbone tensors under prefix", "layer1.1.conv1.weight", "--arch")


def test_arch_and_image_size_come_from_our_checkpoint():
    ours = {"script": "train_msf.py", "args": {"arch": "resnet18", "image_size": 32}}
    assert common.resolve_arch_and_image_size(ours, "c.pth", None, None) == ("resnet18", 32)
    assert common.resolve_arch_and_image_size(ours, "c.pth", "resnet18", 32) == ("resnet18", 32)
    assert common.resolve_arch_and_image_size({"conv1.weight": None}, "tv.pth", None, None) == ("resnet50", 224)
    assert common.resolve_arch_and_image_size({}, None, "resnet10", 16) == ("resnet10", 16)
    with pytest.raises(common.UsageError, match="--arch resnet10 contradicts c.pth, trained with --arch resnet18"):
        common.resolve_arch_and_image_size(ours, "c.pth", "resnet10", None)
    with pytest.raises(common.UsageError, match="--image-size 64 contradicts c.pth, trained with --image-size 32"):
        common.resolve_arch_and_image_size(ours, "c.pth", None, 64)


def test_scripts_read_arch_and_image_size_and_refuse_contradictions(tmp_path, tiny_msf_run):
    output_dir, _ = tiny_msf_run  # resnet10, 16 px
    checkpoint = output_dir / "checkpoint.pth"
    knn = run_script("eval_knn.py", "--dataset", "synthetic", "--synthetic-images", "32", "--workers", "0",
                     "--k", "1", "--weights", checkpoint, "--output-dir", tmp_path / "knn")
    assert knn.returncode == 0, knn.stderr[-3000:]
    assert "eval_knn.py: resnet10 16px" in knn.stdout
    for script in ("eval_knn.py", "eval_linear.py"):
        result = run_script(script, "--dataset", "synthetic", "--synthetic-images", "32", "--workers", "0",
                            "--arch", "resnet18", "--weights", checkpoint, "--output-dir", tmp_path / "bad")
        assert_usage_error(result, "--arch resnet18 contradicts", "--arch resnet10")
    result = run_script("transfer_eval.py", "--image-size", "32", "--weights", checkpoint, "--data-root", tmp_path,
                        "--datasets", "dtd", "--output-dir", tmp_path / "bad", "--device", "cpu")
    assert_usage_error(result, "--image-size 32 contradicts", "--image-size 16")
    assert not (tmp_path / "bad").exists()


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
