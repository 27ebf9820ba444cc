"""Facts about a host, gathered in one SSH round trip, parsed by small pure functions.

:data:`PROBE` is a stdlib-only Python program sent once per check. It prints, after a
marker line, one JSON object of *raw* observations (``/proc/meminfo`` text, the
``nvidia-smi`` CSV, ``sys.version_info``…). Each :class:`Fact` turns one raw value into
a clean one with a pure ``parse`` function, tested on recorded outputs without a host.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import shell
from .errors import CommandError, FleetError
from .execute import execute
from .inventory import Host

MARKER = "--fabfleet-probe--"

#: Runs on the host with only the standard library; must work on Python 3.6+ so that an
#: old interpreter is reported (with its version), not crashed on.
PROBE = r'''
import json, os, shutil, subprocess, sys
args = json.loads(sys.argv[1])

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
                        "utilization.gpu,driver_version", "--format=csv,noheader,nounits"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=20)
    return {"exit": p.returncode, "stdout": p.stdout, "stderr": p.stderr}

def jobs():
    """Detached fabfleet jobs under the work dir still running (pid + start time)."""
    root = os.path.join(os.path.expanduser(args["work_dir"]), ".runs")
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = None
    running = []
    for project in (os.listdir(root) if os.path.isdir(root) else []):
        pdir = os.path.join(root, project)
        for run_id in (os.listdir(pdir) if os.path.isdir(pdir) else []):
            rd = os.path.join(pdir, run_id)
            if os.path.exists(os.path.join(rd, "exit_code")):
                continue
            try:
                with open(os.path.join(rd, "job.json")) as f:
                    job = json.load(f)
                with open("/proc/%d/stat" % job["pid"]) as f:
                    ticks = int(f.read().rsplit(")", 1)[1].split()[19])
            except (OSError, ValueError, KeyError, IndexError):
                continue
            if ticks == job.get("start_ticks") and job.get("boot_id") == boot:
                running.append({"run_id": run_id, "project": project,
                                "command": " ".join(job.get("argv", [])[2:3])})
    return running

out = {"env_error": sys.argv[2] if len(sys.argv) > 2 else ""}
for fact in args["facts"]:
    try:
        out[fact] = {"ok": globals()[fact]()}
    except Exception as exc:
        out[fact] = {"error": "%s: %s" % (type(exc).__name__, exc)}
sys.stdout.write("\n%s\n%s\n" % (args["marker"], json.dumps(out)))
'''


@dataclass(frozen=True)
class Fact:
    """One thing we learn about a host: the probe function producing the raw value,
    and the pure function that parses it."""

    name: str
    parse: Callable[[Any], Any]


def parse_python(raw: dict) -> dict:
    """``{"version": [3, 11, 2], …}`` → ``{"python": "3.11.2", "implementation": …}``."""
    major, minor, micro = raw["version"]
    local = f"{sys.version_info.major}.{sys.version_info.minor}"
    return {"python": f"{major}.{minor}.{micro}", "python_executable": raw["executable"],
            "python_implementation": raw["implementation"],
            "python_matches_local": f"{major}.{minor}" == local and
            raw["implementation"] == "CPython"}


def parse_meminfo(text: str) -> dict:
    """``/proc/meminfo`` → total and available memory in bytes."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    available = values.get("MemAvailable", values.get("MemFree"))
    return {"mem_total": values.get("MemTotal"), "mem_available": available}


def parse_nvidia_smi(raw: dict | None) -> dict:
    """The CSV of ``nvidia-smi --query-gpu=… --format=csv,noheader,nounits`` → GPU list.

    ``None`` (no nvidia-smi) means no GPUs; a failing nvidia-smi (driver not loaded) is
    reported in ``gpu_error`` rather than guessed away.
    """
    if raw is None:
        return {"gpus": [], "gpu_error": None}
    if raw["exit"] != 0:
        msg = (raw["stderr"] or raw["stdout"]).strip().splitlines()
        return {"gpus": [], "gpu_error": f"nvidia-smi exited {raw['exit']}: "
                f"{msg[-1] if msg else ''}".strip()}
    gpus = []
    for line in raw["stdout"].splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) < 5:
            continue

        def num(s: str) -> int | None:
            return int(float(s)) if s.replace(".", "", 1).isdigit() else None
        gpus.append({"index": num(cols[0]), "name": cols[1], "memory_total_mib": num(cols[2]),
                     "memory_used_mib": num(cols[3]), "utilization_pct": num(cols[4]),
                     "driver": cols[5] if len(cols) > 5 else None})
    return {"gpus": gpus, "gpu_error": None}


