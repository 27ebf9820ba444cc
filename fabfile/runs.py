"""Work dirs and script runs on hosts.

Remote layout, under each host's ``work_dir`` (mode 0700; see :mod:`fabfile.project`)::

    <work_dir>/<project>/                 the pushed project; scripts run in it
    <work_dir>/.runs/<project>/<run id>/  one per run: stdout, stderr, exit_code,
                                          timing.json, command.json, pid (and the
                                          script, when it travelled alone)
    <work_dir>/.venvs/<project>/          made by setup-workdir --requirements

A run is one SSH channel: the stdlib-only runner (:mod:`fabfile.runner`, sent as
source) starts the script in its own process group, tees its output to the run dir and
to us as it arrives, enforces ``timeout`` there (so the script stops even if we are
gone), stops leftover processes when the script exits, and reports what it could not do.
Ctrl-C locally sends SIGTERM (then SIGKILL) to that group.
"""

from __future__ import annotations

import base64
import json
import os
import posixpath
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import runner, shell
from .errors import CommandError, FleetError, LocalError, RunInterrupted
from .execute import execute
from .inventory import Host
from .project import layout
from .runspec import (UNMARKED_MAX_BYTES, UNMARKED_MAX_FILES, RunnerStderr, new_run_id,
                      run_spec, runner_source)

_ERR = shell.ERR


# -- setup-workdir ---------------------------------------------------------------------
def setup_workdir(c, *, project: str | None = None,
                  requirements: str | os.PathLike[str] | None = None,
                  timeout: float = 1800) -> dict:
    """Create the work dir (0700) and, for ``project``, its run dir; idempotent.

    With ``requirements`` (a local requirements.txt), also make the project's venv
    ``<work_dir>/.venvs/<project>`` (if missing) and ``pip install -r`` into it; that
    project's runs and payloads then use it unless the inventory names a ``venv`` or
    ``conda_env``. Returns ``{"work_dir", "venv", "installed"}``.
    """
    host: Host = c.fleet_host
    if requirements is not None and not project:
        raise LocalError("setup_workdir: requirements need a project (the venv is per project)")
    lay = layout(host, project or "")
    dirs = [lay["work_dir"]] + ([lay["all_runs"], lay["runs"]] if project else [])
    quoted = " ".join(shell.path(d) for d in dirs)
    script = (f"mkdir -p -- {quoted} && chmod 700 -- {quoted} && "
              f"cd -- {shell.path(lay['work_dir'])} && pwd")
    result = execute(c, shell.sh(script), timeout=60, action=f"create {lay['work_dir']}")
    if result.exit_code != 0:
        raise CommandError(host.name, f"could not create work dir {lay['work_dir']}: "
                           f"{result.stderr.strip()}. Set `work_dir` in the inventory to a "
                           "directory the user can write.", exit_code=result.exit_code,
                           stderr=result.stderr)
    report = {"work_dir": result.stdout.strip(), "venv": None, "installed": None}
    if requirements is None:
        return report
    req = Path(requirements)
    if not req.is_file():
        raise LocalError(f"{req}: requirements file not found")
    venv = shell.path(lay["venv"])
    blob = base64.b64encode(req.read_bytes()).decode()
    py = shell.q(host.python)
    script = (
        f"umask 077 && mkdir -p -- {shell.path(posixpath.dirname(lay['venv']))} && "
        f"{{ [ -x {venv}/bin/python ] || {py} -m venv -- {venv} || "
        f"{{ echo {shell.q(_ERR + ' venv')} >&2; exit 98; }}; }} && "
        f"printf %s {shell.q(blob)} | base64 -d > {venv}/requirements.txt && "
        f"{venv}/bin/python -m pip install --disable-pip-version-check -q "
        f"-r {venv}/requirements.txt")
    result = execute(c, shell.sh(script), timeout=timeout,
                     action=f"create the venv and pip install -r {req.name}")
    if result.exit_code != 0:
        hint = ("the host's Python cannot make venvs: install python3-venv there "
                "(Debian/Ubuntu) or point `venv` at an existing one"
                if _ERR + " venv" in result.stderr else
                "read pip's message above; fix the requirements or the host's network")
        raise CommandError(host.name, f"setting up {lay['venv']} failed (exit "
                           f"{result.exit_code}):\n{result.stderr.strip()[-1500:]}\n{hint}.",
                           exit_code=result.exit_code, stderr=result.stderr)
    report.update(venv=lay["venv"], installed=str(req))
    return report


# -- runs ------------------------------------------------------------------------------
@dataclass
class RunResult:
    host: str
    run_id: str
    run_dir: str
    exit_code: int
    seconds: float
    stderr_tail: str = ""
    stopped: str | None = None     # "timeout" or "signal" when the run was stopped
    notes: tuple[str, ...] = ()    # what the runner could not do, or did on its own

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


_active_lock = threading.Lock()
_active: dict[tuple[str, str], object] = {}  # (host, run_dir) -> connection
_host_slots: dict[str, threading.Semaphore] = {}


