"""Gather: copy remote files matching patterns back, verified, never overwriting.

Files stream over one exec channel (``cat`` of each, split here by their listed sizes)
while their SHA-256 is computed on the host over another; each copy is checked against
size and checksum before it takes its place under its final name. A local file with
other content is kept unless asked; a remote name that would land outside the
destination is refused.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fnmatch
import hashlib
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config.deadlines import TREE_COMMAND
from ..errors import LocalError, TransferError, host_errors
from ..ssh import shell
from ..ssh.connect import ssh_command_for
from ..ssh.exec import execute
from ..ssh.liveness import watched
from .files import remote_manifest

@dataclass
class GatheredFile:
    remote: str
    local: str
    size: int
    status: str  # "copied", "unchanged" (identical local copy), "conflict" (left alone),
    #              "refused" (its name would land outside the destination), "unreadable"
    #              (a file or directory on the host we may not read: left alone)


def _glob_match(rel: str, pattern: str) -> bool:
    pattern = pattern.lstrip("./") if pattern.startswith("./") else pattern
    if fnmatch.fnmatchcase(rel, pattern):
        return "/" in pattern or "/" not in rel or pattern.startswith("**")
    return pattern.startswith("**/") and fnmatch.fnmatchcase(rel, pattern[3:])


def _sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gather(c, remote_dir: str, patterns: Sequence[str], dest: str | os.PathLike[str], *,
           overwrite: bool = False) -> list[GatheredFile]:
    """Copy files under ``remote_dir`` matching ``patterns`` (globs relative to it, ``*``
    stays within a directory, ``**/`` spans them) into ``dest``, keeping relative paths.

    Each file is hashed while it is copied and verified by size and SHA-256 against the
    remote copy before it takes its place (under a temporary name unique to this
    transfer, then renamed). An existing local file with other content is never
    overwritten unless ``overwrite``: it is reported as ``"conflict"``. A remote name that
    would land outside ``dest`` (``..``, an absolute path, a local symlink leading out)
    is refused (``"refused"``), never written. Local problems raise
    :class:`~fabfleet.errors.LocalError` naming the local path.
    """
    host = c.fleet_host.name
    denied: list[str] = []
    asked = time.monotonic()
    manifest = remote_manifest(c, remote_dir, denied)
    # One round trip's worth (at most): what a new OpenSSH connection's handshake costs
    # is about 8 of them, worth paying only for enough bytes (see _stream).
    rtt = time.monotonic() - asked
    matching = sorted(rel for rel, st in manifest.items() if st[0] != "link"
                      and any(_glob_match(rel, p) for p in patterns))
    wanted = [rel for rel in matching if manifest[rel][0] != "unreadable"]
    # What we may not read is named, not fatal: the rest is gathered.
    skipped = [GatheredFile(rel, "", manifest[rel][1], "unreadable")
               for rel in matching if manifest[rel][0] == "unreadable"]
    skipped += [GatheredFile(rel, "", 0, "unreadable") for rel in denied]
    if not wanted:
        return skipped
    root = Path(dest)
    try:
        root.mkdir(parents=True, exist_ok=True)
        root = root.resolve()
    except OSError as exc:
        raise LocalError(f"{dest}: cannot create the gather directory: "
                         f"{exc.strerror or exc}") from None
    out, safe = list(skipped), []
    for rel in wanted:
        local = contained(root, rel)
        if local is None:
            out.append(GatheredFile(rel, "", manifest[rel][0], "refused"))
        else:
            safe.append((rel, local))
    # The remote checksums are computed while the files are copied (another channel).
    sums: dict[str, str] = {}
    sum_error: list[BaseException] = []

    def checksum() -> None:
        try:
            sums.update(_remote_sha256(c, remote_dir, [rel for rel, _ in safe]))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            sum_error.append(exc)
    summer = threading.Thread(target=checksum, daemon=True, name="fabfleet-sha256")
    summer.start()
    copied: list[tuple[str, Path, Path, _HashingWriter]] = []
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    with watched(c, f"gather from {remote_dir}"), host_errors(host, f"gather from {remote_dir}"):
        try:
            for rel, local in safe:
                size = manifest[rel][0]
                if os.path.lexists(local):
                    summer.join()
                    if sum_error:
                        raise sum_error[0]
                    if local.is_file() and local.stat().st_size == size and \
                            _sha256(local) == sums.get(rel):
                        out.append(GatheredFile(rel, str(local), size, "unchanged"))
                        continue
                    if not overwrite:
                        out.append(GatheredFile(rel, str(local), size, "conflict"))
                        continue
                part = local.with_name(f".{local.name}.fabfleet-part-{tag}")
                copied.append((rel, local, part, _HashingWriter(part)))
            for i in range(0, len(copied), 2000):
                _stream(c, remote_dir, [(rel, manifest[rel][0], w)
                                        for rel, _, _, w in copied[i:i + 2000]], rtt)
            summer.join()
            if sum_error:
                raise sum_error[0]
            for rel, local, part, writer in copied:  # verified, then put in place
                size = manifest[rel][0]
                if rel not in sums:
                    raise TransferError(host, f"{rel!r}: no checksum came back for it "
                                        "(removed while gathering?); gather again.")
                if writer.size != size or writer.hexdigest() != sums[rel]:
                    raise TransferError(host, f"{rel}: the copy does not match the remote "
                                        f"file (size {writer.size} vs {size}, sha256 "
                                        "differs). The file may be changing while gathered; "
                                        "wait for the run to finish and gather again.")
                _replace(part, local)
                out.append(GatheredFile(rel, str(local), size, "copied"))
        finally:
            for _, _, part, _ in copied:
                with contextlib.suppress(OSError):
                    part.unlink()
    return out


def _stream(c, remote_dir: str, files: list[tuple[str, int, _HashingWriter]],
            rtt: float = 0.0) -> None:
    """Copy files in one exec-channel stream (``cat`` of each, in order), split here by
    their listed sizes into their writers — about twice SFTP's speed under paramiko. A
    file that changed size misaligns the stream, which the checksums then catch."""
    host = c.fleet_host.name
    names = b"".join(os.fsencode(rel) + b"\0" for rel, _, _ in files)
    queue = [(size, w) for _, size, w in files]
    state = {"i": 0, "left": queue[0][0] if queue else 0}

    def split(data: bytes) -> None:
        view = memoryview(data)
        while view:
            i = state["i"]
            if i >= len(queue):
                raise TransferError(host, "the remote files grew while being gathered; "
                                    "wait for the run to finish and gather again.")
            take = min(state["left"], len(view))
            queue[i][1].write(view[:take])
            view = view[take:]
            state["left"] -= take
            while state["left"] == 0 and state["i"] < len(queue):
                queue[state["i"]][1].close()
                state["i"] += 1
                state["left"] = queue[state["i"]][0] if state["i"] < len(queue) else -1
    cmd = shell.sh(f"cd -- {shell.path(remote_dir)} && printf %s "
                   f"{shell.q(base64.b64encode(names).decode())} | base64 -d | "
                   "xargs -0 -r cat --")
    if shutil.which("ssh") is not None and \
            sum(size for _, size, _ in files) >= max(BULK, 8 * rtt * OPENSSH_GAIN):
        code, stderr = _stream_openssh(c, cmd, split)
    else:
        result = execute(c, cmd, timeout=None, keep=False, on_stdout=split,
                         action=f"copy {len(files)} files from {remote_dir}")
        code, stderr = result.exit_code, result.stderr
    for _, w in queue:
        w.close()
    if code != 0:
        raise TransferError(host, f"reading the files in {remote_dir} failed (exit "
                            f"{code}): {stderr.strip()[-500:]}. gather "
                            "again once the run has finished writing them.")


#: Gathers of at least this many bytes stream through OpenSSH when the laptop has it —
#: and at least what OpenSSH saves in the time its handshake (~8 round trips) takes: it
#: moves about this many more bytes per second than Paramiko.
BULK = 4 << 20
OPENSSH_GAIN = 200e6


def _stream_openssh(c, cmd: str, sink) -> tuple[int, str]:
    """Run ``cmd`` through the local OpenSSH client (:func:`ssh_command_for`: the same
    route, key, host-key checks and deadlines as our own connection) and feed its stdout
    to ``sink``: OpenSSH's C packet loop moves bulk bytes several times faster than
    Paramiko's. ``(exit code, stderr)``; 255 is OpenSSH's own failure."""
    argv = ssh_command_for(c) + ["--", f"[{c.host}]" if ":" in c.host else c.host, cmd]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        return 255, f"cannot run ssh: {exc}"
    errors = bytearray()
    drain = threading.Thread(target=lambda: errors.extend(proc.stderr.read()), daemon=True)
    drain.start()
    try:
        while True:
            data = proc.stdout.read1(1 << 20)
            if not data:
                break
            sink(data)
    except BaseException:
        proc.kill()
        raise
    finally:
        code = proc.wait()
        drain.join(10)
    return code, errors.decode("utf-8", "replace")


def contained(root: Path, rel: str) -> Path | None:
    """``root/rel`` if it stays inside ``root`` (no ``..``, not absolute, no local
    symlink leading out), with its parent directories made; else ``None``."""
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts):
        return None
    local = root.joinpath(*parts)
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            raise LocalError(f"{local.parent}: cannot create it: {exc.strerror}") from None
        return None  # a file where a directory should be, a name too long, …
    real = os.path.realpath(local.parent)
    if real != str(root) and not real.startswith(str(root) + os.sep):
        return None
    if os.path.islink(local):
        return None  # never write through a link
    return local


class _HashingWriter:
    """The local file a gathered copy is written to, hashed as it is written; a local
    write problem is a LocalError naming the path (not a connection error)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hash = hashlib.sha256()
        self.size = 0
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self.f = os.fdopen(fd, "wb")
        except OSError as exc:
            raise LocalError(f"{path}: cannot write: {exc.strerror or exc}") from None

    def write(self, data: bytes) -> int:
        try:
            self.f.write(data)
        except OSError as exc:
            raise LocalError(f"{self.path}: cannot write: {exc.strerror or exc}") from None
        self.hash.update(data)
        self.size += len(data)
        return len(data)

    def hexdigest(self) -> str:
        return self.hash.hexdigest()

    def __enter__(self):
        return self

    def close(self) -> None:
        if self.f.closed:
            return
        try:
            self.f.close()
        except OSError as err:
            raise LocalError(f"{self.path}: cannot write: {err.strerror or err}") from None

    def __exit__(self, *exc) -> None:
        self.close()


