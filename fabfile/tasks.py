"""fabfleet's task collection, ``ns``: thin Invoke tasks over the ``fabfile`` library.

The ``fabfleet`` command (:mod:`fabfile.cli`) is an Invoke ``Program`` over ``ns``; a
project's one-line ``tasks.py`` (``from fabfile.tasks import ns``, written by
``fabfleet init``) gives the same tasks to ``inv``. Each task parses its flags, finds
the inventory and the project, calls one library function, renders the result, and
turns library errors into ``invoke.Exit(message, code)``. Library modules are imported
inside the tasks, so ``--list`` and ``--help`` never import Paramiko.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sys
import time
from pathlib import Path

from invoke import Collection, Exit, Task, task

#: One letter, one meaning, in every task (Invoke would otherwise pick first letters:
#: ``-h`` for --host, hiding --help, and ``-p`` for four different flags).
SHORT_FLAGS = {"host": "H", "group": "g", "all": "a", "json": "j", "exclude": "x",
               "timeout": "t"}
HELP_WORDS = ("--help", "-h")


class FleetTask(Task):
    """An Invoke task with fabfleet's fixed short flags and error handling.

    * ``TASK --help`` prints the task's help even when the task takes a positional
      argument (Invoke's parser would take ``--help`` as that argument's value);
    * a :class:`~fabfile.errors.FleetError` becomes ``Exit("fabfleet: …", code)``: 2 for
      inventory and local (usage) errors, 1 for host errors — never a traceback.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs["auto_shortflags"] = False
        super().__init__(*args, **kwargs)
        self.help_text = dict(self.help)  # Invoke pops entries from .help as it parses

    def arg_opts(self, name, default, taken_names):  # noqa: D102 - Invoke API
        opts = super().arg_opts(name, default, taken_names)
        short = SHORT_FLAGS.get(name.strip("_"))
        if short and short not in taken_names:
            opts["names"].append(short)
        return opts

    def __call__(self, *args, **kwargs):
        if any(kwargs.get(p) in HELP_WORDS for p in self.positional):
            print_task_help(self)
            return None
        from .errors import FleetError, InventoryError, LocalError
        try:
            return super().__call__(*args, **kwargs)
        except FleetError as exc:
            code = 2 if isinstance(exc, (InventoryError, LocalError)) else 1
            raise Exit(f"fabfleet: {exc}", code) from None


def print_task_help(t: Task) -> None:
    """Invoke's own ``--help TASK`` output, under the name the user typed."""
    from invoke import Program
    binary = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fabfleet"
    binary = "fabfleet" if binary.startswith("fabfleet") else "inv"
    name = t.name.replace("_", "-")
    t.help = dict(getattr(t, "help_text", t.help))
    Program(namespace=Collection(t), binary=binary).run([binary, "--help", name], exit=False)


def fleet_task(*args, **kwargs):
    """``@task`` with :class:`FleetTask`."""
    return task(*args, klass=FleetTask, **kwargs)


# -- rendering -------------------------------------------------------------------------
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


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


# -- arguments, inventory, project ------------------------------------------------------
SELECT_HELP = {
    "host": "host names or shell-style globs, comma-separated (ws1,gpu*)",
    "group": "every host in this inventory group",
    "all": "every host in the inventory",
}


def _number(flag: str, value, kind=float, minimum: float = 0):
    """A numeric flag value, or a usage error naming the flag (never a traceback)."""
    if value is None or value == "":
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise Exit(f"fabfleet: --{flag} {value!r}: expected a "
                   f"{'whole ' if kind is int else ''}number", 2) from None
    if number < minimum or (kind is float and number != number):
        raise Exit(f"fabfleet: --{flag} {value!r}: expected at least {minimum}", 2)
    return number


def _settings(c) -> dict:
    return c.config.get("fabfleet") or {}


def project_root() -> Path:
    from .project import find_project
    return find_project(os.getcwd())


