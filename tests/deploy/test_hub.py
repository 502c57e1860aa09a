"""Model cards and the Hugging Face Hub extra, offline: a Hub cache laid out by hand, HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emanet import build_model
from emanet.config import Config
from emanet.deploy.model_card import MARKER, refresh_model_card, write_model_card
from emanet.errors import ConfigError, ModelSourceError, install_hint
from emanet.pretrained import CARD, save_pretrained
from tests.conftest import tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_folder(path: Path) -> tuple[Path, torch.nn.Module]:
    cfg = Config(model=tiny_model(backbone="resnet10", channels=8, num_bases=2))
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    return save_pretrained(model, cfg, path, class_names=["sky", "road", "car"]), model


def put_in_hub_cache(folder: Path, cache: Path, repo_id: str) -> None:
    """What huggingface_hub's cache holds after a download: refs/main -> a commit, snapshots/<commit>/files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, repo / "snapshots" / COMMIT, dirs_exist_ok=True)


def offline_env(cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf")}


def test_model_card_is_generated_and_a_users_own_card_is_kept(tmp_path):
    folder, _ = tiny_folder(tmp_path / "m")
    assert not (folder / CARD).exists()  # save_pretrained writes no card: the publisher does (push_to_hub)
    assert refresh_model_card(folder) is None and not (folder / CARD).exists()  # nothing generated to refresh
    assert write_model_card(folder) == folder / CARD
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: emanet") and MARKER in card
    assert "| 2 | car |" in card and "K=2 bases" in card and "resnet10" in card and "Not evaluated yet" in card
    (folder / "eval.json").write_text(json.dumps({"mIoU": 0.5123, "aAcc": 0.9, "mAcc": 0.6, "images": 7}))
    assert refresh_model_card(folder) == folder / CARD
    assert "mIoU **51.23**" in (folder / "README.md").read_text()
    (folder / "README.md").write_text("# my own card\n")
    tiny_folder(folder)  # save_pretrained again into the same folder
    assert write_model_card(folder) is None and refresh_model_card(folder) is None
    assert (folder / "README.md").read_text() == "# my own card\n"


def test_model_card_escapes_class_names_for_its_table_and_for_html(tmp_path):
    cfg = Config(model=tiny_model(backbone="resnet10", channels=8, num_bases=2))
    names = ["sky | cloud", "<script>alert(1)</script>", "a\\|b"]
    folder = save_pretrained(build_model(cfg.model).eval(), cfg, tmp_path / "m", class_names=names)
    card = write_model_card(folder).read_text()
    rows = [line for line in card.splitlines() if line.startswith("| ") and line[2].isdigit()]
    # a Markdown table splits a row at every "|" not escaped by a backslash (an escaped backslash escapes none)
    cells = [re.split(r"(?<!\\)((?:\\\\)*)\|", row)[::2] for row in rows]
    assert [len(c) for c in cells] == [5, 5, 5]  # | index | name | colour | (and the empty ends)
    assert "<script>" not in card and "| 1 | &lt;script&gt;alert(1)&lt;/script&gt; |" in card
    assert "| 0 | sky \\| cloud |" in card and "| 2 | a\\\\\\|b |" in card


def test_from_pretrained_repo_id_offline_from_the_cache(tmp_path):
    pytest.importorskip("huggingface_hub")
    folder, model = tiny_folder(tmp_path / "m")
    cache = tmp_path / "cache"
    put_in_hub_cache(folder, cache, "someone/tiny-emanet")
    x = torch.randn(1, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import torch; from emanet.deploy.hub import from_pretrained; m = from_pretrained('someone/tiny-emanet'); "
        f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})).detach(), {str(tmp_path / 'y.pt')!r})"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=offline_env(cache), timeout=300
    )
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), model(x))


