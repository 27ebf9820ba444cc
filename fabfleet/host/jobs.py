"""Long jobs that outlive the laptop: start detached, list, follow, kill.

A detached job is started by :mod:`fabfleet.hostside.runner` as a daemon on the host (own session,
no terminal, stdin from /dev/null, output to files in its run dir, hang-ups ignored).
The run dir is the durable registry: ``job.json`` (run id, project, argv, pid, process
group, the process's start time from /proc, boot id, start time), written atomically,
then ``exit_code`` when it ends, and ``killed`` when :meth:`Job.kill` stopped it. Any
process can re-create a :class:`Job` from a host and a run id.

Status: ``running``; ``exited`` (with its code); ``killed``; ``lost`` — the process is
gone without an exit code, or the host rebooted (its boot id changed).
"""

from __future__ import annotations

import contextlib
import json
import signal as _signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config.deadlines import (CLIENT_LOST, DRAINER_STOP, HEARTBEAT, QUICK_COMMAND,
                                RECONNECT_FOR, STOP_GRACE, TREE_COMMAND)
from ..config.inventory import Host
from ..config.settings import layout
from ..errors import CommandError, ConnectError, LocalError
from ..hostside import runner
from ..ssh.connect import connect
from ..ssh.exec import execute
from ..ssh.launch import python_command
from . import batch
from .runspec import RunnerStderr, run_spec
from .slots import host_slots

SIGNALS = ("TERM", "INT", "HUP", "KILL", "QUIT", "USR1", "USR2")


def runner_call(c, command: str, spec: dict, *, action: str, timeout: float | None = QUICK_COMMAND,
            on_stdout: Callable[[bytes], None] | None = None,
            project: str | None = None, heartbeat: bool = False) -> tuple[dict | list, str]:
    """Run a runner sub-command on the host (in ``project``'s env); its report and its
    raw stdout. With ``heartbeat`` the host-side command ends when we are gone."""
    if heartbeat:
        spec = dict(spec, client_lost=CLIENT_LOST)
    host: Host = c.fleet_host
    stderr = RunnerStderr(None)
    out = bytearray()

    def keep(data: bytes) -> None:
        if on_stdout is not None:
            on_stdout(data)
        else:
            out.extend(data)
    result = execute(c, python_command(host, runner, [command, json.dumps(spec)],
                                       project=project),
                     timeout=timeout, keep=False, on_stdout=keep, on_stderr=stderr, action=action,
                     heartbeat=HEARTBEAT if heartbeat else None)
    text = bytes(out).decode("utf-8", "replace")
    _, sep, rest = text.partition(runner.REPORT)  # most commands report on stdout
    report = json.loads(rest.splitlines()[0]) if sep else stderr.report()
    if report is None:
        marker = stderr.marker.decode("utf-8", "replace")
        message = marker.split(runner.ERROR.strip("\x1e"), 1)[-1].strip() or \
            stderr.tail.decode("utf-8", "replace").strip()[-500:]
        raise CommandError(host.name, f"could not {action}: {message or 'no answer'} "
                           f"(exit {result.exit_code})", exit_code=result.exit_code)
    return report, text


