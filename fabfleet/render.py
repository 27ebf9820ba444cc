"""Rendering for people: tables, messages, progress bars. The only module that imports rich.

A leaf: it imports nothing else of fabfleet, and takes plain values (dicts, strings,
per-host result maps). Everything that came from a user, a host or an error is shown
as text (``rich.text.Text``), never parsed as markup: a run's argument
``data.paths=[/data/a]`` or pip's ``torch[cuda]`` prints exactly as it is. Styles are
applied by this module alone, to words it chose (``ok``, ``FAILED``, …). rich is
imported on first use, so ``--json`` output and the library never pay for it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

#: the styles of the status words this module shows
STYLES = {"ok": "green", "yes": "green", "running": "green", "FAILED": "red", "NO": "red",
          "failed": "red", "timed out": "red", "lost": "red", "unreachable": "red",
          "killed": "yellow", "exited": "", "!": "yellow", "✗": "red"}


# -- consoles and text -----------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def console(stderr: bool = False):
    """rich's console for stdout (or stderr). Pipes and CI logs get wide lines instead
    of rich's 80-column default."""
    from rich.console import Console
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, soft_wrap=True,
                   width=None if stream.isatty() else 160)


def text(value: Any, style: str = "") -> Any:
    """``value`` as rich Text: shown verbatim, never read as markup."""
    from rich.text import Text
    return value if isinstance(value, Text) else Text(str(value), style=style)


def word(value: str) -> Any:
    """A status word in its style (see :data:`STYLES`)."""
    return text(value, STYLES.get(value, ""))


def say(message: str, *, err: bool = False, mark: str | None = None) -> None:
    """Print one message as text; ``mark`` (``"✗"``, ``"!"``) is put before it, styled."""
    from rich.text import Text
    line = Text()
    if mark:
        line.append(mark + " ", style=STYLES.get(mark, ""))
    line.append(str(message))
    console(err).print(line)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]):
    """A table; every cell that is not already Text is shown as plain text."""
    from rich.table import Table
    t = Table(title=text(title))
    for col in columns:
        t.add_column(text(col))
    for row in rows:
        t.add_row(*(text(cell) for cell in row))
    return t


def show(renderable, *, err: bool = False) -> None:
    console(err).print(renderable)


# -- numbers for people ----------------------------------------------------------------
def size(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f}{unit}"
    return f"{seconds:.0f}s"


# -- per-host outcomes -----------------------------------------------------------------
def outcomes(results, title: str, columns: Sequence[str],
             row: Callable[[Any], Sequence[Any]]) -> None:
    """A table of per-host outcomes (``row(value) -> cells``), the errors below it, and
    the one-line summary. ``results`` is a :class:`~fabfleet.fleet.fanout.FanOutResult`."""
    rows = []
    for name, o in results.items():
        cells = row(o.value) if o.ok else ["-"] * len(columns)
        rows.append([name, word("ok" if o.ok else "FAILED"), *cells, f"{o.seconds:.1f}"])
    show(table(title, ["host", "status", *columns, "seconds"], rows))
    for name, e in results.failed.items():
        message = str(e)
        say(message if message.startswith(f"{name}:") else f"{name}: {e!r}", mark="✗")
    say(results.summary())


def hosts_table(inv) -> Any:
    rows = []
    for h in inv:
        address = f"{h.address}:{h.port}" if h.port else h.address
        env = f"venv {h.venv}" if h.venv else f"conda {h.conda_env}" if h.conda_env else "-"
        route = " → ".join(x.name for x in h.hops) or "direct"
        rows.append([h.name, address, route, h.user or "(ssh config)",
                     ",".join(h.groups) or "-", h.python, h.work_dir, env, str(h.max_jobs),
                     h.host_key_policy])
    return table(f"{inv.path}: {len(inv)} hosts",
                 ["host", "address", "route", "user", "groups", "python", "work dir", "env",
                  "jobs", "host keys"], rows)


