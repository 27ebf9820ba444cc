"""Connections kept open between commands, as OpenSSH's ControlPersist keeps a master.

Only the connection keeper (:mod:`fabfleet.cli.keeper_server`, one per user) turns this
on. There, a :class:`~fabfleet.ssh.connect.FleetConnection` that opens takes an idle
kept SSH connection made with exactly the same settings — address, port, user, route,
key, and the same known_hosts, key and ssh_config files unchanged since (by size, time
and inode) — instead of shaking hands again, and closing it hands it back. So the host
key a kept connection was verified with is the one the files still record; a changed
file means a new connection, checked anew.

Kept connections are probed every :data:`~fabfleet.config.deadlines.KEEPALIVE_INTERVAL`
seconds while idle; one that does not answer within the host's probe deadline (frozen,
rebooted, cut off) is closed and dropped, so the next command connects afresh.
"""

from __future__ import annotations

import os
import threading
import time

from ..config.deadlines import KEEPALIVE_INTERVAL, deadlines
from .exec import refill_standby
from .liveness import probe

#: at most this many idle connections per key are kept (a fan-out that opened two to
#: one host keeps both; more are closed)
PER_KEY = 2

_lock = threading.Lock()
_active = False
_idle: dict[tuple, list] = {}  # key -> [(client, host), …] not in use
_lent: dict[int, tuple] = {}  # id(client) -> (key, client, host) in use by this command


def active() -> bool:
    return _active


def activate() -> None:
    """Keep connections from now on (the keeper process only), probing idle ones."""
    global _active
    _active = True
    threading.Thread(target=_probe_idle, daemon=True, name="fabfleet-keep-probe").start()


def stamp(paths) -> tuple:
    """What the files at ``paths`` are now (absent ones too): a kept connection is used
    again only while every file it was checked with is unchanged."""
    out = []
    for p in paths:
        p = os.path.expanduser(p)
        try:
            st = os.stat(p)
            out.append((p, st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            out.append((p, None))
    return tuple(out)


def take(key: tuple):
    """An idle kept paramiko client for ``key`` (now lent to the caller), or ``None``."""
    with _lock:
        idle = _idle.get(key) or []
        while idle:
            client, host = idle.pop()
            transport = client.get_transport()
            if transport is not None and transport.is_active():
                _lent[id(client)] = (key, client, host)
                return client
            client.close()
    return None


def lend(key: tuple, client, host) -> None:
    """Record a freshly opened client as this command's, to be kept at its end."""
    with _lock:
        _lent[id(client)] = (key, client, host)
    refill_standby(client.get_transport())


def detach(conn) -> bool:
    """``conn.close()`` in the keeper: close its SFTP session and leave the SSH
    connection for the next user (True), unless it is not ours to keep (False)."""
    if not _active:
        return False
    client = conn.client
    with _lock:
        entry = _lent.pop(id(client), None)
    if entry is None:
        return False
    if conn._sftp is not None:
        try:
            conn._sftp.close()
        except Exception:  # noqa: BLE001 - a dead session is dropped below anyway
            pass
        conn._sftp = None
    _give(entry)
    conn.transport = None  # this Connection object is done with it; is_connected: False
    return True


def _give(entry) -> None:
    key, client, host = entry
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        client.close()
        return
    with _lock:
        idle = _idle.setdefault(key, [])
        if len(idle) < PER_KEY:
            idle.append((client, host))
            return
    client.close()


def end_command() -> None:
    """The command is over: every connection it still holds is kept (or closed, if it
    is dead)."""
    with _lock:
        entries = list(_lent.values())
        _lent.clear()
    for entry in entries:
        _give(entry)


def kept() -> list[str]:
    """The hosts (names) with a kept idle connection."""
    with _lock:
        return sorted({host.name for idle in _idle.values() for _, host in idle})


def close_all() -> None:
    """Close every kept connection (the keeper is stopping)."""
    global _active
    with _lock:
        _active = False
        clients = [c for idle in _idle.values() for c, _ in idle]
        clients += [e[1] for e in _lent.values()]
        _idle.clear()
        _lent.clear()
    for client in clients:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass


def _probe_idle() -> None:
    """Drop idle connections whose host stopped answering."""
    while _active:
        time.sleep(KEEPALIVE_INTERVAL)
        with _lock:
            idle = [(key, c, h) for key, lst in _idle.items() for c, h in lst]
        for key, client, host in idle:
            transport = client.get_transport()
            alive = transport is not None and transport.is_active() and \
                probe(transport, deadlines(host).probe)
            if not alive:
                with _lock:
                    lst = _idle.get(key) or []
                    mine = (client, host) in lst  # not taken by a command meanwhile
                    if mine:
                        lst.remove((client, host))
                if mine:
                    client.close()
