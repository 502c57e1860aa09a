"""`emanet configs`: the recipes with whole descriptions, and every config key with its default and values."""

from __future__ import annotations

import dataclasses
import re

from emanet.cli.main import main
from emanet.config import Config, packaged_configs


def test_each_recipe_is_described_by_its_whole_first_sentence(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    recipes = packaged_configs()
    blocks = re.split(r"\n(?=\S)", out.strip())  # a recipe's name, then its wrapped description
    described = {b.split()[0]: " ".join(b.split()[1:]) for b in blocks if b.split()[0] in recipes}
    assert sorted(described) == sorted(recipes)
    for name, text in described.items():
        comment = " ".join(
            ln.lstrip("#").strip() for ln in recipes[name].read_text().splitlines() if ln.startswith("#")
        )
        assert text.endswith(".") and comment.startswith(text), (name, text)
        assert len(text) > 60, (name, text)  # a sentence, not a first line cut short
    assert max(len(line) for line in out.splitlines()) <= 110


def test_keys_lists_every_field_of_every_section_with_its_default(capsys):
    assert main(["configs", "--keys"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^(\w+\.\w+) +(\S+)", out, flags=re.M)
    cfg = Config()
    expected = [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(getattr(cfg, section.name))
    ]
    assert [key for key, _ in listed] == expected
    defaults = dict(listed)
    assert defaults["train.batch_size"] == "16" and defaults["model.aux"] == "false"
    assert "train.precision              fp32  (fp32 | bf16 | fp16)" in out
    assert re.search(r"^model\.backbone +resnet101  \(resnet10 \| .*resnet101", out, flags=re.M)  # BACKBONES
    assert re.search(r"^train\.loggers +\[\]  \(list\[tensorboard \| wandb\]\)$", out, flags=re.M)
    assert re.search(r"^model\.num_bases +64  \(int\)\n +K in the paper$", out, flags=re.M)  # the field's comment
