"""A GPU-aware queue: many tasks over the fleet's free GPUs, running without the laptop.

:func:`submit` pushes the project, spreads the tasks over the hosts in proportion to the
GPUs they have free (or their ``tasks_per_host`` for CPU tasks), leaves each host its
share with the sources its runs need (``<work_dir>/.queues/<name>/``, 0700, over SFTP),
and starts a drainer there as a detached job (:mod:`fabfleet.hostside.queue_app`); then
it returns. Each task becomes an ordinary run when its GPUs are free. :class:`Queue` is
the handle: ``status()``, ``wait()``, ``cancel()``, ``retry()``; it is re-created from
the name alone in any process (every selected host is asked).
"""

from __future__ import annotations

import json
import math
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

from ..config.inventory import Host
from ..config.settings import Project, layout, relative_inside, resolve_project
from ..errors import CommandError, LocalError
from ..host.facts import check_env
from ..host.files import local_files
from ..host.jobs import queue_state, start_job
from ..host.push import push
from ..host.runspec import command_vector, new_run_id
from ..hostside import boot, queue_app, runner
from ..ssh import shell
from ..ssh.connect import connect, sftp_client, sftp_makedirs, sftp_put_private
from ..ssh.launch import file_of, shipped_with, source
from ..ssh.liveness import watched
from .fanout import per_host


def parse_tasks(text: str) -> list[list[str]]:
    """A task file → one argument vector per task (pure): one task per non-empty line,
    split as a shell would; ``#`` lines are comments. Raises LocalError naming the line."""
    tasks = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise LocalError(f"task file line {number}: {exc}: {line!r}") from None
        tasks.append(words)
    if not tasks:
        raise LocalError("the task file holds no task")
    return tasks


def spread(counts: dict[str, int], n: int) -> dict[str, list[int]]:
    """Task indices 0…n-1 over hosts in proportion to ``counts`` (largest remainder,
    in order; pure). All zero: evenly."""
    names = list(counts)
    weights = [max(0, counts[h]) for h in names]
    if not any(weights):
        weights = [1] * len(names)
    total = sum(weights)
    shares = [n * w / total for w in weights]
    whole = [math.floor(s) for s in shares]
    for i in sorted(range(len(names)), key=lambda i: shares[i] - whole[i],
                    reverse=True)[:n - sum(whole)]:
        whole[i] += 1
    out, start = {}, 0
    for name, k in zip(names, whole):
        out[name] = list(range(start, start + k))
        start += k
    return out


def _queues_root(host: Host) -> str:
    return f"{layout(host, '')['work_dir']}/.queues"


