"""Inference-time surgery: fold BatchNorm into the preceding conv, fuse ReLU (and the residual add) into the
conv on CPU; ``prepare_for_inference`` in one call.

In eval mode a BatchNorm is a per-channel affine map, ``y = (x - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``, so after ``x = W * in + b`` it can be absorbed into the conv
(``torch.nn.utils.fusion.fuse_conv_bn_weights`` computes it, here in float64):

    W' = W * s   (per output channel)        b' = beta + (b - mean) * s

Pairs are found structurally, never by tracing, so the code must match how the modules call them:
- consecutive ``(Conv2d, BatchNorm2d)`` children of an ``nn.Sequential`` (ConvBNReLU, the deep/v1c stems,
  ResNet ``downsample``);
- attribute pairs of one module listed in ``ATTR_PAIRS`` (ResNet blocks and stem ``conv1``/``bn1``...,
  EMAUnit ``conv_out``/``bn_out``, NonLocal2d ``out``/``bn``), where the conv may also be an ``nn.Sequential``
  ending in a Conv2d (the deep stem: ``bn1`` follows ``conv1[-1]``).
Assumption: the conv's output feeds ONLY its BN (true for every module in this package). A conv whose raw
output is also used elsewhere must not be folded; register such modules nowhere here.

Activation fusion (``fuse_activations``): once BN is folded, a ResNet block is conv -> ReLU -> conv -> ReLU ->
conv -> + identity -> ReLU, and every ReLU and add is a full pass over a large activation (measured: 16% of
the prepared EMANet-R50 forward at 513x513 on CPU). oneDNN's fused convolution (``mkldnn::
_convolution_pointwise``, the op Inductor's CPU backend emits) applies them as post-ops of the conv. Blocks and
conv-BN-ReLU sequences get a subclass whose forward takes that path when it may: a CPU float32 (or CPU
autocast) inference forward, not traced, compiled or exported, so ONNX, torch.compile and autograd see the
plain modules. The subclass keeps every child, so state-dict keys are unchanged.

Precision (float32 on CPU, against the same model in float64; EMANet-ResNet-50 OS8, random weights, BatchNorm
statistics from three training-mode batches): the fold (computed in float64, then cast) and the fused ReLU/add
add no error of their own, 0.9-1.3x the eager model's mean |logit| error. channels_last is the one stage that
adds some: oneDNN runs channels_last float32 convolutions with its brgemm kernels, measured at 1.7-3.7x the
error of the blocked direct kernels an NCHW input gets on 3x3 convolutions (equal on 1x1). The prepared model,
mean |logit| and largest probability error as multiples of the eager model's (medians over images): 1.7x
and 1.6x at 129x137, 1.4x and 1.3x at 257x265, 1.5x and 1.8x at 505x377 (one image) with the random model's
soft E-step; 1.4x and 1.2x, 1.3x and 1.2x, 1.2-1.5x and 1.0-1.6x with a nearly one-hot E-step (conv_in
scaled 4x). tests/models/test_fuse.py holds the bound: 2x.
The largest probability difference on ONE image does not measure a path's precision for EMANet: a trained
model's E-step is nearly one-hot, so a pixel close to a tie between two bases changes its reconstruction with
any rounding change. With such an E-step, per image, the prepared model's figure was 0.6-5.5x the eager
model's, and the eager model's own moved 4.6x when its input changed by 1e-7 relative: one image at 10x (a
trained model's E-step is sharper still) is that noise, not a loss in the fused path. For the eager model's
error exactly, prepare without channels_last
(``prepare_for_inference(channels_last=False)``, or ``Predictor(prepare=False)``): that gives up the
channels_last speed (benchmarks/results.md: prepared 0.72x the eager forward, EMANet-R50 at 513x513).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from emanet.models.backbone import BasicBlock, Bottleneck
from emanet.models.heads import ConvBNReLU

# (conv attribute, BN attribute) pairs where forward() computes bn(conv(x)) and nothing else reads conv(x).
ATTR_PAIRS = (
    ("conv1", "bn1"),  # ResNet blocks; standard stem; deep stem (conv1 is a Sequential)
    ("conv2", "bn2"),
    ("conv3", "bn3"),
    ("conv_out", "bn_out"),  # EMAUnit, residual="conv"
    ("out", "bn"),  # NonLocal2d
)
_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)  # SyncBatchNorm in eval mode is a plain BatchNorm


def _last_conv(module: nn.Module | None) -> nn.Conv2d | None:
    """The conv whose output a following BN sees: the module itself, or the last child of a Sequential."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[-1]
    return module if isinstance(module, nn.Conv2d) else None


