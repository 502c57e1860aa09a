import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from emanet.metrics import ConfusionMatrix, confusion_matrix, format_table, scores

# C = 4; two ignored pixels (whose predictions 3 and 1 must not count); class 3 absent from both after that.
TARGET = torch.tensor([[0, 0, 0, 1, 1], [2, 2, 2, 255, 255]])
PRED = torch.tensor([[0, 0, 1, 1, 2], [2, 2, 0, 3, 1]])
MATRIX = [
    [2, 1, 0, 0],  # gt 0: predicted 0, 0, 1
    [0, 1, 1, 0],  # gt 1: predicted 1, 2
    [1, 0, 2, 0],  # gt 2: predicted 2, 2, 0
    [0, 0, 0, 0],  # gt 3: absent
]


def test_confusion_matrix_by_hand():
    m = confusion_matrix(PRED, TARGET, num_classes=4)
    assert m.dtype == torch.int64 and m.tolist() == MATRIX


def test_scores_by_hand():
    r = ConfusionMatrix(4)
    r.update(PRED, TARGET)
    res = r.compute()
    # IoU = TP / (TP + FP + FN): class 0: 2/(3+3-2), class 1: 1/(2+2-1), class 2: 2/(3+3-2), class 3: NaN
    np.testing.assert_allclose(res["IoU"][:3], [0.5, 1 / 3, 0.5])
    assert math.isnan(res["IoU"][3])
    np.testing.assert_allclose(res["Acc"][:3], [2 / 3, 1 / 2, 2 / 3])
    assert math.isnan(res["Acc"][3])
    assert res["aAcc"] == pytest.approx(5 / 8)
    assert res["mIoU"] == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)
    assert res["mAcc"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert res["fwIoU"] == pytest.approx(3 / 8 * 0.5 + 2 / 8 * (1 / 3) + 3 / 8 * 0.5)


def test_class_only_predicted_counts_in_miou_not_in_macc():
    # gt 0 twice; predicted 0 and 2: IoU = [1/2, NaN, 0], Acc = [1/2, NaN, NaN]
    res = scores(confusion_matrix(torch.tensor([0, 2]), torch.tensor([0, 0]), 3))
    assert res["mIoU"] == pytest.approx(0.25)
    assert res["mAcc"] == pytest.approx(0.5)
    assert res["IoU"][2] == 0 and math.isnan(res["Acc"][2])
    assert res["fwIoU"] == pytest.approx(0.5)


def test_matches_a_pixel_loop_on_random_data():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (2, 13, 11), generator=g)
    target[target == 5] = 255
    pred = torch.randint(0, 5, (2, 13, 11), generator=g)
    expected = np.zeros((5, 5), dtype=np.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            expected[t, p] += 1
    np.testing.assert_array_equal(confusion_matrix(pred, target, 5).numpy(), expected)


def test_label_out_of_range_raises():
    with pytest.raises(ValueError, match=r"label values \[4, 7\]"):
        confusion_matrix(torch.tensor([0, 0, 0]), torch.tensor([4, 7, 255]), 4)
    with pytest.raises(ValueError, match=r"label values \[-1\]"):
        confusion_matrix(torch.tensor([0]), torch.tensor([-1]), 4)
    with pytest.raises(ValueError, match="predictions"):
        confusion_matrix(torch.tensor([4]), torch.tensor([0]), 4)
    with pytest.raises(TypeError, match="argmax"):
        confusion_matrix(torch.zeros(3), torch.tensor([0, 0, 0]), 4)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), 4)


def test_accumulates_over_batches_and_resets():
    cm = ConfusionMatrix(4)
    assert cm.matrix.tolist() == [[0] * 4] * 4 and math.isnan(cm.compute()["mIoU"])
    cm.update(PRED[0], TARGET[0])
    cm.update(PRED[1], TARGET[1])
    assert cm.matrix.tolist() == MATRIX
    cm.update(PRED, TARGET)
    assert (cm.matrix == 2 * torch.tensor(MATRIX)).all()
    assert cm.compute()["mIoU"] == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)  # scale-free
    cm.reset()
    assert cm.matrix.sum() == 0


def test_all_reduce(tmp_path):
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    assert cm.all_reduce().matrix.tolist() == MATRIX  # not initialised: no-op
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        assert cm.all_reduce().matrix.tolist() == MATRIX
        assert cm.all_reduce("cpu").matrix.device.type == "cpu"  # reduced where asked, kept where it was
    finally:
        dist.destroy_process_group()


def test_format_table():
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    table = format_table(cm.compute(), ["bg", "cat", "dog", "unicorn"])
    lines = table.splitlines()
    assert lines[0].split() == ["class", "IoU", "Acc"]
    assert lines[2].split() == ["bg", "50.00", "66.67"]
    assert lines[5].split() == ["unicorn", "-", "-"]
    assert lines[-1].split() == ["aAcc", "62.50", "mIoU", "44.44", "mAcc", "61.11", "fwIoU", "45.83"]
