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
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, as_completed
from dataclasses import dataclass
from typing import Any

import cloudpickle

from .errors import ConnectError, FanOutError, HostError, LocalError, PythonMismatchError, RemoteError
from .inventory import Host
from . import worker as proto
from .payload import dumps_call, dumps_function
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
    is raised after every item has finished. ``on_progress(done, total)`` is called (in
    this thread) as items finish; ``progress`` shows a bar (``None``: on a terminal or in
    a notebook, for 20 items or more). Ctrl-C stops the running calls on their hosts and
    re-raises.

    Without ``timeout``, items travel in chunks that grow until a call takes about
    :data:`CHUNK_SECONDS` (never more than a fair share of what is left), and the
    function is sent once per worker: tiny items cost microseconds, not a round trip.
    With ``timeout`` (seconds, per item) every item is its own call.
    """
    items = list(items)
    hosts = list(hosts)
    if timeout is not None:
        return _map_calls(hosts, fn, items, return_exceptions=return_exceptions,
                          on_output=on_output, timeout=timeout, on_progress=on_progress,
                          progress=progress)
    outcomes = _Chunked(hosts, fn, items, on_output).run(on_progress, progress)
    if return_exceptions:
        return [o.value if o.ok else o.error for o in outcomes]
    if any(not o.ok for o in outcomes):
        raise MapError(outcomes)
    return [o.value for o in outcomes]


def _map_calls(hosts, fn, items, *, return_exceptions, on_output, timeout, on_progress,
               progress) -> list[Any]:
    """One call per item, through :class:`FleetExecutor` (per-item deadlines)."""
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


CHUNK_SECONDS = 0.05  # a chunk grows until one call takes about this long
MAX_CHUNK = 4096


class _Chunked:
    """The chunked map: one thread per job slot, each taking chunks of item indices
    from one queue, sized from that slot's own measured time per item."""

    def __init__(self, hosts: list[Host], fn: Callable, items: list[Any],
                 on_output: Output | None) -> None:
        if not hosts:
            raise LocalError("map over hosts: no hosts selected")
        self.hosts, self.items = hosts, items
        self.define = dumps_function(fn)
        self.output = on_output or default_output(prefix=len(hosts) > 1)
        self.queue = collections.deque(range(len(items)))
        self.results: list[ItemOutcome | None] = [None] * len(items)
        self.cond = threading.Condition()
        self.in_flight = 0
        self.done = 0
        self.live = {h.name for h in hosts}
        self.last_error: BaseException | None = None
        self.cancel = threading.Event()
        self.slots = sum(h.max_jobs for h in hosts)

    def run(self, on_progress: Progress | None, progress: bool | None) -> list[ItemOutcome]:
        threads = [threading.Thread(target=self._slot, args=(h,), daemon=True,
                                    name=f"fabfleet-map-{h.name}-{j}")
                   for h in self.hosts for j in range(h.max_jobs)]
        bar = _progress_bar(len(self.items), progress)
        task = bar.add_task("map", total=len(self.items)) if bar else None
        reported = 0
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.05)
                    if self.done != reported:
                        break
                if self.done != reported:
                    reported = self.done
                    if bar is not None:
                        bar.update(task, completed=reported)
                    if on_progress is not None:
                        on_progress(reported, len(self.items))
        except BaseException:
            self.cancel.set()  # stops the running calls on their hosts
            for t in threads:
                t.join(30)
            raise
        finally:
            if bar is not None:
                bar.stop()
            if hasattr(self.output, "flush"):
                self.output.flush()
        if self.done != reported and on_progress is not None:
            on_progress(self.done, len(self.items))
        err = self.last_error or ConnectError("-", "no host left")
        return [r if r is not None else ItemOutcome(i, None, error=err)
                for i, r in enumerate(self.results)]

    def _take(self, host: Host, size: int) -> list[int]:
        with self.cond:
            while True:
                if host.name not in self.live or self.cancel.is_set():
                    return []
                if self.queue:
                    fair = max(1, -(-len(self.queue) // self.slots))  # leave work for others
                    n = min(size, fair, len(self.queue))
                    self.in_flight += n
                    return [self.queue.popleft() for _ in range(n)]
                if self.in_flight == 0:
                    return []
                self.cond.wait(0.2)  # a dying host may still hand items back

    def _slot(self, host: Host) -> None:
        size = 1
        while idx := self._take(host, size):
            started = time.monotonic()
            outcomes, requeue = [], False
            try:
                blob = cloudpickle.dumps((self.define[0], [self.items[i] for i in idx]),
                                         protocol=pickle.HIGHEST_PROTOCOL)
                values = call_on_host(host, blob, on_output=self.output, cancel=self.cancel,
                                      kind=proto.CHUNK, define=self.define)
                for i, (tag, v) in zip(idx, values):
                    outcomes.append(ItemOutcome(i, host.name, value=v) if tag == "v" else
                                    ItemOutcome(i, host.name, error=RemoteError(
                                        host.name, v["type"], v["message"], v["traceback"])))
            except (ConnectError, PythonMismatchError) as exc:
                with self.cond:  # the host, not the items, is at fault
                    self.live.discard(host.name)
                    self.last_error = exc
                    requeue = bool(self.live) and not self.cancel.is_set()
                if not requeue:
                    outcomes = [ItemOutcome(i, host.name, error=exc) for i in idx]
            except Exception as exc:  # noqa: BLE001 - these items' error
                outcomes = [ItemOutcome(i, host.name, error=exc) for i in idx]
            per_item = (time.monotonic() - started) / len(idx)
            size = max(1, min(MAX_CHUNK, int(CHUNK_SECONDS / max(per_item, 1e-7))))
            with self.cond:
                self.in_flight -= len(idx)
                if requeue:
                    self.queue.extendleft(reversed(idx))
                else:
                    for o in outcomes:
                        self.results[o.index] = o
                    self.done += len(outcomes)
                self.cond.notify_all()
