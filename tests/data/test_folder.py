import numpy as np
import pytest
from PIL import Image

from emanet.data import FolderDataset, build_dataset
from emanet.errors import DataError
from tests.conftest import H, W, write_gray_png, write_image


def test_pairs_by_relative_stem_with_classes_and_palette(make_folder):
    palette = [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    root, labels = make_folder(palette=palette)
    ds = FolderDataset(root, "train")
    assert ds.classes == ("sky", "road", "car") and ds.num_classes == 3
    assert ds.palette == palette
    assert [ds.name(i) for i in range(len(ds))] == ["a", "b", "sub/c"]
    assert [p.suffix for p, _ in ds.samples] == [".jpg", ".png", ".jpg"]
    for i, name in enumerate(["a", "b", "sub/c"]):
        image, label = ds.read(i)
        assert image.size == (W, H)
        np.testing.assert_array_equal(label, labels[name])


def test_default_palette_is_deterministic_and_distinct(make_folder):
    root, _ = make_folder(classes=[f"c{i}" for i in range(12)])
    a, b = FolderDataset(root, "train"), build_dataset("folder", root=root, split="train")
    assert a.palette == b.palette and len(set(a.palette)) == 12


def test_gray_masks_are_accepted(make_folder):
    root, labels = make_folder()
    write_gray_png(root / "masks/train/b.png", labels["b"])
    np.testing.assert_array_equal(FolderDataset(root, "train").read(1)[1], labels["b"])


def test_unpaired_files_are_listed(make_folder):
    root, _ = make_folder()
    write_image(root / "images/train/lonely.jpg", np.random.default_rng(0))
    (root / "masks/train/b.png").rename(root / "masks/train/orphan.png")
    with pytest.raises(ValueError, match=r"without a mask: b, lonely.*without an image: orphan"):
        FolderDataset(root, "train")


def test_rgb_mask_names_the_file(make_folder):
    root, _ = make_folder()
    path = root / "masks/train/sub/c.png"
    Image.open(path).convert("RGBA").save(path)
    with pytest.raises(DataError, match=r"sub/c\.png.*mode 'RGBA'"):
        FolderDataset(root, "train").read(2)


def test_out_of_range_mask_value(make_folder):
    root, labels = make_folder()
    labels["a"][2, 2] = 3
    write_gray_png(root / "masks/train/a.png", labels["a"])
    with pytest.raises(DataError, match=r"a\.png.*\[3\].*3 classes"):
        FolderDataset(root, "train").read(0)


def test_missing_pieces(make_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        FolderDataset(tmp_path, "train")
    root, _ = make_folder()
    with pytest.raises(FileNotFoundError, match=r"images/val.*classes\.txt"):
        FolderDataset(root, "val")
    (root / "images/val").mkdir()
    (root / "masks/val").mkdir()
    with pytest.raises(DataError, match=r"images/val: split 'val' is empty") as info:
        FolderDataset(root, "val")
    assert info.value.kind == "empty_split"
    (root / "palette.txt").write_text("1 2 3\n")
    with pytest.raises(DataError, match=r"palette\.txt: has 1 colours for 3 classes"):
        FolderDataset(root, "train")
    (root / "palette.txt").write_text("1 2 3\n4 5\n")
    with pytest.raises(DataError, match=r"palette\.txt: line 2: expected 'r g b'"):
        FolderDataset(root, "train")
    (root / "classes.txt").write_text("\n")
    with pytest.raises(DataError, match=r"classes\.txt: the class list is empty") as info:
        FolderDataset(root, "train")
    assert info.value.kind == "layout"


def test_folder_dataset_takes_every_image_type_predict_takes(make_folder):
    # one suffix list for training data and `emanet predict`: a .webp/.bmp/.tif image that predict reads
    # must not be reported "without an image" by the dataset
    from emanet.deploy.predict_files import IMAGE_SUFFIXES as PREDICT_SUFFIXES

    root, labels = make_folder(names=("a",))
    rng = np.random.default_rng(5)
    for k, suffix in enumerate((".webp", ".bmp", ".tif")):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / f"images/train/x{k}{suffix}")
        write_gray_png(root / f"masks/train/x{k}.png", labels["a"])
        assert suffix in PREDICT_SUFFIXES
    ds = FolderDataset(root, "train")
    assert [p.suffix for p, _ in ds.samples] == [".jpg", ".webp", ".bmp", ".tif"]
