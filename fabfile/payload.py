"""Pickled payloads: run Python functions on hosts and get their values back.

One SSH connection per host and long-lived remote workers (up to ``max_jobs`` per host)
that read framed pickles over one channel each, so a warm call costs one channel round
trip (well under a millisecond of our own overhead), not a connection or an interpreter.

Wire format, both ways: ``kind (1 byte) + length (8 bytes, big-endian) + data``.

=====  =========  ===========================================================
kind   direction  meaning
=====  =========  ===========================================================
``H``  ← worker   hello: JSON {python, implementation, cloudpickle}
``N``  ← worker   needs cloudpickle: the next ``Z`` frame carries it
``Z``  → worker   a zip of the local cloudpickle package (cached on the host)
``C``  → worker   a call: ``cloudpickle.dumps((fn, args, kwargs))``
``A``  ← worker   the call arrived (a worker dying before this is safely replaced)
``O``  ← worker   what the function wrote to ``sys.stdout``, as it writes it
``V``  ← worker   the value: ``cloudpickle.dumps(value)``
``E``  ← worker   the function raised: JSON {type, message, traceback} — text, never
                  a pickled exception (which may not unpickle here)
=====  =========  ===========================================================

The function's ``sys.stderr`` (and anything written to file descriptors 1 and 2)
arrives as the channel's stderr. Unpickling a value trusts the host it came from.
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import os
import pickle
import collections
import select
import struct
import sys
import sysconfig
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle

from . import shell
from .errors import (CommandError, ConnectError, FanOutError, FleetError, HostError,
                     LocalError, PythonMismatchError, RemoteError, TransferError, host_errors)
from .inventory import Host

Output = Callable[[str, str, bytes], None]  # (host, "stdout"|"stderr", data)
_HEADER = struct.Struct(">cQ")
PAYLOAD_MAGIC = b"FABFLEET-PAYLOAD-1\n"

WORKER = r'''
import json, os, struct, sys, traceback
H = struct.Struct(">cQ")
proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
os.dup2(2, 1)                      # stray writes to fd 1 must not corrupt the protocol
devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(devnull, 0)
def send(kind, data):
    proto_out.write(H.pack(kind, len(data)) + data)
def recv():
    head = b""
    while len(head) < H.size:
        chunk = proto_in.read(H.size - len(head))
        if not chunk:
            sys.exit(0)
        head += chunk
    kind, n = H.unpack(head)
    parts, got = [], 0
    while got < n:
        chunk = proto_in.read(min(n - got, 1 << 20))
        if not chunk:
            sys.exit(0)
        parts.append(chunk)
        got += len(chunk)
    return kind, b"".join(parts)
want, cache = sys.argv[1], os.path.expanduser(sys.argv[2])
if os.path.isdir(cache):
    sys.path.insert(0, cache)
try:
    import cloudpickle
    have = cloudpickle.__version__
except ImportError:
    have = None
if have != want:
    send(b"N", b"")
    kind, blob = recv()
    import io, shutil, tempfile, zipfile
    parent = os.path.dirname(cache)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700)
    tmp = tempfile.mkdtemp(dir=parent)
    zipfile.ZipFile(io.BytesIO(blob)).extractall(tmp)
    try:
        os.rename(tmp, cache)
    except OSError:                # another worker won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    sys.path.insert(0, cache)
    for name in [m for m in sys.modules if m == "cloudpickle" or m.startswith("cloudpickle.")]:
        del sys.modules[name]
    import cloudpickle
import platform, pickle
send(b"H", json.dumps({"python": list(sys.version_info[:3]),
                       "implementation": platform.python_implementation(),
                       "executable": sys.executable,
                       "cloudpickle": cloudpickle.__version__}).encode())
class Out(object):
    """sys.stdout for the function: whole lines go out as they are printed."""
    encoding = "utf-8"
    errors = "replace"
    def __init__(self):
        self.buf = []
    def write(self, s):
        self.buf.append(s)
        if "\n" in s:
            self.flush()
        return len(s)
    def flush(self):
        if self.buf:
            send(b"O", "".join(self.buf).encode("utf-8", "replace"))
            self.buf = []
    def isatty(self):
        return False
    def writable(self):
        return True
while True:
    kind, blob = recv()
    send(b"A", b"")                # got it: from here on the call may have effects
    try:
        fn, args, kwargs = pickle.loads(blob)
        blob = None
        sys.stdout = out = Out()
        try:
            value = fn(*args, **kwargs)
        finally:
            out.flush()
            sys.stdout = sys.__stdout__
        data = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:
        send(b"E", json.dumps({"type": type(exc).__module__ + "." + type(exc).__qualname__
                               if type(exc).__module__ not in ("builtins", "exceptions")
                               else type(exc).__name__,
                               "message": str(exc),
                               "traceback": traceback.format_exc()}).encode())
        continue
    send(b"V", data)
'''


# -- payload files ---------------------------------------------------------------------
def dumps_call(fn: Callable, *args: Any, **kwargs: Any) -> bytes:
    """``cloudpickle`` the call; functions from the user's own modules go by value
    (the host does not have those modules), library ones by reference."""
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    if module is not None and _is_user_module(module):
        cloudpickle.register_pickle_by_value(module)
        try:
            return cloudpickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            cloudpickle.unregister_pickle_by_value(module)
    try:
        return cloudpickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - cloudpickle raises many kinds
        raise LocalError(f"cannot pickle the call to {getattr(fn, '__qualname__', fn)!r}: "
                         f"{type(exc).__name__}: {exc}. Arguments and closures must be "
                         "picklable (no open files, sockets, locks).") from exc


def _is_user_module(module) -> bool:
    """A module of the user's project (not stdlib, not installed): pickle it by value."""
    name = module.__name__
    if name == "__main__" or name.split(".")[0] in ("fabfile", "cloudpickle"):
        return False
    path = getattr(module, "__file__", None)
    if not path:
        return False
    path = os.path.realpath(path)
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return not any(path.startswith(os.path.realpath(r) + os.sep) for r in roots)


