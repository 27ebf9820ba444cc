"""Host data → :class:`fabric.Connection`: the one place a connection is made.

:func:`connect` turns an inventory :class:`~fabfleet.config.inventory.Host` into a
:class:`FleetConnection` that verifies host keys (:mod:`fabfleet.ssh.hostkeys`), uses
the host's deadlines (:mod:`fabfleet.config.deadlines`), and names its host in every
error. :func:`ssh_command_for` gives an OpenSSH subprocess (rsync's ``-e``) the same
settings and checks; :func:`sftp_client` an SFTP session with a per-operation deadline.
"""

from __future__ import annotations

import os
import socket

import fabric
from paramiko.config import SSHConfig

from ..config.deadlines import deadlines
from ..config.inventory import Host
from ..errors import AuthError, FleetError, host_errors
from .hostkeys import HostKeyPolicy, host_key_name, known_host_keys, known_hosts_files

SSH_CONFIG_ENV = "FABFLEET_SSH_CONFIG"


def ssh_config_file() -> SSHConfig:
    """~/.ssh/config, or the file ``$FABFLEET_SSH_CONFIG`` names (tests use an empty one)."""
    path = os.path.expanduser(os.environ.get(SSH_CONFIG_ENV, "~/.ssh/config"))
    return SSHConfig.from_path(path) if os.path.exists(path) else SSHConfig()



class FleetConnection(fabric.Connection):
    """A Fabric connection that verifies host keys, sets TCP_NODELAY, and names its host.

    ``.fleet_host`` is the inventory :class:`Host`. Opening translates paramiko and socket
    errors into :class:`~fabfleet.errors.HostError` subclasses carrying the host name.
    """

    fleet_host: Host

    def open(self):  # noqa: D102 - fabric API
        if self.is_connected:
            return None
        name = self.fleet_host.name
        try:
            with host_errors(name, f"connect to {self.host}:{self.port} as {self.user}",
                             known_hosts=tuple(self.known_hosts_files),
                             host_key_name=host_key_name(self.host, self.port)):
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


def connect(host: Host) -> FleetConnection:
    """A not-yet-opened connection to ``host``; it opens on first use.

    Uses the host's user, port, key file and connect timeout; a host without
    ``hostname`` is looked up in ~/.ssh/config like ``ssh NAME`` would, and its
    ssh_config values win over inventory ``defaults`` (not over its own entry).
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
    limits = deadlines(host)
    connect_kwargs = {"banner_timeout": limits.handshake, "auth_timeout": limits.handshake,
                      "channel_timeout": limits.handshake}
    if key_file:
        connect_kwargs["key_filename"] = [key_file]
    conn = FleetConnection(
        host.address,
        user=pick("user", "user"),
        port=pick("port", "port"),
        config=config,
        connect_timeout=limits.connect,
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


def sftp_client(c):
    """The connection's SFTP client, with a per-operation deadline: a host that stops
    answering fails the transfer instead of hanging it."""
    sftp = c.sftp()
    sftp.get_channel().settimeout(deadlines(c.fleet_host).sftp_op)
    return sftp


def ssh_command_for(c) -> list[str]:
    """An OpenSSH command line with the connection's settings (for rsync ``-e``).

    Same user, port, key, deadlines and host-key checks as fabfleet's own connections:
    the same known_hosts files, and ``StrictHostKeyChecking`` per the host's policy.
    """
    host = c.fleet_host
    argv = ["ssh", "-p", str(c.port), "-o", "BatchMode=yes", *deadlines(host).ssh_options(),
            "-o", "UserKnownHostsFile=" + " ".join(c.known_hosts_files),
            "-o", "StrictHostKeyChecking=" + ("accept-new" if host.host_key_policy ==
                                              "accept-new" else "yes")]
    ssh_config = os.environ.get(SSH_CONFIG_ENV)
    if ssh_config:
        argv += ["-F", os.path.expanduser(ssh_config)]
    for key in c.connect_kwargs.get("key_filename") or []:
        argv += ["-i", key]
    if c.user:
        argv += ["-l", c.user]
    return argv
