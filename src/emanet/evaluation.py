"""Evaluation: one dataset-wide confusion matrix over whole / sliding-window / multi-scale + flip inference, in
one process or sharded over torchrun's ranks."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from emanet.config import Config
from emanet.errors import DataError, UserError
from emanet.inference import infer
from emanet.metrics import ConfusionMatrix, scores
from emanet.models.em import set_eval_stages
from emanet.progress import progress_bar
from emanet.runtime import all_gather_lists, autocast, shard

# what allocators say when memory runs out: CPU (c10's DefaultCPUAllocator, Windows), CUDA, MPS
_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|not enough memory|cannot allocate memory", re.I)


class OutOfMemory(UserError):
    """Training or evaluation ran out of memory: the message says what it tried and which settings to lower."""


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), or a RuntimeError whose message is an allocator's (the CPU's)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and bool(_OUT_OF_MEMORY.search(str(error)))
    )


def allocator_said(error: BaseException) -> str:
    """The allocator's own first line, shortened (CUDA's runs on with advice about its caching allocator)."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= 160 else line[:157] + "..."


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    cfg: Config,
    device: torch.device,
    *,
    max_images: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """One dataset-wide confusion matrix; whole / sliding-window / multi-scale + flip inference.

    Under torch.distributed each rank evaluates images rank, rank + world, ... and the matrices are summed
    once, so every image counts exactly once and every rank returns the same results. With
    data.on_bad_sample=skip an unreadable image is left out and listed in ``skipped_files`` ("path: reason").
    """
    was_training = model.training
    model.eval()
    if cfg.eval.eval_stages is not None:
        set_eval_stages(model, cfg.eval.eval_stages)
    num_classes = cfg.model.num_classes
    matrix = ConfusionMatrix(num_classes, ignore_index=cfg.loss.ignore_index)
    n = len(dataset) if not max_images else min(max_images, len(dataset))  # type: ignore[arg-type]
    rank, world = shard()
    indices = range(rank, n, world)
    bar = progress_bar(total=len(indices), desc="eval", unit="img", leave=False) if progress and rank == 0 else None
    skip, skipped = cfg.data.on_bad_sample == "skip", []
    for i in indices:
        try:
            image, label = dataset[i]
        except DataError as error:
            if not skip:
                raise
            skipped.append(f"{error.path}: {' '.join(error.reason.split())}")
            continue
        try:
            predicted = _predict(model, image, label.shape[-2:], cfg, device)
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            raise _out_of_memory(error, cfg, device, i, image.shape[-2:]) from None
        matrix.update(predicted, label[None])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    matrix.all_reduce(device)  # on the model's device: NCCL reduces CUDA tensors only
    skipped = all_gather_lists(skipped)
    model.train(was_training)
    results = scores(matrix.matrix)
    results["images"] = n - len(skipped)
    results["confusion_matrix"] = matrix.matrix.tolist()  # counts, rows = ground truth, columns = prediction
    if skipped:
        results["skipped_files"] = sorted(skipped)
    return results


def _predict(
    model: nn.Module, image: torch.Tensor, size: torch.Size, cfg: Config, device: torch.device
) -> torch.Tensor:
    """Labels (1, H, W) of one image at ``size``, on the CPU, by the inference cfg.eval asks for."""
    with autocast(device, cfg.train.precision):
        class_scores = infer(
            model,
            image[None].to(device),
            mode=cfg.eval.mode,
            scales=tuple(cfg.eval.scales),
            flip=cfg.eval.flip,
            crop_size=cfg.eval.crop_size,
            stride=cfg.eval.stride,
            num_classes=cfg.model.num_classes,
            align_corners=cfg.model.align_corners,
            out_size=size,
            probabilities=False,  # labels only: argmax of the scores
        )
    return class_scores.argmax(1).cpu()


def _out_of_memory(error: BaseException, cfg: Config, device: torch.device, index: int, size) -> OutOfMemory:
    e = cfg.eval
    how = f"eval.mode={e.mode}" + (f" (window {e.crop_size}, stride {e.stride})" if e.mode == "slide" else "")
    how += f", eval.scales={list(e.scales)}" + (", eval.flip=true" if e.flip else "")
    lower = []
    if e.mode == "whole":
        lower.append("eval.mode=slide with eval.crop_size and eval.stride (e.g. [513,513] and [341,341])")
    else:
        lower.append(f"a smaller eval.crop_size (now {e.crop_size})")
    if len(e.scales) > 1 or max(e.scales) > 1:
        lower.append("fewer or smaller eval.scales")
    if cfg.train.precision == "fp32":
        lower.append("--precision bf16 (train.precision=bf16; fp16 on CUDA)")
    return OutOfMemory(
        f"out of memory evaluating image {index} ({size[0]}x{size[1]}) with {how} in {cfg.train.precision} on "
        f"{device} ({allocator_said(error)}); lower what one forward holds: {'; or '.join(lower)}"
    )


def results_to_json(results: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in results.items():
        if isinstance(v, torch.Tensor | np.ndarray):
            v = v.tolist()
        if isinstance(v, float) and math.isnan(v):
            v = None
        if isinstance(v, list):
            v = [None if isinstance(x, float) and math.isnan(x) else x for x in v]
        out[k] = v
    return out
