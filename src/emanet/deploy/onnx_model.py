"""An exported ONNX file used as a model: onnxruntime runs the graph, the file's metadata gives the config,
class names and palette (``export.model_metadata``). ``Predictor``, `emanet predict` and `emanet eval` take
an ``.onnx`` file as they take a model folder, with the same preprocessing and the same whole-image, sliding
window and multi-scale + flip code (``inference.infer`` calls ``OnnxModel`` like any model), so a deployment
needs no model code.

What the graph fixed at export stays fixed: the weights, the EM stages (the model's eval T), and for a static
export (``dynamic=False``) the batch of 1 and the input size. The graph runs in onnxruntime on the CPU, float32
in and out (int8 graphs too), so the config's runtime keys are cpu / fp32 / no compile.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from emanet.config import Config, load_config
from emanet.deploy.export import onnx_session, read_model_metadata, require_onnx
from emanet.errors import ConfigError, ModelSourceError
from emanet.pretrained import LoadedModel

logger = logging.getLogger(__name__)

SUFFIX = ".onnx"
RUNTIME = {"device": "cpu", "precision": "fp32", "compile": False}  # the config's train.* keys for a graph


def is_onnx_file(source: str | Path) -> bool:
    """A model source that names an ONNX file (by its suffix; it need not exist yet, loading says so)."""
    return Path(str(source)).suffix.lower() == SUFFIX and not Path(str(source)).is_dir()


class OnnxModel(nn.Module):
    """``forward(images (B, 3, H, W) normalised float) -> logits (B, C, H, W)`` by onnxruntime on the CPU.

    ``config``, ``class_names`` and ``palette`` come from the file's metadata. No parameters: a Predictor
    takes it as it is (nothing to prepare or compile).
    """

    def __init__(self, path: str | Path, *, threads: int = 0) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path}")
        require_onnx("onnxruntime")
        try:
            self.session = onnx_session(self.path, threads=threads)
        except Exception as e:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) share no narrower base
            raise ModelSourceError(f"{self.path}: not a readable ONNX file ({str(e).splitlines()[0]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.config, self.class_names, self.palette = read_model_metadata(meta, self.path)
        (image,), output = self.session.get_inputs(), self.session.get_outputs()[0]
        self.input_name, self.output_name = image.name, output.name
        # (B, 3, H, W): an int is fixed by the graph, None is dynamic (onnxruntime gives dynamic axes as names)
        self.input_shape = tuple(d if isinstance(d, int) else None for d in image.shape)

    @property
    def stages(self) -> int:
        """EM iterations T in the graph: the model's eval T at export."""
        m = self.config.model
        return m.eval_stages if m.eval_stages is not None else m.num_stages

    def check_options(
        self, *, device: str | torch.device | None, precision: str, compile: bool, eval_stages: int | None
    ) -> None:
        """A ConfigError naming the file for a setting the graph cannot honour (device None or "auto": the CPU)."""
        asked = []
        if device not in (None, "auto") and torch.device(device).type != "cpu":
            asked.append(f"device {device}")
        if precision != RUNTIME["precision"]:
            asked.append(f"precision {precision}")
        if compile:
            asked.append("compile")
        if asked:
            raise ConfigError(
                f"{self.path}: an ONNX file runs in onnxruntime on the CPU in float32; {', '.join(asked)} "
                "cannot apply (leave out --device/--precision/--compile, or use the model folder or checkpoint)"
            )
        if eval_stages is not None and eval_stages != self.stages:
            raise ConfigError(
                f"{self.path}: the graph runs T={self.stages} EM stages, fixed at export; for T={eval_stages} "
                f"export again with the override model.eval_stages={eval_stages}"
            )

    def forward(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        fixed_h, fixed_w = self.input_shape[2:]
        if (fixed_h or h, fixed_w or w) != (h, w):
            raise ConfigError(
                f"{self.path}: the graph takes a fixed input size {fixed_h}x{fixed_w} (a static export), got "
                f"{h}x{w}: predict with a sliding window of that size (mode slide, crop size {fixed_h} "
                f"{fixed_w}; images smaller than it cannot run), or export with dynamic axes (the default)"
            )
        x = images.detach().float().cpu().contiguous().numpy()
        # a fixed batch (a static export, or a model looping over images in Python) is 1: one image at a time
        chunks = [x] if self.input_shape[0] is None else [x[i : i + 1] for i in range(b)]
        logits = [self.session.run([self.output_name], {self.input_name: c})[0] for c in chunks]
        return torch.from_numpy(np.concatenate(logits)).to(images.device)  # (B, C, H, W) float32

    def extra_repr(self) -> str:
        return f"{self.path}, input {self.input_shape}"


def load_onnx(
    path: str | Path, *, overrides: Sequence[str] = (), config: Config | None = None, threads: int = 0
) -> LoadedModel:
    """An ONNX file -> LoadedModel (an OnnxModel and the config of its metadata, as ``pretrained.load_model``).

    ``overrides`` (``section.key=value``) apply on top of the file's config; ``config`` (e.g. `emanet eval
    --config`) gives the data, loss and eval sections instead, the model section stays the graph's. The
    file's own runtime keys become cpu / fp32 / no compile and its eval.eval_stages null (the graph's T); asking for
    other values (an override, ``config``) or a model.* override is a ConfigError.
    """
    model = OnnxModel(path, threads=threads)
    saved = model.config
    fixed = [o for o in overrides if o.split("=", 1)[0].strip().startswith("model.")]
    if fixed:
        raise ConfigError(
            f"{path}: the model is fixed in the ONNX graph, {fixed[0]} cannot change it; export again with "
            f"the override (emanet export SOURCE {fixed[0]})"
        )
    if saved.eval.eval_stages not in (None, model.stages):
        logger.warning(
            f"{path}: the config's eval.eval_stages={saved.eval.eval_stages} is not in the graph, which runs "
            f"the model's T={model.stages}; export with model.eval_stages={saved.eval.eval_stages} for it"
        )
    own = dataclasses.replace(
        saved, train=dataclasses.replace(saved.train, **RUNTIME), eval=dataclasses.replace(saved.eval, eval_stages=None)
    )
    if config is not None:
        cfg = dataclasses.replace(config, model=saved.model)
    else:
        cfg = load_config(None, list(overrides), base=own.to_dict()) if overrides else own
    model.check_options(
        device=cfg.train.device,
        precision=cfg.train.precision,
        compile=cfg.train.compile,
        eval_stages=cfg.eval.eval_stages,
    )
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **RUNTIME))
    return LoadedModel(model=model, config=cfg, class_names=model.class_names, palette=model.palette, source=model.path)