def _project(c) -> tuple[Path, str]:
    """(local project root, remote project name) for the current directory."""
    from .project import project_name
    root = project_root()
    return root, project_name(root, _settings(c).get("project"))


def _inventory(c):
    from .fleet import Inventory
    from .inventory import find_inventory
    configured = _settings(c).get("inventory")
    if configured and not os.path.isabs(os.path.expanduser(str(configured))):
        configured = str(project_root() / configured)  # as written in the project's config
    return Inventory.load(find_inventory(configured))


def _select(c, host, group, all_):
    return _inventory(c).select(host=host, group=group, all=all_)


def _per_host(selected, fn, *, max_parallel: int = 32):
    """``fn(c)`` on each selected host's connection, at once; a FanOutResult."""
    from .connection import connect
    from .fanout import fan_out

    def one(h):
        with connect(h) as conn:
            return fn(conn)
    return fan_out(selected, one, max_workers=max_parallel)


def _report(results, title: str, columns: list[str], row) -> None:
    """A table of per-host outcomes (``row(value) -> cells``), errors below, summary line;
    exit 1 if any host failed."""
    from .errors import FleetError
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


# -- tasks -----------------------------------------------------------------------------
STARTER_INVENTORY = """\
# fabfleet inventory: the SSH hosts this project runs on. Every key is optional except
# `hosts`; see the README ("The inventory") for all of them.
defaults:                     # every host inherits these unless it overrides them
  user: {user}
  key_file: ~/.ssh/id_ed25519 # relative paths resolve next to this file
  python: python3             # the interpreter on the hosts
  work_dir: ~/fabfleet        # remote root for pushed code and runs (made 0700)
  connect_timeout: 10
  host_key_policy: strict     # strict | accept-new  (fabfleet never accepts any key)
  # known_hosts: known_hosts  # an extra known_hosts file, besides ~/.ssh/known_hosts
hosts:
  ws1:
    hostname: ws1.example.org # omit to let ~/.ssh/config resolve the name
    port: 22
    groups: [workstations]
    # venv: ~/venvs/myproj    # or conda_env: myenv — activated for runs and payloads
    # env: {{OMP_NUM_THREADS: "8"}}
    # max_jobs: 2             # concurrent runs/payloads on this host
"""

STARTER_TASKS = '''\
"""Tasks for `inv` in this project: fabfleet's collection (same as the `fabfleet` command)."""
from fabfile.tasks import ns  # noqa: F401
'''


@fleet_task(help={"tasks": "also write a one-line tasks.py for `inv` (default: yes)"})
def init(c, tasks=True):
    """Start using fabfleet here: a starter inventory.yaml (+ tasks.py for inv)."""
    from .errors import InventoryError
    from .inventory import find_inventory
    wrote, kept = [], []
    try:
        existing = find_inventory(_settings(c).get("inventory"))
    except InventoryError:
        existing = None
    if existing and os.path.exists(existing):
        kept.append(f"inventory: using {existing} (found; not writing another)")
    else:
        _write_new("inventory.yaml", STARTER_INVENTORY.format(
            user=os.environ.get("USER") or "dev"), wrote, kept)
    if tasks:
        _write_new("tasks.py", STARTER_TASKS, wrote, kept)
    for line in wrote:
        print(f"wrote {line}")
    for line in kept:
        print(line)
    target = existing if existing and os.path.exists(existing) else "inventory.yaml"
    print(f"next: edit {target} (your hosts), then run `fabfleet check-env --all`"
          + (" (or `inv check-env --all`)" if tasks else ""))


def _write_new(name: str, text: str, wrote: list, kept: list) -> None:
    """Create ``name`` in the current directory; never replace an existing file."""
    try:
        with open(name, "x") as f:
            f.write(text)
    except FileExistsError:
        kept.append(f"{name}: exists, left as it is")
    else:
        wrote.append(os.path.abspath(name))


@fleet_task(help=SELECT_HELP)
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