def parse_work_dir(raw: dict) -> dict:
    return {"work_dir": raw["path"], "work_dir_exists": raw["exists"],
            "work_dir_writable": raw["writable"], "disk_free": raw["free"],
            "disk_total": raw["total"]}


FACTS: Sequence[Fact] = (
    Fact("python", parse_python),
    Fact("cloudpickle", lambda v: {"cloudpickle": v}),
    Fact("packages", lambda v: {"packages": v}),
    Fact("work_dir", parse_work_dir),
    Fact("meminfo", parse_meminfo),
    Fact("cpus", lambda v: {"cpus": v["count"], "cpus_usable": v["usable"]}),
    Fact("load", lambda v: {"load": [round(x, 2) for x in v]}),
    Fact("nvidia_smi", parse_nvidia_smi),
)


def probe_command(host: Host, require: Sequence[str] = (), project: str | None = None,
                  facts: Sequence[str] | None = None) -> str:
    """The one command that gathers every fact (or only ``facts``): activate the env
    (noting failure), check the interpreter exists, run :data:`PROBE` with it."""
    args = {"require": list(require), "work_dir": host.work_dir, "marker": MARKER,
            "facts": list(facts) if facts is not None else [f.name for f in FACTS]}
    py = shell.q(host.python)
    act = shell.run_activation(host, project)
    script = shell.exports(host.env)
    if act:
        # Activate in this shell (a subshell would not keep it); keep its stderr for the report.
        script += ('fabfleet_t=$(mktemp); '
                   f'if {{ {act}; }} >/dev/null 2>"$fabfleet_t"; then fabfleet_env_err=; '
                   'else fabfleet_env_err=$(cat "$fabfleet_t"); '
                   '[ -n "$fabfleet_env_err" ] || fabfleet_env_err="activation failed"; fi; '
                   'rm -f "$fabfleet_t"; ')
    script += (f"command -v {py} >/dev/null 2>&1 || {{ echo {MARKER}; echo "
               f"'{{\"python_missing\": true}}'; exit 0; }}; "
               f"exec {py} -c {shell.q(PROBE)} {shell.q(json.dumps(args))} "
               '"$fabfleet_env_err"')
    return shell.sh(script)


def parse_probe_output(stdout: str) -> dict:
    """Probe stdout → raw dict (the JSON after :data:`MARKER`). Raises ``ValueError``."""
    _, sep, tail = stdout.rpartition(MARKER)
    if not sep:
        raise ValueError("no probe marker in output")
    return json.loads(tail.strip().splitlines()[0])


def interpret(host: Host, raw: dict, require: Sequence[str] = ()) -> dict:
    """Raw probe data → the facts dict of ``check-env --json``, with ``ok``/``error``."""
    report: dict[str, Any] = {"ok": False, "error": None, "python": None, "warnings": []}
    if raw.get("python_missing"):
        report["error"] = (f"{host.name}: Python interpreter {host.python!r} was not found on "
                           "the host (PATH of a non-interactive SSH shell). Install Python 3 "
                           "there, or set `python:` in the inventory to its full path.")
        return report
    problems = []
    for fact in FACTS:
        entry = raw.get(fact.name, {})
        if "ok" in entry:
            try:
                report.update(fact.parse(entry["ok"]))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                report["warnings"].append(f"could not parse {fact.name}: {exc}")
        else:
            report["warnings"].append(f"{fact.name}: {entry.get('error', 'not reported')}")
    env_err = raw.get("env_error")
    if env_err:
        what = f"venv {host.venv}" if host.venv else f"conda env {host.conda_env}"
        problems.append(f"{what} does not activate ({env_err.strip()}); create it with "
                        "`inv setup-workdir` or fix `venv`/`conda_env` in the inventory")
    if report.get("work_dir_writable") is False:
        problems.append(f"work dir {report.get('work_dir')} is not writable; fix its "
                        "permissions or set `work_dir` in the inventory")
    missing = [name for name, version in (report.get("packages") or {}).items() if not version]
    if missing:
        problems.append(f"required packages missing: {', '.join(missing)} (install them in the "
                        "host's env, e.g. `inv setup-workdir --requirements requirements.txt`)")
    if report.get("python") and not report.get("python_matches_local"):
        local = f"{sys.version_info.major}.{sys.version_info.minor}"
        report["warnings"].append(
            f"remote Python {report['python']} ({report.get('python_implementation')}) is not "
            f"CPython {local} like this machine: scripts run, pickled payloads will be refused")
    if report.get("gpu_error"):
        report["warnings"].append(report["gpu_error"])
    report["ok"] = not problems
    if problems:
        report["error"] = f"{host.name}: " + "; ".join(problems) + "."
    return report