class Queue:
    """A submitted queue, by name, over ``hosts`` (any process can make one)."""

    def __init__(self, hosts: Sequence[Host], name: str) -> None:
        if not runner.valid_run_id(name):
            raise LocalError(f"queue name {name!r}: letters, digits and - only")
        self.hosts, self.name = list(hosts), name

    def _ask(self, **what) -> dict:
        return per_host(self.hosts, lambda c: queue_state(
            c, _queues_root(c.fleet_host), self.name, **what))

    def status(self) -> dict:
        """``{"name", "tasks": [{"index", "command", "host", "gpus", "state",
        "exit_code", "run_id", "seconds"}, …], "hosts": {name: error or None}}``: every
        host holding part of the queue, in one round trip each."""
        results = self._ask()
        return self._merge(results)

    def _merge(self, results) -> dict:
        tasks, hosts, leftovers = [], {}, []
        for name, o in results.items():
            if not o.ok:
                hosts[name] = str(o.error)
                continue
            if o.value is None:
                continue
            hosts[name] = None
            for t in o.value["tasks"]:
                tasks.append(dict(t, host=name, drainer=o.value["drainer"]))
            leftovers += [dict(x, host=name) for x in o.value.get("leftovers") or []]
        if not tasks and not any(hosts.values()):
            raise LocalError(f"no queue {self.name!r} on these hosts")
        tasks.sort(key=lambda t: t["index"])
        return {"name": self.name, "tasks": tasks, "hosts": hosts, "leftovers": leftovers}

    def rebalance(self) -> int:
        """Move tasks that have not started from hosts where they wait to hosts of the
        queue with free GPUs (their drainers say how many, every second); the number
        moved. A task is claimed on its host before it moves (the same exclusive claim
        its drainer makes before starting it), so it runs exactly once."""
        results = self._ask()
        reports = {n: o.value for n, o in results.items() if o.ok and o.value}
        per = max([r["gpus_per_task"] for r in reports.values()] or [0])
        if not per:
            return 0
        waiting = {n: sum(t["state"] == "queued" for t in r["tasks"]) for n, r in reports.items()}
        room = {n: (r["free_gpus"] or 0) // per for n, r in reports.items()
                if waiting[n] == 0 and r["free_gpus"] is not None}
        moved = 0
        for receiver, capacity in sorted(room.items(), key=lambda kv: -kv[1]):
            while capacity > 0:
                donor = max(waiting, key=lambda n: waiting[n])
                if waiting[donor] <= 0 or donor == receiver:
                    break
                count = min(capacity, waiting[donor])
                src = next(h for h in self.hosts if h.name == donor)
                dst = next(h for h in self.hosts if h.name == receiver)
                with connect(src) as c:
                    taken = queue_state(c, _queues_root(src), self.name, take=count,
                                        to=receiver)["taken"]
                if not taken:
                    waiting[donor] = 0
                    continue
                with connect(dst) as c:
                    report = queue_state(c, _queues_root(dst), self.name, add=taken)
                    if not report["drainer"]:
                        _start_drainer(c, f"{_queues_root(dst)}/{self.name}",
                                       report.get("project") or "", self.name)
                waiting[donor] -= len(taken)
                capacity -= len(taken)
                moved += len(taken)
        return moved

    def wait(self, timeout: float | None = None, poll: float = 2.0) -> dict:
        """Until no task is queued or running; the final status. CommandError past
        ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.status()
            if not any(t["state"] in ("queued", "running") for t in state["tasks"]):
                return state
            if deadline is not None and time.monotonic() > deadline:
                raise CommandError(self.hosts[0].name, f"queue {self.name} still has tasks "
                                   f"after {timeout:g}s")
            time.sleep(poll)

    def cancel(self) -> dict:
        """No task starts any more; running ones are stopped (their process groups)."""
        return self._merge(self._ask(cancel=True))

    def retry(self) -> dict:
        """Failed and lost tasks go back to the queue (a new drainer where none runs)."""
        results = self._ask(retry=True)
        state = self._merge(results)
        for name, o in results.items():
            if o.ok and o.value and not o.value["drainer"] and any(
                    t["run_id"] is None and t["state"] in ("queued", "lost")
                    for t in o.value["tasks"]):
                host = next(h for h in self.hosts if h.name == name)
                with connect(host) as c:
                    _start_drainer(c, f"{_queues_root(host)}/{self.name}",
                                   o.value.get("project") or "", self.name)
        return state


def _start_drainer(c, qdir: str, project: str, name: str) -> None:
    job = start_job(c, file_of(queue_app), [qdir], project=project or None,
                    tag=f"queue:{name}")
    sftp_put_private(sftp_client(c), json.dumps({"run_id": job.run_id}).encode(),
                     f"{shell.home_relative(qdir)}/drainer.json")


def submit(hosts: Sequence[Host], tasks: Sequence[str | Sequence[str]], *,
           gpus_per_task: int = 1, name: str | None = None, project: Project | None = None,
           cwd: str | None = None, push_project: bool = True,
           max_memory_mib: int = 1024) -> Queue:
    """Hand ``tasks`` (argument vectors, or command lines split as a shell would) to the
    hosts and return a :class:`Queue` once each host's drainer runs (see the module
    docstring). ``max_memory_mib``: a GPU using more memory than this counts as busy
    even when no process shows (one hidden in a container)."""
    hosts = list(hosts)
    if not hosts:
        raise LocalError("no hosts selected")
    if gpus_per_task < 0:
        raise LocalError("gpus_per_task must be 0 or more")
    vectors = [command_vector(t, False) if not isinstance(t, str) else shlex.split(t)
               for t in tasks]
    if not vectors:
        raise LocalError("no tasks")
    name = name or new_run_id().replace("_", "-")
    if not runner.valid_run_id(name):
        raise LocalError(f"queue name {name!r}: letters, digits and - only")
    cwd_path = Path(cwd or ".").resolve()
    project = project or resolve_project(cwd_path)
    files = local_files(project.root, never=[h.key_file for h in hosts]) \
        if push_project and project.pushable else None
    identity = project.identity() if files is not None else None
    run_cwd = relative_inside(cwd_path, project.root) or ""

    def prepare(c) -> int:
        host = c.fleet_host
        if queue_state(c, _queues_root(host), name) is not None:
            raise LocalError(f"{host.name} already holds a queue named {name!r}: give this "
                             "one another name")
        if files is not None:
            push(c, project.root, layout(host, project.name)["project"], files=files,
                 identity=identity)
        facts = check_env(c, project=project.name) if gpus_per_task else {}
        usable = [g for g in facts.get("gpus") or []
                  if host.gpus == "all" or str(g["index"]) in map(str, host.gpus)]
        free = [g for g in usable if (g.get("memory_used_mib") or 0) <= max_memory_mib]
        return len(free) // max(1, gpus_per_task) * host.tasks_per_gpu \
            if gpus_per_task else (host.tasks_per_host or host.max_jobs)
    ready = per_host(hosts, prepare)
    if ready.failed:
        raise next(iter(ready.failed.values()))
    # Every GPU busy now: spread evenly; the tasks start as GPUs free up.
    share = spread(dict(ready.succeeded), len(vectors))

    def hand(c):  # every host gets the queue (its share may be empty: it can take more)
        host = c.fleet_host
        indices = share[host.name]
        lay = layout(host, project.name)
        qdir = f"{_queues_root(host)}/{name}"
        cfg = {"name": name, "gpus_per_task": gpus_per_task,
               "host": {"gpus": host.gpus, "tasks_per_gpu": host.tasks_per_gpu,
                        "tasks_per_host": host.tasks_per_host or host.max_jobs,
                        "max_memory_mib": max_memory_mib},
               "spec": {"runs": lay["runs"], "project": project.name, "work_dir": lay["work_dir"],
                        "cwd": f"{lay['project']}/{run_cwd}".rstrip("/"), "args": [],
                        "env": {"FABFLEET_HOST": host.name}},
               "tasks": [{"index": i, "command": vectors[i],
                          "display": shlex.join(vectors[i])} for i in indices]}
        with watched(c, f"hand queue {name} to the host"):
            sftp = sftp_client(c)
            where = shell.home_relative(qdir)
            sftp_makedirs(sftp, f"{where}/state")
            files = {"tasks.json": json.dumps(cfg), "runner.py": source(runner),
                     "boot.py": source(boot),
                     **{f"{n}.py": text for n, text in shipped_with(queue_app).items()}}
            for filename, text in files.items():
                sftp_put_private(sftp, text.encode(), f"{where}/{filename}")
        _start_drainer(c, qdir, project.name, name)
        return len(indices)
    handed = per_host(hosts, hand)
    if handed.failed:
        raise next(iter(handed.failed.values()))
    return Queue(hosts, name)

