"""Work dirs on hosts: create them (0700, idempotent, with a project's venv if asked)
and clean up what a project's runs left there. Paths come from
:func:`fabfleet.config.settings.layout`."""

from __future__ import annotations

import functools
import io
import os
import posixpath
import zipfile
from pathlib import Path

from ..config.deadlines import INSTALL, QUICK_COMMAND
from ..config.inventory import Host
from ..config.settings import layout
from ..errors import CommandError, LocalError, host_errors
from ..hostside import pip_main
from ..ssh import shell
from ..ssh.connect import sftp_client, sftp_makedirs, sftp_put_private
from ..ssh.exec import execute
from ..ssh.launch import source
from ..ssh.liveness import watched

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
    py = shell.q(host.python)
    pip_zip = f"~/.cache/fabfleet/pip-{_local_pip()[0]}.pyz"
    # One round trip: make the venv (without pip when the host's Python has no
    # ensurepip: python3-venv is a separate package on Debian/Ubuntu), say whether it
    # has pip, and whether our copy of pip is already cached on the host.
    make = (
        f"umask 077 && mkdir -p -- {shell.path(posixpath.dirname(lay['venv']))} && "
        f"{{ [ -x {venv}/bin/python ] || {py} -m venv -- {venv} 2>/dev/null || "
        f"{{ rm -rf -- {venv}; {py} -m venv --without-pip -- {venv}; }} || "
        f"{{ echo {shell.q(_ERR + ' venv')} >&2; exit 98; }}; }} && "
        f"{{ {venv}/bin/python -m pip --version >/dev/null 2>&1 && echo pip=venv || "
        f"{{ [ -f {shell.path(pip_zip)} ] && echo pip=cached || echo pip=none; }}; }}")
    result = execute(c, shell.in_env(host, make, activate=False), timeout=QUICK_COMMAND,
                     action=f"create the venv {lay['venv']}")
    if result.exit_code != 0:
        raise CommandError(host.name, f"could not create the venv {lay['venv']}: "
                           f"{result.stderr.strip()[-800:]}. The host's Python cannot make "
                           "venvs even without pip: point `venv` at an existing one, or "
                           "install python3-venv there.", exit_code=result.exit_code,
                           stderr=result.stderr)
    pip_state = result.stdout.strip().rpartition("pip=")[2]
    # The requirements (and, for a venv without pip, this machine's pip as a zip app:
    # never a download) travel over SFTP, never on a command line.
    with watched(c, "send the requirements"), host_errors(host.name, "send the requirements"):
        sftp = sftp_client(c)
        sftp_put_private(sftp, req.read_bytes(), f"{lay['venv']}/requirements.txt")
        if pip_state == "none":
            sftp_makedirs(sftp, posixpath.dirname(shell.home_relative(pip_zip)))
            sftp_put_private(sftp, _local_pip()[1], pip_zip)
    pip = f"{venv}/bin/python -m pip" if pip_state == "venv" else \
        f"{venv}/bin/python {shell.path(pip_zip)}"
    script = (f"{pip} install --disable-pip-version-check -q "
              f"-r {venv}/requirements.txt")
    result = execute(c, shell.in_env(host, script, activate=False), timeout=timeout,
                     action=f"pip install -r {req.name} in {lay['venv']}")
    if result.exit_code != 0:
        raise CommandError(host.name, f"pip install -r {req.name} in {lay['venv']} failed "
                           f"(exit {result.exit_code}):\n{result.stderr.strip()[-1500:]}\n"
                           "Read pip's message above; fix the requirements or the host's "
                           "network (or ship wheels with the project and use --find-links).",
                           exit_code=result.exit_code, stderr=result.stderr)
    report.update(venv=lay["venv"], installed=str(req))
    return report


@functools.lru_cache(maxsize=1)
def _local_pip() -> tuple[str, bytes]:
    """``(version, zip app)`` of this machine's pip: a venv made without pip installs
    with it (``python pip.pyz install …``), as a host without cloudpickle gets ours."""
    try:
        import pip
    except ImportError:
        raise LocalError("the host's venv has no pip and this machine has none to lend: "
                         "install pip here, or python3-venv on the host") from None
    root = Path(pip.__file__).parent
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("__main__.py", source(pip_main))
        for f in sorted(root.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                z.write(f, f"pip/{f.relative_to(root).as_posix()}")
    return pip.__version__, out.getvalue()
