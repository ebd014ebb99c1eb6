"""The shape of the library, checked so it stays as designed: imports point down the flow (kernels/ and
cache_tools/ import nothing from the app; no import cycle, lazy or not), no module over 400 lines and
no function over 80."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package name it is installed as (pyproject's package-dir)
PACKAGES = {"fastkd": "fastkd", "kernels": "fastkd.kernels", "cache_tools": "fastkd.cache_tools"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def modules() -> dict[str, Path]:
    """Every library module by its installed name."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The library modules `name` imports anywhere in its file (top level or inside functions)."""
    out, package = set(), name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer(name: str) -> str:
    return next((p for p in ("fastkd.kernels", "fastkd.cache_tools") if name == p or name.startswith(p + ".")), "app")


def test_lower_layers_import_nothing_from_the_app():
    wrong = [f"{name} imports {dep}" for name, deps in graph().items() if layer(name) != "app"
             for dep in deps if layer(dep) == "app"]
    assert not wrong, wrong


def test_no_import_cycles_lazy_or_not():
    g = graph()
    # package __init__ files that only re-export their own submodules are not a cycle of the code
    edges = {m: {d for d in deps if not (m.startswith(d + ".") and d in PACKAGES.values())} for m, deps in g.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


@pytest.mark.parametrize("name,path", sorted(modules().items()))
def test_modules_and_functions_stay_small(name, path):
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path}: {len(text.splitlines())} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path}: {long}"
