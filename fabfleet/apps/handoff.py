"""The steps every framework hand-off (Dask, ipyparallel) shares: the versions preflight,
pushing the project, a private dir of the cluster's secrets on each host, waiting for a
service's own file, and stopping a cluster's jobs.

* **preflight**: one round trip per host (:mod:`fabfleet.hostside.versions`) before
  anything starts; the host's Python major.minor and the packages that must match
  exactly (``required``) or be there at all (``also``), against this machine's;
* **private dir**: ``<runs>/.<kind>-<token>`` on the host, 0700, files 0600 sent over
  SFTP (never on a command line), removed when the cluster stops.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..config.deadlines import QUICK_COMMAND
from ..config.inventory import Host
from ..config.settings import layout, project_identity
from ..errors import (CommandError, ConnectError, FanOutError, HostError, LocalError,
                      host_errors)
from ..host.files import local_files
from ..host.jobs import Job, list_jobs
from ..host.push import push
from ..hostside import versions
from ..ssh import shell
from ..ssh.connect import sftp_client, sftp_put_private
from ..ssh.exec import execute
from ..ssh.launch import python_command
from ..ssh.liveness import watched


def service_host(hosts: Sequence[Host], chosen: str | None, option: str,
                 framework: str) -> tuple[list[Host], str]:
    """The selected hosts and the one the cluster's scheduler/controller goes on:
    ``chosen`` (the ``option`` the user gave) or the first; a LocalError when there is no
    host or ``chosen`` is not among them."""
    hosts = list(hosts)
    if not hosts:
        raise LocalError(f"{_a(framework)} cluster needs at least one host")
    names = [h.name for h in hosts]
    name = chosen or names[0]
    if name not in names:
        raise LocalError(f"{option} {name!r} is not among the selected hosts "
                         f"({', '.join(names)})")
    return hosts, name


def local_versions(names: Iterable[str]) -> dict[str, str | None]:
    """This machine's Python and the installed versions of ``names`` (``None``: absent)."""
    from importlib import metadata
    out: dict[str, str | None] = {"python": "%d.%d.%d" % sys.version_info[:3]}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def compare_versions(local: Mapping, remote: Mapping, required: Sequence[str],
                     also: Sequence[str] = ()) -> list[str]:
    """What keeps a host with ``remote`` versions from joining a cluster with this
    machine (pure): another Python major.minor, a ``required`` package absent or at
    another version, an ``also`` package absent."""
    problems = []
    if remote.get("python", "").split(".")[:2] != local["python"].split(".")[:2]:
        problems.append(f"Python {remote.get('python')} there, {local['python']} here")
    for name in (*required, *also):
        have, want = remote.get(name), local.get(name)
        if have is None:
            problems.append(f"{name} is not installed there (here: {want})")
        elif name in required and have != want:
            problems.append(f"{name} {have} there, {want} here")
    return problems


