"""Runs over many hosts at once: push the project, run the script on each host, keep
every host's output locally as it arrives; Ctrl-C stops them all."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config.inventory import Host
from ..config.settings import Project, is_marked, layout, relative_inside, resolve_project
from ..errors import LocalError, RunInterrupted
from ..host.files import local_files
from ..host.jobs import start_job
from ..host.push import push
from ..host.runs import RunResult, run_script, stop_active_runs
from ..host.runspec import UNMARKED_MAX_BYTES, UNMARKED_MAX_FILES, new_run_id
from ..ssh.connect import connect
from .fanout import fan_out


def run_many(hosts: Sequence[Host], script: str | os.PathLike[str], args: Sequence[str] = (),
             *, project: Project | None = None, cwd: str | os.PathLike[str] | None = None, push_project: bool = True,
             excludes: Sequence[str] = (), max_parallel: int = 32,
             on_output: Callable[[str, str, bytes], None] | None = None,
             log_root: str | os.PathLike[str] | None = None, timeout: float | None = None,
             keep_children: bool = False, detach: bool = False):
    """Run ``script`` on every host at once (one run id for all); a per-host map.

    ``project`` (default: :func:`~fabfleet.config.settings.resolve_project` of ``cwd``)
    is the local project and its remote name. When the script lies inside the project, the project is pushed first (incremental; skipped
    with ``push_project=False``) and the script runs from the pushed copy, in the remote
    counterpart of ``cwd`` (default: the current directory) — so the project's own
    modules import and relative paths work as they do locally. A script outside the
    project travels alone and runs in the remote project dir.

    Output goes to ``on_output(host, "stdout"|"stderr", bytes)`` live and, with
    ``log_root``, to ``<log_root>/<host>/runs/<run id>/{stdout,stderr}`` as it arrives, so
    it survives a host that dies mid-run. Ctrl-C stops every remote run, then raises
    :class:`~fabfleet.errors.RunInterrupted`. Returns a
    :class:`~fabfleet.fleet.fanout.FanOutResult` of :class:`RunResult` — or, with ``detach``,
    of :class:`~fabfleet.host.jobs.Job` as soon as each host's job has started.
    """
    script = Path(script)
    if not script.is_file():
        raise LocalError(f"{script}: script not found (nothing was sent to any host)")
    cwd = Path(cwd or os.getcwd()).resolve()
    project = project or resolve_project(cwd)
    root, name = project.root, project.name
    rel = relative_inside(script, root) if project.pushable else None
    to_push = None
    if rel is not None and push_project:
        to_push = local_files(root, excludes, never=[h.key_file for h in hosts])
        size = sum(f.size for f in to_push)
        if not is_marked(root) and (len(to_push) > UNMARKED_MAX_FILES
                                    or size > UNMARKED_MAX_BYTES):
            raise LocalError(
                f"{root} holds no .git, pyproject.toml or setup.py, so it is taken as the "
                f"project, but it has {len(to_push)} files ({size / 1e6:.0f} MB) to push. "
                "Run from your project's own directory, or mark its root with an empty "
                "pyproject.toml (.gitignore entries are left out of pushes).")
        if rel not in {f.rel for f in to_push}:
            rel = None  # excluded from the push (.gitignore, --exclude): it travels alone
    run_cwd = relative_inside(cwd, root) or ""
    run_id = new_run_id()
    identity = project.identity() if to_push is not None else None
    cancel = threading.Event()  # Ctrl-C: hosts still pushing never start the script

    def one(host: Host) -> RunResult:
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
                if to_push is not None:
                    push(c, root, layout(host, name)["project"], files=to_push,
                         identity=identity)
                if detach:
                    return start_job(c, script, args, project=name, script_in_project=rel,
                                     cwd=run_cwd, run_id=run_id, timeout=timeout,
                                     keep_children=keep_children)
                return run_script(c, script, args, project=name, script_in_project=rel,
                                  cwd=run_cwd, run_id=run_id,
                                  on_stdout=sink("stdout"), on_stderr=sink("stderr"),
                                  timeout=timeout, keep_children=keep_children,
                                  cancelled=cancel)
        finally:
            for f in logs.values():
                f.close()

    try:
        return fan_out(hosts, one, max_workers=max_parallel)
    except KeyboardInterrupt:
        cancel.set()
        stopped = stop_active_runs()
        raise RunInterrupted(run_id, stopped) from None
