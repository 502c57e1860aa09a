"""emanet.deploy.predict_files: which files `emanet predict` reads, the output names they get and the checks of
those outputs before any work."""

from __future__ import annotations

import pytest

from emanet.deploy.predict_files import PredictOptions, collect_inputs, output_paths, plan_outputs
from emanet.errors import ConfigError


def test_collect_inputs_mirrors_names(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for rel in ("a.jpg", "a.png", "sub/c.png", "notes.txt", "out/old.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    files, problems = collect_inputs([str(root), str(root / "sub" / "c.png")], exclude=root / "out")
    assert problems == []
    # a.jpg / a.png would share outputs: suffixed; sub/c.png given twice: once; out/ (the output folder) skipped
    assert [(f.path.relative_to(root).as_posix(), f.name) for f in files] == [
        ("a.jpg", "a_jpg"),
        ("a.png", "a_png"),
        ("sub/c.png", "sub/c"),
    ]
    files, problems = collect_inputs([str(root / "*" / "*.png"), str(root / "zzz*.png")])
    assert [f.name for f in files] == ["out/old", "sub/c"]
    assert problems == [f"{root / 'zzz*.png'}: the pattern matches no image files"]
    files, _ = collect_inputs([str(root / "sub" / "c.png")])
    assert [f.name for f in files] == ["c"]


def test_inputs_that_lie_under_out_are_said_to_be_left_out(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for name in ("a.png", "b.jpg"):
        (root / name).write_bytes(b"")
    files, problems = collect_inputs([str(root), str(root / "*.png")], exclude=root)
    assert files == []
    assert problems == [
        f"{root}: its 2 image(s) lie under --out {root.resolve()} and were left out (outputs are never read back "
        "as inputs); give an --out outside the input folder",
        f"{root / '*.png'}: its 1 image(s) lie under --out {root.resolve()} and were left out (outputs are never "
        "read back as inputs); give an --out outside the input folder",
    ]


def test_plan_outputs_refuses_existing_outputs_and_sets_aside_names_too_long(tmp_path):
    root, out = tmp_path / "imgs", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    for name in ("a.png", "b.png", "x" * 250 + ".png"):
        (root / name).write_bytes(b"")
    files, _ = collect_inputs([str(root)])
    options = PredictOptions(attention=True, save_arrays=True)
    assert [p.name for p in output_paths(out, "a", options)] == [
        "a.png",
        "a_color.png",
        "a_overlay.png",
        "a_attention.png",
        "a_attention.npz",
    ]
    kept, refused = plan_outputs(files, out, options, overwrite=False)
    assert [f.name for f in kept] == ["a", "b"]
    [(path, reason)] = refused
    assert path == root / ("x" * 250 + ".png")
    assert reason.startswith(f"its output name {'x' * 250}_attention.png is 264 bytes, longer than the 255")
    (out / "b_attention.npz").write_bytes(b"earlier")
    with pytest.raises(ConfigError, match=rf"--out {out}: 1 output\(s\) exist already \({out / 'b_attention.npz'}\)"):
        plan_outputs(files, out, options, overwrite=False)
    assert plan_outputs(files, out, PredictOptions(), overwrite=False)[0] == kept  # no arrays asked for
    assert plan_outputs(files, out, options, overwrite=True)[0] == kept
    assert (out / "b_attention.npz").read_bytes() == b"earlier"  # checked, not touched
