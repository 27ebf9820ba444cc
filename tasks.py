"""fabfleet's command line: thin Invoke tasks over the ``fabfile`` library.

Each task parses its flags, loads the inventory, calls one library function, renders
the result, and turns library errors into ``invoke.Exit(message, code)``.
"""

from __future__ import annotations

import functools
import json
import os
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


@functools.lru_cache(maxsize=None)
def err_console():
    from rich.console import Console
    return Console(stderr=True, highlight=False, soft_wrap=True,
                   width=None if sys.stderr.isatty() else 160)


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


def _per_host(selected: Inventory, fn, *, max_parallel: int = 32):
    """``fn(c)`` on each selected host's connection, at once; a FanOutResult."""
    def one(h):
        with fabfile.connect(h) as conn:
            return fn(conn)
    return fabfile.fan_out(selected, one, max_workers=max_parallel)


def _report(results, title: str, columns: list[str], row) -> None:
    """A table of per-host outcomes (``row(value) -> cells``), errors below, summary line;
    exit 1 if any host failed."""
    table = Table(title=title)
    for col in ["host", "status", *columns, "seconds"]:
        table.add_column(col)
    for name, o in results.items():
        cells = row(o.value) if o.ok else ["-"] * len(columns)
        table.add_row(name, "[green]ok[/]" if o.ok else "[red]FAILED[/]", *cells,
                      f"{o.seconds:.1f}")
    console().print(table)
    for name, e in results.failed.items():
        console().print(f"[red]✗[/] {e if isinstance(e, FleetError) else f'{name}: {e!r}'}")
    console().print(results.summary())
    if results.failed:
        raise Exit(code=1)


@task(help={**SELECT_HELP, "requirements": "a local requirements.txt: make <work_dir>/venv and "
            "pip install -r it there (runs then use that venv)"})
@fleet_errors
def setup_workdir(c, host=None, group=None, all=False, requirements=None):  # noqa: A002
    """Create each host's work dir (0700), and a venv with requirements if asked."""
    selected = _select(c, host, group, all)
    if requirements and not os.path.isfile(requirements):
        raise Exit(f"fabfleet: {requirements}: requirements file not found", 2)
    results = _per_host(selected, lambda conn: fabfile.setup_workdir(
        conn, requirements=requirements))
    _report(results, "setup-workdir", ["work dir", "venv"],
            lambda r: [r["work_dir"], r["venv"] or "-"])


def _project_name(c) -> str:
    return (c.config.get("fabfleet") or {}).get("project") or os.path.basename(os.getcwd())


@task(iterable=["exclude"], help={
    **SELECT_HELP, "source": "directory to push (default: the current one)",
    "exclude": "extra pattern to leave out, .gitignore syntax (repeatable)",
    "method": "auto (rsync when both ends have it, else SFTP), rsync or sftp",
    "max_parallel": "hosts pushed to at once"})
@fleet_errors
def push(c, host=None, group=None, all=False, source=".", exclude=None,  # noqa: A002
         method="auto", max_parallel=16):
    """Sync this project to <work_dir>/<project>/ on the hosts (only changed files go)."""
    selected = _select(c, host, group, all)
    source = os.path.abspath(source)
    name = os.path.basename(source)
    files = fabfile.local_files(source, exclude or [])
    total = sum(f.size for f in files)
    progress = None
    if total > 8 * 1024 * 1024 and sys.stderr.isatty():
        from rich.progress import Progress
        progress = Progress(console=err_console())
        progress.start()
    bars = {}

    def push_one(conn):
        cb = None
        if progress is not None:
            bars[conn.fleet_host.name] = progress.add_task(conn.fleet_host.name, total=total)
            cb = lambda done, tot, n=conn.fleet_host.name: progress.update(  # noqa: E731
                bars[n], completed=done, total=tot or 1)
        return fabfile.push(conn, source, fabfile.layout(conn.fleet_host, name)["project"],
                            excludes=exclude or [], method=method, on_progress=cb)
    try:
        results = _per_host(selected, push_one, max_parallel=int(max_parallel))
    finally:
        if progress is not None:
            progress.stop()
    _report(results, f"push {source} ({len(files)} files, {_size(total)})",
            ["method", "files sent", "bytes sent", "remote dir"],
            lambda r: [r.method, f"{r.files_sent}/{r.files_total}", _size(r.bytes_sent),
                       r.remote_dir])


