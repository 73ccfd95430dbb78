"""The package's shape: the folder tree is the pipeline, imports point one way along it, and every
module and function reads in one sitting; the tests mirror the tree. Static checks over the source
(nothing is imported)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cachedit_fx"
TESTS = Path(__file__).resolve().parent
# Each subpackage's stage; a module may import from its own subpackage or from a lower stage only.
STAGES = {"errors": 0, "config": 1, "compat": 2, "capture": 3, "runtime": 3, "passes": 4, "backend": 5,
          "install": 6, "export": 6, "zoo": 7, "digits": 7, "coverage": 8, "tools": 9, "": 10}
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_TOP_LEVEL_MODULES = 450, 80, 6


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(module: str, path: Path, top_level_only: bool = False) -> list[tuple[str, list[str]]]:
    """(imported module, names) of every cachedit_fx import in ``path``; ``TYPE_CHECKING`` blocks are
    annotations, not imports, and are left out."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and
               getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = []
    for node in nodes:
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                bits = package.split(".")
                base = ".".join(bits[:len(bits) - node.level + 1] + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            if base == "cachedit_fx" or not node.module:  # ``from . import x`` imports the module x
                found += [(f"{base}.{n}" if f"{base}.{n}" in _MODULES else base, [n]) for n in names]
            else:
                found.append((base, names))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return [(m, names) for m, names in found if m == "cachedit_fx" or m.startswith("cachedit_fx.")]


_MODULES = _modules()


def test_imports_point_down_the_pipeline():
    upward = [f"{m} imports {target}" for m, path in _MODULES.items() for target, _ in _imports(m, path)
              if _stage(target) != _stage(m) and STAGES[_stage(target)] >= STAGES[_stage(m)]]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_modules():
    edges = {m: {t for t, _ in _imports(m, p, top_level_only=True) if t in _MODULES and t != m}
             for m, p in _MODULES.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in edges[m]:
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [m])


def test_no_private_names_imported_across_modules():
    private = [f"{m} imports {n} from {t}" for m, p in _MODULES.items() for t, names in _imports(m, p)
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, "\n".join(private)


def _too_long(name: str, path: Path) -> list[str]:
    source = path.read_text()
    lines = source.count("\n")
    long = [f"{name}: {lines} lines"] if lines > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                long.append(f"{name}.{node.name}: {n} lines")
    return long


def test_modules_and_functions_read_in_one_sitting():
    long = [line for m, path in _MODULES.items() for line in _too_long(m, path)]
    assert not long, "\n".join(long)


def test_the_top_level_holds_the_public_api_and_the_stages():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    stages = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert set(stages) == set(STAGES) - {"", "errors"}, stages


def test_the_tests_mirror_the_stages_and_read_in_one_sitting():
    """tests/<stage>/test_*.py for every stage (tests/helpers: what several stages' tests share), each a
    package; test modules and their functions within the package's limits."""
    folders = {p.parent for p in TESTS.rglob("*.py")}
    assert all((f / "__init__.py").exists() for f in folders), sorted(str(f) for f in folders)
    stages = {f.name for f in folders if f.parent == TESTS}
    assert stages - {"helpers"} == set(STAGES) - {"", "errors"}, stages
    long = [line for path in sorted(TESTS.rglob("*.py")) for line in _too_long(str(path.relative_to(TESTS)), path)]
    assert not long, "\n".join(long)
