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
import hashlib
import json
import os
import queue
import secrets
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


from ..config.deadlines import TREE_COMMAND
from ..errors import LocalError, TransferError, host_errors
from ..hostside import gatherer
from ..hostside.gatherer import HEADER, glob_match
from ..ssh import shell
from ..ssh.connect import start_openssh
from ..ssh.exec import execute
from ..ssh.launch import python_command
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

    One remote command lists, matches, hashes and sends (:mod:`fabfleet.hostside.gatherer`):
    what this side already has goes with it, so an identical local copy costs its hash,
    not its bytes. Big gathers stream through OpenSSH when the laptop has it. A host
    without Python is gathered with ``find``, ``sha256sum`` and ``cat`` instead.
    """
    host = c.fleet_host.name
    root = Path(dest)
    try:
        root = root.resolve()
    except OSError as exc:
        raise LocalError(f"{dest}: cannot use it as the gather directory: "
                         f"{exc.strerror or exc}") from None
    session = _Gathering(c, remote_dir, root, overwrite)
    with watched(c, f"gather from {remote_dir}"), host_errors(host, f"gather from {remote_dir}"):
        try:
            if not session.run({"patterns": list(patterns), "overwrite": overwrite,
                                "local": _local_state(root, patterns)}):
                return _gather_with_shell(c, remote_dir, patterns, root, overwrite)
            session.put_in_place()
        finally:
            session.discard()
    return session.out


def _local_state(root: Path, patterns: Sequence[str]) -> dict[str, int]:
    """What ``root`` already holds under names the patterns match: a regular file's size,
    -1 for anything else (a directory, a symlink) — what the host needs to know to send
    only what is missing."""
    have: dict[str, int] = {}
    if not root.is_dir():
        return have
    for top, dirs, names in os.walk(root):
        base = os.path.relpath(top, root)
        base = "" if base == "." else base.replace(os.sep, "/") + "/"
        for name in names + dirs:
            rel = base + name
            if any(glob_match(rel, p) for p in patterns):
                try:
                    st = os.lstat(os.path.join(top, name))
                except OSError:
                    continue
                have[rel] = st.st_size if stat.S_ISREG(st.st_mode) else -1
    return have


class _Frames:
    """The gatherer's frames (:mod:`fabfleet.hostside.gatherer`) out of a byte stream:
    ``D`` data goes to ``on_data`` as it arrives (never buffered whole), every other
    frame to ``on_frame`` once complete."""

    def __init__(self, on_frame, on_data) -> None:
        self.on_frame, self.on_data = on_frame, on_data
        self.buf = bytearray()
        self.left = 0  # bytes of a D frame still to come
        self.need: int | None = None  # length of the non-D frame being collected
        self.kind = b""

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.left:
                take = min(self.left, len(view))
                self.on_data(view[:take])
                view, self.left = view[take:], self.left - take
                continue
            if self.need is None:
                take = HEADER.size - len(self.buf)
                self.buf += view[:take]
                view = view[take:]
                if len(self.buf) < HEADER.size:
                    return
                self.kind, n = HEADER.unpack(self.buf)
                self.buf.clear()
                if self.kind == b"D":
                    self.left = n
                    continue
                self.need = n
            take = self.need - len(self.buf)
            self.buf += view[:take]
            view = view[take:]
            if len(self.buf) == self.need:
                frame, self.need = bytes(self.buf), None
                self.buf.clear()
                self.on_frame(self.kind, frame)


class _Gathering:
    """One gather from one host: the remote command's frames turned into verified files
    (written under temporary names, put in place by :meth:`put_in_place`)."""

    def __init__(self, c, remote_dir: str, root: Path, overwrite: bool) -> None:
        self.c, self.host = c, c.fleet_host.name
        self.remote_dir, self.root, self.overwrite = remote_dir, root, overwrite
        self.tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.out: list[GatheredFile] = []
        self.verified: list[tuple[str, Path, Path, int]] = []  # rel, local, part, size
        self.parts: list[Path] = []
        self.later: list[str] = []  # same size, other content, overwrite: fetched next
        self.bulk: list[str] = []   # to fetch through OpenSSH
        self.spec: dict = {}

    # -- one remote command ------------------------------------------------------------
    def run(self, spec: dict) -> bool:
        """List and fetch; ``False`` when the host cannot run the gatherer (no Python,
        an environment that does not activate): nothing was written."""
        self._start(spec, via_openssh=False)
        if self.listing is None:
            if self.code in (127, 97, 95) or "SyntaxError" in self.stderr:
                return False  # no (new enough) Python there, or no environment
            self._failed()
        if self.bulk:
            self._start({"only": self.bulk, "overwrite": True}, via_openssh=True)
        if self.later:
            self._start({"only": self.later, "overwrite": True}, via_openssh=False)
        return True

    def _start(self, spec: dict, *, via_openssh: bool) -> None:
        self.listing, self.files, self.i = None, [], 0
        self.writer: _HashingWriter | _Discard | None = None
        self.ended, self.to_openssh, self.spec = False, False, spec
        self.asked = time.monotonic()
        self.chan = None
        frames = _Frames(self._frame, self._data)
        command = python_command(self.c.fleet_host, gatherer, [json.dumps({
            "dir": self.remote_dir, "patterns": [], "local": {}, "ask": None, "only": None,
            **spec, **({"ask": BULK} if not via_openssh and spec.get("only") is None
                       and shutil.which("ssh") else {})})])
        if via_openssh:
            self.code, stderr = _stream_openssh(self.c, command.command, frames.feed,
                                                stdin=command.stdin)
        else:
            result = execute(self.c, command, timeout=None, keep=False, on_stdout=frames.feed,
                             on_start=self._started, action=f"gather from {self.remote_dir}")
            self.code, stderr = result.exit_code, result.stderr
        self.stderr = stderr
        if self.listing is not None and (self.code != 0 or not self.ended):
            self._failed()

    def _started(self, chan) -> None:
        self.chan = chan

    def _failed(self):
        raise TransferError(self.host, f"gathering from {self.remote_dir} failed (exit "
                            f"{self.code}): {self.stderr.strip()[-500:] or 'no reason given'}. "
                            "gather again once the run has finished writing its files.")

    # -- frames ------------------------------------------------------------------------
    def _frame(self, kind: bytes, data: bytes) -> None:
        if kind == b"L":
            self._listing(json.loads(data))
        elif kind == b"Z":
            self.ended = True
        else:
            self._file_end(kind, data)

    def _data(self, data) -> None:
        if self.writer is None:
            raise TransferError(self.host, "the gatherer sent bytes out of turn (a protocol "
                                "error); gather again.")
        self.writer.write(data)

    def _listing(self, listing: dict) -> None:
        rtt = time.monotonic() - self.asked  # at most what one round trip costs
        self.listing = listing
        only = self.spec.get("only") is not None
        for rel, size in listing["unreadable"]:
            self.out.append(GatheredFile(rel, "", size, "unreadable"))
        self.out += [GatheredFile(rel, "", 0, "unreadable") for rel in listing["denied"]]
        local = {} if only else (self.spec.get("local") or {})
        if listing["files"]:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LocalError(f"{self.root}: cannot create the gather directory: "
                                 f"{exc.strerror or exc}") from None
        for rel, size in listing["files"]:
            have = local.get(rel)
            what = "send" if have is None or size < 0 else "hash" if have == size else \
                "send" if self.overwrite else "keep"
            self.files.append((rel, size, what))
        self.to_openssh = listing["ask"] and listing["send"] >= max(
            BULK, 8 * rtt * OPENSSH_GAIN)
        if listing["ask"]:
            if self.to_openssh:  # their bytes come through OpenSSH, the rest here
                self.bulk = [rel for rel, _, what in self.files if what == "send"]
                self.files = [f for f in self.files if f[2] != "send"]
            self.chan.send(b"o" if self.to_openssh else b"s")
        if self.chan is not None:
            self.chan.shutdown_write()
        self._next_writer()

    def _next_writer(self) -> None:
        """The writer for the next file whose bytes come in this stream (if it is next)."""
        self.writer = None
        if self.i < len(self.files) and self.files[self.i][2] == "send":
            rel = self.files[self.i][0]
            local = contained(self.root, rel)
            if local is None:
                self.writer = _Discard()
            else:
                part = local.with_name(f".{local.name}.fabfleet-part-{self.tag}")
                self.parts.append(part)
                self.writer = _HashingWriter(part, background=self.files[self.i][1] >= BULK)

    def _file_end(self, kind: bytes, data: bytes) -> None:
        if self.i >= len(self.files):
            raise TransferError(self.host, f"the gatherer sent a {kind!r} frame past the end "
                                "of its listing (a protocol error); gather again.")
        rel, size, what = self.files[self.i]
        writer, self.i = self.writer, self.i + 1
        local = contained(self.root, rel)
        if kind == b"X":
            if writer is not None:
                writer.close()
            if data == b"denied":
                self.out.append(GatheredFile(rel, "", size, "unreadable"))
            else:
                raise TransferError(self.host, f"{rel!r}: it was removed while being "
                                    "gathered; gather again.")
        elif kind == b"K":
            self.out.append(GatheredFile(rel, str(local or ""), size,
                                         "refused" if local is None else "conflict"))
        elif kind == b"H":
            if local is None:
                self.out.append(GatheredFile(rel, "", size, "refused"))
            elif local.is_file() and _sha256(local) == data.decode():
                self.out.append(GatheredFile(rel, str(local), size, "unchanged"))
            elif self.overwrite:
                self.later.append(rel)
            else:
                self.out.append(GatheredFile(rel, str(local), size, "conflict"))
        elif kind == b"E":
            sha, _, state = data.decode().partition(" ")
            writer.close()
            if local is None:
                self.out.append(GatheredFile(rel, "", size, "refused"))
            elif state != "same" or writer.size != size or writer.hexdigest() != sha:
                raise TransferError(self.host, f"{rel}: the copy does not match the remote "
                                    f"file (size {writer.size} vs {size}, or its content "
                                    "moved while it was read). The file may be changing "
                                    "while gathered; wait for the run to finish and gather "
                                    "again.")
            else:
                self.verified.append((rel, local, writer.path, size))
        else:
            raise TransferError(self.host, f"the gatherer sent an unknown {kind!r} frame "
                                "(a protocol error); gather again.")
        self._next_writer()

    # -- afterwards --------------------------------------------------------------------
    def put_in_place(self) -> None:
        for rel, local, part, size in self.verified:
            _replace(part, local)
            self.out.append(GatheredFile(rel, str(local), size, "copied"))

    def discard(self) -> None:
        if getattr(self, "writer", None) is not None:
            with contextlib.suppress(LocalError):
                self.writer.close()
        for part in self.parts:
            with contextlib.suppress(OSError):
                part.unlink()


class _Discard:
    """Where the bytes of a refused file go: nowhere (they come in the stream anyway)."""
    size = 0

    def write(self, data) -> int:
        return len(data)

    def close(self) -> None:
        pass


def _gather_with_shell(c, remote_dir: str, patterns: Sequence[str], root: Path,
                       overwrite: bool) -> list[GatheredFile]:
    """Gather from a host that cannot run the gatherer: the listing (``find``), the
    checksums (``sha256sum``, computed while the files stream) and the copy (``cat``)
    are separate commands."""
    host = c.fleet_host.name
    denied: list[str] = []
    asked = time.monotonic()
    manifest = remote_manifest(c, remote_dir, denied)
    # One round trip's worth (at most): what a new OpenSSH connection's handshake costs
    # is about 8 of them, worth paying only for enough bytes (see _stream).
    rtt = time.monotonic() - asked
    matching = sorted(rel for rel, st in manifest.items() if st[0] != "link"
                      and any(glob_match(rel, p) for p in patterns))
    wanted = [rel for rel in matching if manifest[rel][0] != "unreadable"]
    # What we may not read is named, not fatal: the rest is gathered.
    skipped = [GatheredFile(rel, "", manifest[rel][1], "unreadable")
               for rel in matching if manifest[rel][0] == "unreadable"]
    skipped += [GatheredFile(rel, "", 0, "unreadable") for rel in denied]
    if not wanted:
        return skipped
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalError(f"{root}: cannot create the gather directory: "
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


def _stream_openssh(c, cmd: str, sink, stdin: bytes = b"") -> tuple[int, str]:
    """Run ``cmd`` through the local OpenSSH client (:func:`ssh_command_for`: the same
    route, key, host-key checks and deadlines as our own connection) and feed its stdout
    to ``sink``: OpenSSH's C packet loop moves bulk bytes several times faster than
    Paramiko's; ``stdin`` is written to the command's stdin (then end-of-file).
    ``(exit code, stderr)``; 255 is OpenSSH's own failure."""
    try:
        proc, errors, drain = start_openssh(
            c, cmd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE)
    except OSError as exc:
        return 255, f"cannot run ssh: {exc}"
    if stdin:
        def feed() -> None:
            with contextlib.suppress(OSError):
                proc.stdin.write(stdin)
                proc.stdin.close()
        threading.Thread(target=feed, daemon=True, name="fabfleet-ssh-stdin").start()
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
    write problem is a LocalError naming the path (not a connection error). With
    ``background`` (a big file) the writes and the hashing happen in a thread of their
    own (both let go of the GIL), overlapping the reading of the stream."""

    def __init__(self, path: Path, background: bool = False) -> None:
        self.path = path
        self.hash = hashlib.sha256()
        self.size = 0
        self.error: LocalError | None = None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self.f = os.fdopen(fd, "wb")
        except OSError as exc:
            raise LocalError(f"{path}: cannot write: {exc.strerror or exc}") from None
        self.blocks: queue.Queue | None = None
        if background:
            self.blocks = queue.Queue(32)
            self.thread = threading.Thread(target=self._drain, daemon=True,
                                           name="fabfleet-gather-write")
            self.thread.start()

    def _drain(self) -> None:
        while True:
            block = self.blocks.get()
            if block is None:
                return
            if self.error is None:
                try:
                    self._put(block)
                except LocalError as exc:
                    self.error = exc

    def _put(self, data) -> None:
        try:
            self.f.write(data)
        except OSError as exc:
            raise LocalError(f"{self.path}: cannot write: {exc.strerror or exc}") from None
        self.hash.update(data)

    def write(self, data) -> int:
        if self.error is not None:
            raise self.error
        if self.blocks is not None:
            self.blocks.put(data)
        else:
            self._put(data)
        self.size += len(data)
        return len(data)

    def hexdigest(self) -> str:
        return self.hash.hexdigest()

    def __enter__(self):
        return self

    def close(self) -> None:
        if self.blocks is not None:
            self.blocks.put(None)
            self.thread.join()
            self.blocks = None
        if self.f.closed:
            return
        try:
            self.f.close()
        except OSError as err:
            raise LocalError(f"{self.path}: cannot write: {err.strerror or err}") from None
        if self.error is not None:
            raise self.error

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
