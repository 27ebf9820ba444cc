"""Many calls over many hosts: one scheduler, with an Executor and ``map`` in front.

:class:`Scheduler` runs work on the selected hosts, ``max_jobs`` at a time on each: one
thread per job slot, all pulling from one queue, so a slow host takes less and never
stalls the others. A host that cannot be reached, has the wrong Python, or whose GPUs
are all someone else's hands its work back to the others; when no host is left, what remains fails with the last host's
error. Work is either a whole pickled call (:class:`FleetExecutor`, and ``map`` with a
per-item ``timeout``) or an item of a map: consecutive items of one map travel together
in chunks — index ranges, ``items[start:stop]`` on the wire — that start at
:data:`FIRST_CHUNK` and grow until a call takes about :data:`CHUNK_SECONDS`, never more
than a fair share of what is left and, for tiny items, never fewer than
:data:`MIN_CHUNK` until the very end; the function is sent once per worker. Results are
filled in by slice; only failed items get an outcome object.

:func:`run_on_hosts` is the other shape: the same call once on every host.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, as_completed
from dataclasses import dataclass
from typing import Any

from ..config.inventory import Host
from ..config.settings import resolve_project
from ..errors import (ConnectError, FanOutError, GpusBusyError, HostError, LocalError,
                      PythonMismatchError, RemoteError)
from ..host.payload import dumps, dumps_call, dumps_function
from ..host.pool import Output, call_on_host, default_output, pool_for
from ..host.shipping import remote_error
from ..hostside import worker as proto
from .fanout import FanOutResult, fan_out

Progress = Callable[[int, int], None]  # (items done, items total)
CHUNK_SECONDS = 0.05  # a map chunk grows until one call takes about this long
MAX_CHUNK = 8192
FIRST_CHUNK = 8  # items in a slot's first chunk (of a map whose share allows it)
MIN_CHUNK = 64  # tiny items never travel fewer than this, but at the very end


# -- the scheduler ---------------------------------------------------------------------
class _Work:
    """A whole pickled call. ``done(host, value, error)`` receives its outcome;
    ``begin()`` says whether it should still run (a cancelled Future should not)."""

    __slots__ = ("blob", "done", "begin")

    def __init__(self, blob: bytes, done: Callable[[str | None, Any, BaseException | None],
                                                   None],
                 begin: Callable[[], bool] | None = None) -> None:
        self.blob, self.done, self.begin = blob, done, begin


# finish(host, start, stop, values, errors): a chunk's outcome — ``values`` for
# items[start:stop] (None when the whole chunk failed) and ``errors``, either
# ``{offset: exception}`` or one exception for the whole chunk.
Finish = Callable[[str | None, int, int, list | None, Any], None]


class _Batch:
    """A map's items, handed out as index ranges. The function (``(id, pickle)``) is sent
    once per worker; ``finish`` receives each range's outcome (see :data:`Finish`)."""

    def __init__(self, fn: Callable, items: Sequence[Any], finish: Finish) -> None:
        self.define = dumps_function(fn)
        self.items = items
        self.next = 0  # items[next:] have not been handed out
        self.back: collections.deque[tuple[int, int]] = collections.deque()  # handed back
        self.remaining = len(items)
        self.finish = finish

    def take(self, n: int) -> tuple[int, int]:
        """The next range of at most ``n`` items (handed-back ranges first)."""
        if self.back:
            a, b = self.back.popleft()
            if b - a > n:
                self.back.appendleft((a + n, b))
                b = a + n
        else:
            a = self.next
            b = self.next = min(len(self.items), a + n)
        self.remaining -= b - a
        return a, b

    def give_back(self, a: int, b: int) -> None:
        self.back.appendleft((a, b))
        self.remaining += b - a