def preflight(conns: Mapping[str, object], project: str, *, required: Sequence[str],
              also: Sequence[str] = (), framework: str) -> dict[str, dict]:
    """The versions on every host against the local ones (one round trip each); raises
    :class:`FanOutError` naming each host, package and the fix, before anything starts."""
    names = (*required, *also)
    local = local_versions(names)
    found, problems = {}, {}
    for name, c in conns.items():
        host: Host = c.fleet_host
        result = execute(c, python_command(host, versions, names, project=project),
                         timeout=QUICK_COMMAND, action=f"check the {framework} versions")
        try:
            found[name] = json.loads(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            problems[name] = CommandError(name, "could not read the package versions: "
                                          f"{result.stderr.strip()[-300:]}")
            continue
        bad = compare_versions(local, found[name], required, also)
        if bad:
            pins = " ".join(f"{p}=={local[p]}" for p in required if local.get(p))
            problems[name] = CommandError(
                name, f"cannot join {_a(framework)} cluster with this machine: {'; '.join(bad)}. "
                f"Put `{pins}` in a requirements.txt and run `fabfleet setup-workdir -H {name} "
                "--requirements requirements.txt` (or install them in the host's env).")
    if problems:
        summary = "; ".join(str(e) for e in problems.values())
        raise FanOutError(f"{len(problems)}/{len(conns)} hosts cannot run {framework}: "
                          f"{summary}", problems)
    return found


def _a(word: str) -> str:
    """``word`` with its article: "a Dask", "an ipyparallel"."""
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def push_project(conns: Mapping[str, object], root: Path, project: str) -> None:
    """Push the project to every host (incremental), so its modules import there."""
    files = local_files(root, never=[c.fleet_host.key_file for c in conns.values()])
    identity = project_identity(root)
    for c in conns.values():
        push(c, root, layout(c.fleet_host, project)["project"], files=files,
             identity=identity)


def private_dir(c, project: str, name: str, files: Mapping[str, bytes], *,
                what: str) -> str:
    """A 0700 dir ``name`` in the project's runs on the host holding ``files`` (0600,
    over SFTP); its remote path."""
    where = f"{layout(c.fleet_host, project)['runs']}/{name}"
    mk = shell.path(where)
    done = execute(c, shell.sh(f"umask 077 && mkdir -p -- {mk} && chmod 700 -- {mk}"),
                   timeout=QUICK_COMMAND, action=f"prepare the {what}' dir")
    if done.exit_code != 0:
        raise CommandError(c.fleet_host.name, f"could not make a private dir for the {what}: "
                           f"{done.stderr.strip()[-300:]}")
    if files:
        with watched(c, f"send the {what}"), host_errors(c.fleet_host.name, f"send the {what}"):
            sftp = sftp_client(c)
            for fname, data in files.items():
                sftp_put_private(sftp, data, f"{where}/{fname}")
    return where


def remove_private_dir(c, where: str, what: str) -> None:
    """Remove a :func:`private_dir` (a host that is gone keeps it: private anyway)."""
    with contextlib.suppress(HostError):
        execute(c, shell.sh(f"rm -rf -- {shell.path(where)}"), timeout=QUICK_COMMAND,
                action=f"remove the {what}")


def wait_for_file(c, job: Job, path: str, timeout: float, what: str) -> bytes:
    """The content of ``path`` on the host once the service ``job`` has written it (not
    empty); raises :class:`CommandError` with the job's stderr when the job ends first,
    and stops the job when ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        out = execute(c, shell.sh(f"cat -- {shell.path(path)} 2>/dev/null"),
                      timeout=QUICK_COMMAND, action=f"read the {what}'s file")
        if out.exit_code == 0 and out.stdout.strip():
            return out.stdout.encode()
        state = job.status()
        if state["status"] != "running":
            err = job.logs(stream="stderr")["data"].decode("utf-8", "replace")
            raise CommandError(job.host.name, f"the {what} exited ({state['status']}, "
                               f"code {state['exit_code']}):\n{err.strip()[-1500:]}")
        if time.monotonic() > deadline:
            job.kill()
            raise CommandError(job.host.name, f"the {what} did not start within "
                               f"{timeout:g}s; it was stopped")
        time.sleep(0.3)


def wait_for_json(c, job: Job, path: str, timeout: float, what: str) -> dict:
    """:func:`wait_for_file`, parsed (a half-written file is read again)."""
    deadline = time.monotonic() + timeout
    while True:
        data = wait_for_file(c, job, path, max(0.0, deadline - time.monotonic()), what)
        with contextlib.suppress(ValueError):
            return json.loads(data)
        time.sleep(0.2)


def stop_jobs(jobs: Sequence[Job], framework: str) -> None:
    """Stop ``jobs`` in reverse order of starting (workers before their scheduler); a
    host that is down took its processes with it. Raises one :class:`FanOutError` for
    the jobs that could not be stopped."""
    errors = []
    for job in reversed(jobs):
        try:
            job.kill(grace=5)
        except ConnectError:
            pass
        except HostError as exc:
            errors.append(exc)
    if errors:
        raise FanOutError(f"{len(errors)} {framework} jobs could not be stopped: "
                          + "; ".join(map(str, errors)), {e.host: e for e in errors})


def stop_project_jobs(c, project: str | None, tags: Sequence[str]) -> list[str]:
    """Kill the running jobs of ``project`` tagged one of ``tags`` on the host behind
    ``c`` (``dask-down``, ``ipp-down``); their run ids. Engines/workers go before their
    controller/scheduler: ``tags`` is in stopping order."""
    entries = [e for e in list_jobs(c, project)
               if e.get("tag") in tags and e["status"] == "running"]
    stopped = []
    for entry in sorted(entries, key=lambda e: tags.index(e["tag"])):
        Job(c.fleet_host, entry["run_id"], entry).kill(grace=5)
        stopped.append(entry["run_id"])
    return stopped
