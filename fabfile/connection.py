"""Host data → :class:`fabric.Connection`, with the host-key checks Fabric leaves out.

Fabric 3 installs paramiko's ``AutoAddPolicy`` on every connection and never reads
``known_hosts``, so any key is accepted. :func:`connect` instead loads
``~/.ssh/known_hosts`` (or ssh_config's ``UserKnownHostsFile``) plus the inventory's
``known_hosts`` file and installs :class:`HostKeyPolicy`:

* ``strict``: an unknown key is refused (with the ``ssh-keyscan`` line that adds it);
* ``accept-new``: an unknown key is recorded on first sight, like OpenSSH's option;
* a *changed* key is refused under every policy (paramiko raises, we translate).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import fabric
import paramiko
from paramiko.config import SSHConfig

from .errors import (AuthError, ConnectError, FleetError, HostKeyError, host_errors,
                     key_fingerprint)
from .inventory import Host

SSH_CONFIG_ENV = "FABFLEET_SSH_CONFIG"
#: While a command, transfer or call waits on a host, a silent connection is probed this
#: often; a host that does not answer a probe within its ``connect_timeout`` is declared
#: frozen and its connection closed. The bound: KEEPALIVE_INTERVAL + connect_timeout.
KEEPALIVE_INTERVAL = 5.0
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
_known_hosts_lock = threading.Lock()


def _host_key_name(hostname: str, port: int) -> str:
    return hostname if port == 22 else f"[{hostname}]:{port}"


def _ssh_config() -> SSHConfig:
    """~/.ssh/config, or the file ``$FABFLEET_SSH_CONFIG`` names (tests use an empty one)."""
    path = os.path.expanduser(os.environ.get(SSH_CONFIG_ENV, "~/.ssh/config"))
    return SSHConfig.from_path(path) if os.path.exists(path) else SSHConfig()


_parsed: dict[str, tuple[int, int, paramiko.HostKeys]] = {}


def known_host_keys(path: str, host_name: str = "-") -> paramiko.HostKeys:
    """The parsed known_hosts file ``path``, read once per process and again only when
    it changes (size or mtime): a fan-out over many hosts parses it once, not per host.
    A broken line is a :class:`HostKeyError` naming the file and the line."""
    try:
        st = os.stat(path)
    except OSError:
        return paramiko.HostKeys()
    with _known_hosts_lock:
        cached = _parsed.get(path)
        if cached and cached[:2] == (st.st_mtime_ns, st.st_size):
            return cached[2]
    keys = paramiko.HostKeys()
    try:
        keys.load(path)
    except Exception as exc:  # noqa: BLE001 - paramiko raises several unrelated kinds
        raise HostKeyError(host_name, f"cannot read known_hosts file {path}"
                           f"{bad_known_hosts_line(path)}: {type(exc).__name__}: {exc}. "
                           "Fix or remove that line (`ssh-keygen -R HOST -f FILE` removes a "
                           "host's lines).") from exc
    with _known_hosts_lock:
        _parsed[path] = (st.st_mtime_ns, st.st_size, keys)
    return keys


class HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Host-key verification against our known_hosts files (paramiko is given none, so
    it asks us about every key): a listed key passes, a different key for a listed host
    is refused as changed, an unlisted one per the host's policy."""

    def __init__(self, host: Host, files: list[str], record_to: str) -> None:
        self.host = host
        self.files = files
        self.record_to = record_to

    def missing_host_key(self, client, hostname, key) -> None:  # noqa: D102 - paramiko API
        for f in self.files:
            known = known_host_keys(f, self.host.name).lookup(hostname)
            expected = known.get(key.get_name()) if known else None
            if expected is not None:
                if expected.asbytes() == key.asbytes():
                    return
                raise paramiko.BadHostKeyException(hostname, key, expected)
        fingerprint = f"{key.get_name()} SHA256:{key_fingerprint(key)}"
        if self.host.host_key_policy == "accept-new":
            record_host_key(self.record_to, hostname, key)
            return
        port_flag = ""
        bare = hostname
        if hostname.startswith("["):
            bare, port = hostname[1:].split("]:")
            port_flag = f"-p {port} "
        raise HostKeyError(
            self.host.name,
            f"refusing to connect to {hostname}: its host key ({fingerprint}) is not in "
            f"{' or '.join(self.files)}. Check the fingerprint with the host's owner, then "
            f"add it with `ssh-keyscan {port_flag}{bare} >> {self.record_to}`, or set "
            "`host_key_policy: accept-new` for this host to record it on first connect.",
        )


def record_host_key(path: str, hostname: str, key: paramiko.PKey) -> None:
    """Append ``hostname key`` to the known_hosts file ``path`` (thread-safe)."""
    with _known_hosts_lock:
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


def known_hosts_files(host: Host, ssh_config: dict | None = None) -> list[str]:
    """The known_hosts files consulted for ``host``, in order."""
    user_files = (ssh_config or {}).get("userknownhostsfile", DEFAULT_KNOWN_HOSTS)
    files = [os.path.expanduser(f) for f in user_files.split()]
    if host.known_hosts:
        files.append(host.known_hosts)
    return files


