"""A latency proxy: a host N ms away, on loopback.

``LatencyProxy(target_port, rtt_ms)`` listens on ``127.0.0.1:<free port>`` and forwards
each connection to ``target`` with half the round-trip time added in each direction.
Chunks are stamped when they arrive and sent when their time comes (a sleep until the
stamp, not a sleep per chunk), so they pipeline as on a real link; a half-close is
passed on in order. Use it as a context manager; ``.port`` is where it listens.

    with LatencyProxy(("127.0.0.1", 2301), rtt_ms=50) as proxy:
        ...  # connect to 127.0.0.1:proxy.port

Run alone (for benchmarks by hand): ``python -m testbed.latency TARGET_PORT RTT_MS``.
"""

from __future__ import annotations

import collections
import socket
import sys
import threading
import time


class _Pipe:
    """One direction of one connection: read, stamp, deliver when due."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        self.src, self.dst, self.delay = src, dst, delay
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.ready = threading.Condition()
        threading.Thread(target=self.read, daemon=True).start()
        threading.Thread(target=self.write, daemon=True).start()

    def read(self) -> None:
        while True:
            try:
                data = self.src.recv(65536)
            except OSError:
                data = b""
            with self.ready:
                self.queue.append((time.monotonic() + self.delay, data or None))
                self.ready.notify()
            if not data:
                return

    def write(self) -> None:
        while True:
            with self.ready:
                while not self.queue:
                    self.ready.wait()
                due, data = self.queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if data is None:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(data)
            except OSError:
                return


class LatencyProxy:
    """See the module docstring."""

    def __init__(self, target: tuple[str, int], rtt_ms: float, listen: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.target = target
        self.delay = rtt_ms / 2000.0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((listen, port))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.closed = False
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections += [client, upstream]
            _Pipe(client, upstream, self.delay)
            _Pipe(upstream, client, self.delay)

    def close(self) -> None:
        """Stop listening and cut every connection (both ends see it end at once:
        shutdown first, as close alone leaves a blocked recv holding the socket)."""
        self.closed = True
        for s in [self.listener, *self.connections]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> LatencyProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    proxy = LatencyProxy(("127.0.0.1", int(sys.argv[1])), float(sys.argv[2]))
    print(f"127.0.0.1:{proxy.port} -> 127.0.0.1:{sys.argv[1]}, {sys.argv[2]} ms RTT", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.close()
