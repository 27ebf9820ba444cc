"""Script runs on one host: attached (output streamed), stopped on Ctrl-C.

Remote layout, under each host's ``work_dir`` (mode 0700; see :mod:`fabfleet.config.settings`)::

    <work_dir>/<project>/                 the pushed project; scripts run in it
    <work_dir>/.runs/<project>/<run id>/  one per run: stdout, stderr, exit_code,
                                          timing.json, command.json, pid (and the
                                          script, when it travelled alone)
    <work_dir>/.venvs/<project>/          made by setup-workdir --requirements

A run is one SSH channel: the stdlib-only runner (:mod:`fabfleet.hostside.runner`, sent as
source) starts the script in its own process group, tees its output to the run dir and
to us as it arrives, enforces ``timeout`` there (so the script stops even if we are
gone), stops leftover processes when the script exits, and reports what it could not do.
Ctrl-C locally sends SIGTERM (then SIGKILL) to that group. An attached run ends with its
client: we send a heartbeat on the channel's stdin, and the runner stops the script's
group when the channel closes or the heartbeat stops for
:data:`~fabfleet.config.deadlines.CLIENT_LOST` seconds (detached jobs outlive us).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config.deadlines import (CLIENT_LOST, HEARTBEAT, QUICK_COMMAND, RUN_BACKSTOP,
                                STOP_GRACE)
from ..config.inventory import Host
from ..config.settings import layout
from ..errors import CommandError, FleetError
from ..hostside import runner
from ..ssh import shell
from ..ssh.connect import connect
from ..ssh.exec import execute
from ..ssh.launch import python_command
from . import batch
from .runspec import RunnerStderr, command_vector, run_spec
from .slots import host_slots

_ERR = shell.ERR


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


class ProjectStale(Exception):
    """A run given ``expect`` found its project out of date on the host and ran nothing:
    ``.listing`` is push's listing of it there, ``(exit code, stdout, stderr)``."""

    def __init__(self, listing: tuple[int, bytes, str]) -> None:
        super().__init__("the project on the host is out of date")
        self.listing = listing


def run_command(c, command: str | Sequence[str], *, shell: bool = False,
                **kwargs) -> RunResult:
    """Run a command on the host as :func:`run_script` runs a script (same env, cwd,
    output, timeout, stopping and result): ``command`` is an argument vector (each word
    one argument, quoted for you; the program is looked up on the env's ``PATH``, exit
    127 with a message when it is not there), or with ``shell=True`` one string for the
    host's ``sh -c`` (pipes, globs, ``&&``)."""
    return run_script(c, None, command=command_vector(command, shell), **kwargs)


def run_script(c, script: str | os.PathLike[str] | None, args: Sequence[str] = (), *,
               project: str | None = None, script_in_project: str | None = None,
               cwd: str = "", run_id: str | None = None,
               on_stdout: Callable[[bytes], None] | None = None,
               on_stderr: Callable[[bytes], None] | None = None,
               timeout: float | None = None, keep_children: bool = False,
               cancelled: threading.Event | None = None,
               command: Sequence[str] | None = None, module: str | None = None,
               env: dict[str, str] | None = None,
               sbatch: str | Sequence[str] | None = None,
               qsub: str | Sequence[str] | None = None,
               expect: dict | None = None) -> RunResult:
    """Run a Python script on the host with its Python, env and ``env`` vars.

    The script runs in ``<work_dir>/<project>/<cwd>`` (``project`` defaults to the local
    script's directory name; ``cwd`` is relative to it). ``script_in_project`` (a posix
    path relative to the project) runs a pushed file; otherwise the local ``script`` is
    sent with the run. Output reaches ``on_stdout``/``on_stderr`` as it is produced; the
    exit code is returned, not raised. ``timeout`` stops the script's whole process group
    on the host (exit code 124, ``.stopped == "timeout"``); processes the script leaves
    behind are stopped when it exits unless ``keep_children``. Once ``cancelled`` is set
    (Ctrl-C during a fan-out), the run is refused instead of started.

    A script with a ``#!`` line runs with that interpreter (a Python one, or none: the
    env's Python). Instead of a script: ``module`` runs ``python -m MODULE ARGS`` and
    ``command`` a vector (see :func:`run_command`); ``env`` is added to its environment.

    On a cluster's login node (``scheduler:`` in the inventory) the run is a batch job
    on a compute node (see :mod:`fabfleet.host.batch`): ``sbatch``/``qsub`` add to the
    inventory's directives; the output streams from the job's output file (stdout and
    stderr together, as the scheduler's own file has them); ``timeout`` counts from the
    job's start; Ctrl-C cancels the job.

    ``expect`` (:func:`fabfleet.host.push.expectation`): run only if the pushed project
    is as expected, else raise :class:`ProjectStale` with push's listing — so the
    listing of an unchanged project and the run are one round trip.
    """
    host: Host = c.fleet_host
    script = Path(script) if script is not None else None
    spec, lay, run_id, run_dir, project = run_spec(c, script, args, project=project,
                                                   script_in_project=script_in_project,
                                                   cwd=cwd, run_id=run_id, command=command,
                                                   module=module, env=env)
    label = (spec.get("display") if command is not None else f"-m {module}"
             if module is not None else script.name)
    if timeout is not None:
        spec["timeout"] = timeout
    spec["keep_children"] = keep_children
    if host.scheduler or sbatch or qsub:
        spec["batch"] = batch.batch_spec(host, project, sbatch, qsub)
        return _run_batch(c, spec, label, lay, project, cancelled, on_stdout, on_stderr)
    spec["client_lost"] = CLIENT_LOST  # the host stops the run when we are gone
    if expect is not None:
        spec["expect"] = expect
    command = python_command(host, runner, ["run", json.dumps(spec)], project=project)
    stderr = RunnerStderr(on_stderr)
    key = (host.name, run_dir)
    with host_slots(host):
        with _active_lock:  # under the lock Ctrl-C's stop_active_runs takes: no gap
            if cancelled is not None and cancelled.is_set():
                raise CommandError(host.name, f"{label} was not started: the run was "
                                   "interrupted (Ctrl-C) first")
            _active[key] = c
        try:
            # The runner enforces `timeout` on the host; ours is only a backstop.
            result = execute(c, command, keep=False, on_stdout=on_stdout, on_stderr=stderr,
                             timeout=None if timeout is None else timeout + RUN_BACKSTOP,
                             action=f"run {label} in {lay['project']}",
                             heartbeat=HEARTBEAT)
        finally:
            with _active_lock:
                _active.pop(key, None)
    code = result.exit_code
    marker = stderr.marker.decode("utf-8", "replace")
    if code == runner.PROJECT_STALE and marker.startswith(runner.STALE):
        record = json.loads(marker[len(runner.STALE):].splitlines()[0])
        raise ProjectStale((record["code"], base64.b64decode(record["stdout"]),
                            base64.b64decode(record["stderr"]).decode("utf-8", "replace")))
    stderr_tail = stderr.tail.decode("utf-8", "replace") + marker
    report = stderr.report()
    if _ERR + " python" in stderr_tail and code == 127:
        raise CommandError(host.name, f"Python interpreter {host.python!r} was not found on "
                           "the host. Install Python 3 there, or set `python:` in the "
                           "inventory to its full path.", exit_code=code, stderr=stderr_tail)
    if code == runner.COMMAND_MISSING and _ERR + " command:" in stderr_tail:
        said = stderr_tail.split(_ERR + " command:", 1)[1].strip().splitlines()[0]
        raise CommandError(host.name, f"{said.split(' (PATH=')[0]}. Install it there, add its "
                           "directory to PATH (the inventory's `env:` or `setup:`), or give "
                           "its full path.", exit_code=code, stderr=stderr_tail)
    if code == 97 and any(_ERR + w in stderr_tail for w in (" env", " setup", " workdir")):
        raise CommandError(host.name, shell.env_failure(host, stderr_tail), exit_code=code,
                           stderr=stderr_tail)
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