@fleet_task(help={**SELECT_HELP, "require": "packages that must import on the host (numpy,torch)",
                  "json": "print one JSON object instead of a table"})
def check_env(c, host=None, group=None, all=False, require="", json_=False):  # noqa: A002
    """Check that hosts are reachable and ready: Python, packages, disk, memory, GPUs."""
    from .facts import check_hosts
    selected = _select(c, host, group, all)
    packages = [p.strip() for p in require.split(",") if p.strip()]
    report = check_hosts(selected, require=packages, project=_project(c)[1])
    if json_:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        render_check(report)
    if not report["ok"]:
        raise Exit(code=1)


@fleet_task(help={**SELECT_HELP, "requirements": "a local requirements.txt: make this project's "
                  "venv on each host and pip install -r it there (its runs then use it)"})
def setup_workdir(c, host=None, group=None, all=False, requirements=None):  # noqa: A002
    """Create each host's work dir (0700), and this project's venv with requirements."""
    from .runs import setup_workdir as setup
    selected = _select(c, host, group, all)
    if requirements and not os.path.isfile(requirements):
        raise Exit(f"fabfleet: {requirements}: requirements file not found", 2)
    project = _project(c)[1]
    results = _per_host(selected, lambda conn: setup(
        conn, project=project, requirements=requirements))
    _report(results, "setup-workdir", ["work dir", "venv"],
            lambda r: [r["work_dir"], r["venv"] or "-"])


@fleet_task(iterable=["exclude"], help={
    **SELECT_HELP, "source": "directory to push (default: the project root)",
    "exclude": "extra pattern to leave out, .gitignore syntax (repeatable)",
    "method": "auto (rsync when both ends have it, else SFTP), rsync or sftp",
    "max_parallel": "hosts pushed to at once (default 16)"})
def push(c, host=None, group=None, all=False, source=None, exclude=None,  # noqa: A002
         method="auto", max_parallel=None):
    """Sync this project to <work_dir>/<project>/ on the hosts (only changed files go)."""
    from .project import layout
    from .transfer import local_files, push as push_dir
    if method not in ("auto", "rsync", "sftp"):
        raise Exit(f"fabfleet: --method {method!r}: expected auto, rsync or sftp", 2)
    max_parallel = _number("max-parallel", max_parallel, int, 1) or 16
    selected = _select(c, host, group, all)
    root, name = _project(c)
    source = Path(source).resolve() if source else root
    files = local_files(source, exclude or [])
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
        return push_dir(conn, source, layout(conn.fleet_host, name)["project"],
                        method=method, on_progress=cb, files=files)
    try:
        results = _per_host(selected, push_one, max_parallel=max_parallel)
    finally:
        if progress is not None:
            progress.stop()
    _report(results, f"push {source} ({len(files)} files, {_size(total)})",
            ["method", "files sent", "bytes sent", "remote dir"],
            lambda r: [r.method, f"{r.files_sent}/{r.files_total}", _size(r.bytes_sent),
                       r.remote_dir])


@fleet_task(iterable=["exclude"], help={
    **SELECT_HELP, "script": "local Python script to run",
    "args": "arguments for the script, split like a shell would ('--epochs 3 --name \"a b\"')",
    "no_push": "do not push the project first; run what the last push left on the hosts",
    "exclude": "extra pattern the project push leaves out, .gitignore syntax (repeatable)",
    "max_parallel": "hosts running at once (default 32; each host also honours its max_jobs)",
    "timeout": "seconds before the script's whole process group is stopped on the host "
               "(exit code 124; default: none)",
    "keep_children": "leave processes the script started running after it exits "
                     "(default: stop them)",
    "detach": "start it as a job that outlives this connection; print each host's run id "
              "and return (see jobs, logs, kill)",
    "json": "with --detach: print one JSON object of run ids"})
