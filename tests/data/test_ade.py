import numpy as np
import pytest

from emanet.data import ADE20KDataset, build_dataset
from emanet.errors import DataError
from tests.conftest import H, W


def _raw_label():
    raw = np.ones((H, W), dtype=np.uint8)
    raw[0, :4] = [0, 1, 2, 150]
    return raw


def test_reduce_zero_label(make_ade):
    root, _ = make_ade(labels=[_raw_label(), _raw_label()])
    ds = ADE20KDataset(root, "training")
    assert ds.num_classes == 150 and len(ds.palette) >= 150 and len(set(ds.palette)) == 150
    assert ds.classes[0] == "wall" and ds.classes[149] == "flag"
    label = ds.read(0)[1]
    assert label[0, :4].tolist() == [255, 0, 1, 149]  # 0 ("other") is ignored, x -> x - 1
    assert (label[1:] == 0).all()


@pytest.mark.parametrize("split", ["training", "train"])
def test_root_may_be_the_challenge_folder_and_split_aliases(make_ade, split):
    root, raw = make_ade()
    for r in (root, root / "ADEChallengeData2016"):
        ds = ADE20KDataset(r, split)
        assert [ds.name(i) for i in range(len(ds))] == ["ADE_train_00000001", "ADE_train_00000002"]
        expected = raw["ADE_train_00000002"].astype(int) - 1
        expected[expected < 0] = 255
        np.testing.assert_array_equal(ds.read(1)[1], expected)


def test_value_above_150_names_the_file(make_ade):
    raw = _raw_label()
    raw[5, 5] = 151
    root, _ = make_ade(labels=[raw, _raw_label()])
    with pytest.raises(ValueError, match=r"ADE_train_00000001\.png.*\[150\]"):
        ADE20KDataset(root, "training").read(0)


def test_bad_split_and_missing_annotations(make_ade):
    root, _ = make_ade()
    with pytest.raises(DataError, match="validation") as info:
        ADE20KDataset(root, "testing")
    assert info.value.kind == "dataset"
    with pytest.raises(FileNotFoundError, match=r"images/validation is not a folder.*annotations"):
        build_dataset("ade20k", root=root, split="val")
    (root / "ADEChallengeData2016/annotations/training/ADE_train_00000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_train_00000002.png"):
        ADE20KDataset(root, "training")
