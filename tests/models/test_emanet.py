"""EMANet assembly, builders and ModelConfig."""

from __future__ import annotations

import typing

import pytest
import torch

import emanet
from emanet.errors import ConfigError
from emanet.models.backbone import RESNETS
from emanet.models.em import EMAUnit
from emanet.models.emanet import (
    MODELS,
    ModelConfig,
    ModelOverrides,
    SegmentationModel,
    build_model,
    emanet_resnet101,
    fcn_resnet50,
    layer4_dilations,
)
from emanet.models.heads import NonLocal2d
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(backbone_width=16)  # changes to conftest's tiny model


class ModelTester:
    """What every architecture must do (segmentation_models_pytorch's base-tester pattern): each subclass
    names its ``arch``; the tests run over head layout x auxiliary head x stem."""

    arch: str

    @pytest.fixture(params=["reference", "mmseg"])
    def layout(self, request):
        return request.param

    @pytest.fixture(params=[False, True], ids=["no-aux", "aux"])
    def aux(self, request):
        return request.param

    @pytest.fixture(params=["standard", "deep", "v1c"])
    def stem(self, request):
        return request.param

    def build(self, layout, aux, stem, seed=0):
        torch.manual_seed(seed)
        return build_model(tiny_model(**TINY, stem=stem, arch=self.arch, head_layout=layout, aux=aux))

    def test_forward_backward_at_odd_size(self, layout, aux, stem):
        model = self.build(layout, aux, stem).train()
        out = model(torch.randn(2, 3, 65, 47))
        if aux:  # torchvision's convention in training mode
            assert set(out) == {"out", "aux"} and out["aux"].shape == (2, 3, 65, 47)
            loss = out["out"].logsumexp(1).mean() + 0.4 * out["aux"].logsumexp(1).mean()
            out = out["out"]
        else:
            loss = out.logsumexp(1).mean()
        assert out.shape == (2, 3, 65, 47)
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        # every trainable parameter gets a gradient: DDP needs no find_unused_parameters
        assert missing == []

    def test_eval_returns_logits_and_images_are_independent(self, layout, aux, stem):
        # eval mode: a tensor (never the aux dict), and per-image results: BN statistics and the bases
        # are fixed, so an image's logits do not depend on the rest of the batch
        model = self.build(layout, aux, stem).eval()
        x = torch.randn(3, 3, 33, 41)
        with torch.no_grad():
            batch, alone = model(x), model(x[1:2])
        assert isinstance(batch, torch.Tensor) and batch.shape == (3, 3, 33, 41)
        # float32 rounding of batched vs single GEMMs only: a mixing of images would be of the logits' size
        scale = batch.abs().max().item()
        torch.testing.assert_close(batch[1:2], alone, rtol=1e-4, atol=1e-5 * scale)

    def test_state_dict_round_trip(self, layout, aux, stem):
        model, other = self.build(layout, aux, stem, seed=0), self.build(layout, aux, stem, seed=1)
        other.load_state_dict(model.state_dict())
        x = torch.randn(1, 3, 33, 33)
        with torch.no_grad():
            torch.testing.assert_close(other.eval()(x), model.eval()(x), rtol=0, atol=0)


class TestEMANet(ModelTester):
    arch = "emanet"


class TestFCN(ModelTester):
    arch = "fcn"


class TestNonLocal(ModelTester):
    arch = "nonlocal"


def test_default_emanet_freezes_only_the_em_in_conv():
    model = build_model(tiny_model(**TINY))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["head.context.conv_in.weight", "head.context.conv_in.bias"]


def test_reference_dilations_and_builders():
    assert layer4_dilations(8) == (2, 8, 16) and layer4_dilations(16) == (1, 4, 8)
    assert layer4_dilations(32) == (1, 2, 4) and layer4_dilations(8, blocks=2) == (2, 8)
    with torch.device("meta"):
        model = emanet_resnet101(num_classes=21, output_stride=8)
    assert isinstance(model, SegmentationModel)
    assert [b.conv2.dilation[0] for b in model.backbone.layer4] == [2, 8, 16]
    assert model.head.classifier.out_channels == 21
    with pytest.raises(TypeError):
        emanet_resnet101(21)  # keyword-only
    assert set(MODELS) >= {"emanet_resnet50", "emanet_resnet101", "fcn_resnet101", "nonlocal_resnet101"}


