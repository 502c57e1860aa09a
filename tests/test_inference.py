"""Inference: whole, sliding window, multi-scale + flip, against direct computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from emanet.config import load_config
from emanet.errors import ConfigError
from emanet.inference import MODES, infer, infer_slide, infer_whole, window_starts
from emanet.models.emanet import build_model
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = tiny_model(backbone_width=64, output_stride=8, multi_grid=False, align_corners=False)
    return build_model(cfg).eval()


def images(b=2, h=37, w=45, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def pixelwise(seed=0):
    """Per-pixel model (1x1 convs): translation-equivariant, flip-equivariant, blind to padding elsewhere."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


class Ones(nn.Module):
    """Logits of 1 everywhere, and records every input size: sum / count must give exactly 1."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return x.new_ones(x.shape[0], 2, *x.shape[-2:])


def test_one_scale_no_flip_is_softmax_of_forward_exactly(tiny):
    x = images()
    want = torch.softmax(tiny(x), dim=1)
    got = infer(tiny, x, align_corners=False)
    assert got.shape == (2, 3, 37, 45)
    assert torch.equal(got, want)
    assert torch.equal(infer_whole(tiny, x), tiny(x))
    assert not tiny.training  # infer never touches the mode


def test_align_corners_is_the_callers_to_give_and_modes_come_from_the_literal(tiny):
    # no default that could contradict the model's config.model.align_corners (True unless converted from mmseg)
    with pytest.raises(TypeError, match="align_corners"):
        infer(tiny, images())
    assert MODES == ("whole", "slide")


def test_infer_keeps_training_mode():
    model = pixelwise().train()
    infer(model, images(), align_corners=False, scales=(0.5, 1.0), flip=True)
    assert model.training


def test_single_window_of_image_size_equals_whole(tiny):
    # B=1: CPU convs round differently for different batch sizes (~1e-6 relative), which is not under test
    x = images(1)
    got = infer_slide(tiny, x, crop_size=(37, 45), stride=(20, 30), num_classes=3)
    torch.testing.assert_close(got, tiny(x), atol=1e-6, rtol=1e-6)


def test_crop_larger_than_image_is_clipped_to_it(tiny):
    model, x = pixelwise(), images()
    got = infer_slide(model, x, crop_size=(48, 64), stride=(48, 64))
    assert got.shape == (2, 4, 37, 45)
    torch.testing.assert_close(got, model(x), atol=1e-6, rtol=1e-6)
    ones = Ones()
    infer_slide(ones, x, crop_size=(40, 32), stride=(8, 8))  # clipped to 37 in H, slides in W
    assert set(ones.sizes) == {(37, 32)}
    # EM attention is global: a window padded up to the crop would change every pixel, the clipped one is
    # exactly the whole-image forward
    x1 = images(1, 29, 35)
    whole = tiny(x1)
    torch.testing.assert_close(infer_slide(tiny, x1, crop_size=(48, 48), stride=(32, 32)), whole, atol=1e-5, rtol=0)
    padded = tiny(F.pad(x1, (0, 13, 0, 19)))[..., :29, :35]
    assert (torch.softmax(padded, 1) - torch.softmax(whole, 1)).abs().amax() > 1e-3


def mmseg_slide(model, x, crop, stride):
    """mmsegmentation 1.x EncoderDecoder.slide_inference, written from its code: a grid of
    max(H - crop + stride - 1, 0) // stride + 1 windows per axis, each clipped to the image."""
    (hc, wc), (hs, ws) = crop, stride
    b, _, h, w = x.shape
    preds, count = None, torch.zeros(b, 1, h, w)
    for i in range(max(h - hc + hs - 1, 0) // hs + 1):
        for j in range(max(w - wc + ws - 1, 0) // ws + 1):
            y2, x2 = min(i * hs + hc, h), min(j * ws + wc, w)
            y1, x1 = max(y2 - hc, 0), max(x2 - wc, 0)
            logits = model(x[:, :, y1:y2, x1:x2])
            preds = torch.zeros(b, logits.shape[1], h, w) if preds is None else preds
            preds += F.pad(logits, (x1, w - x2, y1, h - y2))
            count[:, :, y1:y2, x1:x2] += 1
    return preds / count


@pytest.mark.parametrize(
    "size,crop,stride", [((57, 129), (65, 65), (43, 43)), ((40, 41), (24, 32), (16, 8)), ((30, 20), (48, 48), (32, 32))]
)
def test_slide_equals_mmseg_slide_inference(tiny, size, crop, stride):
    x = images(1, *size, seed=3)
    got = infer_slide(tiny, x, crop_size=crop, stride=stride, batch_size=1)  # mmseg: a window at a time
    want = mmseg_slide(tiny, x, crop, stride)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(got.argmax(1), want.argmax(1))


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_overlapping_windows_on_pixelwise_model_equal_whole(batch_size):
    model, x = pixelwise(), images()
    got = infer_slide(model, x, crop_size=(16, 20), stride=(10, 12), batch_size=batch_size)
    torch.testing.assert_close(got, model(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "size,crop,stride",
    [((37, 45), (16, 20), (10, 12)), ((37, 45), (16, 16), (16, 16)), ((33, 65), (33, 17), (5, 9))],
)
def test_every_pixel_covered_and_windows_inside(size, crop, stride):
    ones = Ones()
    out = infer_slide(ones, images(1, *size), crop_size=crop, stride=stride)
    assert torch.equal(out, torch.ones(1, 2, *size))  # a pixel with count 0 would be nan
    assert set(ones.sizes) == {crop}  # every window full size: none crosses the border
    n_windows = len(window_starts(size[0], crop[0], stride[0])) * len(window_starts(size[1], crop[1], stride[1]))
    assert len(ones.sizes) == -(-n_windows // 4)  # one forward per chunk of batch_size=4 windows


def test_window_starts():
    assert window_starts(10, 4, 3) == [0, 3, 6]  # last snapped to 10 - 4
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]  # 6 reached by the stride: no duplicate
    assert window_starts(4, 4, 2) == [0]
    assert window_starts(3, 4, 2) == [0]
    for length in range(5, 40):
        starts = window_starts(length, 5, 3)
        assert starts[-1] == length - 5 and all(b - a <= 3 for a, b in zip(starts, starts[1:]))


def test_flip_on_flip_equivariant_model_changes_nothing():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)  # mirror-symmetric kernels
    x = images()
    torch.testing.assert_close(
        infer(conv, x, align_corners=False, flip=True), infer(conv, x, align_corners=False), atol=1e-6, rtol=1e-6
    )


def test_flip_is_undone_before_averaging():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)  # not mirror-symmetric: both passes differ
    x = images()
    want = (torch.softmax(conv(x), 1) + torch.softmax(conv(x.flip(-1)).flip(-1), 1)) / 2
    torch.testing.assert_close(infer(conv, x, align_corners=False, flip=True), want)


def test_multi_scale_flip_matches_manual(tiny):
    x = images(h=33, w=41)
    probs = []
    for s in (0.75, 1.5):
        size = (int(33 * s + 0.5), int(41 * s + 0.5))
        xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for flip in (False, True):
            logits = tiny(xs.flip(-1)).flip(-1) if flip else tiny(xs)
            logits = F.interpolate(logits, size=(33, 41), mode="bilinear", align_corners=False)
            probs.append(torch.softmax(logits, dim=1))
    want = torch.stack(probs).mean(0)
    got = infer(tiny, x, align_corners=False, scales=(0.75, 1.5), flip=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(1), torch.ones(2, 33, 41))


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(out_size=(50, 61)), dict(mode="slide", crop_size=(24, 24), stride=(16, 16), num_classes=3)],
    ids=["whole", "resized", "slide"],
)
def test_labels_only_scores_of_one_pass_are_its_logits_with_the_probabilities_argmax(tiny, kwargs):
    x = images(h=33, w=41)
    probs = infer(tiny, x, align_corners=False, **kwargs)
    scores = infer(tiny, x, align_corners=False, probabilities=False, **kwargs)
    torch.testing.assert_close(torch.softmax(scores, dim=1), probs)  # the logits, not probabilities
    assert not torch.allclose(scores.sum(1), torch.ones_like(scores[:, 0]))
    assert torch.equal(scores.argmax(1), probs.argmax(1))
    several = dict(scales=(0.75, 1.0), flip=True)  # more than one pass: the averaged probabilities
    assert torch.equal(
        infer(tiny, x, align_corners=False, probabilities=False, **several),
        infer(tiny, x, align_corners=False, **several),
    )


