"""Host keys: known_hosts files read and matched as OpenSSH does, and the policy that
refuses exactly what OpenSSH would refuse.

Fabric 3 installs paramiko's ``AutoAddPolicy`` on every connection and never reads
``known_hosts``, so any key is accepted; paramiko's own reader knows neither wildcard
patterns, negations, ``@revoked`` nor ``@cert-authority``. Here every line is read the
way ``sshd``'s client reads it (``man 8 sshd``, "SSH_KNOWN_HOSTS FILE FORMAT"):

* host patterns: names, ``[name]:port``, ``*``/``?`` wildcards, ``!negations``, and
  hashed ``|1|salt|hash`` entries;
* ``@revoked`` keys are refused for the hosts their line matches, whatever else is
  recorded; ``@cert-authority`` lines name CAs (paramiko cannot check host
  certificates, so those lines are skipped — they never break another host);
* a line that cannot be read is skipped, as OpenSSH skips it, and named in the error
  if the host then turns out unknown.

Files: the user files (ssh_config's ``UserKnownHostsFile``, default
``~/.ssh/known_hosts``; ``none`` or ``/dev/null`` for none), the global ones
(``GlobalKnownHostsFile``, default ``/etc/ssh/ssh_known_hosts``), and the inventory's
``known_hosts``. The key types recorded for a host are the only ones offered in key
exchange (:func:`negotiation`), so a host known by its ECDSA or RSA key alone connects
under ``strict`` as ``ssh`` does. :class:`HostKeyPolicy`:

* a recorded key passes; a different key of a recorded type is refused as CHANGED;
* an unknown host is refused under ``strict`` (with the ``ssh-keyscan`` line that adds
  it) and recorded on first sight under ``accept-new`` — never "recorded" into
  ``/dev/null``, which would accept any key on every connection.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import paramiko

from ..config.inventory import Host
from ..errors import HostKeyError

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
DEFAULT_GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2"
NO_FILE = {"none", "/dev/null"}
_lock = threading.Lock()

#: host-key algorithms a key type stands for in negotiation
ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}


def host_key_name(hostname: str, port: int) -> str:
    """The name known_hosts records a host under: ``host``, or ``[host]:port``."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