def run_remote(c, script, host=None, group=None, all=False, args="",  # noqa: A002
               no_push=False, exclude=None, max_parallel=None, timeout=None,
               keep_children=False, detach=False, json_=False):
    """Run a Python script on the hosts from the synced project, output streamed live."""
    from .errors import CommandError, RunInterrupted
    from .output import PrefixedOutput
    from .runs import run_many
    if not os.path.isfile(script):
        raise Exit(f"fabfleet: {script}: script not found (nothing was sent to any host)", 2)
    timeout = _number("timeout", timeout)
    max_parallel = _number("max-parallel", max_parallel, int, 1) or 32
    try:
        argv = shlex.split(args)
    except ValueError as exc:
        raise Exit(f"fabfleet: --args {args!r}: {exc}", 2) from None
    selected = _select(c, host, group, all)
    root, name = _project(c)
    if detach:
        return _detached(selected, script, argv, root, name, no_push, exclude, max_parallel,
                         timeout, keep_children, json_)
    printer = PrefixedOutput(prefix=len(selected) > 1)
    try:
        results = run_many(
            selected, script, argv, project_root=root, project=name, cwd=os.getcwd(),
            push_project=not no_push, excludes=exclude or [], max_parallel=max_parallel,
            on_output=printer, log_root=root / "gathered", timeout=timeout,
            keep_children=keep_children)
    except RunInterrupted as exc:
        printer.flush()
        raise Exit(f"fabfleet: {exc}", 130) from None
    printer.flush()
    for name, o in results.succeeded.items():
        for note in o.notes:
            err_console().print(f"fabfleet: {name}: {note}", markup=False)
    if len(selected) == 1:
        (name, o), = results.items()
        if not o.ok:
            raise Exit(f"fabfleet: {o.error}", 255 if not isinstance(o.error, CommandError)
                       or o.error.exit_code is None else o.error.exit_code)
        if o.value.stopped == "timeout":
            err_console().print(f"fabfleet: {name}: {script} was stopped after {timeout:g}s "
                                f"(--timeout) with its whole process group; exit code "
                                f"{o.value.exit_code} (run dir {o.value.run_dir})", markup=False)
        elif o.value.exit_code != 0:
            err_console().print(f"fabfleet: {name}: {script} exited {o.value.exit_code} "
                                f"(run dir {o.value.run_dir})", markup=False)
            if o.value.exit_code == 1 and "ModuleNotFoundError" in o.value.stderr_tail:
                err_console().print("fabfleet: a module was not found on the host: if it is "
                                    "part of this project, check it is not excluded from "
                                    "the push (.gitignore, --exclude); if it is a package, "
                                    "install it there (setup-workdir --requirements).")
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
            table.add_row(name, "[red]timed out[/]" if o.value.stopped == "timeout" else
                          "[red]failed[/]", str(o.value.exit_code),
                          f"{o.value.seconds:.1f}", o.value.run_dir)
        else:
            failed += 1
            table.add_row(name, f"[red]{type(o.error).__name__}[/]", "-", f"{o.seconds:.1f}", "-")
    err_console().print(table)
    for name, e in results.failed.items():
        err_console().print(f"[red]✗[/] {e}")
    err_console().print(f"{len(results) - failed}/{len(results)} hosts ok; local copies of the "
                        f"output: {root / 'gathered'}/<host>/runs/")
    raise Exit(code=1 if failed else 0)


def _detached(selected, script, argv, root, name, no_push, exclude, max_parallel, timeout,
              keep_children, as_json) -> None:
    from .runs import run_many
    results = run_many(selected, script, argv, project_root=root, project=name,
                       cwd=os.getcwd(), push_project=not no_push, excludes=exclude or [],
                       max_parallel=max_parallel, timeout=timeout,
                       keep_children=keep_children, detach=True)
    doc = {"ok": results.ok, "hosts": {
        h: {"ok": o.ok, "run_id": o.value.run_id if o.ok else None,
            "error": None if o.ok else str(o.error)} for h, o in results.items()}}
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        for h, entry in doc["hosts"].items():
            if entry["ok"]:
                print(f"{h}: started {entry['run_id']}")
            else:
                err_console().print(f"✗ {entry['error']}", markup=False)
        run_ids = {e["run_id"] for e in doc["hosts"].values() if e["ok"]}
        if run_ids:
            rid = run_ids.pop()
            print(f"follow it: fabfleet logs {rid} -H {next(iter(doc['hosts']))} --follow; "
                  "list: fabfleet jobs -a")
    if not doc["ok"]:
        raise Exit(code=1)


