"""On the host: a queue's drainer, running its tasks on free GPUs without the laptop.

Started as a detached job (``python queue_app.py QUEUE_DIR``) by
:mod:`fabfleet.fleet.queue`. ``QUEUE_DIR`` (``<work_dir>/.queues/<name>/<host>``, 0700)
holds ``tasks.json`` (the host's share of the tasks and the run spec they share),
``runner.py`` and ``boot.py`` (the sources every run uses); the drainer writes
``state/<index>.json`` atomically when it starts a task, and ends when every task has
started (or ``cancel`` appears).

A GPU is free when nvidia-smi lists no compute process on it that is not one of this
queue's tasks' (anyone else's, another queue's), its used memory is under
``max_memory_mib`` (processes hidden by containers), it is allowed by the inventory
(``gpus``), and one of its ``tasks_per_gpu`` lock files can be locked. The locks
(``/tmp/fabfleet-gpu-locks/<uuid>.<slot>``, ``flock``) are machine-wide, shared by every
user of fabfleet, and passed to the task's runner: the kernel releases them when the
runner ends, which is when the task and its leftovers have stopped — never while the task
could still use the GPU, even if the drainer is killed.

Each task is an ordinary fabfleet run (``jobs``, ``logs``, ``kill`` work on it), with
``CUDA_VISIBLE_DEVICES`` (its GPUs' UUIDs), ``CUDA_DEVICE_ORDER=PCI_BUS_ID``,
``FABFLEET_QUEUE`` and ``FABFLEET_TASK_INDEX`` in its environment.
"""

import errno
import fcntl
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import time

LOCK_DIR = "/tmp/fabfleet-gpu-locks"


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_atomic(path, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)


def log(message):
    sys.stdout.write("%s %s\n" % (time.strftime("%H:%M:%S"), message))
    sys.stdout.flush()