def test_the_package_exports_every_builder_of_the_table():
    assert set(MODELS) <= set(emanet.__all__)
    assert all(getattr(emanet, name) is builder for name, builder in MODELS.items())
    assert all(hasattr(emanet, name) for name in emanet.__all__)


def test_builder_keywords_are_the_model_config_fields():
    # ModelOverrides gives type checkers the builders' keywords; ModelConfig keeps the defaults: same fields
    fields = typing.get_type_hints(ModelConfig)
    del fields["arch"], fields["backbone"]  # fixed by each builder's name
    assert typing.get_type_hints(ModelOverrides) == fields and not ModelOverrides.__required_keys__
    with pytest.raises(TypeError, match="'num_clases'; did you mean 'num_classes'"):
        emanet_resnet101(num_clases=21)  # an unknown keyword is named, with the closest one
    with pytest.raises(TypeError, match="'outputstride'; did you mean 'output_stride'"):
        fcn_resnet50(outputstride=16)
    with pytest.raises(TypeError, match="'zzz'; the keywords are ModelConfig's: num_classes, stem"):
        emanet_resnet101(zzz=1)
    with pytest.raises(TypeError, match="arch"):
        emanet_resnet101(arch="fcn")
    with pytest.raises(TypeError, match=r"'weights'; load a saved model with emanet.from_pretrained"):
        emanet_resnet101(weights="models/voc")
    with torch.device("meta"):
        for name, builder in MODELS.items():
            arch, backbone = name.split("_")
            model = builder(num_classes=3)
            assert builder.__name__ == name and model.backbone.layers == RESNETS[backbone][1]
            assert (
                type(model.head.context) is {"emanet": EMAUnit, "fcn": torch.nn.Identity, "nonlocal": NonLocal2d}[arch]
            )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"arch": "deeplab"}, "model.arch"),
        ({"backbone": "vgg16"}, "model.backbone"),
        ({"output_stride": 4}, "output_stride"),
        ({"num_bases": 0}, "num_bases"),
        ({"aux_channels": 0}, r"model\.aux_channels must be >= 1, got 0"),  # one list of sizes with the config's
        ({"dropout": 1.0}, r"model\.dropout must be in \[0, 1\)"),
        ({"head_layout": "psp"}, "head_layout"),
    ],
)
def test_config_refuses_impossible_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kwargs)


def test_config_dict_round_trip_and_unknown_key():
    cfg = tiny_model(**TINY)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="num_base"):
        ModelConfig.from_dict({"num_base": 8})


def test_eval_stages_reach_the_unit():
    model = build_model(tiny_model(eval_stages=7, **TINY))
    unit = model.head.context
    assert unit.eval().stages == 7 and unit.train().stages == 3


@pytest.mark.parametrize("arch", ["emanet", "nonlocal"])
def test_every_conv_starts_from_the_reference_fan_out_init(arch):
    # backbone, head and context module share one init: normal(0, sqrt(2 / (k*k*C_out))), zero biases,
    # norm weight 1 / bias 0 (the non-local block's last BN is the exception: zero weight, an identity start)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, backbone="resnet50", stem="deep", num_classes=3))
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.numel() >= 50_000:
            expected = (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5
            assert abs(m.weight.std().item() / expected - 1) < 0.05, name
            assert abs(m.weight.mean().item()) < 0.05 * expected, name
            assert m.bias is None or not m.bias.any(), name
            checked += 1
        elif isinstance(m, torch.nn.BatchNorm2d) and not (arch == "nonlocal" and name.endswith("context.bn")):
            assert bool((m.weight == 1).all() and (m.bias == 0).all()), name
    assert checked > 40  # backbone, reduction conv, context module and classifier convs


def test_builders_record_the_config_they_built_from():
    with torch.device("meta"):
        model = fcn_resnet50(num_classes=5, output_stride=16)
    assert model.config == ModelConfig(arch="fcn", backbone="resnet50", num_classes=5, output_stride=16)
    cfg = tiny_model(**TINY)
    built = build_model(cfg)
    cfg.num_classes = 9  # the caller's config changing afterwards does not change what the model says it is
    assert built.config == tiny_model(**TINY) and built.pretrained_meta == {}
