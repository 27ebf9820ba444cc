"""Mirroring remote output locally, whole lines at a time, ``[host] ``-prefixed when
several hosts speak at once. This is the remote program's own output (a script's, a
function's prints), which the user asked to see; the library prints nothing else."""

from __future__ import annotations

import sys
import threading
from typing import BinaryIO


class PrefixedOutput:
    """An output callback ``(host, "stdout"|"stderr", data)`` for runs and payloads.

    Without ``prefix`` data passes straight through; with it, lines are buffered per
    host and stream so lines of different hosts never interleave mid-line. Thread-safe.
    Call :meth:`flush` at the end to emit unterminated last lines.
    """

    def __init__(self, prefix: bool, stdout: BinaryIO | None = None,
                 stderr: BinaryIO | None = None) -> None:
        self.prefix = prefix
        self.streams = {"stdout": stdout, "stderr": stderr}
        self.partial: dict[tuple[str, str], bytes] = {}
        self.lock = threading.Lock()

    def _out(self, stream: str) -> BinaryIO:
        return self.streams[stream] or (sys.stdout.buffer if stream == "stdout"
                                        else sys.stderr.buffer)

    def __call__(self, host: str, stream: str, data: bytes) -> None:
        with self.lock:
            out = self._out(stream)
            if not self.prefix:
                out.write(data)
                out.flush()
                return
            *lines, rest = (self.partial.get((host, stream), b"") + data).split(b"\n")
            self.partial[(host, stream)] = rest
            if lines:
                tag = b"[%s] " % host.encode()
                out.write(b"".join(tag + line + b"\n" for line in lines))
                out.flush()

    def flush(self) -> None:
        with self.lock:
            for (host, stream), rest in self.partial.items():
                if rest:
                    out = self._out(stream)
                    out.write(b"[%s] %s\n" % (host.encode(), rest))
                    out.flush()
            self.partial.clear()
