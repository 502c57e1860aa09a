"""Benchmarks (b) and (c): the whole EMANet, and what torch.compile buys.

(b) EMANet-R50 and -R101 OS8: the eager forward, the prepared model's forward and the Predictor's whole call
    (eager and default = prepared), float32 and bfloat16 autocast (EM kept in float32), interleaved.
(c) torch.compile (opt-in): cold compile and steady medians, the prepared forward and one training step.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from emanet.bench.timing import interleaved
from emanet.config import Config
from emanet.deploy.predict import Predictor
from emanet.flops import count_model
from emanet.losses import SegmentationLoss
from emanet.models.emanet import ModelConfig, build_model
from emanet.models.fuse import prepare_for_inference
from emanet.runtime import maybe_compile

logger = logging.getLogger(__name__)
MODEL_BACKBONES = ("resnet50", "resnet101")


def calibrated_model(backbone: str = "resnet101", **overrides) -> nn.Module:
    """A randomly initialised EMANet (deep stem, OS8, K=64, T=3), BN statistics calibrated on one small
    batch so activations have realistic scales; eval mode."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, **overrides))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 129, 129))
    return model.eval()


def bench_model(size: int = 513, repeats: int = 5, backbones=MODEL_BACKBONES) -> list[dict]:
    """Per backbone, interleaved: the eager forward, the prepared model's forward, and the whole Predictor
    call (preprocessing, forward, softmax, argmax) on a size x size image, eager (prepare=False) and default
    (prepared), in float32 and bfloat16 autocast."""
    return [row for backbone in backbones for row in _bench_backbone(backbone, size, repeats)]


def _bench_backbone(backbone: str, size: int, repeats: int) -> list[dict]:
    model = calibrated_model(backbone)
    macs = count_model(model, (size, size)).total.macs
    cfg = Config()
    cfg.model = ModelConfig(backbone=backbone)
    image = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image = image.numpy()
    fast = prepare_for_inference(copy.deepcopy(model))
    predictors = {
        (p, prep): Predictor(model, cfg, device="cpu", precision=p, prepare=prep)
        for p in ("fp32", "bf16")
        for prep in (False, True)
    }
    x = predictors[("fp32", False)].preprocess(image)[1][None]  # (1, 3, Hp, Wp): what the network sees

    def forward(m: nn.Module, bf16: bool = False) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return m(x)

    fns = {}
    for p in ("fp32", "bf16"):
        bf16 = p == "bf16"
        fns[(p, "eager forward")] = functools.partial(forward, model, bf16)
        fns[(p, "prepared forward")] = functools.partial(forward, fast, bf16)
        fns[(p, "Predictor prepare=False")] = functools.partial(predictors[(p, False)], image)
        fns[(p, "Predictor default (prepared)")] = functools.partial(predictors[(p, True)], image)
    med = interleaved({f"{p} {v}": fn for (p, v), fn in fns.items()}, budget_s=repeats * 4.0, max_repeats=repeats)
    ref = forward(model).float()
    ref_labels = ref.argmax(1)[0, : image.shape[0], : image.shape[1]].numpy()
    rows = []
    for (p, variant), fn in fns.items():
        out = fn()
        if isinstance(out, torch.Tensor):
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            labels = out.float().argmax(1)[0, : image.shape[0], : image.shape[1]].numpy()
        else:  # a Prediction
            rel, labels = None, out.labels
        agree = float((labels == ref_labels).mean())
        t, eager = med[f"{p} {variant}"], med[f"{p} eager forward"]
        rows.append(
            {
                "backbone": backbone,
                "size": size,
                "precision": p,
                "variant": variant,
                "median_s": t,
                "ratio_to_eager_forward": t / eager,
                "gmacs": macs / 1e9,
                "rel_err_vs_eager_fp32": rel,
                "label_agreement_vs_eager_fp32": agree,
            }
        )
        logger.info(f"  {backbone} {p} {variant:<30}{t:>8.3f} s  {t / eager:.2f}x eager forward  labels {agree:.4f}")
    return rows


# ----------------------------------------------------------------------------- torch.compile


def bench_compile(size: int = 513, train_size: int = 129, repeats: int = 3, backbone: str = "resnet50") -> list[dict]:
    """What the opt-in --compile buys on this CPU: cold compile (first call) and steady medians of
    (i) the prepared model's forward at size x size, float32 and bfloat16 autocast, compiled vs not, and
    (ii) one training step (forward, loss, backward, SGD) at batch 2 x train_size^2, compiled vs not."""
    rows = _compile_forward_rows(backbone, size, repeats)  # frees its models before the training step
    return rows + [_compile_train_row(backbone, train_size, repeats)]


def _first_call_s(fn: Callable[[], object]) -> float:
    """Seconds of one call: for a compiled model's first call, the cold compile."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _compile_row(case: str, precision: str, med: dict, cold: float, rel_diff: float | None) -> dict:
    """A (c) row's timings (without its case), logged as one line."""
    eager, compiled = med["eager"], med["compiled"]
    logger.info(f"  compile {case}: eager {eager:.3f} s, compiled {compiled:.3f} s, first call {cold:.1f} s")
    return {
        "precision": precision,
        "eager_s": med["eager"],
        "compiled_s": med["compiled"],
        "cold_first_call_s": cold,
        "rel_diff": rel_diff,
    }


def _compile_forward_rows(backbone: str, size: int, repeats: int) -> list[dict]:
    """(i): the prepared model's forward on one size x size input, compiled vs not, float32 then bfloat16."""
    fast = prepare_for_inference(calibrated_model(backbone))
    compiled = maybe_compile(fast, True)
    x = torch.randn(1, 3, size, size)

    def forward(m, bf16):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return m(x)

    rows = []
    for p in ("fp32", "bf16"):
        bf16 = p == "bf16"
        cold = _first_call_s(functools.partial(forward, compiled, bf16))
        want, got = forward(fast, bf16).float(), forward(compiled, bf16).float()
        rel = ((got - want).norm() / want.norm()).item()
        med = interleaved(
            {"eager": functools.partial(forward, fast, bf16), "compiled": functools.partial(forward, compiled, bf16)},
            budget_s=repeats * 3.0,
            max_repeats=repeats,
        )
        row = _compile_row(f"{backbone} forward {p}", p, med, cold, rel)
        rows.append({"case": f"prepared {backbone} forward {size}x{size}", **row})
    return rows


def _compile_train_row(backbone: str, train_size: int, repeats: int) -> dict:
    """(ii): one training step (forward, loss, backward, SGD) at batch 2 x train_size^2, compiled vs not."""
    torch.manual_seed(0)
    model = calibrated_model(backbone).train()
    criterion = SegmentationLoss(reduction="all")
    images = torch.randn(2, 3, train_size, train_size)
    labels = torch.randint(0, 21, (2, train_size, train_size))
    optimizer = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-4, momentum=0.9)
    net = maybe_compile(model, True)

    def step(m):
        loss = criterion(m(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    cold = _first_call_s(lambda: step(net))
    med = interleaved(
        {"eager": lambda: step(model), "compiled": lambda: step(net)}, budget_s=repeats * 3.0, max_repeats=repeats
    )
    row = _compile_row(f"{backbone} train step", "fp32", med, cold, None)
    return {"case": f"{backbone} train step, batch 2 x {train_size}x{train_size}", **row}
