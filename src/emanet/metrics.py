"""Integer label maps -> one confusion matrix over the whole dataset -> aAcc, mIoU, mAcc, fwIoU.

Rows are ground truth, columns predictions. Pixels labelled ``ignore_index`` are dropped; any other label
outside 0..C-1 is a data error and raises instead of being clipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist


def confusion_matrix(pred, target, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(C, C) int64 counts, ``m[t, p]`` = pixels of true class t predicted as p."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
    if pred.is_floating_point():
        raise TypeError("pred must hold class indices (e.g. logits.argmax(1)), not floating-point scores")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() > 0:
        bad = (t < 0) | (t >= num_classes)
        if bad.any():
            values = torch.unique(t[bad]).tolist()
            raise ValueError(
                f"label values {values} are outside 0..{num_classes - 1} and not the ignore index {ignore_index}"
            )
        if p.min() < 0 or p.max() >= num_classes:
            raise ValueError(f"predictions must lie in 0..{num_classes - 1}, got {p.min()}..{p.max()}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def scores(matrix) -> dict:
    """Metrics of a confusion matrix (fractions, not percent).

    IoU_c = TP/(TP+FP+FN), NaN for a class absent from both label and prediction; mIoU = their nanmean.
    Acc_c = TP/(TP+FN), NaN for a class absent from the label; mAcc = their nanmean. aAcc = trace/total.
    fwIoU = sum_c (label pixels of c / total) * IoU_c.
    """
    m = torch.as_tensor(matrix).detach().cpu().to(torch.float64).numpy()
    tp = np.diag(m)
    gt = m.sum(axis=1)  # TP + FN
    predicted = m.sum(axis=0)  # TP + FP
    union = gt + predicted - tp
    total = m.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    present = union > 0
    fw = float((gt[present] / total * iou[present]).sum()) if total > 0 else math.nan
    return {
        "aAcc": float(tp.sum() / total) if total > 0 else math.nan,
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "fwIoU": fw,
        "IoU": iou,
        "Acc": acc,
    }


class ConfusionMatrix:
    """Accumulates one confusion matrix; lives on the device of the first batch it sees."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._matrix: torch.Tensor | None = None

    @property
    def matrix(self) -> torch.Tensor:
        """(C, C) int64 counts, ``m[t, p]`` = pixels of true class t predicted as p (zeros before any update)."""
        if self._matrix is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        return self._matrix

    def update(self, pred, target) -> None:
        """Add a batch: integer predictions and labels of the same shape, e.g. (B, H, W)."""
        m = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self._matrix = m if self._matrix is None else self._matrix + m.to(self._matrix.device)

    def reset(self) -> None:
        """Forget every update."""
        self._matrix = None

    def all_reduce(self, device: torch.device | str | None = None) -> ConfusionMatrix:
        """Sum the matrix over torch.distributed ranks (no-op when not initialised); call once. ``device``:
        where the reduction runs, the process's CUDA device under NCCL (which reduces CUDA tensors only);
        the matrix stays where it was."""
        if dist.is_available() and dist.is_initialized():
            m = self.matrix.to(device or self.matrix.device, copy=True)
            dist.all_reduce(m)
            self._matrix = m.to(self.matrix.device)
        return self

    def compute(self) -> dict:
        """The scores of the matrix so far (``scores``)."""
        return scores(self.matrix)


def format_table(results: dict, class_names: Sequence[str]) -> str:
    """Per-class IoU/Acc in percent, then the summary line; classes with no pixels show '-'."""

    def pct(x: float | None) -> str:  # None: NaN after a JSON round trip
        return "-" if x is None or math.isnan(float(x)) else f"{100 * float(x):.2f}"

    width = max([5, *(len(n) for n in class_names)])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}", "-" * (width + 16)]
    for name, iou, acc in zip(class_names, results["IoU"], results["Acc"]):
        lines.append(f"{name:<{width}}  {pct(iou):>6}  {pct(acc):>6}")
    lines.append("-" * (width + 16))
    lines.append("  ".join(f"{key} {pct(results[key])}" for key in ("aAcc", "mIoU", "mAcc", "fwIoU")))
    return "\n".join(lines)
