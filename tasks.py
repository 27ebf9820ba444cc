"""fabfleet's command line: thin Invoke tasks over the ``fabfile`` library.

Each task parses its flags, loads the inventory, calls one library function, renders
the result, and turns library errors into ``invoke.Exit(message, code)``.
"""

from __future__ import annotations

import functools
import json
import sys

from invoke import Collection, Exit, task

import fabfile
from fabfile import FleetError, Inventory



@functools.lru_cache(maxsize=None)
def console():
    """rich's console, imported on first use (``--json`` runs never pay for it)."""
    from rich.console import Console
    # Pipes and CI logs get wide tables instead of rich's 80-column default.
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def Table(*args, **kwargs):  # noqa: N802 - stands in for rich.table.Table
    from rich.table import Table as RichTable
    return RichTable(*args, **kwargs)

SELECT_HELP = {
    "host": "host names or shell-style globs, comma-separated (ws1,gpu*)",
    "group": "every host in this inventory group",
    "all": "every host in the inventory",
}


def _inventory(c) -> Inventory:
    configured = (c.config.get("fabfleet") or {}).get("inventory")
    return Inventory.load(fabfile.find_inventory(configured))


def _select(c, host, group, all_) -> Inventory:
    return _inventory(c).select(host=host, group=group, all=all_)


def fleet_errors(fn):
    """Turn a :class:`FleetError` into a clean ``Exit`` (message on stderr, code 1)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FleetError as exc:
            raise Exit(f"fabfleet: {exc}", 2 if isinstance(exc, fabfile.InventoryError)
                       else 1) from None
    return wrapper


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


@task(help=SELECT_HELP)
@fleet_errors
def hosts(c, host=None, group=None, all=False):  # noqa: A002 - the CLI flag is --all
    """Show the inventory as a table (all hosts unless a selection is given)."""
    inv = _inventory(c)
    if host or group or all:
        inv = inv.select(host=host, group=group, all=all)
    table = Table(title=f"{inv.path}: {len(inv)} hosts")
    for col in ("host", "address", "user", "groups", "python", "work dir", "env", "jobs",
                "host keys"):
        table.add_column(col)
    for h in inv:
        address = f"{h.address}:{h.port}" if h.port else h.address
        env = f"venv {h.venv}" if h.venv else f"conda {h.conda_env}" if h.conda_env else "-"
        table.add_row(h.name, address, h.user or "(ssh config)", ",".join(h.groups) or "-",
                      h.python, h.work_dir, env, str(h.max_jobs), h.host_key_policy)
    console().print(table)


def render_check(report: dict) -> None:
    table = Table(title="check-env")
    for col in ("host", "ok", "python", "cloudpickle", "cpus", "memory free", "disk free",
                "load", "gpus"):
        table.add_column(col)
    for name, r in report["hosts"].items():
        gpus = r.get("gpus") or []
        gpu_text = f"{len(gpus)}× {gpus[0]['name'].removeprefix('NVIDIA ')}" if gpus else "-"
        py = r.get("python") or "-"
        if r.get("python") and not r.get("python_matches_local"):
            py += " (≠ local)"
        table.add_row(
            name, "[green]yes[/]" if r["ok"] else "[red]NO[/]", py,
            r.get("cloudpickle") or ("-" if not r.get("python") else "- (we ship it)"),
            str(r.get("cpus") or "-"), _size(r.get("mem_available")), _size(r.get("disk_free")),
            f"{r['load'][0]:g}" if r.get("load") else "-", gpu_text)
    console().print(table)
    for name, r in report["hosts"].items():
        if r.get("error"):
            console().print(f"[red]✗[/] {r['error']}")
        for w in r.get("warnings") or []:
            console().print(f"[yellow]![/] {name}: {w}")
    n_ok = sum(r["ok"] for r in report["hosts"].values())
    console().print(f"{n_ok}/{len(report['hosts'])} hosts ready")


@task(help={**SELECT_HELP, "require": "packages that must import on the host (numpy,torch)",
            "json": "print one JSON object instead of a table"})
@fleet_errors
def check_env(c, host=None, group=None, all=False, require="", json_=False):  # noqa: A002
    """Check that hosts are reachable and ready: Python, packages, disk, memory, GPUs."""
    selected = _select(c, host, group, all)
    packages = [p.strip() for p in require.split(",") if p.strip()]
    report = fabfile.check_hosts(selected, require=packages)
    if json_:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        render_check(report)
    if not report["ok"]:
        raise Exit(code=1)


@task(help={"prefix": "port prefix: hosts listen on 127.0.0.1:<prefix>01… (default 22)"})
def testbed_up(c, prefix=22):
    """Start the local SSH testbed (Docker) and write testbed/state/inventory.yaml."""
    import testbed
    inv = testbed.up(int(prefix))
    console().print(f"testbed is up; its inventory: {inv}\n"
              f"use it with:  export FABFLEET_INVENTORY={inv}")


@task(help={"prefix": "port prefix given to testbed.up"})
def testbed_down(c, prefix=22):
    """Stop and remove the local SSH testbed's containers."""
    import testbed
    testbed.down(int(prefix))


ns = Collection(hosts, check_env)
ns.add_collection(Collection("testbed", up=testbed_up, down=testbed_down))
ns.configure({"fabfleet": {"inventory": None}})
