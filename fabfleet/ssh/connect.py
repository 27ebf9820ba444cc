"""Host data → :class:`fabric.Connection`: the one place a connection is made.

:func:`connect` turns an inventory :class:`~fabfleet.config.inventory.Host` into a
:class:`FleetConnection` that verifies host keys (:mod:`fabfleet.ssh.hostkeys`), uses
the host's deadlines (:mod:`fabfleet.config.deadlines`), and names its host in every
error. :func:`ssh_command_for` gives an OpenSSH subprocess (rsync's ``-e``) the same
route, settings and checks; :func:`sftp_client` an SFTP session with a deadline.

**Routes.** A host with ``jump:`` in the inventory (or ``ProxyJump`` in ssh_config) is
reached through its bastions, each one a verified :class:`FleetConnection` of its own
(same host-key policy, deadlines and watchdog as a target). One connection per bastion
is shared by every target behind it in this process, so a fan-out logs in to the
bastion once, and at most :data:`HANDSHAKES_PER_GATEWAY` targets shake hands through it
at a time. The target's ``hostname`` is resolved by the last hop, as ``ssh -J`` does.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import posixpath
import stat
import shlex
import socket
import subprocess
import threading

import fabric
import paramiko
from paramiko.config import SSHConfig

from ..config.deadlines import deadlines
from ..config.inventory import Host
from ..errors import AuthError, ConnectError, FleetError, HostError, HostKeyError, host_errors
from . import keep
from .shell import home_relative
from .hostkeys import HostKeyPolicy, host_key_name, known_hosts_files, negotiation

SSH_CONFIG_ENV = "FABFLEET_SSH_CONFIG"
# paramiko logs refused channels and failed handshakes at ERROR; with no handler set,
# Python would print them raw to stderr. fabfleet raises them as errors instead.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
#: targets opening their connection through one bastion at once: stock sshd's
#: MaxStartups drops unauthenticated connections past 10, and every handshake through
#: the bastion shares its one connection (and paramiko thread)
HANDSHAKES_PER_GATEWAY = 4


def ssh_config_file() -> SSHConfig:
    """~/.ssh/config, or the file ``$FABFLEET_SSH_CONFIG`` names (tests use an empty one)."""
    path = os.path.expanduser(os.environ.get(SSH_CONFIG_ENV, "~/.ssh/config"))
    return SSHConfig.from_path(path) if os.path.exists(path) else SSHConfig()


_class_names: dict[type, frozenset[str]] = {}


class FleetConnection(fabric.Connection):
    """A Fabric connection that verifies host keys, sets TCP_NODELAY, and names its host.

    ``.fleet_host`` is the inventory :class:`Host`; ``.route`` the bastions' names, first
    hop first. Opening translates paramiko and socket errors into
    :class:`~fabfleet.errors.HostError` subclasses carrying the host name.
    """

    # Declared here so that setting them is a plain attribute: Invoke stores unknown
    # attributes of a Connection in its config, which copies them.
    fleet_host: Host = None  # type: ignore[assignment]
    route: tuple[str, ...] = ()
    key_files: list[str] = []  # the inventory's key_file (loaded once: see _private_key)
    known_hosts_files: list[str] = []
    _fabfleet_gateway_key: tuple | None = None
    handshakes: threading.BoundedSemaphore | None = None
    _fabfleet_opening: threading.Lock | None = None
    _fabfleet_watchdog = None
    #: in the connection keeper: what a kept connection must match to be used for this
    #: one (see :mod:`fabfleet.ssh.keep`); None: never kept (bastions, other processes)
    _fabfleet_keep_key: tuple | None = None
    #: Fabric's own: its __init__ sets it, which without a declaration becomes a config
    #: write (~1 ms); the value read back is the same either way
    inline_ssh_env: bool | None = None

    def __setattr__(self, key: str, value) -> None:
        # Invoke's DataProxy decides between a real attribute and a config key with
        # `key in dir(self)` on every set (~0.1 ms; a connection's __init__ sets a dozen):
        # the same decision, from the class's names (cached) and the instance's dict.
        real = _class_names.get(type(self))
        if real is None:
            real = _class_names[type(self)] = frozenset(dir(type(self)))
        if key in real or key in self.__dict__:
            object.__setattr__(self, key, value)
        else:
            super().__setattr__(key, value)

    def open(self):  # noqa: D102 - fabric API
        if self.is_connected:
            return None
        with self._fabfleet_opening:  # a shared bastion is opened by many targets' threads at once
            if self.is_connected:
                return None
            key = self._fabfleet_keep_key if keep.active() else None
            if key is not None:
                client = keep.take(key)
                if client is not None:  # verified with the same files, still answering
                    self.client = client
                    self.transport = client.get_transport()
                    return None
            result = self._open()
            if key is not None:
                keep.lend(key, self.client, self.fleet_host)
            return result

    def _open(self):
        name = self.fleet_host.name
        via = f" via {' -> '.join(self.route)}" if self.route else ""
        gate = self.gateway.handshakes if isinstance(self.gateway, FleetConnection) else None
        try:
            if gate is not None:
                gate.acquire()
            try:
                with host_errors(name, f"connect to {self.host}:{self.port} as {self.user}{via}"):
                    result = super().open()
            finally:
                if gate is not None:
                    gate.release()
            sock = self.client.get_transport().sock
            if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET,
                                                                   socket.AF_INET6):
                # Without it a short command waits on Nagle + delayed ACK: ~48 ms vs ~4 ms.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except HostError as exc:
            self.client.close()  # a refused handshake leaves paramiko's thread running
            raise self._named(exc) from exc
        except FleetError:
            self.client.close()
            raise
        return result

    def close(self):  # noqa: D102 - fabric API
        """Close, never raise: a connection through a bastion that is itself going away
        can fail to say goodbye (EOFError), and that is no error of anyone's. In the
        connection keeper, an open connection is kept for the next command instead."""
        if keep.detach(self):
            return
        try:
            super().close()
        except (EOFError, OSError, paramiko.SSHException):
            pass

    def _named(self, exc: HostError) -> HostError:
        """An error of a bastion, or of key negotiation, told as this host's error."""
        cause = exc.__cause__
        if isinstance(cause, paramiko.SSHException) and "no acceptable host key" in str(cause):
            return HostKeyError(self.fleet_host.name, (
                f"{self.host}:{self.port} offers none of the host-key types known_hosts "
                f"records for it ({host_key_name(self.host, self.port)}), so fabfleet refused "
                "it, as ssh does. If its keys were replaced, check the new fingerprint "
                "with its owner and update known_hosts."))
        if exc.host != self.fleet_host.name:
            return type(exc)(self.fleet_host.name, f"through bastion {exc.host}: {exc.detail}") \
                if type(exc) in (ConnectError, AuthError, HostKeyError) else exc
        return exc

    def open_gateway(self):  # noqa: D102 - fabric API
        """The channel to this host through its bastion, under our deadline and with the
        bastion's refusal told apart from an unreachable target."""
        if not isinstance(self.gateway, FleetConnection):
            return super().open_gateway()
        bastion = self.gateway
        bastion.open()
        try:
            return _SerialChannel(bastion.transport.open_channel(
                "direct-tcpip", (self.host, int(self.port)), ("", 0),
                timeout=deadlines(self.fleet_host).handshake))
        except paramiko.ChannelException as exc:
            if exc.code == 1:  # administratively prohibited
                raise ConnectError(self.fleet_host.name, (
                    f"bastion {bastion.fleet_host.name} refused to forward to {self.host}:"
                    f"{self.port} ({exc.text}): its sshd does not allow TCP forwarding for "
                    "you (AllowTcpForwarding / PermitOpen). Ask its admin, or use another "
                    "bastion.")) from exc
            raise ConnectError(self.fleet_host.name, (
                f"bastion {bastion.fleet_host.name} could not reach {self.host}:{self.port} "
                f"({exc.text}): the name does not resolve there, or nothing listens. Check "
                "`hostname` and `port` (they are resolved by the bastion).")) from exc


