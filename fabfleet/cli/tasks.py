"""fabfleet's task collection, ``ns``: thin Invoke tasks over the library.

The ``fabfleet`` command (:mod:`fabfleet.cli.program`) is an Invoke ``Program`` over
``ns``; a project's one-line ``tasks.py`` (``from fabfleet.tasks import ns``, written
by ``fabfleet init``) gives the same tasks to ``inv``, and a Fabric ``fabfile.py`` can
add them to its own. Each task parses its flags, finds the inventory and the project
(:mod:`fabfleet.cli.options`), calls one library function, renders the result
(:mod:`fabfleet.render`), and turns library errors into ``invoke.Exit(message, code)``.
Library modules are imported inside the tasks, so ``--list`` and ``--help`` never
import Paramiko.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from invoke import Collection, Exit

from .. import render
from .options import fleet_task, hosts_task, inventory, number, one_host, port, project


def _json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def _per_host(selected, fn, *, max_parallel: int = 32):
    from ..fleet.fanout import per_host
    return per_host(selected, fn, max_workers=max_parallel)


def _outcomes(results, title, columns, row) -> None:
    """The per-host table; exit 1 if any host failed."""
    render.outcomes(results, title, columns, row)
    if results.failed:
        raise Exit(code=1)


# -- tasks -----------------------------------------------------------------------------
@fleet_task(help={"tasks": "also write a one-line tasks.py for `inv` (default: yes)"})
def init(c, tasks=True):
    """Start using fabfleet here: a starter inventory.yaml (+ tasks.py for inv)."""
    from ..config.settings import find_inventory
    from ..errors import InventoryError
    from .starter import starter_inventory, starter_tasks, write_new
    wrote, kept = [], []
    try:
        existing = find_inventory(project(c).inventory_setting() or "")
    except InventoryError:
        existing = None
    found = bool(existing and os.path.exists(existing))
    todo = [] if found else [("inventory.yaml", starter_inventory(os.environ.get("USER") or
                                                                  "dev"))]
    if found:
        kept.append(f"inventory: using {existing} (found; not writing another)")
    if tasks:
        todo.append(("tasks.py", starter_tasks()))
    for name, text in todo:
        path = write_new(name, text)
        (wrote.append(path) if path else kept.append(f"{name}: exists, left as it is"))
    for line in wrote:
        print(f"wrote {line}")
    for line in kept:
        print(line)
    target = existing if found else "inventory.yaml"
    print(f"next: edit {target} (your hosts), then run `fabfleet check-env --all`"
          + (" (or `inv check-env --all`)" if tasks else ""))


@fleet_task(help={"host": "host names or shell-style globs, comma-separated (ws1,gpu*)",
                  "group": "every host in this inventory group",
                  "all": "every host in the inventory (the default)"})
def hosts(c, host=None, group=None, all=False):  # noqa: A002 - the CLI flag is --all
    """Show the inventory as a table (all hosts unless a selection is given)."""
    inv = inventory(c)
    if host or group or all:
        inv = inv.select(host=host, group=group, all=all)
    render.show(render.hosts_table(inv))


@hosts_task(help={"require": "packages that must import on the host (numpy,torch)",
                  "json": "print one JSON object instead of a table"})
def check_env(c, selected, require="", json_=False):
    """Check that hosts are reachable and ready: Python, packages, disk, memory, GPUs."""
    from ..fleet.checks import check_hosts
    packages = [p.strip() for p in require.split(",") if p.strip()]
    report = check_hosts(selected, require=packages, project=project(c).name)
    if json_:
        _json(report)
    else:
        render.check_report(report)
    if not report["ok"]:
        raise Exit(code=1)


@hosts_task(help={"requirements": "a local requirements.txt: make this project's venv on "
                  "each host and pip install -r it there (its runs then use it)"})
def setup_workdir(c, selected, requirements=None):
    """Create each host's work dir (0700), and this project's venv with requirements."""
    from ..host.workdir import setup_workdir as setup
    if requirements and not os.path.isfile(requirements):
        raise Exit(f"fabfleet: {requirements}: requirements file not found", 2)
    name = project(c).name
    results = _per_host(selected, lambda conn: setup(
        conn, project=name, requirements=requirements))
    _outcomes(results, "setup-workdir", ["work dir", "venv"],
              lambda r: [r["work_dir"], r["venv"] or "-"])


@hosts_task(iterable=["exclude"], help={
    "source": "directory to push (default: the project root)",
    "exclude": "extra pattern to leave out, .gitignore syntax (repeatable)",
    "method": "auto (rsync when both ends have it, else a tar stream, else SFTP), or rsync, "
              "tar or sftp to force one",
    "max_parallel": "hosts pushed to at once (default 16)"})
def push(c, selected, source=None, exclude=None, method="auto", max_parallel=None):
    """Sync this project to <work_dir>/<project>/ on the hosts (only changed files go)."""
    from ..config.settings import layout
    from ..host.files import local_files
    from ..host.push import METHODS, push as push_dir
    if method not in METHODS:
        raise Exit(f"fabfleet: --method {method!r}: expected auto, rsync, tar or sftp", 2)
    max_parallel = number("max-parallel", max_parallel, int, 1) or 16
    proj = project(c)
    source = Path(source).resolve() if source else proj.root
    files = local_files(source, exclude or [], never=[h.key_file for h in selected])
    identity = proj.identity()
    total = sum(f.size for f in files)
    bar = render.progress_bar(total, total > 8 * 1024 * 1024 and sys.stderr.isatty(),
                              names=[h.name for h in selected], transient=False)

    def push_one(conn):
        name = conn.fleet_host.name
        cb = None if bar is None else (lambda done, tot: bar.update(done, tot, name))
        return push_dir(conn, source, layout(conn.fleet_host, proj.name)["project"],
                        method=method, on_progress=cb, files=files,
                        identity=None if source != proj.root else identity)
    try:
        results = _per_host(selected, push_one, max_parallel=max_parallel)
    finally:
        if bar is not None:
            bar.stop()
    try:
        _outcomes(results, f"push {source} ({len(files)} files, {render.size(total)})",
                  ["method", "files sent", "bytes sent", "remote dir"],
                  lambda r: [r.method, f"{r.files_sent}/{r.files_total}",
                             render.size(r.bytes_sent), r.remote_dir])
    finally:
        for name, r in results.succeeded.items():
            for warning in r.warnings:
                render.say(f"{name}: {warning}", mark="!")


_RUN_HELP = {
    "no_push": "do not push the project first; run what the last push left on the hosts",
    "exclude": "extra pattern the project push leaves out, .gitignore syntax (repeatable)",
    "max_parallel": "hosts running at once (default 32; each host also honours its max_jobs)",
    "timeout": "seconds before its whole process group is stopped on the host "
               "(exit code 124; default: none)",
    "keep_children": "leave processes it started running after it exits "
                     "(default: stop them)",
    "detach": "start it as a job that outlives this connection; print each host's run id "
              "and return (see jobs, logs, kill)",
    "json": "with --detach: print one JSON object of run ids",
    "gang": "start every host together; when one fails (non-zero exit, lost), stop the "
            "others (distributed training)",
    "sbatch": "on a Slurm login node (scheduler: slurm): sbatch options for the job, added "
              "to the inventory's ('--time=10 --cpus-per-task=2')",
    "qsub": "on a PBS login node (scheduler: pbs): qsub options for the job "
            "('-l walltime=00:10:00')",
}


@hosts_task(iterable=["exclude"], help={
    "script": "local script to run: Python, or any with a #! line (#!/bin/bash …)",
    "module": "SCRIPT is a module of the project: run it with the host's Python, as "
              "python -m SCRIPT (fabfleet run-remote -H ws1 -m pkg.train)",
    "args": "arguments for the script, split like a shell would ('--epochs 3 --name \"a b\"'); "
            "or put them after --, word for word",
    **_RUN_HELP})
def run_remote(c, selected, script, module=False, args="", no_push=False, exclude=None,
               max_parallel=None, timeout=None, keep_children=False, detach=False,
               sbatch=None, qsub=None,
               json_=False, gang=False):
    """Run a script (or -m MODULE) on the hosts from the synced project, output live."""
    if module:
        script, module = None, script
        if not all(part.isidentifier() for part in module.split(".")):
            raise Exit(f"fabfleet: -m {module!r}: not a module name (pkg.train)", 2)
    elif not os.path.isfile(script):
        raise Exit(f"fabfleet: {script}: script not found (nothing was sent to any host)", 2)
    module = module or None
    from .options import raw_command
    try:
        argv = shlex.split(args)
    except ValueError as exc:
        raise Exit(f"fabfleet: --args {args!r}: {exc}", 2) from None
    if raw_command():  # run-remote train.py -- --epochs 3 'a b': the words as given
        if argv:
            raise Exit("fabfleet: give the script's arguments with --args or after --, "
                       "not both", 2)
        argv = raw_command()
    label = script if script else f"-m {module}"
    _run(c, selected, label, dict(script=script, args=argv, module=module), no_push=no_push,
         exclude=exclude, max_parallel=max_parallel, timeout=timeout,
         keep_children=keep_children, detach=detach, json_=json_, gang=gang,
         sbatch=sbatch, qsub=qsub)


@hosts_task(name="run", iterable=["exclude"], help={
    "shell": "one string for the host's sh -c instead of the words after -- "
             "(pipes, globs, &&)", **_RUN_HELP})
def run_command(c, selected, shell=None, no_push=False, exclude=None, max_parallel=None,
                timeout=None, keep_children=False, detach=False, json_=False, gang=False,
                sbatch=None, qsub=None):
    """Run a command on the hosts: fabfleet run -H HOSTS -- COMMAND [ARG…] (or --shell)."""
    from ..host.runspec import command_vector
    from .options import raw_command
    words = raw_command()
    if bool(words) == bool(shell):
        raise Exit("fabfleet: give the command after --, as words (fabfleet run -H ws1 -- "
                   "nvidia-smi -L), or one string with --shell (not both)", 2)
    vector = command_vector(shell if shell else words, bool(shell))
    label = shell if shell else shlex.join(words)
    _run(c, selected, label, dict(command=vector), no_push=no_push, exclude=exclude,
         max_parallel=max_parallel, timeout=timeout, keep_children=keep_children,
         detach=detach, json_=json_, gang=gang, sbatch=sbatch, qsub=qsub)


def _run(c, selected, label, what, *, no_push, exclude, max_parallel, timeout,
         keep_children, detach, json_, gang, sbatch=None, qsub=None) -> None:
    """run-remote and run: the runs over the hosts, their output, the summary and the
    exit code (one host: its own)."""
    from ..errors import CommandError, RunInterrupted
    from ..fleet.runs import run_many
    from ..ssh.output import PrefixedOutput
    timeout = number("timeout", timeout)
    max_parallel = number("max-parallel", max_parallel, int, 1) or 32
    proj = project(c)
    common = dict(project=proj, cwd=os.getcwd(), push_project=not no_push,
                  excludes=exclude or [], max_parallel=max_parallel, timeout=timeout,
                  keep_children=keep_children, gang=gang, sbatch=sbatch, qsub=qsub, **what)
    if detach:
        return _detached(run_many(selected, detach=True, **common), json_)
    printer = PrefixedOutput(prefix=len(selected) > 1)
    try:
        results = run_many(selected, on_output=printer, log_root=proj.root / "gathered",
                           **common)
    except RunInterrupted as exc:
        printer.flush()
        raise Exit(f"fabfleet: {exc}", 130) from None
    printer.flush()
    for name, o in results.succeeded.items():
        for note in o.notes:
            render.say(f"fabfleet: {name}: {note}", err=True)
    if len(selected) == 1:
        (name, o), = results.items()
        if not o.ok:
            raise Exit(f"fabfleet: {o.error}", 255 if not isinstance(o.error, CommandError)
                       or o.error.exit_code is None else o.error.exit_code)
        if o.value.stopped == "timeout":
            render.say(f"fabfleet: {name}: {label} was stopped after {timeout:g}s "
                       f"(--timeout) with its whole process group; exit code "
                       f"{o.value.exit_code} (run dir {o.value.run_dir})", err=True)
        elif o.value.exit_code != 0:
            render.say(f"fabfleet: {name}: {label} exited {o.value.exit_code} "
                       f"(run dir {o.value.run_dir})", err=True)
            if o.value.exit_code == 1 and "ModuleNotFoundError" in o.value.stderr_tail:
                render.say("fabfleet: a module was not found on the host: if it is part of "
                           "this project, check it is not excluded from the push "
                           "(.gitignore, --exclude); if it is a package, install it there "
                           "(setup-workdir --requirements).", err=True)
        raise Exit(code=o.value.exit_code)
    failed = render.runs_table(f"{'run' if 'command' in what else 'run-remote'} {label}",
                               results)
    render.say(f"{len(results) - failed}/{len(results)} hosts ok; local copies of the "
               f"output: {proj.root / 'gathered'}/<host>/runs/", err=True)
    raise Exit(code=1 if failed else 0)


@hosts_task(help={"file": "task file: one command per line (as `fabfleet run` runs it; "
                          "`python train.py --lr 0.1` …); or give one command after --",
                  "gpus_per_task": "GPUs each task gets, free ones only (default 1; 0: CPU "
                                   "tasks, tasks_per_host at a time)",
                  "name": "the queue's name (default: a new id), for queue-status/-cancel/"
                          "-retry",
                  "max_memory": "MiB a GPU may already use and still count as free "
                                "(default 1024: a process hidden in a container)",
                  "no_push": "do not push the project first",
                  "json": "print {\"name\": …, \"tasks\": N} instead"})
def queue_submit(c, selected, file, gpus_per_task=1, name=None, max_memory=1024,
                 no_push=False, json_=False):
    """Queue tasks on the hosts' free GPUs; they run there without this laptop."""
    from ..fleet.queue import parse_tasks, submit
    from .options import COMMAND_AS_FILE, raw_command
    words = raw_command()
    if (file == COMMAND_AS_FILE) != bool(words):
        raise Exit("fabfleet: give a task file, or one command after -- (not both)", 2)
    if file != COMMAND_AS_FILE:
        try:
            text = Path(file).read_text()
        except OSError as exc:
            raise Exit(f"fabfleet: {file}: {exc.strerror or exc}", 2) from None
        tasks = parse_tasks(text)
    else:
        tasks = [words]
    per = number("gpus-per-task", gpus_per_task, int, 0)
    queue = submit(selected, tasks, gpus_per_task=per, name=name, project=project(c),
                   cwd=os.getcwd(), push_project=not no_push,
                   max_memory_mib=number("max-memory", max_memory, int, 0))
    if json_:
        _json({"name": queue.name, "tasks": len(tasks)})
    else:
        print(f"queue {queue.name}: {len(tasks)} task(s) handed to "
              f"{', '.join(h.name for h in selected)}; they run there without this laptop.")
        print(f"watch it: fabfleet queue-status {queue.name}")


