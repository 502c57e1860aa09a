"""Opt-in ``torch.compile``: the one place that decides how train, eval and predict compile a model.

Off by default: a cold compile costs ~20-30 s on a 2-core CPU before the first step (see
benchmarks/results.md for what it buys afterwards). The EM core is compile-friendly: no host syncs inside
the model (the moving-average update of the bases decides "nothing accumulated" on the device) and no
branch on the batch size in compiled code, so a model compiles to one graph without breaks.
"""

from __future__ import annotations

import torch
from torch import nn


def maybe_compile(module: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(module)`` when ``enabled``, else ``module`` itself.

    The compiled wrapper shares parameters and buffers with ``module`` (save and load through the original);
    shapes are specialised first and made dynamic on the first recompile (torch's default), so inputs of a
    few different sizes cost a recompile each, not one per image.
    """
    if not enabled:
        return module
    return torch.compile(module)
