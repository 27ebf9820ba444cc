"""On the host: a queue's drainer, running its tasks on free GPUs without the laptop.

Started as a detached job (``python queue_app.py QUEUE_DIR``) by
:mod:`fabfleet.fleet.queue`. ``QUEUE_DIR`` (``<work_dir>/.queues/<name>/<host>``, 0700)
holds ``tasks.json`` (the host's share of the tasks and the run spec they share),
``runner.py``, ``boot.py`` (the sources every run uses) and ``fabfleet_gpus.py``; the drainer writes
``state/<index>.json`` atomically when it starts a task, and ends when every task has
started (or ``cancel`` appears).

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


def main(qdir):
    qdir = os.path.abspath(os.path.expanduser(qdir))
    global fabfleet_gpus
    sys.path.insert(0, qdir)  # ours alone (0700): the GPU module handed over with the queue
    import fabfleet_gpus
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
            gpus, fds = fabfleet_gpus.claim(per, host.get("gpus", "all"),
                                            int(host.get("tasks_per_gpu") or 1),
                                            int(host.get("max_memory_mib", 1024)),
                                            owner="FABFLEET_QUEUE=%s" % cfg["name"])
            if not gpus:  # not enough free GPUs now: look again soon
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
