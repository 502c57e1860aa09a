"""int8 ONNX for CPUs: static quantization of an exported model with onnxruntime.quantization, and its check.

``quantize_int8`` exports the float32 graph (``export.export_onnx``, torchscript exporter) to a temporary
folder, runs onnxruntime's pre-processing (symbolic shape inference, graph clean-up), calibrates activation
ranges on images and writes a QDQ graph: int8 weights (per output channel for the convolutions) and uint8
activations, which onnxruntime runs as integer convolutions (VNNI / AMX-INT8 where the CPU has them).

The EM attention stays float32: every node of an EMA unit (conv_in, the unrolled E- and M-steps, the
reconstruction and conv_out) is excluded by name. The E-step's softmax over unscaled 512-d dot products is
nearly one-hot, so 256 levels of int8 would move pixels between bases (the same reason it stays float32 under
autocast, models/em.py). The torchscript exporter names nodes after the module that made them
(``/head/context/MatMul_3``), so the unit's nodes are those under its module path; ``em_node_names`` checks
that every Softmax of the graph is among them, so a renaming exporter fails loudly instead of quantizing EM.
The convolution that reads the image and the classifier stay float32 too (``float_node_names``).

Calibration and check images are read exactly as evaluation reads them: a dataset's validation split (its
eval transform) or image files through ``predict.preprocess`` (EXIF, eval resize, normalise, pad).
"""

from __future__ import annotations

import logging
import tempfile
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from emanet.checkpoint import atomic_path
from emanet.config import Config
from emanet.deploy.export import (
    INPUT,
    Parity,
    add_metadata,
    compare,
    export_onnx,
    inference_copy,
    onnx_session,
    require_onnx,
)
from emanet.deploy.predict import preprocess
from emanet.errors import ConfigError, ModelSourceError
from emanet.models.em import EMAUnit
from emanet.pretrained import LoadedModel

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)  # `emanet export --quantize` choices
MIN_AGREEMENT = 0.99  # `--check` of an int8 graph: share of pixels whose argmax matches float32 PyTorch
CALIBRATION_IMAGES = 32  # default number of calibration images
CHECK_IMAGES = 8  # default number of held-out images for the check


def em_node_names(graph, model: nn.Module) -> list[str]:
    """Names of the nodes of ``graph`` (an ONNX GraphProto exported by the torchscript exporter) that belong
    to an EMA unit of ``model``: those under the unit's module path (``head.context`` -> ``/head/context/``)."""
    scopes = ["/" + name.replace(".", "/") + "/" for name, m in model.named_modules() if isinstance(m, EMAUnit)]
    names = [n.name for n in graph.node if n.name.startswith(tuple(scopes))] if scopes else []
    inside = set(names)
    outside = [n.name or "(unnamed)" for n in graph.node if n.op_type == "Softmax" and n.name not in inside]
    if outside:
        raise ModelSourceError(
            f"the exported graph has Softmax nodes outside the EMA units' scopes {scopes}: {outside[:3]}; the "
            "EM iterations cannot be kept in float32 (export with the torchscript exporter, which names nodes "
            "after their modules)"
        )
    return names


def float_node_names(graph, model: nn.Module) -> list[str]:
    """The nodes the int8 graph keeps in float32: the EMA units' (``em_node_names``), the convolution that
    reads the image and the classifier. The last two hold few multiply-adds (3 input channels; K classes) and
    cost the most accuracy in int8: on the synthetic toy model (600 iterations) keeping them float32 lost
    0.22 mIoU instead of 0.91 against float32, with 99.74% instead of 99.41% of labels agreeing."""
    first = [n.name for n in graph.node if n.op_type == "Conv" and INPUT in n.input]
    classifier = ["/" + name.replace(".", "/") + "/" for name, _ in model.named_modules() if name == "head.classifier"]
    last = [n.name for n in graph.node if classifier and n.name.startswith(classifier[0])]
    return em_node_names(graph, model) + first + last


