"""emanet.deploy.predict_files: which files `emanet predict` reads and the output names they get."""

from __future__ import annotations

from emanet.deploy.predict_files import collect_inputs


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
