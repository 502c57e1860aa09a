"""ONNX export of a segmentation model, and a parity check against PyTorch with onnxruntime.

The graph: input ``image`` (B, 3, H, W) float32, normalised as in training ((RGB/255 - mean) / std);
output ``logits`` (B, classes, H, W). Batch, height and width are dynamic. The EM iterations are unrolled
into plain ONNX ops (MatMul, Softmax, ReduceSum, ReduceL2, Div, Transpose, Reshape): no custom ops, so any
ONNX runtime runs them. The number of EM stages is fixed at export time (the model's eval T).

Exporters (both ship with torch 2.13):
- "torchscript" (default, opset 17): the tracing exporter (``dynamo=False``). It exports the small test
  models in 0.3-6 s here, against 15-60 s for the dynamo exporter on this shared 2-core machine. PyTorch
  deprecates it in favour of dynamo; the graphs are equivalent.
- "dynamo" (opset 18): ``torch.export``-based, PyTorch's default; needs ``onnxscript``.

Shape traps handled here: em_attention takes plain 2-D GEMMs when B == 1, a Python branch a tracer would
freeze, so the example input has batch 2 (the batched path is correct for every B). A NonLocal2d block loops
over the images in Python; for such models the batch size is fixed at the example's (1), H and W stay dynamic.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from emanet.checkpoint import atomic_path
from emanet.config import Config
from emanet.data.palettes import Palette
from emanet.errors import ConfigError, MissingExtra, ModelSourceError, UserError, install_hint
from emanet.fields import from_dict, one_of
from emanet.models.fuse import prepare_for_inference
from emanet.models.heads import NonLocal2d
from emanet.pretrained import LoadedModel

logger = logging.getLogger(__name__)

Exporter = Literal["torchscript", "dynamo"]
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
OPSET_RANGE = {"torchscript": (11, 20), "dynamo": (18, 23)}  # what each exporter accepts in torch 2.13
# `emanet export --check` of a float32 graph: the argmax must agree on this share of pixels, and the largest
# |onnxruntime - pytorch| logit difference stay within this fraction of the largest |logit|. Both are relative
# to the model: an absolute bound (1e-4 before) fails full-size EMANets whose float32 rounding alone moves
# logits of ~200 by ~0.1 (the near one-hot E-step, see docs/export.md), which agree on 99.99% of pixels.
MIN_AGREEMENT = 0.999
RELATIVE_TOLERANCE = 0.02
INPUT, OUTPUT = "image", "logits"
_TWO_GB = 2**31


class OnnxNotInstalled(MissingExtra):
    """An optional ONNX package is missing; the message names the install command (a user error the command
    line prints, and an ImportError for code that probes for optional extras)."""


class CheckFailed(UserError):
    """An exported graph disagrees with PyTorch beyond what was asked; the file was not written."""


def require_onnx(*modules: str) -> None:
    """Raise OnnxNotInstalled, naming the missing packages and the extra, unless ``modules`` import."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxNotInstalled(f"ONNX export needs {', '.join(missing)}: {install_hint('onnx')}")


def has_per_image_loop(model: nn.Module) -> bool:
    """True when the model loops over the batch in Python (a traced graph then fixes the batch size)."""
    return any(isinstance(m, NonLocal2d) for m in model.modules())


def inference_copy(model: nn.Module, *, fold_bn: bool = False) -> nn.Module:
    """A float32 CPU copy in eval mode without attention storage; BN folded into the convs if asked.

    The caller's model is left as it was (export must not switch its mode or fold its weights).
    """
    model = prepare_for_inference(copy.deepcopy(model).cpu().float(), channels_last=False, fold_bn=fold_bn)
    for m in model.modules():
        if hasattr(m, "store_attention"):
            m.store_attention = False  # would keep traced tensors on the module
    return model


def _check_opset(exporter: str, opset: int | None) -> int:
    if exporter not in typing.get_args(Exporter):
        raise ConfigError(f"exporter must be {one_of(typing.get_args(Exporter))}, got {exporter!r}")
    if opset is None:
        return DEFAULT_OPSET[exporter]
    lo, hi = OPSET_RANGE[exporter]
    if not lo <= opset <= hi:
        raise ConfigError(
            f"opset {opset} is not supported by the {exporter} exporter: use {lo}..{hi} "
            f"(default {DEFAULT_OPSET[exporter]})"
        )
    return opset


