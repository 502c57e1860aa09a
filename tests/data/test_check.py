"""`emanet check-data`, the training-time errors for the same bad files, and SkipBadSamples.

Fixtures are tiny datasets in the real layouts (the folder layout, VOC, ADE20K) with one bad file of each kind.
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from emanet.cli.main import main
from emanet.data import (
    KINDS,
    DataError,
    FolderDataset,
    SkipBadSamples,
    check_dataset,
    check_split,
    colour_mask_to_index,
    distinct_palette,
)
from emanet.data import check as check_module
from tests.conftest import H, W, random_label, write_gray_png, write_image, write_index_png

CLASSES = ["bg", "a", "b", "c", "d"]  # 5 classes: valid labels 0..4 and 255
PALETTE = distinct_palette(5)
SAMPLES = ["good", "jpg_cut", "label_cut", "png_cut", "rgb_mask", "sixteen", "size", "value7"]  # sorted: indices
BAD_KIND = {
    "jpg_cut": "truncated",
    "png_cut": "truncated",
    "label_cut": "truncated",
    "size": "size_mismatch",
    "value7": "label_values",
    "rgb_mask": "label_mode",
    "sixteen": "label_mode",
}


def _truncate(path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def make_bad_folder(root, *, unpaired: bool = True):
    """The folder layout, split "train": one good sample and one of each bad kind; an empty "val" split."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    images, masks = root / "images" / "train", root / "masks" / "train"
    labels = {}
    for name in SAMPLES:
        suffix = ".jpg" if name == "jpg_cut" else ".png"
        write_image(images / f"{name}{suffix}", rng, size=(H + 3, W) if name == "size" else (H, W))
        labels[name] = random_label(rng, len(CLASSES))
        write_index_png(masks / f"{name}.png", labels[name], PALETTE)
    _truncate(images / "jpg_cut.jpg", 0.6)
    _truncate(images / "png_cut.png", 0.6)
    _truncate(masks / "label_cut.png", 0.5)
    labels["value7"][2, 3:6] = 7  # 3 pixels out of range
    write_index_png(masks / "value7.png", labels["value7"], PALETTE)
    index = np.where(labels["rgb_mask"] == 255, 0, labels["rgb_mask"])
    Image.fromarray(np.array(PALETTE, dtype=np.uint8)[index]).save(masks / "rgb_mask.png")  # colour-coded
    Image.fromarray(np.minimum(labels["sixteen"], 4).astype(np.uint16)).save(masks / "sixteen.png")
    if unpaired:
        write_image(images / "lonely.jpg", rng)
        write_gray_png(masks / "orphan.png", random_label(rng, len(CLASSES)))
    (root / "images" / "val").mkdir(parents=True)
    (root / "masks" / "val").mkdir(parents=True)
    return root


def _by_sample(report):
    found = {}
    for p in report.problems:
        found.setdefault(p.path.rsplit("/", 1)[-1].split(".")[0], []).append(p)
    return found


def test_check_finds_each_kind_with_its_message(tmp_path):
    root = make_bad_folder(tmp_path)
    report = check_split("folder", root=root, split="train", num_classes=5)
    assert not report.ok and report.num_samples == len(SAMPLES) == report.samples_scanned
    assert report.files_scanned == 2 * len(SAMPLES)
    found = _by_sample(report)
    assert "good" not in found
    for name, kind in BAD_KIND.items():
        assert [p.kind for p in found[name]] == [kind], name
    assert set(found) == set(BAD_KIND) | {"lonely", "orphan"}
    assert report.counts() == {
        "truncated": 3,
        "label_mode": 2,
        "missing_pair": 2,
        "size_mismatch": 1,
        "label_values": 1,
    }
    assert all(p.kind in KINDS for p in report.problems)

    msg = {name: problems[0].message for name, problems in found.items()}
    assert msg["jpg_cut"].startswith("image file is truncated") and "copy or download it again" in msg["jpg_cut"]
    assert msg["png_cut"].startswith("image file is truncated")
    assert msg["label_cut"].startswith("label file is truncated")
    assert f"label is {W}x{H} (WxH) but its image " in msg["size"] and f"size.png is {W}x{H + 3}" in msg["size"]
    value7 = found["value7"][0]
    assert value7.message == "label values [7] on [3] pixels are out of range for 5 classes (valid: 0..4, 255 = ignore)"
    assert value7.details == {"values": [7], "counts": [3]}
    assert "looks like a colour-coded mask" in msg["rgb_mask"] and "colour_mask_to_index" in msg["rgb_mask"]
    assert "colours are in this dataset's palette" in msg["rgb_mask"]
    assert "16/32-bit image (mode 'I;16')" in msg["sixteen"] and "values are 0..4: they fit 8 bits" in msg["sixteen"]
    assert msg["lonely"].startswith("image without a mask") and msg["orphan"].startswith("mask without an image")


