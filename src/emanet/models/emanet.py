"""EMANet and its baselines: backbone -> head -> bilinear upsample to the input size; builders.

Models return logits (B, classes, H, W). With an auxiliary head, a model in training mode returns
``{"out": logits, "aux": aux_logits}`` (torchvision's convention); in eval mode always the logits tensor.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, TypedDict

from torch import Tensor, nn

from emanet.errors import ConfigError
from emanet.fields import from_dict, literal_errors, one_of
from emanet.models.backbone import BACKBONES, OUTPUT_STRIDES, RESNETS, Stem
from emanet.models.em import BasesUpdate, Differentiable, EMAUnit, Residual
from emanet.models.heads import FCNAuxHead, HeadLayout, NonLocal2d, SegHead, upsample_like

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # declared in pyproject.toml for Python 3.10
    from typing_extensions import Unpack

Arch = Literal["emanet", "fcn", "nonlocal"]
ARCHS: tuple[str, ...] = typing.get_args(Arch)
# ModelConfig's size fields: each must be >= 1 (ModelConfig.problems, which Config.validate runs too)
MODEL_SIZES = ("num_classes", "backbone_width", "channels", "mid_channels", "aux_channels", "num_bases", "num_stages")


@dataclass
class ModelConfig:
    """Everything that defines a model. Saved with every checkpoint; defaults = the reference EMANet."""

    arch: Arch = "emanet"  # "emanet", or the baselines "fcn" (no context module) / "nonlocal"
    num_classes: int = 21  # PASCAL VOC
    backbone: str = "resnet101"  # a key of BACKBONES
    stem: Stem = "deep"  # "standard" (torchvision), "deep" (reference), "v1c" (mmsegmentation)
    backbone_width: int = 64  # layer1's planes: 64 in published ResNets (ImageNet weights need it)
    output_stride: int = 8  # a key of OUTPUT_STRIDES: 8, 16 or 32
    multi_grid: bool = True  # layer4 dilations (d/2, 2d, 4d): the reference's (2, 8, 16) at OS8
    pretrained_backbone: str | None = None  # local .pth/.safetensors ImageNet weights (strict load)
    head_layout: HeadLayout = "reference"  # "reference" or "mmseg" (concat of C5 before the classifier)
    channels: int = 512  # width of the reduction conv and the context module: EMANet(512) / EMANet(256)
    mid_channels: int = 256  # width after the context module
    dropout: float = 0.1
    aux: bool = False  # auxiliary FCN head on layer3 (mmsegmentation uses it with loss weight 0.4)
    aux_channels: int = 256
    align_corners: bool = True  # the reference upsamples with align_corners=True; mmsegmentation False
    bn_momentum: float = 0.1  # PyTorch convention (weight of the new batch); the reference used 3e-4
    # EM attention (ignored by the baselines)
    num_bases: int = 64  # K in the paper
    num_stages: int = 3  # T in training
    eval_stages: int | None = None  # T at evaluation; None = num_stages
    bases_update: BasesUpdate = "ema"  # "ema" (moving average), "none" (fixed), "learned" (back-prop)
    momentum: float = 0.1  # weight of the new batch estimate in the bases' moving average
    renormalize: bool = False  # L2-normalise the batch estimate before blending (mmsegmentation)
    differentiable: Differentiable = False  # gradients through the EM stages (reference: none); "last":
    # through the last stage only (Hamburger's one-step gradient)
    residual: Residual = "conv"  # "conv" (paper: conv + BN + ReLU) or "gamma" (Y = X + gamma * X_hat)

    def __post_init__(self) -> None:
        errors = self.problems()
        if errors:
            raise ConfigError("; ".join(errors))

    def problems(self) -> list[str]:
        """Every impossible value, each naming its key (``model.``), what is expected and the value: the one
        check of a model's fields, run on construction and again by Config.validate (after assignments)."""
        # arch, stem, head_layout, bases_update, residual, differentiable: from their Literal types
        errors = literal_errors(self, "model.")

        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                errors.append(f"model.{name} must be {expected}, got {getattr(self, name)!r}")

        need(self.backbone in BACKBONES, "backbone", f"one of {sorted(BACKBONES)}")
        need(self.output_stride in OUTPUT_STRIDES, "output_stride", one_of(tuple(OUTPUT_STRIDES)))
        for name in MODEL_SIZES:
            need(getattr(self, name) >= 1, name, ">= 1")
        need(self.eval_stages is None or self.eval_stages >= 1, "eval_stages", ">= 1 or null (= num_stages)")
        need(0 <= self.dropout < 1, "dropout", "in [0, 1)")
        need(0 <= self.momentum <= 1, "momentum", "in [0, 1] (weight of the new bases estimate)")
        need(0 <= self.bn_momentum <= 1, "bn_momentum", "in [0, 1]")
        if self.differentiable == "last" and self.bases_update == "learned":
            errors.append(
                "model.differentiable=last leaves learned bases without a gradient; use "
                "model.bases_update=ema or none, or model.differentiable=true"
            )
        return errors

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """A ModelConfig from a dict (e.g. config.json's ``model``), each key checked by name and type."""
        return from_dict(cls, d, "model.")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)


