"""Evaluation figures: a row-normalised confusion-matrix heatmap and a per-class IoU bar chart.

Takes plain lists and arrays (what eval.json holds); matplotlib is the optional `report` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emanet.errors import MissingExtra, install_hint
from emanet.experiments.report import _figure, _save

ANNOTATE_UP_TO = 25  # classes; beyond this the cells are too small for numbers


def require_matplotlib() -> None:
    """Raise a ConfigError saying how to install the extra (call it before a long evaluation)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingExtra(f"--plot needs matplotlib: {install_hint('report')}") from None


def normalise_rows(matrix) -> np.ndarray:
    """Counts (C, C) -> the share of each true class's pixels per predicted class; rows without pixels stay 0."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a confusion matrix must be square (C, C), got shape {m.shape}")
    totals = m.sum(axis=1, keepdims=True)
    return np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)


def plot_confusion(matrix, class_names: Sequence[str], path, *, title: str = "confusion matrix") -> Path:
    """Heatmap of the row-normalised matrix: row = ground truth, column = prediction, each row sums to 1."""
    share = normalise_rows(matrix)
    c = share.shape[0]
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for a {c}x{c} confusion matrix")
    side = min(2 + 0.45 * c, 30)
    fig = _figure(side + 1.5, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(c), labels=class_names, rotation=90, fontsize=8)
    ax.set_yticks(range(c), labels=class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(f"{title} (each row sums to 1)")
    if c <= ANNOTATE_UP_TO:
        for i in range(c):
            for j in range(c):
                if share[i, j] >= 0.005:
                    colour = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def plot_class_iou(iou: Sequence[float | None], class_names: Sequence[str], path, *, title: str = "IoU") -> Path:
    """Horizontal bars of per-class IoU in percent; classes with no pixels (None/NaN) are marked '-'."""
    if len(class_names) != len(iou):
        raise ValueError(f"{len(class_names)} class names for {len(iou)} IoU values")
    values = np.array([np.nan if v is None else float(v) for v in iou]) * 100
    c = len(values)
    fig = _figure(7, min(1.5 + 0.3 * c, 40))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(range(c), np.nan_to_num(values), color="tab:blue")
    ax.set_yticks(range(c), labels=class_names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    for i, v in enumerate(values):
        ax.text(min(np.nan_to_num(v) + 1, 92), i, "-" if np.isnan(v) else f"{v:.1f}", va="center", fontsize=7)
    mean = np.nanmean(values) if np.isfinite(values).any() else float("nan")
    if np.isfinite(mean):
        ax.axvline(mean, color="tab:red", linestyle="--", linewidth=1)
    ax.set_title(f"{title} (mIoU {mean:.2f}, dashed)")
    return _save(fig, path)


def plot_stage_grid(grid, train_labels: Sequence[str], eval_stages: Sequence[int], path) -> Path:
    """Heatmap of mIoU (%) with T_train rows and T_eval columns, each cell annotated (paper Fig. 4)."""
    values = np.asarray(grid, dtype=np.float64)
    fig = _figure(1.5 + 0.7 * len(eval_stages), 1.2 + 0.5 * len(train_labels))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(eval_stages)), labels=[str(t) for t in eval_stages])
    ax.set_yticks(range(len(train_labels)), labels=list(train_labels))
    ax.set_xlabel("T_eval (EM stages at evaluation)")
    ax.set_ylabel("T_train")
    mid = np.nanmean(values)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            colour = "black" if values[i, j] > mid else "white"
            ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=8, color=colour)
    fig.colorbar(im, ax=ax, label="mIoU (%)")
    return _save(fig, path)


def plot_variants(miou: Sequence[float], names: Sequence[str], path) -> Path:
    """Bars of mIoU (%) per variant, annotated (paper Fig. 3)."""
    fig = _figure(1.5 + 1.1 * len(names), 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(names)), miou, color="tab:blue")
    ax.set_xticks(range(len(names)), labels=list(names), rotation=20, ha="right")
    ax.set_ylabel("mIoU (%)")
    lo = min(miou) if len(miou) else 0.0
    ax.set_ylim(max(0.0, lo - 10), min(100.0, max(miou, default=0.0) + 5))
    for i, v in enumerate(miou):
        ax.text(i, v + 0.3, f"{v:.1f}", ha="center", fontsize=8)
    return _save(fig, path)


def plot_class_iou_groups(iou, variants: Sequence[str], class_names: Sequence[str], path) -> Path:
    """Grouped bars: per-class IoU (%) with one bar per variant in each class group (NaN: no bar)."""
    values = np.asarray(iou, dtype=np.float64)  # (variants, classes)
    if values.shape != (len(variants), len(class_names)):
        raise ValueError(f"IoU of shape {values.shape} for {len(variants)} variants x {len(class_names)} classes")
    fig = _figure(2 + 1.2 * len(class_names), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(variants))
    x = np.arange(len(class_names))
    for i, name in enumerate(variants):
        ax.bar(x + (i - (len(variants) - 1) / 2) * width, np.nan_to_num(values[i]), width, label=name)
    ax.set_xticks(x, labels=list(class_names))
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncols=2)
    return _save(fig, path)