def _run_batch(c, spec: dict, label: str, lay: dict, project: str,
               cancelled: threading.Event | None,
               on_stdout: Callable[[bytes], None] | None,
               on_stderr: Callable[[bytes], None] | None) -> RunResult:
    """An attached run on a login node: submit the job, then follow its output until it
    ends (registered as an active run: Ctrl-C cancels the job)."""
    from .jobs import Job, runner_call
    host: Host = c.fleet_host
    key = (host.name, spec["run_dir"])
    started = time.monotonic()
    with host_slots(host):
        with _active_lock:
            if cancelled is not None and cancelled.is_set():
                raise CommandError(host.name, f"{label} was not submitted: the run was "
                                   "interrupted (Ctrl-C) first")
            _active[key] = c
        try:
            report, _ = runner_call(c, "run", spec, action=f"submit {label} to "
                                f"{host.scheduler} from {lay['project']}", project=project)
            batch.on_submitted(host, report, on_stderr)
            final = Job(host, spec["run_id"], report).logs(follow=True, on_output=on_stdout,
                                                         conn=c)
        finally:
            with _active_lock:
                _active.pop(key, None)
    code, stopped, notes = batch.outcome(host, final)
    return RunResult(host.name, spec["run_id"], spec["run_dir"], code,
                     time.monotonic() - started, "", stopped, notes)


def stop_active_runs(grace: float = STOP_GRACE, *, only_run: str | None = None,
                     close_unstarted: bool = False) -> list[str]:
    """Stop every run this process has under way (Ctrl-C), or only those of run id
    ``only_run`` (a gang): the runner on each host stops the run's process group
    (SIGTERM, SIGKILL after ``grace`` seconds; see
    :func:`fabfleet.hostside.runner.signal_group`). Returns the hosts where runs were
    stopped. Ctrl-C then closes each run's connection (a run whose script had not started
    yet stops when it does); with ``close_unstarted`` only those runs' connections are
    closed, so the others report their exit codes."""
    with _active_lock:
        active = [(key, c) for key, c in _active.items()
                  if only_run is None or key[1].rstrip("/").endswith("/" + only_run)]
    stopped = []

    def stop(key, c) -> None:
        host, run_dir = key
        spec = {"runs_root": layout(c.fleet_host, "")["all_runs"],
                "run_id": run_dir.rstrip("/").rsplit("/", 1)[-1], "grace": grace}
        done = False
        try:
            with connect(c.fleet_host) as fresh:  # the run's own channel is busy
                out = execute(fresh, python_command(fresh.fleet_host, runner,
                                                    ["stop", json.dumps(spec)]),
                              timeout=grace + QUICK_COMMAND, action="stop the run")
            done = '"stopped": true' in out.stdout
            stopped.append(host)
        except FleetError:
            pass  # the host is gone: nothing left to stop there
        finally:
            # A run whose runner had not yet written its pid when the stop came: our side
            # of its channel closing makes the runner stop it (see ClientWatch).
            if not (close_unstarted and done):
                c.close()
    threads = [threading.Thread(target=stop, args=item, daemon=True) for item in active]
    for t in threads:
        t.start()
    for t in threads:
        t.join(grace + QUICK_COMMAND + 5)
    return sorted(stopped)
