"""Predict label maps for new images: a ``Predictor`` built once (the file loop behind ``emanet predict`` is
predict_files.py).

Every image goes through the evaluation pipeline: EXIF orientation (``data.read_image``), the config's
mean/std on RGB in [0, 1], padding of the normalised tensor bottom/right with 0 to H, W = offset mod multiple
(the reference's 1 mod 8; mmseg models: none), then ``inference.infer`` (whole / sliding window, whose windows
are clipped to images smaller than the crop / multi-scale + flip), and the padding is cropped off again, so
results come back at the image's own size.
"""

from __future__ import annotations

import contextlib
import copy
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from emanet.config import Config
from emanet.data.base import read_image
from emanet.data.palettes import Palette, distinct_palette, index_image
from emanet.deploy.attention_maps import attention_unit, blend, capture_attention
from emanet.deploy.hub import resolve_source
from emanet.deploy.onnx_model import OnnxModel, is_onnx_file, load_onnx
from emanet.errors import ConfigError
from emanet.fields import one_of
from emanet.inference import Mode, check_inference_args, infer, infer_whole
from emanet.models.em import set_eval_stages
from emanet.models.fuse import prepare_for_inference
from emanet.pretrained import load_model
from emanet.runtime import Precision, autocast, maybe_compile, select_device

ImageInput = str | Path | Image.Image | np.ndarray


@dataclass
class Prediction:
    """One image's result: labels at the image's size, with probabilities and attention when asked for."""

    labels: np.ndarray  # (H, W) class indices at the image's size; uint8 (int64 beyond 256 classes)
    image: Image.Image  # the RGB input, EXIF orientation applied
    palette: Palette
    padded_size: tuple[int, int]  # (Hp, Wp) the model saw
    probs: np.ndarray | None = None  # (C, H, W) float32 class probabilities, when asked for
    attention: np.ndarray | None = None  # (K, h, w) float32 responsibilities of the padded input, when asked

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the image and its labels."""
        return self.labels.shape[0], self.labels.shape[1]

    def index_image(self) -> Image.Image:
        """Mode "P" PNG-ready image: pixel values are the class indices, coloured by the palette."""
        if self.labels.dtype != np.uint8:  # > 256 classes do not fit a palette image: 16-bit grey
            return Image.fromarray(self.labels.astype(np.uint16))
        return index_image(self.labels, self.palette)

    def color(self) -> np.ndarray:
        """(H, W, 3) uint8 palette colours of the labels."""
        return np.asarray(self.palette, dtype=np.uint8)[self.labels]

    def color_image(self) -> Image.Image:
        """The label colours as an RGB image."""
        return Image.fromarray(self.color())

    def overlay(self, alpha: float = 0.5) -> Image.Image:
        """The image blended with the label colours: ``(1 - alpha) * image + alpha * colours``."""
        return blend(self.image, self.color(), alpha)


def to_rgb(image: ImageInput) -> Image.Image:
    """A path, PIL image or (H, W, 3) uint8 array -> PIL RGB image, EXIF orientation applied as in training."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image).convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an array image must be (H, W, 3) uint8 RGB, got shape {image.shape} {image.dtype}")
        return Image.fromarray(np.ascontiguousarray(image))
    raise TypeError(f"expected a path, a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}")


def preprocess(image: ImageInput, transform) -> tuple[Image.Image, torch.Tensor]:
    """-> (RGB image, EXIF orientation applied; ``transform`` of it as a (3, Hp, Wp) tensor): an evaluation
    transform (``Config.eval_transform``) given a dummy label, which it pads and drops."""
    rgb = to_rgb(image)
    x, _ = transform(rgb, np.zeros((rgb.height, rgb.width), dtype=np.uint8))
    return rgb, x


def _full_palette(palette: Palette | None, num_classes: int) -> Palette:
    """``palette`` as int triples, filled up with distinct colours when it is too short."""
    colours = [tuple(int(v) for v in c) for c in (palette or [])]
    return colours + distinct_palette(num_classes)[len(colours) :]


