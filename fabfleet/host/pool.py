"""Pooled remote Python workers: one SSH connection per host, up to ``max_jobs`` workers.

A worker is :mod:`fabfleet.hostside.worker`'s source, run by the host's Python inside its
env (:func:`fabfleet.ssh.launch.python_command`) on one session: a session of the
laptop's ``ssh`` beside our connection where it has one (:mod:`fabfleet.ssh.mux`: a call
crosses a pipe and ssh's C packet loop), a Paramiko channel otherwise; a warm call costs
one round trip either way. This module starts workers, hands calls to them and turns
everything that can go wrong into errors naming the host:

* **deadlines**: ``timeout=`` interrupts the function on the host, waits
  :data:`INTERRUPT_GRACE` seconds for it to stop (the worker kills it after that), then
  raises :class:`~fabfleet.errors.DeadlineError`;
* **interrupts**: KeyboardInterrupt here (Ctrl-C, a notebook's interrupt) interrupts the
  function there too and is re-raised once it stopped; a second one abandons the worker,
  which then dies with its channel;
* **liveness**: while calls are in flight, the connection's watchdog
  (:mod:`fabfleet.ssh.liveness`) probes it; a host that does not answer within its
  ``connect_timeout`` has its connection closed and its calls fail with
  :class:`~fabfleet.errors.ConnectError` — so a frozen host fails a call within
  ``KEEPALIVE_INTERVAL + connect_timeout`` seconds (plus the poll step), never hangs it;
* **slots**: a call holds one of the host's ``max_jobs`` slots (:mod:`fabfleet.host.slots`,
  shared with runs and jobs) while it runs;
* **integrity**: every frame carries its call's id; a frame of another call is a loud
  protocol error and the worker is discarded.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import pickle
import select
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from ..config.deadlines import INTERRUPT_GRACE, MUX_WAIT, deadlines
from ..config.inventory import Host
from ..config.settings import current_project_name
from ..errors import (CommandError, ConnectError, DeadlineError, GpusBusyError, HostError,
                      LocalError, PythonMismatchError, TransferError,
                      host_errors)
from ..hostside import worker as proto
from ..ssh import mux, shell
from ..ssh.connect import connect
from ..ssh.exec import send_all, start_command
from ..ssh.launch import python_command
from ..ssh.liveness import watchdog
from ..ssh.output import PrefixedOutput
from .shipping import cloudpickle_zip, remote_error
from .slots import host_slots

Output = Callable[[str, str, bytes], None]  # (host, "stdout"|"stderr", data)

POLL = 0.1                # how often a waiting call looks at deadlines and cancellation


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
class Hello:
    python: tuple[int, int, int]
    implementation: str
    executable: str
    pid: int
    cloudpickle: str
    gpu: str | None = None     # the GPU this worker holds (its CUDA_VISIBLE_DEVICES)
    gpu_busy: bool = False     # the host has GPUs, but none was free for this worker


class Worker:
    """One remote interpreter on one channel; one call at a time."""

    def __init__(self, c, timeout: float, project: str | None = None,
                 master: mux.Master | None = None) -> None:
        self.c = c
        self.host: Host = c.fleet_host
        self.buf = bytearray()
        self.stderr_tail = bytearray()
        self.on_output: Output | None = None
        self.callback_error: BaseException | None = None
        self.next_id = 0
        self.defined: set[int] = set()  # ids of the functions this worker keeps for chunks
        self.acked = False
        self.healthy = True  # False once its state is unknown: never reuse it then
        with host_errors(self.host.name, f"start a Python worker with {self.host.python}"):
            c.open()
            cache = f"~/.cache/fabfleet/cloudpickle-{cloudpickle.__version__}"

            def command(ack: bool):  # the same env as runs: env vars, venv/conda, project
                return python_command(
                    self.host, proto, [cloudpickle.__version__, cache, "fabfleet-worker",
                                       json.dumps({"allowed": self.host.gpus,
                                                   "slots": self.host.tasks_per_gpu,
                                                   "ack": ack})],
                    project=project, unbuffered=True)
            self.chan = None
            if master is not None:  # a session of the laptop's ssh (see fabfleet.ssh.mux)
                started = command(ack=False)
                with contextlib.suppress(OSError):
                    self.chan = master.session(started.command)
            #: Paramiko channel workers acknowledge each call (a worker dying before that
            #: is replaced, once); a session's worker found dead is seen before the call
            #: is sent (:attr:`alive`), so its calls go unacknowledged: one packet less.
            self.ack = self.chan is None
            self.via = "paramiko" if self.chan is None else "openssh"
            if self.chan is None:
                started = command(ack=True)
                self.chan = c.client.get_transport().open_session(timeout=timeout)
                start_command(self.chan, started.command)
            send_all(self.chan, started.stdin)  # the worker's source; calls follow
        #: what to wait on for output: a Paramiko channel, or an ssh's stdout and stderr
        self.waitable = getattr(self.chan, "fds", None)
        deadline = time.monotonic() + timeout
        kind, _, data = self._frame_before(deadline)
        if kind == proto.NEED:
            self._send(proto.ZIP, 0, cloudpickle_zip())
            kind, _, data = self._frame_before(deadline)
        if kind != proto.HELLO:
            raise CommandError(self.host.name, f"the worker sent {kind!r} instead of hello")
        info = json.loads(data)
        self.hello = Hello(tuple(info["python"]), info["implementation"], info["executable"],
                           info["pid"], info["cloudpickle"], info.get("gpu"),
                           bool(info.get("gpu_busy")))

    @property
    def alive(self) -> bool:
        if self.waitable:  # an idle session's output is empty unless its worker ended
            return self.healthy and self.chan.idle_and_alive()
        return self.healthy and not self.chan.closed and self.chan.get_transport().is_active()

    # -- frames ----------------------------------------------------------------------
    def _send(self, kind: bytes, call_id: int, data: bytes = b"") -> None:
        if self.waitable:  # a pipe to ssh: one write (the pipe holds 64 KiB or more)
            try:
                self.chan.sendall(proto.HEADER.pack(kind, call_id, len(data)) + data
                                  if len(data) < 65536 else
                                  proto.HEADER.pack(kind, call_id, len(data)))
                if len(data) >= 65536:
                    self.chan.sendall(data)
                return
            except (EOFError, OSError) as exc:
                raise ConnectError(self.host.name, "the worker's session ended while "
                                   f"sending it data ({exc})") from None
        with host_errors(self.host.name, "send data to the worker"):
            # One packet for header and small data; big data in 1 MiB slices (paramiko's
            # sendall re-slices the rest after every 32 KiB packet: quadratic).
            head = proto.HEADER.pack(kind, call_id, len(data))
            if len(data) < 65536:
                self.chan.sendall(head + data)
                return
            self.chan.sendall(head)
            send_all(self.chan, data)

    def _emit(self, stream: str, data: bytes) -> None:
        if self.on_output is None:
            return
        try:
            self.on_output(self.host.name, stream, data)
        except Exception as exc:  # noqa: BLE001 - reported after the call, never mid-frame
            self.callback_error = self.callback_error or exc

    def _drain_stderr(self) -> None:
        while self.chan.recv_stderr_ready():
            self._stderr(self.chan.recv_stderr(1 << 16))
            if self.waitable and self.chan.err_eof:
                return

    def _stderr(self, data: bytes) -> None:
        if data:
            self.stderr_tail.extend(data)
            del self.stderr_tail[:-8192]
            self._emit("stderr", data)

    def _buffered_frame(self) -> tuple[bytes, int, bytes] | None:
        if len(self.buf) >= proto.HEADER.size:
            kind, call_id, n = proto.HEADER.unpack_from(self.buf)
            end = proto.HEADER.size + n
            if len(self.buf) >= end:
                data = bytes(self.buf[proto.HEADER.size:end])
                del self.buf[:end]
                return kind, call_id, data
        return None

    def _died(self) -> WorkerDied:
        self._drain_stderr()
        self.healthy = False
        return WorkerDied(*self._death_reason())

    def _poll_frame(self, wait: float) -> tuple[bytes, int, bytes] | None:
        """The next complete frame, or ``None`` if none arrived within ``wait`` seconds.
        Raises :class:`WorkerDied` when the channel ends."""
        if self.waitable:
            return self._poll_pipes(wait)
        chan = self.chan
        until = time.monotonic() + wait
        while True:
            frame = self._buffered_frame()
            if frame is not None:
                return frame
            self._drain_stderr()
            if chan.recv_ready():
                with host_errors(self.host.name, "read from the worker"):
                    self.buf.extend(chan.recv(1 << 20))
                continue
            if chan.closed or chan.eof_received or not chan.get_transport().is_active():
                raise self._died()
            left = until - time.monotonic()
            if left <= 0:
                return None
            select.select([chan], [], [], min(left, POLL))

    def _poll_pipes(self, wait: float) -> tuple[bytes, int, bytes] | None:
        """:meth:`_poll_frame` for a session of the laptop's ssh: one ``select`` per
        wake-up; whether it still lives is asked only when nothing arrived."""
        chan = self.chan
        until = time.monotonic() + wait
        while True:
            frame = self._buffered_frame()
            if frame is not None:
                return frame
            left = until - time.monotonic()
            ready = select.select(chan.fds, [], [], min(left, POLL) if left > 0 else 0)[0]
            if chan.err in ready:
                self._stderr(chan.recv_stderr(1 << 16))  # at its end: no longer waited on
            if chan.out in ready:
                with host_errors(self.host.name, "read from the worker"):
                    data = chan.recv(1 << 20)
                if data:
                    self.buf.extend(data)
                    continue
            if ready and not chan.eof_received:
                continue
            if chan.eof_received or chan.closed or not chan.is_active():
                raise self._died()
            if left <= 0:
                return None

    def _frame_before(self, deadline: float) -> tuple[bytes, int, bytes]:
        while True:
            frame = self._poll_frame(POLL * 5)
            if frame is not None:
                return frame
            if time.monotonic() > deadline:
                self.healthy = False
                raise CommandError(self.host.name, "the Python worker did not start in time; "
                                   "the host may be overloaded")

    def _death_reason(self) -> tuple[str, str]:
        # OpenSSH sends EOF, then exit-status, then close: give the status a moment.
        self.chan.status_event.wait(2)
        self._drain_stderr()
        code = self.chan.exit_status
        tail = self.stderr_tail.decode("utf-8", "replace").strip()
        if code == 127 or "fabfleet-error: python" in tail:
            return "python", f"Python interpreter {self.host.python!r} was not found on the host"
        if code == 97:
            return "env", shell.env_failure(self.host, tail)
        if not self.chan.get_transport().is_active():
            return "lost", "the connection was lost (the host went down or dropped the session)"
        how = f"exited with code {code}" if code != -1 else "was killed by a signal"
        return "died", f"the Python worker {how}" + (f": {tail[-800:]}" if tail else "")

    # -- a call ----------------------------------------------------------------------
    def call(self, blob: bytes, on_output: Output | None, *, timeout: float | None = None,
             cancel: threading.Event | None = None, kind: bytes = proto.CALL,
             define: tuple[int, bytes] | None = None) -> Any:
        """Run one pickled call (or, with ``kind=CHUNK``, a map chunk whose function
        ``define`` = ``(id, pickle)`` is sent first unless this worker has it); see the
        module docstring for deadlines and interrupts."""
        self.on_output = on_output
        self.callback_error = None
        self.stderr_tail.clear()
        self.acked = False
        self.next_id += 1
        cid = self.next_id
        if define is not None and define[0] not in self.defined:
            self._send(proto.DEFINE, define[0], define[1])  # no reply: pipelined with the call
            self.defined.add(define[0])
        self._send(kind, cid, blob)
        self.acked = not self.ack
        deadline = time.monotonic() + timeout if timeout else None
        stopping: str | None = None   # why we interrupted: "keyboard" | "timeout" | "cancel"
        give_up = 0.0
        while True:
            try:
                try:
                    frame = self._poll_frame(POLL)
                except WorkerDied:
                    if stopping:
                        self._raise_stopped(stopping, timeout)
                    raise
            except KeyboardInterrupt:
                if stopping == "keyboard":  # a second Ctrl-C: do not wait any longer
                    self.healthy = False
                    self.close()
                    raise
                stopping, give_up = "keyboard", self._interrupt(cid)
                continue
            now = time.monotonic()
            if frame is None:
                if stopping is None:
                    if cancel is not None and cancel.is_set():
                        stopping, give_up = "cancel", self._interrupt(cid)
                    elif deadline is not None and now > deadline:
                        stopping, give_up = "timeout", self._interrupt(cid)
                elif now > give_up:  # the worker should have killed itself by now
                    self.healthy = False
                    self.close()
                    self._raise_stopped(stopping, timeout)
                continue
            kind, fid, data = frame
            if fid != cid:
                self.healthy = False
                raise CommandError(self.host.name, f"protocol error: a {kind!r} frame of call "
                                   f"{fid} arrived during call {cid} (a forked child or a "
                                   "stray write?). The worker was discarded; call again.")
            if kind == proto.ACK:
                self.acked = True
            elif kind in (proto.STDOUT, proto.STDERR):
                self._emit("stdout" if kind == proto.STDOUT else "stderr", data)
            elif kind in (proto.VALUE, proto.ERROR):
                self._drain_stderr()
                if stopping:
                    self._raise_stopped(stopping, timeout)
                if self.callback_error is not None:
                    raise LocalError(f"{self.host.name}: the output callback raised "
                                     f"{type(self.callback_error).__name__}: "
                                     f"{self.callback_error}; the call finished on the host "
                                     "but its value was dropped.") from self.callback_error
                if kind == proto.ERROR:
                    raise remote_error(self.host.name, json.loads(data))
                try:
                    return pickle.loads(data)
                except Exception as exc:  # noqa: BLE001 - any unpickling failure
                    raise TransferError(self.host.name, "the function's value came back but "
                                        f"does not unpickle here: {type(exc).__name__}: {exc}. "
                                        "Return plain data (numbers, str, lists, dicts, "
                                        "arrays) or make its classes importable locally.") \
                        from exc
            else:
                self.healthy = False
                raise CommandError(self.host.name, f"protocol error: unexpected frame {kind!r}")

    def _interrupt(self, cid: int) -> float:
        """Ask the worker to interrupt call ``cid``; the time to stop waiting for it."""
        try:
            self._send(proto.INTERRUPT, cid, str(INTERRUPT_GRACE).encode())
        except HostError:
            self.healthy = False
        return time.monotonic() + INTERRUPT_GRACE + 2

    def _raise_stopped(self, why: str, timeout: float | None):
        if why == "keyboard":
            raise KeyboardInterrupt
        if why == "cancel":
            raise CommandError(self.host.name, "the call was cancelled and stopped on the host")
        raise DeadlineError(self.host.name, f"the function did not finish within {timeout:g}s; "
                            "it was stopped on the host. Raise `timeout=` if it needs longer.")

    def close(self) -> None:
        """Close the channel: the worker sees end of input and kills what it started."""
        self.healthy = False
        try:
            self.chan.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def check_python(host: Host, hello: Hello) -> None:
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


#: workers (SSH sessions) per connection: stock sshd allows 10 sessions on one
#: connection (MaxSessions); past this many workers the pool opens another connection
SESSIONS_PER_CONNECTION = 8


#: After a GPU host said none of its GPUs is free for one more worker, this many seconds
#: pass before the pool asks again (meanwhile its calls wait for its own workers).
GPUS_FULL_RECHECK = 30.0


class HostPool:
    """Connections and up to ``max_jobs`` workers for one host (and project): at most
    :data:`SESSIONS_PER_CONNECTION` workers share a connection, so any ``max_jobs``
    works under stock sshd limits."""

    def __init__(self, host: Host, project: str | None = None) -> None:
        self.host = host
        self.project = project
        self.conns: list = []
        self.workers: set[Worker] = set()
        self.starting: dict[int, int] = {}  # id(connection) -> workers being started on it
        self.idle: list[Worker] = []
        self.lock = threading.Lock()
        self.returned = threading.Condition(self.lock)  # a worker was given back
        self.opening = threading.Lock()
        self.closed = False
        self.gpus_full_until = 0.0  # until then, every free GPU is held by our workers

    def connection(self):
        """A connection with room for one more worker (opened if needed), reserved for
        it: release with :meth:`started`. Connections are opened one at a time (stock
        sshd drops unauthenticated connections past MaxStartups)."""
        with self.opening:
            with self.lock:
                self.workers = {w for w in self.workers if not w.chan.closed}
                for conn in list(self.conns):
                    if not conn.is_connected:
                        self.conns.remove(conn)
                        _close_connection(conn)
                        continue
                    used = sum(1 for w in self.workers if w.c is conn) + \
                        self.starting.get(id(conn), 0)
                    if used < SESSIONS_PER_CONNECTION:
                        self.starting[id(conn)] = self.starting.get(id(conn), 0) + 1
                        return conn
            conn = connect(self.host)
            # The laptop's ssh beside it, for the workers (fabfleet.ssh.mux): started
            # with the handshake where it records no host key (strict policy), after it
            # otherwise; never used unless our own connection's checks passed.
            early = mux.wanted() and self.host.host_key_policy != "accept-new"
            master = mux.Master(conn) if early else None
            try:
                with host_errors(self.host.name, "connect"):
                    conn.open()
            except BaseException:
                if master is not None:
                    master.close()
                raise
            if master is None and mux.wanted():
                master = mux.Master(conn)
            conn._fabfleet_master = master
            with self.lock:
                self.conns.append(conn)
                self.starting[id(conn)] = 1
            return conn

    def started(self, conn, worker: Worker | None) -> None:
        """The reservation made by :meth:`connection` is over (``worker`` or failure)."""
        with self.lock:
            self.starting[id(conn)] -= 1
            if worker is not None:
                self.workers.add(worker)

    @property
    def dead_reason(self) -> str | None:
        """Why a connection was closed, when the watchdog closed it (a frozen host)."""
        for conn in self.conns:
            dog = getattr(conn, "_fabfleet_watchdog", None)
            if dog is not None and dog.fired:
                return dog.fired
        return None

    def take(self) -> Worker:
        with self.lock:
            while self.idle:
                w = self.idle.pop()
                if w.alive:
                    return w
                w.close()
        deadline = time.monotonic() + deadlines(self.host).worker_start
        if time.monotonic() < self.gpus_full_until:
            # The host's free GPUs are all ours already: wait for one of our workers
            # rather than start one more only to hear that no GPU is free.
            waited = self._idle_worker(deadline)
            if waited is not None:
                return waited
        while True:
            conn = self.connection()
            try:
                w = Worker(conn, timeout=deadlines(self.host).worker_start,
                           project=self.project, master=_master_of(conn))
            except BaseException:
                self.started(conn, None)
                raise
            self.started(conn, w)
            try:
                check_python(self.host, w.hello)
            except PythonMismatchError:
                w.close()
                raise
            if not w.hello.gpu_busy:
                return w
            # Every GPU is held: one worker per GPU, so wait for one of ours to come back
            # (and for a while, do not ask again: GPUs rarely free up that fast).
            w.close()
            self.gpus_full_until = time.monotonic() + GPUS_FULL_RECHECK
            waited = self._idle_worker(deadline)
            if waited is not None:
                return waited

    def _idle_worker(self, deadline: float) -> Worker | None:
        """One of this pool's workers when it is given back (they hold the GPUs); ``None``
        to try a new worker again (none of ours runs: maybe a GPU freed up); a
        CommandError past ``deadline`` (the GPUs are someone else's)."""
        while True:
            with self.lock:
                self.workers = {w for w in self.workers if not w.chan.closed}
                if self.idle:
                    return self.idle.pop()
                ours = [w for w in self.workers if w.hello.gpu]
            if not ours:
                if time.monotonic() > deadline:
                    raise GpusBusyError(self.host.name, "every GPU on the host is in use by "
                                       "other processes (see `fabfleet top`): nothing was "
                                       "run. Wait for one to be free, or pick another host.")
                time.sleep(1.0)  # maybe one frees up; try a new worker again
                return None
            with self.lock:  # woken as soon as one of ours is given back
                if not self.idle:
                    self.returned.wait(1.0)

    def gpu_capacity(self) -> int | None:
        """While every free GPU of the host is held by our workers: how many workers
        that is (callers with more threads for this host should not queue work on it);
        otherwise ``None``."""
        if time.monotonic() >= self.gpus_full_until:
            return None
        with self.lock:
            return len([w for w in self.workers if w.hello.gpu and not w.chan.closed])

    def give_back(self, w: Worker) -> None:
        if not w.alive:
            w.close()
            return
        with self.lock:
            self.idle.append(w)
            self.returned.notify()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for w in self.idle:
                w.close()
            self.idle.clear()
            for conn in self.conns:
                _close_connection(conn)
            self.conns.clear()


def _master_of(conn) -> mux.Master | None:
    """``conn``'s ssh master once it is up (see :data:`MUX_WAIT`), else ``None``."""
    master = getattr(conn, "_fabfleet_master", None)
    if master is None or master.failed is not None:
        return None
    return master if master.ready(master.started + MUX_WAIT - time.monotonic()) else None


def _close_connection(conn) -> None:
    master = getattr(conn, "_fabfleet_master", None)
    if master is not None:
        master.close()
    conn.close()


_pools: dict[tuple[str, str, str | None], HostPool] = {}
_pools_lock = threading.Lock()


_host_keys: dict[int, tuple[Host, str]] = {}  # id(host) -> (host, its settings as text)


def _settings_key(host: Host) -> str:
    """All of a host's settings as one string (a pool serves one exact host record),
    computed once per record: a warm call does not pay for ``repr``."""
    got = _host_keys.get(id(host))
    if got is None or got[0] is not host:
        got = _host_keys[id(host)] = (host, repr(host))
    return got[1]


def pool_for(host: Host, project: str | None = None) -> HostPool:
    """The pool for ``host`` and ``project`` (default: the current directory's project,
    from :func:`~fabfleet.config.settings.resolve_project`), whose venv workers activate."""
    project = project or current_project_name()
    key = (host.name, _settings_key(host), project)
    pool = _pools.get(key)
    if pool is None or pool.closed:
        with _pools_lock:
            pool = _pools.get(key)
            if pool is None or pool.closed:
                pool = _pools[key] = HostPool(host, project)
    return pool


@atexit.register
def close_workers() -> None:
    """Stop every worker and close every connection this process opened for payloads."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for p in pools:
        p.close()


def default_output(prefix: bool) -> Output:
    return PrefixedOutput(prefix)


def call_on_host(host: Host, blob: bytes, *, on_output: Output | None = None,
                 timeout: float | None = None, cancel: threading.Event | None = None,
                 kind: bytes = proto.CALL, define: tuple[int, bytes] | None = None,
                 project: str | None = None) -> Any:
    """Run a pickled call (:func:`fabfleet.host.payload.dumps_call`) on ``host``, pooled.

    A worker found dead, or dying before it took the call, is replaced once,
    transparently; one that dies *during* the call is reported (the call may have had
    effects), and the next call starts a fresh one. ``timeout`` and ``cancel`` (an
    Event) stop the function on the host; see the module docstring.
    """
    on_output = on_output or default_output(prefix=False)
    if host.scheduler:  # a login node: the call is a batch job on a compute node
        from .batch_calls import call
        return call(host, blob, on_output=on_output, timeout=timeout, cancel=cancel,
                    kind=kind, define=define, project=project)
    pool = pool_for(host, project)
    with host_slots(host):
        for attempt in (1, 2):
            try:
                w = pool.take()
            except WorkerDied as exc:
                if attempt == 1 and exc.kind == "died":
                    continue  # a worker that died while starting: one more try
                raise worker_error(host, exc, pool) from None
            try:
                with watchdog(w.c).busy():
                    value = w.call(blob, on_output, timeout=timeout, cancel=cancel,
                                   kind=kind, define=define)
            except WorkerDied as exc:
                w.close()
                if attempt == 1 and exc.kind == "died" and not w.acked:
                    continue  # it died before taking the call: replace it, once
                raise worker_error(host, exc, pool) from None
            except BaseException:
                pool.give_back(w) if w.healthy else w.close()
                raise
            pool.give_back(w)
            return value
    raise AssertionError("unreachable")


def worker_error(host: Host, exc: WorkerDied, pool: HostPool | None = None) -> HostError:
    if exc.kind == "lost":
        reason = (pool.dead_reason if pool is not None else None) or exc.reason
        return ConnectError(host.name, f"{reason} while running a pickled function; "
                            "check the host and call again.")
    if exc.kind == "env":
        return CommandError(host.name, exc.reason)
    if exc.kind == "python":
        return CommandError(host.name, f"{exc.reason}. Install Python 3 there, or fix "
                            "`python:` / `venv` / `conda_env` in the inventory.")
    return CommandError(host.name, f"{exc.reason} while running a pickled function (out of "
                        "memory? killed?). The next call starts a fresh worker.")