def layer4_dilations(output_stride: int, blocks: int = 3) -> tuple[int, ...]:
    """The reference's multi-grid (1, 2, 4) times layer4's dilation d, with the first grid ignored by its
    code (that block keeps d/2 like any first block of a dilated stage): (2, 8, 16) at OS8, (1, 4, 8) at OS16.
    ResNet-18's two-block layer4 takes the first two."""
    d = OUTPUT_STRIDES[output_stride][1][3]  # layer4's stage dilation
    return (max(1, d // 2), 2 * d, 4 * d)[:blocks]


# ----------------------------------------------------------------------------- saving and loading
# A model carries the ModelConfig it was built from (``model.config``) and has save_pretrained / from_pretrained
# / push_to_hub, as in transformers and SMP. Their code lives floors above this one: the model-folder format in
# pretrained.py, the Hub in deploy/hub.py, and models/ (the lowest floor) imports neither. So the methods call
# the functions that emanet/__init__.py puts into SegmentationModel.pretrained_io; every `import emanet...`
# runs emanet/__init__.py first, so no model exists before they are there. (Patching the methods onto the
# class from above, or a mixin applied there, would hide them from IDEs and type checkers; huggingface_hub's
# ModelHubMixin would make the optional extra a core dependency and write its own folder format.)


class PretrainedIO(NamedTuple):
    """The functions behind SegmentationModel's save_pretrained / from_pretrained / push_to_hub."""

    save: Callable[..., Path]  # emanet.pretrained.save_pretrained(model, folder, **options)
    load: Callable[..., nn.Module]  # emanet.deploy.hub.from_pretrained(source, **options)
    push: Callable[..., str]  # emanet.deploy.hub.push_model(model, repo_id, **options)


class SegmentationModel(nn.Module):
    """backbone -> head on C5 (+ auxiliary head on C4) -> bilinear upsample to the input size.

    ``config``: the ModelConfig it was built from (build_model records it), so ``model.save_pretrained(folder)``
    needs no config. ``pretrained_meta``: what a loader read beside the weights (config.json's run config,
    class names and palette; ``pretrained.load_model`` fills it), written again by save_pretrained.
    """

    pretrained_io: ClassVar[PretrainedIO | None] = None  # set by emanet/__init__.py (see above)

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        aux_head: nn.Module | None = None,
        *,
        align_corners: bool = True,
        config: ModelConfig | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.align_corners = align_corners
        self.config = config
        self.pretrained_meta: dict[str, Any] = {}

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        size = x.shape[-2:]
        feats = self.backbone(x)  # [C2, C3, C4, C5]
        out = upsample_like(self.head(feats[-1]), size, self.align_corners)
        if self.aux_head is not None and self.training:
            aux = upsample_like(self.aux_head(feats[-2]), size, self.align_corners)
            return {"out": out, "aux": aux}
        return out

    @classmethod
    def _io(cls) -> PretrainedIO:
        if cls.pretrained_io is None:  # only if emanet/__init__.py failed half-way
            raise RuntimeError("emanet was not fully imported: `import emanet` connects save_pretrained and co.")
        return cls.pretrained_io

    def save_pretrained(self, folder: str | Path, **options: Any) -> Path:
        """Write the model folder ``folder`` (model.safetensors + config.json; the ``emanet.save_pretrained``
        keywords: class_names, palette, config). Returns the folder."""
        return self._io().save(self, folder, **options)

    @classmethod
    def from_pretrained(cls, source: str | Path, **options: Any) -> SegmentationModel:
        """The model (eval mode) of a model folder, checkpoint file, run folder or Hub repo (``user/repo``,
        ``hf://user/repo``); ``emanet.from_pretrained``'s keywords (device, revision)."""
        model = cls._io().load(source, **options)
        if not isinstance(model, cls):
            raise TypeError(f"{source} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def push_to_hub(self, repo_id: str, **options: Any) -> str:
        """Upload the model as a model folder with a generated card to the Hugging Face Hub repo ``repo_id``
        (needs the hub extra); keywords: private, token, revision, commit_message, class_names, palette.
        Returns the commit URL."""
        return self._io().push(self, repo_id, **options)


def build_model(cfg: ModelConfig) -> SegmentationModel:
    """The model ``cfg`` describes, with fresh weights (``cfg.pretrained_backbone``: the backbone's loaded)."""
    norm_layer = functools.partial(nn.BatchNorm2d, momentum=cfg.bn_momentum)
    backbone = BACKBONES[cfg.backbone](
        stem=cfg.stem,
        output_stride=cfg.output_stride,
        layer4_dilations=(layer4_dilations(cfg.output_stride, RESNETS[cfg.backbone][1][3]) if cfg.multi_grid else None),
        norm_layer=norm_layer,
        weights=cfg.pretrained_backbone,
        width=cfg.backbone_width,
    )
    c4, c5 = (f["channels"] for f in backbone.feature_info[-2:])
    if cfg.arch == "emanet":
        context: nn.Module | None = EMAUnit(
            cfg.channels,
            cfg.num_bases,
            cfg.num_stages,
            eval_stages=cfg.eval_stages,
            bases_update=cfg.bases_update,  # type: ignore[arg-type]
            momentum=cfg.momentum,
            renormalize=cfg.renormalize,
            differentiable=cfg.differentiable,
            residual=cfg.residual,  # type: ignore[arg-type]
            norm_layer=norm_layer,
        )
    elif cfg.arch == "nonlocal":
        context = NonLocal2d(cfg.channels, norm_layer=norm_layer)
    else:
        context = None
    head = SegHead(
        c5,
        cfg.num_classes,
        context=context,
        channels=cfg.channels,
        mid_channels=cfg.mid_channels,
        layout=cfg.head_layout,  # type: ignore[arg-type]
        dropout=cfg.dropout,
        norm_layer=norm_layer,
    )
    aux = None
    if cfg.aux:
        aux = FCNAuxHead(c4, cfg.num_classes, channels=cfg.aux_channels, dropout=cfg.dropout, norm_layer=norm_layer)
    # a copy: changing the caller's config afterwards does not change what the model says it is
    return SegmentationModel(backbone, head, aux, align_corners=cfg.align_corners, config=dataclasses.replace(cfg))


# ----------------------------------------------------------------------------- builders


class ModelOverrides(TypedDict, total=False):
    """The builders' keywords: ModelConfig's fields less ``arch`` and ``backbone``, which each builder fixes.

    Names and types only, so type checkers and IDEs know the keywords (PEP 692); the defaults and their
    reasons stay in ModelConfig, and tests/models/test_emanet.py checks that the two list the same typed fields.
    """

    num_classes: int
    stem: Stem
    backbone_width: int
    output_stride: int
    multi_grid: bool
    pretrained_backbone: str | None
    head_layout: HeadLayout
    channels: int
    mid_channels: int
    dropout: float
    aux: bool
    aux_channels: int
    align_corners: bool
    bn_momentum: float
    num_bases: int
    num_stages: int
    eval_stages: int | None
    bases_update: BasesUpdate
    momentum: float
    renormalize: bool
    differentiable: Differentiable
    residual: Residual


def check_keywords(builder: str, keywords: typing.Iterable[str]) -> None:
    """A TypeError for a keyword no builder takes, with the closest one: ``emanet_resnet50(num_clases=21)``."""
    valid = list(ModelOverrides.__annotations__)
    for key in keywords:
        if key in valid:
            continue
        if key in ("arch", "backbone"):
            hint = f"; {builder} fixes it (build_model(ModelConfig(...)) takes any)"
        elif key in ("weights", "pretrained"):
            hint = "; load a saved model with emanet.from_pretrained(folder, checkpoint or hf://user/repo)"
        else:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the keywords are ModelConfig's: {', '.join(valid)}"
        raise TypeError(f"{builder}() got an unexpected keyword argument {key!r}{hint}")


def _build(arch: Arch, backbone: str, overrides: ModelOverrides) -> SegmentationModel:
    check_keywords(f"{arch}_{backbone}", overrides)
    return build_model(ModelConfig(arch=arch, backbone=backbone, **overrides))


# torchvision-style keyword-only builders: emanet_resnet101(num_classes=21, output_stride=8). Keywords are
# ModelConfig fields (its defaults: the reference EMANet); passing arch or backbone is a TypeError.


def emanet_resnet50(**overrides: Unpack[ModelOverrides]) -> SegmentationModel:
    """EMANet on a dilated ResNet-50; keywords are ModelConfig fields."""
    return _build("emanet", "resnet50", overrides)


def emanet_resnet101(**overrides: Unpack[ModelOverrides]) -> SegmentationModel:
    """EMANet on a dilated ResNet-101 (the paper's model); keywords are ModelConfig fields."""
    return _build("emanet", "resnet101", overrides)


def emanet_resnet152(**overrides: Unpack[ModelOverrides]) -> SegmentationModel:
    """EMANet on a dilated ResNet-152; keywords are ModelConfig fields."""
    return _build("emanet", "resnet152", overrides)


def fcn_resnet50(**overrides: Unpack[ModelOverrides]) -> SegmentationModel:
    """The FCN baseline (no context module) on a dilated ResNet-50; keywords are ModelConfig fields."""
    return _build("fcn", "resnet50", overrides)


def fcn_resnet101(**overrides: Unpack[ModelOverrides]) -> SegmentationModel:
    """The FCN baseline (no context module) on a dilated ResNet-101; keywords are ModelConfig fields."""
    return _build("fcn", "resnet101", overrides)


def nonlocal_resnet50(**overrides: Unpack[ModelOverrides]) -> SegmentationModel:
    """The non-local baseline on a dilated ResNet-50; keywords are ModelConfig fields."""
    return _build("nonlocal", "resnet50", overrides)


def nonlocal_resnet101(**overrides: Unpack[ModelOverrides]) -> SegmentationModel:
    """The non-local baseline on a dilated ResNet-101; keywords are ModelConfig fields."""
    return _build("nonlocal", "resnet101", overrides)


MODELS = {
    f.__name__: f
    for f in (
        emanet_resnet50,
        emanet_resnet101,
        emanet_resnet152,
        fcn_resnet50,
        fcn_resnet101,
        nonlocal_resnet50,
        nonlocal_resnet101,
    )
}
