"""fabfleet: run work on your own SSH machines from one inventory file.

The library behind ``tasks.py``; import it from your own fabfile, notebook or script::

    from fabfile import Inventory, check_env, remote
    inv = Inventory.load("inventory.yaml")
    with inv.connect("ws1") as c:
        print(check_env(c))
"""

from .connection import FleetConnection, connect
from .errors import (
    AuthError, CommandError, ConnectError, FanOutError, FleetError, HostError, HostKeyError,
    InventoryError, LocalError, PythonMismatchError, RemoteError, RunInterrupted, TransferError,
)
from .facts import check_env, check_hosts
from .fanout import FanOutResult, Outcome, fan_out
from .inventory import Host, Inventory, find_inventory
from .output import PrefixedOutput
from .payload import (MapError, call_on_host, close_workers, load_payload_bytes, map_hosts, remote,
                      run_on_hosts, run_payload, save_payload)
from .runs import RunResult, clean, layout, run_many, run_script, setup_workdir, stop_active_runs
from .transfer import GatheredFile, PushResult, gather, local_files, push

__all__ = [
    "AuthError", "CommandError", "ConnectError", "FanOutError", "FanOutResult",
    "FleetConnection", "FleetError", "Host", "HostError", "HostKeyError", "Inventory",
    "InventoryError", "LocalError", "Outcome", "PythonMismatchError", "RemoteError",
    "TransferError", "check_env", "check_hosts", "connect", "fan_out", "find_inventory",
    "RunInterrupted", "RunResult", "run_many", "run_script", "setup_workdir", "stop_active_runs",
    "PrefixedOutput", "MapError", "call_on_host", "close_workers", "load_payload_bytes", "map_hosts", "remote", "run_on_hosts",
    "run_payload", "save_payload", "clean", "layout", "GatheredFile", "PushResult", "gather", "local_files", "push",
]
