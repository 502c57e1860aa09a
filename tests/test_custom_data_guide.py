"""docs/custom-data.md runs as written: every bash and python block, in order, in an empty folder."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "custom-data.md"


def blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(bash|python|yaml)\n(.*?)```", GUIDE.read_text(), flags=re.S)


def run_command(line: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(line, comments=True)
    if argv[0] == "emanet":  # the installed script, through this interpreter
        argv = [sys.executable, "-m", "emanet", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    else:
        raise AssertionError(f"the guide runs only emanet and python commands, found: {line}")
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_the_guide_runs_as_written(tmp_path):
    found = blocks()
    assert [kind for kind, _ in found].count("bash") >= 6
    if any("export" in body and "--check" in body for kind, body in found if kind == "bash"):
        for module in ("onnx", "onnxruntime", "matplotlib"):  # dev extras: CI has them
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"the guide's export --check / --plot need {module} (pip install emanet[dev])")
    ran = []
    for kind, body in found:
        if kind == "yaml":  # a file the reader saves: its first line names it
            name = re.match(r"# ([\w.-]+\.yaml)\n", body).group(1)
            yaml.safe_load(body)
            (tmp_path / name).write_text(body)
        elif kind == "python":
            r = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"python block failed:\n{body}\n{r.stderr}"
        else:
            for line in body.strip().splitlines():
                r = run_command(line, tmp_path)
                assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
                ran.append((line.split()[1] if line.startswith("emanet") else "python", r.stdout))
    assert [name for name, _ in ran] == ["python", "check-data", "train", "eval", "predict", "export"]
    outputs = dict(ran)

    # what each step promises is there
    assert "check-data: no problems found" in outputs["check-data"]
    run = tmp_path / "runs" / "mydata"
    assert (run / "config.yaml").is_file() and (run / "eval.json").is_file()
    classes = (tmp_path / "mydata" / "classes.txt").read_text().split()
    val = json.loads((run / "val.json").read_text())
    assert len(val["confusion_matrix"]) == len(classes) and val["images"] == 4
    assert all(name in outputs["eval"] for name in classes)
    for png in ("val_confusion.png", "val_iou.png"):
        assert Image.open(run / png).format == "PNG"
    images = sorted((tmp_path / "mydata" / "images" / "val").iterdir())
    for image in images:
        label = Image.open(tmp_path / "predictions" / f"{image.stem}.png")
        assert label.mode == "P" and label.size == Image.open(image).size
    assert not (tmp_path / "models" / "mydata" / "README.md").exists()  # the card is written by push_to_hub
    assert "check (float32 onnxruntime vs PyTorch" in outputs["export"] and "check passed" in outputs["export"]
    assert (tmp_path / "mydata.onnx").stat().st_size > 0
