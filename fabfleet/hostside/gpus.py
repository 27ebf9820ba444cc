"""On the host: which GPUs are free, the machine-wide lock that keeps one task on one, and
the exclusive claim that makes a queued task start exactly once.

Shipped with the programs that place work on GPUs (the queue's drainer, payload workers)
under the name ``fabfleet_gpus`` (see ``SHIPS_WITH`` in :mod:`fabfleet.ssh.launch`). GPU
facts come from ``nvidia-smi --query-*`` CSV only: every driver has that interface.

A GPU is free when nvidia-smi lists no compute process on it except ones whose
environment carries ``owner`` (``FABFLEET_QUEUE=name`` for a queue's tasks; a process we
may not read is someone else's), its used memory is under ``max_memory_mib``
(processes hidden by containers), and it is allowed (``allowed``: ``"all"`` or indices and
UUIDs). The locks (``/tmp/fabfleet-gpu-locks/<uuid>.<slot>``, ``flock``) are shared by
every user of fabfleet on the machine; the kernel releases one when its last holder ends.
"""

import errno
import fcntl
import os
import stat
import subprocess

LOCK_DIR = "/tmp/fabfleet-gpu-locks"


def smi(query, fields):
    """Rows of ``nvidia-smi --query-QUERY=FIELDS`` (CSV), or ``None`` (no nvidia-smi, or
    it failed: then nothing is placed)."""
    try:
        p = subprocess.run(["nvidia-smi", "--query-%s=%s" % (query, fields),
                            "--format=csv,noheader,nounits"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")] for line in p.stdout.splitlines()
            if line.strip()]


def held_by(pid, owner):
    """Whether GPU process ``pid`` carries ``owner`` (``NAME=VALUE``) in its environment."""
    try:
        with open("/proc/%s/environ" % pid, "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return False
    return owner.encode() in env


def environ(pid):
    """A process's environment (``None`` when we may not read it: someone else's)."""
    try:
        with open("/proc/%s/environ" % pid, "rb") as f:
            raw = f.read().split(b"\0")
    except OSError:
        return None
    return dict(e.decode("utf-8", "replace").split("=", 1) for e in raw if b"=" in e)


def leftovers(owner, runs):
    """``[(uuid, pid, run_id)]``: GPU processes of ``owner`` (``NAME=VALUE`` in their
    environment) whose run (``runs/<FABFLEET_RUN_ID>``) has ended — escaped from the
    task's process group, still holding its GPU."""
    name, _, value = owner.partition("=")
    out = []
    for uuid, pid in smi("compute-apps", "gpu_uuid,pid") or []:
        env = environ(pid) or {}
        run_id = env.get("FABFLEET_RUN_ID", "")
        if env.get(name) == value and run_id and "/" not in run_id and \
                os.path.exists(os.path.join(runs, run_id, "exit_code")):
            out.append((uuid, int(pid), run_id))
    return out


def free_gpus(allowed="all", max_memory_mib=1024, owner=None):
    """``[(index, uuid)]`` of the free GPUs, by index; ``None`` when nvidia-smi cannot
    be read."""
    gpus = smi("gpu", "index,uuid,memory.used")
    apps = smi("compute-apps", "gpu_uuid,pid")
    if gpus is None or apps is None:
        return None
    # ``owner``'s own processes leave a GPU free only where tasks may share it
    mine = {u for u, pid in apps if owner and held_by(pid, owner)}
    busy = {u for u, pid in apps if not (owner and held_by(pid, owner))}
    out = []
    for index, uuid, used in gpus:
        if allowed != "all" and index not in map(str, allowed) and uuid not in allowed:
            continue
        if uuid in busy:
            continue
        if used.isdigit() and int(used) > max_memory_mib and uuid not in mine:
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


def try_lock(uuid, slots=1):
    """A locked descriptor on one of the GPU's ``slots`` lock files, or ``None``."""
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


def claim(count, allowed="all", slots=1, max_memory_mib=1024, owner=None):
    """Lock ``count`` free GPUs: ``([(index, uuid)], [fd])``, or ``([], [])`` when not
    enough are free now (nothing stays locked then)."""
    fds, got = [], []
    for index, uuid in free_gpus(allowed, max_memory_mib, owner) or []:
        fd = try_lock(uuid, slots)
        if fd is not None:
            fds.append(fd)
            got.append((index, uuid))
        if len(got) == count:
            return got, fds
    for fd in fds:
        os.close(fd)
    return [], []


def claim_task(qdir, index):
    """Take queued task ``index`` for good (``O_EXCL`` on ``state/<index>.claim``): the
    drainer before starting it, or a mover handing it to another host — whoever comes
    first; never both."""
    try:
        os.close(os.open(os.path.join(qdir, "state", "%d.claim" % index),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except OSError:
        return False
