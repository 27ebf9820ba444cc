"""Port forwarding over a verified connection: ``127.0.0.1:LOCAL`` → a port on the host.

Not Fabric's ``forward_local`` (1 KiB reads, a 10 ms poll, and the whole tunnel dies on
one refused connection): here every accepted connection gets its own SSH channel and a
thread moving up to 64 KiB at a time in both directions; a connection the host refuses
is reported through ``on_event`` and closed, and the tunnel keeps serving. It listens
on 127.0.0.1 only.

With ``openssh`` (the ``tunnel`` task's default when the laptop has OpenSSH's ``ssh``)
the bytes go through an ``ssh -N -L`` of our own instead — the command line
:func:`~fabfleet.ssh.connect.ssh_command_for` builds, so the same route, key, known_hosts
and host-key checks and deadlines — because its C packet loop moves bulk data about twice
as fast as Paramiko's. We still listen on the TCP port ourselves; ssh listens on a Unix
socket in a private (0700) directory, so no other local user can reach the forward and no
port is chosen twice.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable

from ..config.deadlines import deadlines
from ..errors import ConnectError, LocalError, host_errors
from .connect import ssh_command_for

Event = Callable[[str], None]
CHUNK = 1 << 16


class Tunnel:
    """Forward ``127.0.0.1:local_port`` (0: a free one) to ``remote_host:remote_port`` as
    seen from the host behind ``c``. Use as a context manager, or :meth:`start` /
    :meth:`close`; ``.local_port`` is the port it listens on."""

    def __init__(self, c, remote_port: int, local_port: int = 0, *,
                 remote_host: str = "127.0.0.1", on_event: Event | None = None,
                 openssh: bool | None = False) -> None:
        self.c = c
        self.host = c.fleet_host
        self.remote = (remote_host, int(remote_port))
        self.requested = int(local_port)
        self.on_event = on_event or (lambda message: None)
        self.listener: socket.socket | None = None
        self.local_port = 0
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.active: set = set()
        self.served = 0
        # None: OpenSSH when the laptop has it (see the module docstring)
        self.openssh = shutil.which("ssh") is not None if openssh is None else openssh
        self.proc: subprocess.Popen | None = None
        self.private: str | None = None

    def start(self) -> Tunnel:
        self.c.open()
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.requested))
            sock.listen(64)
        except OSError as exc:
            raise LocalError(f"cannot listen on 127.0.0.1:{self.requested}: {exc.strerror or exc}"
                             " (in use? pick another --local-port, or 0 for a free one)") from None
        self.listener = sock
        self.local_port = sock.getsockname()[1]
        if self.openssh:
            try:
                self._start_openssh()
            except BaseException:
                self.close()
                raise
        threading.Thread(target=self._accept, daemon=True,
                         name=f"fabfleet-tunnel-{self.local_port}").start()
        return self

    def _start_openssh(self) -> None:
        """``ssh -N -L SOCKET:HOST:PORT`` with our connection's settings; returns once
        its socket exists, raises :class:`ConnectError` with ssh's words if it fails."""
        self.private = tempfile.mkdtemp(prefix="fabfleet-tunnel-")  # 0700
        path = os.path.join(self.private, "s")
        rhost = f"[{self.remote[0]}]" if ":" in self.remote[0] else self.remote[0]
        addr = f"[{self.c.host}]" if ":" in self.c.host else self.c.host
        argv = ssh_command_for(self.c) + [
            "-N", "-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindMask=0177",
            "-L", f"{path}:{rhost}:{self.remote[1]}", "--", addr]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as exc:
            raise LocalError(f"cannot run ssh for the tunnel: {exc}") from None
        deadline = time.monotonic() + deadlines(self.host).handshake * 3
        while not os.path.exists(path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                said = (self.proc.stderr.read().decode("utf-8", "replace")
                        if self.proc.poll() is not None else "it did not start in time")
                raise ConnectError(self.host.name, f"ssh for the tunnel failed: "
                                   f"{said.strip()[-400:]}")
            time.sleep(0.02)
        self.socket_path = path
        threading.Thread(target=self._watch_openssh, daemon=True).start()

    def _watch_openssh(self) -> None:
        """ssh's messages: a refused connection is an event; ssh ending closes us."""
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").strip()
            if "open failed" in line or "connect failed" in line:
                self.on_event(f"{self.host.name}: connection to {self.remote[0]}:"
                              f"{self.remote[1]} failed ({line}); the tunnel keeps listening")
        code = self.proc.wait()
        if not self.closed.is_set():
            self.on_event(f"{self.host.name}: the tunnel's ssh ended (exit {code}): the host "
                          "is gone or dropped the connection; open the tunnel again")
            self.close()

    def __enter__(self) -> Tunnel:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening (the port is free again) and close every forwarded connection."""
        self.closed.set()
        if self.listener is not None:
            try:  # shutdown wakes the accept() blocked in our thread; close alone would
                self.listener.shutdown(socket.SHUT_RDWR)  # leave the port listening
            except OSError:
                pass
            try:
                self.listener.close()
            except OSError:
                pass
        with self.lock:
            for chan, sock in list(self.active):
                for end in (chan, sock):
                    try:
                        end.close()
                    except Exception:  # noqa: BLE001 - closing anyway
                        pass
            self.active.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.private is not None:
            shutil.rmtree(self.private, ignore_errors=True)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until closed (or ``timeout``); True when closed."""
        return self.closed.wait(timeout)

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, peer = self.listener.accept()
            except OSError:
                return  # closed
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(client, peer), daemon=True).start()

    def _open_channel(self, peer):
        transport = self.c.client.get_transport()
        if transport is None or not transport.is_active():
            raise ConnectError(self.host.name, "the connection for the tunnel was lost")
        with host_errors(self.host.name, f"open a tunnel to {self.remote[0]}:{self.remote[1]}"):
            return transport.open_channel("direct-tcpip", self.remote, peer,
                                          timeout=deadlines(self.host).handshake)

    def _serve(self, client: socket.socket, peer) -> None:
        """One accepted connection: its far end (an SSH channel, or a connection to our
        ssh's socket), then bytes both ways until both sides are done."""
        try:
            if self.openssh:
                far = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    far.connect(self.socket_path)
                except OSError:
                    far.close()
                    raise
            else:
                far = self._open_channel(peer)
        except Exception as exc:  # noqa: BLE001 - reported, the tunnel keeps serving
            self.on_event(f"{self.host.name}: connection to {self.remote[0]}:{self.remote[1]} "
                          f"failed ({exc}); the tunnel keeps listening")
            client.close()
            return
        pair = (far, client)
        with self.lock:
            self.active.add(pair)
            self.served += 1
        try:
            (pump_sockets if self.openssh else pump)(client, far)
        finally:
            with self.lock:
                self.active.discard(pair)
            for end in pair:
                try:
                    end.close()
                except Exception:  # noqa: BLE001
                    pass


