"""The remote side of a script run: start the script, tee its output, record the run.

Sent to the host on stdin (:mod:`fabfleet.hostside.boot`) with the arguments ``COMMAND SPEC_JSON`` and run with ``python -I`` (standard library
only; :mod:`fabfleet.host.runs` is the client). It survives its own failures: a run dir it
cannot create or a disk that fills up only stops the *saving* (the script's output keeps
flowing to the client); what could not be saved is reported. The report is the last
thing on stderr, after ``REPORT`` (an ASCII record separator, then ``fabfleet-report:``),
as one JSON object::

    {"exit_code": int, "stopped": "timeout" | "signal" | null, "notes": [str, …]}

Before the script starts, a runner failure is one line ``ERROR`` + ``KIND: message`` on
stderr and exit code :data:`RUNNER_FAILED` (``cwd``, ``script``) — never mistaken for the
script's own exit code.

When the script exits, the run ends: processes left in its process group are stopped
(unless ``keep_children``), and output pipes still held open by an escaped daemon stop
being read after :data:`PIPE_GRACE` seconds. ``timeout`` stops the whole process group
(SIGTERM, SIGKILL after ``grace``) and exits 124, as GNU timeout does.
"""

import base64
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

ISOLATED = True  # run with `python -I`: nothing of the user's (cwd, user site) is imported
# Shipped with us: fabfleet_gpus (a queue's task claims, see cmd_queue), fabfleet_batch
# (Slurm/PBS on a login node, see submit_batch).
SHIPS_WITH = ("gpus", "batch")
ERROR = "\x1efabfleet-error: "
REPORT = "\x1efabfleet-report: "
STALE = "\x1efabfleet-stale: "
RUNNER_FAILED = 95
PROJECT_STALE = 76  # the pushed project is not as expected: nothing was run
COMMAND_MISSING = 127  # as a shell says it
SCRIPT_MISSING = 96
TIMED_OUT = 124
PIPE_GRACE = 2.0


def group_members(pgid):
    """Pids in process group ``pgid`` (Linux /proc; empty where there is none)."""
    members = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return members
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            members.append(int(name))
    return members


def signal_group(pgid, sig, grace):
    """Send ``sig`` to process group ``pgid``; SIGKILL what is left after ``grace``
    seconds. The one way fabfleet stops a process group. True when SIGKILL was needed."""
    try:
        os.killpg(pgid, sig)
    except OSError:
        return False
    deadline = time.time() + grace
    while time.time() < deadline and group_members(pgid):
        time.sleep(0.05)
    if not group_members(pgid):
        return False
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
    return True


def stop_group(pgid, grace):
    """SIGTERM the group, SIGKILL what is left after ``grace`` seconds."""
    signal_group(pgid, signal.SIGTERM, grace)


class Saver(object):
    """One output file in the run dir; on the first write error it stops saving and
    remembers why (the script's output still reaches the client)."""

    def __init__(self, run_dir, name, notes):
        self.name, self.notes, self.f = name, notes, None
        if run_dir is not None:
            try:
                self.f = open(os.path.join(run_dir, name), "wb")
            except OSError as exc:
                self.fail(exc)

    def fail(self, exc):
        self.notes.append("could not save %s in the run dir: %s" % (self.name, exc.strerror
                                                                     or exc))
        if self.f is not None:
            try:
                self.f.close()
            except OSError:
                pass
        self.f = None

    def write(self, chunk):
        if self.f is None:
            return
        try:
            self.f.write(chunk)
            self.f.flush()
        except OSError as exc:
            self.fail(exc)

    def close(self):
        if self.f is not None:
            try:
                self.f.close()
            except OSError as exc:
                self.fail(exc)


def pump(src, saver, out, stop):
    """Copy a pipe to the run dir and to us until EOF (or until told to stop)."""
    fd = src.fileno()
    while not stop.is_set():
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        saver.write(chunk)
        try:
            out.write(chunk)
            out.flush()
        except (OSError, ValueError):
            pass  # our SSH channel is gone: keep draining and saving


class ClientWatch(object):
    """Whether the client is still there: it sends a byte on our stdin every few seconds
    (``heartbeat`` in the spec). End of file (its process died, the connection closed)
    or ``lost_after`` seconds of silence (the network is gone) sets ``gone``."""

    def __init__(self, lost_after):
        self.gone = threading.Event()
        self.why = None
        self.lost_after = lost_after
        t = threading.Thread(target=self.watch)
        t.daemon = True
        t.start()

    def watch(self):
        import select
        last = time.time()
        while True:
            ready = select.select([0], [], [], 1.0)[0]
            if ready:
                try:
                    got = os.read(0, 4096)
                except OSError:
                    got = b""
                if not got:
                    self.why = "its connection closed"
                    break
                last = time.time()
            elif time.time() - last > self.lost_after:
                self.why = "no sign of it for %gs" % self.lost_after
                break
        self.gone.set()


def fail(kind, message):
    sys.stderr.write("%s%s: %s\n" % (ERROR, kind, message))
    sys.stderr.flush()
    sys.exit(RUNNER_FAILED if kind != "script" else SCRIPT_MISSING)


def write_file(run_dir, name, text, notes):
    if run_dir is None:
        return
    path = os.path.join(run_dir, name)
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.rename(path + ".tmp", path)
    except OSError as exc:
        notes.append("could not write %s in the run dir: %s" % (name, exc.strerror or exc))


