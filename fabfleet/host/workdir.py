"""Work dirs on hosts: create them (0700, idempotent, with a project's venv if asked)
and clean up what a project's runs left there. Paths come from
:func:`fabfleet.config.settings.layout`."""

from __future__ import annotations

import base64
import os
import posixpath
from pathlib import Path

from ..config.deadlines import INSTALL, QUICK_COMMAND, TREE_COMMAND
from ..config.inventory import Host
from ..config.settings import layout
from ..errors import CommandError, LocalError
from ..ssh import shell
from ..ssh.exec import execute

_ERR = shell.ERR


def setup_workdir(c, *, project: str | None = None,
                  requirements: str | os.PathLike[str] | None = None,
                  timeout: float = INSTALL) -> dict:
    """Create the work dir (0700) and, for ``project``, its run dir; idempotent.

    With ``requirements`` (a local requirements.txt), also make the project's venv
    ``<work_dir>/.venvs/<project>`` (if missing) and ``pip install -r`` into it; that
    project's runs and payloads then use it unless the inventory names a ``venv`` or
    ``conda_env``. Returns ``{"work_dir", "venv", "installed"}``.
    """
    host: Host = c.fleet_host
    if requirements is not None and not project:
        raise LocalError("setup_workdir: requirements need a project (the venv is per project)")
    lay = layout(host, project or "")
    dirs = [lay["work_dir"]] + ([lay["all_runs"], lay["runs"]] if project else [])
    quoted = " ".join(shell.path(d) for d in dirs)
    script = (f"mkdir -p -- {quoted} && chmod 700 -- {quoted} && "
              f"cd -- {shell.path(lay['work_dir'])} && pwd")
    result = execute(c, shell.sh(script), timeout=QUICK_COMMAND,
                     action=f"create {lay['work_dir']}")
    if result.exit_code != 0:
        raise CommandError(host.name, f"could not create work dir {lay['work_dir']}: "
                           f"{result.stderr.strip()}. Set `work_dir` in the inventory to a "
                           "directory the user can write.", exit_code=result.exit_code,
                           stderr=result.stderr)
    report = {"work_dir": result.stdout.strip(), "venv": None, "installed": None}
    if requirements is None:
        return report
    req = Path(requirements)
    if not req.is_file():
        raise LocalError(f"{req}: requirements file not found")
    venv = shell.path(lay["venv"])
    blob = base64.b64encode(req.read_bytes()).decode()
    py = shell.q(host.python)
    script = (
        f"umask 077 && mkdir -p -- {shell.path(posixpath.dirname(lay['venv']))} && "
        f"{{ [ -x {venv}/bin/python ] || {py} -m venv -- {venv} || "
        f"{{ echo {shell.q(_ERR + ' venv')} >&2; exit 98; }}; }} && "
        f"printf %s {shell.q(blob)} | base64 -d > {venv}/requirements.txt && "
        f"{venv}/bin/python -m pip install --disable-pip-version-check -q "
        f"-r {venv}/requirements.txt")
    result = execute(c, shell.sh(script), timeout=timeout,
                     action=f"create the venv and pip install -r {req.name}")
    if result.exit_code != 0:
        hint = ("the host's Python cannot make venvs: install python3-venv there "
                "(Debian/Ubuntu) or point `venv` at an existing one"
                if _ERR + " venv" in result.stderr else
                "read pip's message above; fix the requirements or the host's network")
        raise CommandError(host.name, f"setting up {lay['venv']} failed (exit "
                           f"{result.exit_code}):\n{result.stderr.strip()[-1500:]}\n{hint}.",
                           exit_code=result.exit_code, stderr=result.stderr)
    report.update(venv=lay["venv"], installed=str(req))
    return report


def clean(c, project: str, *, code: bool = False, venv: bool = False,
          all_projects: bool = False) -> list[str]:
    """Remove ``project``'s run dirs on the host (``<work_dir>/.runs/<project>``); with
    ``code`` its pushed copy, with ``venv`` its venv, with ``all_projects`` the run dirs
    of every project. Other projects' files are never touched otherwise. Returns the
    remote paths removed."""
    host: Host = c.fleet_host
    lay = layout(host, project)
    targets = [lay["all_runs"] if all_projects else lay["runs"]]
    targets += [lay["project"]] if code else []
    targets += [lay["venv"]] if venv else []
    script = "rm -rf -- " + " ".join(shell.path(t) for t in targets)
    result = execute(c, shell.sh(script), timeout=TREE_COMMAND, action="clean the work dir")
    if result.exit_code != 0:
        raise CommandError(host.name, f"clean failed: {result.stderr.strip()[-500:]}",
                           exit_code=result.exit_code, stderr=result.stderr)
    return targets
