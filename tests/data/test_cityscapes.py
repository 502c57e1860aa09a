import numpy as np
import pytest

from emanet.data import CityscapesDataset, cityscapes_label_lut
from emanet.data.palettes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from tests.conftest import H, W


def test_label_train_ids_are_read_directly(make_cityscapes):
    root, raw = make_cityscapes()
    ds = CityscapesDataset(root, "train")
    assert len(ds) == 3 and ds.num_classes == 19 and ds.lut is None
    assert ds.name(2) == "bremen/bremen_000000_000019"
    image, label = ds.read(2)
    assert image.size == (W, H)
    np.testing.assert_array_equal(label, raw["bremen/bremen_000000_000019"])


def test_label_ids_are_mapped_to_train_ids(make_cityscapes):
    raw = np.zeros((H, W), dtype=np.uint8)  # 0 = unlabeled -> 255
    raw[0, :5] = [7, 8, 26, 33, 34]  # road, sidewalk, car, bicycle, license plate (-1 in the scripts)
    raw[1, :4] = [1, 6, 9, 31]  # ego vehicle, ground, parking -> 255; train -> 16
    root, _ = make_cityscapes(kind="labelIds", labels=[raw, raw, raw])
    ds = CityscapesDataset(root, "train")
    label = ds.read(0)[1]
    assert label[0, :5].tolist() == [0, 1, 13, 18, 255]
    assert label[1, :4].tolist() == [255, 255, 255, 16]
    assert (label[2:] == 255).all()


def test_lut_covers_all_19_classes():
    lut = cityscapes_label_lut()
    mapped = lut[[7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]]
    assert mapped.tolist() == list(range(19))
    assert (np.delete(lut, [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]) == 255).all()
    assert CITYSCAPES_CLASSES[13] == "car" and CITYSCAPES_PALETTE[13] == (0, 0, 142)


def test_test_split_without_labels_reads_as_ignore(make_cityscapes):
    root, _ = make_cityscapes(split="test", kind=None)
    ds = CityscapesDataset(root, "test")
    assert ds.samples[0][1] is None  # no label file
    assert (ds.read(0)[1] == 255).all()


def test_missing_labels_are_listed(make_cityscapes):
    root, _ = make_cityscapes()
    (root / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="aachen_000001_000019_gtFine_labelTrainIds"):
        CityscapesDataset(root, "train")


def test_missing_split_folder_describes_layout(make_cityscapes):
    root, _ = make_cityscapes()
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val.*_leftImg8bit\.png"):
        CityscapesDataset(root, "val")


def test_out_of_range_train_id_names_file(make_cityscapes):
    bad = np.full((H, W), 3, dtype=np.uint8)
    bad[4, 4] = 19
    root, _ = make_cityscapes(labels=[bad, bad, bad])
    with pytest.raises(ValueError, match=r"aachen_000000_000019_gtFine_labelTrainIds\.png.*\[19\]"):
        CityscapesDataset(root, "train").read(0)


def test_lenient_build_lists_unpaired_files(make_cityscapes):
    root, _ = make_cityscapes()
    (root / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelTrainIds.png").unlink()
    orphan = root / "gtFine/train/bremen/bremen_000009_000019_gtFine_labelTrainIds.png"
    orphan.write_bytes(b"")
    ds = CityscapesDataset(root, "train", strict=False)
    assert [ds.name(i) for i in range(len(ds))] == ["aachen/aachen_000000_000019", "bremen/bremen_000000_000019"]
    assert [(e.kind, e.path.rsplit("/", 1)[-1]) for e in ds.problems] == [
        ("missing_pair", "aachen_000001_000019_leftImg8bit.png"),
        ("missing_pair", "bremen_000009_000019_gtFine_labelTrainIds.png"),
    ]
    assert ds.problems[0].reason.startswith("image without a label")
    assert ds.problems[1].reason.startswith("label without an image")
