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


def _compiled(text, name):
    """``compile(text)``, through a bytecode cache as Python's own ``__pycache__`` is one:
    ``~/.cache/fabfleet/bytecode/`` (0700), one 0600 file per source, Python build and
    optimisation level — used only while the directory and the file are this user's
    to write, so nobody else can have put code there. Saves compiling the runner and its
    modules (~100 kB) on every run; any problem with the cache means compiling."""
    import hashlib
    import marshal
    filename = "<fabfleet %s>" % name
    key = hashlib.sha256(("%s\0%s\0%d\0" % (sys.version, filename, sys.flags.optimize)
                          ).encode() + text.encode("utf-8", "surrogatepass")).hexdigest()
    folder = os.path.join(os.path.expanduser("~"), ".cache", "fabfleet", "bytecode")
    path = os.path.join(folder, key[:40])
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            if _ours(os.fstat(f.fileno())) and _ours(os.stat(folder)):
                return marshal.loads(f.read())
    except (OSError, ValueError, EOFError, TypeError):
        pass
    code = compile(text, filename, "exec")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if _ours(os.stat(folder)):
            tmp = "%s.%d.tmp" % (path, os.getpid())
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(marshal.dumps(code))
                os.rename(tmp, path)
            except OSError:
                os.unlink(tmp)
    except OSError:
        pass
    return code


def _ours(st):
    """Whether only we can have written the file or directory ``st`` describes."""
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _install(modules):
    """The modules shipped with the program (``SHIPS_WITH``), importable by their names."""
    import types
    for name, text in sorted(modules.items()):
        module = types.ModuleType(name)
        exec(_compiled(text, name), module.__dict__)
        sys.modules[name] = module


if __name__ == "__main__":
    _program = _frame()
    _install(_program.get("modules") or {})
    sys.argv = ["-c"] + _program["argv"] + sys.argv[2:]  # [1] is the label `ps` shows
    _code = _compiled(_program["source"], _program["name"])
    FABFLEET_SOURCE = _program["source"]  # a program that copies itself (a batch job's runner)
    del _program
    exec(_code)