def _queue(c, name, host, group):
    from ..fleet.queue import Queue
    inv = inventory(c)
    hosts = list(inv.select(host=host, group=group)) if (host or group) else list(inv)
    return Queue(hosts, name)


def _queue_report(state, as_json: bool) -> None:
    if as_json:
        _json({"name": state["name"], "tasks": state["tasks"], "hosts": state["hosts"],
               "leftovers": state["leftovers"]})
        return
    render.show(render.table(f"queue {state['name']}",
                             ["task", "host", "state", "exit", "gpus", "seconds", "run id",
                              "command"],
                             [[str(t["index"]), t["host"], t["state"],
                               "-" if t["exit_code"] is None else str(t["exit_code"]),
                               ",".join(g[:12] for g in t["gpus"]) or "-",
                               "-" if t["seconds"] is None else f"{t['seconds']:.0f}",
                               t["run_id"] or "-", t["command"][:60]]
                              for t in state["tasks"]]))
    for host, error in state["hosts"].items():
        if error:
            render.say(f"{host}: not asked: {error}", mark="!")
    for x in state["leftovers"]:
        render.say(f"{x['host']}: pid {x['pid']}, left behind by {x['run_id']}, still held "
                   f"{x['gpu']} after its task ended: stopped", mark="!")


_QUEUE_HELP = {"name": "the queue's name (queue-submit printed it)",
               "host": "only these hosts (default: every host in the inventory)",
               "group": "only this inventory group", "json": "print JSON"}