class FleetConnection(fabric.Connection):
    """A Fabric connection that verifies host keys, sets TCP_NODELAY, and names its host.

    ``.fleet_host`` is the inventory :class:`Host`. Opening translates paramiko and socket
    errors into :class:`~fabfile.errors.HostError` subclasses carrying the host name.
    """

    fleet_host: Host

    def open(self):  # noqa: D102 - fabric API
        if self.is_connected:
            return None
        name = self.fleet_host.name
        try:
            with host_errors(name, f"connect to {self.host}:{self.port} as {self.user}",
                             known_hosts=tuple(self.known_hosts_files),
                             host_key_name=_host_key_name(self.host, self.port)):
                result = super().open()
                sock = self.client.get_transport().sock
                if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET,
                                                                       socket.AF_INET6):
                    # Without it a short command waits on Nagle + delayed ACK: ~48 ms vs ~4 ms.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except FleetError:
            self.client.close()  # a refused handshake leaves paramiko's thread running
            raise
        return result


def bad_known_hosts_line(path: str) -> str:
    """``", line N"`` for the first line of a known_hosts file paramiko cannot parse."""
    try:
        with open(path, errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                try:
                    if paramiko.hostkeys.HostKeyEntry.from_line(line, n) is None:
                        return f", line {n}"
                except Exception:  # noqa: BLE001 - what we are looking for
                    return f", line {n}"
    except OSError:
        pass
    return ""


def probe(transport, timeout: float) -> bool:
    """Whether the host answers an SSH-level request within ``timeout`` seconds (the
    answer to an unknown global request is a failure message, which proves liveness).
    Paramiko's own keepalives expect no answer, so they cannot tell a frozen host."""
    answered = threading.Event()

    def ask() -> None:
        try:
            transport.global_request("keepalive@openssh.com", wait=True)
        except Exception:  # noqa: BLE001 - a dead transport answers nothing
            return
        answered.set()
    threading.Thread(target=ask, daemon=True, name="fabfleet-probe").start()
    return answered.wait(timeout)


@contextlib.contextmanager
def watched(c, action: str) -> Iterator[None]:
    """While the block runs (an SFTP transfer, say), probe the connection every
    :data:`KEEPALIVE_INTERVAL` seconds; if the host does not answer within its
    ``connect_timeout``, close the connection — so whatever the block is blocked on fails
    at once — and raise :class:`ConnectError` saying the host stopped answering."""
    host = c.fleet_host
    transport = c.client.get_transport()
    stop = threading.Event()
    fired: list[bool] = []

    def watch() -> None:
        while not stop.wait(KEEPALIVE_INTERVAL):
            if not transport.is_active():
                return
            if not probe(transport, host.connect_timeout) and not stop.is_set():
                fired.append(True)
                transport.close()
                return
    threading.Thread(target=watch, daemon=True, name=f"fabfleet-watch-{host.name}").start()
    try:
        yield
    except BaseException as exc:
        if fired:
            raise ConnectError(host.name, f"{frozen_message(host)} during {action}. Nothing "
                               "partial was put in place; check the host and try again.") \
                from exc
        raise
    finally:
        stop.set()


def frozen_message(host: Host) -> str:
    return (f"the host stopped answering (no reply to a keepalive within "
            f"{host.connect_timeout:g}s: frozen, overloaded or cut off)")


def connect(host: Host) -> FleetConnection:
    """A not-yet-opened connection to ``host``; it opens on first use.

    Uses the host's user, port, key file and connect timeout; a host without
    ``hostname`` is looked up in ~/.ssh/config like ``ssh NAME`` would, and its
    ssh_config values win over inventory ``defaults`` (not over its own entry).
    """
    ssh_config = _ssh_config()
    config = fabric.Config(
        ssh_config=ssh_config,
        overrides={"run": {"in_stream": False, "hide": True}, "load_ssh_configs": False},
    )
    looked_up = ssh_config.lookup(host.address)

    def pick(key: str, ssh_key: str):
        """Host's own value > ssh_config (for alias hosts) > inventory defaults."""
        value = getattr(host, key)
        if host.hostname is None and key in host.inherited and ssh_key in looked_up:
            return None  # let Fabric take it from ssh_config
        return value

    key_file = pick("key_file", "identityfile")
    if key_file and not os.path.exists(key_file):
        raise AuthError(host.name, f"key_file {key_file} does not exist on this machine. Fix "
                        "`key_file` in the inventory, or create a key with `ssh-keygen -t "
                        "ed25519` and install it on the host with `ssh-copy-id`.")
    timeout = host.connect_timeout
    connect_kwargs = {"banner_timeout": timeout, "auth_timeout": timeout,
                      "channel_timeout": timeout}
    if key_file:
        connect_kwargs["key_filename"] = [key_file]
    conn = FleetConnection(
        host.address,
        user=pick("user", "user"),
        port=pick("port", "port"),
        config=config,
        connect_timeout=max(1, math.ceil(timeout)),
        connect_kwargs=connect_kwargs,
    )
    conn.fleet_host = host

    files = known_hosts_files(host, conn.ssh_config)
    for f in files:
        known_host_keys(f, host.name)  # a broken file is an error now, naming file and line
    record_to = host.known_hosts or files[0]
    conn.client.set_missing_host_key_policy(HostKeyPolicy(host, files, record_to))
    conn.known_hosts_files = files
    return conn
