"""Python calls on a cluster's login node: each call (or map chunk) is one batch job.

What ``run_payload``, ``@remote``, ``executor()`` and ``map`` do on a host with
``scheduler:`` (see :func:`fabfleet.host.pool.call_on_host`): the pickled call, the
program that runs it (:mod:`fabfleet.hostside.batch_call`) and the local cloudpickle go
into a fresh run dir over SFTP (0600 files in a 0700 dir: nothing on a command line);
the job is submitted like any run (:mod:`fabfleet.host.batch`), its output streams to
``on_output`` while it runs, and its ``result`` file gives the value or the remote error.
Each call holds one of the host's ``max_jobs`` slots while its job is queued or runs.
:func:`submit_files`, :func:`read_file` and :func:`cancel_job` are also what check-env's
compute-node check (:func:`fabfleet.host.facts.compute_check`) submits its probe with.
"""

from __future__ import annotations

import io
import json
import pickle
import sys
import threading
from typing import Any

from ..config.inventory import Host
from ..config.settings import current_project_name
from ..errors import CommandError, DeadlineError, TransferError
from ..hostside import batch_call, worker
from ..ssh import shell
from ..ssh.connect import connect
from ..ssh.exec import execute
from ..ssh.launch import shipped_with, source
from . import batch
from .jobs import Job, runner_call
from .runspec import new_run_id, run_spec
from .shipping import cloudpickle_zip, remote_error
from .slots import host_slots

# The job's command: the env's Python runs batch_call.py from the run dir.
_LOADER = ("import os, sys; sys.path[0] = os.environ['FABFLEET_RUN_DIR']; "
           "exec(compile(open(sys.path[0] + '/batch_call.py').read(), 'batch_call.py', 'exec'))")


def submit_files(c, files: dict[str, bytes], command: list[str], display: str, *,
            project: str, timeout: float | None = None) -> tuple[Job, str]:
    """Upload ``files`` into a fresh run dir (0600 in 0700) and submit ``command`` as a
    batch job on the login node behind ``c``; the job and its run dir."""
    host: Host = c.fleet_host
    spec, _, run_id, run_dir, _ = run_spec(c, None, [], project=project, script_in_project=None,
                                           cwd="", run_id=new_run_id(), command=command)
    spec["display"] = display
    if timeout is not None:
        spec["timeout"] = timeout
    spec["batch"] = batch.batch_spec(host, project)
    where = shell.home_relative(run_dir)
    execute(c, shell.sh(f"umask 077 && mkdir -p -- {shell.path(run_dir)}"),
            action=f"make the run dir {run_dir}")
    for name, data in files.items():
        c.put(io.BytesIO(data), remote=f"{where}/{name}")
    report, _ = runner_call(c, "run", spec, action=f"submit {display} to {host.scheduler}",
                        project=project)
    return Job(host, run_id, report), run_dir


def read_file(c, path: str) -> bytes | None:
    try:
        with c.sftp().open(shell.home_relative(path), "rb") as f:
            return f.read()
    except OSError:
        return None


def call(host: Host, blob: bytes, *, on_output, timeout: float | None = None,
         cancel: threading.Event | None = None, kind: bytes = worker.CALL,
         define: tuple[int, bytes] | None = None, project: str | None = None) -> Any:
    """Run one pickled call (or, with ``kind=CHUNK``, a map chunk) as a batch job on
    ``host``; its value, or :class:`~fabfleet.errors.RemoteError` as for any host."""
    project = project or current_project_name()
    with host_slots(host), connect(host) as c:
        if cancel is not None and cancel.is_set():
            raise CommandError(host.name, "the call was not submitted: it was cancelled first")
        files = {"batch_call.py": source(batch_call).encode(),
                 **{f"{name}.py": text.encode()
                    for name, text in shipped_with(batch_call).items()},
                 "cloudpickle.zip": cloudpickle_zip(),
                 "call.bin": pickle.dumps(("chunk" if kind == worker.CHUNK else "call",
                                           define[1] if define else None, blob,
                                           (sys.implementation.name,) + sys.version_info[:2]),
                                          protocol=4)}
        job, run_dir = submit_files(c, files, [host.python, "-u", "-c", _LOADER],
                               "a Python call" if kind == worker.CALL else "a map chunk",
                               project=project, timeout=timeout)
        try:
            final = job.logs(follow=True, conn=c,
                             on_output=lambda data: on_output(host.name, "stdout", data))
        except KeyboardInterrupt:
            cancel_job(job)  # Ctrl-C: the job is cancelled, as any attached run's is
            raise
        result = read_file(c, f"{run_dir}/result")
    if result is None:
        if final.get("exit_code") == 124 and timeout is not None:
            raise DeadlineError(host.name, f"the call was stopped after {timeout:g}s (timeout)")
        code, _, notes = batch.outcome(host, final)
        raise CommandError(host.name, f"{job.record.get('scheduler')} job "
                           f"{job.record.get('job_id')} (run {job.run_id}) gave no result: "
                           f"status {final.get('status')}, exit code {final.get('exit_code')}. "
                           + " ".join(notes), exit_code=code)
    if result[:1] == b"E":
        raise remote_error(host.name, json.loads(result[1:]))
    try:
        return pickle.loads(result[1:])
    except Exception as exc:  # noqa: BLE001 - any unpickling failure
        raise TransferError(host.name, "the function's value came back but does not unpickle "
                            f"here: {type(exc).__name__}: {exc}") from exc


def cancel_job(job: Job) -> None:
    try:
        job.kill()
    except Exception:  # noqa: BLE001 - the host may be gone: nothing left to cancel
        pass
