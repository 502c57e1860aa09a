"""The data of a training run: the datasets a config names, and the checks made before training starts.

``build_datasets`` builds the train and validation splits with their transforms; ``check_class_count`` and
``check_val_files`` refuse what would fail late (a class count that does not match the data, a bad
validation file found only after the whole training); ``skip_bad_samples`` wraps the training set for
``data.on_bad_sample=skip``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import Dataset

from emanet.config import Config
from emanet.data import SkipBadSamples, build_dataset
from emanet.data.transforms import train_transform
from emanet.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def build_datasets(cfg: Config) -> tuple[Dataset, Dataset]:
    d = cfg.data
    train_tf = train_transform(
        crop_size=d.crop_size,
        scales=d.scales,
        flip=d.flip,
        jitter=d.jitter or None,
        mean=d.mean,
        std=d.std,
        ignore_index=cfg.loss.ignore_index,
    )
    eval_tf = cfg.eval_transform()
    options = dict(d.options)
    val_options = dict(options)
    if d.dataset == "synthetic":  # generated: lengths per split instead of folders
        val_options["length"] = options.pop("val_length", 200)
        val_options.pop("val_length", None)
        root = None
    else:
        root = d.root
    train = build_dataset(d.dataset, root=root, split=d.train_split, transform=train_tf, seed=cfg.train.seed, **options)
    val = build_dataset(d.dataset, root=root, split=d.val_split, transform=eval_tf, **val_options)
    return train, val


def skip_bad_samples(dataset: Dataset, cfg: Config, log_path: Path) -> Dataset:
    """With data.on_bad_sample=skip, ``dataset`` wrapped to skip unreadable files and list them in ``log_path``."""
    if cfg.data.on_bad_sample != "skip":
        return dataset
    return SkipBadSamples(dataset, log_path=log_path)


def count_bad_samples(path: Path) -> int:
    """Distinct files in the skip log (one "path<TAB>reason" line per file; ranks may repeat a file)."""
    if not path.is_file():
        return 0
    return len({line.split("\t", 1)[0] for line in path.read_text().splitlines() if line.strip()})


def check_class_count(cfg: Config, *datasets: Dataset) -> None:
    """model.num_classes against the datasets' class lists (labels >= num_classes break the loss; fewer
    labels than outputs train silently wrong)."""
    n = cfg.model.num_classes
    for ds in datasets:
        found = getattr(ds, "num_classes", None)
        if found is not None and found != n:
            names = list(getattr(ds, "classes", ()))
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(
                f"model.num_classes={n} does not match the {cfg.data.dataset} dataset, which has "
                f"{found} classes ({shown}); set model.num_classes={found}"
            )


def bad_files(dataset: Dataset, limit: int = 0) -> list[str]:
    """'path: reason' for each image/label file of ``dataset`` that is missing, whose header does not read,
    or whose label size differs from its image; headers only, no pixels decoded (cheap for a val split)."""
    from PIL import Image

    problems: list[str] = []
    for image_path, label_path in getattr(dataset, "samples", []):
        sizes = []
        for path in (image_path, label_path):
            if path is None:
                continue
            try:
                with Image.open(path) as img:
                    sizes.append(img.size)
            except FileNotFoundError:
                problems.append(f"{path}: missing")
            except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
                problems.append(f"{path}: not a readable image ({type(e).__name__}: {e})")
        if len(sizes) == 2 and sizes[0] != sizes[1]:
            problems.append(
                f"{label_path}: label is {sizes[1][0]}x{sizes[1][1]} but its image is {sizes[0][0]}x{sizes[0][1]}"
            )
        if limit and len(problems) >= limit:
            break
    return problems


def check_val_files(val_set: Dataset, cfg: Config) -> None:
    """Refuse a bad validation file before training (data.on_bad_sample=raise) or say it will be skipped."""
    problems = bad_files(val_set)
    if not problems:
        return
    shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
    where = f"the validation split '{cfg.data.val_split}'"
    if cfg.data.on_bad_sample == "skip":
        logger.warning(
            "note: %d bad file(s) in %s are left out of evaluation (data.on_bad_sample=skip):\n  %s",
            len(problems),
            where,
            shown,
        )
        return
    raise DataError(
        f"{len(problems)} bad file(s) in {where}, found before training:\n  {shown}\nfix or remove "
        "them (`emanet check-data --split val` lists every problem), or set data.on_bad_sample=skip "
        "to leave them out of evaluation"
    )
