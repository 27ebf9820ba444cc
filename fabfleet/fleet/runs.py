"""Runs over many hosts at once: push the project, run the script or command on each
host with its launch variables, keep every host's output locally as it arrives; Ctrl-C
stops them all, and a gang stops them all when one fails."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config.inventory import Host
from ..config.settings import Project, is_marked, layout, relative_inside, resolve_project
from ..config.deadlines import deadlines
from ..errors import CommandError, LocalError, RunInterrupted
from ..host.files import local_files
from ..host.jobs import free_port, start_job
from ..host.push import expectation, parse_state, push
from ..host.runs import ProjectStale, RunResult, run_script, stop_active_runs
from ..host.runspec import UNMARKED_MAX_BYTES, UNMARKED_MAX_FILES, new_run_id
from ..ssh.connect import connect
from .fanout import fan_out


def launch_env(hosts: Sequence[Host], index: int, port: int | None) -> dict[str, str]:
    """The variables a run on ``hosts[index]`` sees, so one program can be launched
    across hosts (torchrun, DeepSpeed, JAX): its name and index in the selection, all
    names, the first host's address as the others reach it, and a port free there."""
    first = hosts[0]
    env = {"FABFLEET_HOST": hosts[index].name, "FABFLEET_HOST_INDEX": str(index),
           "FABFLEET_NUM_HOSTS": str(len(hosts)),
           "FABFLEET_HOSTS": ",".join(h.name for h in hosts),
           "FABFLEET_FIRST_HOST": first.hostname or first.name}
    if port is not None:
        env["FABFLEET_PORT"] = str(port)
    return env


