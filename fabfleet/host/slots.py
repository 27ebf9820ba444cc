"""The one per-host limit on concurrent work: ``max_jobs`` slots per host, per process.

Attached runs, payload calls (each call holds a slot while its worker runs it) and
detached jobs being started all take a slot from the same semaphore, so one process
never runs more than ``max_jobs`` things at once on a host, whichever API started them.
"""

from __future__ import annotations

import threading

from ..config.inventory import Host

_lock = threading.Lock()
_slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}


def host_slots(host: Host) -> threading.BoundedSemaphore:
    """The semaphore of ``host``'s ``max_jobs`` slots (one per host name and limit)."""
    key = (host.name, host.max_jobs)
    with _lock:
        sem = _slots.get(key)
        if sem is None:
            sem = _slots[key] = threading.BoundedSemaphore(host.max_jobs)
        return sem
