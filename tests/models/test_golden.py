"""A stored golden output of one small full EMANet: weights, input and logits recorded once (torchvision's
"expected outputs" practice). Any change to the forward maths, the layer order inside a block, the EM
iterations or the upsampling shows up here, even where every other test compares two of our own code paths.

Regenerate only for a deliberate change of the maths: EMANET_REGEN_GOLDEN=1 pytest tests/models/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from emanet.models.emanet import ModelConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = Path(__file__).parents[1] / "fixtures" / "golden_emanet_tiny.safetensors"
CONFIG = dict(
    backbone="resnet18",
    stem="deep",
    backbone_width=4,
    output_stride=8,
    num_classes=3,
    channels=16,
    mid_channels=8,
    num_bases=4,
    num_stages=3,
    aux=True,
)


def _record() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(**CONFIG)).eval()
    # trained-looking BN statistics and bases, so the eval-mode path uses non-trivial buffers
    gen = torch.Generator().manual_seed(1)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
        elif name.endswith("running_var"):
            buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))
    image = torch.randn(2, 3, 37, 45, generator=gen)
    with torch.no_grad():
        logits = model(image)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors |= {"input": image, "logits": logits}
    save_file(tensors, GOLDEN, metadata={"config": json.dumps(CONFIG), "torch": torch.__version__})


@pytest.mark.skipif(not os.environ.get("EMANET_REGEN_GOLDEN"), reason="set EMANET_REGEN_GOLDEN=1 to record")
def test_record_golden():
    _record()


def test_tiny_emanet_reproduces_the_stored_logits():
    with safe_open(GOLDEN, "pt") as f:
        config = json.loads(f.metadata()["config"])
    stored = load_file(GOLDEN)
    model = build_model(ModelConfig(**config)).eval()
    model.load_state_dict({k[len("model.") :]: v for k, v in stored.items() if k.startswith("model.")})
    with torch.no_grad():
        logits = model(stored["input"])
    assert logits.shape == stored["logits"].shape == (2, 3, 37, 45)
    # float32 rounding across BLAS builds stays far below this; a changed computation does not
    torch.testing.assert_close(logits, stored["logits"], rtol=1e-4, atol=1e-4)
    assert not torch.equal(stored["logits"][0], stored["logits"][1])  # the two images do differ
