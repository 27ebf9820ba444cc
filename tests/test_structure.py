"""The package's shape (STYLE.md 1, 15-17): the CLI apart from the library, imports
pointing one way, no private names imported across modules. Pure source checks."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "fabfile"
CLI = {"tasks", "cli"}


def imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module, names, at top level) for every ``from .x import …`` in a file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.append((node.module.split(".")[0], [a.name for a in node.names],
                        id(node) in top))
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
            mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            out.append(("<ext>" + (mod or ""), [], id(node) in top))
    return out


def test_no_import_cycles_and_cli_apart():
    modules = {p.stem: imports(p) for p in PKG.glob("*.py") if p.stem != "__init__"}
    graph = {m: {dep for dep, _, _ in deps if not dep.startswith("<ext>")}
             for m, deps in modules.items()}
    for m, deps in graph.items():
        if m not in CLI:
            assert not deps & CLI, f"library module {m} imports the CLI"
            # Invoke's exceptions are translated at the error boundary; its task
            # machinery (task, Collection, Program, Exit) belongs to the CLI alone.
            assert not any(d.startswith("<ext>invoke") and d != "<ext>invoke.exceptions"
                           for d, _, _ in modules[m]), m

    def visit(m, path):
        assert m not in path, f"import cycle: {' -> '.join(path + [m])}"
        for dep in graph.get(m, ()):
            visit(dep, path + [m])
    for m in graph:
        visit(m, [])


def test_no_private_names_across_modules():
    for p in PKG.glob("*.py"):
        for dep, names, _ in imports(p):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{p.name} imports private {private} from {dep}"
