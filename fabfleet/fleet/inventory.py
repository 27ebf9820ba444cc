""":class:`Inventory`: the inventory users hold, with the conveniences that reach hosts.

:class:`~fabfleet.config.inventory.HostSet` is the validated data; this subclass adds
``connect``, ``map``, ``imap_unordered``, ``executor``, ``dask`` and ``ipyparallel``, importing the
connection, scheduler and app layers downward, so the data layer never imports them.
The app is imported inside its method, so Dask's and ipyparallel's own imports happen only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..config.inventory import HostSet
from ..config.settings import resolve_project
from ..ssh.connect import FleetConnection, connect
from ..errors import LocalError
from .queue import Queue, submit
from .scheduler import FleetExecutor, ItemOutcome, imap_unordered, map_hosts


class Inventory(HostSet):
    """Hosts from one inventory file; select with :meth:`select`, reach with
    :meth:`connect`, spread calls over them with :meth:`map`."""

    def connect(self, name: str) -> FleetConnection:
        """A :class:`fabric.Connection` to host ``name`` with verified host keys."""
        return connect(self[name])

    def map(self, fn: Callable, items: Iterable[Any], **kwargs: Any) -> list[Any]:
        """``[fn(item) for item in items]`` spread over these hosts, in input order; see
        :func:`fabfleet.fleet.scheduler.map_hosts` (``timeout=``, ``on_output=``,
        ``return_exceptions=``, ``on_progress=``, ``progress=``)."""
        return map_hosts(self, fn, items, **kwargs)

    def imap_unordered(self, fn: Callable, items: Iterable[Any],
                       **kwargs: Any) -> Iterator[ItemOutcome]:
        """Each item's outcome as it completes; see :func:`fabfleet.fleet.scheduler.imap_unordered`."""
        return imap_unordered(self, fn, items, **kwargs)

    def dask(self, **options: Any):
        """``with inv.select(group="gpu").dask() as client:`` — a ``distributed.Client``
        on a Dask scheduler and workers started on these hosts for the current project;
        leaving the block stops them. The project is pushed first so its modules import
        there. Options: ``scheduler_host``, ``idle_timeout``, ``death_timeout``,
        ``start_timeout``, ``push``; see :mod:`fabfleet.apps.dask`."""
        from ..apps.dask import dask_cluster  # only when asked for
        project = resolve_project()
        options.setdefault("project_root", project.root if project.pushable else None)
        return dask_cluster(self, project=project.name, **options)

    def ipyparallel(self, *, attach: bool = False, **options: Any):
        """``with inv.select(group="lab").ipyparallel() as rc:`` — an
        ``ipyparallel.Client`` over a controller and engines (one per ``max_jobs`` slot,
        per free GPU on GPU hosts) started on these hosts for the current project;
        leaving the block stops them all. In a notebook: ``cluster = ….ipyparallel();
        rc = cluster.open()`` … ``cluster.close()``. ``attach=True``: the cluster
        ``fabfleet ipp-up`` started (leaving then only closes the client). Options:
        ``controller_host``, ``start_timeout``, ``engine_timeout``, ``push``; see
        :mod:`fabfleet.apps.ipp`."""
        from ..apps.ipp import IppCluster  # only when asked for
        project = resolve_project()
        if attach:
            return IppCluster.attach(self, project=project.name, **options)
        options.setdefault("project_root", project.root if project.pushable else None)
        return IppCluster(self, project=project.name, **options)

    def queue(self, tasks: Iterable[Any] | None = None, *, gpus_per_task: int = 1,
              name: str | None = None, **options: Any) -> Queue:
        """Hand ``tasks`` (command lines or argument vectors) to these hosts, to run on
        their free GPUs without this process (see :mod:`fabfleet.fleet.queue`); the
        :class:`~fabfleet.fleet.queue.Queue` handle (``status()``, ``wait()``,
        ``cancel()``, ``retry()``). With ``tasks=None``, the handle of the queue ``name``
        submitted earlier, from any process."""
        if tasks is None:
            if not name:
                raise LocalError("give the tasks, or the name of a submitted queue")
            return Queue(list(self), name)
        return submit(list(self), list(tasks), gpus_per_task=gpus_per_task, name=name,
                      **options)

    def executor(self, **options: Any) -> FleetExecutor:
        """A ``concurrent.futures.Executor`` over these hosts (``timeout=``,
        ``on_output=``); see :class:`fabfleet.fleet.scheduler.FleetExecutor`."""
        return FleetExecutor(self, **options)
