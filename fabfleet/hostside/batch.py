"""Batch schedulers on a cluster's login node (Slurm, PBS): submit, ask, cancel.

Standard library only; shipped with the runner (as ``fabfleet_batch``). Everything the
scheduler says is read from machine-readable output — ``sbatch --parsable``,
``squeue -o`` with a separator, ``qstat -f -F json`` — never from prose. A job the
scheduler no longer knows (Slurm forgets one ``MinJobAge`` after it ends; PBS after its
history) is ``GONE``: the run dir's own exit code is then the only truth (the runner in
the job writes it atomically).
"""

import json
import os
import pwd
import subprocess

GONE = "GONE"  # the scheduler does not know the job (any more)
#: Scheduler states that mean the job is waiting / has a process / ended by the
#: scheduler's hand (the run is then ``killed``, whatever exit code it wrote).
WAITING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
           "RESV_DEL_HOLD", "SUSPENDED", "STOPPED", "SIGNALING", "RESIZING"}
ACTIVE = {"RUNNING", "COMPLETING", "STAGE_OUT"}
KILLED = {"CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "DEADLINE",
          "BOOT_FAIL", "REVOKED", "KILLED"}
QUERY_TIMEOUT = 30


def _run(argv, cwd=None):
    """``(exit code, stdout, stderr)``; a missing program is exit 127."""
    try:
        proc = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=QUERY_TIMEOUT)
    except OSError as exc:
        return 127, "", "%s: %s" % (argv[0], exc.strerror or exc)
    except subprocess.TimeoutExpired:
        return 124, "", "%s did not answer within %ds" % (argv[0], QUERY_TIMEOUT)
    return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"))


class SchedulerError(Exception):
    pass


class Slurm(object):
    name = "slurm"
    submit_program = "sbatch"
    cancel_program = "scancel"

    def submit(self, script, run_dir, run_id, directives):
        """Submit ``script``; ``(job id, cluster or None)`` from ``sbatch --parsable``
        (``id`` or ``id;cluster``). The job's own output (what runs before the runner,
        and the runner's messages) goes to ``RUN_DIR/batch.out``."""
        code, out, err = _run(["sbatch", "--parsable", "--job-name=fabfleet-" + run_id,
                               "--output=" + os.path.join(run_dir, "batch.out"),
                               "--chdir=" + run_dir] + list(directives) + [script],
                              cwd=run_dir)
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
        if code != 0 or not lines:
            raise SchedulerError("sbatch failed (exit %d): %s" % (code, err.strip()[-800:] or
                                                                  "no output"))
        job_id, _, cluster = lines[-1].partition(";")
        if not job_id.isdigit():
            raise SchedulerError("sbatch --parsable printed %r, not a job id" % lines[-1])
        return job_id, cluster or None

    def states(self, job_ids):
        """``{id: {"state", "reason"}}`` for ``job_ids`` (``GONE`` for jobs the scheduler
        no longer knows): ``squeue`` for this user's jobs, then ``scontrol`` for those it
        no longer lists (finished ones, for ``MinJobAge``), then ``sacct`` where there is
        accounting. Raises :class:`SchedulerError` when ``squeue`` itself fails."""
        user = pwd.getpwuid(os.getuid()).pw_name
        code, out, err = _run(["squeue", "-h", "-u", user, "-t", "all", "-o", "%i|%T|%r"])
        if code != 0:
            raise SchedulerError("squeue failed (exit %d): %s" % (code, err.strip()[-500:]))
        found = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                found[parts[0]] = {"state": parts[1], "reason": parts[2]}
        wanted = [j for j in job_ids if j not in found]
        for job_id in list(wanted):
            code, out, _ = _run(["scontrol", "show", "job", "-o", job_id])
            fields = dict(w.split("=", 1) for w in out.split() if "=" in w) if code == 0 else {}
            if fields.get("JobState"):
                found[job_id] = {"state": fields["JobState"], "reason": fields.get("Reason"),
                                 "exit": fields.get("ExitCode")}
                wanted.remove(job_id)
        if wanted:
            code, out, _ = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(wanted),
                                 "-o", "JobIDRaw,State,ExitCode"])
            for line in out.splitlines() if code == 0 else []:
                parts = line.strip().split("|")
                if len(parts) == 3 and parts[0] in wanted:  # "CANCELLED by 1000" -> CANCELLED
                    found[parts[0]] = {"state": parts[1].split()[0], "reason": None,
                                       "exit": parts[2]}
        return {j: found.get(j) or {"state": GONE, "reason": None} for j in job_ids}

    def cancel(self, job_id):
        code, _, err = _run(["scancel", job_id])
        if code != 0:
            raise SchedulerError("scancel %s failed (exit %d): %s" % (job_id, code,
                                                                      err.strip()[-300:]))