def test_cli_takes_hf_sources_offline_and_a_missing_repo_is_a_message(tmp_path):
    pytest.importorskip("huggingface_hub")
    folder, _ = tiny_folder(tmp_path / "m")
    cache = tmp_path / "cache"
    put_in_hub_cache(folder, cache, "someone/tiny-emanet")
    Image.fromarray(np.zeros((30, 34, 3), np.uint8)).save(tmp_path / "a.png")
    cli = [sys.executable, "-m", "emanet", "predict"]
    ok = subprocess.run(
        [*cli, "hf://someone/tiny-emanet", str(tmp_path / "a.png"), "--out", str(tmp_path / "p"), "--no-progress"],
        capture_output=True,
        text=True,
        env=offline_env(cache),
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert Image.open(tmp_path / "p" / "a.png").size == (34, 30)
    bad = subprocess.run(
        [*cli, "hf://someone/missing", str(tmp_path / "a.png"), "--out", str(tmp_path / "q")],
        capture_output=True,
        text=True,
        env=offline_env(cache),
        timeout=300,
    )
    assert bad.returncode == 2 and "'someone/missing'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "q").exists()


def test_push_to_hub_uploads_the_folder_with_its_card_and_it_loads_back(tmp_path, monkeypatch):
    hf = pytest.importorskip("huggingface_hub")
    from emanet.deploy import hub

    calls = {}
    remote = tmp_path / "remote"

    class FakeApi:  # records what would be sent; the network is never used
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["create"] = (repo_id, kwargs)

        def upload_folder(self, *, folder_path, repo_id, **kwargs):
            calls["upload"] = (repo_id, kwargs)
            shutil.copytree(folder_path, remote)
            return "https://huggingface.co/someone/pushed/commit/abc"

    monkeypatch.setattr(hf, "HfApi", FakeApi)
    folder, model = tiny_folder(tmp_path / "m")
    (folder / "notes.txt").write_text("not part of the model")
    url = hub.push_to_hub(folder, "someone/pushed", private=True, token="t0k")
    assert url.endswith("/commit/abc") and calls["token"] == "t0k"
    assert calls["create"] == ("someone/pushed", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert sorted(p.name for p in remote.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert 'from_pretrained("someone/pushed")' in (remote / "README.md").read_text()
    assert not (folder / "README.md").exists()  # the source folder is unchanged: the card went to the upload
    loaded = hub.from_pretrained(remote)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ConfigError, match="user/name"):
        hub.push_to_hub(folder, "not a repo")


def test_without_huggingface_hub_the_cli_says_how_to_install(tmp_path):
    blocker = tmp_path / "block"
    (blocker / "huggingface_hub").mkdir(parents=True)
    (blocker / "huggingface_hub" / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    Image.fromarray(np.zeros((30, 34, 3), np.uint8)).save(tmp_path / "a.png")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "emanet",
            "predict",
            "hf://someone/x",
            str(tmp_path / "a.png"),
            "--out",
            str(tmp_path / "p"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2 and install_hint("hub") in r.stderr and "Traceback" not in r.stderr


def test_push_to_hub_cli_from_a_run_folder_and_a_refused_upload(tmp_path, monkeypatch, capsys):
    hf = pytest.importorskip("huggingface_hub")
    from emanet.cli.main import main

    folder, model = tiny_folder(tmp_path / "m")
    run = tmp_path / "run"
    run.mkdir()
    state = {
        "model": model.state_dict(),
        "iteration": 5,
        "config": json.loads((folder / "config.json").read_text())["config"],
    }
    torch.save(state, run / "iter_000005.pt")
    (run / "latest.txt").write_text("iter_000005.pt\n")
    (run / "eval.json").write_text(json.dumps({"mIoU": 0.25, "aAcc": 0.5, "mAcc": 0.3, "images": 2}))
    sent = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            if repo_id == "someone/forbidden":
                raise PermissionError("403 Forbidden")

        def upload_folder(self, *, folder_path, repo_id, **kwargs):
            sent.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
            return "https://huggingface.co/someone/run/commit/1"

    monkeypatch.setattr(hf, "HfApi", FakeApi)
    assert main(["push-to-hub", str(run), "someone/run"]) == 0
    assert "pushed: https://huggingface.co/someone/run/commit/1" in capsys.readouterr().out
    assert sorted(sent) == ["README.md", "config.json", "eval.json", "model.safetensors"]
    card = sent["README.md"].decode()
    assert "mIoU **25.00**" in card and "iter_000005.pt" in card and "hf://someone/run" in card
    assert main(["push-to-hub", str(folder), "someone/forbidden"]) == 2
    err = capsys.readouterr().err
    assert "'someone/forbidden' failed: 403 Forbidden" in err


def test_eval_of_a_model_folder_refreshes_its_card(tmp_path, capsys):
    from emanet.cli.main import main
    from emanet.config import load_config

    cfg = load_config(
        "synthetic_toy",
        [
            "model.backbone_width=8",
            "model.channels=8",
            "model.mid_channels=8",
            "data.options.val_length=2",
            "data.options.image_size=32",
            "data.options.min_objects=1",
            "data.options.max_objects=2",
            "data.options.min_size=4",
            "data.options.max_size=6",
        ],
    )
    torch.manual_seed(0)
    folder = save_pretrained(build_model(cfg.model).eval(), cfg, tmp_path / "m")
    bare = Path(shutil.copytree(folder, tmp_path / "bare"))
    write_model_card(folder)  # a published folder's generated card
    assert "Not evaluated yet" in (folder / "README.md").read_text()
    assert main(["eval", str(folder), "--no-progress"]) == 0
    miou = json.loads((folder / "eval.json").read_text())["mIoU"]
    card = (folder / "README.md").read_text()
    assert f"mIoU **{100 * miou:.2f}**" in card and "On 2 images of `val`" in card
    assert f"written: {folder / 'README.md'}" in capsys.readouterr().out
    assert main(["eval", str(bare), "--no-progress"]) == 0  # no card: eval writes eval.json, not a card
    assert (bare / "eval.json").is_file() and not (bare / CARD).exists()


def test_sources_resolve_to_local_folders_and_the_command_line_keeps_plain_paths_local(tmp_path, monkeypatch):
    from emanet.deploy import hub

    fetched = []
    monkeypatch.setattr(hub, "download", lambda repo, revision=None: fetched.append(repo) or tmp_path)
    assert hub.resolve_source(tmp_path) == tmp_path and fetched == []  # a local path as it is
    assert hub.resolve_source("runs/typo") == Path("runs/typo") and fetched == []  # load_model says "not found"
    assert hub.resolve_source("hf://someone/x") == tmp_path and fetched == ["someone/x"]
    assert hub.resolve_source("someone/y", bare_repo_id=True) == tmp_path and fetched[-1] == "someone/y"
    with pytest.raises(ModelSourceError, match="hf://user/repo"):
        hub.resolve_source("hf://not a repo")


def test_model_push_to_hub_uploads_what_the_model_carries(tmp_path, monkeypatch):
    hf = pytest.importorskip("huggingface_hub")
    sent = {}

    class FakeApi:  # the network is never used
        def __init__(self, token=None):
            sent["token"] = token

        def create_repo(self, repo_id, **kwargs):
            sent["create"] = (repo_id, kwargs)

        def upload_folder(self, *, folder_path, repo_id, **kwargs):
            sent["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            sent["upload"] = (repo_id, kwargs)
            return "https://huggingface.co/someone/carried/commit/2"

    monkeypatch.setattr(hf, "HfApi", FakeApi)
    from emanet.deploy.hub import from_pretrained

    folder, model = tiny_folder(tmp_path / "m")
    loaded = from_pretrained(folder)  # carries the folder's run config and class names
    url = loaded.push_to_hub("someone/carried", private=True, token="t0k", commit_message="first")
    assert url.endswith("/commit/2") and sent["token"] == "t0k"
    assert sent["create"] == ("someone/carried", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert sent["upload"][1]["commit_message"] == "first"
    assert sorted(sent["files"]) == ["README.md", "config.json", "model.safetensors"]
    meta = json.loads(sent["files"]["config.json"])
    assert meta == json.loads((folder / "config.json").read_text())  # the class names came along
    assert 'from_pretrained("someone/carried")' in sent["files"]["README.md"].decode()
    # a freshly built model pushes too: its config is the one it was built from
    model.push_to_hub("someone/fresh", class_names=["a", "b", "c"])
    assert json.loads(sent["files"]["config.json"])["class_names"] == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="user/name"):
        model.push_to_hub("not a repo")


def r50_folder(path: Path) -> tuple[Path, torch.nn.Module]:
    """A tiny emanet_resnet50 (width 8) as a model folder: what the torch.hub entry point of that name loads."""
    cfg = Config(model=tiny_model(backbone="resnet50", channels=8, num_bases=2))
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    return save_pretrained(model, cfg, path), model


def test_hub_entry_points_take_weights_from_a_folder_a_checkpoint_or_a_hub_repo(tmp_path, monkeypatch):
    from emanet.deploy import hub

    points = hub.entry_points()
    folder, model = r50_folder(tmp_path / "m")
    saved = json.loads((folder / "config.json").read_text())["config"]
    torch.save({"model": model.state_dict(), "config": saved}, tmp_path / "model.pt")
    fetched = []
    monkeypatch.setattr(hub, "download", lambda repo, revision=None: fetched.append(repo) or folder)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for source in (folder, tmp_path / "model.pt", str(folder), "hf://someone/r50"):
            loaded = points["emanet_resnet50"](weights=source)
            assert not loaded.training and loaded.config == model.config
            torch.testing.assert_close(loaded(x), model(x))
        assert fetched == ["someone/r50"]  # only the hf:// source went to the Hub
        # keywords apply on top of the saved config; one that changes the weights' shapes is a clear error
        assert points["emanet_resnet50"](weights=folder, eval_stages=5).config.eval_stages == 5
        with pytest.raises(ModelSourceError, match="do not match"):
            points["emanet_resnet50"](weights=folder, num_classes=7)
        untrained = points["fcn_resnet50"](num_classes=4, backbone_width=8, channels=8, mid_channels=8)
    assert untrained.training and untrained.config.arch == "fcn"
    with pytest.raises(ConfigError, match=r"holds emanet_resnet50, not fcn_resnet50.*'emanet_resnet50'"):
        points["fcn_resnet50"](weights=folder)


def test_hub_entry_points_refuse_pretrained_true_and_suggest_a_misspelled_keyword(tmp_path):
    from emanet.deploy.hub import entry_points

    points = entry_points()
    with pytest.raises(ConfigError, match=r"pretrained=True\): emanet publishes no weights.*pass weights="):
        points["emanet_resnet101"](pretrained=True)
    with pytest.raises(TypeError, match="'num_clases'; did you mean 'num_classes'"):
        points["emanet_resnet101"](weights=tmp_path, num_clases=21)  # before anything is loaded
    with torch.device("meta"):
        assert points["emanet_resnet101"](pretrained=False, num_classes=3).config.num_classes == 3