def save_payload(path: str | os.PathLike[str], fn: Callable, *args: Any, **kwargs: Any) -> Path:
    """Write a payload file for ``inv run-pickle``: the call ``fn(*args, **kwargs)``."""
    path = Path(path)
    path.write_bytes(PAYLOAD_MAGIC + dumps_call(fn, *args, **kwargs))
    return path


def load_payload_bytes(path: str | os.PathLike[str]) -> bytes:
    """The pickled call inside a payload file (not unpickled here)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LocalError(f"{path}: cannot read the payload: {exc.strerror}") from None
    if not data.startswith(PAYLOAD_MAGIC):
        raise LocalError(f"{path}: not a fabfleet payload; make one with "
                         "fabfile.save_payload(path, fn, *args, **kwargs)")
    return data[len(PAYLOAD_MAGIC):]


# -- one remote worker -----------------------------------------------------------------
class WorkerDied(Exception):
    """The worker's channel ended (internal; becomes a HostError for the caller).

    ``kind`` is ``python`` (interpreter missing), ``env`` (env did not activate),
    ``lost`` (connection gone) or ``died`` (the process ended).
    """

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(reason)


@dataclass
class _Hello:
    python: tuple[int, int, int]
    implementation: str
    executable: str
    cloudpickle: str


class Worker:
    """One remote interpreter on one channel; one call at a time."""

    def __init__(self, c, timeout: float, project: str | None = None) -> None:
        self.c = c
        self.host: Host = c.fleet_host
        self.buf = bytearray()
        self.stderr_tail = bytearray()
        self.on_output: Output | None = None
        with host_errors(self.host.name, f"start a Python worker with {self.host.python}"):
            c.open()
            self.chan = c.client.get_transport().open_session(timeout=timeout)
            cache = f"~/.cache/fabfleet/cloudpickle-{cloudpickle.__version__}"
            py = shell.q(self.host.python)
            # The same env as runs: env vars, venv/conda env or the project's venv.
            self.chan.exec_command(shell.sh(
                shell.env_prefix(self.host, project) + f"exec {py} -u -c {shell.q(WORKER)} "
                f"{shell.q(cloudpickle.__version__)} {shell.q(cache)} fabfleet-worker"))
        kind, data = self._read_frame(deadline=time.monotonic() + timeout)
        if kind == b"N":
            self._send(b"Z", _cloudpickle_zip())
            kind, data = self._read_frame(deadline=time.monotonic() + timeout)
        if kind != b"H":
            raise CommandError(self.host.name, f"the worker sent {kind!r} instead of hello")
        info = json.loads(data)
        self.hello = _Hello(tuple(info["python"]), info["implementation"], info["executable"],
                            info["cloudpickle"])

    @property
    def alive(self) -> bool:
        return not self.chan.closed and self.chan.get_transport().is_active()

    def _send(self, kind: bytes, data: bytes) -> None:
        with host_errors(self.host.name, "send data to the worker"):
            self.chan.sendall(_HEADER.pack(kind, len(data)))
            # Not chan.sendall(data): it re-slices the remaining bytes after every
            # 32 KiB packet, which is quadratic (32 MB took 2 s; this takes 0.2 s).
            view, off = memoryview(data), 0
            while off < len(view):
                sent = self.chan.send(view[off:off + (1 << 20)])
                if sent == 0:
                    raise EOFError("the worker's channel closed while sending")
                off += sent

    def _drain_stderr(self) -> None:
        while self.chan.recv_stderr_ready():
            data = self.chan.recv_stderr(1 << 16)
            self.stderr_tail.extend(data)
            del self.stderr_tail[:-8192]
            if self.on_output:
                self.on_output(self.host.name, "stderr", data)

    def _read_frame(self, deadline: float | None = None) -> tuple[bytes, bytes]:
        """Next frame other than ``O`` (those go to the output callback)."""
        chan = self.chan
        while True:
            while len(self.buf) >= _HEADER.size:
                kind, n = _HEADER.unpack_from(self.buf)
                if len(self.buf) < _HEADER.size + n:
                    break
                data = bytes(self.buf[_HEADER.size:_HEADER.size + n])
                del self.buf[:_HEADER.size + n]
                if kind == b"O":
                    if self.on_output:
                        self.on_output(self.host.name, "stdout", data)
                    continue
                return kind, data
            self._drain_stderr()
            if chan.recv_ready():
                with host_errors(self.host.name, "read from the worker"):
                    self.buf.extend(chan.recv(1 << 20))
                continue
            if chan.closed or chan.eof_received or not chan.get_transport().is_active():
                self._drain_stderr()
                raise WorkerDied(*self._death_reason())
            if deadline is not None and time.monotonic() > deadline:
                raise CommandError(self.host.name, "the Python worker did not start in time; "
                                   "the host may be overloaded")
            select.select([chan], [], [], 0.5)

    def _death_reason(self) -> tuple[str, str]:
        # OpenSSH sends EOF, then exit-status, then close: give the status a moment.
        self.chan.status_event.wait(2)
        self._drain_stderr()
        code = self.chan.exit_status
        tail = self.stderr_tail.decode("utf-8", "replace").strip()
        if code == 127 or "fabfleet-error: python" in tail:
            return "python", f"Python interpreter {self.host.python!r} was not found on the host"
        if code == 97:
            return "env", f"the host's environment did not activate: {tail[-500:]}"
        if not self.chan.get_transport().is_active():
            return "lost", "the connection was lost (the host went down or dropped the session)"
        how = f"exited with code {code}" if code != -1 else "was killed by a signal"
        return "died", f"the Python worker {how}" + (f": {tail[-800:]}" if tail else "")

    def call(self, blob: bytes, on_output: Output | None) -> Any:
        self.on_output = on_output
        self.stderr_tail.clear()
        self.acked = False
        self._send(b"C", blob)
        kind, data = self._read_frame()
        if kind == b"A":
            self.acked = True
            kind, data = self._read_frame()
        if kind == b"V":
            try:
                return pickle.loads(data)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure
                raise TransferError(self.host.name, f"the function's value came back but does "
                                    f"not unpickle here: {type(exc).__name__}: {exc}. Return "
                                    "plain data (numbers, str, lists, dicts, arrays) or make "
                                    "its classes importable locally.") from exc
        if kind == b"E":
            err = json.loads(data)
            raise RemoteError(self.host.name, err["type"], err["message"], err["traceback"])
        raise CommandError(self.host.name, f"the worker sent an unexpected frame {kind!r}")

    def close(self) -> None:
        try:
            self.chan.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


@functools.lru_cache(maxsize=1)
def _cloudpickle_zip() -> bytes:
    """The local cloudpickle package as a zip (sent to hosts without the same version)."""
    pkg = Path(cloudpickle.__file__).parent
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(pkg.glob("*.py")):
            z.write(f, f"cloudpickle/{f.name}")
    return out.getvalue()


# -- the pool: one connection per host, workers reused ----------------------------------
class _HostPool:
    def __init__(self, host: Host, project: str | None = None) -> None:
        self.host = host
        self.project = project
        self.conn = None
        self.idle: list[Worker] = []
        self.slots = threading.BoundedSemaphore(host.max_jobs)
        self.lock = threading.Lock()
        self.checked: _Hello | None = None

    def connection(self):
        from .connection import connect
        with self.lock:
            if self.conn is None or not self.conn.is_connected:
                if self.conn is not None:
                    self.conn.close()
                self.conn = connect(self.host)
                with host_errors(self.host.name, "connect"):
                    self.conn.open()
                    self.conn.client.get_transport().set_keepalive(15)
            return self.conn

    def take(self) -> Worker:
        with self.lock:
            while self.idle:
                w = self.idle.pop()
                if w.alive:
                    return w
                w.close()
        return self._start()

    def _start(self) -> Worker:
        w = Worker(self.connection(), timeout=max(30.0, self.host.connect_timeout * 3),
                   project=self.project)
        check_python(self.host, w.hello)
        return w

    def give_back(self, w: Worker) -> None:
        with self.lock:
            self.idle.append(w)

    def close(self) -> None:
        with self.lock:
            for w in self.idle:
                w.close()
            self.idle.clear()
            if self.conn is not None:
                self.conn.close()
                self.conn = None


def check_python(host: Host, hello: _Hello) -> None:
    """Refuse a host whose Python cannot load our pickles (before any call is sent)."""
    local = sys.version_info[:2]
    here = sys.implementation.name
    impl = "CPython" if here == "cpython" else here
    if tuple(hello.python[:2]) != local or hello.implementation != impl:
        remote_v = ".".join(map(str, hello.python))
        raise PythonMismatchError(
            host.name,
            f"refusing to send a pickled function: the host's {host.python} is "
            f"{hello.implementation} {remote_v}, this machine runs {impl} "
            f"{local[0]}.{local[1]}. Pickled code only loads on the same major.minor. Set "
            f"`python:` for {host.name} to a {impl} {local[0]}.{local[1]} interpreter (or a "
            f"venv/conda env with one), or run locally with that version. Nothing was sent.")


_pools: dict[tuple[str, str], _HostPool] = {}
_pools_lock = threading.Lock()


@functools.lru_cache(maxsize=64)
def _project_of(cwd: str) -> str:
    from .project import find_project, project_name
    return project_name(find_project(cwd))


def _pool(host: Host) -> _HostPool:
    """The pool for ``host`` in the current project (whose venv workers activate)."""
    project = _project_of(os.getcwd())
    key = (host.name, repr(host), project)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = _HostPool(host, project)
        return pool


@atexit.register
def close_workers() -> None:
    """Stop every worker and close every connection this process opened for payloads."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for p in pools:
        p.close()


