"""The package's architecture, checked (issue 17): no import circle between its modules, the
library apart from the applications and the test oracles, and modules of one job each.

The import graph is read from the source (ast), function-level imports included: a circle that
only a lazy import keeps from failing at load time is still a circle.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "crossbar_torch"

# Modules longer than MAX_LINES, each with why one concept needs the length.
MAX_LINES = 450
LONG_MODULES = {
    "config.py": "one concept: the validated CrossbarConfig (about 40 fields, each refused with "
                 "its own message, the derived quantities, YAML and overrides)",
}


def _modules():
    mods = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve(module, path, level, name):
    parts = module.split(".")
    if path.name != "__init__.py":
        parts = parts[:-1]  # the module's package
    base = parts[:len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph():
    """{module: set of package modules it imports}. ``from A import b`` counts as importing
    A.b when that is a module, else A; a package's own ancestors are not edges (Python runs a
    parent package before its children in any case)."""
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (_resolve(mod, path, node.level, node.module) if node.level
                        else node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for t in targets:
                if t in mods and t != mod and not mod.startswith(t + "."):
                    edges.add(t)
        graph[mod] = edges
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_sees_relative_and_lazy_imports():
    g = import_graph()
    assert "crossbar_torch.nn.analog" in g["crossbar_torch.nn.modules.base"]
    # a function-level import: calibrate_from_loader's users import it inside functions
    assert "crossbar_torch.nn.calibration" in g["crossbar_torch.apps.cli_eval"]


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_library_does_not_import_apps_or_oracles():
    """The library (everything outside apps/) never imports an application module or a test
    oracle (ops.reference, ops.analog_reference, ops.feedback_reference)."""
    g = import_graph()
    oracles = {"crossbar_torch.ops.reference", "crossbar_torch.ops.analog_reference",
               "crossbar_torch.ops.feedback_reference"}
    for mod, edges in g.items():
        if mod.startswith("crossbar_torch.apps") or mod in oracles:
            continue
        bad = {e for e in edges if e.startswith("crossbar_torch.apps") or e in oracles}
        assert not bad, f"{mod} imports {sorted(bad)}"


def test_import_loads_no_app_module():
    code = ("import sys, crossbar_torch; "
            "print(' '.join(m for m in sys.modules if m.startswith('crossbar_torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(PKG)).stdout.split()
    assert "crossbar_torch.nn" in out  # the check sees what it is meant to
    loaded = [m for m in out if m.startswith("crossbar_torch.apps") or "reference" in m]
    assert not loaded, loaded


@pytest.mark.parametrize("path", sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py")))
def test_module_length(path):
    n = len((PKG / path).read_text().splitlines())
    if path in LONG_MODULES:
        return
    assert n <= MAX_LINES, (f"{path} has {n} lines (> {MAX_LINES}): split it by job, or name "
                            "the one concept that needs the length in LONG_MODULES")
