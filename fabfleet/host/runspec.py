"""What a run sends to the host: the runner's spec, and what the runner says back.

Shared by attached runs (:mod:`fabfleet.host.runs`) and detached jobs
(:mod:`fabfleet.host.jobs`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import posixpath
import re
import secrets
import shlex
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config.deadlines import QUICK_COMMAND
from ..config.inventory import Host
from ..config.settings import layout, resolve_project
from ..errors import LocalError, host_errors
from ..hostside import runner
from ..ssh import shell
from ..ssh.exec import execute

_ERR = shell.ERR

# Scripts up to this size travel with the run's spec on the channel's stdin (never on a
# command line); bigger ones are uploaded to the run dir first.
INLINE_LIMIT = 16 * 1024 * 1024
# A directory with no project marker is pushed as the project only while it is small:
# a script run from a cluttered directory must not send gigabytes by surprise.
UNMARKED_MAX_FILES = 2000
UNMARKED_MAX_BYTES = 200 * 1000 * 1000


def new_run_id() -> str:
    """Unique across concurrent runs from several laptops: time, machine, pid, random."""
    machine = re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname().split(".")[0])[:20] or "host"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{machine}-{os.getpid()}-{secrets.token_hex(3)}"


def command_vector(command: str | Sequence[str], shell_string: bool) -> list[str]:
    """What a command runs as: the argument vector as given (each word one argument,
    never re-split), or with ``shell_string`` one string for the host's ``sh -c``."""
    if shell_string:
        if not isinstance(command, str) or not command.strip():
            raise LocalError("a shell command is one non-empty string")
        return ["sh", "-c", command]
    words = [command] if isinstance(command, str) else list(command)
    if not words or not all(isinstance(w, str) for w in words) or not words[0]:
        raise LocalError(f"{command!r}: a command is a non-empty list of strings")
    return words


def run_spec(c, script: Path | None, args: Sequence[str], *, project: str | None,
             script_in_project: str | None, cwd: str, run_id: str | None,
             command: Sequence[str] | None = None, module: str | None = None,
             env: dict[str, str] | None = None):
    """The runner's spec for one run, shared by attached runs and detached jobs:
    ``(spec, layout, run_id, run_dir, project)``. It runs a script (one travelling alone
    goes inside the spec up to :data:`INLINE_LIMIT`, uploaded beyond), a ``command``
    vector, or ``module`` (``python -m``); ``env`` is added to its environment."""
    host: Host = c.fleet_host
    if command is None and module is None and script_in_project is None \
            and not script.is_file():
        raise LocalError(f"{script}: script not found")
    project = project or resolve_project().name
    lay = layout(host, project)
    run_id = run_id or new_run_id()
    run_dir = f"{lay['runs']}/{run_id}"
    spec = {"run_id": run_id, "run_dir": run_dir, "project": project,
            "cwd": posixpath.join(lay["project"], cwd) if cwd not in ("", ".") else lay["project"],
            "work_dir": lay["work_dir"], "args": list(args)}
    if env:
        spec["env"] = dict(env)
    if command is not None:
        spec.update(command=list(command), display=shlex.join(command))
    elif module is not None:
        spec.update(module=module)
    elif script_in_project is not None:
        spec.update(script=f"{lay['project']}/{script_in_project}", script_b64=None)
    else:
        data = script.read_bytes()
        spec.update(script=None, script_name=script.name,
                    script_b64=base64.b64encode(data).decode())
        if len(data) > INLINE_LIMIT:
            upload_script(c, data, run_dir, script.name)
            spec.update(script=f"{run_dir}/{script.name}", script_b64=None)
    return spec, lay, run_id, run_dir, project



class RunnerStderr:
    """The run's stderr callback: the script's stderr goes to ``on_stderr`` live; what
    the runner itself says (after its record-separator marker) is kept apart."""

    def __init__(self, on_stderr: Callable[[bytes], None] | None) -> None:
        self.on_stderr = on_stderr
        self.tail = bytearray()
        self.marker = bytearray()
        self.pending = b""

    def __call__(self, data: bytes) -> None:
        if self.marker:
            self.marker.extend(data)
            return
        if not self.tail and not self.pending and data.startswith(_ERR.encode()):
            self.marker.extend(data)  # the env or interpreter check failed before the runner
            return
        data = self.pending + data
        cut = data.find(b"\x1efabfleet-")
        if cut < 0:
            # a marker may be split across chunks: hold back a possible start of one
            keep = data.rfind(b"\x1e")
            self.pending, data = (data[keep:], data[:keep]) if keep >= 0 and \
                len(data) - keep < 16 else (b"", data)
        else:
            self.marker.extend(data[cut:])
            self.pending, data = b"", data[:cut]
        if data:
            self.tail.extend(data)
            del self.tail[:-8192]
            if self.on_stderr:
                self.on_stderr(data)

    def report(self) -> dict | None:
        text = self.marker.decode("utf-8", "replace")
        _, sep, rest = text.partition(runner.REPORT)
        if not sep:
            return None
        try:
            return json.loads(rest.splitlines()[0])
        except (ValueError, IndexError):
            return None


def upload_script(c, data: bytes, remote_dir: str, name: str) -> None:
    with host_errors(c.fleet_host.name, f"upload {name}"):
        execute(c, shell.sh(f"umask 077 && mkdir -p -- {shell.path(remote_dir)}"),
                timeout=QUICK_COMMAND)
        c.put(io.BytesIO(data), remote=f"{shell.home_relative(remote_dir)}/{name}")