@task(iterable=["exclude"], help={
    **SELECT_HELP, "script": "local Python script to run",
    "args": "arguments for the script, split like a shell would ('--epochs 3 --name \"a b\"')",
    "project": "push the current directory first and run the script from it",
    "exclude": "with --project: extra pattern to leave out (repeatable)",
    "max_parallel": "hosts running at once (each host also honours its max_jobs)",
    "timeout": "seconds before a run is stopped (default: none)"})
@fleet_errors
def run_remote(c, script, host=None, group=None, all=False, args="",  # noqa: A002
               project=False, exclude=None, max_parallel=32, timeout=None):
    """Run a Python script on the hosts, output streamed, exit code propagated."""
    import shlex
    if not os.path.isfile(script):
        raise Exit(f"fabfleet: {script}: script not found (nothing was sent to any host)", 2)
    selected = _select(c, host, group, all)
    try:
        argv = shlex.split(args)
    except ValueError as exc:
        raise Exit(f"fabfleet: --args {args!r}: {exc}", 2) from None
    project = project or bool((c.config.get("fabfleet") or {}).get("push_project"))
    printer = fabfile.PrefixedOutput(prefix=len(selected) > 1)
    try:
        results = fabfile.run_many(
            selected, script, argv, project_dir=os.getcwd() if project else None,
            push_project=project, excludes=exclude or [], max_parallel=int(max_parallel),
            on_output=printer, log_root="gathered",
            timeout=float(timeout) if timeout else None)
    except fabfile.RunInterrupted as exc:
        printer.flush()
        raise Exit(f"fabfleet: {exc}", 130) from None
    printer.flush()
    if len(selected) == 1:
        (name, o), = results.items()
        if not o.ok:
            raise Exit(f"fabfleet: {o.error}", 255 if not isinstance(o.error, fabfile.CommandError)
                       or o.error.exit_code is None else o.error.exit_code)
        if o.value.exit_code != 0:
            err_console().print(f"fabfleet: {name}: {script} exited {o.value.exit_code} "
                                f"(run dir {o.value.run_dir})")
        raise Exit(code=o.value.exit_code)
    table = Table(title=f"run-remote {script}")
    for col in ("host", "status", "exit code", "seconds", "run dir"):
        table.add_column(col)
    failed = 0
    for name, o in results.items():
        if o.ok and o.value.exit_code == 0:
            table.add_row(name, "[green]ok[/]", "0", f"{o.value.seconds:.1f}", o.value.run_dir)
        elif o.ok:
            failed += 1
            table.add_row(name, "[red]failed[/]", str(o.value.exit_code),
                          f"{o.value.seconds:.1f}", o.value.run_dir)
        else:
            failed += 1
            table.add_row(name, f"[red]{type(o.error).__name__}[/]", "-", f"{o.seconds:.1f}", "-")
    err_console().print(table)
    for name, e in results.failed.items():
        err_console().print(f"[red]✗[/] {e}")
    err_console().print(f"{len(results) - failed}/{len(results)} hosts ok; local copies of the "
                        "output: gathered/<host>/runs/")
    raise Exit(code=1 if failed else 0)


@task(help={
    **SELECT_HELP, "patterns": "globs relative to the remote project dir, space-separated "
                               "('results/*.csv **/*.log')",
    "dest": "local root; files land in <dest>/<host>/… (default: gathered)",
    "overwrite": "replace local files whose content differs (default: keep them, report)"})
