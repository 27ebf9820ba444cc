"""Port forwarding over a verified connection: ``127.0.0.1:LOCAL`` → a port on the host.

Not Fabric's ``forward_local`` (1 KiB reads, a 10 ms poll, and the whole tunnel dies on
one refused connection): here every accepted connection gets its own SSH channel and a
thread moving up to 64 KiB at a time in both directions; a connection the host refuses
is reported through ``on_event`` and closed, and the tunnel keeps serving. It listens
on 127.0.0.1 only.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable

from ..config.deadlines import deadlines
from ..errors import ConnectError, LocalError, host_errors

Event = Callable[[str], None]
CHUNK = 1 << 16


class Tunnel:
    """Forward ``127.0.0.1:local_port`` (0: a free one) to ``remote_host:remote_port`` as
    seen from the host behind ``c``. Use as a context manager, or :meth:`start` /
    :meth:`close`; ``.local_port`` is the port it listens on."""

    def __init__(self, c, remote_port: int, local_port: int = 0, *,
                 remote_host: str = "127.0.0.1", on_event: Event | None = None) -> None:
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
        threading.Thread(target=self._accept, daemon=True,
                         name=f"fabfleet-tunnel-{self.local_port}").start()
        return self

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
        try:
            chan = self._open_channel(peer)
        except Exception as exc:  # noqa: BLE001 - reported, the tunnel keeps serving
            self.on_event(f"{self.host.name}: connection to {self.remote[0]}:{self.remote[1]} "
                          f"failed ({exc}); the tunnel keeps listening")
            client.close()
            return
        pair = (chan, client)
        with self.lock:
            self.active.add(pair)
            self.served += 1
        try:
            pump(client, chan)
        finally:
            with self.lock:
                self.active.discard(pair)
            for end in pair:
                try:
                    end.close()
                except Exception:  # noqa: BLE001
                    pass


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