def gpu_summary(gpus: Sequence[Mapping[str, Any]]) -> str:
    """``2× A100-SXM4-80GB`` — or, for mixed models, each model with its count."""
    counts: dict[str, int] = {}
    for g in gpus:
        name = str(g.get("name") or "?").removeprefix("NVIDIA ")
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n}× {name}" for name, n in counts.items()) or "-"


def check_report(report: Mapping[str, Any]) -> None:
    """check-env's table, then each host's error and warnings, then the count."""
    rows = []
    for name, r in report["hosts"].items():
        py = r.get("python") or "-"
        if r.get("python") and not r.get("python_matches_local"):
            py += " (≠ local)"
        rows.append([
            name, word("yes" if r["ok"] else "NO"), " → ".join(r.get("route") or []) or "direct",
            py,
            r.get("cloudpickle") or ("-" if not r.get("python") else "- (we ship it)"),
            str(r.get("cpus") or "-"), size(r.get("mem_available")), size(r.get("disk_free")),
            f"{r['load'][0]:g}" if r.get("load") else "-", gpu_summary(r.get("gpus") or [])])
    show(table("check-env", ["host", "ok", "route", "python", "cloudpickle", "cpus",
                             "memory free",
                             "disk free", "load", "gpus"], rows))
    for name, r in report["hosts"].items():
        if r.get("scheduler"):
            say(f"{name}: {login_node(r)}")
        if r.get("error"):
            say(r["error"], mark="✗")
        for w in r.get("warnings") or []:
            say(f"{name}: {w}", mark="!")
        for g in r.get("gpus") or []:
            if g.get("processes"):
                say(f"{name}: GPU {g['index']} ({g.get('uuid') or '?'}) is held by "
                    + holders(g).strip(" []")
                    + ("" if all(p["mine"] for p in g["processes"]) else
                       " (! = not yours)"), mark="!")
    n_ok = sum(r["ok"] for r in report["hosts"].values())
    say(f"{n_ok}/{len(report['hosts'])} hosts ready")


def login_node(r: Mapping[str, Any]) -> str:
    """One line about a login node: its scheduler, partitions, and the compute node the
    check job ran on."""
    sched = r["scheduler"]
    queues = ", ".join(f"{q['name']}{'*' if q.get('default') else ''} ({q.get('state')}"
                       + (f", {q['nodes']} nodes" if q.get("nodes") else "")
                       + (f", limit {q['time_limit']}" if q.get("time_limit") else "") + ")"
                       for q in sched.get("queues") or []) or "none listed"
    node = r.get("compute") or {}
    where = ("" if not node or node.get("error") else
             f"; compute node {node.get('node')}: Python {node.get('python')}, work dir "
             f"shared{' (checked earlier)' if node.get('cached') else ''}")
    return (f"{sched.get('version') or sched['name']}, "
            f"{'partitions' if sched['name'] == 'slurm' else 'queues'} {queues}{where}")


def holders(gpu: Mapping[str, Any]) -> str:
    """`` [eve:4242 2000M!]`` — who holds a GPU (user:pid memory), ``!`` marking
    processes that are not yours; ``""`` when no one does."""
    procs = gpu.get("processes") or []
    if not procs:
        return ""
    return " [" + " ".join(f"{p['user']}:{p['pid']} {p['memory_mib']}M"
                           + ("" if p["mine"] else "!") for p in procs) + "]"


def top_table(doc: Mapping[str, Any]):
    rows = []
    for name, r in doc["hosts"].items():
        if not r["ok"]:
            rows.append([name, word("unreachable"), "-", "-", "-", "-", "-"])
            continue
        used = (r["mem_total"] or 0) - (r["mem_available"] or 0)
        gpus = " ".join(f"{g['index']}:{g['utilization_pct']}% "
                        f"{(g['memory_used_mib'] or 0) / 1024:.0f}/"
                        f"{(g['memory_total_mib'] or 0) / 1024:.0f}G" + holders(g)
                        for g in r["gpus"]) or "-"
        rows.append([name, f"{r['load'][0]:g}" if r.get("load") else "-", str(r.get("cpus")),
                     f"{size(used)} / {size(r['mem_total'])}", size(r.get("disk_free")),
                     gpus, str(len(r["jobs"]))])
    return table("top", ["host", "load", "cpus", "memory used", "disk free",
                         "gpus (util, memory)", "jobs"], rows)