def _replace(part: Path, local: Path) -> None:
    try:
        os.replace(part, local)
    except OSError as exc:
        raise LocalError(f"{local}: cannot put the gathered file in place: "
                         f"{exc.strerror or exc}") from None


def _remote_sha256(c, remote_dir: str, rels: list[str]) -> dict[str, str]:
    """SHA-256 of remote files, names passed NUL-separated (any byte in a name works)."""
    host = c.fleet_host.name
    sums: dict[str, str] = {}
    for i in range(0, len(rels), 2000):  # keep command lines well under ARG_MAX
        batch = b"".join(os.fsencode(r) + b"\0" for r in rels[i:i + 2000])
        cmd = shell.sh(f"cd -- {shell.path(remote_dir)} && printf %s "
                       f"{shell.q(base64.b64encode(batch).decode())} | base64 -d | "
                       "xargs -0 -r sha256sum -z --")
        result = execute(c, cmd, timeout=TREE_COMMAND, action="checksum files to gather")
        if result.exit_code != 0:
            raise TransferError(host, f"sha256sum failed in {remote_dir}: "
                                f"{result.stderr.strip()[-500:]}. gather needs GNU "
                                "coreutils (sha256sum -z) and xargs on the host.")
        sums.update(parse_sha256sum_z(result.stdout_bytes))
    return sums


def parse_sha256sum_z(data: bytes) -> dict[str, str]:
    """``sha256sum -z`` output (``HASH  NAME\\0`` …, names unescaped) → ``{name: hash}``."""
    out = {}
    for entry in data.split(b"\0"):
        if len(entry) > 66 and entry[64:65] == b" ":
            out[os.fsdecode(entry[66:])] = entry[:64].decode()
    return out