class _SerialChannel:
    """A bastion's direct-tcpip channel as the target's socket, with its writes and its
    close serialized. paramiko checks "closed" under the channel's lock but sends the
    data after releasing it; a close from another thread in between puts a data packet
    after CHANNEL_CLOSE, and OpenSSH then drops the whole bastion connection ("data
    packet referred to nonexistent channel") — every target behind it with it."""

    def __init__(self, chan) -> None:
        self._chan = chan
        self._lock = threading.Lock()

    def send(self, data) -> int:
        with self._lock:
            return self._chan.send(data)

    def sendall(self, data) -> None:
        with self._lock:
            self._chan.sendall(data)

    def close(self) -> None:
        with self._lock:
            self._chan.close()

    def __getattr__(self, name):  # recv, settimeout, fileno, … as the channel has them
        return getattr(self._chan, name)


_keys: dict[tuple, paramiko.PKey] = {}
_keys_lock = threading.Lock()


def _private_key(path: str) -> paramiko.PKey | None:
    """The unencrypted private key in ``path``, read once per process (again when the
    file changes): a fan-out over 256 hosts with one key file parses it once, not per
    host. ``None`` — paramiko then reads the file itself, as before — for a key with a
    passphrase or a certificate beside it (``PATH-cert.pub``), or one it cannot read."""
    try:
        st = os.stat(path)
        if os.path.exists(path + "-cert.pub"):
            return None
    except OSError:
        return None
    stamp = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    with _keys_lock:
        found = _keys.get(stamp)
    if found is None:
        try:
            found = paramiko.PKey.from_path(path)
        except (paramiko.SSHException, OSError, ValueError, TypeError):
            return None
        with _keys_lock:
            _keys[stamp] = found
    return found


