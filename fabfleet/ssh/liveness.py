"""The one liveness watchdog: a frozen host fails what waits on it, never hangs it.

Paramiko's own keepalives expect no answer, so they cannot tell a frozen host from a
quiet one. While anything waits on a connection (a command, a transfer, a payload
call), its :class:`Watchdog` sends an SSH request that must be answered every
:data:`~fabfleet.config.deadlines.KEEPALIVE_INTERVAL` seconds; a host that does not
answer within its ``connect_timeout`` is declared frozen and the connection closed, so
whatever was blocked on it fails at once. One watchdog per connection, shared by every
channel on it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from ..config.deadlines import KEEPALIVE_INTERVAL, deadlines
from ..config.inventory import Host
from ..errors import ConnectError


def probe(transport, timeout: float) -> bool:
    """Whether the host answers an SSH-level request within ``timeout`` seconds (the
    answer to an unknown global request is a failure message, which proves liveness).
    Paramiko's own keepalives expect no answer, so they cannot tell a frozen host."""
    answered = threading.Event()

    def ask() -> None:
        try:
            transport.global_request("keepalive@openssh.com", wait=True)
        except Exception:  # noqa: BLE001 - a dead transport answers nothing
            return
        answered.set()
    threading.Thread(target=ask, daemon=True, name="fabfleet-probe").start()
    return answered.wait(timeout)


def frozen_message(host: Host) -> str:
    return (f"the host stopped answering (no reply to a keepalive within "
            f"{host.connect_timeout:g}s: frozen, overloaded or cut off)")


class Watchdog:
    """Probes one transport while something is :meth:`busy` on it; see the module
    docstring. ``.fired`` is the reason (text) once it closed the connection."""

    def __init__(self, transport, host: Host) -> None:
        self.transport = transport
        self.host = host
        self.lock = threading.Lock()
        self.busy_count = 0
        self.thread: threading.Thread | None = None
        self.fired: str | None = None

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        with self.lock:
            self.busy_count += 1
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True,
                                               name=f"fabfleet-watch-{self.host.name}")
                self.thread.start()
        try:
            yield
        finally:
            with self.lock:
                self.busy_count -= 1

    def _run(self) -> None:
        wait = threading.Event()
        limit = deadlines(self.host).probe
        while True:
            wait.wait(KEEPALIVE_INTERVAL)
            with self.lock:
                if self.busy_count == 0 or not self.transport.is_active():
                    self.thread = None
                    return
            if not probe(self.transport, limit) and self.transport.is_active():
                with self.lock:
                    busy = self.busy_count > 0
                if busy:
                    self.fired = frozen_message(self.host)
                    self.transport.close()
                    with self.lock:
                        self.thread = None
                    return


def watchdog(c) -> Watchdog:
    """The watchdog of connection ``c`` (opened), made on first use."""
    c.open()
    transport = c.client.get_transport()
    dog = getattr(c, "_fabfleet_watchdog", None)
    if dog is None or dog.transport is not transport:
        dog = Watchdog(transport, c.fleet_host)
        c._fabfleet_watchdog = dog
    return dog


@contextlib.contextmanager
def watched(c, action: str) -> Iterator[None]:
    """Run the block (an SFTP transfer, say) under ``c``'s watchdog; if the host froze,
    the block fails at once and :class:`ConnectError` says the host stopped answering."""
    dog = watchdog(c)
    try:
        with dog.busy():
            yield
    except BaseException as exc:
        if dog.fired:
            raise ConnectError(c.fleet_host.name, f"{dog.fired} during {action}. Nothing "
                               "partial was put in place; check the host and try again.") \
                from exc
        raise