class Predictor:
    """A model plus its preprocessing and test-time settings; call it on images.

    ``Predictor.from_source(path)`` loads a model folder, checkpoint file, run folder or ONNX file once. Test-time
    options default to the config's ``eval`` section (mode, scales, flip, crop_size, stride, eval_stages).
    ``eval_stages`` is set on the EMA units of the model predicted with, which is in eval mode. Images of the
    same padded size are batched ``batch_size`` at a time.

    ``prepare`` (default): predict with a copy of the model made for inference (BatchNorm folded into the
    convolutions, ReLU/add fused into them on CPU, channels_last; ``models.fuse.prepare_for_inference``): the
    same results within float32 rounding (1.3-1.7x the eager model's error against float64, from channels_last:
    ``models.fuse``, "Precision"), faster (benchmarks/results.md); the model passed in is left as it was.
    ``prepare=False`` runs the model itself, eager. ``compile``: also ``torch.compile`` it (opt-in; a cold
    compile costs tens of seconds on a CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        config: Config,
        *,
        class_names: Sequence[str] | None = None,
        palette: Palette | None = None,
        device: str | torch.device | None = None,
        precision: Precision = "fp32",
        mode: Mode | None = None,
        scales: Sequence[float] | None = None,
        flip: bool | None = None,
        crop_size: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        eval_stages: int | None = None,
        batch_size: int = 1,
        prepare: bool = True,
        compile: bool = False,
    ) -> None:
        e, d = config.eval, config.data
        self.config = config
        self.num_classes = config.model.num_classes
        self.class_names = (
            list(class_names) if class_names is not None else [f"class_{i}" for i in range(self.num_classes)]
        )
        self.palette = _full_palette(palette, self.num_classes)
        if precision not in typing.get_args(Precision):
            raise ConfigError(f"precision must be {one_of(typing.get_args(Precision))}, got {precision!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.precision, self.batch_size = precision, batch_size
        self.mode = mode if mode is not None else e.mode
        self.scales = tuple(float(s) for s in (scales if scales is not None else e.scales))
        self.flip = flip if flip is not None else e.flip
        self.crop_size = crop_size if crop_size is not None else e.crop_size
        self.stride = stride if stride is not None else e.stride
        check_inference_args(self.mode, self.scales, self.crop_size, self.stride)
        stages = eval_stages if eval_stages is not None else e.eval_stages
        if isinstance(model, OnnxModel):  # the graph was prepared at export (BatchNorm folded): run it as it is
            model.check_options(device=device, precision=precision, compile=compile, eval_stages=stages)
            device, prepare = "cpu", False
        if device is None:
            param = next(model.parameters(), None)
            device = param.device if param is not None else "cpu"
        self.device = select_device(device) if isinstance(device, str) else torch.device(device)
        autocast(self.device, precision)  # fails now, not at the first image, for fp16 without CUDA
        # prepared: a copy, since folding BatchNorm rewrites weights the caller may still train
        model = prepare_for_inference(copy.deepcopy(model).to(self.device)) if prepare else model.to(self.device).eval()
        if stages is not None:
            set_eval_stages(model, stages)
        self.prepared = prepare
        self.model = maybe_compile(model, compile)
        # the evaluation transform: (mmseg's keep-ratio resize,) normalise, pad bottom/right with 0 (the mean)
        self._resized = d.eval_resize is not None
        self._transform = config.eval_transform()

    @classmethod
    def from_source(
        cls, source: str | Path, *, device: str = "auto", overrides: Sequence[str] = (), **options
    ) -> Predictor:
        """Load a model folder, a checkpoint file, a run folder, ``hf://user/repo`` (a Hugging Face Hub repo,
        the hub extra) or an exported ``.onnx`` file (run by onnxruntime on the CPU, the onnx extra;
        deploy/onnx_model.py); ``options`` are the constructor's keywords."""
        if is_onnx_file(source):
            loaded = load_onnx(source, overrides=overrides)
        else:
            device = select_device(device)
            loaded = load_model(resolve_source(source), device=device, overrides=list(overrides))
        names, palette = loaded.class_names, loaded.palette
        return cls(loaded.model, loaded.config, class_names=names, palette=palette, device=device, **options)

    @property
    def plain(self) -> bool:
        """One whole-image forward at scale 1 without flip (then attention comes from that very forward)."""
        return self.mode == "whole" and self.scales == (1.0,) and not self.flip

    def require_attention(self) -> None:
        """Raise a clear ConfigError now if the model has no EM attention unit (or its inputs are resized)."""
        if isinstance(self.model, OnnxModel):
            raise ConfigError(
                f"{self.model.path}: attention maps are not in an ONNX graph (its only output is the logits); "
                "predict them from the model folder or checkpoint it was exported from"
            )
        attention_unit(self.model)
        if self._resized:
            raise ConfigError(
                "attention maps are not available with data.eval_resize (the model sees a resized "
                "image); load the model with the override data.eval_resize=null for them"
            )

    def preprocess(self, image: ImageInput) -> tuple[Image.Image, torch.Tensor]:
        """-> (RGB image, normalised (resized with data.eval_resize) and padded tensor (3, Hp, Wp))."""
        return preprocess(image, self._transform)

    def __call__(self, image: ImageInput, *, probs: bool = False, attention: bool = False) -> Prediction:
        return self.predict_batch([image], probs=probs, attention=attention)[0]

    def predict_batch(
        self, images: Sequence[ImageInput], *, probs: bool = False, attention: bool = False
    ) -> list[Prediction]:
        """Predictions in input order; images are grouped by padded size and run ``batch_size`` at a time."""
        if attention:
            self.require_attention()
        prepared = [self.preprocess(im) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (rgb, x) in enumerate(prepared):
            # resized inputs are predicted at their own size: a batch shares it too
            key = (x.shape[1], x.shape[2]) + ((rgb.height, rgb.width) if self._resized else ())
            groups.setdefault(key, []).append(i)
        results: list[Prediction | None] = [None] * len(prepared)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = torch.stack([prepared[i][1] for i in chunk])  # (B, 3, Hp, Wp)
                for i, pred in zip(chunk, self._run(batch, [prepared[i][0] for i in chunk], probs, attention)):
                    results[i] = pred
        return results  # type: ignore[return-value]

    def _run(self, batch: torch.Tensor, rgbs: list[Image.Image], want_probs: bool, want_attention: bool):
        x = batch.to(self.device)
        hp, wp = x.shape[-2:]
        capture = capture_attention(self.model) if want_attention else None
        with capture or contextlib.nullcontext(), autocast(self.device, self.precision):
            p = infer(
                self.model,
                x,
                mode=self.mode,
                scales=self.scales,
                flip=self.flip,
                crop_size=self.crop_size,
                stride=self.stride,
                num_classes=self.num_classes,
                align_corners=self.config.model.align_corners,
                out_size=(rgbs[0].height, rgbs[0].width) if self._resized else None,
                probabilities=want_probs,  # labels only: one pass's logits, no full-resolution softmax
            )
            if want_attention and not self.plain:
                infer_whole(self.model, x)  # attention of the plain forward, not of the last scale/flip/window
        p = p.float()  # (B, C, Hp, Wp): probabilities, or scores with the same argmax
        resp = capture.responsibilities.float().cpu().numpy() if capture else None  # (B, K, h, w)
        labels = p.max(1).indices.cpu().numpy()  # (B, Hp, Wp); max's indices = argmax's, faster on channels_last
        out = []
        for j, rgb in enumerate(rgbs):
            h, w = rgb.height, rgb.width
            lab = labels[j, :h, :w]
            lab = lab.astype(np.uint8) if self.num_classes <= 256 else lab.astype(np.int64)
            out.append(
                Prediction(
                    labels=np.ascontiguousarray(lab),
                    image=rgb,
                    palette=self.palette,
                    padded_size=(int(hp), int(wp)),
                    probs=p[j, :, :h, :w].cpu().numpy().copy() if want_probs else None,
                    attention=resp[j].copy() if resp is not None else None,
                )
            )
        return out
