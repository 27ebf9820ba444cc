"""Mirroring remote output locally, ``[host] ``-prefixed when several hosts speak.

This is the remote program's own output (a script's, a function's prints), which the
user asked to see; the library prints nothing else. It goes to whatever
``sys.stdout``/``sys.stderr`` is *at the time of writing* — a terminal, a pipe, a
notebook's text-only stream, an ``io.StringIO`` under ``redirect_stdout``.
"""

from __future__ import annotations

import codecs
import sys
import threading
from typing import IO


class PrefixedOutput:
    """An output callback ``(host, "stdout"|"stderr", data: bytes)`` for runs and payloads.

    Without ``prefix``, bytes pass straight through to a stream that takes bytes (its
    ``.buffer``); a text-only stream gets text decoded as UTF-8 incrementally, so a
    character split across two chunks stays whole. With ``prefix``, lines are buffered
    per host and stream, so lines of different hosts never interleave mid-line.
    Thread-safe. Call :meth:`flush` at the end to emit unterminated last lines.

    ``stdout``/``stderr`` fix the targets; by default ``sys.stdout``/``sys.stderr`` are
    looked up on every write.
    """

    #: the longest unterminated line held per host and stream; past it, the line is
    #: written out in pieces (each prefixed), so memory stays bounded
    MAX_LINE = 1 << 20

    def __init__(self, prefix: bool, stdout: IO | None = None,
                 stderr: IO | None = None) -> None:
        self.prefix = prefix
        self.streams = {"stdout": stdout, "stderr": stderr}
        self.decoders: dict[tuple[str, str], codecs.IncrementalDecoder] = {}
        self.partial: dict[tuple[str, str], list[str]] = {}
        self.held: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

    def _target(self, stream: str) -> IO:
        return self.streams[stream] or (sys.stdout if stream == "stdout" else sys.stderr)

    def _text(self, host: str, stream: str, data: bytes, final: bool = False) -> str:
        key = (host, stream)
        dec = self.decoders.get(key)
        if dec is None:
            dec = self.decoders[key] = codecs.getincrementaldecoder("utf-8")("replace")
        return dec.decode(data, final)

    def __call__(self, host: str, stream: str, data: bytes) -> None:
        with self.lock:
            target = self._target(stream)
            if not self.prefix:
                raw = getattr(target, "buffer", None)
                if raw is not None and not isinstance(data, str):
                    target.flush()  # keep order with text written to it before
                    raw.write(data)
                    raw.flush()
                else:
                    target.write(data if isinstance(data, str) else
                                 self._text(host, stream, data))
                    target.flush()
                return
            text = data if isinstance(data, str) else self._text(host, stream, data)
            self._prefixed(host, stream, text, target)

    def _prefixed(self, host: str, stream: str, text: str, target: IO) -> None:
        """Whole lines out with their prefix; linear in the size of the output (only the
        new text is searched for newlines; held pieces are joined once)."""
        key = (host, stream)
        pieces = self.partial.setdefault(key, [])
        out = []
        start = 0
        while (nl := text.find("\n", start)) >= 0:
            out.append(f"[{host}] {''.join(pieces)}{text[start:nl]}\n")
            pieces.clear()
            self.held[key] = 0
            start = nl + 1
        if start < len(text):
            pieces.append(text[start:])
            self.held[key] = self.held.get(key, 0) + len(text) - start
            if self.held[key] >= self.MAX_LINE:
                out.append(f"[{host}] {''.join(pieces)}\n")
                pieces.clear()
                self.held[key] = 0
        if out:
            target.write("".join(out))
            target.flush()

    def flush(self) -> None:
        with self.lock:
            for (host, stream), dec in list(self.decoders.items()):
                tail = dec.decode(b"", True)
                if tail:
                    if self.prefix:
                        self.partial.setdefault((host, stream), []).append(tail)
                    else:
                        self._target(stream).write(tail)
            for (host, stream), pieces in self.partial.items():
                if pieces:
                    target = self._target(stream)
                    target.write(f"[{host}] {''.join(pieces)}\n")
                    target.flush()
            self.partial.clear()
            self.held.clear()
            self.decoders.clear()