def check_env(c, *, require: Sequence[str] = (), project: str | None = None) -> dict:
    """Gather and judge the facts of the host behind connection ``c`` (one round trip).

    Returns the per-host dict of ``check-env --json`` (``ok``, ``error``, ``python``, …).
    Connection errors raise :class:`~fabfile.errors.HostError`; callers that want them as
    ``ok: false`` entries use :func:`fabfile.check.check_hosts`.
    """
    host: Host = c.fleet_host
    result = execute(c, probe_command(host, require, project), timeout=60,
                     action=f"run the environment probe with {host.python}")
    try:
        raw = parse_probe_output(result.stdout)
    except ValueError:
        raise CommandError(
            host.name,
            f"the environment probe with {host.python!r} exited {result.exit_code} without a "
            f"report: {(result.stderr or result.stdout).strip()[-500:]}. Check that "
            f"`{host.python}` is a working Python 3 on the host.",
            exit_code=result.exit_code, stderr=result.stderr) from None
    return interpret(host, raw, require)


def check_hosts(hosts, *, require: Sequence[str] = (), project: str | None = None,
                max_workers: int = 32) -> dict:
    """:func:`check_env` on every host at once → the ``check-env --json`` document.

    ``{"ok": bool, "hosts": {name: {"ok", "error", "python", …}}}``; a host that cannot
    be reached, refuses our key or shows an unknown key gets ``ok: false`` and its error.
    """
    from .connection import connect
    from .fanout import fan_out

    def one(host: Host) -> dict:
        with connect(host) as c:
            return check_env(c, require=require, project=project)

    hosts = list(hosts)
    # Deadline: connect (TCP + banner + auth) plus the probe's own 60 s cap.
    deadline = max(h.connect_timeout for h in hosts) * 3 + 60 if hosts else None
    results = fan_out(hosts, one, max_workers=max_workers, timeout=deadline)
    report = {}
    for name, outcome in results.items():
        if outcome.ok:
            report[name] = outcome.value
        else:
            err = outcome.error
            report[name] = {"ok": False, "python": None, "warnings": [],
                             "error": str(err) if isinstance(err, FleetError) else
                             f"{name}: unexpected {type(err).__name__}: {err}"}
            report[name]["error_type"] = type(err).__name__
    return {"ok": all(r["ok"] for r in report.values()), "hosts": report}


# -- top: a live snapshot of load, memory, disk, GPUs and jobs ------------------------------
TOP_FACTS = ("load", "cpus", "meminfo", "work_dir", "nvidia_smi", "jobs")


def parse_top(raw: dict) -> dict:
    """Probe output (``TOP_FACTS``) → ``top --json``'s per-host entry (pure)."""
    out: dict[str, Any] = {"ok": True, "error": None}
    for fact in FACTS:
        if fact.name in TOP_FACTS and "ok" in raw.get(fact.name, {}):
            out.update(fact.parse(raw[fact.name]["ok"]))
    out["jobs"] = raw.get("jobs", {}).get("ok") or []
    for key in ("work_dir_exists", "work_dir_writable", "cpus_usable", "gpu_error"):
        out.pop(key, None)
    return out


def top_snapshot(c) -> dict:
    """One round trip: load, CPUs, memory, disk (work dir), each GPU's utilization and
    memory, and the running fabfleet jobs of the host behind ``c``."""
    host: Host = c.fleet_host
    result = execute(c, probe_command(host, facts=TOP_FACTS), timeout=60,
                     action="read the host's load")
    try:
        raw = parse_probe_output(result.stdout)
    except ValueError:
        raise CommandError(host.name, f"the probe with {host.python!r} exited "
                           f"{result.exit_code} without a report: "
                           f"{(result.stderr or result.stdout).strip()[-300:]}",
                           exit_code=result.exit_code) from None
    if raw.get("python_missing"):
        raise CommandError(host.name, f"Python interpreter {host.python!r} was not found "
                           "on the host")
    return parse_top(raw)


def top_hosts(hosts, *, max_workers: int = 32) -> dict:
    """:func:`top_snapshot` on every host at once: ``{"ok", "hosts": {name: {…}}}``."""
    from .connection import connect
    from .fanout import fan_out

    def one(host: Host) -> dict:
        with connect(host) as c:
            return top_snapshot(c)
    hosts = list(hosts)
    deadline = max(h.connect_timeout for h in hosts) * 3 + 60 if hosts else None
    results = fan_out(hosts, one, max_workers=max_workers, timeout=deadline)
    doc = {name: (o.value if o.ok else {"ok": False, "error": str(o.error)})
           for name, o in results.items()}
    return {"ok": all(v["ok"] for v in doc.values()), "hosts": doc}
