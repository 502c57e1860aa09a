"""Tests for emanet.models.backbone_weights: loading weight files into a ResNet, checking every key.

Loading tests use a resnet18 built on the meta device and moved to empty CPU storage (no slow init).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from emanet.models.backbone import ResNet, resnet18, resnet34, resnet50, resnet101
from emanet.models.backbone_weights import LoadReport, load_backbone_weights


def blank(**kwargs) -> ResNet:
    """A CPU resnet18 with uninitialised weights: loading tests overwrite them, so skip the slow init."""
    with torch.device("meta"):
        model = resnet18(**kwargs)
    return model.to_empty(device="cpu")


@pytest.fixture(scope="module")
def r18_state() -> dict[str, torch.Tensor]:
    """A resnet18 state dict in torchvision's key layout plus its fc classifier."""
    torch.manual_seed(0)
    sd = resnet18().state_dict()
    for v in sd.values():  # distinct values so a load that copies nothing would be caught
        if v.is_floating_point():
            v.normal_()
    sd["fc.weight"] = torch.randn(1000, 512)
    sd["fc.bias"] = torch.randn(1000)
    return sd


# ----------------------------------------------------------------------------- weight loading


def assert_loaded(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_load_torchvision_layout(tmp_path, r18_state, fmt):
    path = tmp_path / f"r18.{fmt}"
    if fmt == "pth":
        torch.save(r18_state, path)
    else:
        save_file(r18_state, str(path))
    model = blank(output_stride=8)  # dilation does not change the keys
    report = load_backbone_weights(model, path)
    assert report == LoadReport(missing=[], unexpected=[], ignored=["fc.weight", "fc.bias"])
    assert_loaded(model, r18_state)


def test_builder_weights_argument(tmp_path, r18_state):
    path = tmp_path / "r18.pth"
    torch.save(r18_state, path)
    assert_loaded(resnet18(weights=path), r18_state)


def test_load_wrapped_ddp_checkpoint(r18_state):
    wrapped = {"state_dict": {f"module.{k}": v for k, v in r18_state.items()}, "epoch": 3}
    model = blank()
    assert load_backbone_weights(model, wrapped).ignored == ["fc.weight", "fc.bias"]
    assert_loaded(model, r18_state)
    model = blank()
    load_backbone_weights(model, {"model": {f"backbone.{k}": v for k, v in r18_state.items()}}, prefix="backbone.")
    assert_loaded(model, r18_state)


def test_old_checkpoint_without_num_batches_tracked(r18_state):
    old = {k: v for k, v in r18_state.items() if not k.endswith("num_batches_tracked")}
    model = blank()
    report = load_backbone_weights(model, old)
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(model.layer2[0].bn1.running_var, old["layer2.0.bn1.running_var"])


def test_renamed_key_is_an_error(tmp_path, r18_state):
    sd = dict(r18_state)
    sd["layer2.0.conv1.weights"] = sd.pop("layer2.0.conv1.weight")
    path = tmp_path / "renamed.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="layer2.0.conv1.weight") as err:
        load_backbone_weights(blank(), path)
    msg = str(err.value)
    assert "renamed.pth" in msg and "layer2.0.conv1.weights" in msg and "strict=False" in msg


def test_shape_mismatch_is_always_an_error(r18_state):
    sd = dict(r18_state)
    sd["layer3.1.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"layer3\.1\.conv2\.weight.*\(256, 256, 1, 1\).*\(256, 256, 3, 3\)"):
            load_backbone_weights(blank(), sd, strict=strict)


@pytest.mark.parametrize(("file_stem", "marker"), [("deep", "conv1.0.weight"), ("v1c", "stem.0.weight")])
def test_wrong_stem_is_named(file_stem, marker):
    with torch.device("meta"):
        sd = resnet18(stem=file_stem).state_dict()
        model = blank()
    with pytest.raises(ValueError, match=f"'{file_stem}' stem checkpoint") as err:
        load_backbone_weights(model, sd)
    assert marker in str(err.value) and "stem='standard'" in str(err.value)


def test_wrong_depth_and_block_are_named():
    with torch.device("meta"):
        r50, r101, r34 = resnet50().state_dict(), resnet101(), resnet34()
    with pytest.raises(ValueError, match=r"\(3, 4, 6, 3\) blocks per stage, the model \(3, 4, 23, 3\)"):
        load_backbone_weights(r101, r50)
    with pytest.raises(ValueError, match="Bottleneck blocks, the model BasicBlock"):
        load_backbone_weights(r34, r50)


def test_non_strict_reports_missing(r18_state):
    sd = {k: v for k, v in r18_state.items() if not k.startswith("layer4.")}
    sd["extra.weight"] = torch.zeros(1)
    model = blank()
    with pytest.warns(UserWarning, match="missing keys"):
        report = load_backbone_weights(model, sd, strict=False)
    assert report.missing and all(k.startswith("layer4.") for k in report.missing)
    assert "layer4.1.bn2.running_mean" in report.missing
    assert report.unexpected == ["extra.weight"] and report.ignored == ["fc.weight", "fc.bias"]
    assert torch.equal(model.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])


def test_missing_file_and_bad_prefix(tmp_path, r18_state):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone_weights(blank(), tmp_path / "nope.pth")
    for name in ("cut.pth", "cut.safetensors"):  # damaged files: a message naming the file
        (tmp_path / name).write_bytes(b"\x00" * 40)
        with pytest.raises(ValueError, match=f"{name}: not a readable"):
            load_backbone_weights(blank(), tmp_path / name)
    with pytest.raises(ValueError, match="prefix='backbone.'"):
        load_backbone_weights(blank(), r18_state, prefix="backbone.")
    prefixed = {f"backbone.{k}": v for k, v in r18_state.items()}
    with pytest.raises(ValueError, match="pass prefix='backbone.'"):
        load_backbone_weights(blank(), prefixed)


def test_the_loader_stays_importable_from_the_backbone_module():
    # earlier code (and model folders' reader in pretrained.py) import these from emanet.models.backbone
    from emanet.models import backbone, backbone_weights

    assert backbone.load_backbone_weights is backbone_weights.load_backbone_weights
    assert backbone.LoadReport is backbone_weights.LoadReport
    assert backbone.read_weights_file is backbone_weights.read_weights_file