@fleet_task(help={**_QUEUE_HELP, "no_rebalance": "do not move waiting tasks to hosts "
                                                  "with free GPUs first"})
def queue_status(c, name, host=None, group=None, json_=False, no_rebalance=False):
    """Each task of a queue: host, GPUs, state, exit code, run id (logs/kill work on it).
    Tasks still waiting on a busy host move to hosts of the queue with free GPUs first."""
    queue = _queue(c, name, host, group)
    moved = 0 if no_rebalance else queue.rebalance()
    if moved and not json_:
        render.say(f"moved {moved} waiting task(s) to hosts with free GPUs", mark="!")
    _queue_report(queue.status(), json_)


@fleet_task(help=_QUEUE_HELP)
def queue_cancel(c, name, host=None, group=None, json_=False):
    """Cancel a queue: no task starts any more; running tasks are stopped."""
    _queue_report(_queue(c, name, host, group).cancel(), json_)


@fleet_task(help=_QUEUE_HELP)
def queue_retry(c, name, host=None, group=None, json_=False):
    """Put a queue's failed and lost tasks back; they run again on free GPUs."""
    _queue_report(_queue(c, name, host, group).retry(), json_)


def _detached(results, as_json: bool) -> None:
    doc = {"ok": results.ok, "hosts": {
        h: {"ok": o.ok, "run_id": o.value.run_id if o.ok else None,
            "error": None if o.ok else str(o.error)} for h, o in results.items()}}
    if as_json:
        _json(doc)
    else:
        for h, entry in doc["hosts"].items():
            if entry["ok"]:
                print(f"{h}: started {entry['run_id']}")
            else:
                render.say(entry["error"], err=True, mark="✗")
        run_ids = {e["run_id"] for e in doc["hosts"].values() if e["ok"]}
        if run_ids:
            print(f"follow it: fabfleet logs {run_ids.pop()} -H {next(iter(doc['hosts']))} "
                  "--follow; list: fabfleet jobs -a")
    if not doc["ok"]:
        raise Exit(code=1)


