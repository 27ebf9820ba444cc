""":class:`Inventory`: the inventory users hold, with the conveniences that reach hosts.

:class:`~fabfile.inventory.HostSet` is the validated data; this subclass adds
``connect``, ``map``, ``imap_unordered`` and ``executor``, importing the connection and
payload layers downward, so the data layer never imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .connection import FleetConnection, connect
from .inventory import HostSet
from .mapping import FleetExecutor, ItemOutcome, imap_unordered, map_hosts


class Inventory(HostSet):
    """Hosts from one inventory file; select with :meth:`select`, reach with
    :meth:`connect`, spread calls over them with :meth:`map`."""

    def connect(self, name: str) -> FleetConnection:
        """A :class:`fabric.Connection` to host ``name`` with verified host keys."""
        return connect(self[name])

    def map(self, fn: Callable, items: Iterable[Any], **kwargs: Any) -> list[Any]:
        """``[fn(item) for item in items]`` spread over these hosts, in input order; see
        :func:`fabfile.mapping.map_hosts` (``timeout=``, ``on_output=``,
        ``return_exceptions=``, ``on_progress=``, ``progress=``)."""
        return map_hosts(self, fn, items, **kwargs)

    def imap_unordered(self, fn: Callable, items: Iterable[Any],
                       **kwargs: Any) -> Iterator[ItemOutcome]:
        """Each item's outcome as it completes; see :func:`fabfile.mapping.imap_unordered`."""
        return imap_unordered(self, fn, items, **kwargs)

    def dask(self, **options: Any):
        """``with inv.select(group="gpu").dask() as client:`` — a ``distributed.Client``
        on a Dask scheduler and workers started on these hosts for the current project;
        leaving the block stops them. The project is pushed first so its modules import
        there. Options: ``scheduler_host``, ``idle_timeout``, ``death_timeout``,
        ``start_timeout``, ``push``; see :mod:`fabfile.daskfleet`."""
        import os

        from .daskfleet import dask_cluster
        from .project import find_project, is_unmarked_home, project_name
        root = find_project(os.getcwd())
        options.setdefault("project_root", None if is_unmarked_home(root) else root)
        return dask_cluster(self, project=project_name(root), **options)

    def executor(self, **options: Any) -> FleetExecutor:
        """A ``concurrent.futures.Executor`` over these hosts (``timeout=``,
        ``on_output=``); see :class:`fabfile.mapping.FleetExecutor`."""
        return FleetExecutor(self, **options)
