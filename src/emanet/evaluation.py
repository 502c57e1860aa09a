"""Evaluation: one dataset-wide confusion matrix over whole / sliding-window / multi-scale + flip inference, in
one process or sharded over torchrun's ranks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from emanet.config import Config
from emanet.errors import DataError
from emanet.inference import infer
from emanet.metrics import ConfusionMatrix, scores
from emanet.models.em import set_eval_stages
from emanet.progress import progress_bar
from emanet.runtime import all_gather_lists, autocast, shard


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
        matrix.update(_predict(model, image, label.shape[-2:], cfg, device), label[None])
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
