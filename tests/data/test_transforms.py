import pickle
import re
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from emanet.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    REFERENCE_SCALES,
    ColorJitter,
    Compose,
    PadToMultiple,
    PadToSize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    Resize,
    SegmentationDataset,
    SyntheticContextDataset,
    ToTensorNormalize,
    eval_transform,
    train_transform,
    worker_init_fn,
)
from emanet.data.transforms import MEAN_FILL, KeepRatioResize, keep_ratio_size
from emanet.errors import MissingExtra

BLOCK = 8  # label blocks of 8x8 px; the image colour encodes the block's (row, col)
CODE_B = 200  # blue channel of every block; the padding colour has B = 104


def coded_pair(h: int, w: int):
    """Image whose colour encodes the block coordinates, label = block id."""
    rows, cols = np.arange(h)[:, None] // BLOCK, np.arange(w)[None, :] // BLOCK
    rows, cols = np.broadcast_to(rows, (h, w)), np.broadcast_to(cols, (h, w))
    image = np.stack([20 + 20 * cols, 20 + 20 * rows, np.full((h, w), CODE_B)], axis=2).astype(np.uint8)
    return Image.fromarray(image), (rows * 10 + cols).astype(np.uint8)


def check_aligned(image: np.ndarray, label: np.ndarray) -> int:
    """Where a pixel carries an exact block code, the label must be that block; returns #checked.

    Codes grow monotonically with the block row/column, so a bilinear blend of two neighbouring blocks lies
    strictly between their codes and is never a code itself: only pixels that belong to one block are checked,
    and a one-pixel shift between image and label shows up at every block border.
    """
    img = image.astype(int)
    is_code = (img[..., 2] == CODE_B) & ((img[..., 0] - 20) % 20 == 0) & ((img[..., 1] - 20) % 20 == 0)
    expected = (img[..., 1] - 20) // 20 * 10 + (img[..., 0] - 20) // 20
    np.testing.assert_array_equal(label[is_code], expected[is_code])
    # padding: the label is 255 exactly where the image has the fill colour
    np.testing.assert_array_equal(label == 255, (img == MEAN_FILL).all(2))
    return int(is_code.sum())


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(9, 48),
    w=st.integers(9, 48),
    seed=st.integers(0, 2**32 - 1),
    crop=st.tuples(st.integers(8, 40), st.integers(8, 40)),
)
def test_geometry_keeps_image_and_mask_aligned(h, w, seed, crop):
    image, label = coded_pair(h, w)
    t = Compose([RandomScale(REFERENCE_SCALES), PadToSize(crop), RandomCrop(crop), RandomHorizontalFlip(p=0.5)])
    rng = np.random.default_rng(seed)
    for _ in range(3):
        out_image, out_label = t(image, label, rng)
        assert (out_image.height, out_image.width) == crop == out_label.shape
        checked = check_aligned(np.asarray(out_image), out_label)
        assert checked >= 0.1 * (out_label != 255).sum()  # 8-px blocks at scale 0.5 keep ~25% exact


def test_alignment_check_catches_a_flip_or_a_one_pixel_shift():
    image, label = coded_pair(32, 40)
    assert check_aligned(np.asarray(image), label) == 32 * 40
    with pytest.raises(AssertionError):
        check_aligned(np.asarray(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), label)
    with pytest.raises(AssertionError):
        check_aligned(np.asarray(image)[1:], label[:-1])
    big, big_label = RandomScale([1.75])(image, label, np.random.default_rng(0))
    check_aligned(np.asarray(big), big_label)
    with pytest.raises(AssertionError):  # after scaling, blends hide a 1-px shift but not 2 px
        check_aligned(np.asarray(big)[:, 2:], big_label[:, :-2])


def test_same_rng_seed_same_output_different_seed_differs():
    ds = SyntheticContextDataset(length=2, transform=train_transform(crop_size=48, scales=(0.5, 2.0), jitter=0.3))
    ds.reseed(5)
    a = [ds[0] for _ in range(3)]
    ds.reseed(5)
    b = [ds[0] for _ in range(3)]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], a[1][0])  # the generator moves on: epochs differ
    ds.reseed(6)
    assert not torch.equal(ds[0][0], a[0][0])


class RngProbe(SegmentationDataset):
    """Returns one draw of the dataset's augmentation generator per item."""

    def __init__(self):
        super().__init__([], classes=["a"], palette=[(0, 0, 0)])

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return int(self.rng.integers(2**62))