def _foldable(conv: nn.Conv2d | None, bn: nn.Module | None, shared: set[int]) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and isinstance(bn, _BN_TYPES)
        # a training-mode BN, or one without running stats, normalises with batch statistics: not affine
        and not bn.training
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
        and id(conv) not in shared  # a conv reused elsewhere would have its other uses rescaled too
    )


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Absorb ``bn`` (eval mode) into ``conv`` in place with torch's own fold; ``bn`` itself is left untouched."""

    def f64(t: Tensor | None) -> Tensor | None:
        # float64 for the scale: var + eps can be tiny, and the product must match BN's own float32 maths
        return None if t is None else t.double()

    weight, bias = fuse_conv_bn_weights(
        conv.weight.double(),
        f64(conv.bias),
        f64(bn.running_mean),
        f64(bn.running_var),
        bn.eps,
        f64(bn.weight),
        f64(bn.bias),
    )
    conv.weight.copy_(weight)  # in place: the parameter keeps its dtype, device and memory format
    if conv.bias is None:
        # BN-followed convs are built with bias=False; the fold needs one
        conv.bias = nn.Parameter(
            torch.empty_like(bias, dtype=conv.weight.dtype), requires_grad=conv.weight.requires_grad
        )
    conv.bias.copy_(bias)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into it; the BN becomes nn.Identity.

    In place; returns how many were folded (0 on a second call). Raises ValueError in training mode, where
    BN uses batch statistics and updates its running ones.
    """
    if model.training:
        raise ValueError(
            "fold_batchnorm needs a model in eval mode (call model.eval() first): in training mode "
            "BatchNorm normalises with batch statistics, which cannot be folded"
        )
    # Convs that appear at more than one place in the module tree (shared weights) are left alone.
    seen: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    shared = {k for k, n in seen.items() if n > 1}

    folded = 0
    for module in list(model.modules()):
        # 1) Sequential: conv, bn, ... -> conv', Identity, ... (children keep their names, so the
        #    state-dict keys of everything else do not move)
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for prev, name in zip(names, names[1:]):
                conv, bn = module._modules[prev], module._modules[name]
                if _foldable(conv, bn, shared):
                    fold_conv_bn(conv, bn)
                    setattr(module, name, nn.Identity())
                    folded += 1
        # 2) attribute pairs: forward() calls self.bn(self.conv(x))
        for conv_name, bn_name in ATTR_PAIRS:
            bn = getattr(module, bn_name, None)
            conv = _last_conv(getattr(module, conv_name, None))
            if _foldable(conv, bn, shared):
                fold_conv_bn(conv, bn)
                setattr(module, bn_name, nn.Identity())
                folded += 1
    return folded


def _inputs_to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return tuple(
        a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4 else a
        for a in args
    )


# ----------------------------------------------------------------------------- activation fusion

_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() else None


def _plain_conv(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)  # no "same"
    )


def _fusion_applies(x: Tensor) -> bool:
    """A forward the fused oneDNN op may serve: CPU, no autograd, not traced/compiled/exported, fp32 or CPU
    autocast in a dtype oneDNN fuses on this CPU."""
    return (
        _POINTWISE is not None
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export())
        and (
            fused_dtype_supported(torch.get_autocast_dtype("cpu"))
            if torch.is_autocast_enabled("cpu")
            else x.dtype == torch.float32
        )
    )


@functools.cache  # a property of this CPU, asked once per fused block and forward
def fused_dtype_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused conv runs in ``dtype`` on this CPU: float32 always; bfloat16 and float16 only
    with the instructions oneDNN needs for them (float16 wants avx512_fp16 or avx_ne_convert, which many
    x86 CPUs lack). Otherwise the plain ops run, as autocast has them."""
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return dtype == torch.float32


def conv_relu(conv: nn.Conv2d, x: Tensor, add: Tensor | None = None) -> Tensor:
    """``relu(conv(x) + add)`` (``add`` optional) in one oneDNN call; the caller checked ``_fusion_applies``.

    Under CPU autocast the conv runs in the autocast dtype, as ``F.conv2d`` does there; the add and ReLU are
    applied to the accumulator before the one rounding to that dtype.
    """
    w, b = conv.weight, conv.bias
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        x, w = x.to(dtype), w.to(dtype)
        b = b.to(dtype) if b is not None else None
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if add is None:
        return _POINTWISE(x, w, b, *args, "relu", [], None)
    return _POINTWISE.binary(x, add.to(x.dtype), w, b, *args, "add", 1.0, "relu", [], None)


class FusedBasicBlock(BasicBlock):
    """A BasicBlock whose BatchNorms are folded: conv+ReLU, conv+add+ReLU as fused ops when they apply."""

    def forward(self, x: Tensor) -> Tensor:
        if not _fusion_applies(x):
            return super().forward(x)
        identity = x if self.downsample is None else self.downsample(x)
        return conv_relu(self.conv2, conv_relu(self.conv1, x), add=identity)