class CalibrationImages:
    """onnxruntime's CalibrationDataReader protocol: one {"image": (1, 3, H, W)} feed per call, then None."""

    def __init__(self, images: Sequence[torch.Tensor]) -> None:
        self._images = iter(images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next feed, or None when the images are used up."""
        x = next(self._images, None)
        return None if x is None else {INPUT: x[None].float().numpy()}


def quantize_file(
    source: Path,
    target: Path,
    calibration: Sequence[torch.Tensor],
    *,
    exclude: Callable[[typing.Any], list[str]] = lambda graph: [],
    preprocess: bool = True,
) -> list[str]:
    """The quantization itself, ONNX file to ONNX file: (``quant_pre_process``,) then ``quantize_static``
    with the settings of this module (QDQ, int8 weights per output channel, uint8 activations) calibrated on
    ``calibration`` (tensors whose [None] is an input "image"). ``exclude(graph)``: names of nodes to keep
    float. Returns those names.

    uint8 activations, not int8: with int8 ones onnxruntime (1.32, x86) fused only the convolutions whose
    input tensor had one consumer into integer QLinearConv; the first conv of every ResNet block and the
    downsampling convs (their input also feeds the residual Add) ran as float convs on dequantized tensors, and
    EMANet-R50 at 257x257 took 577 ms against 701 ms in float32. With uint8 all 56 fused (and the residual
    Adds became QLinearAdd): 216 ms."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    root = logging.getLogger()
    if not root.handlers:  # onnxruntime.quantization logs through the root logger: its first call would add
        root.addHandler(logging.NullHandler())  # a stderr handler (basicConfig) that repeats every emanet line
    if preprocess:
        pre = target.with_name(f"{target.stem}.pre.onnx")
        quant_pre_process(str(source), str(pre))
        source = pre
    excluded = exclude(onnx.load(str(source)).graph)
    quantize_static(
        str(source),
        str(target),
        CalibrationImages(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,  # U8S8: see the docstring
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded,
    )
    return excluded


def quantize_int8(
    model: LoadedModel | nn.Module,
    path: str | Path,
    calibration: Sequence[torch.Tensor],
    *,
    height: int = 512,
    width: int = 512,
    opset: int | None = None,
    metadata: dict[str, str] | None = None,
    preprocess: bool = True,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` as an int8 QDQ ONNX file calibrated on ``calibration`` (normalised (3, H, W) images,
    as the eval transform gives them); returns the path.

    Inputs, outputs and metadata are the float export's (``export.export_onnx``; ``height``/``width`` size
    its example input, the graph stays dynamic; ``opset`` as there, at least 13 for per-channel QDQ).
    Convolutions: int8 weights per output channel, uint8 activations (U8S8); the EMA units stay float32
    (module docstring).
    ``preprocess``: onnxruntime's ``quant_pre_process`` first (recommended by onnxruntime). Written
    atomically like the float export: ``verify`` (e.g. a label agreement check) reads the temporary, and a
    failure leaves an existing ``path`` as it was.
    """
    require_onnx("onnx", "onnxruntime")
    import onnx

    if not calibration:
        raise ConfigError("int8 quantization needs at least one calibration image")
    path = Path(path)
    module = model.model if isinstance(model, LoadedModel) else model
    with tempfile.TemporaryDirectory(prefix="emanet-int8-") as tmp:
        float_path = export_onnx(
            model, Path(tmp) / "float.onnx", height=height, width=width, opset=opset, metadata=metadata
        )
        # quantize_static drops metadata_props: the int8 file gets the float file's, key for key
        metadata = {p.key: p.value for p in onnx.load(str(float_path), load_external_data=False).metadata_props}
        quantized = Path(tmp) / "int8.onnx"
        excluded = quantize_file(
            float_path,
            quantized,
            calibration,
            exclude=lambda graph: float_node_names(graph, module),
            preprocess=preprocess,
        )
        with atomic_path(path) as out:
            out.write_bytes(quantized.read_bytes())
            if metadata:
                add_metadata(out, metadata)
            onnx.checker.check_model(str(out))
            if verify is not None:
                verify(out)
    logger.info(f"int8: {len(excluded)} nodes kept in float32 (EMA units, first conv, classifier)")
    return path


def int8_parity(model: LoadedModel | nn.Module, path: str | Path, images: Iterable[torch.Tensor]) -> Parity:
    """The int8 graph at ``path`` (onnxruntime, CPU) against the float32 PyTorch ``model`` on ``images``
    (normalised (3, H, W), one at a time): label agreement, and the logit differences for information."""
    module = model.model if isinstance(model, LoadedModel) else model
    return compare(inference_copy(module), onnx_session(path), (x[None].float() for x in images))


def read_images(paths: Sequence[Path], config: Config) -> list[torch.Tensor]:
    """Image files as normalised (3, H, W) tensors, read as Predictor reads them (``predict.preprocess`` with
    ``config``'s evaluation transform)."""
    transform = config.eval_transform()
    return [preprocess(p, transform)[1] for p in paths]