# -- GPUs -------------------------------------------------------------------------------
def smi(query, fields):
    try:
        p = subprocess.run(["nvidia-smi", "--query-%s=%s" % (query, fields),
                            "--format=csv,noheader,nounits"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log("nvidia-smi failed: %s" % exc)
        return None
    if p.returncode != 0:
        log("nvidia-smi exited %d: %s" % (p.returncode, p.stderr.strip()[-200:]))
        return None
    return [[c.strip() for c in line.split(",")] for line in p.stdout.splitlines() if line.strip()]


def ours(pid, queue):
    """Whether a GPU process is one of this queue's tasks (its environment says so; a
    process we may not read is someone else's)."""
    try:
        with open("/proc/%s/environ" % pid, "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return False
    return ("FABFLEET_QUEUE=%s" % queue).encode() in env


def free_gpus(host, queue):
    """``[(index, uuid)]`` of the GPUs a task may take now, in index order; ``None`` when
    nvidia-smi cannot be read (then nothing is placed)."""
    gpus = smi("gpu", "index,uuid,memory.used")
    apps = smi("compute-apps", "gpu_uuid,pid")
    if gpus is None or apps is None:
        return None
    busy = {uuid for uuid, pid in apps if not ours(pid, queue)}
    allowed = host.get("gpus", "all")
    limit = host.get("max_memory_mib", 1024)
    out = []
    for index, uuid, used in gpus:
        if allowed != "all" and index not in map(str, allowed) and uuid not in allowed:
            continue
        if uuid in busy or (used.isdigit() and int(used) > limit and not any(
                u == uuid and ours(p, queue) for u, p in apps)):
            continue
        out.append((int(index), uuid))
    return sorted(out)


def lock_dir():
    """The machine-wide lock dir: sticky and world-writable, like /tmp (made if missing;
    refused if someone made it otherwise)."""
    try:
        os.mkdir(LOCK_DIR, 0o1777)
        os.chmod(LOCK_DIR, 0o1777)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
    st = os.lstat(LOCK_DIR)
    if not stat.S_ISDIR(st.st_mode) or not st.st_mode & stat.S_ISVTX:
        raise SystemExit("%s is not a sticky directory: refusing to use it" % LOCK_DIR)
    return LOCK_DIR


def try_lock(uuid, slots):
    """A locked fd on one of the GPU's ``slots`` lock files, or None."""
    d = lock_dir()
    for slot in range(slots):
        path = os.path.join(d, "%s.%d" % (uuid, slot))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError:
            continue  # another user's file we may not open: taken
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            os.close(fd)
    return None


# -- runs -------------------------------------------------------------------------------
def new_run_id(index):
    machine = "".join(c for c in socket.gethostname().split(".")[0] if c.isalnum())[:20]
    return "%s-%s-q%d-%s" % (time.strftime("%Y%m%d-%H%M%S"), machine or "host", index,
                             secrets.token_hex(3))


def start(qdir, cfg, task, gpus, fds):
    """Start one task as a detached run through the runner (the same one every run
    uses), handing it the GPU locks. Returns its run id, or None."""
    run_id = new_run_id(task["index"])
    spec = dict(cfg["spec"], run_id=run_id, detach=True,
                run_dir="%s/%s" % (cfg["spec"]["runs"], run_id),
                tag="queue:%s:%d" % (cfg["name"], task["index"]), command=task["command"],
                display=task["display"])
    spec["env"] = dict(spec.get("env") or {}, FABFLEET_QUEUE=cfg["name"],
                       FABFLEET_TASK_INDEX=str(task["index"]),
                       CUDA_DEVICE_ORDER="PCI_BUS_ID",
                       CUDA_VISIBLE_DEVICES=",".join(uuid for _, uuid in gpus))
    with open(os.path.join(qdir, "runner.py")) as f:
        body = json.dumps({"name": "runner", "source": f.read(),
                           "argv": ["run", json.dumps(spec)]}).encode()
    with open(os.path.join(qdir, "boot.py")) as f:
        boot = f.read()
    proc = subprocess.Popen([sys.executable, "-I", "-c", boot, "fabfleet-runner"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=fds)
    out, err = proc.communicate(b"%d\n" % len(body) + body, timeout=120)
    if proc.returncode != 0:
        log("task %d did not start: %s" % (task["index"], err.decode(errors="replace")[-300:]))
        return None
    return run_id


def main(qdir):
    qdir = os.path.abspath(os.path.expanduser(qdir))
    cfg = read_json(os.path.join(qdir, "tasks.json"))
    host, per = cfg["host"], int(cfg["gpus_per_task"])
    os.makedirs(os.path.join(qdir, "state"), mode=0o700, exist_ok=True)
    started = {}  # index -> (run_id, run_dir)
    log("queue %s: %d tasks, %d GPU(s) each" % (cfg["name"], len(cfg["tasks"]), per))
    while True:
        if os.path.exists(os.path.join(qdir, "cancel")):
            log("cancelled")
            return
        pending = [t for t in cfg["tasks"]
                   if not os.path.exists(os.path.join(qdir, "state", "%d.json" % t["index"]))]
        if not pending:
            log("every task has started")
            return
        running = sum(1 for rid, rdir in started.values()
                      if not os.path.exists(os.path.join(rdir, "exit_code")))
        task = pending[0]
        fds, gpus = [], []
        if per == 0:
            if running >= int(host.get("tasks_per_host") or 1):
                time.sleep(1)
                continue
        else:
            free = free_gpus(host, cfg["name"])
            for index, uuid in free or []:
                fd = try_lock(uuid, int(host.get("tasks_per_gpu") or 1))
                if fd is not None:
                    fds.append(fd)
                    gpus.append((index, uuid))
                if len(gpus) == per:
                    break
            if len(gpus) < per:  # not enough free GPUs now: let go, look again soon
                for fd in fds:
                    os.close(fd)
                time.sleep(1)
                continue
        run_id = start(qdir, cfg, task, gpus, fds)
        for fd in fds:
            os.close(fd)  # the task's runner holds them now
        record = {"index": task["index"], "run_id": run_id, "gpus": [u for _, u in gpus],
                  "started": time.time(), "state": "running" if run_id else "failed"}
        write_atomic(os.path.join(qdir, "state", "%d.json" % task["index"]), record)
        if run_id:
            started[task["index"]] = (run_id, "%s/%s" % (os.path.expanduser(
                cfg["spec"]["runs"]), run_id))
            log("task %d on %s: %s" % (task["index"], ",".join(u for _, u in gpus) or "cpu",
                                       run_id))


if __name__ == "__main__":
    main(sys.argv[1])
