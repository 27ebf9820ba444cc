"""Facts about a host, gathered in one SSH round trip, parsed by small pure functions.

:mod:`fabfleet.hostside.probe` runs on the host and prints, after a marker line, one JSON
object of *raw* observations (``/proc/meminfo`` text, the ``nvidia-smi`` CSV,
``sys.version_info``…). Each :class:`Fact` turns one raw value into a clean one with a
pure ``parse`` function, tested on recorded outputs without a host. ``top`` adds the
runner's job list (:func:`fabfleet.hostside.runner.job_status`) in the same round trip.
On a cluster's login node check-env also runs the probe once in a tiny batch job on a
compute node (:func:`compute_check`, through :mod:`fabfleet.host.batch_calls`), cached
for a day in the work dir.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..config.deadlines import COMPUTE_CHECK, COMPUTE_CHECK_AGE, QUICK_COMMAND
from ..config.inventory import Host
from ..config.settings import current_project_name, layout
from ..errors import CommandError
from ..hostside import probe, runner
from ..ssh import shell
from ..ssh.exec import execute
from ..ssh.launch import python_command, source
from .batch_calls import cancel_job, read_file, submit_files

MARKER = probe.MARKER

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
        uuid = cols[6] if len(cols) > 6 else None
        holders = [{"user": a["user"], "pid": a["pid"], "memory_mib": num(str(a["memory_mib"])),
                    "mine": a["mine"]} for a in raw.get("apps") or [] if a["uuid"] == uuid]
        gpus.append({"index": num(cols[0]), "name": cols[1], "memory_total_mib": num(cols[2]),
                     "memory_used_mib": num(cols[3]), "utilization_pct": num(cols[4]),
                     "driver": cols[5] if len(cols) > 5 else None, "uuid": uuid,
                     "processes": holders})
    gpus.sort(key=lambda g: (g["index"] is None, g["index"] or 0))  # nvidia-smi's order varies
    return {"gpus": gpus, "gpu_error": None}


def parse_work_dir(raw: dict) -> dict:
    return {"work_dir": raw["path"], "work_dir_exists": raw["exists"],
            "work_dir_writable": raw["writable"], "disk_free": raw["free"],
            "disk_total": raw["total"]}


def parse_scheduler(raw: dict | None) -> dict:
    """A login node's scheduler: ``{"scheduler": {"name", "version", "commands",
    "queues": [...]}}`` (nothing on other hosts)."""
    if raw is None:
        return {}
    return {"scheduler": {"name": raw["name"], "version": raw.get("version"),
                          "commands": raw.get("found") or {},
                          "queues": raw.get("queues") or [], "error": raw.get("error")},
            "compute_cache": raw.get("compute")}


FACTS: Sequence[Fact] = (
    Fact("scheduler", parse_scheduler),
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
                  facts: Sequence[str] | None = None) -> shell.Remote:
    """The one command that gathers every fact (or only ``facts``): the probe, in the
    host's env; a failed activation is reported by the probe rather than fatal."""
    args = {"require": list(require), "work_dir": host.work_dir, "scheduler": host.scheduler,
            "facts": list(facts) if facts is not None else [f.name for f in FACTS]}
    return python_command(host, probe, [json.dumps(args)], project=project,
                          report_env_error=True)


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
    if env_err and env_err.startswith("setup line failed: "):
        problems.append(f"{env_err.strip()}. " + shell.setup_hint(host, env_err).rstrip("."))
    elif env_err:
        what = f"venv {host.venv}" if host.venv else f"conda env {host.conda_env}" \
            if host.conda_env else "the project's venv"
        problems.append(f"{what} does not activate ({env_err.strip()}); create it with "
                        "`fabfleet setup-workdir` or fix `venv`/`conda_env` in the inventory")
    if report.get("work_dir_writable") is False:
        problems.append(f"work dir {report.get('work_dir')} is not writable; fix its "
                        "permissions or set `work_dir` in the inventory")
    missing = [name for name, version in (report.get("packages") or {}).items() if not version]
    if missing and not host.scheduler:  # on a login node they matter on the compute nodes
        problems.append(f"required packages missing: {', '.join(missing)} (install them in the "
                        "host's env, e.g. `inv setup-workdir --requirements requirements.txt`)")
    if report.get("python") and not report.get("python_matches_local"):
        local = f"{sys.version_info.major}.{sys.version_info.minor}"
        report["warnings"].append(
            f"remote Python {report['python']} ({report.get('python_implementation')}) is not "
            f"CPython {local} like this machine: scripts run, pickled payloads will be refused")
    if report.get("gpu_error"):
        report["warnings"].append(report["gpu_error"])
    sched = report.get("scheduler")
    if sched:
        missing = [p for p, where in sched["commands"].items() if not where]
        if missing:
            problems.append(f"{', '.join(missing)} not found on the login node (after the "
                            "host's setup lines): add the line that provides them to `setup:` "
                            "(e.g. `module load slurm`), or fix `scheduler:`")
        elif not sched["queues"]:
            report["warnings"].append(f"the scheduler lists no partitions/queues "
                                      f"({sched.get('error') or 'empty answer'})")
    report["ok"] = not problems
    if problems:
        report["error"] = f"{host.name}: " + "; ".join(problems) + "."
    return report


