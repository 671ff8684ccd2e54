"""The house's rules, checked on the source: who may import whom (docs/architecture.md).

Every ``import`` in our packages is read with ``ast`` (module level and inside functions alike,
relative imports resolved), giving a module graph and, from it, a package graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from live_server import REPO

#: package -> the packages of ours it may import (the one-way doors of docs/architecture.md)
ALLOWED = {
    "storage": set(),
    "causal_lm": {"storage"},
    "teacher_service": {"storage", "causal_lm"},
    "student_trainer": {"storage", "causal_lm"},
    "aligndistil": {"storage", "causal_lm", "teacher_service", "student_trainer"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports (``from X import y`` counts X, and X.y when
    that is a module of ours)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ALLOWED}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = [p for pkg in ALLOWED for p in (REPO / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    assert len(modules) > 50, sorted(modules)  # the walk really sees the code
    return {name: {m for m in _imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_packages_import_only_through_their_doors(graph):
    bad = [f"{src} imports {dst}" for src, targets in graph.items() for dst in targets
           if dst.split(".")[0] != src.split(".")[0]
           and dst.split(".")[0] not in ALLOWED[src.split(".")[0]]]
    assert not bad, "\n".join(sorted(bad))


def test_student_trainer_never_imports_teacher_service(graph):
    bad = [f"{src} -> {dst}" for src, targets in graph.items() if src.startswith("student_trainer")
           for dst in targets if dst.startswith("teacher_service")]
    assert not bad, bad


def test_components_never_import_recipes_and_nothing_imports_a_world(graph):
    bad = []
    for src, targets in graph.items():
        for dst in targets:
            if dst.startswith("student_trainer.recipes") and \
                    not src.startswith("student_trainer.recipes") and \
                    not src.startswith("aligndistil"):
                bad.append(f"{src} -> {dst}")
            if dst.startswith("aligndistil.worlds") and not src.startswith("aligndistil"):
                bad.append(f"{src} -> {dst}")
    assert not bad, bad


def test_no_import_cycles(graph):
    """No module reaches itself through imports (lazy ones included)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    # A package's __init__ importing its own submodule that imports the package back is the
    # only shape Python tolerates; we have none, so any cycle is a failure.
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_building_the_command_line_imports_no_torch():
    """``aligndistil --help`` stays instant: the configs are plain dataclasses."""
    import subprocess
    import sys

    code = ("import sys; from aligndistil.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
