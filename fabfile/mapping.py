"""Many calls over many hosts: a ``concurrent.futures.Executor`` and ``map`` on top of it.

:class:`FleetExecutor` runs submitted calls on the selected hosts, ``max_jobs`` at a
time on each (one thread per job slot, pulling from one queue, so a slow host takes
fewer items and never stalls the others). A host that cannot be reached, or has the
wrong Python, hands its item back to the others; when no host is left, the remaining
items fail with the last host's error. Every Future knows its ``.host``.
:func:`map_hosts` and :func:`imap_unordered` are built on it.
"""

from __future__ import annotations

import collections
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, as_completed
from dataclasses import dataclass
from typing import Any

from .errors import ConnectError, FanOutError, HostError, LocalError, PythonMismatchError, RemoteError
from .inventory import Host
from .payload import dumps_call
from .pool import Output, call_on_host, default_output

Progress = Callable[[int, int], None]  # (items done, items total)


class FleetExecutor(Executor):
    """An Executor over hosts. ``timeout`` (seconds) bounds each call (the function is
    stopped on the host); ``on_output`` gets the functions' output (default: mirrored to
    ``sys.stdout``/``sys.stderr``, ``[host]``-prefixed when several hosts are selected).

    Leaving a ``with`` block waits for the submitted calls; leaving it by an exception
    (Ctrl-C, a notebook interrupt) cancels the queued ones and stops the running ones on
    their hosts first.
    """

    def __init__(self, hosts: Iterable[Host], *, timeout: float | None = None,
                 on_output: Output | None = None) -> None:
        self.hosts = list(hosts)
        if not self.hosts:
            raise LocalError("an executor over hosts needs at least one host")
        self.timeout = timeout
        self.output = on_output or default_output(prefix=len(self.hosts) > 1)
        self._queue: collections.deque[tuple[Future, bytes]] = collections.deque()
        self._cond = threading.Condition()
        self._live = {h.name for h in self.hosts}
        self._last_error: BaseException | None = None
        self._shutdown = False
        self._cancel = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- Executor API ------------------------------------------------------------------
    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)`` on one of the hosts; a Future with ``.host``
        (set when a host takes it). Pickling errors raise here, at once."""
        blob = dumps_call(fn, *args, **kwargs)
        return self._submit_blob(blob)

    def _submit_blob(self, blob: bytes) -> Future:
        f: Future = Future()
        f.host = None  # type: ignore[attr-defined]
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot submit to an executor after shutdown")
            if not self._live:
                f.set_exception(self._last_error or ConnectError("-", "no host left"))
                return f
            self._queue.append((f, blob))
            self._cond.notify()
            if not self._threads:
                self._start()
        return f

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            self._cond.notify_all()
        if wait:
            for t in self._threads:
                t.join()
        if hasattr(self.output, "flush"):
            self.output.flush()

    def stop(self) -> None:
        """Cancel what is queued and stop the running calls on their hosts (each fails
        with a ``CommandError``), then wait for the threads: bounded by the interrupt
        grace period."""
        self._cancel.set()
        self.shutdown(wait=True, cancel_futures=True)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.stop()
        else:
            self.shutdown(wait=True)
        return False

    # -- the job slots -----------------------------------------------------------------
    def _start(self) -> None:
        for h in self.hosts:
            for j in range(h.max_jobs):
                t = threading.Thread(target=self._slot, args=(h,), daemon=True,
                                     name=f"fabfleet-map-{h.name}-{j}")
                self._threads.append(t)
                t.start()

    def _next(self, host: Host) -> tuple[Future, bytes] | None:
        with self._cond:
            while True:
                if host.name not in self._live:
                    return None
                if self._queue:
                    return self._queue.popleft()
                if self._shutdown:
                    return None
                self._cond.wait(0.5)

    def _slot(self, host: Host) -> None:
        while (work := self._next(host)) is not None:
            f, blob = work
            if not f.running() and not f.set_running_or_notify_cancel():
                continue  # cancelled while queued
            f.host = host.name  # type: ignore[attr-defined]
            try:
                value = call_on_host(host, blob, on_output=self.output, timeout=self.timeout,
                                     cancel=self._cancel)
            except (ConnectError, PythonMismatchError) as exc:
                self._host_failed(host, f, blob, exc)
            except BaseException as exc:  # noqa: BLE001 - any failure is this item's error
                f.set_exception(exc)
            else:
                f.set_result(value)

    def _host_failed(self, host: Host, f: Future, blob: bytes, exc: BaseException) -> None:
        """The host, not the item, is at fault: the item goes back to the others."""
        with self._cond:
            self._live.discard(host.name)
            self._last_error = exc
            if self._live and not self._cancel.is_set():
                self._queue.appendleft((f, blob))
                self._cond.notify_all()
                return
            orphans = [w for w, _ in self._queue]
            self._queue.clear()
        f.set_exception(exc)
        for w in orphans:
            if w.set_running_or_notify_cancel():
                w.set_exception(exc)


# -- map -------------------------------------------------------------------------------
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


def _outcome(i: int, f: Future) -> ItemOutcome:
    host = getattr(f, "host", None)
    if f.cancelled():
        return ItemOutcome(i, host, error=LocalError(f"item {i} was cancelled"))
    exc = f.exception()
    return ItemOutcome(i, host, error=exc) if exc is not None else \
        ItemOutcome(i, host, value=f.result())


def _progress_bar(total: int, enabled: bool | None):
    """A rich progress bar on a terminal or in a notebook (``enabled=None``: decide)."""
    if enabled is None:
        in_notebook = "ipykernel" in sys.modules
        enabled = total >= 20 and (in_notebook or sys.stderr.isatty())
    if not enabled:
        return None
    from rich.progress import Progress
    bar = Progress(transient=True)
    bar.start()
    return bar


def imap_unordered(hosts: Iterable[Host], fn: Callable, items: Iterable[Any], *,
                   timeout: float | None = None, on_output: Output | None = None
                   ) -> Iterator[ItemOutcome]:
    """Run ``fn(item)`` over ``hosts``, yielding each :class:`ItemOutcome` (index, host,
    value or error) as it completes. Breaking out, or Ctrl-C, stops the rest."""
    ex = FleetExecutor(hosts, timeout=timeout, on_output=on_output)
    futures = {}
    completed = False
    try:
        for i, item in enumerate(items):
            futures[ex.submit(fn, item)] = i
        for f in as_completed(futures):
            yield _outcome(futures[f], f)
        completed = True
    finally:
        if completed:
            ex.shutdown(wait=True)
        else:  # the caller stopped early (break, an exception, Ctrl-C): stop the rest
            ex.stop()


def map_hosts(hosts: Iterable[Host], fn: Callable, items: Iterable[Any], *,
              return_exceptions: bool = False, on_output: Output | None = None,
              timeout: float | None = None, on_progress: Progress | None = None,
              progress: bool | None = None) -> list[Any]:
    """``[fn(item) for item in items]``, spread over ``hosts`` (``max_jobs`` at a time each).

    Results come back in input order. A host that cannot be reached (or dies) hands its
    items to the others; an item whose function raises — or whose call fails in any
    other way — is an error for that item only. With ``return_exceptions`` errors take
    the failed items' places (exactly one entry per item); otherwise :class:`MapError`
    is raised after every item has finished. ``timeout`` bounds each item's call;
    ``on_progress(done, total)`` is called as items finish; ``progress`` shows a bar
    (``None``: on a terminal or in a notebook, for 20 items or more). Ctrl-C stops the
    running calls on their hosts and re-raises.
    """
    items = list(items)
    ex = FleetExecutor(hosts, timeout=timeout, on_output=on_output)
    bar = _progress_bar(len(items), progress)
    task = bar.add_task("map", total=len(items)) if bar else None
    futures: list[Future] = []
    try:
        futures = [ex.submit(fn, item) for item in items]
        for done, _ in enumerate(as_completed(futures), 1):
            if bar is not None:
                bar.update(task, completed=done)
            if on_progress is not None:
                on_progress(done, len(items))
    except BaseException:
        ex.stop()
        raise
    finally:
        if bar is not None:
            bar.stop()
        ex.shutdown(wait=True)
    outcomes = [_outcome(i, f) for i, f in enumerate(futures)]
    if return_exceptions:
        return [o.value if o.ok else o.error for o in outcomes]
    if any(not o.ok for o in outcomes):
        raise MapError(outcomes)
    return [o.value for o in outcomes]
