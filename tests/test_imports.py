"""neox_jax's modules import each other without a cycle, counting the imports inside functions too (a lazy
import hides a cycle from Python, not from the reader): read from the source, so nothing is imported."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "neox_jax"


def module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(f): f for f in PACKAGE.rglob("*.py")}


def imported(name: str) -> set[str]:
    """The neox_jax modules `name` imports anywhere in its source (`from . import x` counts module x)."""
    file = MODULES[name]
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                         for alias in node.names)
    return (found & MODULES.keys()) - {name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n, [n]))), None)


def test_no_import_cycle_inside_neox_jax():
    graph = {name: imported(name) for name in MODULES}
    assert {"neox_jax.params", "neox_jax.sharding", "neox_jax.weights"} <= graph.keys()
    assert "neox_jax.sharding" in graph["neox_jax.weights"]  # the graph sees real imports
    assert "neox_jax.checkpoints.hf" in graph["neox_jax.checkpoints"]  # ... lazy ones included
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_parameter_table_and_the_checkpoint_readers_import_no_jax():
    """The converter (torch and numpy only) stays light: the table it reads shapes from imports no JAX."""
    for name in ("neox_jax.params", "neox_jax.checkpoints", "neox_jax.checkpoints.stream",
                 "neox_jax.checkpoints.deepspeed", "neox_jax.checkpoints.hf", "neox_jax.convert"):
        source = MODULES[name].read_text()
        assert "import jax" not in source and "from jax" not in source, name
    assert not any(dep.startswith(("neox_jax.model", "neox_jax.sharding", "neox_jax.weights"))
                   for dep in imported("neox_jax.params") | imported("neox_jax.checkpoints.deepspeed"))
