"""What a pip-installed user meets: the license, --version, the recipes inside the wheel, torch.hub from a checkout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import emanet
from emanet.config import RECIPES_DIR, load_config, packaged_configs, resolve_config
from emanet.models.emanet import MODELS
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT_TEXT = (ROOT / "pyproject.toml").read_text()  # tomllib is Python >= 3.11; we support 3.10


def pyproject(key: str) -> str:
    """A top-level string value of [project], e.g. version = "0.1.0"."""
    return re.search(rf'^{key} = "([^"]+)"', PYPROJECT_TEXT, flags=re.M).group(1)


RECIPES = {"voc_reference", "cityscapes", "ade20k", "synthetic_toy"}


def emanet_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emanet", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_license_file_is_the_declared_mit():
    assert pyproject("license") == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text


def test_version_comes_from_pyproject():
    version = pyproject("version")
    assert emanet.__version__ == version
    r = emanet_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"emanet {version}"


def test_torch_floor_is_the_one_the_readme_defends():
    assert re.search(r'^    "torch>=2\.5",$', PYPROJECT_TEXT, flags=re.M)
    assert "torch>=2.5" in (ROOT / "README.md").read_text()


def test_wheel_ships_the_recipes_and_they_load_from_it(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("emanet-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert {f"emanet/configs/{n}.yaml" for n in RECIPES} <= names
    assert "emanet/py.typed" in names  # type checkers read the package's annotations (PEP 561)
    assert any(n.endswith("licenses/LICENSE") for n in names)
    # the unpacked wheel alone (no checkout on the path) resolves a recipe by name
    code = "from emanet.config import load_config; print(load_config('voc_reference').data.crop_size)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "513"


def test_recipes_by_name_by_file_and_a_clear_error(tmp_path):
    assert set(packaged_configs()) == RECIPES
    by_name = load_config("voc_reference")
    assert load_config("voc_reference.yaml") == by_name
    copy = tmp_path / "mine.yaml"
    copy.write_text((RECIPES_DIR / "voc_reference.yaml").read_text().replace("crop_size: 513", "crop_size: 321"))
    assert load_config(copy).data.crop_size == 321 and by_name.data.crop_size == 513
    with pytest.raises(FileNotFoundError, match="packaged recipe.*voc_reference"):
        resolve_config("voc_referense")
    with pytest.raises(FileNotFoundError, match="did you mean --config voc_reference"):
        resolve_config("configs/voc_reference.yaml")  # the old checkout path


def test_every_recipe_validates_and_cityscapes_header_matches_its_crop():
    for name in RECIPES:
        load_config(name)
    text = (RECIPES_DIR / "cityscapes.yaml").read_text()
    crop = yaml.safe_load(text)["data"]["crop_size"]
    header = "".join(line for line in text.splitlines() if line.startswith("#"))
    assert f"{crop}x{crop} crops" in header and "512x1024 crops" not in header


def test_configs_command_lists_and_shows(tmp_path):
    r = emanet_cli("configs", cwd=tmp_path)
    assert r.returncode == 0
    for name in RECIPES:
        assert re.search(rf"^{name}\s", r.stdout, flags=re.M)
    shown = emanet_cli("configs", "--show", "cityscapes", cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout == (RECIPES_DIR / "cityscapes.yaml").read_text()
    bad = emanet_cli("configs", "--show", "nope", cwd=tmp_path)
    assert bad.returncode == 2 and "packaged recipe" in bad.stderr and "Traceback" not in bad.stderr


def test_no_document_points_at_a_missing_config_path():
    texts = {p: p.read_text() for p in [ROOT / "README.md", ROOT / "Makefile", *(ROOT / "docs").glob("*.md")]}
    for path, text in texts.items():
        for ref in re.findall(r"(?<![\w/])(configs/[\w.-]+\.yaml)", text):
            assert (ROOT / ref).is_file(), f"{path.name} refers to {ref}, which does not exist"


def test_torch_hub_load_from_the_checkout(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert {"emanet_resnet50", "emanet_resnet101", "fcn_resnet50", "from_pretrained"} <= set(hubconf.__all__)
    assert set(hubconf.__all__) == {*MODELS, "from_pretrained"}  # the builders come from their one table
    # torch.hub.list's rule (it takes GitHub repos only): every public callable is an entry point, and only ours are
    listed = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert listed == set(hubconf.__all__)
    assert all(callable(getattr(hubconf, name)) for name in hubconf.__all__)
    torch.manual_seed(0)
    model = torch.hub.load(
        str(ROOT), "emanet_resnet50", source="local", num_classes=3, channels=16, mid_channels=8, num_bases=4
    )
    assert type(model).__name__ == "SegmentationModel" and model.head.context.num_bases == 4
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 33, 33)).shape == (1, 3, 33, 33)


def test_torch_hub_from_pretrained_loads_a_model_folder(tmp_path):
    from emanet import build_model
    from emanet.config import Config
    from emanet.pretrained import save_pretrained

    cfg = Config(model=tiny_model(backbone="resnet10", channels=8, num_bases=2))
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    folder = save_pretrained(model, cfg, tmp_path / "m")
    loaded = torch.hub.load(str(ROOT), "from_pretrained", str(folder), source="local")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_the_top_level_names_a_user_reaches_for():
    from emanet.deploy.hub import from_pretrained
    from emanet.deploy.predict import Predictor
    from emanet.pretrained import save_pretrained

    assert emanet.Predictor is Predictor and emanet.from_pretrained is from_pretrained
    assert emanet.save_pretrained is save_pretrained
    assert {"Predictor", "from_pretrained", "save_pretrained", "SegmentationModel"} <= set(emanet.__all__)
    for name in ("save_pretrained", "from_pretrained", "push_to_hub"):
        assert callable(getattr(emanet.SegmentationModel, name)), name


def test_torch_hub_builders_take_weights_and_say_what_pretrained_cannot_do(tmp_path):
    from emanet import build_model
    from emanet.config import Config
    from emanet.errors import ConfigError
    from emanet.pretrained import save_pretrained

    cfg = Config(model=tiny_model(backbone="resnet50", channels=8, num_bases=2))
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    folder = save_pretrained(model, cfg, tmp_path / "m")
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, tmp_path / "model.pt")
    x = torch.randn(1, 3, 32, 32)
    for weights in (str(folder), str(tmp_path / "model.pt")):
        loaded = torch.hub.load(str(ROOT), "emanet_resnet50", source="local", weights=weights)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ConfigError, match="publishes no weights.*pass weights= a model folder"):
        torch.hub.load(str(ROOT), "emanet_resnet50", source="local", pretrained=True)
    with pytest.raises(TypeError, match="did you mean 'num_classes'"):
        torch.hub.load(str(ROOT), "emanet_resnet50", source="local", num_clases=21)


SCRIPT = """
import sys, tempfile
from pathlib import Path
import numpy as np
import emanet