def test_training_reads_raise_the_same_errors(tmp_path):
    root = make_bad_folder(tmp_path, unpaired=False)
    report = check_split("folder", root=root, split="train")
    expected = {name: problems[0] for name, problems in _by_sample(report).items()}
    ds = FolderDataset(root, "train")  # as training builds it: strict
    assert [ds.name(i) for i in range(len(ds))] == SAMPLES
    ds.read(0)  # the good one
    for i, name in enumerate(SAMPLES[1:], start=1):
        with pytest.raises(DataError) as info:
            ds[i]
        e = info.value
        assert e.kind == BAD_KIND[name] == expected[name].kind
        assert e.path == expected[name].path and str(e).startswith(f"{e.path}: ")
        # check-data appends a sentence about the content of rejected label modes; the rest is identical
        assert expected[name].message.startswith(e.reason)


def test_strict_loaders_still_refuse_unpaired_files(tmp_path):
    root = make_bad_folder(tmp_path)
    with pytest.raises(DataError, match=r"without a mask: lonely.*without an image: orphan") as info:
        FolderDataset(root, "train")
    assert info.value.kind == "missing_pair"


def test_empty_split_and_missing_folders_are_report_entries(tmp_path):
    root = make_bad_folder(tmp_path)
    empty = check_split("folder", root=root, split="val")
    assert [(p.kind, p.path) for p in empty.problems] == [("empty_split", str(root / "images" / "val"))]
    missing = check_split("folder", root=root, split="test")
    assert [p.kind for p in missing.problems] == ["layout"] and "images/test is not a folder" in missing.problems[
        0
    ].message
    nowhere = check_split("voc", root=tmp_path / "nowhere", split="val")
    assert [p.kind for p in nowhere.problems] == ["layout"] and "JPEGImages" in nowhere.problems[0].message
    assert "1 problem(s): layout 1" in nowhere.summary()


def test_voc_listed_ids_without_files_and_empty_list(make_voc):
    root, _ = make_voc(splits={"train": ["2007_000032", "2007_000033", "2007_000042"], "val": ["2008_000001"]})
    base = root / "VOCdevkit" / "VOC2012"
    (base / "JPEGImages" / "2007_000042.jpg").unlink()
    (base / "SegmentationClass" / "2007_000033.png").unlink()
    report = check_split("voc", root=root, split="train", num_classes=21)
    assert report.num_samples == report.samples_scanned == 1
    assert [(p.kind, p.path.rsplit("/", 1)[-1]) for p in report.problems] == [
        ("missing_pair", "2007_000033.jpg"),
        ("missing_pair", "2007_000042.png"),
    ]
    assert report.problems[0].message.startswith("image without a label:")
    assert report.problems[1].message.startswith("label without an image:")
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    assert [p.kind for p in check_split("voc", root=root, split="val").problems] == ["empty_split"]
    assert [p.kind for p in check_split("voc", root=root, split="val", num_classes=19).problems] == ["empty_split"]
    wrong = check_split("voc", root=root, split="train", num_classes=19)
    assert "model.num_classes is 19" in next(p.message for p in wrong.problems if p.kind == "num_classes")