@hosts_task(help={"all_projects": "runs of every project, not only this one",
                  "json": "print one JSON object: per host, its runs"})
def jobs(c, selected, all_projects=False, json_=False):
    """List runs and detached jobs on the hosts: running, exited, killed or lost."""
    from ..host.jobs import list_jobs
    name = None if all_projects else project(c).name
    results = _per_host(selected, lambda conn: list_jobs(conn, name))
    if json_:
        _json({"ok": results.ok, "hosts": {
            h: {"ok": o.ok, "error": None if o.ok else str(o.error),
                "runs": o.value if o.ok else []} for h, o in results.items()}})
    else:
        render.show(render.jobs_table(f"jobs ({'all projects' if all_projects else name})",
                                      {h: o.value for h, o in results.items() if o.ok}))
        for e in results.failed.values():
            render.say(str(e), mark="✗")
    if results.failed:
        raise Exit(code=1)


@fleet_task(help={"run_id": "the run id (run-remote --detach printed it; jobs lists them)",
                  "host": "the host the job runs on", "follow": "stream until the job ends "
                  "and exit with its exit code (resumes after a dropped connection)",
                  "stderr": "the job's stderr instead of its stdout"})
def logs(c, run_id, host=None, follow=False, stderr=False):
    """Print a job's output; with --follow, until it ends, exiting with its exit code."""
    from ..host.jobs import Job
    h = one_host(c, host)
    out = sys.stdout.buffer

    def write(data: bytes) -> None:
        out.write(data)
        out.flush()
    report = Job(h, run_id).logs(stream="stderr" if stderr else "stdout", follow=follow,
                                 on_output=write)
    if not follow:
        return
    status, code = report["status"], report["exit_code"]
    if status == "lost" and report.get("scheduler"):
        from ..host.batch import outcome
        raise Exit(f"fabfleet: {h.name}: job {run_id} is lost: " + " ".join(
            outcome(h, report)[2]), 255)
    if status == "lost":
        raise Exit(f"fabfleet: {h.name}: job {run_id} is lost: its process is gone without an "
                   "exit code (killed outside fabfleet, or the host rebooted)", 255)
    if status == "killed":
        render.say(f"fabfleet: {h.name}: job {run_id} was killed ("
                   f"{(report.get('sched_state') or 'GONE').replace('GONE', '') or report.get('killed_by')})",
                   err=True)
    raise Exit(code=code if code is not None else 255)


