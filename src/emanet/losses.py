"""Losses: logits (or {"out", "aux"}) and an integer mask -> a scalar."""

from __future__ import annotations

import typing
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from emanet.fields import one_of

Reduction = Literal["all", "valid"]


class SegmentationLoss(nn.Module):
    """Pixel-wise cross-entropy with an ignore index, plus a weighted auxiliary term.

    reduction="valid": mean over non-ignored pixels (the usual convention).
    reduction="all": sum over non-ignored pixels divided by ALL pixels, ignored ones included: the
    reference's NLL "averaged over all pixels", which down-weights images with much void.

    ``reduction`` has no default: the run configuration's ``loss.reduction`` ("all", the reference's) is the
    one place that chooses it.
    """

    def __init__(self, *, reduction: Reduction, ignore_index: int = 255, aux_weight: float = 0.4):
        super().__init__()
        if reduction not in typing.get_args(Reduction):
            raise ValueError(f"loss reduction must be {one_of(typing.get_args(Reduction))}, got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.aux_weight = aux_weight

    def _ce(self, logits: Tensor, target: Tensor) -> Tensor:
        # logits (B, C, H, W), target (B, H, W); cross_entropy computes in float32 under autocast
        total = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum")
        if self.reduction == "all":
            return total / target.numel()
        return total / (target != self.ignore_index).sum().clamp(min=1)

    def forward(self, outputs: Tensor | dict[str, Tensor], target: Tensor) -> Tensor:
        if isinstance(outputs, Tensor):
            return self._ce(outputs, target)
        loss = self._ce(outputs["out"], target)
        if "aux" in outputs and self.aux_weight:
            loss = loss + self.aux_weight * self._ce(outputs["aux"], target)
        return loss
