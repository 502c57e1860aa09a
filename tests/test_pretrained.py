import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import emanet
from emanet.checkpoint import save_checkpoint
from emanet.config import Config
from emanet.errors import ConfigError, ModelSourceError
from emanet.models.emanet import build_model
from emanet.pretrained import CARD, CONFIG, WEIGHTS, load_model, save_pretrained
from tests.conftest import calibrated, tiny_model


def _config(**model):
    cfg = Config()
    cfg.model = tiny_model(**model)
    cfg.data.dataset = "synthetic"
    return cfg


def _trained_like(cfg):
    return calibrated(cfg.model)


def test_round_trip_gives_equal_outputs(tmp_path):
    cfg = _config()
    model = _trained_like(cfg)
    folder = save_pretrained(model, cfg, tmp_path / "m", class_names=["bg", "a", "b"])
    # the model folder's files; the card is the publisher's (push_to_hub), not save_pretrained's
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG, WEIGHTS]) and not (folder / CARD).exists()
    loaded = load_model(tmp_path / "m")
    x = torch.randn(1, 3, 41, 37)
    assert torch.equal(model(x), loaded.model(x)) and not loaded.model.training
    assert loaded.class_names == ["bg", "a", "b"] and len(loaded.palette) == 3
    assert loaded.config.model == cfg.model


def test_load_model_from_checkpoint_and_run_folder_with_overrides(tmp_path):
    cfg = _config()
    model = _trained_like(cfg)
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "iteration": 1}, tmp_path, 1)
    x = torch.randn(1, 3, 33, 33)
    from_run = load_model(tmp_path, overrides=["model.eval_stages=5"])
    assert from_run.source.name == "iter_0000001.pt"
    assert from_run.config.model.eval_stages == 5
    assert torch.equal(load_model(tmp_path / "iter_0000001.pt").model(x), model(x))


def test_mismatched_or_foreign_folders_are_clear_errors(tmp_path):
    cfg = _config()
    save_pretrained(_trained_like(cfg), cfg, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["config"]["model"]["num_bases"] = 8
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelSourceError, match="do not match"):
        load_model(tmp_path / "m")
    meta["config"]["model"]["num_bases"] = 4
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="not valid JSON"):
        load_model(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not found"):  # a Hub id is resolved by deploy.hub, not here
        load_model("hf://someone/repo")


def test_a_checkpoint_without_its_config_or_a_newer_folder_is_a_model_source_error(tmp_path):
    cfg = _config()
    model = _trained_like(cfg)
    torch.save({"model": model.state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(ModelSourceError, match="no saved config"):
        load_model(tmp_path / "bare.pt")
    folder = save_pretrained(model, cfg, tmp_path / "m")
    meta = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ModelSourceError, match="newer than this emanet"):
        load_model(folder)


def _partial_then_full(data: bytes, path) -> None:
    """A write that the disk cuts off: a few bytes land, then ENOSPC."""
    with open(path, "wb") as f:
        f.write(data[:10])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _folder_files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_full_disk_leaves_an_earlier_model_folder_as_it_was(tmp_path, monkeypatch):
    import safetensors.torch

    cfg = _config()
    folder = save_pretrained(_trained_like(cfg), cfg, tmp_path / "m", class_names=["bg", "a", "b"])
    before = _folder_files(folder)
    real = safetensors.torch.save_file
    # the weights fail: neither file is replaced, no temporary is left, the error names the weights
    monkeypatch.setattr(
        safetensors.torch, "save_file", lambda state, path, metadata: _partial_then_full(b"x" * 99, path)
    )
    with pytest.raises(OSError, match="No space left") as e:
        save_pretrained(build_model(cfg.model), cfg, folder, class_names=["x", "y", "z"])
    assert e.value.filename == str(folder / WEIGHTS) and _folder_files(folder) == before
    # the config fails after the weights were written: the weights are not renamed over the old ones either
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    monkeypatch.setattr(Path, "write_text", lambda self, text, **kw: _partial_then_full(text.encode(), self))
    with pytest.raises(OSError, match="No space left") as e:
        save_pretrained(build_model(cfg.model), cfg, folder, class_names=["x", "y", "z"])
    assert e.value.filename == str(folder / CONFIG) and _folder_files(folder) == before
    monkeypatch.undo()
    assert load_model(folder).class_names == ["bg", "a", "b"]


# ----------------------------------------------------------------------------- models that carry their config


def test_model_save_pretrained_and_from_pretrained_round_trip_in_the_same_folder_format(tmp_path):
    cfg = _config()
    model = _trained_like(cfg)
    assert model.config == cfg.model and model.config is not cfg.model  # build_model records a copy
    folder = model.save_pretrained(tmp_path / "m")  # no config: the model carries it
    explicit = save_pretrained(model, cfg, tmp_path / "explicit")  # the function as before
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG, WEIGHTS])
    meta, before = (json.loads((f / CONFIG).read_text()) for f in (folder, explicit))
    assert list(meta) == ["format", "version", "config", "class_names", "palette"] == list(before)
    assert meta["format"] == "emanet-model" and meta["version"] == 1
    assert meta["config"]["model"] == before["config"]["model"] == cfg.model.to_dict()
    with safe_open(str(folder / WEIGHTS), "pt") as f, safe_open(str(explicit / WEIGHTS), "pt") as g:
        assert f.metadata() == g.metadata() == {"format": "emanet-model", "version": "1"}
        assert sorted(f.keys()) == sorted(g.keys()) == sorted(model.state_dict())
    loaded = emanet.SegmentationModel.from_pretrained(folder)
    assert isinstance(loaded, emanet.SegmentationModel) and not loaded.training
    assert loaded.config == cfg.model
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(1, 3, 33, 35)
    assert torch.equal(loaded(x), model(x))
    assert emanet.from_pretrained(folder).config == cfg.model  # the top-level function, the same loader


def test_a_loaded_model_saved_again_keeps_its_run_config_names_and_colours(tmp_path):
    cfg = _config()
    cfg.data.mean, cfg.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # e.g. a converted model's normalisation
    palette = [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    first = save_pretrained(_trained_like(cfg), cfg, tmp_path / "a", class_names=["bg", "a", "b"], palette=palette)
    loaded = load_model(first).model
    again = save_pretrained(loaded, tmp_path / "b")  # save_pretrained(model, folder): what it carries
    meta = json.loads((again / CONFIG).read_text())
    assert meta == json.loads((first / CONFIG).read_text())
    assert meta["class_names"] == ["bg", "a", "b"] and meta["palette"] == [list(c) for c in palette]
    assert meta["config"]["data"]["mean"] == [0.5, 0.5, 0.5]
    # explicit names win; save_pretrained(model, None, folder) is the same call
    named = save_pretrained(loaded, None, tmp_path / "c", class_names=["x", "y", "z"])
    assert json.loads((named / CONFIG).read_text())["class_names"] == ["x", "y", "z"]


def test_a_model_without_a_config_or_a_folder_is_a_clear_error(tmp_path):
    bare = torch.nn.Conv2d(3, 3, 1)
    with pytest.raises(ConfigError, match=r"carries no ModelConfig.*save_pretrained\(model, config, folder\)"):
        save_pretrained(bare, tmp_path / "m")
    with pytest.raises(ConfigError, match="needs a folder"):
        save_pretrained(build_model(_config().model), None)
    assert not (tmp_path / "m").exists()


def test_an_onnx_file_is_named_and_pointed_to_predict_and_eval(tmp_path):
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"an exported graph")
    with pytest.raises(ModelSourceError, match=r"model\.onnx: an ONNX file runs with `emanet predict`"):
        load_model(graph)
