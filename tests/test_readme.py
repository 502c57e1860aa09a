"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    scope: dict = {}
    torch.manual_seed(0)
    with torch.no_grad():
        exec(compile("\n".join(blocks), str(README), "exec"), scope)
    assert scope["y"].shape == (2, 512, 65, 65)
    assert scope["recon"].shape == (1, 512, 65, 65) and scope["resp"].shape == (1, 64, 65, 65)
    assert scope["logits"].shape == (1, 21, 129, 129)
