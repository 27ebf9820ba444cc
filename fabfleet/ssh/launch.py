"""The one launcher of host-side Python: a module of :mod:`fabfleet.hostside`, sent as its
own source, run by the host's interpreter inside the host's environment.

Every program fabfleet runs on a host (the runner, the payload worker, the environment
probe, the app launchers) starts through :func:`python_command`, so they all see the
same ``env`` vars, venv or conda env (or the project's venv) and fail the same way when
the interpreter is missing (exit 127) or the env does not activate (exit 97).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from ..config.inventory import Host
from ..hostside import batch, boot, gpus, worker
from . import shell


@functools.lru_cache(maxsize=None)
def _source(path: str) -> str:
    return Path(path).read_text()


def source(module: ModuleType) -> str:
    """The module's own source text, as shipped to hosts (read once per process)."""
    return _source(module.__file__)


def frame(module: ModuleType, args: Sequence[str]) -> bytes:
    """What :mod:`fabfleet.hostside.boot` reads on stdin: the program's source, its
    arguments and the modules it ships with, as one length-prefixed JSON frame."""
    name = module.__name__.rsplit(".", 1)[-1]
    body = json.dumps({"name": name, "source": source(module), "argv": list(args),
                       "modules": shipped_with(module)}).encode()
    return b"%d\n" % len(body) + body


def shipped_with(module: ModuleType) -> dict[str, str]:
    """``{"fabfleet_NAME": source}`` for the host-side modules ``module`` names in its
    ``SHIPS_WITH``: they travel in its frame and import as ``fabfleet_NAME`` there."""
    return {f"fabfleet_{name}": source(SHIPPABLE[name])
            for name in getattr(module, "SHIPS_WITH", ())}


#: Host-side modules other host-side programs may ship with (``SHIPS_WITH``).
SHIPPABLE = {"gpus": gpus, "batch": batch, "worker": worker}


def python_command(host: Host, module: ModuleType, args: Sequence[str] = (), *,
                   project: str | None = None, unbuffered: bool = False,
                   report_env_error: bool = False) -> shell.Remote:
    """The remote command that runs ``module`` on ``host`` inside the host's environment
    (see :func:`fabfleet.ssh.shell.in_env` for ``project``, whose venv, and
    ``report_env_error``, the probe's mode: the activation's error message is passed as
    the last argument).

    The command line holds only ``PYTHON -c BOOT fabfleet-NAME`` (:mod:`fabfleet.hostside.boot`,
    and a label for ``ps``); the program and ``args`` follow on stdin. A module with ``ISOLATED = True`` (standard
    library only, nothing of the user's to import) runs with ``python -I``."""
    flags = ("-I " if getattr(module, "ISOLATED", False) else "") + ("-u " if unbuffered else "")
    tail = ' "$fabfleet_env_err"' if report_env_error else ""  # the probe reports it
    label = "fabfleet-" + module.__name__.rsplit(".", 1)[-1]  # what `ps` shows: harmless
    return shell.in_env(host, f"exec {shell.q(host.python)} {flags}-c {shell.q(source(boot))} "
                        f"{label}{tail}", project=project, report_env_error=report_env_error,
                        stdin=frame(module, args))


def file_of(module: ModuleType) -> Path:
    """The module's file, for programs started as a detached job's script."""
    return Path(module.__file__)