def export_onnx(
    model: LoadedModel | nn.Module,
    path: str | Path,
    *,
    opset: int | None = None,
    height: int = 512,
    width: int = 512,
    dynamic: bool = True,
    fold_bn: bool = True,
    exporter: Exporter = "torchscript",
    metadata: dict[str, str] | None = None,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` as one ONNX file (input "image", output "logits"); returns the path.

    ``model``: what ``pretrained.load_model`` returns (then the file carries the metadata a deployment needs,
    ``model_metadata``: mean, std, class names, palette, model config; the command line passes the same), or a
    bare module (then only ``metadata``, if any: a warning says the ``emanet.*`` keys are missing).
    ``height``/``width`` size the example input; with ``dynamic`` (default) any batch, height and width run.
    ``dynamic=False`` fixes the graph to (1, 3, height, width). ``fold_bn`` (default): the graph is the
    prepared model's (``models.fuse.prepare_for_inference``), BatchNorm folded into the convs: fewer nodes,
    the same logits within float32 rounding; False keeps the BatchNormalization nodes. ``metadata``: more
    metadata_props (strings), over the model's. Weights over 2 GB go to external files beside it (ONNX's limit).

    The file is written through ``checkpoint.atomic_path``: the exporter writes a temporary beside ``path``,
    the metadata is added to it, onnx's checker and then ``verify`` (if given; e.g. a parity check that raises
    ``CheckFailed``) read it, and only then does it replace ``path``. A full disk, an invalid graph or a failed
    ``verify`` leaves an existing ``path`` as it was (an OSError names ``path``).
    """
    require_onnx("onnx", *(["onnxscript"] if exporter == "dynamo" else []))
    import onnx

    opset = _check_opset(exporter, opset)
    if height < 1 or width < 1:
        raise ConfigError(f"height and width must be positive, got {height}x{width}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {**metadata_of(model, warn=not metadata), **(metadata or {})}
    net = inference_copy(_module(model), fold_bn=fold_bn)
    per_image = has_per_image_loop(net)
    # batch 2 keeps em_attention on its batched path, which is right for every B (see the module docstring)
    batch = 2 if dynamic and not per_image else 1
    example = torch.randn(batch, 3, height, width)
    big = sum(t.numel() * t.element_size() for t in net.state_dict().values()) >= _TWO_GB

    with atomic_path(path) as tmp:
        with _quiet_export():
            if exporter == "torchscript":
                _export_torchscript(net, example, tmp, opset, dynamic=dynamic, per_image=per_image)
            else:
                _export_dynamo(net, example, tmp, opset, dynamic=dynamic, per_image=per_image, external_data=big)
        if metadata:
            add_metadata(tmp, metadata, data_file=f"{path.name}.data" if big else None)
        onnx.checker.check_model(str(tmp))
        if verify is not None:
            verify(tmp)
    return path


def _module(model: LoadedModel | nn.Module) -> nn.Module:
    return model.model if isinstance(model, LoadedModel) else model


def metadata_of(model: LoadedModel | nn.Module, *, warn: bool = True) -> dict[str, str]:
    """The metadata an ONNX file of ``model`` carries: ``model_metadata`` of a loaded model; none for a bare
    module (with a warning if ``warn``: a deployment then has no normalisation or class names to read)."""
    if isinstance(model, LoadedModel):
        return model_metadata(model.config, model.class_names, model.palette)
    if warn:
        logger.warning(
            "exporting a bare module: the ONNX file gets no emanet.* metadata (mean, std, class names); "
            "pass what emanet.pretrained.load_model returns to have it"
        )
    return {}


@contextlib.contextmanager
def _quiet_export():
    """No gradients, and none of the warnings that are expected and handled: the tracer's notes on shape checks
    and the `b == 1` branch (export_onnx traces batch 2), and the deprecation notice of the TorchScript
    exporter."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*The feature will be removed.*")
        yield


def _export_torchscript(
    net: nn.Module, example: torch.Tensor, path: Path, opset: int, *, dynamic: bool, per_image: bool
) -> None:
    """The tracing exporter; a per-image loop fixes the batch axis."""
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {}
    if per_image:
        axes.pop(0, None)
    torch.onnx.export(
        net,
        (example,),
        str(path),
        dynamo=False,
        opset_version=opset,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_axes={INPUT: axes, OUTPUT: axes} if axes else None,
    )


def _export_dynamo(
    net: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int,
    *,
    dynamic: bool,
    per_image: bool,
    external_data: bool,
) -> None:
    """The ``torch.export``-based exporter; a per-image loop fixes the batch axis."""
    shapes = None
    if dynamic:
        dims = {2: torch.export.Dim("height", min=8), 3: torch.export.Dim("width", min=8)}
        if not per_image:
            dims[0] = torch.export.Dim("batch", min=1)
        shapes = (dims,)
    program = torch.onnx.export(
        net,
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=shapes,
        verbose=False,
    )
    program.save(str(path), external_data=external_data)


def add_metadata(path: Path, metadata: dict[str, str], *, data_file: str | None = None) -> None:
    """Append ``metadata`` to the saved model's metadata_props (keys and values as strings). ``data_file``: the
    weights of a model over 2 GB go to this file beside it (named after the final file, not the temporary;
    written in place, not atomically), the exporter's own data file is removed."""
    import onnx

    proto = onnx.load(str(path))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in metadata]  # a key given replaces
    del proto.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.save(proto, str(path), save_as_external_data=data_file is not None, location=data_file)
    if data_file is not None:
        path.with_name(f"{path.name}.data").unlink(missing_ok=True)


def model_metadata(config: Any, class_names: Sequence[str], palette: Sequence[Sequence[int]]) -> dict[str, str]:
    """What a deployment needs beside the graph: normalisation, class names, colours and the model config."""
    return {
        "emanet.mean": json.dumps(list(config.data.mean)),  # input = (RGB / 255 - mean) / std
        "emanet.std": json.dumps(list(config.data.std)),
        "emanet.class_names": json.dumps(list(class_names)),
        "emanet.palette": json.dumps([list(c) for c in palette]),
        "emanet.model_config": json.dumps(config.model.to_dict()),
        "emanet.config": json.dumps(config.to_dict()),  # the whole config: eval padding and test-time settings
    }


def read_model_metadata(meta: dict[str, str], source: str | Path) -> tuple[Config, list[str], Palette]:
    """model_metadata's strings -> (config, class names, palette); a ModelSourceError names ``source``.

    Files written before "emanet.config" give their model section and normalisation, the rest of the config
    is emanet's defaults (logged as a warning).
    """
    if "emanet.model_config" not in meta:
        raise ModelSourceError(
            f"{source}: no emanet metadata in this ONNX file (emanet.model_config, emanet.config): export the "
            "model with `emanet export`, which writes it"
        )
    try:
        if "emanet.config" in meta:
            config = from_dict(Config, json.loads(meta["emanet.config"]))
        else:
            logger.warning(
                f"{source}: no emanet.config (an older export): eval padding and test-time settings "
                "are emanet's defaults; export again for the model's own"
            )
            data = {"mean": json.loads(meta["emanet.mean"]), "std": json.loads(meta["emanet.std"])}
            config = from_dict(Config, {"model": json.loads(meta["emanet.model_config"]), "data": data})
        names = [str(n) for n in json.loads(meta["emanet.class_names"])]
        palette = [(int(r), int(g), int(b)) for r, g, b in json.loads(meta["emanet.palette"])]
    except (KeyError, TypeError, ValueError) as e:  # ValueError: bad JSON, and the config's own ConfigError
        raise ModelSourceError(f"{source}: unreadable emanet metadata ({type(e).__name__}: {e})") from None
    if len(names) != config.model.num_classes:
        raise ModelSourceError(f"{source}: {len(names)} class names for {config.model.num_classes} classes")
    return config, names, palette


def onnx_session(path: str | Path, *, threads: int = 0):
    """An onnxruntime CPU session (threads=0: onnxruntime's default, one per core)."""
    require_onnx("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Parity:
    """How close onnxruntime's logits are to PyTorch's on one input."""

    max_abs_diff: float  # largest |onnxruntime - pytorch| over all logits
    max_abs_logit: float  # the scale the difference is relative to
    label_agreement: float  # fraction of pixels whose argmax class is the same

    @property
    def relative_diff(self) -> float:
        """max_abs_diff / max_abs_logit: float32 rounding moves large logits by more in absolute terms."""
        return self.max_abs_diff / max(self.max_abs_logit, 1e-12)

    def describe(self) -> str:
        """The three figures in one line, as `emanet export --check` prints them."""
        return (
            f"same argmax on {100 * self.label_agreement:.3f}% of pixels, max |onnxruntime - pytorch| logits = "
            f"{self.max_abs_diff:.3g} = {self.relative_diff:.2e} of the largest |logit| ({self.max_abs_logit:.3g})"
        )


def judge(parity: Parity, *, min_agreement: float, rtol: float | None) -> list[str]:
    """What fails in ``parity`` (empty: passed): label agreement below ``min_agreement`` (a fraction), the
    relative difference over ``rtol`` (None: not judged, as for an int8 graph, whose logits differ by design)."""
    failures = []
    if parity.label_agreement < min_agreement:
        failures.append(
            f"the argmax agrees on {100 * parity.label_agreement:.3f}% of pixels, below the required "
            f"{100 * min_agreement:g}%"
        )
    if rtol is not None and parity.relative_diff > rtol:
        failures.append(
            f"the largest logit difference is {parity.relative_diff:.2e} of the largest |logit|, over the "
            f"relative tolerance {rtol:g}"
        )
    return failures


def check_parity(parity: Parity, path: str | Path, *, min_agreement: float, rtol: float | None) -> None:
    """Raise ``CheckFailed`` naming ``path`` and the figures when ``judge`` finds a failure."""
    failures = judge(parity, min_agreement=min_agreement, rtol=rtol)
    if failures:
        raise CheckFailed(f"{path}: check failed: {'; '.join(failures)} ({parity.describe()}); nothing written")


def _check_size(size: Sequence[int]) -> None:
    if len(size) != 4 or size[1] != 3 or min(size) < 1:
        raise ConfigError(f"check sizes must be (B, 3, H, W), got {tuple(size)}")


def compare(model: nn.Module, session, inputs: typing.Iterable[torch.Tensor]) -> Parity:
    """Run ``model`` (float32 CPU PyTorch, as given) and the onnxruntime ``session`` on each (B, 3, H, W)
    input and compare the logits."""
    worst = scale = 0.0
    same = pixels = 0
    for x in inputs:
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run([OUTPUT], {INPUT: x.numpy()})
        if got.shape != expected.shape:
            raise ModelSourceError(
                f"onnxruntime returned logits of shape {got.shape} for input {tuple(x.shape)}, PyTorch {expected.shape}"
            )
        worst = max(worst, float(np.abs(got - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
        same += int((got.argmax(1) == expected.argmax(1)).sum())
        pixels += expected.shape[0] * expected.shape[2] * expected.shape[3]
    return Parity(max_abs_diff=worst, max_abs_logit=scale, label_agreement=same / max(pixels, 1))


def onnx_parity(
    model: LoadedModel | nn.Module,
    path: str | Path,
    sizes: Sequence[Sequence[int]] = ((1, 3, 65, 81), (2, 3, 49, 57)),
    *,
    seed: int = 0,
) -> Parity:
    """Compare onnxruntime (CPU) with ``model`` on random inputs of ``sizes`` (B, 3, H, W).

    The sizes should differ from the export's example so the dynamic axes are exercised. Axes the graph fixes
    (``dynamic=False``, or the batch of a model with a per-image loop) take the graph's size instead.
    """
    for size in sizes:
        _check_size(size)
    session = onnx_session(path)
    # a fixed axis (an int; dynamic ones are names) overrides the requested size: static graphs run as exported
    fixed = session.get_inputs()[0].shape
    generator = torch.Generator().manual_seed(seed)
    inputs = (
        torch.randn(*(f if isinstance(f, int) else s for f, s in zip(fixed, size)), generator=generator)
        for size in sizes
    )
    try:
        return compare(inference_copy(_module(model)), session, inputs)
    except ModelSourceError as e:
        raise ModelSourceError(f"{path}: {e}") from None


def check_onnx(
    model: LoadedModel | nn.Module,
    path: str | Path,
    sizes: Sequence[Sequence[int]] = ((1, 3, 65, 81), (2, 3, 49, 57)),
    *,
    seed: int = 0,
) -> float:
    """Largest absolute logit difference between onnxruntime (CPU) and ``model`` (see onnx_parity)."""
    return onnx_parity(model, path, sizes, seed=seed).max_abs_diff
