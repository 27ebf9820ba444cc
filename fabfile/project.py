"""Where things are: the user's project locally, and its state on each host.

Pure paths, no connections. The *project* is the nearest directory upward from the
current one holding ``.git``, ``pyproject.toml`` or ``setup.py`` (else the current
directory); its name names everything fabfleet keeps for it on a host::

    <work_dir>/<project>/                  the pushed project; scripts run in it
    <work_dir>/.runs/<project>/<run id>/   one dir per run: output, exit code, timing
    <work_dir>/.venvs/<project>/           made by setup-workdir --requirements

The state dirs start with a dot, so no project name (which never does) collides with
them, and ``clean`` in one project leaves every other project's runs alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

PROJECT_MARKERS = (".git", "pyproject.toml", "setup.py")
RUNS_DIR = ".runs"
VENVS_DIR = ".venvs"


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


def project_name(root: str | os.PathLike[str], override: str | None = None) -> str:
    """The remote directory name for a project: ``override`` (config ``fabfleet.project``)
    or the root's name, made safe as one path component (letters, digits, ``_.-``;
    never starting with a dot, never empty)."""
    name = override or Path(root).name
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")
    return safe or "project"


def work_dir(host: Any) -> str:
    """The host's work dir without a trailing slash (``/`` stays ``/``)."""
    return host.work_dir.rstrip("/") or "/"


def layout(host: Any, project: str) -> dict[str, str]:
    """Remote paths of one project on ``host`` (a :class:`~fabfile.inventory.Host`):
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
