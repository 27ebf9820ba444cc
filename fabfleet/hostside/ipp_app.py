"""ipyparallel's controller and engines for fabfleet, started as detached jobs' scripts.

``controller DIR LISTEN MISSES``: records DIR in ``$FABFLEET_RUN_DIR/controller.json``,
then becomes ``ipcontroller`` (same pid) with its profile in ``DIR/profile``,
listening on LISTEN (the host's inventory address, resolved here). Its configuration
is a file written here, 0600: CurveZMQ on every socket (the controller's key pair made
by the controller itself; its public key, which engines and clients need to complete a
handshake, is only in the 0600 connection files) plus the HMAC key of ipyparallel's
messages (made here, never on a command line). The engines drop off
after MISSES missed heartbeats.

``engines DIR N GPUS MISSES``: starts N ``ipengine`` processes from the connection file
``DIR/engine.json`` (one per ``max_jobs`` slot); on a host whose ``nvidia-smi`` lists
GPUs each engine first locks a free GPU (``fabfleet_gpus``, shipped into DIR; ``GPUS``
is ``{"allowed", "slots"}``) and sees only that one; engines that get none are not
started. Writes ``$FABFLEET_RUN_DIR/engines.json`` (``{"count", "gpus"}``) first, then
waits for its engines; SIGTERM stops them. Each engine stops by itself after MISSES
missed heartbeats from the controller (3.5 s apart): a controller that is gone takes
its engines with it.

DIR is the cluster's private dir (0700) on the host: only its user can read the
connection files.
"""

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time

SHIPS_WITH = ("gpus",)  # as fabfleet_gpus.py in the cluster's private dir (fabfleet.apps.ipp)

CONFIG = """\
c = get_config()  # noqa: F821 - written by fabfleet, read by ipcontroller
c.IPController.enable_curve = True
c.Session.key = {key!r}
c.IPController.ip = {ip!r}
c.IPController.location = {ip!r}
c.HeartMonitor.max_heartmonitor_misses = {misses}
"""


def resolve(listen):
    """An address zmq can bind: ``listen`` itself when it is one, else what the name
    resolves to here."""
    try:
        ipaddress.ip_address(listen)
        return listen
    except ValueError:
        return socket.gethostbyname(listen)


def controller(where, listen, misses):
    os.umask(0o077)
    profile = os.path.join(os.path.expanduser(where), "profile")
    os.makedirs(profile, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(profile, "ipcontroller_config.py"),
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    ip = resolve(listen)
    with os.fdopen(fd, "w") as f:
        f.write(CONFIG.format(key=os.urandom(32).hex().encode(), ip=ip, misses=int(misses)))
    write_json("controller.json", {"dir": where, "ip": ip})
    os.execv(sys.executable, [sys.executable, "-m", "ipyparallel.controller",
                              "--profile-dir=" + profile])


def claim_gpus(where, count, options):
    """``[(uuid, fd)]`` for up to ``count`` engines on a GPU host, ``None`` elsewhere."""
    import shutil
    if shutil.which("nvidia-smi") is None:
        return None
    sys.path.insert(0, where)
    import fabfleet_gpus
    if not fabfleet_gpus.smi("gpu", "index,uuid"):
        return None
    held = []
    for _ in range(count):
        got, fds = fabfleet_gpus.claim(1, options.get("allowed", "all"),
                                       options.get("slots", 1), 1024)
        if not got:
            break
        held.append((got[0][1], fds[0]))
    return held


def write_json(name, doc):
    path = os.path.join(os.environ["FABFLEET_RUN_DIR"], name)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f)
    os.rename(path + ".tmp", path)


def engines(where, count, gpus, misses):
    os.umask(0o077)
    where = os.path.expanduser(where)
    gpu_slots = claim_gpus(where, int(count), json.loads(gpus))
    plan = [(None, None)] * int(count) if gpu_slots is None else gpu_slots
    write_json("engines.json", {"count": len(plan), "gpus": [g for g, _ in plan if g]})
    if not plan:
        sys.stderr.write("every GPU of the host is in use by other processes (see `fabfleet "
                         "top`): no engine was started\n")
        sys.exit(75)
    profile = os.path.join(where, "engines")
    os.makedirs(profile, mode=0o700, exist_ok=True)
    children = []
    for gpu, fd in plan:
        env = dict(os.environ)
        if gpu:
            env.update(CUDA_VISIBLE_DEVICES=gpu, CUDA_DEVICE_ORDER="PCI_BUS_ID")
        children.append(subprocess.Popen(
            [sys.executable, "-m", "ipyparallel.engine", "--profile-dir=" + profile,
             "--file=" + os.path.join(where, "engine.json"),
             "--IPEngine.max_heartbeat_misses=%d" % int(misses)],
            env=env, pass_fds=(fd,) if fd is not None else ()))

    def stop(signum, frame):
        for p in children:
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + 5
        for p in children:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [p.wait() for p in children]
    sys.exit(next((c for c in codes if c), 0))


COMMANDS = {"controller": controller, "engines": engines}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
