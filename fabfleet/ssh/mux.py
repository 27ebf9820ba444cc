"""Sessions through the laptop's OpenSSH: a ControlMaster beside one of our connections.

A warm payload call over a Paramiko channel costs ~0.5 ms of this machine's CPU (packets
encrypted, MAC'd and handed between threads in Python); through ``ssh`` it costs what a
pipe costs. So a pool's workers run, where the laptop has ``ssh``, as sessions of a
:class:`Master`: one ``ssh -M`` per connection of ours, started with
:func:`~fabfleet.ssh.connect.ssh_command_for` (the same user, key, route, deadlines and
host-key checks as the Paramiko connection it sits beside), its control socket in a
private directory (0700) of this process. Nothing here falls back to running anything
locally: a master that cannot start is simply not used (the pool keeps its Paramiko
sessions), and the Paramiko connection stays the one the watchdog probes, so a frozen
host fails a worker on either path within the same deadline.

Nothing outlives us: the master's own session reads its stdin (a pipe from this
process), so when this process ends the master ends too, once its sessions have;
every session is a pipe to its remote program, which sees end of input when we go.
Every ``ssh`` runs in a session of its own, so a Ctrl-C in the terminal reaches this
process only (the pool interrupts the function, the session survives).
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time

from ..config.deadlines import KEEPALIVE_INTERVAL, deadlines
from .connect import ssh_command_for

#: ``FABFLEET_OPENSSH=0`` keeps every worker on Paramiko channels (no ``ssh`` started)
OPENSSH_ENV = "FABFLEET_OPENSSH"

#: The master prefers the key exchange our Paramiko connections use (OpenSSH's default,
#: sntrup761x25519, costs ~130 ms of CPU per handshake on a small machine); the server's
#: other algorithms stay acceptable, and the host-key checks are untouched.
KEX = "KexAlgorithms=^curve25519-sha256,curve25519-sha256@libssh.org"


def wanted() -> bool:
    """Whether workers may go through OpenSSH here (an ``ssh`` on PATH, not turned off)."""
    return os.environ.get(OPENSSH_ENV, "1") != "0" and shutil.which("ssh") is not None


def _address(c) -> str:
    return f"[{c.host}]" if ":" in c.host else c.host


class Master:
    """``ssh -M`` for connection ``c`` (opened, so its host key is already verified and
    recorded): :meth:`ready` waits for its socket, :meth:`session` starts a command."""

    def __init__(self, c) -> None:
        self.c = c
        self.failed: str | None = None
        self.private = tempfile.mkdtemp(prefix="fabfleet-mux-")  # 0700, ours alone
        self.path = os.path.join(self.private, "m")
        self.base = ssh_command_for(c) + ["-S", self.path]
        # ssh takes an option's first value: the master's own keepalive gives up two
        # probes after our watchdog would (which names a frozen host as such).
        limits = deadlines(c.fleet_host)
        later = max(1, math.ceil(limits.probe / KEEPALIVE_INTERVAL)) + 2
        argv = self.base[:1] + ["-o", f"ServerAliveCountMax={later}"] + self.base[1:] + [
            "-M", "-o", "ControlPersist=no", "-o", KEX, "-T", "--", _address(c),
            "cat >/dev/null"]
        self.lock = threading.Lock()
        try:
            self.proc: subprocess.Popen | None = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            self.proc, self.failed = None, f"cannot run ssh: {exc}"
        self.started = time.monotonic()
        self.limit = limits.handshake * 3

    @property
    def alive(self) -> bool:
        return self.failed is None and self.proc is not None and self.proc.poll() is None

    def ready(self, wait: float) -> bool:
        """Whether the master's socket is up, waiting at most ``wait`` seconds; a master
        that ended or did not come up within its handshake deadline is :attr:`failed`."""
        until = time.monotonic() + wait
        while self.failed is None:
            if os.path.exists(self.path):
                return self.alive
            if self.proc.poll() is not None:
                said = self.proc.stderr.read().decode("utf-8", "replace").strip()
                self.failed = f"ssh exited with {self.proc.returncode}: {said[-300:]}"
                break
            now = time.monotonic()
            if now > self.started + self.limit:
                self.failed = "the ssh master did not come up in time"
                self.close()
                break
            if now >= until:
                return False
            time.sleep(0.002)
        return False

    def session(self, command: str) -> Session:
        """``command`` on the host as a session of this master (raises OSError when the
        master is gone: ssh must never open a connection of its own behind our back)."""
        if not self.alive or not os.path.exists(self.path):
            raise OSError("the ssh master is gone")
        proc = subprocess.Popen(self.base + ["-o", "ControlMaster=no", "-T", "--",
                                             _address(self.c), command],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0, start_new_session=True)
        return Session(proc, self)

    def close(self) -> None:
        """End the master (its sessions end with it) and remove its socket's directory."""
        with self.lock:
            proc, self.proc = self.proc, None
            self.failed = self.failed or "closed"
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(2)
                except subprocess.TimeoutExpired:
                    proc.kill()
            with contextlib.suppress(OSError):
                proc.stderr.close()
        shutil.rmtree(self.private, ignore_errors=True)