class Job:
    """A detached run on one host, by run id; re-creatable in any process."""

    def __init__(self, host: Host, run_id: str, record: dict | None = None) -> None:
        if not runner.valid_run_id(run_id):
            raise LocalError(f"{run_id!r} is not a fabfleet run id (they look like "
                             "20261201-104211-laptop-4242-a1b2c3; `fabfleet jobs` lists them)")
        self.host = host
        self.run_id = run_id
        self.record = record or {}

    def __repr__(self) -> str:
        return f"<Job {self.run_id} on {self.host.name}>"

    def _conn(self):
        return connect(self.host)

    def _spec(self, **extra: Any) -> dict:
        return {"runs_root": layout(self.host, "")["all_runs"], "run_id": self.run_id,
                **extra}

    def status(self) -> dict:
        """``{"run_id", "status", "exit_code", "command", "age", …}`` from the host."""
        with self._conn() as c:
            report, _ = runner_call(c, "jobs", {"runs_root": layout(self.host, "")["all_runs"]},
                                action="list jobs")
        for entry in report:
            if entry["run_id"] == self.run_id:
                return entry
        raise CommandError(self.host.name, f"no run {self.run_id} on this host (`fabfleet "
                           "jobs --all-projects` lists them)")

    def wait(self, timeout: float | None = None, poll: float = 2.0) -> dict:
        """Poll until the job is no longer running; its final status. Raises
        :class:`~fabfleet.errors.CommandError` if ``timeout`` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.status()
            if state["status"] not in ("running", "pending", "unknown"):
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise CommandError(self.host.name, f"job {self.run_id} still running after "
                                   f"{timeout:g}s")
            time.sleep(poll)

    def logs(self, *, stream: str = "stdout", follow: bool = False,
             on_output: Callable[[bytes], None] | None = None, offset: int = 0,
             reconnect_for: float = RECONNECT_FOR, conn=None) -> dict:
        """The job's output from byte ``offset`` to ``on_output`` (default: returned in
        ``["data"]``); with ``follow``, until the job ends. A dropped connection (laptop
        sleep, network change) is retried for ``reconnect_for`` seconds per outage and
        resumes at the byte where it stopped; the follower on the host ends when we do.
        Returns the final status (with ``offset``). ``conn``: a connection to the host
        to use first (left open)."""
        if stream not in ("stdout", "stderr"):
            raise LocalError(f"stream {stream!r}: expected stdout or stderr")
        chunks: list[bytes] = []
        sink = on_output or chunks.append
        got = [offset]

        def take(data: bytes) -> None:
            got[0] += len(data)
            sink(data)
        lost_since: float | None = None
        given = conn
        while True:
            try:
                with contextlib.nullcontext(given) if given is not None else self._conn() as c:
                    given = None
                    lost_since = None  # connected: the outage (if any) is over
                    report, _ = runner_call(c, "logs", self._spec(stream=stream, offset=got[0],
                                                              follow=follow),
                                        action=f"read the output of {self.run_id}",
                                        timeout=None,
                                        on_stdout=take, heartbeat=follow)
                break
            except ConnectError:
                if not follow:
                    raise
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > reconnect_for:
                    raise
                time.sleep(2)
        if on_output is None:
            report["data"] = b"".join(chunks)
        return report

    def kill(self, signal: str = "TERM", grace: float = 5.0) -> dict:
        """Signal the job's whole process group (after checking it is still the process
        that was started: pid + start time + boot id), SIGKILL after ``grace`` seconds;
        records ``killed``. Returns the status after."""
        name = signal.upper().removeprefix("SIG")
        if name not in SIGNALS:
            raise LocalError(f"signal {signal!r}: expected one of {', '.join(SIGNALS)}")
        with self._conn() as c:
            report, _ = runner_call(c, "kill", self._spec(signal=f"SIG{name}", grace=grace),
                                action=f"kill job {self.run_id}",
                                timeout=grace + QUICK_COMMAND)
        return report


def list_jobs(c, project: str | None = None) -> list[dict]:
    """Every run of ``project`` (``None``: every project) on the host behind ``c``, in
    one round trip: run id, project, status, exit code, command, age, …"""
    spec = {"runs_root": layout(c.fleet_host, "")["all_runs"], "project": project}
    report, _ = runner_call(c, "jobs", spec, action="list jobs")
    return report


def queue_state(c, queues_root: str, name: str, *, cancel: bool = False,
                retry: bool = False, take: int = 0, to: str | None = None,
                add: list[dict] | None = None) -> dict | None:
    """Queue ``name``'s tasks on the host behind ``c`` (``None``: it holds none), after
    cancelling it, putting its failed and lost tasks back, or adding ``add`` (tasks moved
    here); with ``take``, instead claims up to that many not-started tasks for host
    ``to`` and returns ``{"taken": [task, …]}`` (one round trip)."""
    spec = {"queues_root": queues_root, "name": name, "cancel": cancel, "retry": retry,
            "grace": STOP_GRACE, "drainer_grace": DRAINER_STOP, "take": take, "to": to, "add": add or []}
    report, _ = runner_call(c, "queue", spec, action=f"read queue {name}",
                        timeout=QUICK_COMMAND + DRAINER_STOP + STOP_GRACE)
    return None if report.get("absent") else report


def free_port(c) -> int:
    """A TCP port free on the host behind ``c`` right now (the kernel's pick), for a
    program launched across hosts to meet on (``FABFLEET_PORT``)."""
    report, _ = runner_call(c, "port", {}, action="find a free port")
    return int(report["port"])


def clean(c, project: str, *, identity: dict[str, str] | None = None, code: bool = False,
          venv: bool = False, all_projects: bool = False, force: bool = False) -> dict:
    """Remove ``project``'s run dirs on the host (every project's with
    ``all_projects``); with ``code`` its pushed copy, with ``venv`` its venv. Running jobs
    and their runs' dirs are kept (with ``force`` they are stopped first), and so are the
    code and venv they run from; code another project of the same name pushed (its
    marker is not ``identity``), or that fabfleet did not create, is kept unless
    ``force``. One round trip; ``{"removed": [paths], "kept": [{"path", "why"}]}``."""
    lay = layout(c.fleet_host, project)
    spec = {"runs_root": lay["all_runs"], "project": None if all_projects else project,
            "code_dir": lay["project"] if code else None,
            "venv_dir": lay["venv"] if venv else None,
            "identity": (identity or {}).get("id"), "force": force, "grace": STOP_GRACE}
    report, _ = runner_call(c, "clean", spec, action="clean the work dir", timeout=TREE_COMMAND)
    return report


def start_job(c, script: str | Path | None, args: Sequence[str] = (), *,
              project: str | None = None, script_in_project: str | None = None,
              cwd: str = "", run_id: str | None = None, timeout: float | None = None,
              keep_children: bool = False, env_file: str | None = None,
              tag: str | None = None, command: Sequence[str] | None = None,
              module: str | None = None, env: dict[str, str] | None = None,
              sbatch: str | Sequence[str] | None = None,
              qsub: str | Sequence[str] | None = None) -> Job:
    """Start ``script`` (or a ``command`` vector, or ``module``: see
    :func:`~fabfleet.host.runs.run_script`) as a detached job and return as soon as it
    runs (see the module docstring). ``env_file``: a remote JSON file of environment
    variables the job gets (read, then deleted: secrets never appear on a command
    line). On a cluster's login node the job is a batch job (``sbatch``/``qsub``: its
    directives; see :mod:`fabfleet.host.batch`), returned once submitted."""
    host: Host = c.fleet_host
    script = Path(script) if script is not None else None
    spec, lay, run_id, run_dir, project = run_spec(c, script, args, project=project,
                                                   script_in_project=script_in_project,
                                                   cwd=cwd, run_id=run_id, command=command,
                                                   module=module, env=env)
    label = spec.get("display") or (f"-m {module}" if module else script.name)
    spec.update(detach=True, keep_children=keep_children, tag=tag)
    if timeout is not None:
        spec["timeout"] = timeout
    if env_file is not None:
        spec["env_file"] = env_file
    if host.scheduler and tag is not None:  # fabfleet's own services need a reachable host
        raise CommandError(host.name, f"{host.name} is a {host.scheduler} login node: "
                           f"{tag.split(':')[0]} cannot run there (its compute nodes are not "
                           "reachable from here, and services do not belong on a login node). "
                           "Use run-remote/run there (batch jobs), or an inventory entry for a "
                           "machine you may run services on.")
    if host.scheduler or sbatch or qsub:
        spec["batch"] = batch.batch_spec(host, project, sbatch, qsub)
        label = f"{label} to {host.scheduler}"
    with host_slots(host):  # starting it counts against max_jobs, like a run or a call
        report, _ = runner_call(c, "run", spec, action=f"start {label} as a job in "
                            f"{lay['project']}", timeout=QUICK_COMMAND, project=project)
    return Job(host, run_id, report)


def parse_signal(name: str) -> str:
    """``term``/``SIGTERM``/``15`` → ``TERM`` (pure; raises LocalError)."""
    text = name.strip().upper().removeprefix("SIG")
    if text.isdigit():
        try:
            text = _signal.Signals(int(text)).name.removeprefix("SIG")
        except ValueError:
            pass
    if text not in SIGNALS:
        raise LocalError(f"--signal {name!r}: expected one of {', '.join(SIGNALS)}")
    return text
