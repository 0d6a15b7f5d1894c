"""Layers import downward only (docs/DEVELOPING.md): every `import kvmits.X` in the package,
at module level or inside a function, names a layer at or below the importer's."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kvmits"

#: bottom to top; a module may import its own layer and the ones before it
LAYERS = ("errors", "newc", "uapi", "kvm", "its", "gic", "machine", "lab", "fuzz", "bench", "cli")
#: modules outside the layers: the package's own entry points (the command line's __main__, the
#: pytest plugin, which hands a run to the testbed like the command line does)
TOP = {"__init__", "__main__", "pytest_plugin"}


def layer_of(module: str) -> str:
    """'kvmits.machine.its.user' -> 'machine'."""
    parts = module.split(".")
    assert parts[0] == "kvmits", module
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every kvmits import in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("kvmits")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvmits") and not node.level:
            if node.module == "kvmits":        # from kvmits import uapi
                found += [(node.lineno, f"kvmits.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ".".join(("kvmits", *path.relative_to(PACKAGE).with_suffix("").parts))


def test_every_module_is_in_a_layer():
    for path, module in modules():
        layer = layer_of(module)
        assert layer in LAYERS or layer.removesuffix(".py") in TOP, f"{module}: add its package to LAYERS"


@pytest.mark.parametrize("path, module", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_go_downward(path, module):
    mine = layer_of(module)
    if mine in TOP:
        return
    for line, imported in imports_of(path):
        theirs = layer_of(imported)
        assert theirs in LAYERS, f"{path}:{line} imports {imported}"
        assert LAYERS.index(theirs) <= LAYERS.index(mine), \
            f"{path.relative_to(PACKAGE.parent)}:{line}: layer {mine} imports {imported} (layer {theirs}, above it)"


def test_the_its_model_knows_nothing_of_kvm():
    for path, module in modules():
        if layer_of(module) == "its":
            for line, imported in imports_of(path):
                assert layer_of(imported) in ("its", "errors"), f"{path}:{line} imports {imported}"


def test_a_wrong_import_is_caught(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from kvmits.machine import Machine\n")
    assert imports_of(bad) == [(2, "kvmits.machine")]
    assert LAYERS.index(layer_of("kvmits.machine")) > LAYERS.index("gic")
