"""cli/common.py: an output is checked before any work: reserved run/model folder files never, an existing file
only with --overwrite, its folder created and writable."""

from __future__ import annotations

import os

import pytest

from emanet.checkpoint import claim_folder
from emanet.cli.common import claim_output, reserved
from emanet.config import Config
from emanet.errors import ConfigError
from emanet.models.emanet import build_model
from emanet.pretrained import save_pretrained
from tests.conftest import tiny_model


@pytest.fixture
def run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "latest.txt", "iter_0000004.pt", "eval.json"):
        (run / name).write_text(name)
    return run


@pytest.mark.parametrize("name", ["iter_0000004.pt", "iter_0000009.pt", "latest.txt", "config.yaml", "metrics.jsonl"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_run_folders_own_files_are_never_an_output(run_folder, name, overwrite):
    before = {p.name: p.read_bytes() for p in run_folder.iterdir()}
    with pytest.raises(ConfigError, match=f"--out {run_folder / name}: {name} belongs to the run in"):
        claim_output(run_folder / name, overwrite=overwrite)
    assert {p.name: p.read_bytes() for p in run_folder.iterdir()} == before


def test_a_model_folders_weights_and_config_are_never_an_output(tmp_path):
    cfg = Config()
    cfg.model = tiny_model(num_classes=3)
    folder = save_pretrained(build_model(cfg.model), cfg, tmp_path / "m", class_names=["a", "b", "c"])
    for name in ("model.safetensors", "config.json"):
        assert reserved(folder / name) is not None
        with pytest.raises(ConfigError, match="never replaced"):
            claim_output(folder / name, overwrite=True)
    assert reserved(folder / "eval.json") is None and reserved(tmp_path / "config.json") is None


def test_an_existing_file_needs_overwrite_and_eval_json_of_a_run_may_be_replaced(run_folder):
    with pytest.raises(ConfigError, match="exists; add --overwrite"):
        claim_output(run_folder / "eval.json", overwrite=False)
    assert claim_output(run_folder / "eval.json", overwrite=True) == run_folder / "eval.json"
    assert (run_folder / "eval.json").read_text() == "eval.json"  # checked, not touched


def test_a_missing_folder_is_created_and_a_folder_is_not_a_file(tmp_path):
    assert claim_output(tmp_path / "a" / "b" / "eval.json", overwrite=False).parent.is_dir()
    with pytest.raises(ConfigError, match="a folder; give a file name"):
        claim_output(tmp_path / "a", overwrite=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OSError) as raised:
            claim_folder(folder)
        assert raised.value.filename == str(folder)
    finally:
        folder.chmod(0o700)


def test_an_unwritable_folder_is_an_oserror_naming_it(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("tempfile.TemporaryFile", refuse)
    with pytest.raises(OSError) as raised:
        claim_folder(tmp_path / "out")
    assert raised.value.filename == str(tmp_path / "out") and raised.value.strerror == "Read-only file system"
