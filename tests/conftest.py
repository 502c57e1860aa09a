"""Fixtures that write tiny datasets (17x23 images) in the real folder layouts into tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emanet.data.palettes import VOC_PALETTE, index_image

H, W = 17, 23

# The one tiny model of the tests: a width-8 ResNet-18 with a 16-channel head and K=4. Model-level tests
# build it with tiny_model(**changes); run-level tests pass tiny_run(...) overrides to `emanet train`.
TINY_MODEL = dict(
    backbone="resnet18", backbone_width=8, stem="standard", num_classes=3, channels=16, mid_channels=8, num_bases=4
)


def tiny_model(**changes):
    """A ModelConfig of TINY_MODEL with ``changes``, e.g. tiny_model(arch="fcn", output_stride=16)."""
    from emanet.models.emanet import ModelConfig

    return ModelConfig(**{**TINY_MODEL, **changes})


def calibrated(model_config):
    """The model of ``model_config`` built under seed 0, its BatchNorm statistics and EM bases moved off their
    initial values by one train-mode batch (2x3x33x33, no gradients), returned in eval mode: what a model
    folder or an export in the tests holds, so that BN and the bases are not the identity."""
    from emanet.models.emanet import build_model

    torch.manual_seed(0)
    model = build_model(model_config).train()
    with torch.no_grad():
        model(torch.randn(2, 3, 33, 33))
    return model.eval()


def tiny_run(
    *extra: str, size: int = 32, scales: str = "[1.0]", length: int = 6, val_length: int = 2, sizes: bool = True
) -> list[str]:
    """Overrides for a CPU training run of the tiny model on the synthetic set (5 classes), ``extra`` last so
    they win: size = crop and scene size; length/val_length = scenes per split; sizes = small objects."""
    objects = "max_objects: 6, min_objects: 2" + (", min_size: 4, max_size: 6" if sizes else "")
    model = [f"model.{k}={v}" for k, v in {**TINY_MODEL, "num_classes": 5}.items()]
    data = [
        "data.dataset=synthetic",
        f"data.crop_size={size}",
        f"data.scales={scales}",
        "data.num_workers=0",
        "data.eval_pad_multiple=0",
        f"data.options={{length: {length}, val_length: {val_length}, image_size: {size}, {objects}}}",
    ]
    return [*model, *data, "train.device=cpu", *extra]


def run_cli(*args: str, timeout: int = 300, processes: int = 0) -> subprocess.CompletedProcess:
    """`python -m emanet ARGS` in a subprocess, one intra-op thread, output captured as text; with
    ``processes`` > 0 under `torchrun --standalone --nproc_per_node=processes`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes else []
    cmd = [sys.executable, *launcher, "-m", "emanet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny models: on a shared 2-core machine the thread pool's
    synchronisation costs far more than it saves (measured 10-20x on these shapes). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_image(path: Path, rng: np.random.Generator, size=(H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def write_index_png(path: Path, label: np.ndarray, palette=VOC_PALETTE) -> None:
    """A mode "P" PNG: pixel values are the indices, the palette only colours them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    index_image(label, palette).save(path)


def write_gray_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8)).save(path)


def random_label(rng: np.random.Generator, num_classes: int, size=(H, W), void: int | None = 255) -> np.ndarray:
    label = rng.integers(0, num_classes, size, dtype=np.uint8)
    if void is not None:
        label[0, :] = void  # a void border, as VOC has around objects
    return label


@pytest.fixture
def make_voc(tmp_path):
    """make_voc(aug=False, splits=...) -> (root holding VOCdevkit, {id: label})."""

    def make(*, splits=None, aug=False, aug_list="train_aug.txt"):
        splits = splits or {"train": ["2007_000032", "2007_000033"], "val": ["2008_000001"]}
        rng = np.random.default_rng(0)
        base = tmp_path / "VOCdevkit" / "VOC2012"
        labels = {}
        lists = base / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True)
        for split, ids in splits.items():
            name = aug_list if split == "train_aug" else f"{split}.txt"
            (lists / name).write_text("".join(f"{i}\n" for i in ids))
            for i in ids:
                write_image(base / "JPEGImages" / f"{i}.jpg", rng)
                labels[i] = random_label(rng, 21)
                folder = "SegmentationClassAug" if aug else "SegmentationClass"
                write_index_png(base / folder / f"{i}.png", labels[i])
        return tmp_path, labels

    return make


@pytest.fixture
def make_cityscapes(tmp_path):
    """make_cityscapes(kind="labelTrainIds"|"labelIds", labels=None) -> (root, {name: raw label})."""

    def make(*, split="train", kind="labelTrainIds", labels=None):
        rng = np.random.default_rng(1)
        names = ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019", "bremen/bremen_000000_000019"]
        raw = {}
        for k, name in enumerate(names):
            write_image(tmp_path / "leftImg8bit" / split / f"{name}_leftImg8bit.png", rng)
            if kind is None:
                continue
            label = labels[k] if labels is not None else random_label(rng, 19)
            raw[name] = label
            write_gray_png(tmp_path / "gtFine" / split / f"{name}_gtFine_{kind}.png", label)
        return tmp_path, raw

    return make


@pytest.fixture
def make_ade(tmp_path):
    """make_ade(labels) -> (tmp_path holding ADEChallengeData2016, {stem: raw label})."""

    def make(*, split="training", labels=None):
        rng = np.random.default_rng(2)
        base = tmp_path / "ADEChallengeData2016"
        raw = {}
        stems = ["ADE_train_00000001", "ADE_train_00000002"]
        for k, stem in enumerate(stems):
            write_image(base / "images" / split / f"{stem}.jpg", rng)
            raw[stem] = labels[k] if labels is not None else rng.integers(0, 151, (H, W), dtype=np.uint8)
            write_gray_png(base / "annotations" / split / f"{stem}.png", raw[stem])
        return tmp_path, raw

    return make


@pytest.fixture
def make_folder(tmp_path):
    """make_folder(names, classes, palette) -> (root, {name: label}); images alternate .jpg/.png."""

    def make(*, split="train", names=("a", "b", "sub/c"), classes=("sky", "road", "car"), palette=None):
        rng = np.random.default_rng(3)
        (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
        if palette is not None:
            (tmp_path / "palette.txt").write_text("".join(f"{r} {g} {b}\n" for r, g, b in palette))
        labels = {}
        for k, name in enumerate(names):
            suffix = ".jpg" if k % 2 == 0 else ".png"
            write_image(tmp_path / "images" / split / f"{name}{suffix}", rng)
            labels[name] = random_label(rng, len(classes))
            write_index_png(tmp_path / "masks" / split / f"{name}.png", labels[name])
        return tmp_path, labels

    return make