@fleet_task(help={"run_id": "the run id of the job", "host": "the host the job runs on",
                  "signal": "signal to send first: TERM (default), INT, HUP, KILL, QUIT, USR1, "
                            "USR2; SIGKILL follows after a grace period",
                  "json": "print the job's status after, as JSON"})
def kill(c, run_id, host=None, signal="TERM", json_=False):
    """Stop a detached job: its whole process group, SIGKILL after a grace period."""
    from ..host.jobs import Job, parse_signal
    sig = parse_signal(signal)
    h = one_host(c, host)
    report = Job(h, run_id).kill(sig)
    if json_:
        _json(report)
    elif report.get("signalled") and report.get("scheduler"):
        print(f"{h.name}: {report['scheduler']} job {report.get('job_id')} (run {run_id}) "
              f"cancelled; status {report['status']}, exit code {report['exit_code']}")
    elif report.get("signalled"):
        how = " (then SIGKILL: it outlived the grace period)" if report.get("escalated") else ""
        print(f"{h.name}: job {run_id} killed with SIG{sig}{how}; status {report['status']}, "
              f"exit code {report['exit_code']}")
    else:
        print(f"{h.name}: job {run_id} is not running (status {report['status']}); nothing "
              "was signalled")


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
        render.say("fabfleet: tunnel closed; the port is free", err=True)


