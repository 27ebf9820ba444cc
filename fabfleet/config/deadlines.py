"""Every wait fabfleet makes, derived from the host's settings in one place.

Nothing waits forever: each wait below has a bound, and the README's table ("Waits and
bounds") is this module's. Only ``connect_timeout`` (per host, in the inventory) and the
caller's own ``timeout=`` / ``--timeout`` change them.

The liveness watchdog (:mod:`fabfleet.ssh.liveness`) is what bounds the waits that have
no fixed length (a long run, a big transfer, a payload call): while waiting on a host,
a connection silent for :data:`KEEPALIVE_INTERVAL` seconds is probed, and a host that
does not answer within ``connect_timeout`` is declared frozen and its connection closed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: A silent connection is probed this often while something waits on it.
KEEPALIVE_INTERVAL = 5.0
#: Seconds a payload function has to stop after an interrupt (Ctrl-C, ``timeout=``)
#: before the worker kills it.
INTERRUPT_GRACE = 3.0
#: Seconds between SIGTERM and SIGKILL when a run or job is stopped.
STOP_GRACE = 2.0
#: ``queue-cancel``: a queue's drainer has this long to notice and end (a task start in
#: progress) before it is stopped; no task starts after that.
DRAINER_STOP = 10.0
#: check-env on a login node: the compute-node check job may wait and run this long
#: (then it is cancelled); its result is reused for COMPUTE_CHECK_AGE seconds.
COMPUTE_CHECK = 120.0
COMPUTE_CHECK_AGE = 86400.0
#: A short remote command (mkdir, cat of a small file, a runner sub-command).
QUICK_COMMAND = 60.0
#: Listing, cleaning or checksumming a tree on the host.
TREE_COMMAND = 600.0
#: ``setup-workdir --requirements``: venv creation plus pip install.
INSTALL = 1800.0
#: Attached runs: the runner on the host enforces ``--timeout``; ours closes the channel
#: this long after it, in case the runner itself is stuck.
RUN_BACKSTOP = 60.0
#: An attached run's client (and a ``logs --follow``) sends the host a heartbeat this often.
HEARTBEAT = 2.0
#: The host stops an attached run (and ends a follower) whose client has sent nothing for
#: this long (a lost network); when the client's connection closes (it was killed), at once.
CLIENT_LOST = 30.0
#: ``logs --follow`` retries a dropped connection for this long per outage.
RECONNECT_FOR = 600.0
#: Waiting for an app (Jupyter, a Dask scheduler) to write its address file.
APP_START = 90.0


@dataclass(frozen=True)
class Deadlines:
    """The waits for one host, in seconds."""

    #: TCP connect (whole seconds: what paramiko's socket takes).
    connect: int
    #: SSH banner, authentication, opening a channel.
    handshake: float
    #: No answer to a keepalive probe within this long: the host is frozen.
    probe: float
    #: The longest a frozen host can stall any wait: a probe interval plus the probe.
    frozen_after: float
    #: One SFTP operation (a read or write of one packet's answer).
    sftp_op: float
    #: rsync's ``--timeout`` (no data moving for this long ends it).
    rsync_io: int
    #: A whole one-round-trip check of a host (connect + probe command): check-env, top.
    check: float
    #: A payload worker starting (interpreter start, cloudpickle shipped when needed).
    worker_start: float

    def ssh_options(self) -> list[str]:
        """The same bounds for an OpenSSH subprocess (rsync's ``-e ssh``)."""
        return ["-o", f"ConnectTimeout={self.connect}",
                "-o", f"ServerAliveInterval={int(KEEPALIVE_INTERVAL)}",
                "-o", f"ServerAliveCountMax={max(1, math.ceil(self.probe / KEEPALIVE_INTERVAL))}"]


def deadlines(host: Any) -> Deadlines:
    """The deadlines of ``host`` (an inventory :class:`~fabfleet.config.inventory.Host`)."""
    t = float(host.connect_timeout)
    return Deadlines(
        connect=max(1, math.ceil(t)),
        handshake=t,
        probe=t,
        frozen_after=KEEPALIVE_INTERVAL + t,
        sftp_op=KEEPALIVE_INTERVAL + 2 * t,
        rsync_io=int(KEEPALIVE_INTERVAL + 2 * t) + 30,
        check=3 * t + QUICK_COMMAND,
        worker_start=max(30.0, 3 * t),
    )


#: How long after it started payload workers wait for a connection's ssh master (it
#: shakes hands beside our own connection, so it is up about when that is); workers
#: of a master not up by then use Paramiko channels.
MUX_WAIT = 1.0


def table() -> list[tuple[str, str]]:
    """``(wait, bound)`` rows for the README: every wait and how it is bounded."""
    return [
        ("TCP connect", "`connect_timeout` (rounded up to whole seconds)"),
        ("SSH banner, authentication, opening a channel", "`connect_timeout`"),
        ("a silent connection while waiting", f"probed every {KEEPALIVE_INTERVAL:g} s; no "
         "answer within `connect_timeout` = frozen, connection closed"),
        ("one SFTP operation", f"{KEEPALIVE_INTERVAL:g} s + 2 × `connect_timeout`"),
        ("rsync with no data moving", f"{KEEPALIVE_INTERVAL:g} s + 2 × `connect_timeout` + 30 s"),
        ("check-env / top, per host", f"3 × `connect_timeout` + {QUICK_COMMAND:g} s"),
        ("a payload worker starting", "3 × `connect_timeout` (at least 30 s)"),
        ("the ssh master for payload workers coming up", "3 × `connect_timeout`, then "
         f"unused; workers wait for it {MUX_WAIT:g} s from its start, later ones not at all"),
        ("a short remote command (mkdir, runner sub-commands)", f"{QUICK_COMMAND:g} s"),
        ("listing, cleaning, checksumming a tree", f"{TREE_COMMAND:g} s"),
        ("setup-workdir --requirements", f"{INSTALL:g} s"),
        ("a run with --timeout", f"the runner stops it on the host at the timeout; the "
         f"channel is closed {RUN_BACKSTOP:g} s later"),
        ("a payload call with timeout=", f"interrupted at the timeout, killed "
         f"{INTERRUPT_GRACE:g} s later"),
        ("stopping a run or job (Ctrl-C, kill)", f"SIGTERM, SIGKILL {STOP_GRACE:g} s later "
         "(kill: --grace)"),
        ("an attached run whose client is gone", f"stopped on the host (SIGTERM, SIGKILL "
         f"{STOP_GRACE:g} s later) as soon as the client's connection closes, or after "
         f"{CLIENT_LOST:g} s without its heartbeat (sent every {HEARTBEAT:g} s)"),
        ("`logs --follow` after a dropped connection", f"reconnects for {RECONNECT_FOR:g} s "
         "per outage; the host-side follower ends with its client"),
        ("queue-cancel, a host's drainer ending", f"{DRAINER_STOP:g} s, then stopped"),
        ("check-env's compute-node job on a login node", f"{COMPUTE_CHECK:g} s queued and "
         f"running, then cancelled; its result is reused for {COMPUTE_CHECK_AGE / 3600:g} h"),
        ("Jupyter / a Dask scheduler starting", f"{APP_START:g} s"),
    ]
