"""The layer check (tests/layers.py) passes on the tree, and fails on what it is there to catch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests import layers

ROOT = Path(__file__).resolve().parent.parent / "p2pvbd"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the package to plant bad imports in."""
    copy = tmp_path / "p2pvbd"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def plant(path: Path, code: str) -> None:
    path.write_text(path.read_text() + "\n" + code + "\n")


def test_the_tree_keeps_its_layers() -> None:
    assert layers.check(ROOT) == []


def test_every_exemption_is_still_needed() -> None:
    edges = {(i.importer, i.imported) for i in layers.imports(ROOT)}
    assert sorted(layers.EXEMPT - edges) == []


def test_the_copy_passes_before_planting(tree: Path) -> None:
    assert layers.check(tree) == []


@pytest.mark.parametrize("code", [
    "from p2pvbd.daemon import Daemon",
    "if TYPE_CHECKING:\n    from p2pvbd.daemon import Daemon",
    "def later():\n    from p2pvbd import daemon",
    "import p2pvbd.daemon",
])
def test_an_upward_import_fails(tree: Path, code: str) -> None:
    plant(tree / "wire" / "peer_wire.py", "from typing import TYPE_CHECKING\n" + code)
    problems = layers.check(tree)
    upward = "p2pvbd.wire.peer_wire (layer 1) imports p2pvbd.daemon (layer 6)"
    assert any(p.startswith(upward) for p in problems), problems


def test_a_cycle_fails_even_through_type_only_imports(tree: Path) -> None:
    # map_tree imports version_map; the reverse, within one wing, closes a circle.
    plant(tree / "store" / "version_map.py",
          "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p2pvbd.store.map_tree import STALE_ROOT")
    problems = layers.check(tree)
    assert any(p.startswith("import cycle:") and "p2pvbd.store.map_tree" in p and "p2pvbd.store.version_map" in p
               for p in problems), problems


def test_a_module_outside_every_wing_fails(tree: Path) -> None:
    (tree / "stray.py").write_text('"""A new module at the top level."""\n')
    (tree / "newwing").mkdir()
    (tree / "newwing" / "thing.py").write_text('"""A wing no layer names."""\n')
    problems = layers.check(tree)
    assert any("stray.py: a module outside every wing" in p for p in problems), problems
    assert any("newwing is in no layer" in p for p in problems), problems
