import numpy as np
import pytest
import torch
from PIL import Image

from emanet.data import FolderDataset, SyntheticContextDataset, build_dataset, train_transform, write_synthetic


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask as arrays of (y, x) (test helper, no scipy here)."""
    seen = np.zeros_like(mask, dtype=bool)
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found.append(np.array(pixels))
    return found


def test_deterministic_per_index_and_seed():
    a, b = SyntheticContextDataset(length=5), SyntheticContextDataset(length=5)
    for i in range(5):
        img_a, lab_a = a.read(i)
        img_b, lab_b = b.read(i)
        np.testing.assert_array_equal(np.asarray(img_a), np.asarray(img_b))
        np.testing.assert_array_equal(lab_a, lab_b)
    assert not np.array_equal(a.generate(0)[0], a.generate(1)[0])
    other_seed = SyntheticContextDataset(length=5, seed=1)
    assert not np.array_equal(a.generate(0)[0], other_seed.generate(0)[0])
    # reading order does not matter: index 3 is the same scene whether read first or last
    np.testing.assert_array_equal(SyntheticContextDataset(length=5).generate(3)[0], a.generate(3)[0])


def test_train_and_val_never_share_scenes():
    train = SyntheticContextDataset("train", length=20)
    val = SyntheticContextDataset("val", length=20)
    train_images = {train.generate(i)[0].tobytes() for i in range(20)}
    assert not train_images & {val.generate(i)[0].tobytes() for i in range(20)}
    assert len(train_images) == 20


def test_scene_structure_and_label_range():
    ds = SyntheticContextDataset(length=12, num_classes=6)
    cfg = ds.scene
    seen_classes = set()
    for i in range(len(ds)):
        image, label, cls = ds.generate(i)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8 and label.dtype == np.uint8
        assert set(np.unique(label).tolist()) == {0, cls} and 1 <= cls < 6
        blobs = components(label > 0)
        assert cfg.min_objects <= len(blobs) <= cfg.max_objects
        for pixels in blobs:
            side = pixels.max(0) - pixels.min(0) + 1
            assert cfg.min_size <= side.min() and side.max() <= cfg.max_size
        # blobs are spread: they reach both halves of the image in at least one direction
        ys, xs = np.nonzero(label)
        assert (ys.min() < 48 <= ys.max()) or (xs.min() < 48 <= xs.max())
        seen_classes.add(cls)
    assert len(seen_classes) >= 3
    assert ds.classes[0] == "background" and len(ds.palette) == ds.num_classes == 6


def test_class_is_decided_by_pooling_all_blobs_not_by_one_pixel():
    """The design claim of the docstring: SNR grows with sqrt(pixels averaged)."""
    ds = SyntheticContextDataset("val", length=40)
    tints = ds.scene.tints()[1:]  # (K, 3)
    pooled_ok, pixel_ok = 0, []
    for i in range(len(ds)):
        image, label, cls = ds.generate(i)
        chroma = image.astype(float)[label > 0] / 255 - ds.scene.object_gray  # (N, 3)
        pooled_ok += int(np.argmax(tints @ chroma.mean(0))) + 1 == cls
        pixel_ok.append(np.mean(np.argmax(chroma @ tints.T, axis=1) + 1 == cls))
    assert pooled_ok >= 38  # all blobs together decide
    assert np.mean(pixel_ok) < 0.45  # one pixel is close to chance (0.25)


def test_background_differs_locally_from_objects():
    image, label, _ = SyntheticContextDataset(length=1).generate(0)
    luminance = image.astype(float).mean(2)
    assert luminance[label > 0].mean() - luminance[label == 0].mean() > 50


def test_getitem_with_transform_and_build_dataset():
    ds = build_dataset("synthetic", split="train", length=3, transform=train_transform(crop_size=64, scales=(0.5, 2)))
    image, mask = ds[2]
    assert image.shape == (3, 64, 64) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= set(range(5)) | {255}
    with pytest.raises(ValueError, match="no root"):
        build_dataset("synthetic", root="x", split="train", length=3)


def test_bad_parameters():
    with pytest.raises(TypeError, match="tint_strenght"):
        SyntheticContextDataset(length=3, tint_strenght=0.1)
    with pytest.raises(ValueError, match="fits only"):
        SyntheticContextDataset(length=3, image_size=40)
    with pytest.raises(IndexError):
        SyntheticContextDataset(length=3).generate(3)


def test_round_trip_through_folder_layout(tmp_path):
    root = write_synthetic(tmp_path / "syn", n_train=3, n_val=2, seed=7, num_classes=4)
    assert (root / "scene.json").is_file()
    for split, n in (("train", 3), ("val", 2)):
        disk = FolderDataset(root, split)
        mem = SyntheticContextDataset(split, length=n, seed=7, num_classes=4)
        assert len(disk) == n and disk.classes == mem.classes and disk.palette == mem.palette
        for i in range(n):
            assert disk.name(i) == mem.name(i) == f"{i:05d}"
            assert Image.open(disk.samples[i][1]).mode == "P"
            (img_d, lab_d), (img_m, lab_m) = disk.read(i), mem.read(i)
            np.testing.assert_array_equal(np.asarray(img_d), np.asarray(img_m))
            np.testing.assert_array_equal(lab_d, lab_m)
