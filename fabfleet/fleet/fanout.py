"""Run a function once per host on a bounded pool, with per-host deadlines.

One slow or dead host never stalls or hides the others: each host gets a deadline, and
a host past it is reported as failed while the rest go on. Worker threads are daemons,
so a host stuck in a system call cannot keep the process from exiting either.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..config.inventory import Host
from ..errors import ConnectError, FanOutError, HostError
from ..ssh.connect import connect

T = TypeVar("T")
DEFAULT_WORKERS = 32


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What happened on one host: a value, or the error, and how long it took."""

    host: str
    value: T | None = None
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def describe(error: BaseException) -> str:
    """``ConnectError: …`` with the redundant ``host:`` prefix dropped, one line."""
    text = error.detail if isinstance(error, HostError) else str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


class FanOutResult(Mapping[str, Outcome[T]]):
    """Per-host outcomes in inventory order, with a one-line :meth:`summary`."""

    def __init__(self, outcomes: Iterable[Outcome[T]]) -> None:
        self._outcomes = {o.host: o for o in outcomes}

    def __getitem__(self, host: str) -> Outcome[T]:
        return self._outcomes[host]

    def __iter__(self) -> Iterator[str]:
        return iter(self._outcomes)

    def __len__(self) -> int:
        return len(self._outcomes)

    @property
    def succeeded(self) -> dict[str, T]:
        return {h: o.value for h, o in self._outcomes.items() if o.ok}

    @property
    def failed(self) -> dict[str, BaseException]:
        return {h: o.error for h, o in self._outcomes.items() if not o.ok}

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        """``3/4 hosts ok; ws3: ConnectError: …``"""
        line = f"{len(self.succeeded)}/{len(self)} hosts ok"
        failures = "; ".join(f"{h}: {describe(e)}" for h, e in self.failed.items())
        return f"{line}; {failures}" if failures else line

    def raise_on_failure(self) -> FanOutResult[T]:
        if self.failed:
            raise FanOutError(self.summary(), self.failed)
        return self

    def __repr__(self) -> str:
        return f"<FanOutResult {self.summary()}>"


def fan_out(hosts: Iterable[Host], fn: Callable[[Host], T], *,
            max_workers: int = DEFAULT_WORKERS,
            timeout: float | Callable[[Host], float] | None = None,
            on_done: Callable[[Outcome[T]], None] | None = None) -> FanOutResult[T]:
    """Call ``fn(host)`` for every host, at most ``max_workers`` at once.

    ``timeout`` is each host's deadline in seconds (a number, or a function of the host:
    :func:`fabfleet.config.deadlines.deadlines`), counted from when its call starts; a
    host past it gets a :class:`ConnectError` outcome and its thread is abandoned.
    Exceptions from ``fn`` become that host's outcome (non-:class:`FleetError` ones
    too, so one bug on one host does not hide the others). ``on_done`` is called (from
    the calling thread) as each host finishes, e.g. to print progress.
    """
    hosts = list(hosts)
    done: queue.Queue[tuple[str, Any, BaseException | None]] = queue.Queue()

    def work(host: Host) -> None:
        try:
            done.put((host.name, fn(host), None))
        except BaseException as exc:  # noqa: BLE001 - reported as this host's outcome
            done.put((host.name, None, exc))

    limit = {h.name: (timeout(h) if callable(timeout) else timeout) for h in hosts}
    outcomes: dict[str, Outcome[T]] = {}
    running: dict[str, float] = {}  # host -> start time
    pending = list(hosts)

    def finish(outcome: Outcome[T]) -> None:
        outcomes[outcome.host] = outcome
        running.pop(outcome.host, None)
        if on_done:
            on_done(outcome)

    while pending or running:
        while pending and len(running) < max(1, max_workers):
            host = pending.pop(0)
            running[host.name] = time.monotonic()
            threading.Thread(target=work, args=(host,), daemon=True,
                             name=f"fabfleet-{host.name}").start()
        ends = [t + limit[n] for n, t in running.items() if limit[n] is not None]
        wait = max(0.0, min(ends) - time.monotonic()) if ends else None
        try:
            name, value, exc = done.get(timeout=wait)
        except queue.Empty:
            now = time.monotonic()
            for name, t0 in list(running.items()):
                if limit[name] is not None and now - t0 >= limit[name]:
                    # Its thread is abandoned (a daemon): the slot goes to the next host.
                    finish(Outcome(name, error=ConnectError(
                        name, f"no answer within the {limit[name]:g}s deadline; the host may be "
                        "hung or overloaded. The other hosts' results are kept; retry it "
                        "alone, or raise the deadline."), seconds=now - t0))
            continue
        if name in running:  # else: it already timed out; its late answer is dropped
            finish(Outcome(name, value=value, error=exc,
                           seconds=time.monotonic() - running[name]))
    return FanOutResult(outcomes[h.name] for h in hosts)



def per_host(hosts: Iterable[Host], fn: Callable[..., T], *,
             max_workers: int = DEFAULT_WORKERS,
             timeout: float | Callable[[Host], float] | None = None) -> FanOutResult[T]:
    """``fn(c)`` with a fresh connection to each host (closed after), at once; see
    :func:`fan_out`."""
    def one(host: Host) -> T:
        with connect(host) as c:
            return fn(c)
    return fan_out(hosts, one, max_workers=max_workers, timeout=timeout)