def _age(seconds) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


@fleet_task(help={**SELECT_HELP, "all_projects": "runs of every project, not only this one",
                  "json": "print one JSON object: per host, its runs"})
def jobs(c, host=None, group=None, all=False, all_projects=False, json_=False):  # noqa: A002
    """List runs and detached jobs on the hosts: running, exited, killed or lost."""
    from .jobs import list_jobs
    selected = _select(c, host, group, all)
    project = None if all_projects else _project(c)[1]
    results = _per_host(selected, lambda conn: list_jobs(conn, project))
    if json_:
        doc = {"ok": results.ok, "hosts": {
            h: {"ok": o.ok, "error": None if o.ok else str(o.error),
                "runs": o.value if o.ok else []} for h, o in results.items()}}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        if not results.ok:
            raise Exit(code=1)
        return
    table = Table(title=f"jobs ({'all projects' if all_projects else project})")
    for col in ("host", "run id", "project", "status", "exit", "age", "command"):
        table.add_column(col)
    colors = {"running": "green", "exited": "white", "killed": "yellow", "lost": "red"}
    for h, o in results.items():
        for r in o.value if o.ok else []:
            code = "-" if r["exit_code"] is None else str(r["exit_code"])
            table.add_row(h, r["run_id"], r["project"],
                          f"[{colors[r['status']]}]{r['status']}[/]", code, _age(r["age"]),
                          r["command"])
    console().print(table)
    for h, e in results.failed.items():
        console().print(f"✗ {e}", markup=False)
    if results.failed:
        raise Exit(code=1)


def _one_host(c, host):
    inv = _inventory(c)
    if not host:
        raise Exit("fabfleet: name the host with -H/--host HOST", 2)
    selected = inv.select(host=host)
    if len(selected) != 1:
        raise Exit(f"fabfleet: -H {host!r} names {len(selected)} hosts; give exactly one", 2)
    return next(iter(selected))


@fleet_task(help={"run_id": "the run id (run-remote --detach printed it; jobs lists them)",
                  "host": "the host the job runs on", "follow": "stream until the job ends "
                  "and exit with its exit code (resumes after a dropped connection)",
                  "stderr": "the job's stderr instead of its stdout"})
def logs(c, run_id, host=None, follow=False, stderr=False):
    """Print a job's output; with --follow, until it ends, exiting with its exit code."""
    from .jobs import Job
    h = _one_host(c, host)
    out = sys.stdout.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()
    report = Job(h, run_id).logs(stream="stderr" if stderr else "stdout", follow=follow,
                                 on_output=write)
    if not follow:
        return
    status, code = report["status"], report["exit_code"]
    if status == "lost":
        raise Exit(f"fabfleet: {h.name}: job {run_id} is lost: its process is gone without an "
                   "exit code (killed outside fabfleet, or the host rebooted)", 255)
    if status == "killed":
        err_console().print(f"fabfleet: {h.name}: job {run_id} was killed "
                            f"({report.get('killed_by')})", markup=False)
    raise Exit(code=code if code is not None else 255)


@fleet_task(help={"run_id": "the run id of the job", "host": "the host the job runs on",
                  "signal": "signal to send first: TERM (default), INT, HUP, KILL, QUIT, USR1, "
                            "USR2; SIGKILL follows after a grace period",
                  "json": "print the job's status after, as JSON"})