@fleet_errors
def gather(c, patterns, host=None, group=None, all=False, dest="gathered",  # noqa: A002
           overwrite=False):
    """Copy remote files matching patterns into ./gathered/<host>/…, checksum-verified."""
    import shlex
    pattern = shlex.split(patterns)
    if not pattern:
        raise Exit("fabfleet: give at least one pattern, e.g. inv gather --all 'results/*.csv'", 2)
    selected = _select(c, host, group, all)
    name = _project_name(c)
    results = _per_host(selected, lambda conn: fabfile.gather(
        conn, fabfile.layout(conn.fleet_host, name)["project"], pattern,
        os.path.join(dest, conn.fleet_host.name), overwrite=overwrite))
    conflicts = [f"{h}: {g.local}" for h, files in results.succeeded.items() for g in files
                 if g.status == "conflict"]
    try:
        _report(results, "gather", ["copied", "unchanged", "kept (differs)", "local dir"],
                lambda files: [str(sum(g.status == "copied" for g in files)),
                               str(sum(g.status == "unchanged" for g in files)),
                               str(sum(g.status == "conflict" for g in files)),
                               os.path.join(dest, "<host>")])
    finally:
        for line in conflicts:
            console().print(f"[yellow]![/] {line} differs from the remote copy and was kept; "
                            "move it away or pass --overwrite")
    if conflicts:
        raise Exit(code=1)


@task(help={**SELECT_HELP, "code": "also remove the pushed project (<work_dir>/<project>)"})
@fleet_errors
def clean(c, host=None, group=None, all=False, code=False):  # noqa: A002
    """Remove what runs left on the hosts (run dirs; with --code, the pushed project)."""
    selected = _select(c, host, group, all)
    project = _project_name(c) if code else None
    results = _per_host(selected, lambda conn: fabfile.clean(conn, project=project))
    _report(results, "clean", ["removed"], lambda paths: [", ".join(paths)])


@task(help={**SELECT_HELP, "payload": "payload file made by fabfile.save_payload(path, fn, *args)",
            "out": "where results go: <out>/<host>/<payload>.result.pkl (default: gathered)",
            "max_parallel": "hosts running at once"})
@fleet_errors
def run_pickle(c, payload, host=None, group=None, all=False, out="gathered",  # noqa: A002
               max_parallel=32):
    """Run a pickled call (fabfile.save_payload) on the hosts; save each result locally."""
    blob = fabfile.load_payload_bytes(payload)  # a local error before any connection
    selected = _select(c, host, group, all)
    printer = fabfile.PrefixedOutput(prefix=len(selected) > 1)
    results = fabfile.run_on_hosts(selected, blob, max_parallel=int(max_parallel),
                                   on_output=printer)
    printer.flush()
    stem = os.path.basename(payload).rsplit(".", 1)[0]
    summary = {"payload": os.path.abspath(payload), "ok": results.ok, "hosts": {}}
    for name, o in results.items():
        entry = {"ok": o.ok, "seconds": round(o.seconds, 3), "result": None, "error": None,
                 "error_type": None, "traceback": None}
        if o.ok:
            path = os.path.join(out, name, f"{stem}.result.pkl")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".part", "wb") as f:
                import cloudpickle
                cloudpickle.dump(o.value, f)
            os.replace(path + ".part", path)
            entry.update(result=path, repr=repr(o.value)[:200])
        else:
            entry.update(error=str(o.error), error_type=type(o.error).__name__,
                         traceback=getattr(o.error, "remote_traceback", None))
        summary["hosts"][name] = entry
    os.makedirs(out, exist_ok=True)
    summary_path = os.path.join(out, f"{stem}.summary.json")
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    _report(results, f"run-pickle {payload} (summary: {summary_path})", ["result"],
            lambda v: [repr(v)[:60]])


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


ns = Collection(hosts, check_env, setup_workdir, push, run_remote, run_pickle, gather, clean)
ns.add_collection(Collection("testbed", up=testbed_up, down=testbed_down))
ns.configure({"fabfleet": {"inventory": None}})