class _Status:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def wait(self, timeout: float) -> bool:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        return self.proc.returncode is not None


class Session:
    """One ``ssh -S`` session, with the part of a Paramiko channel's interface a pool
    worker uses (``send``/``sendall``, ``recv``/``recv_ready``, their stderr twins,
    ``closed``, ``eof_received``, ``exit_status``, ``status_event``, ``close``), and
    :attr:`fds` to wait on. Its "transport" is active while both the master and our
    Paramiko connection are: the watchdog closing a frozen host's connection ends the
    worker here too. ssh's exit code 255 (the remote died by a signal, or the
    connection failed) is reported as -1, as Paramiko reports a death by signal."""

    def __init__(self, proc: subprocess.Popen, master: Master) -> None:
        self.proc = proc
        self.master = master
        self.out, self.err = proc.stdout.fileno(), proc.stderr.fileno()
        self.win = proc.stdin.fileno()
        self.eof_received = False
        self.err_eof = False
        self.status_event = _Status(proc)
        self._closed = False

    # -- the channel interface the worker uses ----------------------------------------
    def get_transport(self) -> Session:
        return self

    def is_active(self) -> bool:
        return self.master.alive and self.master.c.is_connected

    @property
    def closed(self) -> bool:
        return self._closed or self.proc.poll() is not None

    def idle_and_alive(self) -> bool:
        """For a worker between calls: its program has said nothing since (no end of
        output waiting), its ssh runs, and so do the master and our connection."""
        return (not self._closed and not self.eof_received and not self._ready(self.out)
                and self.proc.poll() is None and self.is_active())

    @property
    def fds(self) -> list[int]:
        return [self.out] + ([] if self.err_eof else [self.err])

    @property
    def exit_status(self) -> int:
        code = self.proc.returncode
        return -1 if code is None or code == 255 or code < 0 else code

    def send(self, data) -> int:
        try:
            return os.write(self.win, data)
        except (BrokenPipeError, ValueError):
            return 0

    def sendall(self, data) -> None:
        view = memoryview(data)
        while view:
            sent = self.send(view)
            if sent == 0:
                raise EOFError("the session closed while sending")
            view = view[sent:]

    def _ready(self, fd: int) -> bool:
        return bool(select.select([fd], [], [], 0)[0])

    def recv_ready(self) -> bool:
        return not self.eof_received and self._ready(self.out)

    def recv(self, n: int) -> bytes:
        data = os.read(self.out, n)
        if not data:
            self.eof_received = True
        return data

    def recv_stderr_ready(self) -> bool:
        return not self.err_eof and self._ready(self.err)

    def recv_stderr(self, n: int) -> bytes:
        data = os.read(self.err, n)
        if not data:
            self.err_eof = True
        return data

    def close(self) -> None:
        """End of input for the remote program (it stops what it started and exits),
        then the session ends; never blocks for long."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.terminate()
        threading.Thread(target=self._reap, daemon=True, name="fabfleet-ssh-reap").start()

    def _reap(self) -> None:
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                f.close()
