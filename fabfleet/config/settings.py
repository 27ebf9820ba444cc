"""The one resolver of where things are: the project, its settings, the inventory, and
the project's state on each host.

Pure paths and files, no connections. Everything that needs "which project is this" or
"which inventory" asks here, so the command line, runs, payload workers, Dask and
Jupyter can never disagree:

* the **project** is the nearest directory upward from the current one holding ``.git``,
  ``pyproject.toml`` or ``setup.py`` (else the current directory);
* its **settings** are the ``fabfleet`` section of Invoke's configuration: the command
  line passes the one Invoke merged (``/etc/invoke.yaml``, ``~/.invoke.yaml``, the
  project's ``invoke.yaml``, ``INVOKE_FABFLEET_*``); library calls from a script or a
  notebook read the project's own ``invoke.yaml`` (or ``.yml``/``.json``) at its root;
* its **name** is ``fabfleet.project`` from those settings, else the root's name, made
  safe as one path component; it names everything fabfleet keeps for it on a host::

    <work_dir>/<project>/                  the pushed project; scripts run in it
    <work_dir>/.runs/<project>/<run id>/   one dir per run: output, exit code, timing
    <work_dir>/.venvs/<project>/           made by setup-workdir --requirements

  The state dirs start with a dot, so no project name (which never does) collides with
  them, and ``clean`` in one project leaves every other project's runs alone;
* the **inventory** is the first of ``$FABFLEET_INVENTORY``, ``fabfleet.inventory``
  (relative to the project root), ``inventory.yaml`` here or in a parent up to the
  project root, ``$XDG_CONFIG_HOME/fabfleet/inventory.yaml``.
"""

from __future__ import annotations

import json
import os
import time
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InventoryError

PROJECT_MARKERS = (".git", "pyproject.toml", "setup.py")
PROJECT_CONFIG_FILES = ("invoke.yaml", "invoke.yml", "invoke.json")
RUNS_DIR = ".runs"
VENVS_DIR = ".venvs"
INVENTORY_ENV = "FABFLEET_INVENTORY"
INVENTORY_FILE = "inventory.yaml"


# -- the project -----------------------------------------------------------------------
def find_project(start: str | os.PathLike[str] | None = None) -> Path:
    """The project root for ``start`` (default: the current directory)."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        if any((d / marker).exists() for marker in PROJECT_MARKERS):
            return d
    return here


def is_marked(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` holds a project marker (else it is just the current directory)."""
    return any((Path(root) / marker).exists() for marker in PROJECT_MARKERS)


def is_unmarked_home(root: str | os.PathLike[str]) -> bool:
    """True for ``/`` or the home directory when they hold no project marker: such a
    directory is no project, and pushing it would send everything under it."""
    r = Path(root).resolve()
    return not is_marked(r) and (r == Path(r.anchor) or r == Path.home().resolve())


def safe_name(name: str) -> str:
    """``name`` as one remote path component: letters, digits, ``_.-``; never starting
    with a dot, never empty."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")
    return safe or "project"


def project_name(root: str | os.PathLike[str], override: str | None = None) -> str:
    """The remote name of the project at ``root``: ``override`` or the root's name."""
    return safe_name(override or Path(root).name)


_config_cache: dict[str, tuple[tuple, dict]] = {}


