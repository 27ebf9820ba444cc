"""What travels with a call besides the call: the local cloudpickle (as a zip, for hosts
without the same version), and a remote error report turned back into an exception with
the source lines only this machine has. Used by pooled workers and batch-job calls alike."""

from __future__ import annotations

import functools
import io
import zipfile
from pathlib import Path

import cloudpickle

from ..errors import RemoteError


@functools.lru_cache(maxsize=1)
def cloudpickle_zip() -> bytes:
    """The local cloudpickle package as a zip (sent to hosts without the same version)."""
    pkg = Path(cloudpickle.__file__).parent
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(pkg.glob("*.py")):
            z.write(f, f"cloudpickle/{f.name}")
    return out.getvalue()


def remote_error(host: str, info: dict) -> RemoteError:
    """The worker's error report → :class:`RemoteError`, its traceback completed with the
    source lines this machine has and the host has not (functions sent by value: a
    notebook cell, a project module), as a local traceback shows them."""
    return RemoteError(host, info["type"], info["message"],
                       with_local_source(info["traceback"]))


def with_local_source(text: str) -> str:
    """Add, under each ``File "…", line N`` of ``text`` that has no source line, the
    line from the local file (``linecache``, which also knows notebook cells)."""
    import linecache
    lines = text.splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        out.append(line)
        stripped = line.strip()
        if not stripped.startswith('File "') or ", line " not in stripped:
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if nxt.startswith("    "):
            continue  # the host had the source
        try:
            name = stripped[6:stripped.index('", line ')]
            lineno = int(stripped.split(", line ", 1)[1].split(",", 1)[0])
        except ValueError:
            continue
        source_line = linecache.getline(name, lineno).strip()
        if source_line:
            out.append(f"    {source_line}")
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")
