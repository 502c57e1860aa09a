"""Model folders on the Hugging Face Hub: ``push_to_hub``, ``from_pretrained("user/repo")`` and
``resolve_source``, which turns a Hub repo into its local folder before ``pretrained.load_model`` reads it.

A Hub repo is a model folder (model.safetensors, config.json, the README.md model card that push_to_hub
generates, eval.json when evaluated). huggingface_hub is the optional extra ``hub`` (``errors.install_hint``);
it caches downloads, so with ``HF_HUB_OFFLINE=1`` a repo fetched once loads without a network. Local paths
never need it.

``push_model`` is what ``model.push_to_hub`` calls, and ``entry_points`` are hubconf.py's torch.hub builders,
which take ``weights=`` (a model source) besides the builders' keywords.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from emanet.deploy.model_card import write_model_card
from emanet.errors import ConfigError, ModelSourceError, install_hint
from emanet.models.emanet import MODELS, check_keywords
from emanet.pretrained import (
    CARD,
    CONFIG,
    EVAL,
    WEIGHTS,
    LoadedModel,
    is_model_folder,
    load_model,
    save_pretrained,
)

HF_PREFIX = "hf://"  # model sources on the command line: hf://user/repo (a plain path is always local)
REPO_FILES = [WEIGHTS, CONFIG, CARD, EVAL]
logger = logging.getLogger(__name__)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class HubError(ModelSourceError):
    """The Hub refused or could not be reached (no login, no network, no permission)."""


class HubNotInstalled(ModelSourceError, ImportError):
    """The optional huggingface_hub is missing: a user error that names the install command (and, being an
    ImportError too, what code that probes for optional extras catches)."""


def _hf():
    try:
        import huggingface_hub
    except ImportError:
        raise HubNotInstalled(f"Hugging Face Hub repos need huggingface_hub: {install_hint('hub')}") from None
    return huggingface_hub


def repo_id_of(source: str | Path) -> str | None:
    """``user/repo`` or ``hf://user/repo`` when ``source`` is not an existing local path, else None."""
    text = str(source)
    if text.startswith(HF_PREFIX):
        text = text[len(HF_PREFIX) :]
    elif Path(text).exists():
        return None
    return text if _REPO_ID.fullmatch(text) else None


def download(repo_id: str, *, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The repo's model folder in the local Hub cache (downloaded if needed; HF_HUB_OFFLINE=1: cache only)."""
    hf = _hf()
    try:
        path = hf.snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=REPO_FILES, library_name="emanet"
        )
    except Exception as e:  # not found, offline without a cached copy, no network: a user-facing error
        raise ModelSourceError(
            f"{repo_id!r} is no local path, and as a Hugging Face Hub repo it could not be loaded: {e}"
        ) from None
    if not is_model_folder(path):
        raise ModelSourceError(
            f"Hugging Face Hub repo {repo_id!r} is not an emanet model folder (expected {WEIGHTS} and {CONFIG})"
        )
    return Path(path)


def resolve_source(source: str | Path, *, revision: str | None = None, bare_repo_id: bool = False) -> Path:
    """The local path of a model source, a Hub repo downloaded into the Hub cache first; callers resolve before
    ``pretrained.load_model``.

    ``hf://user/repo`` is always a Hub repo. ``bare_repo_id`` (the Python API: ``load``, ``from_pretrained``):
    so is a ``user/repo`` that is no local path. Without it (the command line, ``Predictor.from_source``) a
    plain path is always local, so a mistyped run folder is reported missing rather than looked up on the Hub.
    """
    text = str(source)
    if not (text.startswith(HF_PREFIX) or bare_repo_id):
        return Path(source)
    repo = repo_id_of(source)
    if repo is None and text.startswith(HF_PREFIX):
        raise ModelSourceError(f"{source}: a Hub source looks like hf://user/repo")
    return download(repo, revision=revision) if repo else Path(source)


