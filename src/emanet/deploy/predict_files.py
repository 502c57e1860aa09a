"""The file loop behind ``emanet predict``: inputs (files, folders, globs) -> a ``Predictor`` -> label PNGs,
colour maps, overlays, probabilities and attention maps under ``--out``, names mirroring the inputs.

Every output is written through ``checkpoint.atomic_path`` (a temporary beside it, renamed when complete), so
no truncated PNG ever stands under an output's name. Before any work ``plan_outputs`` refuses outputs that
exist already (unless overwrite) and sets aside inputs whose output names the file system cannot hold. While
predicting, an output the file system refuses fails that input only; a full or read-only disk stops the run.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from emanet.checkpoint import atomic_path
from emanet.data.base import IMAGE_SUFFIXES, read_image
from emanet.deploy.attention_maps import attention_grid, save_attention_arrays
from emanet.deploy.predict import Prediction, Predictor
from emanet.errors import ConfigError, DataError
from emanet.progress import progress_bar

logger = logging.getLogger(__name__)
_MAGIC = re.compile(r"[*?\[]")
OUTPUTS = (".png", "_color.png", "_overlay.png")  # NAME + each, for every input
ATTENTION, ARRAYS = "_attention.png", "_attention.npz"  # with --attention, with --save-arrays
# the disk as a whole refuses: every further image would fail the same way, so the run stops
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


@dataclass
class InputFile:
    path: Path
    name: str  # output name without suffix, relative to --out (may contain folders)


def _images_in(folder: Path, exclude: Path | None) -> tuple[list[Path], int]:
    """The images under ``folder``, and how many of them were left out because they lie under ``exclude``."""
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if exclude is None:
        return found, 0
    # do not predict on our own outputs when --out lies inside an input folder
    kept = [p for p in found if not p.resolve().is_relative_to(exclude)]
    return kept, len(found) - len(kept)


def _excluded(item: str, count: int, exclude: Path) -> str:
    return (
        f"{item}: its {count} image(s) lie under --out {exclude} and were left out (outputs are never "
        "read back as inputs); give an --out outside the input folder"
    )


def _rel_name(path: Path, base: Path) -> str:
    return path.relative_to(base).with_suffix("").as_posix()


def _glob(pattern: Path, exclude: Path | None) -> tuple[Path, list[Path], int]:
    """(its last folder without wildcards, the files it matches (images in the folders it matches), how many
    were left out because they lie under ``exclude``)."""
    parts = pattern.parts
    fixed = next(i for i, part in enumerate(parts) if _MAGIC.search(part))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    files, left_out = [], 0
    for m in sorted(base.glob(Path(*parts[fixed:]).as_posix())):
        if m.is_dir():
            inside, n = _images_in(m, exclude)
            files, left_out = files + inside, left_out + n
        elif m.is_file() and exclude is not None and m.resolve().is_relative_to(exclude):
            left_out += 1
        elif m.is_file():
            files.append(m)
    return base, files, left_out


def collect_inputs(inputs: Sequence[str], *, exclude: str | Path | None = None) -> tuple[list[InputFile], list[str]]:
    """Files, folders (recursive, image suffixes) and globs -> (inputs with output names, problems).

    Names mirror the inputs: a file gives its stem, a folder the paths relative to it, a glob the paths
    relative to its last folder without wildcards. Names two inputs would share get the suffix appended
    (``a_jpg``, ``a_png``). ``problems`` lists inputs that matched nothing, or only images under ``exclude``.
    """
    ex = Path(exclude).resolve() if exclude is not None else None
    found: list[InputFile] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append(InputFile(path, path.stem))
        elif path.is_dir():
            files, left_out = _images_in(path, ex)
            if not files and left_out:
                problems.append(_excluded(item, left_out, ex))
            elif not files:
                problems.append(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            found += [InputFile(p, _rel_name(p, path)) for p in files]
        elif _MAGIC.search(item):
            base, files, left_out = _glob(path, ex)
            if not files and left_out:
                problems.append(_excluded(item, left_out, ex))
            elif not files:
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


def _save_image(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_outputs(
    pred: Prediction,
    out_dir: str | Path,
    name: str,
    *,
    align_corners: bool,
    alpha: float = 0.5,
    attention_bases: int = 6,
    save_arrays: bool = False,
) -> list[Path]:
    """Write NAME.png (index, palette), NAME_color.png, NAME_overlay.png and, with attention,
    NAME_attention.png (+ NAME_attention.npz when ``save_arrays``), each atomically. Returns the paths written.

    ``align_corners`` is the model's (``config.model.align_corners``): attention maps are upsampled with it."""
    stem = Path(out_dir) / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_name(stem.name + s) for s in OUTPUTS]
    _save_image(pred.index_image(), written[0])
    _save_image(pred.color_image(), written[1])
    _save_image(pred.overlay(alpha), written[2])
    if pred.attention is not None:
        grid = attention_grid(
            pred.image,
            pred.attention,
            padded_size=pred.padded_size,
            num_bases=attention_bases,
            align_corners=align_corners,
        )
        written.append(stem.with_name(stem.name + ATTENTION))
        _save_image(grid.image, written[-1])
        if save_arrays:
            written.append(stem.with_name(stem.name + ARRAYS))
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