def test_ade_values_are_quoted_as_stored_in_the_file(make_ade):
    raw = np.ones((H, W), dtype=np.uint8)
    raw[1, 1:3] = 200  # maps to 199 after "reduce zero label": out of range for 150 classes
    root, _ = make_ade(labels=[raw, np.ones((H, W), dtype=np.uint8)])
    (root / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000009.png").write_bytes(b"")
    report = check_split("ade20k", root=root, split="training")
    kinds = {p.path.rsplit("/", 1)[-1]: p for p in report.problems}
    assert kinds["ADE_train_00000001.png"].details == {"values": [200], "counts": [2], "mapped": [199]}
    assert kinds["ADE_train_00000009.png"].kind == "missing_pair"  # an annotation without an image


def test_check_data_cli_exit_status_and_json(tmp_path, make_folder, capsys):
    root = make_bad_folder(tmp_path / "bad")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"data:\n  dataset: folder\n  root: {root}\n  train_split: train\n  val_split: val\nmodel:\n  num_classes: 5\n"
    )
    out = tmp_path / "report.json"
    assert main(["check-data", "--config", str(config), "--no-progress", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "folder train" in text and "[truncated]" in text and "check-data: 10 problem(s) found" in text
    saved = json.loads(out.read_text())
    assert saved["ok"] is False and [r["split"] for r in saved["reports"]] == ["train", "val"]
    assert saved["reports"][0]["counts"]["truncated"] == 3 and saved["reports"][1]["counts"] == {"empty_split": 1}

    # only the first sample ("good") is read; the unpaired files were found while listing the split
    assert main(["check-data", "--config", str(config), "--split", "train", "--max-files", "1", "--no-progress"]) == 1
    assert "1 of 8 samples scanned, 2 files; 2 problem(s): missing_pair 2" in capsys.readouterr().out

    clean, _ = make_folder(classes=CLASSES)
    args = ["check-data", "data.dataset=folder", f"data.root={clean}", "data.train_split=train", "model.num_classes=5"]
    assert main([*args, "--split", "train", "--no-progress"]) == 0
    assert "no problems" in capsys.readouterr().out
    assert main([*args, "data.num_workers=-1"]) == 2
    assert "data.num_workers must be >= 0" in capsys.readouterr().err


def test_skip_bad_samples_logs_skips_and_appends(tmp_path):
    root = make_bad_folder(tmp_path, unpaired=False)
    ds = FolderDataset(root, "train")
    log = tmp_path / "bad.tsv"
    log.write_text("earlier\tkept\n")
    safe = SkipBadSamples(ds, log_path=log, max_tries=8)
    assert len(safe) == len(ds) and safe.classes == ds.classes and safe.name(2) == "label_cut"
    image, mask = safe[len(SAMPLES) - 1]  # value7 is bad: wraps around to index 0, "good"
    good_image, good_mask = ds[0]
    assert torch.equal(image, good_image) and torch.equal(mask, good_mask)
    assert safe.skipped == 1
    lines = log.read_text().splitlines()
    assert lines[0] == "earlier\tkept"
    path, reason = lines[1].split("\t")
    assert path.endswith("value7.png") and reason.startswith("label values [7] on [3] pixels")

    with pytest.raises(DataError, match=r"too many consecutive bad samples: 3 in a row from index 1") as info:
        SkipBadSamples(ds, log_path=log, max_tries=3)[1]
    assert info.value.path.endswith("png_cut.png")  # the last one tried: 1 jpg_cut, 2 label_cut, 3 png_cut
    assert len(log.read_text().splitlines()) == 2 + 3  # nothing lost, three more lines


def test_dataloader_workers_share_the_log_and_errors_keep_their_type(tmp_path):
    root = make_bad_folder(tmp_path, unpaired=False)
    ds = FolderDataset(root, "train")
    log = tmp_path / "bad.tsv"
    loader = torch.utils.data.DataLoader(SkipBadSamples(ds, log_path=log), batch_size=1, num_workers=2)
    assert len(list(loader)) == len(SAMPLES)
    logged = sorted(line.split("\t")[0].rsplit("/", 1)[-1] for line in log.read_text().splitlines())
    # index i bad -> tries i + 1, ... until "good" (index 0, after wrapping) or a good one
    assert len(logged) == sum(len(SAMPLES) - i for i in range(1, len(SAMPLES)))
    assert {name.split(".")[0] for name in logged} == set(BAD_KIND)
    batches = iter(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1))
    try:
        with pytest.raises(DataError) as info:
            list(batches)
    finally:
        batches._shutdown_workers()  # now: left to the garbage collector, the join waits 5 s
    # the main process gets the worker's message without its traceback text, and the path back
    error = info.value
    assert error.path.endswith("jpg_cut.jpg") and error.reason.startswith("image file is truncated")
    assert str(error).endswith("(in DataLoader worker process 0)") and "Traceback" not in str(error)


def test_truncated_files_are_caught_even_if_pillow_was_told_to_pad(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # nothing in emanet switches it on
    root = make_bad_folder(tmp_path, unpaired=False)
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        report = check_dataset(FolderDataset(root, "train"))
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert report.counts()["truncated"] == 3 and "LOAD_TRUNCATED_IMAGES was True" in report.notes[0]


def test_colour_mask_to_index():
    index = random_label(np.random.default_rng(4), 5, void=None)
    rgb = np.array(PALETTE, dtype=np.uint8)[index]  # (H, W, 3)
    np.testing.assert_array_equal(colour_mask_to_index(rgb, PALETTE), index)
    rgb[0, 0] = (1, 2, 3)
    with pytest.raises(ValueError, match=r"1 colour\(s\) are not in the palette: \(1, 2, 3\)"):
        colour_mask_to_index(rgb, PALETTE)


def test_data_error_survives_pickling_and_one_argument_construction():
    e = DataError("/d/x.png", "label values [7]", kind="label_values", details={"values": [7]})
    again = pickle.loads(pickle.dumps(e))
    assert (str(again), again.path, again.kind, again.details) == (
        "/d/x.png: label values [7]",
        "/d/x.png",
        "label_values",
        {"values": [7]},
    )
    assert str(DataError("Caught DataError in worker: /d/x.png: bad")) == "Caught DataError in worker: /d/x.png: bad"


def test_check_does_not_import_the_package_back():
    # data/__init__ imports check; check reads the datasets from data.datasets, never from the package, so the
    # two import in one direction (not even a function-level import closes the cycle)
    tree = ast.parse(Path(check_module.__file__).read_text())
    imported = {(n.module, n.level) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert (None, 1) not in imported and ("emanet.data", 0) not in imported
    assert ("datasets", 1) in imported