class FusedBottleneck(Bottleneck):
    """A Bottleneck whose BatchNorms are folded: two conv+ReLU and one conv+add+ReLU fused op."""

    def forward(self, x: Tensor) -> Tensor:
        if not _fusion_applies(x):
            return super().forward(x)
        identity = x if self.downsample is None else self.downsample(x)
        out = conv_relu(self.conv2, conv_relu(self.conv1, x))
        return conv_relu(self.conv3, out, add=identity)


class FusedConvBNReLU(ConvBNReLU):
    """conv -> (folded BN) -> ReLU as one fused op when it applies."""

    def forward(self, x: Tensor) -> Tensor:
        return conv_relu(self.conv, x) if _fusion_applies(x) else super().forward(x)


class FusedSequential(nn.Sequential):
    """An nn.Sequential (the deep and v1c stems) whose ``conv, Identity, ReLU`` runs are fused ops."""

    def forward(self, x: Tensor) -> Tensor:
        if not _fusion_applies(x):
            return super().forward(x)
        mods = list(self)
        i = 0
        while i < len(mods):
            if i + 2 < len(mods) and _conv_identity_relu(mods[i : i + 3]):
                x, i = conv_relu(mods[i], x), i + 3
            else:
                x, i = mods[i](x), i + 1
        return x


def _conv_identity_relu(mods: list[nn.Module]) -> bool:
    return _plain_conv(mods[0]) and type(mods[1]) is nn.Identity and type(mods[2]) is nn.ReLU


def _folded_block(m: nn.Module) -> bool:
    convs = [getattr(m, f"conv{i}") for i in (1, 2, 3) if hasattr(m, f"conv{i}")]
    bns = [getattr(m, f"bn{i}") for i in (1, 2, 3) if hasattr(m, f"bn{i}")]
    return all(_plain_conv(c) for c in convs) and all(type(b) is nn.Identity for b in bns) and type(m.relu) is nn.ReLU


# exact type -> its fused subclass, and the test that the module's BNs are folded as the subclass assumes
_FUSED = {
    Bottleneck: (FusedBottleneck, _folded_block),
    BasicBlock: (FusedBasicBlock, _folded_block),
    ConvBNReLU: (FusedConvBNReLU, lambda m: _conv_identity_relu([m.conv, m.bn, m.relu])),
    nn.Sequential: (
        FusedSequential,
        lambda m: any(_conv_identity_relu(list(m)[i : i + 3]) for i in range(len(m) - 2)),
    ),
}


def fuse_activations(model: nn.Module) -> int:
    """Give every folded block and conv-BN-ReLU of ``model`` its fused subclass (in place); returns how many.

    Only modules whose BatchNorms are already folded (``fold_batchnorm``) qualify. Outputs are unchanged up
    to float rounding; where the fused op does not apply (GPU, autograd, tracing...) the plain forward runs.
    """
    if _POINTWISE is None:
        return 0
    fused = 0
    for m in model.modules():
        entry = _FUSED.get(type(m))
        if entry is not None and entry[1](m):
            m.__class__ = entry[0]
            fused += 1
    return fused


def prepare_for_inference(
    model: nn.Module, *, channels_last: bool = True, fold_bn: bool = True, fuse: bool = True
) -> nn.Module:
    """eval() -> fold BatchNorm -> fuse ReLU/add into the convs -> channels_last -> no gradients. In place;
    returns ``model``.

    channels_last (NHWC) lets oneDNN (CPU) and cuDNN pick their faster convolution kernels, above all under
    bf16/fp16 autocast (measured here: EMANet-R50 at 513x513, bf16 on CPU, 1.7x faster with channels_last
    inputs than with NCHW ones into the same converted model). With ``channels_last`` a forward pre-hook
    converts 4-D inputs too, so every caller (whole image, sliding windows, evaluation) gets the fast path.
    ``fuse`` (needs ``fold_bn``): ``fuse_activations``, CPU inference only. Outputs equal the eager model's
    within float32 rounding (channels_last convolutions: 1.3-1.7x the eager error against float64, see the
    module's "Precision"); EM attention still runs in float32 under autocast.
    """
    model.eval()
    if fold_bn:
        fold_batchnorm(model)
        if fuse:
            fuse_activations(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if not getattr(model, "_channels_last_inputs", False):  # one hook, however often this runs
            model.register_forward_pre_hook(_inputs_to_channels_last)
            model._channels_last_inputs = True
    model.requires_grad_(False)
    return model