# PBS job_state letters: Q queued, H held, W waiting, T moving, S suspended, R running,
# E exiting, B array begun, F finished (only with qstat -x, while in the history).
_PBS = {"Q": "PENDING", "H": "PENDING", "W": "PENDING", "T": "PENDING", "S": "SUSPENDED",
        "R": "RUNNING", "E": "COMPLETING", "B": "RUNNING"}


class PBS(object):
    name = "pbs"
    submit_program = "qsub"
    cancel_program = "qdel"

    def submit(self, script, run_dir, run_id, directives):
        """Submit ``script``; the job id is qsub's whole output line (``SEQ.SERVER``)."""
        code, out, err = _run(["qsub", "-N", ("fabfleet-" + run_id)[:236], "-j", "oe",
                               "-o", os.path.join(run_dir, "batch.out")]
                              + list(directives) + [script], cwd=run_dir)
        lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
        if code != 0 or not lines:
            raise SchedulerError("qsub failed (exit %d): %s" % (code, err.strip()[-800:] or
                                                                "no output"))
        job_id = lines[-1]
        if not job_id.split(".")[0].isdigit() or any(c.isspace() for c in job_id):
            raise SchedulerError("qsub printed %r, not a job id" % lines[-1])
        return job_id, job_id.split(".", 1)[1] if "." in job_id else None

    def states(self, job_ids):
        """From ``qstat -f -F json -x`` (finished jobs while in the server's history);
        unknown ids are on stderr and in the exit code, the others still printed."""
        if not job_ids:
            return {}
        code, out, err = _run(["qstat", "-f", "-F", "json", "-x"] + list(job_ids))
        try:
            jobs = json.loads(out).get("Jobs") or {} if out.strip() else {}
        except ValueError:
            raise SchedulerError("qstat failed (exit %d): %s" % (code, (err or out)[-500:]))
        if not jobs and code not in (0, 153, 35) and "Unknown Job" not in err:
            raise SchedulerError("qstat failed (exit %d): %s" % (code, err.strip()[-500:]))
        found = {}
        for job_id, rec in jobs.items():
            letter = rec.get("job_state")
            if letter == "F":
                status = rec.get("Exit_status")
                state = ("COMPLETED" if status == 0 else "TIMEOUT" if status == -29 else
                         "CANCELLED" if status == 271 else
                         "KILLED" if isinstance(status, int) and status >= 256 else "FAILED")
                found[job_id] = {"state": state, "reason": rec.get("comment"), "exit": status}
            else:
                found[job_id] = {"state": _PBS.get(letter, letter), "reason": rec.get("comment")}
        return {j: found.get(j) or {"state": GONE, "reason": None} for j in job_ids}

    def cancel(self, job_id):
        code, _, err = _run(["qdel", job_id])
        if code not in (0, 35):  # 35: it had finished meanwhile
            raise SchedulerError("qdel %s failed (exit %d): %s" % (job_id, code,
                                                                   err.strip()[-300:]))


SCHEDULERS = {"slurm": Slurm(), "pbs": PBS()}


def scheduler(name):
    return SCHEDULERS[name]


def job_env():
    """The scheduler's id of the job we are in, from its environment."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID")
