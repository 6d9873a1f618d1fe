"""The package's layers point one way: no import cycle among hywia modules, and no lower layer imports a higher one.

Read from the source (module-level imports, outside `if TYPE_CHECKING:`), so the check needs no import to run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import hywia

ROOT = Path(hywia.__file__).parent

# module prefix -> prefixes it must never import at module level (the layers above it)
FORBIDDEN = {
    "hywia.measure": ["hywia."],
    "hywia.errors": ["hywia."],
    "hywia.calibration": ["hywia.importance", "hywia.pruning", "hywia.pipeline", "hywia.api", "hywia.eval"],
    "hywia.importance": ["hywia.pruning", "hywia.pipeline", "hywia.api", "hywia.bench", "hywia.cli",
                         "hywia.recovery"],
    "hywia.pruning": ["hywia.importance", "hywia.pipeline", "hywia.api", "hywia.bench", "hywia.cli",
                      "hywia.recovery"],
    "hywia.eval": ["hywia.api", "hywia.pipeline", "hywia.bench", "hywia.cli"],
    "hywia.pipeline": ["hywia.api", "hywia.bench", "hywia.cli", "hywia.recovery"],
    "hywia.settings": ["hywia.pipeline", "hywia.api", "hywia.bench", "hywia.cli"],
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            pending += node.body + node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body]
    return found


def import_graph() -> dict[str, set[str]]:
    """hywia module -> the hywia modules it imports at module level."""
    modules = {_module_name(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                bases = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                bases = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            targets |= {target for target in bases if target in modules and target != name}
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lower_layers_do_not_import_higher_ones():
    wrong = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for layer, above in FORBIDDEN.items()
        if module == layer or module.startswith(layer + ".")
        for target in targets
        if any(target == prefix or target.startswith(prefix) for prefix in above)
    ]
    assert wrong == []



def test_benchmark_harnesses_are_not_in_the_package():
    assert not (ROOT / "bench" / "speed.py").exists() and not (ROOT / "bench" / "cost.py").exists()
