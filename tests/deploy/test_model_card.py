"""The model card says where a model came from: a trained model's run and recipe, with the run's eval.json
carried along when a run folder is published (a converted model's card is tested with the conversions, in
tests/convert/test_checkpoints.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emanet import build_model
from emanet.config import Config
from emanet.deploy.model_card import write_model_card
from emanet.pretrained import save_pretrained
from tests.conftest import tiny_model


def _run_folder(path: Path, iterations: list[int], evaluated: int) -> Config:
    cfg = Config(model=tiny_model(backbone="resnet10", channels=8, num_bases=2))
    cfg.data.dataset, cfg.train.iterations, cfg.optim.lr = "cityscapes", evaluated, 0.0123
    model = build_model(cfg.model).eval()
    path.mkdir()
    for it in iterations:
        state = {"model": model.state_dict(), "iteration": it, "config": cfg.to_dict()}
        torch.save(state, path / f"iter_{it:07d}.pt")
    (path / "latest.txt").write_text(f"iter_{iterations[-1]:07d}.pt\n")
    results = {"mIoU": 0.25, "aAcc": 0.5, "mAcc": 0.3, "images": 2, "train": {"iterations": evaluated}}
    (path / "eval.json").write_text(json.dumps(results))
    return cfg


def _push(source: Path, monkeypatch) -> dict[str, bytes]:
    """push_to_hub with the Hub replaced by a stand-in that keeps the files it was sent."""
    hf = pytest.importorskip("huggingface_hub")
    from emanet.deploy.hub import push_to_hub

    sent: dict[str, bytes] = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            pass

        def upload_folder(self, *, folder_path, repo_id, **kwargs):
            sent.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
            return "https://huggingface.co/someone/run/commit/1"

    monkeypatch.setattr(hf, "HfApi", FakeApi)
    push_to_hub(source, "someone/run")
    return sent


def test_a_trained_models_card_gives_its_run_recipe_and_evaluation(tmp_path, monkeypatch):
    _run_folder(tmp_path / "run", [5, 10], evaluated=10)
    sent = _push(tmp_path / "run", monkeypatch)
    card = sent["README.md"].decode()
    assert json.loads(sent["config.json"])["origin"] == {
        "kind": "trained",
        "run": "run",
        "checkpoint": "iter_0000010.pt",
        "iteration": 10,
    }
    assert "# EMANet resnet10, 3 classes (cityscapes)" in card
    assert "Trained with emanet: run `run`, checkpoint `iter_0000010.pt` at iteration 10." in card
    assert "10 iterations of batch" in card and "SGD lr 0.0123" in card
    assert "mIoU **25.00**" in card and "eval.json" in sent  # the run's evaluation, carried along
    # an earlier checkpoint of the run: the run's eval.json evaluated another one, so it is not carried
    sent = _push(tmp_path / "run" / "iter_0000005.pt", monkeypatch)
    assert "eval.json" not in sent and "Not evaluated yet" in sent["README.md"].decode()


def test_a_folder_that_records_no_origin_does_not_claim_one(tmp_path):
    cfg = Config(model=tiny_model(backbone="resnet10", channels=8, num_bases=2))
    folder = save_pretrained(build_model(cfg.model).eval(), cfg, tmp_path / "m")
    card = write_model_card(folder).read_text()
    assert "config.json does not record where this model came from" in card
    assert "Trained with emanet" not in card and "Converted by" not in card
