import numpy as np
import pytest
import torch
from PIL import Image

from emanet.data import VOCDataset, build_dataset, train_transform
from emanet.data.palettes import VOC_PALETTE, voc_palette
from emanet.errors import DataError
from tests.conftest import H, W, write_gray_png, write_image


def test_voc_palette_matches_the_standard_colour_map():
    assert voc_palette(4) == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    assert VOC_PALETTE[15] == (192, 128, 128)  # person
    assert VOC_PALETTE[20] == (0, 64, 128)  # tvmonitor
    assert len(set(voc_palette(256))) == 256


def test_reads_palette_pngs_as_indices(make_voc):
    root, labels = make_voc()
    ds = VOCDataset(root, "train")
    assert len(ds) == 2 and ds.num_classes == 21 and ds.classes[15] == "person"
    assert [ds.name(i) for i in range(2)] == ["2007_000032", "2007_000033"]
    image, label = ds.read(1)
    assert image.mode == "RGB" and image.size == (W, H)
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, labels["2007_000033"])  # indices, not colours
    assert 255 in label


def test_root_can_be_the_voc2012_folder(make_voc):
    root, labels = make_voc()
    ds = VOCDataset(root / "VOCdevkit" / "VOC2012", "val")
    np.testing.assert_array_equal(ds.read(0)[1], labels["2008_000001"])


def test_getitem_returns_tensors_after_transform(make_voc):
    root, _ = make_voc()
    ds = VOCDataset(root, "train", transform=train_transform(crop_size=(9, 11), scales=(0.5, 2.0)))
    image, mask = ds[0]
    assert image.shape == (3, 9, 11) and image.dtype == torch.float32
    assert mask.shape == (9, 11) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= set(range(21)) | {255}


@pytest.mark.parametrize("list_name", ["train_aug.txt", "trainaug.txt"])
def test_aug_split_reads_segmentation_class_aug(make_voc, list_name):
    ids = ["2007_000032", "2011_003276"]
    root, labels = make_voc(splits={"train_aug": ids}, aug=True, aug_list=list_name)
    for split in ("train_aug", "trainaug"):
        ds = VOCDataset(root, split)
        assert [ds.name(i) for i in range(len(ds))] == ids
        assert ds.samples[1][1].parent.name == "SegmentationClassAug"
        np.testing.assert_array_equal(ds.read(1)[1], labels["2011_003276"])


def test_aug_split_list_missing_explains_sbd(make_voc):
    root, _ = make_voc()
    with pytest.raises(FileNotFoundError, match="10,582"):
        VOCDataset(root, "train_aug")


def test_empty_split_names_the_list_file(make_voc):
    root, _ = make_voc()
    list_file = root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt"
    list_file.write_text("\n")
    with pytest.raises(ValueError, match="train.txt"):
        VOCDataset(root, "train")


def test_missing_root_describes_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        VOCDataset(tmp_path / "nowhere")


def test_missing_files_are_listed(make_voc):
    root, _ = make_voc()
    (root / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png").unlink()
    with pytest.raises(FileNotFoundError, match="2007_000033.png"):
        VOCDataset(root, "train")


def test_rgb_label_is_an_error_naming_the_file(make_voc):
    root, _ = make_voc()
    path = root / "VOCdevkit/VOC2012/SegmentationClass/2007_000032.png"
    Image.open(path).convert("RGB").save(path)
    ds = VOCDataset(root, "train")
    with pytest.raises(DataError, match=r"2007_000032\.png.*colour image.*mode 'P' or 'L'"):
        ds.read(0)


def test_16bit_label_is_an_error(make_voc):
    root, _ = make_voc()
    path = root / "VOCdevkit/VOC2012/SegmentationClass/2007_000032.png"
    Image.fromarray(np.zeros((H, W), dtype=np.uint16)).save(path)
    with pytest.raises(DataError, match=r"2007_000032\.png.*16/32-bit"):
        VOCDataset(root, "train").read(0)


def test_out_of_range_label_names_file_and_values(make_voc):
    root, _ = make_voc()
    label = np.zeros((H, W), dtype=np.uint8)
    label[3, 4], label[5, 6] = 21, 40
    write_gray_png(root / "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png", label)
    ds = VOCDataset(root, "train")
    with pytest.raises(DataError, match=r"2007_000033\.png: label values \[21, 40\] on \[1, 1\] pixels") as info:
        ds.read(1)
    assert info.value.kind == "label_values" and info.value.details == {"values": [21, 40], "counts": [1, 1]}


def test_file_removed_after_listing_is_a_data_error(make_voc):
    root, _ = make_voc()
    ds = VOCDataset(root, "train")
    (root / "VOCdevkit/VOC2012/JPEGImages/2007_000032.jpg").unlink()
    with pytest.raises(DataError, match=r"2007_000032\.jpg: file not found") as info:
        ds.read(0)
    assert info.value.kind == "missing_pair"


def test_size_mismatch_names_both_files(make_voc):
    root, _ = make_voc()
    write_image(root / "VOCdevkit/VOC2012/JPEGImages/2007_000032.jpg", np.random.default_rng(0), size=(20, 23))
    with pytest.raises(DataError, match=r"2007_000032\.png.*2007_000032\.jpg") as info:
        VOCDataset(root, "train").read(0)
    assert info.value.kind == "size_mismatch"


def test_build_dataset_by_name(make_voc):
    root, _ = make_voc()
    assert len(build_dataset("voc", root=root, split="val")) == 1
    with pytest.raises(ValueError, match="ade20k, cityscapes, folder, synthetic, voc"):
        build_dataset("coco", root=root, split="val")
    with pytest.raises(ValueError, match="needs a root"):
        build_dataset("voc", split="val")
