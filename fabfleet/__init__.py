"""fabfleet: run work on your own SSH machines from one inventory file.

The library behind the ``fabfleet`` command; import it from your own fabfile, notebook
or script::

    from fabfleet import Inventory, check_env, remote
    inv = Inventory.load("inventory.yaml")
    with inv.connect("ws1") as c:
        print(check_env(c))

Layers, imports pointing one way (the README's "Code layout" has every module)::

    cli/      the command line: program, options, tasks     (imports everything below)
    fleet/    many hosts: fan-out, checks, runs, the scheduler, Inventory
    apps/     Dask, Jupyter on the fleet
    host/     one host: files, push, gather, facts, runs, jobs, slots, payloads
    ssh/      connections, host keys, liveness, exec, quoting, launch, tunnels, output
    config/   inventory data, the settings resolver, deadlines
    errors    the exception tree            render   tables and bars (the only rich user)
    hostside/ code that runs on the hosts: standard library only, sent as source

Nothing in the library prints (except a remote program's own output, which the caller
asked for, and ``map``'s optional progress bar) or exits.

The names below are imported from their modules on first use (PEP 562), so the
command line starts without importing Paramiko until a task connects.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: public name -> the module that defines it
_EXPORTS = {
    "FleetConnection": "ssh.connect", "connect": "ssh.connect",
    "AuthError": "errors", "CommandError": "errors", "ConnectError": "errors",
    "DeadlineError": "errors", "FanOutError": "errors", "FleetError": "errors",
    "HostError": "errors", "HostKeyError": "errors", "InventoryError": "errors",
    "LocalError": "errors", "PythonMismatchError": "errors", "RemoteError": "errors",
    "GpusBusyError": "errors",
    "RunInterrupted": "errors", "TransferError": "errors",
    "Host": "config.inventory", "HostSet": "config.inventory",
    "Project": "config.settings", "find_inventory": "config.settings",
    "find_project": "config.settings", "layout": "config.settings",
    "project_name": "config.settings", "resolve_project": "config.settings",
    "deadlines": "config.deadlines",
    "PrefixedOutput": "ssh.output", "Tunnel": "ssh.tunnel",
    "check_env": "host.facts", "top_snapshot": "host.facts",
    "GatheredFile": "host.gather", "gather": "host.gather",
    "local_files": "host.files", "PushResult": "host.push", "push": "host.push",
    "clean": "host.jobs", "setup_workdir": "host.workdir",
    "RunResult": "host.runs", "run_script": "host.runs", "run_command": "host.runs",
    "stop_active_runs": "host.runs", "launch_env": "fleet.runs",
    "Job": "host.jobs", "list_jobs": "host.jobs", "start_job": "host.jobs",
    "call_on_host": "host.pool", "close_workers": "host.pool",
    "RemoteFunction": "host.payload", "call": "host.payload", "dumps_call": "host.payload",
    "load_payload_bytes": "host.payload", "remote": "host.payload",
    "run_payload": "host.payload", "save_payload": "host.payload",
    "FanOutResult": "fleet.fanout", "Outcome": "fleet.fanout", "fan_out": "fleet.fanout",
    "per_host": "fleet.fanout",
    "check_hosts": "fleet.checks", "top_hosts": "fleet.checks",
    "run_many": "fleet.runs",
    "FleetExecutor": "fleet.scheduler", "ItemOutcome": "fleet.scheduler",
    "MapError": "fleet.scheduler", "imap_unordered": "fleet.scheduler",
    "map_hosts": "fleet.scheduler", "run_on_hosts": "fleet.scheduler",
    "Inventory": "fleet.inventory",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fabfleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .config.deadlines import deadlines
    from .config.inventory import Host, HostSet
    from .config.settings import (Project, find_inventory, find_project, layout, project_name,
                                  resolve_project)
    from .errors import (AuthError, CommandError, ConnectError, DeadlineError, FanOutError,
                         FleetError, GpusBusyError, HostError, HostKeyError, InventoryError,
                         LocalError, PythonMismatchError, RemoteError, RunInterrupted,
                         TransferError)
    from .fleet.checks import check_hosts, top_hosts
    from .fleet.fanout import FanOutResult, Outcome, fan_out, per_host
    from .fleet.inventory import Inventory
    from .fleet.runs import launch_env, run_many
    from .fleet.scheduler import (FleetExecutor, ItemOutcome, MapError, imap_unordered,
                                  map_hosts, run_on_hosts)
    from .host.facts import check_env, top_snapshot
    from .host.files import local_files
    from .host.gather import GatheredFile, gather
    from .host.jobs import Job, clean, list_jobs, start_job
    from .host.payload import (RemoteFunction, call, dumps_call, load_payload_bytes, remote,
                               run_payload, save_payload)
    from .host.pool import call_on_host, close_workers
    from .host.push import PushResult, push
    from .host.runs import RunResult, run_command, run_script, stop_active_runs
    from .host.workdir import setup_workdir
    from .ssh.connect import FleetConnection, connect
    from .ssh.output import PrefixedOutput
    from .ssh.tunnel import Tunnel