# -- detached jobs: a durable registry in the run dir -------------------------------------
def boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def start_ticks(pid):
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): with
    the boot id, it tells this process from a later one that reused its pid."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_exit_code(run_dir):
    try:
        with open(os.path.join(run_dir, "exit_code")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def job_status(run_dir):
    """One run's status from its run dir: ``running``, ``exited``, ``killed`` or ``lost``
    (a batch job also ``pending``, or ``unknown`` while its scheduler does not answer)."""
    job = read_json(os.path.join(run_dir, "job.json")) or {}
    command = read_json(os.path.join(run_dir, "command.json")) or {}
    killed = read_json(os.path.join(run_dir, "killed"))
    code = read_exit_code(run_dir)
    if job.get("scheduler"):
        return batch_status(run_dir, job, killed, code)
    started = job.get("started")
    if started is None:
        try:
            started = os.stat(run_dir).st_mtime
        except OSError:
            started = None
    if killed is not None:
        status = "killed"
    elif code is not None:
        status = "exited"
    elif job.get("start_ticks") is not None:
        # Running while the job's process is, or while its runner still is: between the
        # process's end and the exit code being written, the runner is finishing up.
        same_boot = job.get("boot_id") == boot_id()
        alive = same_boot and (
            start_ticks(job["pid"]) == job.get("start_ticks")
            or (job.get("runner_ticks") is not None
                and start_ticks(job.get("runner_pid", 0)) == job["runner_ticks"]))
        code = read_exit_code(run_dir) if not alive else None  # written since we looked?
        status = "running" if alive else "exited" if code is not None else "lost"
    else:  # a run of an older fabfleet: alive while its pid is (no start time recorded)
        try:
            with open(os.path.join(run_dir, "pid")) as f:
                pid = int(f.read())
            alive = start_ticks(pid) is not None
        except (OSError, ValueError):
            alive = False
        code = read_exit_code(run_dir) if not alive else None
        status = "running" if alive else "exited" if code is not None else "lost"
    argv = job.get("argv") or command.get("argv") or []
    display = job.get("display") or command.get("display")
    return {"run_id": os.path.basename(run_dir), "project": os.path.basename(os.path.dirname(run_dir)),
            "status": status, "exit_code": code,
            "detached": bool(job) and not job.get("attached"),
            "command": display if display else
                       " ".join([os.path.basename(argv[2])] + argv[3:]) if len(argv) > 2
                       else " ".join(argv),
            "started": started, "age": (time.time() - started) if started else None,
            "pid": job.get("pid"), "run_dir": run_dir,
            "killed_by": (killed or {}).get("signal"), "tag": job.get("tag")}


# -- batch jobs on a login node (Slurm, PBS) ------------------------------------------
_SCHED_CACHE = {}  # (scheduler, job id) -> (when asked, state): one query per poll
SCHED_FRESH = 2.0


def sched_states(pairs):
    """``{(scheduler, job id): {"state", "reason"}}``, asking each scheduler once for
    all the ids not asked about in the last :data:`SCHED_FRESH` seconds. A scheduler
    that does not answer gives state ``None`` and its ``error``."""
    import fabfleet_batch  # shipped with us (SHIPS_WITH)
    now = time.time()
    by = {}
    for name, job_id in pairs:
        if now - _SCHED_CACHE.get((name, job_id), (0, None))[0] > SCHED_FRESH:
            by.setdefault(name, []).append(job_id)
    for name, ids in by.items():
        try:
            got = fabfleet_batch.scheduler(name).states(ids)
        except fabfleet_batch.SchedulerError as exc:
            got = {j: {"state": None, "reason": None, "error": str(exc)} for j in ids}
        for job_id in ids:
            _SCHED_CACHE[(name, job_id)] = (now, got[job_id])
    return {pair: _SCHED_CACHE[pair][1] for pair in pairs}


def batch_status(run_dir, job, killed, code):
    """A batch job's status: its run dir's own records (``exit_code``, written by the
    runner in the job; ``killed``) first, then the scheduler's state. A job the
    scheduler ended or forgot without an exit code is ``killed`` (TIMEOUT, CANCELLED,
    OUT_OF_MEMORY, NODE_FAIL, PREEMPTED, …) or ``lost`` — never ``exited``."""
    import fabfleet_batch
    node = read_json(os.path.join(run_dir, "node.json")) or {}
    state, reason, error = None, None, None
    ask = code is None or killed is not None and not killed.get("state")
    if ask and job.get("job_id"):
        st = sched_states([(job["scheduler"], job["job_id"])])[(job["scheduler"], job["job_id"])]
        state, reason, error = st.get("state"), st.get("reason"), st.get("error")
        if state in fabfleet_batch.ACTIVE and reason == "TimeLimit":
            state = "TIMEOUT"  # Slurm: COMPLETING (TimeLimit) until its processes are gone
        code = read_exit_code(run_dir)  # written since we looked?
        if state in fabfleet_batch.KILLED and (killed or {}).get("state") != state:
            # The scheduler's verdict (TIMEOUT, PREEMPTED, …) is kept: it forgets it soon.
            killed = dict(killed or {"signal": state, "by": "scheduler", "at": time.time()},
                          state=state)
            write_atomic(os.path.join(run_dir, "killed"), json.dumps(killed))
    elif killed is not None:
        state = killed.get("state")
    if killed is not None:
        status = "killed"
    elif code is not None:
        status = "exited"
    elif not job.get("job_id"):
        status, reason = ("lost", job["submit_error"]) if job.get("submit_error") else \
            ("pending", "submitting")
    elif state is None:
        status = "unknown"
    elif state in fabfleet_batch.WAITING:
        status = "pending"
    elif state in fabfleet_batch.ACTIVE:
        status = "running"
    elif state in fabfleet_batch.KILLED:
        status = "killed"
    else:  # COMPLETED, FAILED or forgotten, and no exit code: the runner never finished
        status = "lost"
    out = {"run_id": os.path.basename(run_dir),
           "project": os.path.basename(os.path.dirname(run_dir)),
           "status": status, "exit_code": code, "detached": not job.get("attached"),
           "command": job.get("display") or "", "started": node.get("started") or job.get("started"),
           "age": time.time() - job["started"] if job.get("started") else None,
           "pid": node.get("pid"), "run_dir": run_dir,
           "killed_by": ((killed or {}).get("state") if (killed or {}).get("by") == "scheduler"
                         else None) or (killed or {}).get("signal") or
                        (state if status == "killed" else None),
           "tag": job.get("tag"), "scheduler": job["scheduler"], "job_id": job.get("job_id"),
           "cluster": job.get("cluster"), "sched_state": state, "reason": reason,
           "node": node.get("node")}
    if error:
        out["error"] = error
    if status in ("lost", "killed") and code is None:
        try:  # what ran before the runner (setup, activation) or what killed it
            with open(os.path.join(run_dir, "batch.out"), "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 2000))
                out["batch_out"] = f.read().decode("utf-8", "replace")
        except OSError:
            pass
    return out


def write_private(path, text, mode=0o600):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def submit_batch(spec, script, run_dir, cwd):
    """On a login node: write the job (its spec, env values and this runner, 0600 in the
    0700 run dir; the job script the client built, with the run dir filled in), submit it
    and report ``job.json`` (scheduler, job id, cluster). In the job, ``batch-run`` runs
    this runner from that copy (see :func:`cmd_batch_run`)."""
    import fabfleet_batch
    batch = spec.pop("batch")
    if run_dir is None:
        fail("cwd", "a batch job needs its run dir on the shared file system")
    sched = fabfleet_batch.scheduler(batch["scheduler"])
    if spec.get("command"):
        display = spec.get("display") or " ".join(spec["command"])
    elif spec.get("module"):
        display = " ".join(["-m", spec["module"]] + spec["args"])
    else:
        display = " ".join([os.path.basename(script or "")] + spec["args"])
    job_spec = dict(spec, in_batch=True, script=script, script_b64=None, client_lost=None,
                    detach=False, run_dir=run_dir)
    source = globals().get("FABFLEET_SOURCE")  # set by boot: this very program
    if source is None:
        with open(os.path.abspath(__file__)) as f:
            source = f.read()
    write_private(os.path.join(run_dir, "spec.json"), json.dumps(job_spec))
    write_private(os.path.join(run_dir, "env.sh"), batch.get("values") or "")
    write_private(os.path.join(run_dir, "runner.py"), source)
    import shlex
    write_private(os.path.join(run_dir, "job.sh"), batch["script"].replace(
        "@FABFLEET_RUN_DIR@", shlex.quote(run_dir), 1))
    job = {"run_id": spec["run_id"], "project": spec.get("project"), "display": display,
           "cwd": cwd, "run_dir": run_dir, "tag": spec.get("tag"), "started": time.time(),
           "scheduler": sched.name, "directives": batch.get("directives") or [],
           "job_id": None, "cluster": None}
    write_atomic(os.path.join(run_dir, "job.json"), json.dumps(job))
    try:
        job["job_id"], job["cluster"] = sched.submit(os.path.join(run_dir, "job.sh"), run_dir,
                                                     spec["run_id"], batch.get("directives") or [])
    except fabfleet_batch.SchedulerError as exc:
        job["submit_error"] = str(exc)
        write_atomic(os.path.join(run_dir, "job.json"), json.dumps(job))
        fail("scheduler", str(exc))
    write_atomic(os.path.join(run_dir, "job.json"), json.dumps(job))
    sys.stdout.write(REPORT + json.dumps(job) + "\n")
    sys.stdout.flush()
    sys.exit(0)


def cmd_batch_run(spec):
    """In a batch job, on a compute node: the run the login node prepared."""
    run_dir = os.environ.pop("fabfleet_run_dir", "")  # set by the job's script
    job_spec = read_json(os.path.join(run_dir, "spec.json"))
    if job_spec is None:
        fail("cwd", "the job's spec %s/spec.json is missing: is the work dir on a file "
             "system the compute nodes share?" % run_dir)
    main(job_spec)


def cancel_batch(run_dir, job, wait=0.0):
    """Cancel a batch job (``scancel``/``qdel``: recorded in ``killed`` first); with
    ``wait``, give a job whose runner had started that long to record its end."""
    import fabfleet_batch
    sched = fabfleet_batch.scheduler(job["scheduler"])
    write_atomic(os.path.join(run_dir, "killed"), json.dumps(
        {"signal": sched.cancel_program, "at": time.time()}))
    if job.get("job_id"):
        sched.cancel(job["job_id"])
    deadline = time.time() + wait
    while time.time() < deadline and read_exit_code(run_dir) is None:
        if not os.path.exists(os.path.join(run_dir, "node.json")) and \
                job_status(run_dir)["sched_state"] not in fabfleet_batch.ACTIVE:
            break  # it never ran (or is gone): nothing will write more
        time.sleep(0.2)


RUN_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


def valid_run_id(run_id):
    """One path component in fabfleet's own format (letters, digits, ``-``): never
    ``..``, a path, or an option."""
    return (isinstance(run_id, str) and 0 < len(run_id) <= 100 and run_id[0].isalnum()
            and set(run_id) <= RUN_ID_CHARS)


def find_run(runs_root, run_id):
    """The run dir of ``run_id`` under any project (run ids are unique); a run id that is
    not one of ours is refused."""
    if not valid_run_id(run_id):
        fail("unknown", "%r is not a fabfleet run id" % (run_id,))
    for project in sorted(os.listdir(runs_root)) if os.path.isdir(runs_root) else []:
        d = os.path.join(runs_root, project, run_id)
        if os.path.isdir(d):
            return d
    return None


def cmd_jobs(spec):
    root = os.path.abspath(os.path.expanduser(spec["runs_root"]))
    projects = [spec["project"]] if spec.get("project") else \
        (sorted(os.listdir(root)) if os.path.isdir(root) else [])
    dirs = []
    for project in projects:
        pdir = os.path.join(root, project)
        if not os.path.isdir(pdir):
            continue
        dirs += [os.path.join(pdir, r) for r in sorted(os.listdir(pdir))
                 if os.path.isdir(os.path.join(pdir, r))]
    ask = []  # every batch job still open: one query per scheduler for all of them
    for d in dirs:
        job = read_json(os.path.join(d, "job.json")) or {}
        if job.get("scheduler") and job.get("job_id") and read_exit_code(d) is None:
            ask.append((job["scheduler"], job["job_id"]))
    if ask:
        sched_states(ask)
    out = [job_status(d) for d in dirs]
    sys.stdout.write(REPORT + json.dumps(out) + "\n")


def cmd_kill(spec):
    """Signal a detached job's whole process group, after checking it is still the
    process we started (pid + start time + boot id); SIGKILL after the grace period."""
    root = os.path.abspath(os.path.expanduser(spec["runs_root"]))
    run_dir = find_run(root, spec["run_id"])
    if run_dir is None:
        fail("unknown", "no run %s on this host" % spec["run_id"])
    state = job_status(run_dir)
    job = read_json(os.path.join(run_dir, "job.json"))
    if job and job.get("scheduler") and state["status"] in ("pending", "running", "unknown"):
        import fabfleet_batch
        try:
            cancel_batch(run_dir, job)
        except fabfleet_batch.SchedulerError as exc:
            fail("scheduler", str(exc))
        deadline = time.time() + float(spec.get("grace", 5)) + 10  # the job's runner ends
        while time.time() < deadline and read_exit_code(run_dir) is None and \
                job_status(run_dir)["sched_state"] not in (None, "GONE", "CANCELLED"):
            time.sleep(0.5)
        sys.stdout.write(REPORT + json.dumps(dict(job_status(run_dir), signalled=True,
                                                  escalated=False)) + "\n")
        return
    if state["status"] != "running" or not job:
        sys.stdout.write(REPORT + json.dumps(dict(state, signalled=False)) + "\n")
        return
    sig = getattr(signal, spec.get("signal") or "SIGTERM")
    write_atomic(os.path.join(run_dir, "killed"), json.dumps(
        {"signal": sig.name if hasattr(sig, "name") else str(sig), "at": time.time()}))
    escalated = signal_group(job["pgid"], sig, float(spec.get("grace", 5)))
    deadline = time.time() + 5  # the job's runner records the exit code
    while time.time() < deadline and not os.path.exists(os.path.join(run_dir, "exit_code")):
        time.sleep(0.05)
    sys.stdout.write(REPORT + json.dumps(dict(job_status(run_dir), signalled=True,
                                              escalated=escalated)) + "\n")


def is_run_process(pid, run_id):
    """Whether ``pid`` is the run's own process: a process group leader (not init, not
    us) whose environment carries this run's id. The pid file is in the run dir, which
    the script can write: a stray ``1`` there must never become ``kill -TERM -1``."""
    if pid <= 1 or pid == os.getpid() or start_ticks(pid) is None:
        return False
    try:
        if os.getpgid(pid) != pid:
            return False
        with open("/proc/%d/environ" % pid, "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return False
    return ("FABFLEET_RUN_ID=%s" % run_id).encode() in env


def stop_run(run_dir, grace):
    """Stop a running run's process group (SIGTERM, SIGKILL after ``grace``) and record
    ``killed`` — if its recorded process is still the run's own (see
    :func:`is_run_process`)."""
    job = read_json(os.path.join(run_dir, "job.json")) or {}
    run_id = os.path.basename(run_dir)
    if job.get("pgid") and is_run_process(job["pgid"], run_id):
        write_atomic(os.path.join(run_dir, "killed"), json.dumps(
            {"signal": "SIGTERM", "at": time.time()}))
        signal_group(job["pgid"], signal.SIGTERM, grace)
        # Its runner records the end (timing, exit code): wait for it, so that what
        # follows (a clean removing the run dir, a status) sees the run finished.
        deadline = time.time() + grace + 5
        while time.time() < deadline and read_exit_code(run_dir) is None and \
                job.get("runner_ticks") is not None and \
                start_ticks(job.get("runner_pid") or 0) == job["runner_ticks"]:
            time.sleep(0.05)


def cmd_stop(spec):
    """Stop an attached run (Ctrl-C on the client): its process group, by the pid the
    runner recorded, if that process is still the one it started."""
    root = os.path.abspath(os.path.expanduser(spec["runs_root"]))
    run_dir = find_run(root, spec["run_id"])
    stopped = False
    job = read_json(os.path.join(run_dir, "job.json")) if run_dir is not None else None
    if job and job.get("scheduler"):  # an attached batch job: Ctrl-C cancels it
        import fabfleet_batch
        try:
            cancel_batch(run_dir, job)
            stopped = True
        except fabfleet_batch.SchedulerError as exc:
            fail("scheduler", str(exc))
        run_dir = None
    if run_dir is not None:
        try:
            with open(os.path.join(run_dir, "pid")) as f:
                pid = int(f.read())
        except (OSError, ValueError):
            pid = None
        if pid is not None and is_run_process(pid, spec["run_id"]):
            signal_group(pid, signal.SIGTERM, float(spec.get("grace", 2)))
            stopped = True
    sys.stdout.write(REPORT + json.dumps({"stopped": stopped}) + "\n")


MARKER = ".fabfleet-project"  # in a pushed project's dir: which local project it is


def read_marker(code_dir):
    data = read_json(os.path.join(code_dir, MARKER))
    return data if isinstance(data, dict) else None


def cmd_clean(spec):
    """Remove run dirs (and, asked, a project's code and venv) — but never a running
    job's (unless ``force``: then it is stopped first), never code another project with
    the same name pushed, never a directory without fabfleet's marker (unless
    ``force``). Reports what was removed and what was kept, and why."""
    import shutil
    root = os.path.abspath(os.path.expanduser(spec["runs_root"]))
    force, grace = bool(spec.get("force")), float(spec.get("grace") or 2.0)
    removed, kept = [], []
    projects = [spec["project"]] if spec.get("project") else \
        (sorted(os.listdir(root)) if os.path.isdir(root) else [])
    running = {}  # project -> running run ids left alone

    def remove(path):
        try:
            shutil.rmtree(path)
            removed.append(path)
        except OSError as exc:
            kept.append({"path": path, "why": "could not remove it: %s" % (exc.strerror or exc)})
    for project in projects:
        pdir = os.path.join(root, project)
        if "/" in project or project in ("", ".", "..") or not os.path.isdir(pdir):
            continue
        for run_id in sorted(os.listdir(pdir)):
            run_dir = os.path.join(pdir, run_id)
            if not os.path.isdir(run_dir):
                continue
            state = job_status(run_dir)
            if state["status"] in ("running", "pending", "unknown"):  # a batch job waits too
                if not force:
                    running.setdefault(project, []).append(run_id)
                    kept.append({"path": run_dir, "run_id": run_id,
                                 "why": "still %s (%s): `fabfleet kill %s`, or clean --force "
                                        "to stop it first" % (state["status"], state["command"],
                                                              run_id)})
                    continue
                if state.get("scheduler"):
                    import fabfleet_batch
                    try:
                        cancel_batch(run_dir, read_json(os.path.join(run_dir, "job.json")),
                                     wait=grace + 10)
                    except fabfleet_batch.SchedulerError as exc:
                        kept.append({"path": run_dir, "run_id": run_id,
                                     "why": "could not cancel its job: %s" % exc})
                        continue
                else:
                    stop_run(run_dir, grace)
            remove(run_dir)
        if project not in running:
            try:
                os.rmdir(pdir)
            except OSError:
                pass
    if not spec.get("project"):
        try:
            os.rmdir(root)
        except OSError:
            pass
    for key in ("code_dir", "venv_dir"):
        if not spec.get(key):
            continue
        path = os.path.abspath(os.path.expanduser(spec[key]))
        if not os.path.exists(path):
            continue
        if running.get(spec.get("project")):
            kept.append({"path": path, "why": "jobs of this project still run from it"})
            continue
        if key == "code_dir" and not force:
            marker = read_marker(path)
            if marker is None:
                kept.append({"path": path, "why": "fabfleet did not create it (no %s "
                             "marker): remove it by hand, or clean --code --force" % MARKER})
                continue
            if marker.get("id") != spec.get("identity"):
                kept.append({"path": path, "why": "it holds another project of the same name "
                             "(pushed from %s)" % marker.get("from", "elsewhere")})
                continue
        remove(path)
    sys.stdout.write(REPORT + json.dumps({"removed": removed, "kept": kept}) + "\n")


def drainer_dir(qdir, runs):
    """The run dir of queue ``qdir``'s drainer here while it runs, else None."""
    drainer = read_json(os.path.join(qdir, "drainer.json")) or {}
    run_dir = os.path.join(runs, drainer.get("run_id") or ".")
    if drainer.get("run_id") and os.path.isdir(run_dir) and \
            job_status(run_dir)["status"] == "running":
        return run_dir
    return None


def queue_report(qdir):
    """One queue's tasks on this host: each task's state from its run (the same job
    status as every run), whether the drainer still runs."""
    cfg = read_json(os.path.join(qdir, "tasks.json"))
    if cfg is None:
        return None
    runs = os.path.expanduser(cfg["spec"]["runs"])
    alive = drainer_dir(qdir, runs) is not None
    cancelled = os.path.exists(os.path.join(qdir, "cancel"))
    tasks, moved = [], 0
    for task in cfg["tasks"]:
        rec = read_json(os.path.join(qdir, "state", "%d.json" % task["index"])) or {}
        if rec.get("state") == "moved":  # handed to another host: reported there
            moved += 1
            continue
        out = {"index": task["index"], "command": task["display"], "gpus": rec.get("gpus", []),
               "run_id": rec.get("run_id"), "exit_code": None, "seconds": None,
               "started": rec.get("started")}
        if not rec:
            out["state"] = "cancelled" if cancelled else "queued" if alive else "lost"
        elif not rec.get("run_id"):
            out["state"] = "failed"
        else:
            st = job_status(os.path.join(runs, rec["run_id"]))
            timing = read_json(os.path.join(runs, rec["run_id"], "timing.json")) or {}
            out["exit_code"], out["seconds"] = st["exit_code"], timing.get("seconds")
            out["state"] = {"running": "running", "lost": "lost"}.get(st["status"]) or (
                "cancelled" if st["status"] == "killed" and cancelled else
                "exited" if st["exit_code"] == 0 else "failed")
        tasks.append(out)
    free = read_json(os.path.join(qdir, "free.json")) or {}
    return {"name": cfg["name"], "drainer": alive, "cancelled": cancelled, "tasks": tasks,
            "gpus_per_task": cfg["gpus_per_task"], "project": cfg["spec"].get("project"),
            "moved": moved, "free_gpus": free.get("free"),
            "leftovers": read_json(os.path.join(qdir, "leftovers.json")) or [],
            "free_age": time.time() - free["at"] if free.get("at") else None}


def cmd_queue(spec):
    """The state of queue ``name`` here (``null`` when this host has none); with
    ``cancel``, first stop it: no task starts any more, running ones are stopped; with
    ``retry``, failed and lost tasks go back to the queue."""
    qdir = os.path.join(os.path.abspath(os.path.expanduser(spec["queues_root"])),
                        spec["name"])
    if not valid_run_id(spec["name"]) or not os.path.isdir(qdir):
        sys.stdout.write(REPORT + json.dumps({"absent": True}) + "\n")
        return
    if spec.get("cancel"):
        write_atomic(os.path.join(qdir, "cancel"), "%f" % time.time())
        runs = os.path.expanduser(read_json(os.path.join(qdir, "tasks.json"))["spec"]["runs"])
        # The drainer looks for ``cancel`` before each start: once it is gone, no task
        # starts any more, and one it was starting has its record. It is given a few
        # seconds (a start in progress), then stopped.
        deadline = time.time() + float(spec.get("drainer_grace", 10))
        while drainer_dir(qdir, runs) is not None and time.time() < deadline:
            time.sleep(0.2)
        if drainer_dir(qdir, runs) is not None:
            stop_run(drainer_dir(qdir, runs), float(spec.get("grace", 2)))
        for task in queue_report(qdir)["tasks"]:
            if task["state"] == "running":
                stop_run(os.path.join(runs, task["run_id"]), float(spec.get("grace", 2)))
    if spec.get("take"):  # hand not-started tasks to another host: claimed first
        import fabfleet_gpus  # shipped with us (SHIPS_WITH): the drainer's own claim
        cfg = read_json(os.path.join(qdir, "tasks.json"))
        taken = []
        for task in reversed(cfg["tasks"]):
            if len(taken) >= int(spec["take"]):
                break
            if fabfleet_gpus.claim_task(qdir, task["index"]):
                write_atomic(os.path.join(qdir, "state", "%d.json" % task["index"]),
                             json.dumps({"index": task["index"], "state": "moved",
                                         "to": spec.get("to")}))
                taken.append(task)
        sys.stdout.write(REPORT + json.dumps({"taken": taken}) + "\n")
        return
    if spec.get("add"):  # tasks handed over from another host
        path = os.path.join(qdir, "tasks.json")
        cfg = read_json(path)
        have = {t["index"] for t in cfg["tasks"]}
        for task in spec["add"]:
            if task["index"] not in have:
                cfg["tasks"].append(task)
                for name in ("%d.claim" % task["index"], "%d.json" % task["index"]):
                    try:  # it may have been here before, and moved away
                        os.unlink(os.path.join(qdir, "state", name))
                    except OSError:
                        pass
        write_atomic(path, json.dumps(cfg))
    if spec.get("retry"):
        for task in queue_report(qdir)["tasks"]:
            if task["state"] in ("failed", "lost"):
                for name in ("%d.json" % task["index"], "%d.claim" % task["index"]):
                    try:
                        os.unlink(os.path.join(qdir, "state", name))
                    except OSError:
                        pass
        try:
            os.unlink(os.path.join(qdir, "cancel"))
        except OSError:
            pass
    sys.stdout.write(REPORT + json.dumps(queue_report(qdir)) + "\n")


def cmd_port(spec):
    """A TCP port free on this host (bound on every address, then released)."""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("", 0))
        port = s.getsockname()[1]
    finally:
        s.close()
    sys.stdout.write(REPORT + json.dumps({"port": port}) + "\n")


def cmd_logs(spec):
    """Output of a run from byte ``offset``; with ``follow``, until the run ends. The
    last line on stderr is the report: the run's status and exit code."""
    root = os.path.abspath(os.path.expanduser(spec["runs_root"]))
    run_dir = find_run(root, spec["run_id"])
    if run_dir is None:
        fail("unknown", "no run %s on this host" % spec["run_id"])
    path = os.path.join(run_dir, spec.get("stream") or "stdout")
    offset = int(spec.get("offset") or 0)
    out = sys.stdout.buffer
    # A follower whose client is gone (Ctrl-C, a dropped link) ends: nothing stays behind.
    client = ClientWatch(float(spec["client_lost"])) if spec.get("client_lost") else None
    while True:
        state = job_status(run_dir)  # read before the data: nothing written after is lost
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                while True:
                    chunk = f.read(65536)
                    if not chunk:
                        break
                    out.write(chunk)
                    offset += len(chunk)
                out.flush()
        except OSError:
            pass
        if not spec.get("follow") or state["status"] not in ("running", "pending", "unknown"):
            break
        if client is not None and client.gone.wait(0.2):
            os._exit(0)
        elif client is None:
            time.sleep(0.2)
    if spec.get("follow") and state.get("scheduler") and state["status"] == "killed" and \
            state.get("killed_by") == "SIGTERM":  # by the scheduler: wait for its verdict
        deadline = time.time() + 10
        while time.time() < deadline and state.get("killed_by") == "SIGTERM":
            time.sleep(1)
            state = job_status(run_dir)
    sys.stderr.write(REPORT + json.dumps(dict(state, offset=offset)) + "\n")


def interpreter(script):
    """What runs ``script``: the interpreter of its ``#!`` line (``#!/bin/bash``,
    ``#!/usr/bin/env Rscript``; as the kernel reads it: the interpreter and at most one
    argument), or — for Python, with or without a ``#!`` line — this env's Python."""
    try:
        with open(script, "rb") as f:
            first = f.readline(1024)
    except OSError:
        first = b""
    if not first.startswith(b"#!"):
        return [sys.executable, "-u"]
    words = first[2:].decode("utf-8", "replace").strip().split(None, 1)
    if not words:
        return [sys.executable, "-u"]
    names = [os.path.basename(words[0])] + words[1:]
    program = names[1].split()[0] if names[0] == "env" and len(names) > 1 else names[0]
    if program.startswith("python"):
        return [sys.executable, "-u"]  # the env's Python: the one `python` there means
    if names[0] == "env" and len(names) > 1:
        return names[1].split()  # env resolves it on PATH: so do we (inside the env)
    return words


def which(program, path, cwd):
    """``program`` as the shell would find it (a name on ``path``, or a path relative to
    ``cwd``); ``None`` when it is not there or not executable."""
    if "/" in program:
        full = os.path.join(cwd, program)
        return full if os.path.isfile(full) and os.access(full, os.X_OK) else None
    for d in (path or os.defpath).split(os.pathsep):
        full = os.path.join(d or ".", program)
        if os.path.isfile(full) and os.access(full, os.X_OK):
            return full
    return None


def detach(spec, argv, display, cwd, env, run_dir, notes):
    """Start the script as a job that outlives this connection: a daemon (own session,
    no terminal, stdin /dev/null, output to files, hang-ups ignored) starts it in its own
    process group, records ``job.json`` atomically, waits, and records ``exit_code``."""
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        chunks = []
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        record = b"".join(chunks).decode()
        if not record:
            fail("cwd", "the job did not start; see %s/runner.log" % run_dir)
        sys.stdout.write(REPORT + record + "\n")
        sys.stdout.flush()
        os._exit(0)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDWR)
    log = os.open(os.path.join(run_dir, "runner.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    supervise(spec, argv, display, cwd, env, run_dir, notes, announce=w)
    os._exit(0)


def supervise(spec, argv, display, cwd, env, run_dir, notes, announce=None, batch=False):
    """Run the job to its end with output to files in its run dir: record it (``job.json``;
    in a batch job ``node.json``, next to the login node's record), wait (``timeout``),
    stop what it left, record ``timing.json`` and ``exit_code`` atomically. ``announce``:
    a pipe that gets the record once the job runs. In a batch job stderr joins stdout (as
    the scheduler's own output file does), and the scheduler's SIGTERM (scancel, qdel, a
    time limit) stops the job's group and is recorded as ``killed``. Returns the code."""
    try:
        fout = open(os.path.join(run_dir, "stdout"), "ab" if batch else "wb")
        ferr = subprocess.STDOUT if batch else open(os.path.join(run_dir, "stderr"), "wb")
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=fout,
                                stderr=ferr, start_new_session=True, env=env)
    except OSError as exc:
        if announce is not None:
            os.write(announce, b"")
            os.close(announce)
        sys.stderr.write("cannot start the job: %s\n" % exc)
        if batch:
            write_atomic(os.path.join(run_dir, "exit_code"), "%d\n" % RUNNER_FAILED)
        os._exit(RUNNER_FAILED if batch else 1)
    job = {"run_id": spec["run_id"], "project": spec.get("project"), "argv": argv, "cwd": cwd,
           "display": display,
           "pid": proc.pid, "pgid": proc.pid, "start_ticks": start_ticks(proc.pid),
           "boot_id": boot_id(), "started": time.time(), "runner_pid": os.getpid(),
           "runner_ticks": start_ticks(os.getpid()),
           "run_dir": run_dir, "tag": spec.get("tag")}
    stopped = [None]
    if batch:
        import socket
        job.update(node=socket.gethostname(), job_id=os.environ.get("SLURM_JOB_ID")
                   or os.environ.get("PBS_JOBID"))

        def by_scheduler(signum, frame):
            if not os.path.exists(os.path.join(run_dir, "killed")):
                write_atomic(os.path.join(run_dir, "killed"), json.dumps(
                    {"signal": "SIGTERM", "by": "scheduler", "at": time.time()}))
            stopped[0] = "scheduler"
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except OSError:
                pass
        signal.signal(signal.SIGTERM, by_scheduler)
    write_atomic(os.path.join(run_dir, "pid"), str(proc.pid))
    write_atomic(os.path.join(run_dir, "node.json" if batch else "job.json"), json.dumps(job))
    if announce is not None:
        os.write(announce, json.dumps(job).encode())
        os.close(announce)
    timeout, grace = spec.get("timeout"), float(spec.get("grace") or 2.0)
    deadline = None if timeout is None else time.time() + timeout
    code = None
    while code is None:
        try:
            code = proc.wait(None if deadline is None else max(0.01, deadline - time.time()))
        except subprocess.TimeoutExpired:
            stopped[0] = "timeout"
            stop_group(proc.pid, grace)
            code = proc.wait()
    if stopped[0] == "scheduler":
        stop_group(proc.pid, grace)
    if group_members(proc.pid) and not spec.get("keep_children"):
        stop_group(proc.pid, grace)
    code = TIMED_OUT if stopped[0] == "timeout" else (128 - code if code < 0 else code)
    ended = time.time()
    write_atomic(os.path.join(run_dir, "timing.json"), json.dumps(
        {"started": job["started"], "ended": ended, "seconds": ended - job["started"],
         "stopped": stopped[0], "notes": notes}))
    write_atomic(os.path.join(run_dir, "exit_code"), "%d\n" % code)
    return code


def project_is_current(expect):
    """Whether the pushed project is exactly what the laptop has: its marker names this
    project, and every file the push would send has the size and whole-second mtime (a
    symlink: the target) it has there, readable — what push's listing compares."""
    root = os.path.abspath(os.path.expanduser(expect["dir"]))
    try:
        with open(os.path.join(root, MARKER), "rb") as f:
            marker = json.loads(f.read(4000).decode("utf-8", "replace"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("id") != expect["id"]:
        return False
    for rel, state in expect["files"]:
        path = os.path.join(root, rel)
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if state[0] == "link":
            try:
                if not stat.S_ISLNK(st.st_mode) or os.readlink(path) != state[1]:
                    return False
            except OSError:
                return False
        elif not stat.S_ISREG(st.st_mode) or st.st_size != state[0] or \
                int(st.st_mtime) != state[1] or not os.access(path, os.R_OK):
            return False
    return True


def stale_project(expect):
    """The project is out of date: run push's own listing instead of the run and hand
    its output back (one record on stderr), so that the push needs no round trip of
    its own; exit PROJECT_STALE, nothing run, nothing made."""
    proc = subprocess.Popen(["sh", "-c", expect["listing"]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    out, err = proc.communicate()
    sys.stderr.write(STALE + json.dumps({"code": proc.returncode,
                                         "stdout": base64.b64encode(out).decode(),
                                         "stderr": base64.b64encode(err).decode()}) + "\n")
    sys.stderr.flush()
    sys.exit(PROJECT_STALE)


def main(spec):
    notes = []
    def expand(p):  # absolute: a relative path starting with "-" must never be an option
        return os.path.abspath(os.path.expanduser(p))
    if spec.get("expect") and not project_is_current(spec["expect"]):
        stale_project(spec["expect"])
    run_dir, cwd, work_dir = expand(spec["run_dir"]), expand(spec["cwd"]), expand(spec["work_dir"])
    try:
        os.makedirs(work_dir, mode=0o700, exist_ok=True)
        os.chmod(work_dir, 0o700)
        os.makedirs(cwd, mode=0o700, exist_ok=True)
    except OSError as exc:
        fail("cwd", "cannot create the working directory %s: %s" % (cwd, exc.strerror or exc))
    try:
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        notes.append("could not create the run dir %s: %s; nothing of this run is saved on "
                     "the host" % (run_dir, exc.strerror or exc))
        run_dir = None

    script = spec.get("script") and expand(spec["script"])
    if spec.get("command") or spec.get("module"):
        script = None
    elif spec.get("script_b64") is not None:
        data = base64.b64decode(spec["script_b64"])
        script = None
        for where in ([run_dir] if run_dir else []) + [None]:
            try:
                if where is None:  # the run dir is not writable: a private temp file
                    fd, script = tempfile.mkstemp(prefix="fabfleet-", suffix="-" + spec["script_name"])
                else:
                    script = os.path.join(where, spec["script_name"])
                    fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                break
            except OSError as exc:
                notes.append("could not write the script to %s: %s" % (
                    where or "a temp file", exc.strerror or exc))
                script = None
        if script is None:
            fail("cwd", "nowhere to write the script on the host: " + "; ".join(notes))
    if spec.get("batch"):  # on a login node: submit, and the job does the rest
        submit_batch(spec, script, run_dir, cwd)
    if spec.get("command"):  # a command: an argument vector, resolved on PATH below
        argv = list(spec["command"])
        display = spec.get("display") or " ".join(argv)
    elif spec.get("module"):  # python -m MODULE, from the project's dir
        argv = [sys.executable, "-u", "-m", spec["module"]] + spec["args"]
        display = " ".join(["-m", spec["module"]] + spec["args"])
    else:
        if not script or not os.path.isfile(script):
            fail("script", "%s is not on this host" % script)
        argv = interpreter(script) + [script] + spec["args"]
        display = " ".join([os.path.basename(script)] + spec["args"])
    env = dict(os.environ, PYTHONUNBUFFERED="1", FABFLEET_RUN_ID=spec["run_id"],
               FABFLEET_RUN_DIR=run_dir or "")
    env.update(spec.get("env") or {})  # the launch variables (FABFLEET_HOST, …)
    found = which(argv[0], env.get("PATH"), cwd)
    if found is None:
        if spec.get("in_batch"):  # the job's output says why; its exit code is 127
            write_file(run_dir, "stdout", "fabfleet: %s: not found on the compute node %s "
                       "(PATH=%s)\n" % (argv[0], os.uname()[1], env.get("PATH", "")), notes)
            write_file(run_dir, "exit_code", "%d\n" % COMMAND_MISSING, notes)
        sys.stderr.write("%scommand: %s: not found on this host (PATH=%s)\n"
                         % (ERROR, argv[0], env.get("PATH", "")))
        sys.stderr.flush()
        sys.exit(COMMAND_MISSING)
    argv[0] = found
    if spec.get("env_file"):  # secrets (a Jupyter token) come in a file, never in argv
        env_path = expand(spec["env_file"])
        env.update(read_json(env_path) or {})
        try:
            os.unlink(env_path)
        except OSError:
            pass
    started = time.time()
    write_file(run_dir, "command.json", json.dumps({"argv": argv, "cwd": cwd,
                                                    "display": display}), notes)
    if spec.get("in_batch"):
        os._exit(supervise(spec, argv, display, cwd, env, run_dir, notes, batch=True))
    if spec.get("detach"):
        if run_dir is None:
            fail("cwd", "a detached job needs its run dir: " + "; ".join(notes))
        detach(spec, argv, display, cwd, env, run_dir, notes)
    client = ClientWatch(float(spec["client_lost"])) if spec.get("client_lost") else None
    if client is not None and client.gone.wait(0.01):
        fail("cwd", "the client went away before the script started (%s)" % client.why)
    try:
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, env=env)
    except OSError as exc:
        fail("cwd", "cannot start %s: %s" % (sys.executable, exc))
    pgid = proc.pid
    write_file(run_dir, "pid", str(proc.pid), notes)
    # The same record as a job's (pid, start time, boot id, runner), so that `jobs` tells
    # this run from a later process that reused its pid, after a reboot too.
    write_file(run_dir, "job.json", json.dumps(
        {"run_id": spec["run_id"], "project": spec.get("project"), "argv": argv, "cwd": cwd,
         "display": display, "pid": proc.pid, "pgid": proc.pid, "start_ticks": start_ticks(proc.pid),
         "boot_id": boot_id(), "started": started, "runner_pid": os.getpid(),
         "runner_ticks": start_ticks(os.getpid()), "attached": True}), notes)
    stopped = [None]

    def forward(signum, frame):
        stopped[0] = "signal"
        try:
            os.killpg(pgid, signum)
        except OSError:
            pass
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)

    stop = threading.Event()
    savers = [Saver(run_dir, "stdout", notes), Saver(run_dir, "stderr", notes)]
    threads = [threading.Thread(target=pump, args=(proc.stdout, savers[0], sys.stdout.buffer, stop)),
               threading.Thread(target=pump, args=(proc.stderr, savers[1], sys.stderr.buffer, stop))]
    for t in threads:
        t.daemon = True
        t.start()
    timeout, grace = spec.get("timeout"), float(spec.get("grace") or 2.0)
    deadline = None if timeout is None else started + timeout
    code = None
    while code is None:
        step = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.time()))
        try:
            code = proc.wait(step)
        except subprocess.TimeoutExpired:
            if deadline is not None and time.time() >= deadline:
                stopped[0] = "timeout"
                notes.append("stopped after %gs (--timeout): SIGTERM to the script's process "
                             "group, SIGKILL %gs later" % (timeout, grace))
                stop_group(pgid, grace)
                code = proc.wait()
            elif client is not None and client.gone.is_set():
                stopped[0] = "client"
                notes.append("the client went away (%s): stopped the script's process group, "
                             "as attached runs are (use --detach for jobs that outlive "
                             "the client)" % client.why)
                stop_group(pgid, grace)
                code = proc.wait()
    left = group_members(pgid)
    if left and not spec.get("keep_children"):
        notes.append("the script left %d process(es) running in its process group (pids %s): "
                     "stopped them" % (len(left), ", ".join(map(str, left[:10]))))
        stop_group(pgid, grace)
    elif left:
        notes.append("the script left %d process(es) running (pids %s); kept, as asked"
                     % (len(left), ", ".join(map(str, left[:10]))))
    deadline = time.time() + PIPE_GRACE
    for t in threads:
        t.join(max(0.0, deadline - time.time()))
    if any(t.is_alive() for t in threads):
        stop.set()
        notes.append("a process outside the script's process group (a daemon?) still holds "
                     "its output open; that output is no longer collected")
    for saver in savers:
        saver.close()
    ended = time.time()
    if stopped[0] == "timeout":
        code = TIMED_OUT
    elif code < 0:
        code = 128 - code
    write_file(run_dir, "timing.json", json.dumps(
        {"started": started, "ended": ended, "seconds": ended - started,
         "stopped": stopped[0], "notes": notes}), notes)
    write_file(run_dir, "exit_code", "%d\n" % code, notes)
    sys.stdout.flush()
    sys.stderr.write(REPORT + json.dumps({"exit_code": code, "stopped": stopped[0],
                                          "notes": notes}) + "\n")
    sys.stderr.flush()
    os._exit(code)  # daemon pump threads may still block on a held pipe


COMMANDS = {"run": main, "jobs": cmd_jobs, "kill": cmd_kill, "logs": cmd_logs,
            "stop": cmd_stop, "clean": cmd_clean, "port": cmd_port, "queue": cmd_queue,
            "batch-run": cmd_batch_run}

if __name__ == "__main__":
    if len(sys.argv) > 2:
        COMMANDS[sys.argv[1]](json.loads(sys.argv[2]))
    else:
        main(json.loads(sys.argv[1]))