venv = Path(sys.argv[1]).resolve()
assert Path(emanet.__file__).resolve().is_relative_to(venv), emanet.__file__  # the wheel's, not src/
model = emanet.emanet_resnet50(num_classes=3, backbone_width=8, channels=8, mid_channels=8, num_bases=2).eval()
folder = model.save_pretrained(Path(tempfile.mkdtemp()) / "tiny")
loaded = emanet.SegmentationModel.from_pretrained(folder)
assert loaded.config == model.config and emanet.from_pretrained(folder).config == model.config
pred = emanet.Predictor.from_source(folder, device="cpu")(np.zeros((30, 34, 3), np.uint8), probs=True)
assert pred.labels.shape == (30, 34) and pred.probs.shape == (3, 30, 34)
print("ok", emanet.__version__, sorted(p.name for p in folder.iterdir()))
"""


@pytest.mark.slow
def test_sdist_and_wheel_build_pass_twine_and_the_wheel_works_in_a_fresh_venv(tmp_path):
    """What publishing checks: `python -m build` (the dev venv's setuptools, no network), `twine check
    --strict`, then the wheel installed alone into a new venv outside the checkout, used from a folder outside
    it: torch and the other dependencies come from the dev venv through a .pth file."""
    import sysconfig

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the tests put src/ on it
    dist = tmp_path / "dist"

    def run(*cmd, cwd=tmp_path):
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
        assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
        return r.stdout

    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT)
    (sdist,) = dist.glob("emanet-*.tar.gz")
    (wheel,) = dist.glob("emanet-*.whl")
    assert "PASSED" in run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel)
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta).decode()
        assert "emanet/py.typed" in z.namelist() and not any("hubconf" in n for n in z.namelist())
    assert "License-Expression: MIT" in metadata and "Classifier: Typing :: Typed" in metadata
    assert re.search(r"^Project-URL: Issues, https://\S+/issues$", metadata, flags=re.M)
    assert "Description-Content-Type: text/markdown" in metadata and "## Two commands" in metadata

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    dev = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # torch, numpy, pip ...
    (site / "dev-venv.pth").write_text("\n".join(dev) + "\n")  # plain paths: the dev venv's .pth files not run
    # --ignore-installed: the dev venv's own emanet is seen, never touched
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel)
    (tmp_path / "use.py").write_text(SCRIPT)
    out = run(python, tmp_path / "use.py", venv)
    assert out.strip() == f"ok {pyproject('version')} ['config.json', 'model.safetensors']"
    assert run(venv / "bin" / "emanet", "--version").strip() == f"emanet {pyproject('version')}"