def _event(message: str) -> None:
    render.say(message, err=True)


@fleet_task(help={"remote_port": "the port to reach, as seen from the host",
                  "host": "the host", "local_port": "local port on 127.0.0.1 "
                  "(default 0: a free one, printed)",
                  "remote_host": "the address on the host side the service listens on "
                  "(default 127.0.0.1; a service bound to the host's own address needs it)"})
def tunnel(c, remote_port, host=None, local_port=0, remote_host="127.0.0.1"):
    """Forward 127.0.0.1:LOCAL to a port on the host; prints 127.0.0.1:PORT. Ctrl-C stops."""
    from ..ssh.connect import connect
    from ..ssh.tunnel import Tunnel
    rp = port("REMOTE_PORT", remote_port)
    lp = port("--local-port", local_port, allow_zero=True)
    h = one_host(c, host)
    conn = connect(h)
    t = Tunnel(conn, rp, lp, remote_host=remote_host, on_event=_event, openssh=None).start()
    _serve_tunnel(t, conn, f"127.0.0.1:{t.local_port}")
    conn.close()


@fleet_task(help={"host": "the host", "local_port": "local port on 127.0.0.1 (default: free)"})
def jupyter(c, host=None, local_port=0):
    """Jupyter on a host (started as a job, or the running one), tunnelled; prints the URL."""
    from ..apps.jupyter import open_jupyter
    from ..config.settings import relative_inside
    from ..ssh.connect import connect
    lp = port("--local-port", local_port, allow_zero=True)
    h = one_host(c, host)
    proj = project(c)
    conn = connect(h)
    t, url, job, reused = open_jupyter(conn, proj.name,
                                       cwd=relative_inside(os.getcwd(), proj.root) or "",
                                       local_port=lp, on_event=_event)
    how = "reconnected to the running server" if reused else "started"
    render.say(f"fabfleet: {h.name}: Jupyter {how} (job {job.run_id}; stop it with "
               f"`fabfleet kill {job.run_id} -H {h.name}`)", err=True)
    _serve_tunnel(t, conn, url)
    conn.close()


@hosts_task(help={"once": "one snapshot, then exit", "json": "with --once: print one JSON "
                  "object", "interval": "seconds between refreshes (default 3)"})
def top(c, selected, once=False, json_=False, interval=None):
    """A live table of load, memory, disk, GPUs and running jobs on the hosts."""
    from ..fleet.checks import top_hosts
    every = number("interval", interval) or 3.0
    if not (once or json_):
        render.live(lambda: render.top_table(top_hosts(selected)), every)
        return
    doc = top_hosts(selected)
    if json_:
        _json(doc)
    else:
        render.show(render.top_table(doc))
    if not doc["ok"]:
        for r in doc["hosts"].values():
            if not r["ok"]:
                render.say(r["error"], err=True, mark="✗")
        raise Exit(code=1)


@hosts_task(help={"scheduler_host": "host for the scheduler (default: the first selected)",
                  "idle_timeout": "the scheduler stops after this long without clients or "
                  "tasks (default 1h)",
                  "no_tls": "plain TCP, no certificates: anyone who reaches the ports can "
                            "connect and run code as you (default: TLS, certificates made "
                            "for this cluster)"})