class Scheduler:
    """Job-slot threads over ``hosts`` taking work (:class:`_Work`, :class:`_Batch`) from
    one queue (see the module docstring). :meth:`put` work, :meth:`close` when no more
    will come, then :meth:`join`; :attr:`cancel` stops running calls on their hosts."""

    def __init__(self, hosts: Iterable[Host], *, on_output: Output, timeout: float | None = None,
                 project: str | None = None) -> None:
        self.hosts = list(hosts)
        if not self.hosts:
            raise LocalError("no hosts selected to run on")
        # resolved once: every call of this scheduler uses the same project's env
        self.project = project or resolve_project().name
        self.output, self.timeout = on_output, timeout
        self.cond = threading.Condition()
        self.queue: collections.deque[_Work | _Batch] = collections.deque()
        self.in_flight = 0
        self.live = {h.name for h in self.hosts}
        self.last_error: BaseException | None = None
        self.cancel = threading.Event()
        self.closing = False
        self.threads: list[threading.Thread] = []
        self.slots = sum(h.max_jobs for h in self.hosts)

    def put(self, work: _Work | _Batch) -> None:
        with self.cond:
            if self.closing:
                raise RuntimeError("cannot add work to a closed scheduler")
            dead = not self.live
            if not dead:
                self.queue.append(work)
                self.cond.notify_all()
                if not self.threads:
                    self._start()
        if dead:
            self._fail([work])

    def close(self) -> None:
        """No more work will come: threads end once the queue is drained."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()

    def drop_queued(self) -> list[_Work | _Batch]:
        with self.cond:
            dropped = list(self.queue)
            self.queue.clear()
            return dropped

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self.threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def _start(self) -> None:
        for h in self.hosts:
            for j in range(h.max_jobs):
                t = threading.Thread(target=self._slot, args=(h, j), daemon=True,
                                     name=f"fabfleet-map-{h.name}-{j}")
                self.threads.append(t)
                t.start()

    def no_host_error(self) -> BaseException:
        if self.cancel.is_set():
            return LocalError("cancelled before it ran")
        return self.last_error or ConnectError("-", "no host left")

    def _take(self, host: Host, size: int | None) -> \
            tuple[_Work | _Batch, tuple[int, int] | None] | None:
        """The next work for a slot of ``host``: a call, or a range of a batch's items —
        at most ``size`` (``None``: the slot's first, :data:`FIRST_CHUNK`) and a fair share
        of what is left, but for tiny items (``size`` ≥ :data:`MIN_CHUNK`) not fewer than
        that while there are so many left."""
        with self.cond:
            while True:
                if host.name not in self.live or self.cancel.is_set():
                    return None
                if self.queue:
                    first = self.queue[0]
                    if isinstance(first, _Work):
                        self.queue.popleft()
                        self.in_flight += 1
                        return first, None
                    left = first.remaining
                    fair = -(-left // self.slots)
                    if size is None:
                        n = min(FIRST_CHUNK, fair)
                    else:
                        n = min(size, max(fair, MIN_CHUNK if size >= MIN_CHUNK else 1))
                    a, b = first.take(max(1, min(n, left)))
                    if not first.remaining:
                        self.queue.popleft()
                    self.in_flight += b - a
                    return first, (a, b)
                if self.closing and self.in_flight == 0:
                    return None
                self.cond.wait(0.2)  # a dying host may still hand work back

    def _run(self, host: Host, work: _Batch, a: int, b: int) -> tuple[list, dict]:
        """One range of a batch on ``host``: its values and ``{offset: RemoteError}``."""
        blob = dumps((work.define[0], work.items[a:b]))
        values, errors = call_on_host(host, blob, on_output=self.output, cancel=self.cancel,
                                      kind=proto.CHUNK, define=work.define,
                                      project=self.project)
        return values, {k: remote_error(host.name, v) for k, v in errors.items()}

    def _surplus(self, host: Host, j: int) -> bool:
        """Slot ``j`` of ``host`` has no worker to run on: the host's free GPUs are all
        held by our workers already (one worker per GPU), and there are fewer than
        ``j + 1``. Such a slot ends instead of holding work it cannot start."""
        cap = pool_for(host, self.project).gpu_capacity() if j else None
        if cap is None or j < max(1, cap):
            return False
        with self.cond:
            self.slots -= 1
            self.cond.notify_all()
        return True

    def _slot(self, host: Host, j: int = 0) -> None:
        size: int | None = None
        while not self._surplus(host, j) and (taken := self._take(host, size)) is not None:
            work, span = taken
            count = 1 if span is None else span[1] - span[0]
            if isinstance(work, _Work) and work.begin is not None and not work.begin():
                with self.cond:  # cancelled while queued
                    self.in_flight -= 1
                    self.cond.notify_all()
                continue
            started = time.monotonic()
            requeue = False
            value: Any = None
            errors: Any = None
            try:
                if span is None:
                    value = call_on_host(host, work.blob, on_output=self.output,
                                         timeout=self.timeout, cancel=self.cancel,
                                         project=self.project)
                else:
                    value, errors = self._run(host, work, *span)
            except (ConnectError, PythonMismatchError, GpusBusyError) as exc:
                with self.cond:  # the host, not the work, is at fault
                    self.live.discard(host.name)
                    self.last_error = exc
                    requeue = bool(self.live) and not self.cancel.is_set()
                value, errors = None, exc
            except BaseException as exc:  # noqa: BLE001 - this work's error
                value, errors = None, exc
            if span is not None:
                per_item = (time.monotonic() - started) / count
                size = max(1, min(MAX_CHUNK, int(CHUNK_SECONDS / max(per_item, 1e-7))))
            with self.cond:
                self.in_flight -= count
                if requeue:
                    if isinstance(work, _Work):
                        self.queue.appendleft(work)
                    else:
                        if not work.remaining and work not in self.queue:
                            self.queue.appendleft(work)
                        work.give_back(*span)
                self.cond.notify_all()
            if not requeue:
                if isinstance(work, _Work):
                    work.done(host.name, value, errors)
                else:
                    work.finish(host.name, span[0], span[1], value, errors)
        self._fail_orphans()

    def _fail(self, works: Iterable[_Work | _Batch]) -> None:
        error = self.no_host_error()
        for w in works:
            if isinstance(w, _Work):
                w.done(None, None, error)
            else:
                while w.remaining:
                    a, b = w.take(w.remaining)
                    w.finish(None, a, b, None, error)

    def _fail_orphans(self) -> None:
        """No live host is left (or the work was cancelled): fail what is still queued."""
        with self.cond:
            if self.live and not self.cancel.is_set():
                return
            orphans = list(self.queue)
            self.queue.clear()
            self.cond.notify_all()
        self._fail(orphans)


# -- the Executor ----------------------------------------------------------------------
class FleetExecutor(Executor):
    """An Executor over hosts. ``timeout`` (seconds) bounds each call (the function is
    stopped on the host); ``on_output`` gets the functions' output (default: mirrored to
    ``sys.stdout``/``sys.stderr``, ``[host]``-prefixed when several hosts are selected).

    Leaving a ``with`` block waits for the submitted calls; leaving it by an exception
    (Ctrl-C, a notebook interrupt) cancels the queued ones and stops the running ones on
    their hosts. Every Future knows its ``.host``.
    """

    def __init__(self, hosts: Iterable[Host], *, timeout: float | None = None,
                 on_output: Output | None = None, project: str | None = None) -> None:
        hosts = list(hosts)
        self.output = on_output or default_output(prefix=len(hosts) > 1)
        self.scheduler = Scheduler(hosts, on_output=self.output, timeout=timeout,
                                   project=project)
        self._shutdown = False

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:  # noqa: D102
        """Run ``fn(*args, **kwargs)`` on one of the hosts; a Future of its value (its
        ``.host`` says where it ran). Pickling errors raise here, at once."""
        return self._submit_blob(dumps_call(fn, *args, **kwargs))

    def _submit_blob(self, blob: bytes) -> Future:
        if self._shutdown:
            raise RuntimeError("cannot submit to an executor after shutdown")
        f: Future = Future()
        f.host = None  # type: ignore[attr-defined]

        def begin() -> bool:
            return f.running() or f.set_running_or_notify_cancel()

        def done(host: str | None, value: Any, error: BaseException | None) -> None:
            f.host = host  # type: ignore[attr-defined]
            if not f.running() and not f.set_running_or_notify_cancel():
                return  # cancelled
            if error is not None:
                f.set_exception(error)
            else:
                f.set_result(value)
        self.scheduler.put(_Work(blob, done, begin))
        return f

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        if cancel_futures:
            for w in self.scheduler.drop_queued():
                if isinstance(w, _Work):
                    w.done(None, None, LocalError("cancelled"))
        self.scheduler.close()
        if wait:
            self.scheduler.join()
        if hasattr(self.output, "flush"):
            self.output.flush()

    def stop(self) -> None:
        """Cancel what is queued and stop the running calls on their hosts (each fails
        with a ``CommandError``), then wait for the threads: bounded by the interrupt
        grace period."""
        self.scheduler.cancel.set()
        self.shutdown(wait=True, cancel_futures=True)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.stop()
        else:
            self.shutdown(wait=True)
        return False


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


def imap_unordered(hosts: Iterable[Host], fn: Callable, items: Iterable[Any], *,
                   timeout: float | None = None, on_output: Output | None = None,
                   project: str | None = None) -> Iterator[ItemOutcome]:
    """Run ``fn(item)`` over ``hosts``, yielding each :class:`ItemOutcome` (index, host,
    value or error) as it completes. Breaking out, or Ctrl-C, stops the rest."""
    ex = FleetExecutor(hosts, timeout=timeout, on_output=on_output, project=project)
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
              progress: bool | None = None, project: str | None = None) -> list[Any]:
    """``[fn(item) for item in items]``, spread over ``hosts`` (``max_jobs`` at a time each).

    Results come back in input order. A host that cannot be reached (or dies) hands its
    items to the others; an item whose function raises — or whose call fails in any
    other way — is an error for that item only. With ``return_exceptions`` errors take
    the failed items' places (exactly one entry per item); otherwise :class:`MapError`
    is raised after every item has finished. ``on_progress(done, total)`` is called (in
    this thread) as items finish; ``progress`` shows a bar (``None``: on a terminal or in
    a notebook, for 20 items or more). Ctrl-C stops the running calls on their hosts and
    re-raises.

    Without ``timeout``, items travel in chunks (see the module docstring): tiny items
    cost microseconds, not a round trip. With ``timeout`` (seconds, per item) every item
    is its own call.
    """
    items = list(items)
    hosts = list(hosts)
    output = on_output or default_output(prefix=len(hosts) > 1)
    scheduler = Scheduler(hosts, on_output=output, timeout=timeout, project=project)
    n = len(items)
    results: list[Any] = [None] * n
    done = bytearray(n)  # 1 where an item has its outcome
    failed: dict[int, tuple[str | None, BaseException]] = {}
    spans: list[tuple[int, int, str | None]] = []  # which host did which range
    done_count = [0]

    def finish(host: str | None, a: int, b: int, values: list | None, errors: Any) -> None:
        if values is not None:
            results[a:b] = values
        if isinstance(errors, BaseException):  # the whole range failed
            for i in range(a, b):
                failed[i] = (host, errors)
        elif errors:
            for offset, error in errors.items():
                failed[a + offset] = (host, error)
        done[a:b] = b"\x01" * (b - a)
        spans.append((a, b, host))
        with scheduler.cond:
            done_count[0] += b - a
            scheduler.cond.notify_all()
    if timeout is None:
        works: list[_Work | _Batch] = [_Batch(fn, items, finish)] if items else []
    else:  # every item its own call, under its own deadline
        works = [_Work(dumps_call(fn, item),
                       lambda host, value, error, i=i: finish(
                           host, i, i + 1, None if error else [value], error))
                 for i, item in enumerate(items)]
    _wait_for(scheduler, works, n, done_count, on_progress, progress)
    if hasattr(output, "flush"):
        output.flush()
    if done_count[0] < n:  # no host was left for some items
        error = scheduler.no_host_error()
        for i in (i for i, d in enumerate(done) if not d):
            failed[i] = (None, error)
    if not failed:
        return results
    if return_exceptions:
        for i, (_, error) in failed.items():
            results[i] = error
        return results
    where: list[str | None] = [None] * n
    for a, b, host in spans:
        where[a:b] = [host] * (b - a)
    raise MapError([ItemOutcome(i, failed[i][0], error=failed[i][1]) if i in failed else
                    ItemOutcome(i, where[i], value=v) for i, v in enumerate(results)])


def _wait_for(scheduler: Scheduler, works: list[_Work | _Batch], total: int,
              done_count: list[int], on_progress: Progress | None,
              progress: bool | None) -> None:
    """Run ``works`` to the end, reporting progress from this thread; Ctrl-C (or any
    exception here) stops the running calls on their hosts and re-raises."""
    from ..render import progress_bar  # the bar is rendering: rich only there
    bar = progress_bar(total, progress)
    reported = 0
    try:
        for w in works:
            scheduler.put(w)
        scheduler.close()
        # Until every item has its outcome (not until every slot thread has noticed
        # the end: they exit on their own), or no slot is left to give more.
        while reported != total and (scheduler.alive() or reported != done_count[0]):
            with scheduler.cond:
                if done_count[0] == reported and scheduler.alive():
                    scheduler.cond.wait(0.05)
                now = done_count[0]
            if now != reported:
                reported = now
                if bar is not None:
                    bar.update(reported)
                if on_progress is not None:
                    on_progress(reported, total)
    except BaseException:
        scheduler.cancel.set()  # stops the running calls on their hosts
        scheduler.join(30)
        raise
    finally:
        if bar is not None:
            bar.stop()


# -- the same call on every host -------------------------------------------------------
def run_on_hosts(hosts: Sequence[Host], blob: bytes, *, on_output: Output | None = None,
                 max_parallel: int = 32, timeout: float | None = None,
                 project: str | None = None) -> FanOutResult:
    """The same pickled call on every host at once → :class:`FanOutResult` of values."""
    output = on_output or default_output(prefix=len(hosts) > 1)
    try:
        return fan_out(hosts, lambda h: call_on_host(h, blob, on_output=output,
                                                     timeout=timeout, project=project),
                       max_workers=max_parallel)
    finally:
        if hasattr(output, "flush"):
            output.flush()


def save_results(results: FanOutResult, payload: str | os.PathLike[str],
                 out: str | os.PathLike[str]) -> str:
    """Write each host's value of a :func:`run_on_hosts` call to
    ``<out>/<host>/<payload stem>.result.pkl`` (whole or not at all) and a summary of
    every host (value or error, remote traceback) to ``<out>/<stem>.summary.json``;
    return the summary's path."""
    import cloudpickle
    stem = os.path.basename(os.fspath(payload)).rsplit(".", 1)[0]
    summary = {"payload": os.path.abspath(payload), "ok": results.ok, "hosts": {}}
    for name, o in results.items():
        entry = {"ok": o.ok, "seconds": round(o.seconds, 3), "result": None, "error": None,
                 "error_type": None, "traceback": None}
        if o.ok:
            path = os.path.join(out, name, f"{stem}.result.pkl")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".part", "wb") as f:
                cloudpickle.dump(o.value, f)
            os.replace(path + ".part", path)
            entry.update(result=path, repr=repr(o.value)[:200])
        else:
            entry.update(error=str(o.error), error_type=type(o.error).__name__,
                         traceback=getattr(o.error, "remote_traceback", None))
        summary["hosts"][name] = entry
    os.makedirs(out, exist_ok=True)
    summary_path = os.path.join(out, f"{stem}.summary.json")
    with open(summary_path + ".part", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(summary_path + ".part", summary_path)
    return summary_path
