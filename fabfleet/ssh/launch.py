"""The one launcher of host-side Python: a module of :mod:`fabfleet.hostside`, sent as its
own source, run by the host's interpreter inside the host's environment.

Every program fabfleet runs on a host (the runner, the payload worker, the environment
probe, the app launchers) starts through :func:`python_command`, so they all see the
same ``env`` vars, venv or conda env (or the project's venv) and fail the same way when
the interpreter is missing (exit 127) or the env does not activate (exit 97).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from ..config.inventory import Host
from . import shell


@functools.lru_cache(maxsize=None)
def _source(path: str) -> str:
    return Path(path).read_text()


def source(module: ModuleType) -> str:
    """The module's own source text, as shipped to hosts (read once per process)."""
    return _source(module.__file__)


def python_command(host: Host, module: ModuleType, args: Sequence[str] = (), *,
                   project: str | None = None, unbuffered: bool = False,
                   report_env_error: bool = False) -> str:
    """``sh -c '<env prefix> exec PYTHON [-u] -c SOURCE ARGS…'`` for ``module`` on
    ``host``; every argument quoted. See :func:`fabfleet.ssh.shell.in_env` for
    ``project`` (whose venv) and ``report_env_error`` (the probe's mode: the activation's
    error message is passed as the last argument)."""
    flags = "-u " if unbuffered else ""
    tail = ' "$fabfleet_env_err"' if report_env_error else ""  # the probe reports it
    return shell.in_env(host, f"exec {shell.q(host.python)} {flags}-c {shell.q(source(module))} "
                        + shell.join(args) + tail, project=project,
                        report_env_error=report_env_error)


def file_of(module: ModuleType) -> Path:
    """The module's file, for programs started as a detached job's script."""
    return Path(module.__file__)
