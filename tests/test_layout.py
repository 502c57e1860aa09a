"""The house's arrows: every emanet import (inside functions too) points down the floors, never to a wing on
its own floor, and never closes a cycle. The floors, top to bottom:

    cli -> experiments, bench, convert -> train, deploy -> ground -> data, models -> leaves

A unit is a wing (a folder under src/emanet/) or a ground-floor module. Units on the ground and leaf floors may
import one another (downward or sideways); wings may not import a wing beside them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FLOORS: tuple[tuple[frozenset[str], bool], ...] = (  # (units, whether they may import one another)
    (frozenset({"__main__"}), False),  # `python -m emanet`: runs the command line
    (frozenset({"cli"}), False),
    (frozenset({"__init__"}), False),  # the public names: `from emanet import ...`
    (frozenset({"experiments", "bench", "convert"}), False),
    (frozenset({"train", "deploy"}), False),
    (frozenset({"config", "evaluation", "pretrained", "flops"}), True),
    (frozenset({"data", "models"}), False),
    (
        frozenset({"metrics", "checkpoint", "progress", "runtime", "losses", "fields", "errors", "inference"}),
        True,
    ),
)
OPTIONAL = {"matplotlib", "onnx", "onnxruntime", "onnxscript", "huggingface_hub", "tensorboard", "cv2"}


def module_name(path: Path, src: Path = SRC) -> str:
    return ".".join(path.relative_to(src).with_suffix("").parts)


def unit(module: str) -> str:
    """The wing or ground-floor module a module belongs to: emanet.train.loop -> train, emanet.config -> config."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor(name: str) -> int:
    for i, (units, _) in enumerate(FLOORS):
        if name in units:
            return i
    raise AssertionError(f"{name} is on no floor: add it to FLOORS in tests/test_layout.py")


def emanet_imports(path: Path, src: Path = SRC) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every emanet import in ``path``."""
    tree = ast.parse(path.read_text())
    modules = {module_name(p, src) for p in src.rglob("*.py")}
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # `from .check import x` / `from . import check`: relative to this module's package
                package = module_name(path, src).split(".")
                package = package[: len(package) - node.level]  # emanet.data.__init__ and emanet.data.x: emanet.data
                base = ".".join(package + ([base] if base else []))
            # `from emanet.data import check` imports the module emanet.data.check
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == "emanet" or name.startswith("emanet."):
                while name not in modules and f"{name}.__init__" not in modules:
                    name = name.rsplit(".", 1)[0]
                out.append((name, node.lineno, node.col_offset > 0))
    return out


def edges() -> list[tuple[str, str, str]]:
    """(importer, imported, 'file:line') over the package."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        for name, line, _ in emanet_imports(path):
            out.append((module_name(path), name, f"{path.relative_to(SRC)}:{line}"))
    return out


def arrow_problems(graph: list[tuple[str, str, str]]) -> list[str]:
    problems = []
    for importer, imported, where in graph:
        a, b = unit(importer), unit(imported)
        if a == b or imported == "emanet" and a in ("cli", "__main__"):
            continue
        fa, fb = floor(a), floor(b)
        if fb < fa:
            problems.append(f"{where}: {importer} imports {imported}, a floor above it")
        elif fa == fb and not FLOORS[fa][1]:
            problems.append(f"{where}: {importer} imports {imported}, a wing on its own floor")
    return problems


def cycles(graph: list[tuple[str, str, str]]) -> list[str]:
    """One line per import cycle among modules: the two files of an edge that closes it."""
    succ: dict[str, dict[str, str]] = {}
    for importer, imported, where in graph:
        name = imported if imported != "emanet" else "emanet.__init__"
        succ.setdefault(importer, {})[name] = where
    state: dict[str, int] = {}
    found = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt, where in succ.get(node, {}).items():
            if state.get(nxt) == 1:
                found.append(f"{where}: {node} imports {nxt}, which imports it back ({' -> '.join(stack + [nxt])})")
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(succ):
        if node not in state:
            visit(node, [node])
    return found


def test_every_import_points_down_the_floors():
    assert arrow_problems(edges()) == []


def test_no_import_cycle_among_the_modules():
    assert cycles(edges()) == []


def test_no_emanet_import_hides_inside_a_function():
    hidden = [
        f"{path.relative_to(SRC)}:{line} imports {name}"
        for path in sorted(SRC.rglob("*.py"))
        for name, line, nested in emanet_imports(path)
        if nested
    ]
    assert hidden == []


def test_every_package_module_is_on_a_floor():
    for path in SRC.rglob("*.py"):
        floor(unit(module_name(path)))


# ----------------------------------------------------------------------------- the guard itself can fail


@pytest.mark.parametrize(
    ("importer", "imported", "expected"),
    [
        ("emanet.models.em", "emanet.train.loop", "a floor above it"),
        ("emanet.checkpoint", "emanet.config", "a floor above it"),
        ("emanet.train.loop", "emanet.deploy.predict", "a wing on its own floor"),
        ("emanet.data.base", "emanet.models.em", "a wing on its own floor"),
    ],
)
def test_an_upward_or_sideways_import_is_named_with_its_file(importer, imported, expected):
    (problem,) = arrow_problems([(importer, imported, "x.py:1")])
    assert problem.startswith("x.py:1:") and expected in problem


def test_a_cycle_is_found_and_named():
    graph = [
        ("emanet.pretrained", "emanet.deploy.hub", "pretrained.py:9"),
        ("emanet.deploy.hub", "emanet.pretrained", "deploy/hub.py:3"),
    ]
    (found,) = cycles(graph)
    assert "emanet.pretrained" in found and "emanet.deploy.hub" in found


def test_the_parser_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "emanet"
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("")
    (pkg / "models.py").write_text("def f():\n    from emanet.train import loop\n")
    (pkg / "train" / "setup.py").write_text("from .loop import x\nfrom . import loop\n")
    (pkg / "train" / "__init__.py").write_text("from .setup import y\n")
    assert emanet_imports(pkg / "models.py", tmp_path) == [("emanet.train.loop", 2, True)]
    # relative imports are edges too
    assert emanet_imports(pkg / "train" / "setup.py", tmp_path) == [
        ("emanet.train.loop", 1, False),
        ("emanet.train.loop", 2, False),
    ]
    assert emanet_imports(pkg / "train" / "__init__.py", tmp_path) == [("emanet.train.setup", 1, False)]
