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


def _out(argv):
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=30)
    except OSError as exc:
        return 127, "", "%s: %s" % (argv[0], exc.strerror or exc)
    except subprocess.TimeoutExpired:
        return 124, "", "%s did not answer within 30s" % argv[0]
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), \
        proc.stderr.decode("utf-8", "replace")


def scheduler():
    """On a login node (``scheduler`` given): the scheduler's commands as found after
    the setup lines, its version, its partitions/queues, and the last compute-node check
    (``<work_dir>/.fabfleet-compute.json``, written by check-env)."""
    name = args.get("scheduler")
    if not name:
        return None
    out = {"name": name, "found": {}, "version": None, "queues": [], "error": None}
    programs = ("sbatch", "squeue", "scancel", "sinfo") if name == "slurm" else \
        ("qsub", "qstat", "qdel")
    for program in programs:
        out["found"][program] = shutil.which(program)
    if name == "slurm":
        code, text, err = _out(["sinfo", "--version"])
        out["version"] = text.strip() or None
        code, text, err = _out(["sinfo", "-h", "-o", "%P|%a|%D|%c|%m|%l"])
        for line in text.splitlines() if code == 0 else []:
            p = line.strip().split("|")
            if len(p) == 6:
                out["queues"].append({"name": p[0].rstrip("*"), "default": p[0].endswith("*"),
                                      "state": p[1], "nodes": p[2], "cpus": p[3],
                                      "memory_mb": p[4], "time_limit": p[5]})
    else:
        code, text, err = _out(["qstat", "--version"])
        out["version"] = (text or err).strip() or None
        code, text, err = _out(["qstat", "-Q", "-f", "-F", "json"])
        try:
            queues = json.loads(text).get("Queue") or {} if code == 0 else {}
        except ValueError:
            queues = {}
        for qname, q in sorted(queues.items()):
            out["queues"].append({"name": qname, "default": False,
                                  "state": "up" if q.get("enabled") in ("True", True) and
                                  q.get("started") in ("True", True) else "down",
                                  "time_limit": (q.get("resources_max") or {}).get("walltime")})
    if code != 0 and not out["queues"]:
        out["error"] = err.strip()[-300:]
    try:
        with open(os.path.join(os.path.expanduser(args["work_dir"]),
                               ".fabfleet-compute.json")) as f:
            out["compute"] = json.load(f)
    except (OSError, ValueError):
        out["compute"] = None
    return out


FACTS = {"scheduler": scheduler, "python": python, "cloudpickle": cloudpickle, "packages": packages,
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
