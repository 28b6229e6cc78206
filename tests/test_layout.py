"""The package's imports point one way, from the kernels' bindings up to the command lines.

    ops (and _C, errors, files, progress) -> models -> data -> runs -> sampling -> training | evaluation
    -> command lines

Read from the source with ast (nothing is imported): a module may import its own layer and the layers
below it, never one above; training and evaluation do not import each other; no import circle; and no
package-internal import hides inside a function (the way a circle is usually dodged).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dalle_fast"

LAYERS = {  # first dotted part under dalle_fast -> layer
    "_C": 0,
    "errors": 0,
    "files": 0,
    "progress": 0,
    "ops": 0,
    "models": 1,
    "data": 2,
    "runs": 3,
    "sampling": 4,
    "training": 5,
    "evaluation": 5,
}
# What the package's __init__ (the public API: the ops) may export from above them: the compiled library,
# and `load_dvae` (a dVAE run by folder: dalle_fast.load_dvae).
PUBLIC_ABOVE_OPS = {"dalle_fast._C", "dalle_fast.runs.load"}
CLI_LAYER = 6  # every other top-level module: train, generate, evaluate, cli, presets, plot_masks
APART = {"training", "evaluation"}  # one layer, kept from importing each other


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


MODULES = module_names()


def resolve(module: str, name: str | None) -> str:
    """`from module import name`: the submodule module.name when there is one, else module."""
    full = f"{module}.{name}"
    return full if full in MODULES or full == "dalle_fast._C" else module


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported dalle_fast module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in ast.walk(tree) if _module_level(tree, node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [resolve(node.module, a.name) for a in node.names]
        else:
            continue
        found += [(t, node.lineno, id(node) in top) for t in targets if t.split(".")[0] == "dalle_fast"]
    return found


def _module_level(tree: ast.Module, node: ast.AST) -> bool:
    """Whether node is reached from the module body without entering a function or class."""

    def walk(body):
        for stmt in body:
            if stmt is node:
                return True
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            for child in ast.iter_child_nodes(stmt):
                if child is node or walk([child]):
                    return True
        return False

    return walk(tree.body)


def layer(module: str) -> tuple[int, str]:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself: the public API, built from the ops
        return 0, "dalle_fast"
    return LAYERS.get(parts[1], CLI_LAYER), parts[1]


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def test_the_walk_finds_the_package():
    assert {"dalle_fast.ops.attention", "dalle_fast.models.transformer", "dalle_fast.train"} <= set(MODULES)
    assert "dalle_fast._C" in {t for t, _, _ in GRAPH["dalle_fast.ops.support"]}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    mine, group = layer(name)
    for target, line, _ in GRAPH[name]:
        theirs, their_group = layer(target)
        where = f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {target}"
        assert not (group in APART and their_group in APART and group != their_group), f"{where}: kept apart"
        if name == "dalle_fast":
            assert their_group == "ops" or target in PUBLIC_ABOVE_OPS, f"{where}: the public API is the ops"
            continue  # the package itself names its exports; every other module imports their layers
        assert theirs <= mine, f"{where}: layer {their_group} sits above layer {group}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_package_import_inside_a_function(name):
    inner = [(t, line) for t, line, top in GRAPH[name] if not top]
    assert not inner, f"{MODULES[name].relative_to(PACKAGE.parent)}: package imports inside a function: {inner}"


def test_no_import_circle():
    edges = {n: {t for t, _, _ in GRAPH[n] if t in MODULES and t != n} for n in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(n, path):
        state[n] = 1
        for t in sorted(edges[n]):
            # A package's __init__ importing its own submodules is how a package exposes them, and a
            # submodule importing a sibling is not a circle through the package.
            if n.startswith(t + ".") or t.startswith(n + "."):
                continue
            if state.get(t) == 1:
                cycle = path[path.index(t) :] + [t]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, path + [t])
        state[n] = 2

    for n in sorted(MODULES):
        if n not in state:
            visit(n, [n])


def test_a_check_that_can_fail(tmp_path):
    """The walk sees an upward import and one inside a function (guards against a walk that sees nothing)."""
    bad = tmp_path / "bad.py"
    bad.write_text("from dalle_fast.training.vae import train_vae\n\ndef f():\n    from dalle_fast.ops import masks\n")
    found = imports(bad)
    assert ("dalle_fast.training.vae", 1, True) in found and ("dalle_fast.ops.masks", 4, False) in found
    assert layer("dalle_fast.training.vae")[0] > layer("dalle_fast.models.dvae")[0]
