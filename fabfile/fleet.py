""":class:`Inventory`: the inventory users hold, with the conveniences that reach hosts.

:class:`~fabfile.inventory.HostSet` is the validated data; this subclass adds
``connect`` and ``map``, importing the connection and payload layers downward, so the
data layer never imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .connection import FleetConnection, connect
from .inventory import HostSet
from .payload import map_hosts


class Inventory(HostSet):
    """Hosts from one inventory file; select with :meth:`select`, reach with
    :meth:`connect`, spread calls over them with :meth:`map`."""

    def connect(self, name: str) -> FleetConnection:
        """A :class:`fabric.Connection` to host ``name`` with verified host keys."""
        return connect(self[name])

    def map(self, fn: Callable, items: Iterable[Any], **kwargs: Any):
        """Spread ``fn(item)`` over these hosts; see :func:`fabfile.payload.map_hosts`."""
        return map_hosts(self, fn, items, **kwargs)