def jobs_table(title: str, per_host: Mapping[str, Sequence[Mapping[str, Any]]]):
    rows = []
    for h, runs in per_host.items():
        for r in runs:
            code = "-" if r["exit_code"] is None else str(r["exit_code"])
            rows.append([h, r["run_id"], r["project"], status_text(r), code, age(r["age"]),
                         r["command"]])
    return table(title, ["host", "run id", "project", "status", "exit", "age", "command"], rows)


def status_text(run: Mapping[str, Any]) -> Any:
    """A run's status as shown: a batch job's with the scheduler's word — ``pending
    (Resources)``, ``killed (TIMEOUT)``, ``running (job 123)``."""
    status = run["status"]
    if not run.get("scheduler"):
        return word(status)
    extra = (run.get("reason") if status == "pending" else
             run.get("sched_state") or run.get("killed_by") if status in ("killed", "lost")
             else f"job {run.get('job_id')}" if status == "running" else
             (run.get("error") or "")[:60] if status == "unknown" else None)
    out = word(status)
    if extra and extra not in ("None", "GONE"):
        out.append(f" ({extra})")
    return out


def runs_table(title: str, results) -> int:
    """The per-host table of a run over several hosts (to stderr); the number failed."""
    rows, failed = [], 0
    for name, o in results.items():
        if o.ok and o.value.exit_code == 0:
            rows.append([name, word("ok"), "0", f"{o.value.seconds:.1f}", o.value.run_dir])
        elif o.ok:
            failed += 1
            rows.append([name, word("timed out" if o.value.stopped == "timeout" else "failed"),
                         str(o.value.exit_code), f"{o.value.seconds:.1f}", o.value.run_dir])
        else:
            failed += 1
            rows.append([name, text(type(o.error).__name__, "red"), "-", f"{o.seconds:.1f}", "-"])
    show(table(title, ["host", "status", "exit code", "seconds", "run dir"], rows), err=True)
    for name, e in results.failed.items():
        say(str(e), err=True, mark="✗")
    return failed


# -- progress and live views -----------------------------------------------------------
class Bar:
    """A progress bar (one task, or one per name); :meth:`update`, then :meth:`stop`."""

    def __init__(self, progress, total: int, names: Sequence[str] = ("map",)) -> None:
        self.progress = progress
        self.tasks = {n: progress.add_task(n, total=total or 1) for n in names}

    def update(self, done: int, total: int | None = None, name: str | None = None) -> None:
        task = self.tasks[name] if name is not None else next(iter(self.tasks.values()))
        if total is None:
            self.progress.update(task, completed=done)
        else:
            self.progress.update(task, completed=done, total=total or 1)

    def stop(self) -> None:
        self.progress.stop()


def progress_bar(total: int, enabled: bool | None = None, *,
                 names: Sequence[str] = ("map",), transient: bool = True) -> Bar | None:
    """A progress bar on stderr, or ``None``. ``enabled=None`` decides: on a terminal or
    in a notebook, for 20 units or more."""
    if enabled is None:
        in_notebook = "ipykernel" in sys.modules
        enabled = total >= 20 and (in_notebook or sys.stderr.isatty())
    if not enabled:
        return None
    from rich.progress import Progress
    bar = Progress(console=console(True), transient=transient)
    bar.start()
    return Bar(bar, total, names)


def live(render: Callable[[], Any], every: float) -> None:
    """Redraw ``render()`` every ``every`` seconds until Ctrl-C."""
    import time

    from rich.live import Live
    try:
        with Live(render(), console=console(), refresh_per_second=1) as view:
            while True:
                time.sleep(every)
                view.update(render())
    except KeyboardInterrupt:
        return