_gateways: dict[str, FleetConnection] = {}
_gateways_lock = threading.RLock()  # a bastion's own bastion is opened under it


def _gateway(hop: Host) -> FleetConnection:
    """The one connection to bastion ``hop`` in this process, shared by every target
    behind it (opened on first use)."""
    key = repr(hop)
    with _gateways_lock:
        conn = _gateways.get(key)
        if conn is not None and keep.active() and \
                connect(hop)._fabfleet_keep_key != conn._fabfleet_gateway_key:
            conn.close()  # the keeper outlives commands: the bastion's files changed since
            conn = None
        if conn is None:
            conn = _gateways[key] = connect(hop)
            conn.handshakes = threading.BoundedSemaphore(HANDSHAKES_PER_GATEWAY)
            # shared by the targets behind it, never lent to one
            conn._fabfleet_gateway_key, conn._fabfleet_keep_key = conn._fabfleet_keep_key, None
        return conn


def open_gateways() -> list[str]:
    """The bastions this process holds a shared connection to (their names)."""
    with _gateways_lock:
        return sorted(c.fleet_host.name for c in _gateways.values() if c.is_connected)


@atexit.register
def close_gateways() -> None:
    """Close every shared bastion connection (at exit; tests call it between tests)."""
    with _gateways_lock:
        conns = list(_gateways.values())
        _gateways.clear()
    for c in conns:
        c.close()


def _proxy_jump_hops(host: Host, spec: str) -> tuple[Host, ...]:
    """ssh_config's ``ProxyJump`` (``[user@]host[:port],…``) as hop records that inherit
    the target's key, deadlines and host-key policy (each hop's own ssh_config entry
    still applies, as ``ssh -J`` applies it)."""
    hops: list[Host] = []
    for part in spec.split(","):
        user, _, rest = part.strip().rpartition("@")
        name, port = rest, None
        if rest.startswith("[") and "]" in rest:
            name, _, tail = rest[1:].partition("]")
            port = tail[1:] or None
        elif rest.count(":") == 1:
            name, port = rest.split(":")
        inherited = {"key_file"} | ({"user"} if not user else set()) | \
            ({"port"} if not port else set())
        hops.append(Host(name=name, port=int(port) if port else None, user=user or None,
                         key_file=host.key_file, connect_timeout=host.connect_timeout,
                         host_key_policy=host.host_key_policy, known_hosts=host.known_hosts,
                         inherited=frozenset(inherited), hops=tuple(hops)))
    return tuple(hops)


def connect(host: Host) -> FleetConnection:
    """A not-yet-opened connection to ``host``; it opens on first use.

    Uses the host's user, port, key file and deadlines; a host without ``hostname`` is
    looked up in ~/.ssh/config like ``ssh NAME`` would, and its ssh_config values win
    over inventory ``defaults`` (not over its own entry). Bastions: see the module
    docstring.
    """
    ssh_config = ssh_config_file()
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
    hops = host.hops
    if not hops and not host.jump and looked_up.get("proxyjump", "none").lower() != "none":
        hops = _proxy_jump_hops(host, looked_up["proxyjump"])
    gateway = _gateway(hops[-1]) if hops else False  # False: never Fabric's own ProxyJump
    limits = deadlines(host)
    connect_kwargs = {"banner_timeout": limits.handshake, "auth_timeout": limits.handshake,
                      "channel_timeout": limits.handshake}
    if key_file:
        loaded = _private_key(key_file)
        if loaded is not None:
            connect_kwargs["pkey"] = loaded
        else:
            connect_kwargs["key_filename"] = [key_file]
    conn = FleetConnection(
        host.address,
        user=pick("user", "user"),
        port=pick("port", "port"),
        config=config,
        connect_timeout=limits.connect,
        connect_kwargs=connect_kwargs,
        gateway=gateway,
    )
    conn.fleet_host = host
    conn.key_files = [key_file] if key_file else []
    conn._fabfleet_opening = threading.Lock()
    conn.route = tuple(h.name for h in hops)
    files, record_to = known_hosts_files(host, conn.ssh_config)
    lookup_name = host_key_name(conn.host, conn.port)
    preferred = negotiation(files, lookup_name)
    if preferred:
        conn.connect_kwargs["disabled_algorithms"] = preferred
    conn.client.set_missing_host_key_policy(HostKeyPolicy(host, files, record_to))
    conn.known_hosts_files = files
    if keep.active():
        conn._fabfleet_keep_key = (
            repr(host), conn.host, conn.port, conn.user, conn.route,
            gateway._fabfleet_gateway_key if gateway else None,
            keep.stamp([*files, *conn.key_files,
                        os.environ.get(SSH_CONFIG_ENV, "~/.ssh/config")]))
    return conn