def dask_up(c, selected, scheduler_host=None, idle_timeout="1h", no_tls=False):
    """Start a Dask scheduler and workers (max_jobs per host) on the hosts, as jobs."""
    import secrets

    from ..apps.dask import DaskCluster
    proj = project(c)
    creds = None if no_tls else os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fabfleet",
        "dask", f"{proj.name}-{secrets.token_hex(4)}")
    cluster = DaskCluster(list(selected), project=proj.name,
                          project_root=proj.root if proj.pushable else None,
                          scheduler_host=scheduler_host, idle_timeout=idle_timeout,
                          tls=not no_tls, credentials_dir=creds)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    where = cluster.address.rsplit(":", 1)[1]
    print(f"scheduler: {cluster.address} on {cluster.scheduler_name} "
          f"({cluster.n_workers} workers on {len(cluster.hosts)} hosts)")
    remote = cluster.address.split("://", 1)[-1].rpartition(":")[0]
    print(f"reach it from here: fabfleet tunnel -H {cluster.scheduler_name} --remote-host "
          f"{remote} {where}")
    if no_tls:
        print("  → Client('tcp://127.0.0.1:PORT')")
    else:
        print(f"  → Client('tls://127.0.0.1:PORT', security=Security(tls_ca_file="
              f"'{creds}/ca.pem', tls_client_cert='{creds}/cert.pem', tls_client_key="
              f"'{creds}/key.pem', require_encryption=True))   "
              "(from distributed import Client, Security)")
    if cluster.dashboard_port:
        print(f"dashboard: fabfleet tunnel -H {cluster.scheduler_name} "
              f"{cluster.dashboard_port}  → http://127.0.0.1:PORT/status")
    print("jobs: " + ", ".join(f"{j.host.name} {j.run_id}" for j in cluster.jobs))
    print("stop it: fabfleet dask-down -H " + ",".join(h.name for h in cluster.hosts))
    for conn in cluster.conns.values():
        conn.close()


def _stop_clusters(c, selected, stop, task: str) -> None:
    """``dask-down``/``ipp-down``: ``stop(conn, project)`` on every host, one table."""
    name = project(c).name
    results = _per_host(selected, lambda conn: stop(conn, name))
    _outcomes(results, f"{task} ({name})", ["jobs stopped"],
              lambda ids: [", ".join(ids) or "-"])


@hosts_task()
def dask_down(c, selected):
    """Stop this project's Dask scheduler and workers on the hosts."""
    from ..apps.dask import stop_project_clusters
    _stop_clusters(c, selected, stop_project_clusters, "dask-down")


@hosts_task(help={"controller_host": "host for the controller (default: the first selected)"})
def ipp_up(c, selected, controller_host=None):
    """Start an ipyparallel controller and engines (max_jobs per host, one per free GPU
    on GPU hosts) on the hosts, as jobs; attach from Python with
    inv.select(...).ipyparallel(attach=True)."""
    from ..apps.ipp import IppCluster
    proj = project(c)
    cluster = IppCluster(list(selected), project=proj.name,
                         project_root=proj.root if proj.pushable else None,
                         controller_host=controller_host)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    names = ",".join(h.name for h in cluster.hosts)
    print(f"controller: {cluster.controller_name} ({cluster.listen}, CurveZMQ), "
          f"{cluster.n_engines} engines on {len(cluster.hosts)} hosts "
          f"({', '.join(f'{h} {n}' for h, n in cluster.engines.items())})")
    print("attach from Python (a script, a notebook) in this project:")
    print(f"  rc = Inventory.load(...).select(host={names!r}).ipyparallel(attach=True).open()")
    print("jobs: " + ", ".join(f"{j.host.name} {j.run_id}" for j in cluster.jobs))
    print(f"stop it: fabfleet ipp-down -H {names}")
    for conn in cluster.conns.values():
        conn.close()


@hosts_task()
def ipp_down(c, selected):
    """Stop this project's ipyparallel controller and engines on the hosts."""
    from ..apps.ipp import stop_project_clusters
    _stop_clusters(c, selected, stop_project_clusters, "ipp-down")


@hosts_task(help={
    "patterns": "globs relative to the remote project dir, space-separated "
                "('results/*.csv **/*.log')",
    "dest": "local root; files land in <dest>/<host>/… (default: gathered/ in the project)",
    "overwrite": "replace local files whose content differs (default: keep them, report)"})
