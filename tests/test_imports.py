"""Dependencies inside sam_fused run one way (docs/DESIGN.md section 6): no import cycle among its modules.

Every import counts, including those inside functions (lazy imports still tie the modules together), except those
under ``if TYPE_CHECKING:``, which never run (type hints only). Modules are read with ast, not imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "sam_fused"
# Source folders and the package each is installed as (setup.py's package_dir).
SOURCES = {ROOT / "sam_fused": PACKAGE, ROOT / "kernels": f"{PACKAGE}.kernels", ROOT / "bench": f"{PACKAGE}.bench"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (sub-packages included)."""
    found = {}
    for folder, package in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking_block(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in `tree`, at any depth, outside `if TYPE_CHECKING:` bodies (their else runs)."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        children = node.orelse if _is_type_checking_block(node) else ast.iter_child_nodes(node)
        todo.extend(children)
    return found


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import may load: the module, and for `from X import y`, X.y (y may be a submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolved against the importing module's package
        package = module if is_package else module.rpartition(".")[0]
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (importing a.b.c also runs a and a.b, so those count too)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            for name in _imported_names(node, module, path.name == "__init__.py"):
                parts = name.split(".")
                edges.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        edges &= modules.keys()
        # A module's own parent packages are imported before it runs: an edge to them is no cycle of its making.
        graph[module] = {m for m in edges if m != module and not module.startswith(f"{m}.")}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colouring modules on the current path)."""
    on_path: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> list[str] | None:
        if module in on_path:
            return [*on_path[on_path.index(module):], module]
        if module in done:
            return None
        on_path.append(module)
        for target in sorted(graph[module]):
            cycle = visit(target)
            if cycle:
                return cycle
        on_path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_the_graph_sees_lazy_imports_and_skips_type_checking_ones() -> None:
    graph = _graph()
    assert "sam_fused.msam_dispatch" in graph["sam_fused.optim"]  # module level
    assert "sam_fused.optim" not in graph["sam_fused.msam"]  # under TYPE_CHECKING only
    tree = ast.parse("def f():\n    from . import b\nif TYPE_CHECKING:\n    import c\nelse:\n    import d\n")
    names = [n for node in _imports(tree) for n in _imported_names(node, "p.a", False)]
    assert sorted(names) == ["d", "p", "p.b"]


def test_no_import_cycle_in_the_package() -> None:
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