def _raw_facts(c, command: shell.Remote, action: str) -> tuple[dict, str]:
    """Run a probe command; its raw facts (``{"python_missing": True}`` when the
    interpreter is not there) and its whole stdout."""
    host: Host = c.fleet_host
    result = execute(c, command, timeout=QUICK_COMMAND, action=action)
    if result.exit_code == 127 and f"{shell.ERR} python" in result.stderr:
        return {"python_missing": True}, result.stdout
    if result.exit_code == 97 and f"{shell.ERR} workdir" in result.stderr:
        raise CommandError(host.name, shell.env_failure(host, result.stderr),
                           exit_code=97, stderr=result.stderr)
    try:
        return parse_probe_output(result.stdout), result.stdout
    except ValueError:
        raise CommandError(
            host.name,
            f"the environment probe with {host.python!r} exited {result.exit_code} without a "
            f"report: {(result.stderr or result.stdout).strip()[-500:]}. Check that "
            f"`{host.python}` is a working Python 3 on the host.",
            exit_code=result.exit_code, stderr=result.stderr) from None


def check_env(c, *, require: Sequence[str] = (), project: str | None = None,
              compute: bool = True) -> dict:
    """Gather and judge the facts of the host behind connection ``c`` (one round trip).

    Returns the per-host dict of ``check-env --json`` (``ok``, ``error``, ``python``, …).
    Connection errors raise :class:`~fabfleet.errors.HostError`; callers that want them as
    ``ok: false`` entries use :func:`fabfleet.fleet.checks.check_hosts`.
    """
    host: Host = c.fleet_host
    raw, _ = _raw_facts(c, probe_command(host, require, project),
                        f"run the environment probe with {host.python}")
    report = interpret(host, raw, require)
    cache = report.pop("compute_cache", None)
    if host.scheduler and compute and report["ok"]:
        node = cached_compute(host, cache, require) or compute_check(c, require, project)
        node = dict(node, packages={n: v for n, v in (node.get("packages") or {}).items()
                                    if n in require})  # a cached check may have asked more
        report["compute"] = node
        judge_compute(host, report, node)
    return report


def judge_compute(host: Host, report: dict, node: dict) -> None:
    """Fold a login node's compute-node check into its report: a check that could not
    run, or packages missing there, make the host not ok."""
    problems = []
    if node.get("error"):
        problems.append(f"compute node: {node['error']}")
    missing = [n for n, v in (node.get("packages") or {}).items() if not v]
    if missing:
        problems.append(f"required packages missing on the compute node {node.get('node')}: "
                        f"{', '.join(missing)} (install them in the env the jobs use)")
    if node.get("python") and not node.get("python_matches_local"):
        report["warnings"].append(f"the compute node's Python is {node['python']}, not "
                                  f"this machine's: pickled calls will fail there")
    if problems:
        report["ok"] = False
        report["error"] = "; ".join(filter(None, [report.get("error"),
                                                  f"{host.name}: " + "; ".join(problems) + "."]))


# -- check-env on a login node: one tiny job on a compute node, cached ------------------
_PROBE_LOADER = ("import os, sys; sys.path[0] = os.environ['FABFLEET_RUN_DIR']; "
                 "sys.argv = ['probe', open(sys.path[0] + '/probe.json').read()]; "
                 "exec(compile(open(sys.path[0] + '/probe.py').read(), 'probe.py', 'exec'))")
COMPUTE_FACTS = ("python", "cloudpickle", "packages", "cpus", "meminfo", "nvidia_smi")
CACHE_NAME = ".fabfleet-compute.json"


def cached_compute(host: Host, cached: dict | None, require: Sequence[str]) -> dict | None:
    """The last compute-node check (from the login node's work dir) if it still answers:
    younger than :data:`~fabfleet.config.deadlines.COMPUTE_CHECK_AGE`, for this
    interpreter, with every package in ``require`` looked at."""
    if not cached or cached.get("python_setting") != host.python:
        return None
    if time.time() - float(cached.get("at") or 0) > COMPUTE_CHECK_AGE:
        return None
    if not set(require) <= set(cached.get("packages") or {}):
        return None
    return dict(cached, cached=True)