def _default_output(prefix: bool) -> Output:
    from .output import PrefixedOutput
    return PrefixedOutput(prefix)


def call_on_host(host: Host, blob: bytes, *, on_output: Output | None = None) -> Any:
    """Run a pickled call (:func:`dumps_call`) on ``host`` with a pooled worker.

    A worker found dead, or dying before it took the call, is replaced once,
    transparently; one that dies *during* the call is reported (the call may have had
    effects), and the next call starts a fresh one.
    """
    pool = _pool(host)
    on_output = on_output or _default_output(prefix=False)
    with pool.slots:
        for attempt in (1, 2):
            try:
                w = pool.take()
            except WorkerDied as exc:
                raise _worker_error(host, exc) from None
            try:
                value = w.call(blob, on_output)
            except WorkerDied as exc:
                w.close()
                if attempt == 1 and exc.kind == "died" and not w.acked:
                    continue  # it died before taking the call: replace it, once
                raise _worker_error(host, exc) from None
            except RemoteError:
                pool.give_back(w)
                raise
            except BaseException:
                w.close()  # mid-frame state is unknown: never reuse it
                raise
            pool.give_back(w)
            return value
    raise AssertionError("unreachable")


def _worker_error(host: Host, exc: WorkerDied) -> HostError:
    if exc.kind == "lost":
        return ConnectError(host.name, f"{exc.reason} while running a pickled function; "
                            "check the host and call again.")
    if exc.kind in ("python", "env"):
        return CommandError(host.name, f"{exc.reason}. Install Python 3 there, or fix "
                            "`python:` / `venv` / `conda_env` in the inventory.")
    return CommandError(host.name, f"{exc.reason} while running a pickled function (out of "
                        "memory? killed?). The next call starts a fresh worker.")


