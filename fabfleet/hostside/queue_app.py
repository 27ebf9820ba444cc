"""On the host: a queue's drainer, running its tasks on free GPUs without the laptop.

Started as a detached job (``python queue_app.py QUEUE_DIR``) by
:mod:`fabfleet.fleet.queue`. ``QUEUE_DIR`` (``<work_dir>/.queues/<name>``, 0700)
holds ``tasks.json`` (the host's share of the tasks and the run spec they share),
``runner.py``, ``boot.py`` (the sources every run uses) and ``fabfleet_gpus.py``. The
drainer claims a task (``fabfleet_gpus.claim_task``, exclusive) before it starts it, writes
``state/<index>.json`` when it has, keeps ``free.json`` (how many GPUs are free here,
for a mover) current, re-reads ``tasks.json`` (a mover may add tasks), and ends when
every task has run (or ``cancel`` appears).

Which GPUs are free and their machine-wide locks are :mod:`fabfleet.hostside.gpus`'s
(handed over as ``fabfleet_gpus.py``; this queue's own tasks do not make a GPU busy). A
task's locks are passed to its runner: the kernel releases them when the runner ends,
which is when the task and its leftovers have stopped — never while the task could still
use the GPU, even if the drainer is killed.

Each task is an ordinary fabfleet run (``jobs``, ``logs``, ``kill`` work on it), with
``CUDA_VISIBLE_DEVICES`` (its GPUs' UUIDs), ``CUDA_DEVICE_ORDER=PCI_BUS_ID``,
``FABFLEET_QUEUE`` and ``FABFLEET_TASK_INDEX`` in its environment.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

SHIPS_WITH = ("gpus",)  # as fabfleet_gpus.py in the queue dir (see fabfleet.fleet.queue)
fabfleet_gpus = None


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


def note_leftover(qdir, record):
    path = os.path.join(qdir, "leftovers.json")
    found = read_json(path) or []
    write_atomic(path, found + [record])


def main(qdir):
    qdir = os.path.abspath(os.path.expanduser(qdir))
    global fabfleet_gpus
    sys.path.insert(0, qdir)  # ours alone (0700): the GPU module handed over with the queue
    import fabfleet_gpus
    cfg = read_json(os.path.join(qdir, "tasks.json"))
    host, per = cfg["host"], int(cfg["gpus_per_task"])
    os.makedirs(os.path.join(qdir, "state"), mode=0o700, exist_ok=True)
    started = {}  # index -> run dir
    log("queue %s: %d tasks, %d GPU(s) each" % (cfg["name"], len(cfg["tasks"]), per))
    while True:
        if os.path.exists(os.path.join(qdir, "cancel")):
            log("cancelled")
            return
        cfg = read_json(os.path.join(qdir, "tasks.json")) or cfg  # tasks may be added
        running = sum(1 for rdir in started.values()
                      if not os.path.exists(os.path.join(rdir, "exit_code")))
        free = fabfleet_gpus.free_gpus(host.get("gpus", "all"),
                                       int(host.get("max_memory_mib", 1024))) if per else None
        write_atomic(os.path.join(qdir, "free.json"), {
            "free": None if free is None else len(free), "running": running, "at": time.time()})
        stray = fabfleet_gpus.leftovers("FABFLEET_QUEUE=%s" % cfg["name"],
                                        os.path.expanduser(cfg["spec"]["runs"])) if per else []
        for uuid, pid, run_id in stray:  # its task ended, it still holds the GPU: stop it
            log("stopping pid %d: left behind by %s, still holding %s" % (pid, run_id, uuid))
            note_leftover(qdir, {"pid": pid, "run_id": run_id, "gpu": uuid, "at": time.time()})
            try:
                os.kill(pid, signal.SIGTERM)
                time.sleep(2)
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        pending = [t for t in cfg["tasks"] if not os.path.exists(
            os.path.join(qdir, "state", "%d.claim" % t["index"]))]
        if not pending:
            if not running:  # stay while tasks run: a mover reads our free GPUs
                log("every task has run")
                return
            time.sleep(1)
            continue
        task = pending[0]
        fds, gpus = [], []
        if per == 0:
            if running >= int(host.get("tasks_per_host") or 1):
                time.sleep(1)
                continue
        else:
            slots = int(host.get("tasks_per_gpu") or 1)
            gpus, fds = fabfleet_gpus.claim(per, host.get("gpus", "all"), slots,
                                            int(host.get("max_memory_mib", 1024)),
                                            owner="FABFLEET_QUEUE=%s" % cfg["name"]
                                            if slots > 1 else None)
            if not gpus:  # not enough free GPUs now: look again soon
                time.sleep(1)
                continue
        if not fabfleet_gpus.claim_task(qdir, task["index"]) or os.path.exists(
                os.path.join(qdir, "cancel")):  # moved to another host, or cancelled now
            for fd in fds:
                os.close(fd)
            continue
        run_id = start(qdir, cfg, task, gpus, fds)
        for fd in fds:
            os.close(fd)  # the task's runner holds them now
        record = {"index": task["index"], "run_id": run_id, "gpus": [u for _, u in gpus],
                  "started": time.time(), "state": "running" if run_id else "failed"}
        write_atomic(os.path.join(qdir, "state", "%d.json" % task["index"]), record)
        if run_id:
            started[task["index"]] = "%s/%s" % (os.path.expanduser(cfg["spec"]["runs"]), run_id)
            log("task %d on %s: %s" % (task["index"], ",".join(u for _, u in gpus) or "cpu",
                                       run_id))


if __name__ == "__main__":
    main(sys.argv[1])