def gather(c, selected, patterns, dest=None, overwrite=False):
    """Copy remote files matching patterns into ./gathered/<host>/…, checksum-verified."""
    from ..config.settings import layout
    from ..host.gather import gather as gather_files
    try:
        pattern = shlex.split(patterns)
    except ValueError as exc:
        raise Exit(f"fabfleet: patterns {patterns!r}: {exc}", 2) from None
    if not pattern:
        raise Exit("fabfleet: give at least one pattern, e.g. fabfleet gather --all "
                   "'results/*.csv'", 2)
    proj = project(c)
    dest = dest or str(proj.root / "gathered")
    results = _per_host(selected, lambda conn: gather_files(
        conn, layout(conn.fleet_host, proj.name)["project"], pattern,
        os.path.join(dest, conn.fleet_host.name), overwrite=overwrite))
    conflicts = [f"{h}: {g.local}" for h, files in results.succeeded.items() for g in files
                 if g.status == "conflict"]
    refused = [f"{h}: {g.remote!r}" for h, files in results.succeeded.items() for g in files
               if g.status == "refused"]
    unreadable = [f"{h}: {g.remote}" for h, files in results.succeeded.items() for g in files
                  if g.status == "unreadable"]
    try:
        _outcomes(results, "gather", ["copied", "unchanged", "kept (differs)", "local dir"],
                  lambda files: [str(sum(g.status == "copied" for g in files)),
                                 str(sum(g.status == "unchanged" for g in files)),
                                 str(sum(g.status == "conflict" for g in files)),
                                 os.path.join(dest, "<host>")])
    finally:
        for line in conflicts:
            render.say(f"{line} differs from the remote copy and was kept; move it away or "
                       "pass --overwrite", mark="!")
        for line in refused:
            render.say(f"{line}: refused, its name would land outside {dest}/<host>/ "
                       "(nothing was written)", mark="!")
        for line in unreadable:
            render.say(f"{line}: could not be read on the host (permission denied: another "
                       "user's or root's?), not gathered", mark="!")
    if conflicts or refused:
        raise Exit(code=1)


@hosts_task(help={"code": "also remove this project's pushed code",
                  "venv": "also remove this project's venv (setup-workdir --requirements)",
                  "all_projects": "remove the run dirs of every project, not just this one",
                  "force": "stop running jobs first, and remove code fabfleet did not mark "
                           "as this project's"})
def clean(c, selected, code=False, venv=False, all_projects=False, force=False):
    """Remove this project's run dirs on the hosts (with --code, its pushed code too);
    running jobs are kept unless --force."""
    from ..host.jobs import clean as clean_host
    proj = project(c)
    identity = proj.identity()
    results = _per_host(selected, lambda conn: clean_host(
        conn, proj.name, identity=identity, code=code, venv=venv,
        all_projects=all_projects, force=force))
    try:
        _outcomes(results, f"clean ({'all projects' if all_projects else proj.name})",
                  ["removed", "kept"], lambda r: [str(len(r["removed"])), str(len(r["kept"]))])
    finally:
        for name, report in results.succeeded.items():
            for kept in report["kept"]:
                render.say(f"{name}: kept {kept['path']}: {kept['why']}", mark="!")


@hosts_task(help={"payload": "payload file made by fabfleet.save_payload(path, fn, *args)",
                  "out": "where results go: <out>/<host>/<payload>.result.pkl "
                         "(default: gathered)",
                  "max_parallel": "hosts running at once (default 32)"})
def run_pickle(c, selected, payload, out="gathered", max_parallel=None):
    """Run a pickled call (fabfleet.save_payload) on the hosts; save each result locally."""
    from ..fleet.scheduler import run_on_hosts, save_results
    from ..host.payload import load_payload_bytes
    from ..ssh.output import PrefixedOutput
    blob = load_payload_bytes(payload)  # a local error before any connection
    max_parallel = number("max-parallel", max_parallel, int, 1) or 32
    printer = PrefixedOutput(prefix=len(selected) > 1)
    results = run_on_hosts(selected, blob, max_parallel=max_parallel, on_output=printer,
                           project=project(c).name)
    printer.flush()
    summary_path = save_results(results, payload, out)
    _outcomes(results, f"run-pickle {payload} (summary: {summary_path})", ["result"],
              lambda v: [repr(v)[:60]])


@fleet_task
def disconnect(c):
    """Close the connections kept open between commands (FABFLEET_PERSIST), as
    `ssh -O exit` does for a ControlMaster."""
    from .keeper import stop
    closed = stop()
    print(f"closed the kept connections to {', '.join(closed)}" if closed else
          "no connections were kept")


ns = Collection(init, hosts, check_env, setup_workdir, push, run_remote, run_command,
                queue_submit, queue_status, queue_cancel, queue_retry, run_pickle, gather,
                clean, jobs, logs, kill, tunnel, jupyter, top, dask_up, dask_down, ipp_up,
                ipp_down, disconnect)
ns.configure({"fabfleet": {"inventory": None, "project": None}})