def project_config(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``fabfleet`` section of the project's own Invoke config file (``invoke.yaml``,
    ``.yml`` or ``.json`` at ``root``), as ``inv``/``fabfleet`` would load it there;
    ``{}`` without one. Cached per file, re-read when it changes."""
    for name in PROJECT_CONFIG_FILES:
        path = Path(root) / name
        try:
            st = path.stat()
        except OSError:
            continue
        key = (st.st_mtime_ns, st.st_size)
        cached = _config_cache.get(str(path))
        if cached and cached[0] == key:
            return cached[1]
        try:
            text = path.read_text()
            if name.endswith(".json"):
                data = json.loads(text)
            else:
                import yaml
                data = yaml.safe_load(text)
        except (OSError, ValueError) as exc:
            raise InventoryError(f"{path}: cannot read the project's Invoke config: {exc}") \
                from None
        except Exception as exc:  # noqa: BLE001 - yaml.YAMLError and its kinds
            raise InventoryError(f"{path}: not valid YAML: {exc}") from None
        section = (data or {}).get("fabfleet") if isinstance(data, dict) else None
        result = dict(section) if isinstance(section, dict) else {}
        _config_cache[str(path)] = (key, result)
        return result
    return {}


@dataclass(frozen=True)
class Project:
    """The local project and its remote name. ``pushable`` is False for an unmarked home
    or ``/`` (never pushed); ``config`` is its ``fabfleet`` settings."""

    root: Path
    name: str
    config: Mapping[str, Any]

    @property
    def pushable(self) -> bool:
        return not is_unmarked_home(self.root)

    def identity(self) -> dict[str, str]:
        """Which project this is, for the marker a push leaves on each host (see
        :func:`project_identity`)."""
        return project_identity(self.root)

    def inventory_setting(self) -> str | None:
        """``fabfleet.inventory`` as a path: relative ones are relative to the root."""
        configured = self.config.get("inventory")
        if not configured:
            return None
        path = os.path.expanduser(str(configured))
        return path if os.path.isabs(path) else str(self.root / path)


def project_identity(root: str | os.PathLike[str]) -> dict[str, str]:
    """``{"id": …, "from": …}`` for a project root: its git origin where it has one (so
    every clone of one repository is the same project on a host), else this machine and
    the root's path. ``id`` is a digest (an origin URL may carry a token); ``from`` is
    what an error shows (credentials removed)."""
    import hashlib
    import socket
    import subprocess
    root = Path(root).resolve()
    origin = ""
    if (root / ".git").exists():
        try:
            origin = subprocess.run(["git", "-C", str(root), "config", "--get",
                                     "remote.origin.url"], capture_output=True, text=True,
                                    timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            origin = ""
    label = re.sub(r"//[^/@]*@", "//", origin) if origin else \
        f"{socket.gethostname()}:{root}"
    key = f"git:{origin}" if origin else f"path:{socket.gethostname()}:{root}"
    return {"id": hashlib.sha256(key.encode()).hexdigest()[:32], "from": label}


_recent: dict[str, tuple[float, str]] = {}


def current_project_name() -> str:
    """:func:`resolve_project`'s name for the current directory, remembered for a
    second: a warm payload call asks on every call, and a project does not move that
    fast."""
    cwd = os.getcwd()
    hit = _recent.get(cwd)
    now = time.monotonic()
    if hit and now - hit[0] < 1.0:
        return hit[1]
    name = resolve_project(cwd).name
    _recent[cwd] = (now, name)
    return name


def resolve_project(cwd: str | os.PathLike[str] | None = None, *,
                    config: Mapping[str, Any] | None = None,
                    root: str | os.PathLike[str] | None = None) -> Project:
    """The project for ``cwd`` (default: the current directory).

    ``config`` is the ``fabfleet`` settings when the caller has them (the command line
    passes Invoke's merged config); what it leaves unset (``None``) comes from the
    project's own ``invoke.yaml``, which is all a script or notebook has — and all
    Fabric's ``fab`` has, since it reads ``fabric.yaml`` instead. ``root`` overrides the
    root search."""
    top = Path(root).resolve() if root else find_project(cwd)
    given = {k: v for k, v in (config or {}).items() if v is not None}
    settings = {**project_config(top), **given}
    return Project(top, project_name(top, settings.get("project")), settings)


# -- the inventory ---------------------------------------------------------------------
def inventory_candidates(configured: str | None = None,
                         start: str | os.PathLike[str] | None = None) -> list[tuple[str, str]]:
    """Where the inventory may be, in order: ``(where it came from, path)`` pairs."""
    out = []
    if os.environ.get(INVENTORY_ENV):
        out.append((f"${INVENTORY_ENV}", os.path.expanduser(os.environ[INVENTORY_ENV])))
    if configured:
        out.append(("Invoke config fabfleet.inventory", os.path.expanduser(str(configured))))
    here = Path(start or os.getcwd()).resolve()
    root = find_project(here)
    for d in (here, *here.parents):
        out.append((f"{INVENTORY_FILE} in {d}", str(d / INVENTORY_FILE)))
        if d == root:
            break
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    out.append(("the user-wide inventory", os.path.join(xdg, "fabfleet", INVENTORY_FILE)))
    return out


def find_inventory(configured: str | None = None,
                   start: str | os.PathLike[str] | None = None) -> str:
    """The inventory's path (see the module docstring for the order). ``configured`` is
    ``fabfleet.inventory``; ``None`` takes it from the project's own settings.

    An explicitly named file (the first two) is returned even if missing, so loading it
    says so; otherwise :class:`InventoryError` lists every place searched.
    """
    if configured is None:
        configured = resolve_project(start).inventory_setting()
    candidates = inventory_candidates(configured, start)
    for source, path in candidates:
        if not source.startswith(INVENTORY_FILE) and source != "the user-wide inventory":
            return path  # named explicitly: use it (a missing file is an error on load)
        if os.path.isfile(path):
            return path
    searched = "\n".join(f"  {path}" for _, path in candidates)
    raise InventoryError(
        f"no inventory found. Searched:\n{searched}\nRun `fabfleet init` here to write a "
        f"starter inventory.yaml, or set {INVENTORY_ENV} to the path of yours.")


# -- the project's state on a host -----------------------------------------------------
def work_dir(host: Any) -> str:
    """The host's work dir without a trailing slash (``/`` stays ``/``)."""
    return host.work_dir.rstrip("/") or "/"


def layout(host: Any, project: str) -> dict[str, str]:
    """Remote paths of one project on ``host`` (a :class:`~fabfleet.config.inventory.Host`):
    ``work_dir``, ``project`` (the pushed code), ``runs`` (this project's run dirs),
    ``all_runs`` (every project's), ``venv`` (this project's venv)."""
    wd = work_dir(host)
    base = "" if wd == "/" else wd
    return {"work_dir": wd, "project": f"{base}/{project}",
            "runs": f"{base}/{RUNS_DIR}/{project}", "all_runs": f"{base}/{RUNS_DIR}",
            "venv": f"{base}/{VENVS_DIR}/{project}"}


def relative_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str | None:
    """``path`` relative to ``root`` as a posix string, or ``None`` when it lies outside
    (both resolved, so ``..`` and symlinks cannot smuggle a path in)."""
    try:
        rel = Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return None
    return rel.as_posix()
