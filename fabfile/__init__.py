"""fabfleet: run work on your own SSH machines from one inventory file.

The library behind the ``fabfleet`` command; import it from your own fabfile, notebook
or script::

    from fabfile import Inventory, check_env, remote
    inv = Inventory.load("inventory.yaml")
    with inv.connect("ws1") as c:
        print(check_env(c))

Layers, imports pointing one way: :mod:`fabfile.cli` and :mod:`fabfile.tasks` (the
command line) → the library modules below → Fabric/Paramiko. Nothing in the library
prints (except a remote program's own output, which the caller asked for) or exits.

The names below are imported from their modules on first use (PEP 562), so the
command line starts without importing Paramiko until a task connects.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: public name -> the module that defines it
_EXPORTS = {
    "FleetConnection": "connection", "connect": "connection",
    "AuthError": "errors", "CommandError": "errors", "ConnectError": "errors",
    "FanOutError": "errors", "FleetError": "errors", "HostError": "errors",
    "HostKeyError": "errors", "InventoryError": "errors", "LocalError": "errors",
    "PythonMismatchError": "errors", "RemoteError": "errors", "RunInterrupted": "errors",
    "TransferError": "errors",
    "check_env": "facts", "check_hosts": "facts",
    "FanOutResult": "fanout", "Outcome": "fanout", "fan_out": "fanout",
    "Inventory": "fleet",
    "Host": "inventory", "HostSet": "inventory", "find_inventory": "inventory",
    "PrefixedOutput": "output",
    "FleetExecutor": "mapping", "ItemOutcome": "mapping", "MapError": "mapping",
    "imap_unordered": "mapping", "map_hosts": "mapping",
    "call_on_host": "pool", "close_workers": "pool",
    "RemoteFunction": "payload", "call": "payload", "dumps_call": "payload",
    "load_payload_bytes": "payload", "remote": "payload", "run_on_hosts": "payload",
    "run_payload": "payload", "save_payload": "payload",
    "DeadlineError": "errors",
    "find_project": "project", "layout": "project", "project_name": "project",
    "RunResult": "runs", "clean": "runs", "run_many": "runs", "run_script": "runs",
    "setup_workdir": "runs", "stop_active_runs": "runs",
    "GatheredFile": "transfer", "PushResult": "transfer", "gather": "transfer",
    "local_files": "transfer", "push": "transfer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fabfile' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .connection import FleetConnection, connect
    from .errors import (AuthError, CommandError, ConnectError, FanOutError, FleetError,
                         HostError, HostKeyError, InventoryError, LocalError,
                         PythonMismatchError, RemoteError, RunInterrupted, TransferError)
    from .facts import check_env, check_hosts
    from .fanout import FanOutResult, Outcome, fan_out
    from .fleet import Inventory
    from .inventory import Host, HostSet, find_inventory
    from .output import PrefixedOutput
    from .errors import DeadlineError
    from .mapping import FleetExecutor, ItemOutcome, MapError, imap_unordered, map_hosts
    from .payload import (RemoteFunction, call, dumps_call, load_payload_bytes, remote,
                          run_on_hosts, run_payload, save_payload)
    from .pool import call_on_host, close_workers
    from .project import find_project, layout, project_name
    from .runs import RunResult, clean, run_many, run_script, setup_workdir, stop_active_runs
    from .transfer import GatheredFile, PushResult, gather, local_files, push
