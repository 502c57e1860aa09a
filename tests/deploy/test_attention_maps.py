"""emanet.deploy.attention_maps: top-mass bases, heat-map grids, capture from the EMA unit, `predict --attention`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from emanet.cli import main as cli
from emanet.config import Config
from emanet.deploy.attention_maps import (
    GAP,
    TITLE_HEIGHT,
    attention_grid,
    attention_unit,
    capture_attention,
    heatmap,
    top_bases,
    upsample_maps,
)
from emanet.deploy.predict import Predictor
from emanet.models.emanet import build_model
from emanet.pretrained import save_pretrained
from tests.conftest import calibrated, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(arch: str = "emanet") -> Config:
    cfg = Config()
    cfg.model = tiny_model(arch=arch)
    cfg.data.dataset = "synthetic"
    return cfg


def _save(folder, arch: str = "emanet"):
    cfg = _config(arch)
    return save_pretrained(calibrated(cfg.model), cfg, folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("model") / "ema")


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_top_bases_are_the_heaviest_by_total_mass():
    rng = np.random.default_rng(0)
    resp = rng.random((8, 5, 6)).astype(np.float32)
    indices, shares = top_bases(resp, 3)
    mass = [resp[k].sum() for k in range(8)]  # independent: loop over bases
    expected = sorted(range(8), key=lambda k: -mass[k])[:3]
    assert indices.tolist() == expected
    np.testing.assert_allclose(shares, [mass[k] / sum(mass) for k in expected], rtol=1e-6)
    assert top_bases(resp, 20)[0].shape == (8,)  # more than K: all of them
    with pytest.raises(ValueError, match=">= 1"):
        top_bases(resp, 0)
    with pytest.raises(ValueError, match=r"\(K, h, w\)"):
        top_bases(resp[0], 2)


def test_upsample_maps_crops_the_padding_and_heatmap_ends():
    resp = np.zeros((2, 3, 4), np.float32)
    resp[1, :, -1] = 1.0  # a base that only owns the last feature column (the padded border)
    maps = upsample_maps(resp, padded_size=(17, 25), image_size=(15, 20), align_corners=True)
    assert maps.shape == (2, 15, 20)
    assert maps[0].max() == 0.0
    assert maps[1, :, 0].max() == 0.0 and maps[1, :, -1].max() < 1.0  # the owned column lies past the crop
    assert heatmap(np.array([[0.0, 1.0]])).tolist() == [[[0, 0, 128], [128, 0, 0]]]


def test_grid_has_the_image_then_one_panel_per_chosen_base():
    image = Image.fromarray(_image(33, 41))
    resp = np.random.default_rng(1).random((4, 5, 6)).astype(np.float32)
    grid = attention_grid(image, resp, align_corners=True, num_bases=3, panel_size=64)
    assert len(grid.panels) == 4 and [p.base for p in grid.panels] == [None, *grid.indices.tolist()]
    assert grid.indices.tolist() == top_bases(resp, 3)[0].tolist()
    pw, ph = 64, round(33 * 64 / 41)
    assert grid.image.size == (GAP + 4 * (pw + GAP), GAP + TITLE_HEIGHT + ph + GAP)  # one row of 4
    assert grid.panels[1].title.startswith(f"base {grid.indices[0]}: ")
    left, top, right, bottom = grid.panels[0].box
    shown = np.asarray(grid.image.crop((left, top, right, bottom)))
    np.testing.assert_array_equal(shown, np.asarray(image.resize((pw, ph), Image.Resampling.BILINEAR)))
    # six bases asked for, four exist: image + 4 panels, wrapped into two rows of at most 4
    grid = attention_grid(image, resp, align_corners=True, num_bases=6, panel_size=64)
    assert len(grid.panels) == 5 and grid.image.size == (GAP + 4 * (pw + GAP), GAP + 2 * (TITLE_HEIGHT + ph + GAP))


def test_predictor_attention_is_the_plain_forwards_responsibilities(model_dir):
    image = _image(30, 37)
    plain = Predictor.from_source(model_dir, device="cpu")
    flipped = Predictor.from_source(model_dir, device="cpu", flip=True, scales=(0.75, 1.0))
    unit = attention_unit(plain.model)
    got = plain(image, attention=True).attention
    assert unit.store_attention is False and unit.last_responsibilities is None  # restored, released

    x = plain.preprocess(image)[1][None]  # (1, 3, 33, 41)
    unit.store_attention = True
    with torch.no_grad():
        plain.model(x)
    expected = unit.last_responsibilities[0].numpy()  # (K, h, w)
    unit.store_attention, unit.last_responsibilities = False, None
    assert got.shape == (4, 5, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # multi-scale + flip: the maps still come from the unflipped scale-1 forward, not the last pass
    np.testing.assert_allclose(flipped(image, attention=True).attention, expected, atol=1e-6)


def test_cli_attention_writes_grid_and_arrays(model_dir, tmp_path):
    Image.fromarray(_image(30, 37)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = [
        "predict",
        str(model_dir),
        str(tmp_path / "a.png"),
        "--out",
        str(out),
        "--attention",
        "--attention-bases",
        "3",
        "--save-arrays",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    arrays = np.load(out / "a_attention.npz")
    resp = arrays["responsibilities"]
    assert resp.shape == (4, 5, 6) and resp.dtype == np.float32
    np.testing.assert_allclose(resp.sum(axis=0), 1.0, atol=1e-5)  # softmax over K per feature pixel
    mass = resp.reshape(4, -1).sum(axis=1)
    assert arrays["indices"].tolist() == np.argsort(-mass)[:3].tolist()
    assert arrays["image_size"].tolist() == [30, 37] and arrays["padded_size"].tolist() == [33, 41]
    grid = Image.open(out / "a_attention.png")
    pw = 256  # default panel size: the longer side (width 37) scaled to 256
    assert grid.size[0] == GAP + 4 * (pw + GAP)  # image + 3 bases in one row


def test_models_without_em_attention_give_a_clear_error(tmp_path, capsys):
    fcn = _save(tmp_path / "fcn", arch="fcn")
    Image.fromarray(_image(30, 37)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert cli.main(["predict", str(fcn), str(tmp_path / "a.png"), "--out", str(out), "--attention"]) == 2
    assert "no EM attention unit" in capsys.readouterr().err
    assert not out.exists()  # refused before any image was read
    with pytest.raises(ValueError, match="model.arch=emanet"):
        Predictor.from_source(fcn, device="cpu")(_image(30, 37), attention=True)
    with pytest.raises(ValueError, match="no EM attention unit"):
        capture_attention(build_model(_config("nonlocal").model))