def kill(c, run_id, host=None, signal="TERM", json_=False):
    """Stop a detached job: its whole process group, SIGKILL after a grace period."""
    from .jobs import Job, parse_signal
    sig = parse_signal(signal)
    h = _one_host(c, host)
    report = Job(h, run_id).kill(sig)
    if json_:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    elif report.get("signalled"):
        how = " (then SIGKILL: it outlived the grace period)" if report.get("escalated") else ""
        print(f"{h.name}: job {run_id} killed with SIG{sig}{how}; status {report['status']}, "
              f"exit code {report['exit_code']}")
    else:
        print(f"{h.name}: job {run_id} is not running (status {report['status']}); nothing "
              "was signalled")


def _port(flag: str, value, allow_zero: bool = False) -> int:
    port = _number(flag, value, int, 0 if allow_zero else 1)
    if port is None or port > 65535:
        raise Exit(f"fabfleet: {flag} {value!r}: expected a port number "
                   f"({'0-' if allow_zero else '1-'}65535)", 2)
    return port


def _serve_tunnel(t, conn, message: str) -> None:
    """Print where the tunnel listens and keep it up until Ctrl-C or SIGTERM (or the host
    is lost)."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    print(message, flush=True)
    try:
        while not t.wait(1.0):
            transport = conn.client.get_transport()
            if transport is None or not transport.is_active():
                t.close()
                raise Exit(f"fabfleet: {conn.fleet_host.name}: the connection was lost; the "
                           "tunnel is closed. Run the command again to reopen it.", 1)
    except KeyboardInterrupt:
        t.close()
        err_console().print("fabfleet: tunnel closed; the port is free", markup=False)


@fleet_task(help={"remote_port": "the port on the host (its loopback) to reach",
                  "host": "the host", "local_port": "local port on 127.0.0.1 "
                  "(default 0: a free one, printed)"})
def tunnel(c, remote_port, host=None, local_port=0):
    """Forward 127.0.0.1:LOCAL to a port on the host; prints 127.0.0.1:PORT. Ctrl-C stops."""
    from .connection import connect
    from .tunnel import Tunnel
    rp = _port("REMOTE_PORT", remote_port)
    lp = _port("--local-port", local_port, allow_zero=True)
    h = _one_host(c, host)
    conn = connect(h)
    t = Tunnel(conn, rp, lp, on_event=lambda m: err_console().print(m, markup=False)).start()
    _serve_tunnel(t, conn, f"127.0.0.1:{t.local_port}")
    conn.close()


@fleet_task(help={"host": "the host", "local_port": "local port on 127.0.0.1 (default: free)"})
def jupyter(c, host=None, local_port=0):
    """Jupyter on a host (started as a job, or the running one), tunnelled; prints the URL."""
    from .connection import connect
    from .jupyter import open_jupyter
    from .project import relative_inside
    lp = _port("--local-port", local_port, allow_zero=True)
    h = _one_host(c, host)
    root, name = _project(c)
    conn = connect(h)
    t, url, job, reused = open_jupyter(conn, name, cwd=relative_inside(os.getcwd(), root) or "",
                                       local_port=lp,
                                       on_event=lambda m: err_console().print(m, markup=False))
    how = "reconnected to the running server" if reused else "started"
    err_console().print(f"fabfleet: {h.name}: Jupyter {how} (job {job.run_id}; stop it with "
                        f"`fabfleet kill {job.run_id} -H {h.name}`)", markup=False)
    _serve_tunnel(t, conn, url)
    conn.close()


def render_top(doc: dict):
    table = Table(title="top")
    for col in ("host", "load", "cpus", "memory used", "disk free", "gpus (util, memory)",
                "jobs"):
        table.add_column(col)
    for name, r in doc["hosts"].items():
        if not r["ok"]:
            table.add_row(name, "[red]unreachable[/]", "-", "-", "-", "-", "-")
            continue
        used = (r["mem_total"] or 0) - (r["mem_available"] or 0)
        gpus = " ".join(f"{g['index']}:{g['utilization_pct']}% "
                        f"{(g['memory_used_mib'] or 0) / 1024:.0f}/"
                        f"{(g['memory_total_mib'] or 0) / 1024:.0f}G" for g in r["gpus"]) or "-"
        table.add_row(name, f"{r['load'][0]:g}" if r.get("load") else "-", str(r.get("cpus")),
                      f"{_size(used)} / {_size(r['mem_total'])}", _size(r.get("disk_free")),
                      gpus, str(len(r["jobs"])))
    return table


@fleet_task(help={**SELECT_HELP, "once": "one snapshot, then exit",
                  "json": "with --once: print one JSON object", "interval": "seconds between "
                  "refreshes (default 3)"})
def top(c, host=None, group=None, all=False, once=False, json_=False,  # noqa: A002
        interval=None):
    """A live table of load, memory, disk, GPUs and running jobs on the hosts."""
    from .facts import top_hosts
    every = _number("interval", interval) or 3.0
    selected = _select(c, host, group, all)
    if once or json_:
        doc = top_hosts(selected)
        if json_:
            sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        else:
            console().print(render_top(doc))
        if not doc["ok"]:
            for name, r in doc["hosts"].items():
                if not r["ok"]:
                    err_console().print(f"✗ {r['error']}", markup=False)
            raise Exit(code=1)
        return
    from rich.live import Live
    try:
        with Live(render_top(top_hosts(selected)), console=console(),
                  refresh_per_second=1) as live:
            while True:
                time.sleep(every)
                live.update(render_top(top_hosts(selected)))
    except KeyboardInterrupt:
        return


@fleet_task(help={**SELECT_HELP, "scheduler_host": "host for the scheduler (default: the "
                  "first selected)", "idle_timeout": "the scheduler stops after this long "
                  "without clients or tasks (default 1h)"})
def dask_up(c, host=None, group=None, all=False, scheduler_host=None,  # noqa: A002
            idle_timeout="1h"):
    """Start a Dask scheduler and workers (max_jobs per host) on the hosts, as jobs."""
    from .daskfleet import DaskCluster
    selected = _select(c, host, group, all)
    root, name = _project(c)
    from .project import is_unmarked_home
    cluster = DaskCluster(list(selected), project=name,
                          project_root=None if is_unmarked_home(root) else root,
                          scheduler_host=scheduler_host, idle_timeout=idle_timeout)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    port = cluster.address.rsplit(":", 1)[1]
    print(f"scheduler: {cluster.address} on {cluster.scheduler_name} "
          f"({cluster.n_workers} workers on {len(cluster.hosts)} hosts)")
    print(f"reach it from here: fabfleet tunnel -H {cluster.scheduler_name} {port}  "
          "→ Client('tcp://127.0.0.1:PORT')")
    if cluster.dashboard_port:
        print(f"dashboard: fabfleet tunnel -H {cluster.scheduler_name} "
              f"{cluster.dashboard_port}  → http://127.0.0.1:PORT/status")
    print("jobs: " + ", ".join(f"{j.host.name} {j.run_id}" for j in cluster.jobs))
    print("stop it: fabfleet dask-down -H " + ",".join(h.name for h in cluster.hosts))
    for conn in cluster.conns.values():
        conn.close()


@fleet_task(help=SELECT_HELP)
def dask_down(c, host=None, group=None, all=False):  # noqa: A002
    """Stop this project's Dask scheduler and workers on the hosts."""
    from .daskfleet import stop_project_clusters
    selected = _select(c, host, group, all)
    project = _project(c)[1]
    results = _per_host(selected, lambda conn: stop_project_clusters(conn, project))
    _report(results, f"dask-down ({project})", ["jobs stopped"],
            lambda ids: [", ".join(ids) or "-"])


