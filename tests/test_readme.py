"""The README's code blocks as written.

Every Python block runs on its own, in a fresh namespace (a block that forgets an import fails). Every
shell block's `emanet` command (also after `torchrun ... -m`) parses with the real CLI, its --config files
exist and its section.key=value overrides are valid config keys; `make` targets exist in the Makefile.
Commands that need datasets or GPUs are checked that far, not run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from emanet.cli.main import build_parser
from emanet.config import load_config, resolve_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_each_python_example_runs_on_its_own():
    found = blocks("python")
    assert len(found) >= 3
    scopes = []
    for code in found:
        scope: dict = {}
        torch.manual_seed(0)
        with torch.no_grad():
            exec(compile(code, str(README), "exec"), scope)
        scopes.append(scope)

    def defining(name: str) -> dict:  # the block that defines `name`, wherever the README places it
        (scope,) = [s for s in scopes if name in s]
        return scope

    em = defining("recon")
    assert em["y"].shape == (2, 512, 65, 65)
    assert em["recon"].shape == (1, 512, 65, 65) and em["resp"].shape == (1, 64, 65, 65)
    assert defining("logits")["logits"].shape == (1, 21, 129, 129)


def shell_commands() -> list[list[str]]:
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_the_python_block_without_an_import_fails():  # the check above can fail
    with pytest.raises(NameError):
        exec(compile("logits = torch.zeros(1)", "<block>", "exec"), {})


@pytest.mark.parametrize("words", shell_commands(), ids=lambda w: " ".join(w)[:60])
def test_each_shell_command_is_valid(words):
    if words[0] == "make":
        assert re.search(rf"^{words[1]}:", (ROOT / "Makefile").read_text(), flags=re.M), words
        return
    start = words.index("emanet") + 1  # emanet ... or torchrun ... -m emanet ...
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(words[start:])
    except SystemExit:
        pytest.fail(f"the CLI rejects: {' '.join(words)}")
    overrides = list(getattr(args, "overrides", [])) + extra
    assert all("=" in o and not o.startswith("-") for o in overrides), overrides
    config = getattr(args, "config", None)
    if config is not None:  # a packaged recipe's name, or a file of the checkout
        config = resolve_config(config if not (ROOT / config).is_file() else ROOT / config)
    if args.command in ("train", "eval", "check-data", "demo"):
        load_config(config, overrides)  # unknown keys and bad values raise


def test_the_voc_folders_the_readme_asks_for_are_the_ones_the_reference_config_reads(tmp_path):
    """Lay out exactly the folders of the README's VOC "You need" list; both splits of the reference
    config must then load (the list once omitted SegmentationClass/, which val needs)."""
    import numpy as np
    from PIL import Image

    from emanet.data import build_dataset

    text = README.read_text().split("You need:")[1].split("- ImageNet")[0]
    folders = re.findall(r"`([A-Za-z]+)/`", text)
    lists = re.search(r"`ImageSets/Segmentation/\{([^}]*)\}\.txt`", text).group(1).split(",")
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for name in folders:
        (base / name).mkdir(parents=True)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    for name in lists:
        (base / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("2007_000032\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(base / "JPEGImages" / "2007_000032.jpg")
    for name in folders:
        if name.startswith("Segmentation"):
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(base / name / "2007_000032.png")
    cfg = load_config(resolve_config("voc_reference"), [f"data.root={tmp_path}"])
    for split in (cfg.data.train_split, cfg.data.val_split):
        assert len(build_dataset("voc", root=tmp_path, split=split)) == 1, split


def test_layout_names_every_module_and_only_modules_that_exist():
    layout = README.read_text().split("## Layout", 1)[1].split("```")[1]
    named, folder = set(), None
    for line in layout.splitlines():
        head = line.split()[0] if line.strip() else ""
        if line[:1].strip():  # a top-level entry: the package's ground floor, or something outside it
            folder = "" if head == "src/emanet/" else None
        elif line[2:3].strip():  # "  models/": a wing; the indented lines below continue it
            folder = head
        if folder is not None:
            named |= {folder + name for name in re.findall(r"\b([a-z_]+\.py)\b", line)}
    src = ROOT / "src" / "emanet"
    modules = {p.relative_to(src).as_posix() for p in src.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert modules - named == set(), "modules the README's Layout does not name"
    assert named - modules == set(), "named, not found"