def fingerprint_of(blob: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class Entry:
    """One readable known_hosts line."""

    path: str
    line: int
    marker: str | None        # None, "revoked" or "cert-authority"
    patterns: tuple[str, ...]
    key_type: str
    blob: bytes

    def matches(self, name: str) -> bool:
        """Whether the line's host patterns match ``name`` (``host`` or
        ``[host]:port``), with OpenSSH's rules: any positive match, no negated one."""
        name = name.lower()
        matched = False
        for pattern in self.patterns:
            negated = pattern.startswith("!")
            pattern = pattern[1:] if negated else pattern
            if pattern.startswith("|1|"):
                hit = _hashed_match(pattern, name)
            else:
                hit = fnmatch.fnmatchcase(name, _glob(pattern.lower()))
            if hit and negated:
                return False
            matched = matched or hit
        return matched

    @property
    def where(self) -> str:
        return f"{self.path} line {self.line}"


def _glob(pattern: str) -> str:
    """OpenSSH patterns know only ``*`` and ``?``: brackets are literal characters."""
    return pattern.replace("[", "[[]")


def _hashed_match(pattern: str, name: str) -> bool:
    try:
        _, _, salt, digest = pattern.split("|", 3)
        want = base64.b64decode(digest)
        got = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(want, got)


@dataclass(frozen=True)
class KnownHosts:
    """The readable entries of one file, and the lines that could not be read."""

    path: str
    entries: tuple[Entry, ...]
    unreadable: tuple[int, ...]


def parse_known_hosts(text: str, path: str = "<text>") -> KnownHosts:
    """Every line of a known_hosts file (pure: no I/O)."""
    entries, bad = [], []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        marker = None
        if fields[0].startswith("@"):
            marker = fields.pop(0)[1:]
            if marker not in ("revoked", "cert-authority"):
                bad.append(n)
                continue
        if len(fields) < 3:
            bad.append(n)
            continue
        patterns, key_type, data = fields[0], fields[1], fields[2]
        try:
            blob = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            bad.append(n)
            continue
        if _blob_type(blob) != key_type:
            bad.append(n)
            continue
        entries.append(Entry(path, n, marker, tuple(patterns.split(",")), key_type, blob))
    return KnownHosts(path, tuple(entries), tuple(bad))


def _blob_type(blob: bytes) -> str | None:
    """The key type written at the start of a public key blob."""
    if len(blob) < 4:
        return None
    n = int.from_bytes(blob[:4], "big")
    try:
        return blob[4:4 + n].decode("ascii")
    except UnicodeDecodeError:
        return None


_parsed: dict[str, tuple[int, int, KnownHosts]] = {}


def read_known_hosts(path: str) -> KnownHosts:
    """The parsed file ``path``, read once per process and again only when it changes
    (size or mtime): a fan-out over many hosts reads it once, not per host. A missing
    or unreadable file has no entries."""
    try:
        st = os.stat(path)
    except OSError:
        return KnownHosts(path, (), ())
    with _lock:
        cached = _parsed.get(path)
        if cached and cached[:2] == (st.st_mtime_ns, st.st_size):
            return cached[2]
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return KnownHosts(path, (), ())
    parsed = parse_known_hosts(text, path)
    with _lock:
        _parsed[path] = (st.st_mtime_ns, st.st_size, parsed)
    return parsed


def known_hosts_files(host: Host, ssh_config: dict | None = None) -> tuple[list[str], str | None]:
    """``(files to read, file to record new keys in)`` for ``host``: the user files,
    the global files, the inventory's file; new keys go to the inventory's file, else
    the first user file — or nowhere (``None``) when that is ``none``/``/dev/null``."""
    cfg = ssh_config or {}
    user = [os.path.expanduser(f) for f in
            str(cfg.get("userknownhostsfile", DEFAULT_KNOWN_HOSTS)).split()]
    global_ = [os.path.expanduser(f) for f in
               str(cfg.get("globalknownhostsfile", DEFAULT_GLOBAL_KNOWN_HOSTS)).split()]
    files = [f for f in user + global_ if f not in NO_FILE]
    if host.known_hosts:
        files.append(host.known_hosts)
    record_to = host.known_hosts or next((f for f in user), None)
    if record_to in NO_FILE:
        record_to = None
    return files, record_to


def lookup(files: list[str], name: str) -> tuple[list[Entry], list[str]]:
    """The entries of ``files`` whose patterns match ``name`` (CA lines left out), and
    ``FILE line N`` for each line that could not be read."""
    found, unreadable = [], []
    for f in files:
        kh = read_known_hosts(f)
        found += [e for e in kh.entries if e.marker != "cert-authority" and e.matches(name)]
        unreadable += [f"{f} line {n}" for n in kh.unreadable]
    return found, unreadable


def negotiation(files: list[str], name: str) -> dict | None:
    """paramiko's ``disabled_algorithms`` that leave only the host-key algorithms of the
    key types recorded for ``name`` (as OpenSSH orders its HostKeyAlgorithms by what
    known_hosts has); ``None`` for a host with nothing recorded."""
    entries, _ = lookup(files, name)
    recorded = {e.key_type for e in entries if e.marker is None}
    if not recorded:
        return None
    allowed = {a for t in recorded for a in ALGORITHMS.get(t, (t,))}
    offered = getattr(paramiko.Transport, "_preferred_keys", ())  # paramiko's own list
    disabled = [a for a in offered if a not in allowed]
    return {"keys": disabled} if disabled else None


class HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Host-key verification against our files (paramiko is given none, so it asks us
    about every key); see the module docstring. ``route`` names the hop in messages
    (``"bastion gw1 of inner"``)."""

    def __init__(self, host: Host, files: list[str], record_to: str | None,
                 route: str | None = None) -> None:
        self.host = host
        self.files = files
        self.record_to = record_to
        self.route = route

    def missing_host_key(self, client, hostname, key) -> None:  # noqa: D102 - paramiko API
        blob, key_type = key.asbytes(), key.get_name()
        entries, unreadable = lookup(self.files, hostname)
        offered = f"{key_type} {fingerprint_of(blob)}"
        what = f"{self.route}: " if self.route else ""
        for e in entries:
            if e.marker == "revoked" and e.blob == blob:
                raise HostKeyError(self.host.name, (
                    f"{what}refusing to connect to {hostname}: its host key ({offered}) is "
                    f"marked @revoked in {e.where}. Do not use this host until its owner "
                    "has replaced the key; never remove the @revoked line to get in."))
        plain = [e for e in entries if e.marker is None]
        if any(e.blob == blob for e in plain):
            return
        same_type = [e for e in plain if e.key_type == key_type]
        if same_type:
            e = same_type[0]
            files = sorted({x.path for x in same_type})
            fix = " and ".join(f"`ssh-keygen -R '{hostname}' -f {f}`" for f in files)
            raise HostKeyError(self.host.name, (
                f"{what}the host key CHANGED, refusing to connect to {hostname}: it now offers "
                f"{offered}, but {e.where} has {fingerprint_of(e.blob)}. This can be an "
                "attack; or the host was reinstalled. Only if you know why it changed, remove "
                f"the old entry with {fix}, then add the new key (`host_key_policy: "
                "accept-new` or ssh-keyscan)."))
        if plain:
            kinds = ", ".join(sorted({e.key_type for e in plain}))
            raise HostKeyError(self.host.name, (
                f"{what}refusing to connect to {hostname}: known_hosts records its {kinds} "
                f"key ({plain[0].where}), but it offered {offered} instead (fabfleet asked "
                f"for {kinds} only, as ssh does). If the host's keys were replaced, check "
                "the new fingerprint with its owner and update that entry."))
        if self.host.host_key_policy == "accept-new" and self.record_to:
            record_host_key(self.record_to, hostname, key)
            return
        port_flag, bare = "", hostname
        if hostname.startswith("["):
            bare, port = hostname[1:].split("]:")
            port_flag = f"-p {port} "
        skipped = (f" (unreadable lines, skipped as ssh skips them: {', '.join(unreadable)})"
                   if unreadable else "")
        if self.host.host_key_policy == "accept-new":
            advice = ("`host_key_policy: accept-new` has nowhere to record it (the known_hosts "
                      "file is none or /dev/null, which would accept any key on every "
                      "connection): set `known_hosts:` in the inventory to a real file")
        else:
            advice = (f"Check the fingerprint with the host's owner, then add it with "
                      f"`ssh-keyscan {port_flag}{bare} >> {self.record_to or '~/.ssh/known_hosts'}`"
                      ", or set `host_key_policy: accept-new` for this host to record it on "
                      "first connect")
        raise HostKeyError(self.host.name, (
            f"{what}refusing to connect to {hostname}: its host key ({offered}) is not in "
            f"{' or '.join(self.files) or 'any known_hosts file'}{skipped}. {advice}."))


def record_host_key(path: str, hostname: str, key: paramiko.PKey) -> None:
    """Append ``hostname key`` to the known_hosts file ``path`` (thread-safe, 0600 when
    made)."""
    with _lock:
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