def load(
    source: str | Path, *, device: str = "cpu", revision: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> LoadedModel:
    """A local model source (folder, checkpoint, run) or a Hub repo id -> the model, config and class names."""
    return load_model(resolve_source(source, revision=revision, bare_repo_id=True), device=device, overrides=overrides)


def from_pretrained(source: str | Path, *, device: str = "cpu", revision: str | None = None) -> nn.Module:
    """The model (eval mode) of a local model folder / checkpoint / run, or of a Hub repo ``user/repo``."""
    return load(source, device=device, revision=revision).model


def _carry_run_eval(run_eval: Path, iteration: int | None, dst: Path) -> None:
    """Copy a run's eval.json (its final evaluation, so the card shows its figures) into the model folder,
    unless it evaluated another iteration than the checkpoint published (``train.iterations``) or is unreadable."""
    if not run_eval.is_file():
        return
    try:
        evaluated = (json.loads(run_eval.read_text()).get("train") or {}).get("iterations")
    except (OSError, ValueError, AttributeError):  # unreadable, not UTF-8 or not JSON, not a JSON object
        logger.warning("%s is not a readable eval.json: the model card says the model is not evaluated", run_eval)
        return
    if evaluated is not None and iteration is not None and evaluated != iteration:
        logger.warning(
            "%s evaluates iteration %s, not the published checkpoint's %s: not carried to the model card",
            run_eval,
            evaluated,
            iteration,
        )
        return
    shutil.copy(run_eval, dst)


def push_to_hub(
    source: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a model folder (or the model of a run folder / checkpoint, written as one) to ``repo_id``.

    The model card is regenerated first (with the repo id in its loading instructions) unless the folder's
    README.md is the user's own. Returns the commit URL.
    """
    hf = _hf()
    if not _REPO_ID.fullmatch(repo_id):
        raise ConfigError(f"repo id must look like user/name, got {repo_id!r}")
    source = Path(source)
    with tempfile.TemporaryDirectory() as tmp:
        if is_model_folder(source):
            folder = Path(tmp) / "model"
            shutil.copytree(source, folder, ignore=lambda d, names: [n for n in names if n not in REPO_FILES])
            origin = None
        else:  # a run folder or checkpoint: its model, config, names and palette as a model folder
            loaded = load_model(source)
            checkpoint = Path(loaded.source)  # the file read: a run folder's newest checkpoint
            found = re.fullmatch(r"iter_0*([0-9]+)\.pt", checkpoint.name)
            iteration = int(found.group(1)) if found else None
            run = {"kind": "trained", "run": checkpoint.parent.name, "checkpoint": checkpoint.name}
            folder = save_pretrained(
                loaded.model,
                loaded.config,
                Path(tmp) / "model",
                class_names=loaded.class_names,
                palette=loaded.palette,
                origin={**run, "iteration": iteration},
            )
            _carry_run_eval(checkpoint.parent / EVAL, iteration, folder / EVAL)
            origin = str(loaded.source)
        write_model_card(folder, repo_id=repo_id, source=origin)
        api = hf.HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(
                folder_path=str(folder),
                repo_id=repo_id,
                repo_type="model",
                revision=revision,
                commit_message=commit_message or "Upload emanet model folder",
            )
        except Exception as e:  # huggingface_hub's HTTP / auth / connection errors
            raise HubError(f"pushing to the Hugging Face Hub repo {repo_id!r} failed: {e}") from e
    return str(getattr(info, "commit_url", info))


def push_model(
    model: nn.Module,
    repo_id: str,
    *,
    class_names: list[str] | None = None,
    palette: list | None = None,
    **options: Any,
) -> str:
    """``model.push_to_hub(repo_id)``: the model written as a model folder (the config it carries,
    ``pretrained.save_pretrained``), then uploaded by ``push_to_hub`` with its card; returns the commit URL."""
    _hf()  # a missing extra is reported before anything is written
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, None, Path(tmp) / "model", class_names=class_names, palette=palette)
        return push_to_hub(folder, repo_id, **options)


# ----------------------------------------------------------------------------- torch.hub entry points


def _entry_point(name: str, builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    arch, backbone = name.split("_", 1)

    @functools.wraps(builder)
    def entry(*, weights: str | Path | None = None, pretrained: bool = False, **overrides: Any) -> nn.Module:
        check_keywords(name, overrides)  # a typo gets the closest keyword
        if pretrained:
            raise ConfigError(
                f"{name}(pretrained=True): emanet publishes no weights to download; pass weights= a model folder, "
                "a checkpoint file, a run folder or a Hugging Face Hub repo (hf://user/name), or build it untrained "
                "without pretrained (ImageNet backbone weights: pretrained_backbone='resnet.pth')"
            )
        if weights is None:
            return builder(**overrides)
        # the keywords apply on top of the saved config (e.g. eval_stages=5); JSON values are valid YAML
        loaded = load(weights, overrides=[f"model.{key}={json.dumps(value)}" for key, value in overrides.items()])
        got = loaded.config.model
        if (got.arch, got.backbone) != (arch, backbone):
            raise ConfigError(
                f"{weights}: holds {got.arch}_{got.backbone}, not {name}; load it with "
                f"torch.hub.load(..., '{got.arch}_{got.backbone}', weights=...) or 'from_pretrained'"
            )
        return loaded.model

    entry.__doc__ = (
        f"{builder.__doc__} torch.hub: ``weights=`` a model folder, checkpoint file, run folder or Hub repo "
        "(hf://user/name) loads that model (eval mode), the keywords applied on top of its config."
    )
    return entry


def entry_points() -> dict[str, Callable[..., nn.Module]]:
    """hubconf.py's builders: the MODELS table's, each also taking ``weights=`` (and refusing
    ``pretrained=True`` with what to pass instead), plus ``from_pretrained``."""
    points = {name: _entry_point(name, builder) for name, builder in MODELS.items()}
    return {**points, "from_pretrained": from_pretrained}
