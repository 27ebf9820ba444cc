"""The package's shape (STYLE.md 1, 15-21), checked on the source alone:

* layers import downward only (``hostside`` < ``errors``/``render`` < ``config`` <
  ``ssh`` < ``host`` < ``apps`` < ``fleet`` < ``cli``), with no import cycle;
* code that runs on hosts (``fabfleet/hostside/``) imports only the standard library and
  compiles for the oldest Python the README promises for hosts (3.6);
* no module holds Python source in a string constant (host programs are real modules);
* only ``render`` imports rich; only the CLI imports Invoke's task machinery;
* no private names are imported across modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "fabfleet"
#: the layer of each top-level room of the package; imports may only go to a lower or
#: equal layer (equal: within the same room)
LAYERS = {"hostside": 0, "errors": 1, "render": 1, "config": 2, "ssh": 3, "host": 4,
          "apps": 5, "fleet": 6, "cli": 7, "tasks": 8, "__init__": 9}
OLDEST_HOST_PYTHON = (3, 6)


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = modules()


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def own_imports(module: str, path: Path) -> list[tuple[str, list[str], bool]]:
    """``(absolute module, names, at top level)`` for every import of fabfleet's own
    modules in ``path`` (``module`` is its dotted name)."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in tree.body:  # imports under `if TYPE_CHECKING:` count as top level
        if isinstance(node, ast.If):
            top |= {id(n) for n in node.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[:len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            if not node.module:  # from . import x: x is a module, or a name in the package
                for n in names:
                    sub = f"{target}.{n}"
                    out.append((sub, [], id(node) in top) if sub in MODULES else
                               (target, [n], id(node) in top))
            else:
                out.append((target, names, id(node) in top))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "fabfleet":
                    out.append((a.name, [], id(node) in top))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fabfleet"):
            out.append((node.module, [a.name for a in node.names], id(node) in top))
    return out


def external_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.add(node.module or "")
    return {m for m in out if not m.startswith("fabfleet")}


def test_layers_import_downward_only():
    for module, path in modules().items():
        mine = room(module)
        for target, names, top in own_imports(module, path):
            theirs = room(target)
            if LAYERS[theirs] <= LAYERS[mine] or (target == "fabfleet" and names == [
                    "__version__"]):  # the version string, a constant of the package
                continue
            pytest.fail(f"{module} (layer {mine}) imports {target} (layer {theirs}), above it")


def test_no_import_cycles():
    mods = modules()
    graph = {m: {t for t, _, top in own_imports(m, p) if top and t in mods and t != m}
             for m, p in mods.items()}

    def visit(m, path):
        assert m not in path, f"import cycle: {' -> '.join(path + [m])}"
        for dep in graph.get(m, ()):
            if dep.startswith(m + "."):
                continue  # a package importing its own submodule is not a cycle
            visit(dep, path + [m])
    for m in graph:
        visit(m, [])


def test_the_layers_checked_are_all_there():
    rooms = {room(m) for m in modules()}
    assert rooms == set(LAYERS), f"rooms without a layer (or layers without a room): " \
                                 f"{rooms ^ set(LAYERS)}"


@pytest.mark.parametrize("path", sorted((PKG / "hostside").glob("*.py")), ids=lambda p: p.name)
def test_host_side_code_is_standard_library_only_and_old_python(path):
    source = path.read_text()
    ast.parse(source, feature_version=OLDEST_HOST_PYTHON)  # a SyntaxError fails the test
    stdlib = set(sys.stdlib_module_names)
    ships = ship_list(path)
    for mod in unguarded_imports(path):
        # cloudpickle is the exception: the client ships its own when the host lacks it;
        # fabfleet_NAME is a host-side module the program ships with (SHIPS_WITH)
        shipped = mod.startswith("fabfleet_") and mod[len("fabfleet_"):] in ships
        assert mod.split(".")[0] in stdlib or shipped or \
            (path.name, mod) in {("worker.py", "cloudpickle"), ("batch_call.py", "cloudpickle")}, \
            f"{path.name} imports {mod}, not in the standard library, without a fallback"
    for name in ships:
        assert (PKG / "hostside" / f"{name}.py").is_file(), f"{path.name} ships {name}?"
        from fabfleet.ssh.launch import SHIPPABLE
        assert name in SHIPPABLE, f"{name} is not in fabfleet.ssh.launch.SHIPPABLE"


def ship_list(path: Path) -> tuple[str, ...]:
    """The module's ``SHIPS_WITH`` tuple (host-side modules that travel with it)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "SHIPS_WITH"
                                                for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    return ()
    for target, _, _ in own_imports(f"fabfleet.hostside.{path.stem}", path):
        pytest.fail(f"{path.name} imports {target}: host-side modules travel alone")


def unguarded_imports(path: Path) -> set[str]:
    """Imports not inside a ``try`` whose handler catches ImportError: what a bare
    Python must have for the module to run at all."""
    tree = ast.parse(path.read_text())
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is not None and "ImportError" in ast.unparse(h.type)
                for h in node.handlers):
            for inner in node.body:
                guarded |= {id(n) for n in ast.walk(inner)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.add(node.module or "")
    return out


def python_in_strings(path: Path) -> list[tuple[int, str]]:
    """String constants (not docstrings) that are Python programs: several lines that
    parse, with at least one import, def, class or call statement."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) \
                or id(node) in docstrings or node.value.count("\n") < 2:
            continue
        try:
            parsed = ast.parse(node.value)
        except SyntaxError:
            continue
        if any(isinstance(s, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef))
               or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Call))
               for s in parsed.body):
            found.append((node.lineno, node.value.splitlines()[0]))
    return found