def _draws(init_fn, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(RngProbe(), batch_size=1, num_workers=2, worker_init_fn=init_fn, generator=g)
    return [int(x) for x in loader]  # items 0, 2 from worker 0; 1, 3 from worker 1


def test_worker_init_fn_gives_workers_their_own_streams():
    plain = _draws(None)
    assert plain[0] == plain[1]  # the reference's bug: forked workers repeat the same randomness
    seeded = _draws(worker_init_fn)
    assert len(set(seeded)) == 4
    assert _draws(worker_init_fn) == seeded  # a seeded torch makes it repeatable
    assert _draws(worker_init_fn, seed=1) != seeded  # a new base seed (next epoch) changes it


def test_random_scale_range_and_choices():
    rng = np.random.default_rng(0)
    choice = RandomScale(REFERENCE_SCALES)
    assert {choice.sample(rng) for _ in range(200)} == set(REFERENCE_SCALES)
    rng_range = RandomScale((0.5, 2.0))
    samples = [rng_range.sample(rng) for _ in range(200)]
    assert 0.5 <= min(samples) < 0.6 and 1.9 < max(samples) <= 2.0 and len(set(samples)) == 200
    assert {RandomScale([1.0, 2.0], mode="choice").sample(rng) for _ in range(50)} == {1.0, 2.0}
    image, label = coded_pair(10, 20)
    out, out_label = RandomScale([1.5])(image, label, rng)
    assert out.size == (30, 15) and out_label.shape == (15, 30)


def test_random_transforms_need_an_rng():
    image, label = coded_pair(10, 10)
    with pytest.raises(ValueError, match="np.random.Generator"):
        RandomCrop(5)(image, label)


def test_pad_to_size_and_multiple_by_hand():
    image, label = coded_pair(17, 23)
    padded, padded_label = PadToSize((20, 21), fill_image=(1, 2, 3), fill_label=254)(image, label)
    assert padded.size == (23, 20)
    assert padded.getpixel((22, 19)) == (1, 2, 3) and padded.getpixel((0, 0)) == (20, 20, 200)
    assert (padded_label[17:] == 254).all() and (padded_label[:17] == label).all()
    pad8 = PadToMultiple(8, offset=1)
    assert [pad8.target(n) for n in (17, 23, 500, 1)] == [17, 25, 505, 1]
    out, out_label = pad8(image, label)
    assert out.size == (25, 17) and out_label.shape == (17, 25) and (out_label[:, 23:] == 255).all()


def test_padding_normalises_to_zero():
    image, label = coded_pair(10, 10)
    x, y = eval_transform(pad_multiple=8, pad_offset=1)(image, label)
    assert x.shape == (3, 17, 17) and y.shape == (17, 17)
    assert x[:, 10:, :].abs().max() < 0.01 and (y[10:] == 255).all()


def test_to_tensor_normalize_by_hand():
    image = Image.new("RGB", (2, 1), (255, 0, 51))
    x, y = ToTensorNormalize()(image, np.array([[3, 255]], dtype=np.uint8))
    expected = [(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1]]
    expected.append((0.2 - IMAGENET_MEAN[2]) / IMAGENET_STD[2])
    assert torch.allclose(x[:, 0, 1], torch.tensor(expected), atol=1e-6)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.tolist() == [[3, 255]]


def test_color_jitter_changes_image_only():
    image, label = coded_pair(16, 16)
    out, out_label = ColorJitter(0.4, 0.4, 0.4)(image, label, np.random.default_rng(1))
    assert out_label is label and not np.array_equal(np.asarray(out), np.asarray(image))


def test_resize_shorter_side_and_exact():
    image, label = coded_pair(20, 40)
    out, out_label = Resize(10)(image, label)
    assert out.size == (20, 10) and out_label.shape == (10, 20)
    out, out_label = Resize((7, 9))(image, label)
    assert out.size == (9, 7) and set(np.unique(out_label)) <= set(np.unique(label))


def test_train_transform_small_image_is_padded_with_ignore():
    image, label = coded_pair(10, 12)
    x, y = train_transform(crop_size=(24, 30), scales=None, flip=False)(image, label, np.random.default_rng(0))
    assert x.shape == (3, 24, 30) and y.shape == (24, 30)
    assert (
        (y[10:] == 255).all() and (y[:, 12:] == 255).all() and torch.equal(y[:10, :12], torch.from_numpy(label).long())
    )


# ----------------------------------------------------------------------------- mmseg's keep-ratio test Resize

NO_CV2 = "OpenCV is the mmseg extra (pip install -e '.[mmseg]'); the dev extra installs it"
# (height, width, (long, short)): Cityscapes in the 769x769 and 512x1024 configs, odd sizes, up and down, portrait,
# one pixel either way, exact factors 2 and 1/2
RESCALES = [
    (1024, 2048, (2049, 1025)),
    (1024, 2048, (2048, 1024)),
    (1024, 2048, (1024, 512)),
    (1024, 2048, (683, 341)),
    (37, 53, (97, 65)),
    (53, 37, (97, 65)),
    (37, 53, (20, 10)),
    (500, 375, (2048, 512)),
    (375, 500, (2048, 1024)),
    (769, 769, (2049, 1025)),
    (769, 769, (512, 256)),
    (480, 640, (2048, 1024)),
    (333, 777, (1000, 500)),
    (1080, 1920, (2048, 1024)),
    (129, 65, (64, 32)),
    (64, 64, (65, 65)),
    (65, 65, (64, 64)),
    (100, 300, (299, 99)),
    (257, 513, (1025, 513)),
    (17, 23, (69, 51)),
    (200, 400, (800, 400)),
    (3, 5, (11, 7)),
]


def mmcv_rescale_size(h: int, w: int, scale) -> tuple[int, int]:
    """mmcv.image.geometric.rescale_size((w, h), (long, short)) then _scale_size, as (height, width)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    new_w, new_h = int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)
    return new_h, new_w


@pytest.mark.parametrize("h, w, scale", RESCALES)
def test_cv2_keep_ratio_resize_is_opencvs_resize_at_mmcvs_size(h, w, scale):
    cv2 = pytest.importorskip("cv2", reason=NO_CV2)
    image = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = np.zeros((h, w), dtype=np.uint8)
    got, got_label = KeepRatioResize(scale, backend="cv2")(Image.fromarray(image), label)
    size = mmcv_rescale_size(h, w, scale)
    assert keep_ratio_size(h, w, scale) == size and (got.height, got.width) == size
    want = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)  # cv2 takes (width, height)
    assert np.array_equal(np.asarray(got), want)
    # mmseg hands cv2 the BGR image: bilinear works per channel, so the order does not matter
    bgr = cv2.resize(np.ascontiguousarray(image[..., ::-1]), size[::-1], interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(bgr[..., ::-1], want)
    assert got_label is label  # the label is never resized (predictions are resized back to it)


def test_torch_resize_is_a_grey_level_off_opencvs():
    """Why mmseg models need the cv2 backend: the float resize rounds differently on many pixels."""
    cv2 = pytest.importorskip("cv2", reason=NO_CV2)
    image = np.random.default_rng(0).integers(0, 256, (256, 512, 3), dtype=np.uint8)
    got = np.asarray(KeepRatioResize((513, 257), backend="torch")(Image.fromarray(image), None)[0])
    want = cv2.resize(image, (513, 257), interpolation=cv2.INTER_LINEAR)
    diff = np.abs(got.astype(int) - want)
    assert diff.max() == 1 and (diff > 0).mean() > 0.05


def test_cv2_backend_without_opencv_names_the_extra_when_built(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError
    with pytest.raises(MissingExtra, match=re.escape("pip install 'emanet[mmseg]'")):
        KeepRatioResize((97, 65), backend="cv2")
    with pytest.raises(MissingExtra, match="data.resize_backend='cv2'"):
        eval_transform(keep_ratio_resize=(97, 65), resize_backend="cv2")
    eval_transform(resize_backend="cv2")  # no resize, no OpenCV needed
    KeepRatioResize((97, 65), backend="torch")
    with pytest.raises(ValueError, match="backend must be 'torch' or 'cv2', got 'pil'"):
        KeepRatioResize((97, 65), backend="pil")


@pytest.mark.parametrize("backend", ["torch", "cv2"])
def test_eval_transform_with_a_keep_ratio_resize_leaves_the_label_alone(backend):
    if backend == "cv2":
        pytest.importorskip("cv2", reason=NO_CV2)
    image, label = coded_pair(37, 53)
    x, y = eval_transform(keep_ratio_resize=(97, 65), resize_backend=backend)(image, label)
    assert tuple(x.shape) == (3, 65, 93)  # factor min(97 / 53, 65 / 37) = 1.757: 37 -> 65, 53 -> 93
    assert torch.equal(y, torch.from_numpy(label.astype(np.int64)))  # same size, same values


def test_cv2_eval_transform_pickles_for_spawned_workers():
    pytest.importorskip("cv2", reason=NO_CV2)
    tf = eval_transform(keep_ratio_resize=(97, 65), resize_backend="cv2")
    image, label = coded_pair(37, 53)
    x, _ = pickle.loads(pickle.dumps(tf))(image, label)
    assert torch.equal(x, tf(image, label)[0])