@fleet_task(help={
    **SELECT_HELP, "patterns": "globs relative to the remote project dir, space-separated "
                               "('results/*.csv **/*.log')",
    "dest": "local root; files land in <dest>/<host>/… (default: gathered/ in the project)",
    "overwrite": "replace local files whose content differs (default: keep them, report)"})
def gather(c, patterns, host=None, group=None, all=False, dest=None,  # noqa: A002
           overwrite=False):
    """Copy remote files matching patterns into ./gathered/<host>/…, checksum-verified."""
    from .project import layout
    from .transfer import gather as gather_files
    try:
        pattern = shlex.split(patterns)
    except ValueError as exc:
        raise Exit(f"fabfleet: patterns {patterns!r}: {exc}", 2) from None
    if not pattern:
        raise Exit("fabfleet: give at least one pattern, e.g. fabfleet gather --all "
                   "'results/*.csv'", 2)
    selected = _select(c, host, group, all)
    root, name = _project(c)
    dest = dest or str(root / "gathered")
    results = _per_host(selected, lambda conn: gather_files(
        conn, layout(conn.fleet_host, name)["project"], pattern,
        os.path.join(dest, conn.fleet_host.name), overwrite=overwrite))
    conflicts = [f"{h}: {g.local}" for h, files in results.succeeded.items() for g in files
                 if g.status == "conflict"]
    refused = [f"{h}: {g.remote!r}" for h, files in results.succeeded.items() for g in files
               if g.status == "refused"]
    try:
        _report(results, "gather", ["copied", "unchanged", "kept (differs)", "local dir"],
                lambda files: [str(sum(g.status == "copied" for g in files)),
                               str(sum(g.status == "unchanged" for g in files)),
                               str(sum(g.status == "conflict" for g in files)),
                               os.path.join(dest, "<host>")])
    finally:
        for line in conflicts:
            console().print(f"[yellow]![/] {line} differs from the remote copy and was kept; "
                            "move it away or pass --overwrite", markup=False)
        for line in refused:
            console().print(f"! {line}: refused, its name would land outside "
                            f"{dest}/<host>/ (nothing was written)", markup=False)
    if conflicts or refused:
        raise Exit(code=1)


