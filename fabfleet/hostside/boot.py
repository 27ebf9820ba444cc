"""The only program on a host's command line: it reads the real one from stdin.

Run as ``python -c BOOT fabfleet-NAME [ARG]`` (see :mod:`fabfleet.ssh.launch`; the label
is for ``ps``, a further argument is passed on). Everything that could be
large or secret — a host-side program's source, its arguments, an inline script, a
spec — arrives on the channel's stdin as one frame, ``LENGTH\\n`` then ``LENGTH`` bytes
of JSON ``{"name": …, "source": …, "argv": […], "modules": {name: source}}``, so no other user of the host sees it
in ``/proc/PID/cmdline`` and no size limit of the kernel's argument list applies.

It reads exactly the frame (unbuffered reads of descriptor 0), so whatever follows on
stdin is left for the program: the payload worker's calls, the runner's heartbeats.
The program then runs as ``__main__`` in this module's namespace, with the current
directory (the home dir, over SSH) dropped from ``sys.path`` first: a stray ``~/json.py``
must never shadow the standard library.
"""

import os
import sys

if sys.path and sys.path[0] in ("", "."):
    del sys.path[0]


def _read_exactly(n):
    chunks, left = [], n
    while left:
        chunk = os.read(0, min(left, 1 << 20))
        if not chunk:
            sys.stderr.write("\x1efabfleet-error: boot: the program did not arrive on stdin "
                             "(the connection closed)\n")
            sys.exit(95)
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _frame():
    head = b""
    while not head.endswith(b"\n") and len(head) < 24:
        head += _read_exactly(1)
    import json
    return json.loads(_read_exactly(int(head)).decode("utf-8"))


def _install(modules):
    """The modules shipped with the program (``SHIPS_WITH``), importable by their names."""
    import types
    for name, text in sorted(modules.items()):
        module = types.ModuleType(name)
        exec(compile(text, "<fabfleet %s>" % name, "exec"), module.__dict__)
        sys.modules[name] = module


if __name__ == "__main__":
    _program = _frame()
    _install(_program.get("modules") or {})
    sys.argv = ["-c"] + _program["argv"] + sys.argv[2:]  # [1] is the label `ps` shows
    _code = compile(_program["source"], "<fabfleet %s>" % _program["name"], "exec")
    FABFLEET_SOURCE = _program["source"]  # a program that copies itself (a batch job's runner)
    del _program
    exec(_code)