def test_slide_mode_with_scales(tiny):
    x = images(h=33, w=41)
    got = infer(
        tiny,
        x,
        align_corners=False,
        mode="slide",
        scales=(0.75, 1.25),
        crop_size=(24, 24),
        stride=(16, 16),
        num_classes=3,
    )
    assert got.shape == (2, 3, 33, 41) and torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(1), torch.ones(2, 33, 41))


def test_errors(tiny):
    x = images(1, 17, 19)
    with pytest.raises(ConfigError, match="crop_size and stride"):
        infer(tiny, x, align_corners=False, mode="slide", stride=(8, 8))
    with pytest.raises(ConfigError, match="crop_size and stride"):
        infer(tiny, x, align_corners=False, mode="slide", crop_size=(8, 8))
    for scales in [(0.0,), (1.0, -0.5), ()]:
        with pytest.raises(ConfigError, match="scales"):
            infer(tiny, x, align_corners=False, scales=scales)
    with pytest.raises(ConfigError, match=r"mode must be one of \('whole', 'slide'\)"):
        infer(tiny, x, align_corners=False, mode="tiles")
    with pytest.raises(ConfigError, match="must not exceed crop_size"):
        infer_slide(tiny, x, crop_size=(8, 8), stride=(9, 4))
    with pytest.raises(ConfigError, match="crop_size must be"):
        infer_slide(tiny, x, crop_size=(8, 0), stride=(4, 4))
    with pytest.raises(ValueError, match="num_classes=5"):
        infer_slide(tiny, x, crop_size=8, stride=4, num_classes=5)


def test_eval_config_drives_infer(tiny):
    # the run configuration's eval section is the one inference config (no second dataclass restating it)
    cfg = load_config(None, ["eval.mode=slide", "eval.scales=[1.0]", "eval.crop_size=[24,24]", "eval.stride=[16,12]"])
    cfg.validate()
    e = cfg.eval
    x = images(1, 33, 41)
    want = torch.softmax(infer_slide(tiny, x, crop_size=24, stride=(16, 12)), dim=1)
    got = infer(
        tiny,
        x,
        align_corners=False,
        mode=e.mode,
        scales=tuple(e.scales),
        flip=e.flip,
        crop_size=e.crop_size,
        stride=e.stride,
    )
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="unknown config key 'eval.scale'"):
        load_config(None, ["eval.scale=[1.0]"])
    with pytest.raises(ValueError, match="crop_size and eval.stride"):
        load_config(None, ["eval.mode=slide"]).validate()
    with pytest.raises(ValueError, match="eval.scales"):
        load_config(None, ["eval.scales=[0.5, 0]"]).validate()