def run_payload(c_or_host, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on a host and return its value.

    ``c_or_host`` is a connection from :func:`fabfile.connect` / ``Inventory.connect`` (its
    host's pooled worker is used) or a :class:`Host`. The function's prints reach this
    process's stdout/stderr as they happen. Raises :class:`RemoteError` (with the remote
    traceback) when it raises there, :class:`PythonMismatchError` before sending anything
    when the host's Python differs, :class:`HostError` subclasses for the rest.
    """
    host = c_or_host if isinstance(c_or_host, Host) else c_or_host.fleet_host
    return call_on_host(host, dumps_call(fn, *args, **kwargs))


def remote(host: str, inventory: str | os.PathLike[str] | None = None):
    """Decorator: calling the function runs it on ``host`` and returns its value.

    ``inventory`` is a path; ``None`` finds it as the CLI does (``FABFLEET_INVENTORY``,
    then ``./inventory.yaml``). The undecorated function is ``wrapper.local``.
    """
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from .inventory import HostSet, find_inventory
            inv = HostSet.load(inventory or find_inventory())
            return call_on_host(inv[host], dumps_call(fn, *args, **kwargs))
        wrapper.local = fn
        return wrapper
    return decorate


# -- map over hosts --------------------------------------------------------------------
@dataclass(frozen=True)
class ItemOutcome:
    index: int
    host: str | None
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class MapError(FanOutError):
    """Some items failed; ``.outcomes`` has every item's value or error, in input order."""

    def __init__(self, outcomes: list[ItemOutcome]) -> None:
        self.outcomes = outcomes
        bad = [o for o in outcomes if not o.ok]
        first = "; ".join(f"item {o.index} on {o.host or '-'}: {type(o.error).__name__}: "
                          f"{_first_line(o.error)}" for o in bad[:3])
        more = f"; … {len(bad) - 3} more" if len(bad) > 3 else ""
        super().__init__(f"{len(bad)}/{len(outcomes)} items failed; {first}{more}",
                         {str(o.index): o.error for o in bad})


def _first_line(e: BaseException) -> str:
    text = e.remote_message if isinstance(e, RemoteError) else \
        (e.detail if isinstance(e, HostError) else str(e))
    return (text.splitlines() or [""])[0]


def map_hosts(hosts: Iterable[Host], fn: Callable, items: Iterable[Any], *,
              return_exceptions: bool = False, on_output: Output | None = None) -> list[Any]:
    """``[fn(item) for item in items]``, spread over ``hosts`` (``max_jobs`` at a time each).

    Results come back in input order. A host that cannot be reached (or dies) hands its
    items to the others; an item whose function raises is an error for that item only.
    With ``return_exceptions`` errors take the failed items' places; otherwise
    :class:`MapError` is raised after every item has finished.
    """
    hosts = list(hosts)
    items = list(items)
    if not hosts:
        raise LocalError("map over hosts: no hosts selected")
    todo = collections.deque(range(len(items)))
    results: list[ItemOutcome | None] = [None] * len(items)
    cond = threading.Condition()
    in_flight = 0
    live_hosts = {h.name for h in hosts}
    last_host_error: dict[str, BaseException] = {}
    output = on_output or _default_output(prefix=len(hosts) > 1)

    def next_item(host: Host) -> int | None:
        """An item to run, or None when this host is done (or dead). Waits while other
        hosts still have items in flight: a dying host hands its item back."""
        nonlocal in_flight
        with cond:
            while True:
                if host.name not in live_hosts:
                    return None
                if todo:
                    in_flight += 1
                    return todo.popleft()
                if in_flight == 0:
                    return None
                cond.wait(0.5)

    def slot(host: Host) -> None:
        nonlocal in_flight
        while (i := next_item(host)) is not None:
            outcome, requeue = None, False
            try:
                value = call_on_host(host, dumps_call(fn, items[i]), on_output=output)
                outcome = ItemOutcome(i, host.name, value=value)
            except (ConnectError, PythonMismatchError) as exc:
                # The host, not the item, is at fault: hand the item to the others.
                with cond:
                    live_hosts.discard(host.name)
                    last_host_error[host.name] = exc
                    requeue = bool(live_hosts)
                if not requeue:
                    outcome = ItemOutcome(i, host.name, error=exc)
            except FleetError as exc:
                outcome = ItemOutcome(i, host.name, error=exc)
            with cond:
                in_flight -= 1
                if requeue:
                    todo.append(i)
                else:
                    results[i] = outcome
                cond.notify_all()

    threads = [threading.Thread(target=slot, args=(h,), daemon=True, name=f"map-{h.name}-{j}")
               for h in hosts for j in range(h.max_jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if hasattr(output, "flush"):
        output.flush()
    # Items left when every host died: fail them with the hosts' errors.
    while todo:
        i = todo.popleft()
        err = next(iter(last_host_error.values()), None) or ConnectError("-", "no host left")
        results[i] = ItemOutcome(i, None, error=err)
    outcomes = [r for r in results if r is not None]
    if return_exceptions:
        return [o.value if o.ok else o.error for o in outcomes]
    if any(not o.ok for o in outcomes):
        raise MapError(outcomes)
    return [o.value for o in outcomes]


def run_on_hosts(hosts: Sequence[Host], blob: bytes, *, on_output: Output | None = None,
                 max_parallel: int = 32):
    """The same pickled call on every host at once → :class:`FanOutResult` of values."""
    from .fanout import fan_out
    output = on_output or _default_output(prefix=len(hosts) > 1)
    try:
        return fan_out(hosts, lambda h: call_on_host(h, blob, on_output=output),
                       max_workers=max_parallel)
    finally:
        if hasattr(output, "flush"):
            output.flush()
