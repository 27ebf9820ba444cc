"""Host keys: known_hosts files read and matched, and the policy that refuses what
OpenSSH would refuse.

Fabric 3 installs paramiko's ``AutoAddPolicy`` on every connection and never reads
``known_hosts``, so any key is accepted. :func:`fabfleet.ssh.connect.connect` instead
loads ``~/.ssh/known_hosts`` (or ssh_config's ``UserKnownHostsFile``) plus the
inventory's ``known_hosts`` file and installs :class:`HostKeyPolicy`:

* ``strict``: an unknown key is refused (with the ``ssh-keyscan`` line that adds it);
* ``accept-new``: an unknown key is recorded on first sight, like OpenSSH's option;
* a *changed* key is refused under every policy (paramiko raises, we translate).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import paramiko

from ..config.inventory import Host
from ..errors import HostKeyError, key_fingerprint

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
_known_hosts_lock = threading.Lock()


def host_key_name(hostname: str, port: int) -> str:
    return hostname if port == 22 else f"[{hostname}]:{port}"


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
