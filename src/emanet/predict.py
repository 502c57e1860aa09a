"""Predict label maps for new images: a ``Predictor`` built once, and the file loop behind ``emanet predict``.

Every image goes through the evaluation pipeline: EXIF orientation (``data.read_image``), the config's
mean/std on RGB in [0, 1], padding of the normalised tensor bottom/right with 0 to H, W = offset mod multiple
(the reference's 1 mod 8; mmseg models: none), then ``inference.infer`` (whole / sliding window, whose windows
are clipped to images smaller than the crop / multi-scale + flip), and the padding is cropped off again, so
results come back at the image's own size.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from emanet.attention_maps import attention_grid, attention_unit, blend, capture_attention, save_attention_arrays
from emanet.compiled import maybe_compile
from emanet.config import Config
from emanet.data.base import IMAGE_SUFFIXES, DataError, read_image
from emanet.data.palettes import Palette, distinct_palette, index_image
from emanet.data.transforms import eval_transform
from emanet.em import set_eval_stages
from emanet.inference import check_inference_args, infer, infer_whole
from emanet.models.fuse import prepare_for_inference
from emanet.runtime import autocast, select_device

ImageInput = str | Path | Image.Image | np.ndarray


@dataclass
class Prediction:
    labels: np.ndarray  # (H, W) class indices at the image's size; uint8 (int64 beyond 256 classes)
    image: Image.Image  # the RGB input, EXIF orientation applied
    palette: Palette
    padded_size: tuple[int, int]  # (Hp, Wp) the model saw
    probs: np.ndarray | None = None  # (C, H, W) float32 class probabilities, when asked for
    attention: np.ndarray | None = None  # (K, h, w) float32 responsibilities of the padded input, when asked

    @property
    def size(self) -> tuple[int, int]:
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


class Predictor:
    """A model plus its preprocessing and test-time settings; call it on images.

    ``Predictor.from_source(path)`` loads a model folder, checkpoint file or run folder once. Test-time
    options default to the config's ``eval`` section (mode, scales, flip, crop_size, stride, eval_stages).
    ``eval_stages`` is set on the EMA units of the model predicted with, which is in eval mode. Images of the
    same padded size are batched ``batch_size`` at a time.

    ``prepare`` (default): predict with a copy of the model made for inference (BatchNorm folded into the
    convolutions, channels_last; ``models.fuse.prepare_for_inference``): the same results within float32
    rounding, faster (benchmarks/results.md); the model passed in is left as it was. ``prepare=False`` runs
    the model itself, eager. ``compile``: also ``torch.compile`` it (opt-in; a cold compile costs tens of
    seconds on a CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        config: Config,
        *,
        class_names: Sequence[str] | None = None,
        palette: Palette | None = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        mode: str | None = None,
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
        colours = [tuple(int(v) for v in c) for c in (palette or [])]
        if len(colours) < self.num_classes:  # too short a palette: fill up with distinct colours
            colours += distinct_palette(self.num_classes)[len(colours) :]
        self.palette: Palette = colours
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.precision, self.batch_size = precision, batch_size
        self.mode = mode if mode is not None else e.mode
        self.scales = tuple(float(s) for s in (scales if scales is not None else e.scales))
        self.flip = flip if flip is not None else e.flip
        self.crop_size = crop_size if crop_size is not None else e.crop_size
        self.stride = stride if stride is not None else e.stride
        check_inference_args(self.mode, self.scales, self.crop_size, self.stride)
        if device is None:
            param = next(model.parameters(), None)
            device = param.device if param is not None else "cpu"
        self.device = select_device(device) if isinstance(device, str) else torch.device(device)
        autocast(self.device, precision)  # fails now, not at the first image, for fp16 without CUDA
        # prepared: a copy, since folding BatchNorm rewrites weights the caller may still train
        model = prepare_for_inference(copy.deepcopy(model).to(self.device)) if prepare else model.to(self.device).eval()
        stages = eval_stages if eval_stages is not None else e.eval_stages
        if stages is not None:
            set_eval_stages(model, stages)
        self.prepared = prepare
        self.model = maybe_compile(model, compile)
        # the evaluation transform: (mmseg's keep-ratio resize,) normalise, pad bottom/right with 0 (the mean)
        self._resized = d.eval_resize is not None
        self._transform = eval_transform(
            mean=d.mean,
            std=d.std,
            pad_multiple=d.eval_pad_multiple or None,
            pad_offset=d.eval_pad_offset,
            keep_ratio_resize=d.eval_resize,
        )

    @classmethod
    def from_source(
        cls, source: str | Path, *, device: str = "auto", overrides: Sequence[str] = (), **options
    ) -> Predictor:
        """Load a model folder, a checkpoint file or a run folder; ``options`` are the constructor's keywords."""
        from emanet.pretrained import load_model

        dev = select_device(device)
        loaded = load_model(source, device=dev, overrides=list(overrides))
        return cls(
            loaded.model, loaded.config, class_names=loaded.class_names, palette=loaded.palette, device=dev, **options
        )

    @property
    def plain(self) -> bool:
        """One whole-image forward at scale 1 without flip (then attention comes from that very forward)."""
        return self.mode == "whole" and self.scales == (1.0,) and not self.flip

    def require_attention(self) -> None:
        """Raise a clear ValueError now if the model has no EM attention unit (or its inputs are resized)."""
        attention_unit(self.model)
        if self._resized:
            raise ValueError(
                "attention maps are not available with data.eval_resize (the model sees a resized "
                "image); load the model with the override data.eval_resize=null for them"
            )

    def preprocess(self, image: ImageInput) -> tuple[Image.Image, torch.Tensor]:
        """-> (RGB image, normalised (resized with data.eval_resize) and padded tensor (3, Hp, Wp))."""
        rgb = to_rgb(image)
        x, _ = self._transform(rgb, np.zeros((rgb.height, rgb.width), dtype=np.uint8))
        return rgb, x

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

    def _probabilities(self, x: torch.Tensor, rgbs: list[Image.Image]) -> torch.Tensor:
        return infer(
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
        )

    def _run(self, batch: torch.Tensor, rgbs: list[Image.Image], want_probs: bool, want_attention: bool):
        x = batch.to(self.device)
        hp, wp = x.shape[-2:]
        capture = capture_attention(self.model) if want_attention else None
        with capture or contextlib.nullcontext(), autocast(self.device, self.precision):
            if self.plain and not want_probs and not self._resized:
                # labels only: argmax(softmax(logits)) is argmax(logits), so no full-resolution softmax
                p = infer_whole(self.model, x)
            else:
                p = self._probabilities(x, rgbs)
            if want_attention and not self.plain:
                infer_whole(self.model, x)  # attention of the plain forward, not of the last scale/flip/window
        p = p.float()  # (B, C, Hp, Wp): probabilities, or logits (same argmax)
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


# ----------------------------------------------------------------------------- files in, files out

_MAGIC = re.compile(r"[*?\[]")


@dataclass
class InputFile:
    path: Path
    name: str  # output name without suffix, relative to --out (may contain folders)


def _images_in(folder: Path, exclude: Path | None) -> list[Path]:
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if exclude is not None:  # do not predict on our own outputs when --out lies inside an input folder
        found = [p for p in found if not p.resolve().is_relative_to(exclude)]
    return found


def _rel_name(path: Path, base: Path) -> str:
    return path.relative_to(base).with_suffix("").as_posix()


def collect_inputs(inputs: Sequence[str], *, exclude: str | Path | None = None) -> tuple[list[InputFile], list[str]]:
    """Files, folders (recursive, image suffixes) and globs -> (inputs with output names, problems).

    Names mirror the inputs: a file gives its stem, a folder the paths relative to it, a glob the paths
    relative to its last folder without wildcards. Names two inputs would share get the suffix appended
    (``a_jpg``, ``a_png``). ``problems`` lists inputs that matched nothing.
    """
    ex = Path(exclude).resolve() if exclude is not None else None
    found: list[InputFile] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append(InputFile(path, path.stem))
        elif path.is_dir():
            files = _images_in(path, ex)
            if not files:
                problems.append(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            found += [InputFile(p, _rel_name(p, path)) for p in files]
        elif _MAGIC.search(item):
            parts = path.parts
            fixed = next(i for i, part in enumerate(parts) if _MAGIC.search(part))
            base = Path(*parts[:fixed]) if fixed else Path(".")
            matches = sorted(base.glob(Path(*parts[fixed:]).as_posix()))
            files = []
            for m in matches:
                if m.is_dir():
                    files += _images_in(m, ex)
                elif m.is_file() and (ex is None or not m.resolve().is_relative_to(ex)):
                    files.append(m)
            if not files:
                problems.append(f"{item}: the pattern matches no image files")
            found += [InputFile(p, _rel_name(p, base)) for p in files]
        else:
            problems.append(f"{item}: no such file or folder")

    unique, seen = [], set()  # a file named twice (as a file and inside a folder) is predicted once
    for f in found:
        key = f.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    counts: dict[str, int] = {}
    for f in unique:
        counts[f.name] = counts.get(f.name, 0) + 1
    taken: set[str] = set()
    for f in unique:
        name = f"{f.name}_{f.path.suffix.lstrip('.').lower()}" if counts[f.name] > 1 else f.name
        base_name, n = name, 1
        while name in taken:
            n += 1
            name = f"{base_name}_{n}"
        taken.add(name)
        f.name = name
    return unique, problems


def save_outputs(
    pred: Prediction,
    out_dir: str | Path,
    name: str,
    *,
    alpha: float = 0.5,
    attention_bases: int = 6,
    save_arrays: bool = False,
    align_corners: bool = True,
) -> list[Path]:
    """Write NAME.png (index, palette), NAME_color.png, NAME_overlay.png and, with attention,
    NAME_attention.png (+ NAME_attention.npz when ``save_arrays``). Returns the paths written."""
    stem = Path(out_dir) / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_name(stem.name + s) for s in (".png", "_color.png", "_overlay.png")]
    pred.index_image().save(written[0])
    pred.color_image().save(written[1])
    pred.overlay(alpha).save(written[2])
    if pred.attention is not None:
        grid = attention_grid(
            pred.image,
            pred.attention,
            padded_size=pred.padded_size,
            num_bases=attention_bases,
            align_corners=align_corners,
        )
        written.append(stem.with_name(stem.name + "_attention.png"))
        grid.image.save(written[-1])
        if save_arrays:
            written.append(stem.with_name(stem.name + "_attention.npz"))
            save_attention_arrays(
                written[-1],
                pred.attention,
                grid.indices,
                grid.shares,
                image_size=pred.size,
                padded_size=pred.padded_size,
            )
    return written


@dataclass
class PredictOptions:
    alpha: float = 0.5  # overlay opacity of the label colours
    attention: bool = False  # write NAME_attention.png (EMANet models only)
    attention_bases: int = 6  # bases shown, the heaviest by responsibility mass
    save_arrays: bool = False  # also NAME_attention.npz with the raw responsibilities


def predict_files(
    predictor: Predictor,
    files: Sequence[InputFile],
    out_dir: str | Path,
    *,
    options: PredictOptions | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> list[tuple[Path, str]]:
    """Predict every file and write its outputs; unreadable files are logged, skipped and returned.

    Files are read ``predictor.batch_size`` at a time. Returns ``[(path, reason), ...]`` for the failures.
    """
    opts = options or PredictOptions()
    if not 0.0 <= opts.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {opts.alpha}")
    if opts.attention_bases < 1:
        raise ValueError(f"--attention-bases must be >= 1, got {opts.attention_bases}")
    want_attention = opts.attention or opts.save_arrays
    if want_attention:
        predictor.require_attention()
    align_corners = predictor.config.model.align_corners
    failures: list[tuple[Path, str]] = []

    def fail(f: InputFile, error: Exception) -> None:
        reason = str(error)
        if isinstance(error, DataError) and reason.startswith(f"{f.path}: "):
            reason = reason[len(f"{f.path}: ") :]
        failures.append((f.path, reason))
        log(f"{f.path}: {reason}")

    bar = None
    if progress:
        from emanet.progress import progress_bar

        bar = progress_bar(total=len(files), desc="predict", unit="img")
    try:
        for start in range(0, len(files), predictor.batch_size):
            chunk, images = [], []
            for f in files[start : start + predictor.batch_size]:
                try:
                    images.append(read_image(f.path))
                    chunk.append(f)
                except (OSError, DataError, Image.DecompressionBombError) as e:
                    fail(f, e)
            preds = predictor.predict_batch(images, attention=want_attention) if images else []
            for f, pred in zip(chunk, preds):
                try:
                    save_outputs(
                        pred,
                        out_dir,
                        f.name,
                        alpha=opts.alpha,
                        attention_bases=opts.attention_bases,
                        save_arrays=opts.save_arrays,
                        align_corners=align_corners,
                    )
                except OSError as e:
                    fail(f, OSError(f"cannot write outputs to {out_dir}: {e}"))
            if bar is not None:
                bar.update(len(files[start : start + predictor.batch_size]))
    finally:
        if bar is not None:
            bar.close()
    return failures


__all__ = [
    "IMAGE_SUFFIXES",
    "InputFile",
    "PredictOptions",
    "Prediction",
    "Predictor",
    "collect_inputs",
    "predict_files",
    "save_outputs",
    "to_rgb",
]
