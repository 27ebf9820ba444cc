"""The ``fabfleet`` command's side of the connection keeper (like ssh's ControlPersist).

A command to hosts shakes hands with each (two to five round trips, plus the ~250 ms
it takes to import Fabric, Paramiko and Invoke). So that a second command within a
minute pays neither, ``fabfleet TASK …`` hands itself to a per-user keeper process
(:mod:`.keeper_server`) that has everything imported and keeps the connections of
earlier commands open for ``FABFLEET_PERSIST`` seconds (default 60; ``0`` turns it
off) after the last command ends. The command still runs as the user's own: the
keeper gets this process's stdin, stdout and stderr (the descriptors themselves, so
the terminal, pipes and files are the same), its arguments, working directory,
environment and umask; Ctrl-C here interrupts it there; its exit code is this
process's.

Owner-only, as ssh's control sockets: the socket lives in
``$XDG_CACHE_HOME/fabfleet/keep/`` (0700; not used if anyone else could write it), and
each side checks that the other runs as this user (``SO_PEERCRED``). Its name is a hash
of fabfleet's version, source files, the Python running it and the idle time, so an
upgraded fabfleet never talks to an old keeper. A keeper that is busy with another
command, cannot start or is not ours means the command runs here, in this process, as
it would without one. This module imports nothing heavy: it is on every command's path.
"""

import hashlib
import json
import os
import socket
import struct
import sys
import time

ENV = "FABFLEET_PERSIST"
DEFAULT_IDLE = 60.0
#: seconds a new keeper has to start listening before the command runs here instead
START_TIMEOUT = 15.0
#: tasks that never go to the keeper: local, or nothing to keep
LOCAL_TASKS = {"init", "disconnect", "hosts"}
_MAX_FRAME = 1 << 24


def idle_seconds():
    """``FABFLEET_PERSIST`` as seconds (0: off)."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "yes", "on", "true"):
        return DEFAULT_IDLE
    if value in ("no", "off", "false"):
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        return DEFAULT_IDLE


def wanted(args):
    """Whether ``fabfleet ARGS`` goes to the keeper: a task (no core flags before it)
    that reaches hosts, with the keeper not turned off."""
    return bool(args) and not args[0].startswith("-") and args[0] not in LOCAL_TASKS \
        and "--help" not in args and "-h" not in args[:2] and idle_seconds() > 0


def private_dir():
    """The keeper's directory (made 0700), or None if it is not ours alone."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(root, "fabfleet", "keep")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return None
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not os.path.isdir(path) or \
            os.path.islink(path):
        return None
    return path


def socket_path():
    """Where this fabfleet's keeper listens (None: no place for one)."""
    d = private_dir()
    if d is None:
        return None
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stamps = []
    for root, dirs, files in os.walk(here):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                st = os.stat(os.path.join(root, name))
                stamps.append((name, st.st_size, st.st_mtime_ns))
    from .. import __version__
    key = repr((__version__, here, sys.executable, stamps))
    path = os.path.join(d, hashlib.sha256(key.encode()).hexdigest()[:16] + ".sock")
    return path if len(path.encode()) < 100 else None  # sun_path holds 108 bytes


def peer_is_us(sock):
    """Whether the other end of Unix socket ``sock`` runs as this user."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def send_frame(sock, doc, fds=()):
    data = json.dumps(doc).encode()
    payload = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(sock, [payload], list(fds))
    else:
        sock.sendall(payload)


def recv_frame(sock, with_fds=0):
    """One frame (and up to ``with_fds`` descriptors sent with its first bytes), or
    (None, []) at end of stream."""
    fds = []
    if with_fds:
        first, fds, _flags, _addr = socket.recv_fds(sock, 4, with_fds)
    else:
        first = sock.recv(4)
    head = _exactly(sock, first, 4)
    if head is None:
        return None, fds
    size = struct.unpack("!I", head)[0]
    if size > _MAX_FRAME:
        raise OSError("frame too large")
    body = _exactly(sock, b"", size)
    return (None if body is None else json.loads(body)), fds


def _exactly(sock, got, n):
    while len(got) < n:
        more = sock.recv(n - len(got))
        if not more:
            return None
        got += more
    return got


def _connect(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        if peer_is_us(sock):
            return sock
    except OSError:
        pass
    sock.close()
    return None


def _start(path, idle):
    """Start a keeper for ``path`` (detached: its own session, no terminal)."""
    import subprocess
    log = os.path.join(os.path.dirname(path), "keeper.log")
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError:
        fd = subprocess.DEVNULL
    try:
        subprocess.Popen([sys.executable, "-m", "fabfleet.cli.keeper_server", path, repr(idle)],
                         stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, close_fds=True,
                         start_new_session=True, cwd="/")
    except OSError:
        return False
    finally:
        if fd != subprocess.DEVNULL:
            os.close(fd)
    return True


def run(argv):
    """Run ``argv`` (``sys.argv``) in the keeper: its exit code, or None to run it here."""
    idle = idle_seconds()
    path = socket_path()
    if path is None:
        return None
    sock = _connect(path)
    if sock is None:
        if not _start(path, idle):
            return None
        deadline = time.monotonic() + START_TIMEOUT
        while sock is None and time.monotonic() < deadline:
            time.sleep(0.01)
            sock = _connect(path)
        if sock is None:
            return None
    with sock:
        return _converse(sock, argv)


def _converse(sock, argv):
    import signal
    mask = os.umask(0o022)
    os.umask(mask)
    request = {"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ),
               "umask": mask, "pid": os.getpid(), "idle": idle_seconds()}
    try:
        send_frame(sock, request, fds=(0, 1, 2))
    except OSError:
        return None  # it went away (idle timeout) as we came: run here

    def interrupt(signum, frame):
        try:
            sock.sendall(b"I")
        except OSError:
            pass
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    try:
        reply, _ = recv_frame(sock)  # a signal's handler above runs; the read goes on
    except OSError:
        reply = None
    if reply is None:
        sys.stderr.write("fabfleet: the connection keeper stopped in the middle of the "
                         "command (its log: %s); run it again, or with %s=0 to run it "
                         "without one\n" % (os.path.join(private_dir() or "?", "keeper.log"),
                                            ENV))
        return 255
    if reply.get("busy"):
        return None
    return int(reply.get("exit", 1))


def stop():
    """Stop every keeper of this user (``fabfleet disconnect``): the hosts whose kept
    connections they close."""
    d = private_dir()
    names = []
    for entry in sorted(os.listdir(d)) if d else []:
        if not entry.endswith(".sock"):
            continue
        sock = _connect(os.path.join(d, entry))
        if sock is None:
            continue
        with sock:
            try:
                send_frame(sock, {"stop": True}, fds=(0, 1, 2))
                reply, _ = recv_frame(sock)
            except OSError:
                continue
        names += (reply or {}).get("kept", [])
    return sorted(set(names))