def test_the_program_in_a_string_check_can_fail(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('PROBE = """\nimport json, sys\nprint(json.dumps(sys.argv))\n"""\n'
                      'TEXT = """a message\nover several\nlines, not code"""\n')
    assert [line for line, _ in python_in_strings(sample)] == [1]


@pytest.mark.parametrize("module", sorted(modules()), ids=str)
def test_no_python_source_in_string_constants(module):
    assert not python_in_strings(modules()[module]), \
        f"{module} holds a program in a string; put it in fabfleet/hostside/ as a module"


def test_only_render_imports_rich_and_only_the_cli_invokes_tasks():
    for module, path in modules().items():
        ext = external_imports(path)
        if module != "fabfleet.render":
            assert not any(m.split(".")[0] == "rich" for m in ext), f"{module} imports rich"
        if room(module) not in ("cli", "tasks"):
            # Invoke's exceptions are translated at the error boundary; its task
            # machinery (task, Collection, Program, Exit) belongs to the CLI alone.
            assert not any(m.split(".")[0] == "invoke" and m != "invoke.exceptions"
                           for m in ext), f"{module} imports Invoke's task machinery"


def test_no_private_names_across_modules():
    for module, path in modules().items():
        for target, names, _ in own_imports(module, path):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private, f"{module} imports private {private} from {target}"


def test_fabfile_is_the_same_objects_not_copies():
    import fabfile
    import fabfile.tasks
    import fabfleet
    import fabfleet.tasks
    assert fabfile.Inventory is fabfleet.Inventory and fabfile.remote is fabfleet.remote
    assert fabfile.tasks.ns is fabfleet.tasks.ns
    assert callable(fabfleet.remote)  # never shadowed by a subpackage of that name


def test_the_readme_table_of_waits_is_the_deadlines_module():
    """Every wait and its bound, as config/deadlines.py derives them, stands in the
    README's "Waits and bounds" table: one home, and the table stays true."""
    from fabfleet.config.deadlines import table
    readme = (ROOT / "README.md").read_text()
    for wait, bound in table():
        assert f"| {wait} | {bound} |" in readme, wait