def compute_check(c, require: Sequence[str] = (), project: str | None = None,
                  wait: float = COMPUTE_CHECK) -> dict:
    """Run the environment probe in a tiny batch job on a compute node (the host's setup
    and env, the work dir seen from there): ``{"node", "python", "packages", "shared",
    …}`` — or ``{"error": …}`` when it could not be done in ``wait`` seconds (the job is
    then cancelled) or the job found no run dir (the work dir is not shared). A result
    is cached on the login node (``<work_dir>/.fabfleet-compute.json``)."""
    host: Host = c.fleet_host
    project = project or current_project_name()
    args = {"require": list(require), "work_dir": host.work_dir, "facts": list(COMPUTE_FACTS)}
    job, run_dir = submit_files(c, {"probe.py": source(probe).encode(),
                               "probe.json": json.dumps(args).encode()},
                           [host.python, "-c", _PROBE_LOADER], "the compute-node check",
                           project=project, timeout=wait)
    try:
        state = job.wait(timeout=wait, poll=1.0)
    except CommandError:
        cancel_job(job)
        now = job.status()
        return {"error": f"the check job ({host.scheduler} job {job.record.get('job_id')}) "
                         f"was still {now.get('status')} ({now.get('reason') or '-'}) after "
                         f"{wait:g}s; run check-env again when the cluster is less busy"}
    out = (job.logs(conn=c).get("data") or b"").decode("utf-8", "replace")
    try:
        raw = parse_probe_output(out)
    except ValueError:
        said = (state.get("batch_out") or out).strip()[-400:]
        shared = read_file(c, f"{run_dir}/node.json") is not None
        return {"shared": shared, "error": (
            f"the check job ({host.scheduler} job {job.record.get('job_id')}) ended "
            f"{state.get('status')} without a report" + (
                "" if shared else f": it left nothing in its run dir as seen from the login "
                f"node, so the work dir {host.work_dir} is probably not on a file system the "
                "compute nodes share (set `work_dir` to one, e.g. under $HOME or /scratch)")
            + (f"; its output: {said}" if said else ""))}
    node = json.loads((read_file(c, f"{run_dir}/node.json") or b"{}").decode() or "{}")
    report = {"node": node.get("node"), "shared": True, "at": time.time(),
              "job_id": job.record.get("job_id"), "python_setting": host.python,
              "cached": False}
    for name, parse in (("python", parse_python),
                        ("cloudpickle", lambda v: {"cloudpickle": v}),
                        ("packages", lambda v: {"packages": v}),
                        ("cpus", lambda v: {"cpus": v["count"]}),
                        ("nvidia_smi", parse_nvidia_smi)):
        if "ok" in raw.get(name, {}):
            try:
                report.update(parse(raw[name]["ok"]))
            except (KeyError, TypeError, ValueError, IndexError):
                pass
    data = json.dumps(report).encode()
    try:  # the cache, whole or not at all
        where = shell.home_relative(host.work_dir.rstrip("/") or "/")
        sftp = c.sftp()
        with sftp.open(f"{where}/{CACHE_NAME}.tmp", "wb") as f:
            f.write(data)
        sftp.posix_rename(f"{where}/{CACHE_NAME}.tmp", f"{where}/{CACHE_NAME}")
    except OSError:
        pass
    return report


# -- top: a live snapshot of load, memory, disk, GPUs and jobs ------------------------------
TOP_FACTS = ("load", "cpus", "meminfo", "work_dir", "nvidia_smi")


def parse_top(raw: dict, jobs: list[dict]) -> dict:
    """Probe output (``TOP_FACTS``) and the runner's job list → ``top --json``'s
    per-host entry (pure); ``jobs`` keeps the running ones."""
    out: dict[str, Any] = {"ok": True, "error": None}
    for fact in FACTS:
        if fact.name in TOP_FACTS and "ok" in raw.get(fact.name, {}):
            out.update(fact.parse(raw[fact.name]["ok"]))
    out["jobs"] = [{"run_id": j["run_id"], "project": j["project"], "command": j["command"]}
                   for j in jobs if j.get("status") == "running"]
    for key in ("work_dir_exists", "work_dir_writable", "cpus_usable", "gpu_error"):
        out.pop(key, None)
    return out


def top_snapshot(c) -> dict:
    """One round trip: load, CPUs, memory, disk (work dir), each GPU's utilization and
    memory (the probe), and the running fabfleet jobs (the runner's job status, the same
    function ``jobs`` uses), of the host behind ``c``."""
    host: Host = c.fleet_host
    jobs_spec = {"runs_root": layout(host, "")["all_runs"], "project": None}
    command = probe_command(host, facts=TOP_FACTS).then(python_command(
        host, runner, ["jobs", json.dumps(jobs_spec)]))
    raw, stdout = _raw_facts(c, command, "read the host's load")
    if raw.get("python_missing"):
        raise CommandError(host.name, f"Python interpreter {host.python!r} was not found "
                           "on the host")
    _, sep, rest = stdout.partition(runner.REPORT)
    jobs = json.loads(rest.splitlines()[0]) if sep else []
    return parse_top(raw, jobs)