@fleet_task(help={**SELECT_HELP, "code": "also remove this project's pushed code",
                  "venv": "also remove this project's venv (setup-workdir --requirements)",
                  "all_projects": "remove the run dirs of every project, not just this one"})
def clean(c, host=None, group=None, all=False, code=False, venv=False,  # noqa: A002
          all_projects=False):
    """Remove this project's run dirs on the hosts (with --code, its pushed code too)."""
    from .runs import clean as clean_host
    selected = _select(c, host, group, all)
    project = _project(c)[1]
    results = _per_host(selected, lambda conn: clean_host(
        conn, project, code=code, venv=venv, all_projects=all_projects))
    _report(results, f"clean ({'all projects' if all_projects else project})", ["removed"],
            lambda paths: [", ".join(paths)])


@fleet_task(help={**SELECT_HELP, "payload": "payload file made by fabfile.save_payload(path, fn, *args)",
                  "out": "where results go: <out>/<host>/<payload>.result.pkl (default: gathered)",
                  "max_parallel": "hosts running at once (default 32)"})
def run_pickle(c, payload, host=None, group=None, all=False, out="gathered",  # noqa: A002
               max_parallel=None):
    """Run a pickled call (fabfile.save_payload) on the hosts; save each result locally."""
    import cloudpickle

    from .output import PrefixedOutput
    from .payload import load_payload_bytes, run_on_hosts
    blob = load_payload_bytes(payload)  # a local error before any connection
    max_parallel = _number("max-parallel", max_parallel, int, 1) or 32
    selected = _select(c, host, group, all)
    printer = PrefixedOutput(prefix=len(selected) > 1)
    results = run_on_hosts(selected, blob, max_parallel=max_parallel, on_output=printer)
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


ns = Collection(init, hosts, check_env, setup_workdir, push, run_remote, run_pickle, gather,
                clean, jobs, logs, kill, tunnel, jupyter, top, dask_up, dask_down)
ns.configure({"fabfleet": {"inventory": None, "project": None}})
