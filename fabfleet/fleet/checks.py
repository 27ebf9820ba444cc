"""check-env and top over many hosts: one probe round trip per host, at once, each host
under its own deadline, every host in the answer (an unreachable one with its error)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..config.deadlines import deadlines
from ..config.inventory import Host
from ..errors import FleetError
from ..host.facts import check_env, top_snapshot
from .fanout import per_host


def check_hosts(hosts: Iterable[Host], *, require: Sequence[str] = (),
                project: str | None = None, max_workers: int = 32) -> dict:
    """:func:`~fabfleet.host.facts.check_env` on every host at once → the
    ``check-env --json`` document: ``{"ok": bool, "hosts": {name: {"ok", "error",
    "python", …}}}``; a host that cannot be reached, refuses our key or shows an unknown
    key gets ``ok: false`` and its error."""
    hosts = list(hosts)
    hops = {h.name: [x.name for x in h.hops] for h in hosts}
    results = per_host(hosts, lambda c: {**check_env(c, require=require, project=project),
                                         "route": list(c.route)},
                       max_workers=max_workers, timeout=lambda h: deadlines(h).check)
    report = {}
    for name, outcome in results.items():
        if outcome.ok:
            report[name] = outcome.value
        else:
            err = outcome.error
            report[name] = {"ok": False, "python": None, "warnings": [],
                            "error": str(err) if isinstance(err, FleetError) else
                            f"{name}: unexpected {type(err).__name__}: {err}",
                            "error_type": type(err).__name__,
                            "route": hops[name]}
    return {"ok": all(r["ok"] for r in report.values()), "hosts": report}


def top_hosts(hosts: Iterable[Host], *, max_workers: int = 32) -> dict:
    """:func:`~fabfleet.host.facts.top_snapshot` on every host at once:
    ``{"ok", "hosts": {name: {…}}}``."""
    results = per_host(hosts, top_snapshot, max_workers=max_workers,
                       timeout=lambda h: deadlines(h).check)
    doc = {name: (o.value if o.ok else {"ok": False, "error": str(o.error)})
           for name, o in results.items()}
    return {"ok": all(v["ok"] for v in doc.values()), "hosts": doc}