def host_slot(host: Host) -> threading.Semaphore:
    """The per-host semaphore of ``max_jobs`` slots shared by runs and payloads."""
    with _active_lock:
        return _host_slots.setdefault(host.name, threading.Semaphore(host.max_jobs))


def run_script(c, script: str | os.PathLike[str], args: Sequence[str] = (), *,
               project: str | None = None, script_in_project: str | None = None,
               cwd: str = "", run_id: str | None = None,
               on_stdout: Callable[[bytes], None] | None = None,
               on_stderr: Callable[[bytes], None] | None = None,
               timeout: float | None = None, keep_children: bool = False) -> RunResult:
    """Run a Python script on the host with its Python, env and ``env`` vars.

    The script runs in ``<work_dir>/<project>/<cwd>`` (``project`` defaults to the local
    script's directory name; ``cwd`` is relative to it). ``script_in_project`` (a posix
    path relative to the project) runs a pushed file; otherwise the local ``script`` is
    sent with the run. Output reaches ``on_stdout``/``on_stderr`` as it is produced; the
    exit code is returned, not raised. ``timeout`` stops the script's whole process group
    on the host (exit code 124, ``.stopped == "timeout"``); processes the script leaves
    behind are stopped when it exits unless ``keep_children``.
    """
    host: Host = c.fleet_host
    script = Path(script)
    spec, lay, run_id, run_dir, project = run_spec(c, script, args, project=project,
                                                   script_in_project=script_in_project,
                                                   cwd=cwd, run_id=run_id)
    if timeout is not None:
        spec["timeout"] = timeout
    spec["keep_children"] = keep_children
    command = shell.sh(shell.env_prefix(host, project) + f"exec {shell.q(host.python)} -c "
                       f"{shell.q(runner_source())} {shell.q(json.dumps(spec))}")
    stderr = RunnerStderr(on_stderr)
    key = (host.name, run_dir)
    with host_slot(host):
        with _active_lock:
            _active[key] = c
        try:
            # The runner enforces `timeout` on the host; ours is only a backstop.
            result = execute(c, command, keep=False, on_stdout=on_stdout, on_stderr=stderr,
                             timeout=None if timeout is None else timeout + 60,
                             action=f"run {script.name} in {lay['project']}")
        finally:
            with _active_lock:
                _active.pop(key, None)
    code = result.exit_code
    marker = stderr.marker.decode("utf-8", "replace")
    stderr_tail = stderr.tail.decode("utf-8", "replace") + marker
    report = stderr.report()
    if _ERR + " python" in stderr_tail and code == 127:
        raise CommandError(host.name, f"Python interpreter {host.python!r} was not found on "
                           "the host. Install Python 3 there, or set `python:` in the "
                           "inventory to its full path.", exit_code=code, stderr=stderr_tail)
    if _ERR + " env" in stderr_tail and code == 97:
        raise CommandError(host.name, f"the host's environment did not activate: "
                           f"{stderr_tail.replace(_ERR + ' env', '').strip()}. Fix `venv` / "
                           "`conda_env` in the inventory or run `fabfleet setup-workdir`.",
                           exit_code=code, stderr=stderr_tail)
    if code == runner.SCRIPT_MISSING and "script:" in marker:
        raise CommandError(host.name, f"{script_in_project} is not in {lay['project']} on the "
                           "host: push the project first (`fabfleet push`), or run without "
                           "--no-push.", exit_code=code, stderr=stderr_tail)
    if code == runner.RUNNER_FAILED and marker:
        message = marker.split(runner.ERROR.strip("\x1e"), 1)[-1].strip()
        full = "full" in message.lower() or "No space" in message
        raise CommandError(host.name, f"the run could not start: {message}. "
                           + ("The host's disk is full: free space there, or point "
                              "`work_dir` at a bigger disk." if full else
                              "Check that `work_dir` in the inventory is writable."),
                           exit_code=code, stderr=stderr_tail)
    if report is None and code != 0 and not (_ERR in stderr_tail):
        # No report: the runner itself died (killed, out of memory) or the link dropped.
        notes = ("the runner ended without a report (killed? out of memory?); the exit "
                 f"code {code} may not be the script's",)
        return RunResult(host.name, run_id, run_dir, code, result.seconds, stderr_tail,
                         None, notes)
    report = report or {}
    return RunResult(host.name, run_id, run_dir, code, result.seconds, stderr_tail,
                     report.get("stopped"), tuple(report.get("notes") or ()))