def sftp_client(c):
    """The connection's SFTP client, with a per-operation deadline: a host that stops
    answering fails the transfer instead of hanging it."""
    sftp = c.sftp()
    sftp.get_channel().settimeout(deadlines(c.fleet_host).sftp_op)
    return sftp


def sftp_makedirs(sftp, path: str) -> None:
    """Make ``path`` and its parents over SFTP (0700), as ``mkdir -p`` would."""
    parts = []
    while path not in ("", ".", "/"):
        try:
            sftp.stat(os.fsencode(path))
            break
        except FileNotFoundError:
            parts.append(path)
            path = posixpath.dirname(path)
    for p in reversed(parts):
        try:
            sftp.mkdir(os.fsencode(p), mode=0o700)
        except OSError:
            if not stat.S_ISDIR(sftp.stat(os.fsencode(p)).st_mode):  # made by a concurrent push?
                raise



def sftp_put_private(sftp, data: bytes, remote: str) -> None:
    """Write ``data`` to ``remote`` (``~`` = the home), 0600, whole or not at all."""
    path = home_relative(remote)
    tmp = f"{path}.fabfleet-part"
    with sftp.open(tmp, "wb") as f:
        f.chmod(0o600)
        f.write(data)
    sftp.posix_rename(tmp, path)



def ssh_command_for(c) -> list[str]:
    """An OpenSSH command line with the connection's route and settings (rsync's
    ``-e``): same user, port, key, deadlines and host-key checks as fabfleet's own
    connections — the same known_hosts files, ``StrictHostKeyChecking`` per the host's
    policy — and the same bastions, each hop with its own checks (a ``ProxyCommand``
    of ``ssh -W``, never ``-J``, which would drop these options for the hops)."""
    host = c.fleet_host
    files = getattr(c, "known_hosts_files", None) or known_hosts_files(host, c.ssh_config)[0]
    argv = ["ssh", "-p", str(c.port), "-o", "BatchMode=yes", *deadlines(host).ssh_options(),
            "-o", "UserKnownHostsFile=" + (" ".join(files) or "none"),
            "-o", "GlobalKnownHostsFile=none",
            "-o", "StrictHostKeyChecking=" + ("accept-new" if host.host_key_policy ==
                                              "accept-new" else "yes")]
    ssh_config = os.environ.get(SSH_CONFIG_ENV)
    if ssh_config:
        argv += ["-F", os.path.expanduser(ssh_config)]
    for key in getattr(c, "key_files", None) or c.connect_kwargs.get("key_filename") or []:
        argv += ["-i", key]
    if c.user:
        argv += ["-l", c.user]
    if isinstance(c.gateway, FleetConnection):
        hop = ssh_command_for(c.gateway) + ["-W", "%h:%p", c.gateway.host]
        argv += ["-o", "ProxyCommand=" + " ".join(shlex.quote(a).replace("%", "%%")
                                                    if a != "%h:%p" else a for a in hop)]
    else:
        argv += ["-o", "ProxyJump=none", "-o", "ProxyCommand=none"]
    return argv


def start_openssh(c, command: str, *, stdin, stdout) -> tuple[subprocess.Popen, bytearray,
                                                               threading.Thread]:
    """``command`` on ``c``'s host through the local ``ssh`` (:func:`ssh_command_for`),
    for bulk bytes: ``(process, stderr so far, the thread collecting it — join it after
    the process ends)``. The pipe we stream through (``stdin`` or ``stdout`` given as
    ``subprocess.PIPE``) holds 1 MiB, not 64 KiB, where the system allows. Raises
    OSError when ``ssh`` cannot be started."""
    argv = ssh_command_for(c) + ["--", f"[{c.host}]" if ":" in c.host else c.host, command]
    proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)
    pipe = proc.stdout if stdout == subprocess.PIPE else proc.stdin
    if pipe is not None:
        with contextlib.suppress(OSError, AttributeError, ImportError):
            import fcntl
            fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    errors = bytearray()
    drain = threading.Thread(target=lambda: errors.extend(proc.stderr.read()), daemon=True,
                             name="fabfleet-ssh-stderr")
    drain.start()
    return proc, errors, drain
