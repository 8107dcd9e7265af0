"""The package's layering, checked statically (issue 13).

Every module under ``personaweave/`` is parsed with ``ast``; every import it makes, at the top
level or inside a function, becomes an edge. Three rules are checked:

* no import cycles between modules (``from a import b`` where ``a.b`` is a module counts as an
  edge to ``a.b``, otherwise to ``a``);
* imports flow one way by layer: a module imports its own layer or a lower one (see ``LAYERS``);
* ``personaweave/models/*`` is saved as remote code, so it imports only its own files
  (relatively), torch, transformers (and safetensors, a hard dependency of transformers) and the
  standard library.

Each test prints the violations it finds, so ``pytest -s tests/test_layout.py`` lists them all.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "personaweave"

# Lower number = lower layer. The first matching prefix wins (longest prefixes first).
LAYERS: dict[str, int] = {
    "personaweave.models": 0,
    "personaweave.zoo": 1,
    "personaweave.files": 1,
    "personaweave.encoders": 1,
    "personaweave.chat": 1,
    "personaweave.generation": 1,
    "personaweave.sub_personalities": 1,
    "personaweave.loading": 1,
    "personaweave.data": 2,
    "personaweave.evaluation": 3,
    "personaweave.traits": 3,
    "personaweave.training": 4,
    "personaweave.export": 5,
    "personaweave.serving": 5,
    "personaweave.cli": 6,
    "personaweave.demo": 6,
    "personaweave.testing": 6,
    # The front door (personaweave/__init__.py) re-exports; nothing inside the package imports it.
    "personaweave": 6,
}

REMOTE_CODE_PACKAGE = "personaweave.models"
REMOTE_CODE_ALLOWED = {"torch", "transformers", "safetensors", "__future__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def layer_of(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise KeyError(f"{module} is in no layer: add it to LAYERS in tests/test_layout.py")


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported name, line, relative?) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno, False) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            else:
                base = node.module or ""
            found.append((base, node.lineno, bool(node.level)))
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            found.extend((f"{base}.{alias.name}", node.lineno, bool(node.level)) for alias in node.names)
    return found


def internal_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported package module: line}, keeping only names that are modules of the package."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for name, line, _ in imports_of(module, path):
            if name in modules and name != module:
                edges.setdefault(name, line)
        graph[module] = edges
    # `from a import b` adds edges to both a and a.b; keep only a.b when b is a submodule of a, so
    # that a package __init__ importing its own submodules and a submodule importing a sibling via
    # the package name do not count twice.
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = (
                    _resolve_relative(module, path.name == "__init__.py", node.level, node.module)
                    if node.level
                    else node.module or ""
                )
                names = [f"{base}.{a.name}" for a in node.names]
                if names and all(n in modules for n in names):
                    graph[module].pop(base, None)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def layer_violations(modules: dict[str, Path]) -> list[str]:
    graph = internal_graph(modules)
    out = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            if layer_of(target) > layer_of(module):
                out.append(
                    f"{modules[module].relative_to(PACKAGE_DIR.parent)}:{line}: {module} (layer "
                    f"{layer_of(module)}) imports {target} (layer {layer_of(target)})"
                )
    return out


def remote_code_violations(modules: dict[str, Path]) -> list[str]:
    stdlib = set(sys.stdlib_module_names)
    out = []
    for module, path in sorted(modules.items()):
        if not (module == REMOTE_CODE_PACKAGE or module.startswith(REMOTE_CODE_PACKAGE + ".")):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [(a.name, False) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "", bool(node.level))]
            else:
                continue
            for name, relative in names:
                top = name.split(".")[0]
                if relative:
                    continue  # relative imports stay inside the folder (checked by layer rules)
                if top in stdlib or top in REMOTE_CODE_ALLOWED:
                    continue
                why = "absolute import of the package" if top == "personaweave" else "third-party import"
                out.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno}: {module}: {why} {name!r}")
    return out


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    found = discover_modules()
    assert "personaweave.models.modeling_personaweave" in found
    return found


def test_every_module_has_a_layer(modules):
    missing = []
    for module in modules:
        try:
            layer_of(module)
        except KeyError as exc:
            missing.append(str(exc))
    print("\n".join(missing))
    assert not missing


def test_no_import_cycles(modules):
    graph = internal_graph(modules)
    cycles = find_cycles(graph)
    for cycle in cycles:
        print("cycle:", " <-> ".join(cycle))
    assert not cycles, cycles


def test_imports_flow_down_the_layers(modules):
    violations = layer_violations(modules)
    print("\n".join(violations))
    assert not violations, "\n" + "\n".join(violations)


def test_models_import_only_torch_transformers_and_themselves(modules):
    violations = remote_code_violations(modules)
    print("\n".join(violations))
    assert not violations, "\n" + "\n".join(violations)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The parser must not miss an import hidden in a function, nor mis-resolve a relative one."""
    pkg = tmp_path / "personaweave"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("from .a import x\n")
    (pkg / "models" / "a.py").write_text("def f():\n    from personaweave import serving\n")
    found = imports_of("personaweave.models.a", pkg / "models" / "a.py")
    assert ("personaweave.serving", 2, False) in found
    found = imports_of("personaweave.models", pkg / "models" / "__init__.py")
    assert ("personaweave.models.a", 1, True) in found
