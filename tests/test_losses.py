"""Loss reductions against a hand computation with ignored pixels."""

from __future__ import annotations

import math

import pytest
import torch

from emanet.config import LossConfig
from emanet.losses import SegmentationLoss


def case():
    # 1 image, 2 classes, 1x3 pixels; the last pixel is void
    logits = torch.tensor([[[[2.0, 0.0, 5.0]], [[0.0, 1.0, -5.0]]]])  # (1, 2, 1, 3)
    target = torch.tensor([[[0, 1, 255]]])
    nll0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    nll1 = -math.log(math.exp(1) / (math.exp(1) + 1))
    return logits, target, nll0 + nll1


def test_valid_reduction_averages_over_labelled_pixels():
    logits, target, total = case()
    assert SegmentationLoss(reduction="valid")(logits, target).item() == pytest.approx(total / 2)


def test_all_reduction_is_the_reference_mean_over_every_pixel():
    logits, target, total = case()
    assert SegmentationLoss(reduction="all")(logits, target).item() == pytest.approx(total / 3)


def test_aux_term_is_weighted():
    logits, target, total = case()
    loss = SegmentationLoss(reduction="valid", aux_weight=0.4)({"out": logits, "aux": logits}, target)
    assert loss.item() == pytest.approx(1.4 * total / 2)


def test_all_void_image_gives_zero_not_nan():
    logits, target, _ = case()
    for reduction in ("valid", "all"):
        assert SegmentationLoss(reduction=reduction)(logits, torch.full_like(target, 255)).item() == 0.0


def test_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        SegmentationLoss(reduction="sum")


def test_the_config_is_the_one_place_that_chooses_the_reduction():
    with pytest.raises(TypeError, match="reduction"):
        SegmentationLoss()  # no default that could contradict loss.reduction
    assert LossConfig().reduction == "all"  # the reference's mean over every pixel
