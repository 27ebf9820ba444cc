"""The ``fabfleet`` command's front door: ``--list``, ``--version`` and ``TASK --help``
without Invoke,
other tasks through the connection keeper (:mod:`.keeper`) when there is one.

Importing Invoke (and, through it, ``unittest.mock`` and asyncio) costs more than a
hundred milliseconds, while what ``fabfleet --list`` and ``fabfleet TASK --help`` print
depends only on fabfleet's own task definitions and the terminal's width. So their text
is kept, once printed by the real program (:mod:`.program`), in the user's cache
(``$XDG_CACHE_HOME/fabfleet/help/``, 0700, files 0600) under a key made of fabfleet's
version, the task modules' sizes and modification times, the arguments and the width;
the next call prints it straight from there. Anything else — and any cache file that is
not ours alone — goes to the real program.
"""

import hashlib
import os
import sys

_HELP = ("--help", "-h")
_SOURCES = ("tasks.py", "options.py", "program.py")


def _cacheable(args):
    if args in (["--list"], ["-l"], ["--help"], ["-h"], ["--version"], ["-V"]):
        return True
    return len(args) == 2 and args[1] in _HELP and not args[0].startswith("-")


def _width():
    """The width Invoke's help uses: the terminal's (TIOCGWINSZ on stdout), else 80."""
    try:
        import fcntl
        import struct
        import termios
        rows_cols = fcntl.ioctl(sys.stdout.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
        cols = struct.unpack("hhhh", rows_cols)[1]
        return cols or 80
    except (OSError, ValueError, AttributeError, ImportError):
        return 80


def _cache_file(args):
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        stamps = [os.stat(os.path.join(here, name)) for name in _SOURCES]
    except OSError:
        return None
    from .. import __version__
    key = repr((__version__, [(s.st_size, s.st_mtime_ns) for s in stamps], args,
                _width(), sys.version_info[:2], _invoke_config()))
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fabfleet", "help",
                        hashlib.sha256(key.encode()).hexdigest()[:32] + ".txt")


def _invoke_config():
    """What could change the listing (``tasks.auto_dash_names`` …): every Invoke config
    file the program may load (the project's, up from here; the user's; the system's)
    with its size and time, and the ``INVOKE_*`` variables."""
    names = ("invoke.yaml", "invoke.yml", "invoke.json", "invoke.py")
    dirs, d = [], os.getcwd()
    while True:
        dirs.append(d)
        up = os.path.dirname(d)
        if up == d:
            break
        d = up
    found = []
    candidates = [os.path.join(x, n) for x in dirs for n in names]
    candidates += [os.path.join(os.path.expanduser("~"), "." + n) for n in names]
    candidates += [os.path.join("/etc", n) for n in names]
    for p in candidates:
        try:
            st = os.stat(p)
        except OSError:
            continue
        found.append((p, st.st_size, st.st_mtime_ns))
    return found, sorted((k, v) for k, v in os.environ.items() if k.startswith("INVOKE_"))


def _ours(path):
    """Whether ``path`` (and its directory) belong to us alone: no other user wrote it."""
    try:
        for p in (os.path.dirname(path), path):
            st = os.lstat(p)
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                return False
        return True
    except OSError:
        return False


def _read(path):
    if path is None or not _ours(path):
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _write(path, data):
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        st = os.lstat(os.path.dirname(path))
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            return  # a cache dir someone else could write (or read): not used
        tmp = "%s.%d.tmp" % (path, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
    except OSError:
        pass


def main():
    """Console-script entry point."""
    args = sys.argv[1:]
    from . import keeper
    if keeper.wanted(args):
        code = keeper.run(sys.argv)  # None: no keeper here (busy, off, not ours)
        if code is not None:
            sys.exit(code)
    path = _cache_file(args) if _cacheable(args) else None
    text = _read(path)
    if text is not None:
        try:
            sys.stdout.buffer.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    from .program import main as real
    if path is None:
        return real()
    import io
    buf = io.StringIO()
    out, sys.stdout = sys.stdout, _Tee(sys.stdout, buf)
    code = 0
    try:
        real()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    finally:
        sys.stdout = out
        if code == 0 and buf.getvalue():
            _write(path, buf.getvalue().encode("utf-8"))


class _Tee(object):
    """Writes go to the real stdout and to a buffer (to be cached)."""

    def __init__(self, real, copy):
        self.real, self.copy = real, copy

    def write(self, text):
        self.copy.write(text)
        return self.real.write(text)

    def __getattr__(self, name):
        return getattr(self.real, name)


if __name__ == "__main__":
    main()
