"""The package map's import direction holds: lower layers never import higher ones.

Every `loraflow.X` import in every module is checked, including the ones inside functions
(the lazy imports that keep start-up fast), by walking the modules' syntax trees.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "loraflow"

# Lowest first. A package may import its own layer and any layer below it.
LAYERS = ["common", "data", "core", "vllm", "evaluation", "train", "serve", "demo", "cli"]


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "loraflow" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "loraflow":  # `from loraflow import x`: x may be a subpackage
                found += [(node.lineno, f"loraflow.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.parent != SRC)


def test_every_module_belongs_to_a_known_layer():
    packages = {p.relative_to(SRC).parts[0] for p in _modules()}
    assert packages <= set(LAYERS), f"packages missing from LAYERS: {packages - set(LAYERS)}"
    top_level = sorted(p.name for p in SRC.glob("*.py"))
    assert top_level == ["__init__.py"], f"modules outside any package: {top_level}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_upward_imports(path: Path):
    own = path.relative_to(SRC).parts[0]
    rank = LAYERS.index(own)
    upward = []
    for lineno, module in _imports(path):
        target = _package_of(module)
        if target in LAYERS and LAYERS.index(target) > rank:
            upward.append(f"{path.relative_to(SRC)}:{lineno} imports {module} ({own} -> {target})")
    assert not upward, "\n".join(upward)


def test_the_checker_sees_lazy_and_from_imports(tmp_path: Path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from loraflow.cli.main import main\nfrom loraflow import demo\n", encoding="utf-8")
    assert sorted(m for _, m in _imports(probe)) == ["loraflow.cli.main", "loraflow.demo"]


def test_public_api_is_importable_from_the_top_package():
    import loraflow

    for name in loraflow.__all__:
        assert getattr(loraflow, name) is not None, name
    assert callable(loraflow.evaluate) and callable(loraflow.train_gate)  # functions, not subpackages