def pump_sockets(a: socket.socket, b: socket.socket) -> None:
    """Move bytes between two sockets until both directions are done."""
    open_ = {a: True, b: True}
    other = {a: b, b: a}
    while any(open_.values()):
        try:
            ready, _, _ = select.select([s for s, o in open_.items() if o], [], [], 1.0)
        except (OSError, ValueError):
            return
        for s in ready:
            try:
                data = s.recv(CHUNK)
            except OSError:
                data = b""
            try:
                if data:
                    other[s].sendall(data)
                else:
                    open_[s] = False
                    other[s].shutdown(socket.SHUT_WR)
            except OSError:
                return


def pump(sock: socket.socket, chan) -> None:
    """Move bytes both ways until both sides are done (half-closes passed along)."""
    sock_open = chan_open = True
    while sock_open or chan_open:
        watch = ([sock] if sock_open else []) + ([chan] if chan_open else [])
        try:
            ready, _, _ = select.select(watch, [], [], 1.0)
        except (OSError, ValueError):  # the tunnel was closed under us: this one is done
            return
        if sock in ready:
            try:
                data = sock.recv(CHUNK)
            except OSError:
                data = b""
            try:
                if data:
                    chan.sendall(data)
                else:
                    sock_open = False
                    chan.shutdown_write()
            except (OSError, EOFError):  # the host's side is gone
                return
        if chan in ready:
            data = chan.recv(CHUNK)
            if data:
                try:
                    sock.sendall(data)
                except OSError:
                    return
            else:
                chan_open = False
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    return
        if chan.closed:
            return
