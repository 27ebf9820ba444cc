"""The environment probe: raw facts about a host, one JSON object after a marker line.

Run by check-env and top (arguments ``ARGS_JSON [ENV_ERROR]``, through :mod:`fabfleet.hostside.boot`). Each fact is a
function returning *raw* observations (``/proc/meminfo`` text, the ``nvidia-smi`` CSV,
``sys.version_info``…); :mod:`fabfleet.host.facts` parses them with pure functions.
A fact that fails is reported as ``{"error": …}``, never crashes the probe.
"""

import json
import os
import shutil
import subprocess
import sys

MARKER = "--fabfleet-probe--"
args = {}

def python():
    import platform
    return {"version": list(sys.version_info[:3]), "executable": sys.executable,
            "implementation": platform.python_implementation()}

def cloudpickle():
    try:
        import cloudpickle
        return cloudpickle.__version__
    except ImportError:
        return None

def packages():
    import importlib, importlib.util
    out = {}
    for name in args["require"]:
        mod = name.replace("-", "_")
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            spec = None
        version = None
        if spec is not None:
            try:
                from importlib.metadata import version as v
                version = v(name)
            except Exception:
                version = "unknown"
        out[name] = version
    return out

def work_dir():
    path = os.path.expanduser(args["work_dir"])
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "/"
    usage = shutil.disk_usage(probe)
    return {"path": path, "exists": os.path.isdir(path),
            "writable": os.access(probe, os.W_OK | os.X_OK),
            "free": usage.free, "total": usage.total}

def meminfo():
    with open("/proc/meminfo") as f:
        return f.read()

def cpus():
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"count": os.cpu_count(), "usable": usable}

def load():
    return list(os.getloadavg())

def nvidia_smi():
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    p = subprocess.run([exe, "--query-gpu=index,name,memory.total,memory.used,"
                        "utilization.gpu,driver_version,uuid", "--format=csv,noheader,nounits"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=20)
    out = {"exit": p.returncode, "stdout": p.stdout, "stderr": p.stderr, "apps": []}
    if p.returncode == 0:  # who holds each GPU: pid, memory, and the process's owner
        a = subprocess.run([exe, "--query-compute-apps=gpu_uuid,pid,used_memory",
                            "--format=csv,noheader,nounits"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=20)
        for line in a.stdout.splitlines() if a.returncode == 0 else []:
            cols = [c.strip() for c in line.split(",")]
            if len(cols) < 3 or not cols[1].isdigit():
                continue
            try:
                uid = os.stat("/proc/%s" % cols[1]).st_uid
            except OSError:
                uid = None
            try:
                import pwd
                user = pwd.getpwuid(uid).pw_name if uid is not None else None
            except (KeyError, ImportError):
                user = str(uid)
            out["apps"].append({"uuid": cols[0], "pid": int(cols[1]), "memory_mib": cols[2],
                                "user": user, "mine": uid == os.getuid()})
    return out


FACTS = {"python": python, "cloudpickle": cloudpickle, "packages": packages,
         "work_dir": work_dir, "meminfo": meminfo, "cpus": cpus, "load": load,
         "nvidia_smi": nvidia_smi}


def main(argv):
    global args
    args = json.loads(argv[0])
    out = {"env_error": argv[1] if len(argv) > 1 else ""}
    for fact in args["facts"]:
        try:
            out[fact] = {"ok": FACTS[fact]()}
        except Exception as exc:
            out[fact] = {"error": "%s: %s" % (type(exc).__name__, exc)}
    sys.stdout.write("\n%s\n%s\n" % (MARKER, json.dumps(out)))


if __name__ == "__main__":
    main(sys.argv[1:])
