"""Runs on a cluster's login node (``scheduler: slurm|pbs``): every run is a batch job.

The runner on the login node writes the job into the run dir (its spec, the ``env``
values and a copy of itself, 0600 in the 0700 run dir; the job script, built here by
:func:`fabfleet.ssh.shell.batch_script`) and submits it with ``sbatch --parsable`` /
``qsub``, the directives as words of their command line. On the compute node the job
runs the same runner from that copy, inside the host's setup lines and env, with output
to the run dir and its exit code written atomically — the truth when the scheduler has
forgotten the job. ``job.json`` records the scheduler, job id and cluster; ``jobs``,
``logs`` and ``kill`` work as for any run (see :func:`fabfleet.hostside.runner.batch_status`).

An attached run is a submission followed by ``logs --follow``: the output streams
from the job's output file while it runs, Ctrl-C cancels the job, and the run's exit code
is the job's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..config import directives
from ..config.inventory import Host
from ..errors import CommandError
from ..ssh import shell


def words(host: Host, sbatch: str | Sequence[str] | None = None,
          qsub: str | Sequence[str] | None = None) -> list[str]:
    """The submit options for a job on ``host``: the inventory's defaults, then the
    ones given for its scheduler (``--sbatch``/``--qsub``; later words win, as on any
    command line). Options for a scheduler the host does not have are an error."""
    if not host.scheduler:
        if sbatch or qsub:
            raise CommandError(host.name, f"--{'sbatch' if sbatch else 'qsub'} was given, but "
                               "the host is not a cluster's login node (set `scheduler: "
                               "slurm` or `scheduler: pbs` for it in the inventory)")
        return []
    mine, other = (sbatch, qsub) if host.scheduler == "slurm" else (qsub, sbatch)
    flag = directives.FLAG[host.scheduler]
    if other and not mine:
        raise CommandError(host.name, f"--{'qsub' if flag == 'sbatch' else 'sbatch'} was "
                           f"given, but the host's scheduler is {host.scheduler}: use --{flag}")
    defaults = host.sbatch if host.scheduler == "slurm" else host.qsub
    try:
        more = directives.parse(host.scheduler, mine, f"--{flag}")
    except directives.DirectiveError as exc:
        raise CommandError(host.name, str(exc)) from None
    return list(defaults) + list(more)


def batch_spec(host: Host, project: str, sbatch: str | Sequence[str] | None = None,
               qsub: str | Sequence[str] | None = None) -> dict:
    """What the runner's spec carries for a batch job (``spec["batch"]``)."""
    run = f'exec {shell.q(host.python)} -I "$fabfleet_run_dir/runner.py" batch-run {{}}'
    return {"scheduler": host.scheduler, "directives": words(host, sbatch, qsub),
            "script": shell.batch_script(host, project, run), "values": shell.exports(host.env)}


def outcome(host: Host, report: dict) -> tuple[int, str | None, tuple[str, ...]]:
    """``(exit code, stopped, notes)`` of a finished batch job from its final status."""
    status, code = report.get("status"), report.get("exit_code")
    job = f"{report.get('scheduler')} job {report.get('job_id')}"
    said = (report.get("batch_out") or "").strip()
    tail = f"; the job's own output ends: {said[-600:]}" if said else ""
    if status == "exited":
        return code, None, ()
    if status == "killed":
        why = report.get("killed_by") or report.get("sched_state") or "cancelled"
        return (code if code is not None else 143), "scheduler", (
            f"{job} was ended by the scheduler ({why}){tail}",)
    if status == "lost":
        return 255, None, (f"{job} ended without the run's exit code (scheduler state "
                           f"{report.get('sched_state') or report.get('reason') or 'unknown'}): "
                           f"the job failed before fabfleet's runner started, or was killed"
                           f"{tail}",)
    return 255, None, (f"{job}: status {status}",)


def on_submitted(host: Host, report: dict, say: Callable[[bytes], None] | None) -> None:
    if say is not None:
        cluster = f" on cluster {report['cluster']}" if report.get("cluster") and \
            report.get("scheduler") == "slurm" else ""
        say(f"fabfleet: {host.name}: submitted {report['scheduler']} job {report['job_id']}"
            f"{cluster} (run {report['run_id']}); Ctrl-C cancels it\n".encode())