def run_many(hosts: Sequence[Host], script: str | os.PathLike[str] | None = None,
             args: Sequence[str] = (), *, command: Sequence[str] | None = None,
             module: str | None = None, project: Project | None = None,
             cwd: str | os.PathLike[str] | None = None, push_project: bool = True,
             excludes: Sequence[str] = (), max_parallel: int = 32,
             on_output: Callable[[str, str, bytes], None] | None = None,
             log_root: str | os.PathLike[str] | None = None, timeout: float | None = None,
             keep_children: bool = False, detach: bool = False, gang: bool = False,
             sbatch: str | Sequence[str] | None = None,
             qsub: str | Sequence[str] | None = None):
    """Run ``script`` (or a ``command`` vector, or ``python -m module``) on every host at
    once (one run id for all); a per-host map.

    ``project`` (default: :func:`~fabfleet.config.settings.resolve_project` of ``cwd``)
    is the local project and its remote name. The project is pushed first (incremental;
    skipped with ``push_project=False``) and the work runs in the remote counterpart of
    ``cwd`` (default: the current directory) — so the project's own modules import and
    relative paths work as they do locally. A script outside the project travels alone
    and runs in the remote project dir.

    Every host's run sees :func:`launch_env` (``FABFLEET_HOST``, ``FABFLEET_HOST_INDEX``,
    ``FABFLEET_NUM_HOSTS``, ``FABFLEET_HOSTS``, ``FABFLEET_FIRST_HOST`` and, over several
    hosts, ``FABFLEET_PORT``: free on the first host). With ``gang``, no host starts
    until every host is ready, and when one fails (a non-zero exit, a lost host) the
    others are stopped.

    On a cluster's login node (``scheduler:`` in the inventory) each run is a batch job
    (``sbatch``/``qsub``: directives added to the inventory's; see
    :mod:`fabfleet.host.batch`).

    Output goes to ``on_output(host, "stdout"|"stderr", bytes)`` live and, with
    ``log_root``, to ``<log_root>/<host>/runs/<run id>/{stdout,stderr}`` as it arrives, so
    it survives a host that dies mid-run. Ctrl-C stops every remote run, then raises
    :class:`~fabfleet.errors.RunInterrupted`. Returns a
    :class:`~fabfleet.fleet.fanout.FanOutResult` of :class:`RunResult` — or, with ``detach``,
    of :class:`~fabfleet.host.jobs.Job` as soon as each host's job has started.
    """
    hosts = list(hosts)
    if script is not None:
        script = Path(script)
        if not script.is_file():
            raise LocalError(f"{script}: script not found (nothing was sent to any host)")
    elif command is None and module is None:
        raise LocalError("give a script, a command or a module to run")
    if gang and detach:
        raise LocalError("--gang needs the runs attached (it stops the others when one "
                         "fails); it cannot be combined with --detach")
    cwd = Path(cwd or os.getcwd()).resolve()
    project = project or resolve_project(cwd)
    root, name = project.root, project.name
    rel = relative_inside(script, root) if script is not None and project.pushable else None
    to_push = None
    if push_project and project.pushable and (rel is not None or script is None):
        to_push = local_files(root, excludes, never=[h.key_file for h in hosts])
        size = sum(f.size for f in to_push)
        if not is_marked(root) and (len(to_push) > UNMARKED_MAX_FILES
                                    or size > UNMARKED_MAX_BYTES):
            raise LocalError(
                f"{root} holds no .git, pyproject.toml or setup.py, so it is taken as the "
                f"project, but it has {len(to_push)} files ({size / 1e6:.0f} MB) to push. "
                "Run from your project's own directory, or mark its root with an empty "
                "pyproject.toml (.gitignore entries are left out of pushes).")
        if rel is not None and rel not in {f.rel for f in to_push}:
            rel = None  # excluded from the push (.gitignore, --exclude): it travels alone
    run_cwd = relative_inside(cwd, root) or ""
    run_id = new_run_id()
    identity = project.identity() if to_push is not None else None
    cancel = threading.Event()  # Ctrl-C: hosts still pushing never start the script
    port: list[int | None] = [None]
    port_known = threading.Event()
    if len(hosts) < 2:
        port_known.set()
    ready = threading.Barrier(len(hosts)) if gang else None
    failed = threading.Event()  # gang: one host failed, the others are being stopped

    def fail_gang(host: Host) -> None:
        if gang and not failed.is_set():
            failed.set()
            cancel.set()
            if ready is not None:
                ready.abort()
            stop_active_runs(only_run=run_id, close_unstarted=True)

    def one(index: int, host: Host) -> RunResult:
        logs = {}

        def sink(stream: str):
            def write(data: bytes) -> None:
                if log_root is not None:
                    if stream not in logs:  # opened on first output: no empty logs
                        d = Path(log_root) / host.name / "runs" / run_id
                        d.mkdir(parents=True, exist_ok=True)
                        logs[stream] = open(d / stream, "wb")
                    logs[stream].write(data)
                    logs[stream].flush()
                if on_output:
                    on_output(host.name, stream, data)
            return write
        try:
            with connect(host) as c:
                if index == 0 and not port_known.is_set():
                    try:
                        port[0] = free_port(c)
                    finally:
                        port_known.set()
                remote_project = layout(host, name)["project"]
                # an attached run, alone: the push's listing goes with the run
                together = to_push is not None and not detach and ready is None and \
                    not (host.scheduler or sbatch or qsub)
                if to_push is not None and not together:
                    push(c, root, remote_project, files=to_push, identity=identity)
                port_known.wait(deadlines(host).check)
                env = launch_env(hosts, index, port[0])
                if ready is not None:
                    try:
                        ready.wait(deadlines(host).check + 600)
                    except threading.BrokenBarrierError:
                        raise CommandError(host.name, "not started: another host of the "
                                           "gang failed before all could start") from None
                what = dict(command=command, module=module, env=env, project=name,
                            script_in_project=rel, cwd=run_cwd, run_id=run_id,
                            timeout=timeout, keep_children=keep_children, sbatch=sbatch,
                            qsub=qsub)
                if detach:
                    return start_job(c, script, args, **what)
                what.update(on_stdout=sink("stdout"), on_stderr=sink("stderr"),
                            cancelled=cancel)
                if together:  # never a gang: nothing to stop if it fails
                    try:
                        return run_script(c, script, args, expect=expectation(
                            to_push, identity, remote_project), **what)
                    except ProjectStale as stale:  # nothing ran: push, then run
                        push(c, root, remote_project, files=to_push, identity=identity,
                             state=parse_state(c, remote_project, *stale.listing))
                result = run_script(c, script, args, **what)
                if not result.ok and not failed.is_set():
                    fail_gang(host)
                return result
        except BaseException:
            fail_gang(host)
            raise
        finally:
            for f in logs.values():
                f.close()

    indexed = {h.name: i for i, h in enumerate(hosts)}
    try:
        return fan_out(hosts, lambda h: one(indexed[h.name], h),
                       max_workers=len(hosts) if gang else max_parallel)
    except KeyboardInterrupt:
        cancel.set()
        stopped = stop_active_runs()
        raise RunInterrupted(run_id, stopped) from None