def stop_active_runs(grace: float = 2.0) -> list[str]:
    """Stop every run this process has under way (Ctrl-C): SIGTERM to each run's process
    group, SIGKILL after ``grace`` seconds. Returns the hosts where runs were stopped."""
    with _active_lock:
        active = list(_active.items())
    stopped = []

    def stop(key, c) -> None:
        host, run_dir = key
        pid = f"{shell.path(run_dir)}/pid"
        # `kill -SIG -PGID` without `--`: dash's builtin kill rejects `--`.
        script = (f"p=$(cat {pid} 2>/dev/null) || exit 0; kill -TERM -$p 2>/dev/null; "
                  f"i=0; while kill -0 -$p 2>/dev/null && [ $i -lt {int(grace * 10)} ]; "
                  "do sleep 0.1; i=$((i+1)); done; kill -KILL -$p 2>/dev/null; true")
        try:
            from .connection import connect
            with connect(c.fleet_host) as fresh:  # the run's own channel is busy
                execute(fresh, shell.sh(script), timeout=grace + 15, action="stop the run")
            stopped.append(host)
        except FleetError:
            pass  # the host is gone: nothing left to stop there
    threads = [threading.Thread(target=stop, args=item, daemon=True) for item in active]
    for t in threads:
        t.start()
    for t in threads:
        t.join(grace + 20)
    return sorted(stopped)


def clean(c, project: str, *, code: bool = False, venv: bool = False,
          all_projects: bool = False) -> list[str]:
    """Remove ``project``'s run dirs on the host (``<work_dir>/.runs/<project>``); with
    ``code`` its pushed copy, with ``venv`` its venv, with ``all_projects`` the run dirs
    of every project. Other projects' files are never touched otherwise. Returns the
    remote paths removed."""
    host: Host = c.fleet_host
    lay = layout(host, project)
    targets = [lay["all_runs"] if all_projects else lay["runs"]]
    targets += [lay["project"]] if code else []
    targets += [lay["venv"]] if venv else []
    script = "rm -rf -- " + " ".join(shell.path(t) for t in targets)
    result = execute(c, shell.sh(script), timeout=600, action="clean the work dir")
    if result.exit_code != 0:
        raise CommandError(host.name, f"clean failed: {result.stderr.strip()[-500:]}",
                           exit_code=result.exit_code, stderr=result.stderr)
    return targets


def run_many(hosts: Sequence[Host], script: str | os.PathLike[str], args: Sequence[str] = (),
             *, project_root: str | os.PathLike[str] | None = None, project: str | None = None,
             cwd: str | os.PathLike[str] | None = None, push_project: bool = True,
             excludes: Sequence[str] = (), max_parallel: int = 32,
             on_output: Callable[[str, str, bytes], None] | None = None,
             log_root: str | os.PathLike[str] | None = None, timeout: float | None = None,
             keep_children: bool = False, detach: bool = False):
    """Run ``script`` on every host at once (one run id for all); a per-host map.

    ``project_root`` (default: :func:`~fabfile.project.find_project` of ``cwd``) is the
    local project; ``project`` its remote name (default: the root's name). When the
    script lies inside the project, the project is pushed first (incremental; skipped
    with ``push_project=False``) and the script runs from the pushed copy, in the remote
    counterpart of ``cwd`` (default: the current directory) — so the project's own
    modules import and relative paths work as they do locally. A script outside the
    project travels alone and runs in the remote project dir.

    Output goes to ``on_output(host, "stdout"|"stderr", bytes)`` live and, with
    ``log_root``, to ``<log_root>/<host>/runs/<run id>/{stdout,stderr}`` as it arrives, so
    it survives a host that dies mid-run. Ctrl-C stops every remote run, then raises
    :class:`~fabfile.errors.RunInterrupted`. Returns a
    :class:`~fabfile.fanout.FanOutResult` of :class:`RunResult` — or, with ``detach``,
    of :class:`~fabfile.jobs.Job` as soon as each host's job has started.
    """
    from .connection import connect
    from .fanout import fan_out
    from .project import (find_project, is_marked, is_unmarked_home, project_name,
                          relative_inside)
    from .transfer import local_files, push

    script = Path(script)
    if not script.is_file():
        raise LocalError(f"{script}: script not found (nothing was sent to any host)")
    cwd = Path(cwd or os.getcwd()).resolve()
    root = Path(project_root).resolve() if project_root else find_project(cwd)
    name = project_name(root, project)
    rel = None if is_unmarked_home(root) else relative_inside(script, root)
    to_push = None
    if rel is not None and push_project:
        to_push = local_files(root, excludes)
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
                    push(c, root, layout(host, name)["project"], files=to_push)
                if detach:
                    from .jobs import start_job
                    return start_job(c, script, args, project=name, script_in_project=rel,
                                     cwd=run_cwd, run_id=run_id, timeout=timeout,
                                     keep_children=keep_children)
                return run_script(c, script, args, project=name, script_in_project=rel,
                                  cwd=run_cwd, run_id=run_id,
                                  on_stdout=sink("stdout"), on_stderr=sink("stderr"),
                                  timeout=timeout, keep_children=keep_children)
        finally:
            for f in logs.values():
                f.close()

    try:
        return fan_out(hosts, one, max_workers=max_parallel)
    except KeyboardInterrupt:
        stopped = stop_active_runs()
        raise RunInterrupted(run_id, stopped) from None
