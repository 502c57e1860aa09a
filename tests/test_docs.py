"""The documentation site (mkdocs.yml, docs/api): every public name the API reference documents has a docstring,
and `mkdocs build --strict` (broken links and references fail it) succeeds.

Public, for a ``::: target`` of docs/api/*.md: a module's ``__all__`` when it has one, else the functions and
classes defined in it whose names do not start with ``_``; a class's own methods, properties and nested classes
of such names, less the overrides of a base class's method (``forward`` of an nn.Module: the base documents the
contract). The docstrings are read statically with griffe, as mkdocstrings renders them.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

griffe = pytest.importorskip("griffe")  # the docs extra (part of dev): mkdocstrings' Python reader

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
# "::: emanet.x" and the indented YAML block of options after it
DIRECTIVE = re.compile(r"^::: ([\w.]+)[ \t]*\n((?:[ \t]+.*\n)*)", re.M)


def directives(text: str) -> list[tuple[str, list[str] | None]]:
    """(target, the ``members`` option if the directive limits them) of every ``:::`` in ``text``."""
    found = []
    for target, block in DIRECTIVE.findall(text):
        options = (yaml.safe_load(block) or {}).get("options", {}) if block.strip() else {}
        members = options.get("members")
        found.append((target, members if isinstance(members, list) else None))
    return found


def _is_api_object(obj) -> bool:
    return obj.is_function or obj.is_class or (obj.is_attribute and "property" in obj.labels)


def _overrides_a_base(cls, name: str) -> bool:
    runtime = getattr(importlib.import_module(cls.module.path), cls.name, None)
    return runtime is not None and any(name in vars(base) for base in runtime.__mro__[1:])


def undocumented(obj, members: list[str] | None = None) -> list[str]:
    """Paths of the public functions, classes, methods and properties under ``obj`` without a docstring."""
    missing: list[str] = []
    seen: set[str] = set()

    def check(o, top_level: bool) -> None:
        o = o.final_target if o.is_alias else o
        if o.path in seen:
            return
        seen.add(o.path)
        if not o.docstring or not o.docstring.value.strip():
            missing.append(o.path)
        if o.is_class:
            for name, m in o.members.items():
                if name.startswith("_") or m.is_alias or not _is_api_object(m):
                    continue
                if m.is_function and _overrides_a_base(o, name):
                    continue
                check(m, False)

    if obj.is_module:
        if members is not None:
            names = members
        elif obj.exports is not None:
            names = [n if isinstance(n, str) else n.name for n in obj.exports]
        else:
            names = [n for n, m in obj.members.items() if not n.startswith("_") and not m.is_alias]
        for name in names:
            member = obj.members[name]
            target = member.final_target if member.is_alias else member
            if _is_api_object(target):
                check(target, True)
    else:
        check(obj, True)
    return missing


@pytest.fixture(scope="module")
def package():
    return griffe.load("emanet", search_paths=[str(ROOT / "src")])


def test_the_reference_covers_the_public_surface():
    targets = {t for page in API.glob("*.md") for t, _ in directives(page.read_text())}
    wanted = {
        "emanet",
        "emanet.models.em",
        "emanet.models.emanet",
        "emanet.models.backbone",
        "emanet.deploy.predict",
        "emanet.deploy.export",
        "emanet.deploy.hub",
        "emanet.pretrained",
        "emanet.config",
        "emanet.data",
        "emanet.inference",
        "emanet.metrics",
        "emanet.losses",
        "emanet.errors",
        "emanet.convert.checkpoints",
        "emanet.train.loop",
    }
    assert wanted <= targets, f"docs/api has no ::: for {sorted(wanted - targets)}"
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    (api_nav,) = [entry["API reference"] for entry in config["nav"] if "API reference" in entry]
    listed = {page for entry in api_nav for page in entry.values()}
    assert listed == {f"api/{p.name}" for p in API.glob("*.md")}, "every docs/api page in the nav, and only those"


def test_every_guide_is_in_the_nav():
    def pages(entries) -> set[str]:
        found = set()
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            found |= pages(value) if isinstance(value, list) else {value}
        return found

    nav = pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    guides = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").glob("*.md")} | {"study/README.md"}
    assert guides - {"index.md"} <= nav, f"docs pages missing from the mkdocs.yml nav: {sorted(guides - nav)}"


def test_every_public_name_in_the_reference_has_a_docstring(package):
    missing = []
    for page in sorted(API.glob("*.md")):
        for target, members in directives(page.read_text()):
            obj = package if target == "emanet" else package[target.removeprefix("emanet.")]
            missing += [f"{page.relative_to(ROOT)}: {path}" for path in undocumented(obj, members)]
    assert not missing, "public names without a docstring:\n" + "\n".join(missing)


def test_the_docstring_check_can_fail(tmp_path):
    pkg = tmp_path / "mod.py"
    pkg.write_text(
        "import torch\n"
        "__all__ = ['f', 'C']\n"
        "def f(): pass\n"
        "def hidden(): pass\n"
        "class C(torch.nn.Module):\n"
        "    '''Documented.'''\n"
        "    def forward(self, x): return x\n"  # an override: the base documents it
        "    def step(self): pass\n"
        "    @property\n"
        "    def size(self): return 1\n"
        "    def _private(self): pass\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        mod = griffe.load("mod", search_paths=[str(tmp_path)])
        assert undocumented(mod) == ["mod.f", "mod.C.step", "mod.C.size"]
        assert undocumented(mod, ["C"]) == ["mod.C.step", "mod.C.size"]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mod", None)


def test_directives_read_the_members_option():
    text = "# x\n\n::: emanet.a\n\n::: emanet.b\n    options:\n      members: [f, g]\n\ntext\n"
    assert directives(text) == [("emanet.a", None), ("emanet.b", ["f", "g"])]


@pytest.mark.slow
def test_the_site_builds_in_strict_mode(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or pytest.skip("mkdocs not installed")
    r = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    home = (tmp_path / "site" / "index.html").read_text()
    assert "Expectation-Maximization Attention Networks" in home  # the README is the home page
    assert 'href="predict/"' in home  # its docs/predict.md link, rewritten for the site
    assert (tmp_path / "site" / "api" / "deploy" / "index.html").read_text().count("emanet.deploy.predict.Predictor")