def output_paths(out_dir: str | Path, name: str, options: PredictOptions) -> list[Path]:
    """The files ``save_outputs`` writes for the input named ``name`` with these options."""
    suffixes = OUTPUTS + ((ATTENTION,) if options.attention else ()) + ((ARRAYS,) if options.save_arrays else ())
    stem = Path(out_dir) / name
    return [stem.with_name(stem.name + s) for s in suffixes]


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` takes (255 where it does not say)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def plan_outputs(
    files: Sequence[InputFile], out_dir: str | Path, options: PredictOptions, *, overwrite: bool
) -> tuple[list[InputFile], list[tuple[Path, str]]]:
    """Before any work: (the inputs to predict, [(input, reason)] for those set aside because an output name is
    longer than the file system takes). Outputs that exist already are a ConfigError naming the first few,
    unless ``overwrite``."""
    out_dir = Path(out_dir)
    limit = _name_max(out_dir) if out_dir.is_dir() else 255
    kept, refused, existing = [], [], []
    for f in files:
        paths = output_paths(out_dir, f.name, options)
        # the longest part of any output's name (NAME may hold folders)
        size, part = max((len(os.fsencode(part)), part) for p in paths for part in p.relative_to(out_dir).parts)
        if size > limit:
            why = f"its output name {part} is {size} bytes, longer than the {limit} the file system of {out_dir} takes"
            refused.append((f.path, f"{why}; rename the input"))
            continue
        kept.append(f)
        existing += [p for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        shown = ", ".join(str(p) for p in existing[:3]) + more
        raise ConfigError(
            f"--out {out_dir}: {len(existing)} output(s) exist already ({shown}); add --overwrite to replace them, "
            "or choose another --out"
        )
    return kept, refused


def predict_files(
    predictor: Predictor,
    files: Sequence[InputFile],
    out_dir: str | Path,
    *,
    options: PredictOptions | None = None,
    progress: bool = False,
) -> list[tuple[Path, str]]:
    """Predict every file and write its outputs; a file that cannot be read, or whose outputs the file system
    refuses, is logged (a warning), skipped and returned. A full or read-only disk stops the run: an OSError
    naming the output.

    Files are read ``predictor.batch_size`` at a time. Returns ``[(path, reason), ...]`` for the failures.
    """
    opts = options or PredictOptions()
    if not 0.0 <= opts.alpha <= 1.0:
        raise ConfigError(f"--alpha must be in [0, 1], got {opts.alpha}")
    if opts.attention_bases < 1:
        raise ConfigError(f"--attention-bases must be >= 1, got {opts.attention_bases}")
    want_attention = opts.attention or opts.save_arrays
    if want_attention:
        predictor.require_attention()
    failures: list[tuple[Path, str]] = []

    def fail(f: InputFile, error: Exception) -> None:
        reason = str(error)
        if isinstance(error, DataError) and reason.startswith(f"{f.path}: "):
            reason = reason[len(f"{f.path}: ") :]
        failures.append((f.path, reason))
        logger.warning("%s: %s", f.path, reason)

    bar = progress_bar(total=len(files), desc="predict", unit="img") if progress else None
    done = 0
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
                    _save(pred, out_dir, f.name, opts, align_corners=predictor.config.model.align_corners)
                    done += 1
                except OSError as e:
                    if e.errno in DISK_FULL:
                        logger.warning(
                            "stopped after %d of %d images: no more outputs fit %s", done, len(files), out_dir
                        )
                        raise
                    fail(f, OSError(f"cannot write {e.filename or out_dir}: {e.strerror or e}"))
            if bar is not None:
                bar.update(len(files[start : start + predictor.batch_size]))
    finally:
        if bar is not None:
            bar.close()
    return failures


def _save(pred: Prediction, out_dir: str | Path, name: str, opts: PredictOptions, *, align_corners: bool) -> None:
    save_outputs(
        pred,
        out_dir,
        name,
        align_corners=align_corners,
        alpha=opts.alpha,
        attention_bases=opts.attention_bases,
        save_arrays=opts.save_arrays,
    )
