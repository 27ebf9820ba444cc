"""Moving files: push a project to a host (rsync or SFTP), gather results back.

Both push paths send the same file list, computed here from the local tree with the
excludes applied (``.git/``, ``__pycache__/``, ``.gitignore`` entries, user patterns),
so rsync and SFTP hosts end up identical. The SFTP path compares size and mtime with
the remote tree and sends only changed files, each written to a temporary name and
renamed, so a host never sees a half-written file.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fnmatch
import hashlib
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
import threading
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import shell
from .errors import LocalError, TransferError, host_errors
from .connection import KEEPALIVE_INTERVAL, watched
from .execute import execute, send_all

# /gathered/ is where gather and run-remote put what comes back: never send it out again.
ALWAYS_EXCLUDED = (".git/", "__pycache__/", "*.pyc", ".fabfleet-tmp*", "/gathered/", "/.venv/")
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


# -- which files ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rule:
    pattern: str
    base: str  # directory (relative, posix) of the .gitignore that holds it
    negate: bool
    dir_only: bool
    anchored: bool


def _rules(lines: Iterable[str], base: str = "") -> list[_Rule]:
    """Parse .gitignore-style lines (the common subset: globs, ``/``, ``!``, ``**``)."""
    rules = []
    for line in lines:
        line = line.rstrip("\n").rstrip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = line[1:] if negate else line
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        anchored = "/" in line
        rules.append(_Rule(line.lstrip("/"), base, negate, dir_only, anchored))
    return rules


def _matches(rule: _Rule, rel: str, is_dir: bool) -> bool:
    if rule.dir_only and not is_dir:
        return False
    if rule.base:
        if not rel.startswith(rule.base + "/"):
            return False
        rel = rel[len(rule.base) + 1:]
    if rule.anchored:
        pat = rule.pattern
        return fnmatch.fnmatchcase(rel, pat) or (pat.startswith("**/") and
                                                 fnmatch.fnmatchcase(rel, pat[3:]))
    return fnmatch.fnmatchcase(posixpath.basename(rel), rule.pattern)


def _ignored(rules: Sequence[_Rule], rel: str, is_dir: bool) -> bool:
    result = False
    for rule in rules:  # last match wins, as in git
        if _matches(rule, rel, is_dir):
            result = not rule.negate
    return result


@dataclass(frozen=True)
class LocalFile:
    rel: str      # posix path relative to the root
    size: int
    mtime: int    # whole seconds: what SFTP and `find` agree on
    mode: int
    link: str | None = None  # a symlink's target: sent as a link, never its content

    def state(self) -> tuple:
        """What the remote listing shows when the host has this file as it is here."""
        return ("link", self.link) if self.link is not None else (self.size, self.mtime)


def local_files(root: str | os.PathLike[str], excludes: Sequence[str] = ()) -> list[LocalFile]:
    """The files under ``root`` that a push sends, sorted, with excludes applied."""
    root = Path(root)
    if not root.is_dir():
        raise LocalError(f"{root}: not a directory; push sends a project directory")
    rules = _rules(ALWAYS_EXCLUDED) + _rules(excludes)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        reldir = Path(dirpath).relative_to(root).as_posix()
        reldir = "" if reldir == "." else reldir
        gi = Path(dirpath) / ".gitignore"
        if gi.is_file():
            rules = rules + _rules(gi.read_text(errors="replace").splitlines(), reldir)
        keep = []
        for d in sorted(dirnames):
            rel = f"{reldir}/{d}" if reldir else d
            if _ignored(rules, rel, True):
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                filenames.append(d)  # a link to a directory is sent as a link
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            rel = f"{reldir}/{f}" if reldir else f
            full = os.path.join(dirpath, f)
            if _ignored(rules, rel, False):
                continue
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                # Sent as a link (as rsync -l does): a link pointing outside the tree
                # never carries its target's content to the host.
                target = os.readlink(full)
                out.append(LocalFile(rel, len(os.fsencode(target)), int(st.st_mtime), 0o777,
                                     link=target))
            elif stat.S_ISREG(st.st_mode):
                out.append(LocalFile(rel, st.st_size, int(st.st_mtime),
                                     stat.S_IMODE(st.st_mode)))
    out.sort(key=lambda f: f.rel)
    return out


# -- remote tree listing ----------------------------------------------------------------
FIND_LISTING = "find . \\( -type f -o -type l \\) -printf '%P\\0%y\\0%s\\0%T@\\0%l\\0'"


def remote_manifest(c, directory: str) -> dict[str, tuple]:
    """``{rel: (size, mtime)}`` of the files under a remote directory, ``{rel: ("link",
    target)}`` for its symlinks (``{}`` if it does not exist).

    One ``find -printf`` round trip, NUL-separated so any byte in a name survives
    (undecodable bytes come back as :func:`os.fsdecode` does); falls back to SFTP.
    """
    cmd = shell.sh(f"cd -- {shell.path(directory)} 2>/dev/null || exit 0; {FIND_LISTING}")
    result = execute(c, cmd, timeout=300, action=f"list files in {directory}")
    if result.exit_code == 0:
        return parse_find_listing(result.stdout_bytes)
    return _sftp_manifest(c, directory)


def _sftp_manifest(c, directory: str) -> dict[str, tuple[int, int]]:
    host = c.fleet_host.name
    manifest: dict[str, tuple] = {}
    with watched(c, f"list {directory}"), host_errors(host, f"list {directory} over SFTP"):
        sftp = sftp_client(c)
        top = shell.home_relative(directory)
        stack = [""]
        while stack:
            rel = stack.pop()
            try:
                entries = sftp.listdir_attr(posixpath.join(top, rel) if rel else top)
            except FileNotFoundError:
                continue
            for e in entries:
                r = f"{rel}/{e.filename}" if rel else e.filename
                if stat.S_ISDIR(e.st_mode):
                    stack.append(r)
                elif stat.S_ISLNK(e.st_mode):
                    manifest[r] = ("link", sftp.readlink(posixpath.join(top, r)))
                elif stat.S_ISREG(e.st_mode):
                    manifest[r] = (e.st_size, int(e.st_mtime))
    return manifest


# -- push ------------------------------------------------------------------------------
@dataclass
class PushResult:
    host: str
    method: str            # "rsync" or "sftp"
    files_sent: int
    bytes_sent: int
    files_total: int
    remote_dir: str
    seconds: float = 0.0


def _remote_state(c, remote_dir: str) -> tuple[set[str], dict[str, tuple]]:
    """One round trip: create ``remote_dir``, say which of rsync and tar the host has,
    and list what is already there (see :func:`remote_manifest`)."""
    d = shell.path(remote_dir)
    cmd = shell.sh(f"mkdir -p -- {d} && cd -- {d} || exit 1; "
                   "for t in rsync tar; do command -v $t >/dev/null 2>&1 && printf '%s ' $t; "
                   f"done; echo; {FIND_LISTING} || exit 3")
    result = execute(c, cmd, timeout=300, action=f"list files in {remote_dir}")
    if result.exit_code == 1:
        full = "No space left" in result.stderr
        raise TransferError(c.fleet_host.name, f"could not create {remote_dir}: "
                            f"{result.stderr.strip() or result.stdout.strip()}. "
                            + ("The host's disk is full." if full else "Check that `work_dir` "
                               "in the inventory is writable for the user."))
    first, _, listing = result.stdout_bytes.partition(b"\n")
    tools = set(first.decode(errors="replace").split())
    if result.exit_code != 0:
        return tools, _sftp_manifest(c, remote_dir)
    return tools, parse_find_listing(listing)


def parse_find_listing(data: bytes) -> dict[str, tuple]:
    """:data:`FIND_LISTING` output → ``{rel: (size, whole-second mtime)}`` for files and
    ``{rel: ("link", target)}`` for symlinks; names via :func:`os.fsdecode`."""
    parts = data.split(b"\0")
    manifest: dict[str, tuple] = {}
    for i in range(0, len(parts) - 4, 5):
        name, kind, size, mtime, target = parts[i:i + 5]
        try:
            if kind == b"l":
                manifest[os.fsdecode(name)] = ("link", os.fsdecode(target))
            else:
                manifest[os.fsdecode(name)] = (int(size), int(float(mtime)))
        except ValueError:
            continue
    return manifest


def sftp_client(c):
    """The connection's SFTP client, with a per-operation timeout: a host that stops
    answering fails the transfer instead of hanging it."""
    sftp = c.sftp()
    sftp.get_channel().settimeout(sftp_timeout(c.fleet_host))
    return sftp


def sftp_timeout(host) -> float:
    return KEEPALIVE_INTERVAL + 2 * host.connect_timeout


def ssh_command_for(c) -> list[str]:
    """An OpenSSH command line with the connection's settings (for rsync ``-e``).

    Same user, port, key, timeout and host-key checks as fabfleet's own connections:
    the same known_hosts files, and ``StrictHostKeyChecking`` per the host's policy.
    """
    host = c.fleet_host
    argv = ["ssh", "-p", str(c.port), "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, int(host.connect_timeout))}",
            # liveness: a host that stops answering ends ssh (and rsync) within
            # KEEPALIVE_INTERVAL * 2 + a probe, instead of hanging forever
            "-o", f"ServerAliveInterval={int(KEEPALIVE_INTERVAL)}", "-o", "ServerAliveCountMax=2",
            "-o", "UserKnownHostsFile=" + " ".join(c.known_hosts_files),
            "-o", "StrictHostKeyChecking=" + ("accept-new" if host.host_key_policy ==
                                              "accept-new" else "yes")]
    ssh_config = os.environ.get("FABFLEET_SSH_CONFIG")
    if ssh_config:
        argv += ["-F", os.path.expanduser(ssh_config)]
    for key in c.connect_kwargs.get("key_filename") or []:
        argv += ["-i", key]
    if c.user:
        argv += ["-l", c.user]
    return argv


def push(c, local_dir: str | os.PathLike[str], remote_dir: str, *,
         excludes: Sequence[str] = (), method: str = "auto",
         on_progress: Progress | None = None,
         files: Sequence[LocalFile] | None = None) -> PushResult:
    """Sync ``local_dir`` into ``remote_dir`` on the host; return what was sent.

    ``method`` is ``"auto"`` (rsync when both ends have it, else SFTP), ``"rsync"`` or
    ``"sftp"``. One round trip lists the remote tree first; files whose size and mtime
    already match are not sent, so an unchanged tree costs that round trip alone.
    ``files`` is :func:`local_files`' answer when the caller already has it. Remote
    files not in the local tree are left alone (runs write results into the project).
    """
    if method not in ("auto", "rsync", "sftp"):
        raise LocalError(f"push method {method!r}: expected auto, rsync or sftp")
    started = time.monotonic()
    files = list(files) if files is not None else local_files(local_dir, excludes)
    tools, manifest = _remote_state(c, remote_dir)
    use_rsync = method == "rsync" or (method == "auto" and "rsync" in tools
                                      and shutil.which("rsync") is not None)
    changed = [f for f in files if manifest.get(f.rel) != f.state()]
    if not changed:
        result = PushResult(c.fleet_host.name, "rsync" if use_rsync else "sftp", 0, 0,
                            len(files), remote_dir)
    elif use_rsync:
        result = _push_rsync(c, Path(local_dir), remote_dir, changed, on_progress)
    elif "tar" in tools:
        result = _push_tar(c, Path(local_dir), remote_dir, changed, on_progress)
    else:
        result = _push_sftp(c, Path(local_dir), remote_dir, changed, on_progress)
    result.files_total = len(files)
    result.seconds = time.monotonic() - started
    return result


def _push_rsync(c, local: Path, remote_dir: str, files: list[LocalFile],
                on_progress: Progress | None) -> PushResult:
    host = c.fleet_host.name
    total = sum(f.size for f in files)
    # -s (--protect-args) sends the path inside rsync's protocol, not through the remote
    # shell, so it needs no quoting; a relative path is relative to the remote home.
    rpath = shell.home_relative(remote_dir)
    addr = f"[{c.host}]" if ":" in c.host else c.host  # IPv6 literal
    target = f"{addr}:{rpath}"
    argv = ["rsync", "-s", "-rlt", "--perms", "--chmod=Du=rwx,Dgo=,Fgo=", "--files-from=-",
            "--from0", "--stats", "--info=progress2", "--no-inc-recursive",
            f"--timeout={int(sftp_timeout(c.fleet_host)) + 30}",
            "-e", shell.join(ssh_command_for(c)), f"{local}/", target]
    listing = b"\0".join(os.fsencode(f.rel) for f in files) + (b"\0" if files else b"")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        raise LocalError(f"cannot run rsync: {exc}; install rsync or use --method sftp") from exc
    proc.stdin.write(listing)
    proc.stdin.close()
    stdout_lines = []
    buf = b""
    while True:
        chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            stdout_lines.append(text)
            parts = text.split()
            if on_progress and len(parts) >= 2 and parts[1].endswith("%"):
                try:
                    on_progress(int(parts[0].replace(",", "")), total)
                except ValueError:
                    pass
    stderr = proc.stderr.read().decode(errors="replace")
    code = proc.wait()
    if code != 0:
        raise TransferError(host, f"rsync to {target} exited {code}: {stderr.strip()[-800:]}. "
                            "Check that `ssh` to the host works with the same key, or push "
                            "with --method sftp.")
    stats = _parse_rsync_stats("\n".join(stdout_lines))
    if on_progress:
        on_progress(total, total)
    return PushResult(host, "rsync", stats.get("files", 0), stats.get("bytes", 0), len(files),
                      remote_dir)


def _parse_rsync_stats(text: str) -> dict[str, int]:
    """``--stats`` output → files and bytes actually sent (pure; tested on a sample)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        number = value.strip().split(" ")[0].replace(",", "")
        if not number.isdigit():
            continue
        if key.strip() == "Number of regular files transferred":
            out["files"] = int(number)
        elif key.strip() == "Total bytes sent":
            out["bytes"] = int(number)
    return out


def _push_tar(c, local: Path, remote_dir: str, files: list[LocalFile],
              on_progress: Progress | None) -> PushResult:
    """Send ``files`` as one tar stream over the SSH connection (hosts without rsync):
    each lands under a temporary name unique to this transfer, and only when the whole
    stream has arrived are they renamed into place (``mv -T``: one rename each) — as
    atomic per file as the SFTP path, without a round trip per file."""
    host = c.fleet_host.name
    tag = f".fabfleet-tmp.{os.getpid()}-{secrets.token_hex(4)}."
    total = sum(f.size for f in files if f.link is None)
    d = shell.path(remote_dir)
    extract = shell.sh(f"umask 077 && mkdir -p -- {d} && cd -- {d} && tar -x -p -f -")
    sent = [0]

    def progress(n: int) -> None:
        sent[0] += n
        if on_progress:
            on_progress(min(sent[0], total), total)
    with watched(c, f"push to {remote_dir}"), host_errors(host, f"push to {remote_dir}"):
        chan = c.client.get_transport().open_session(timeout=c.fleet_host.connect_timeout)
        chan.exec_command(extract)
        sink = _ChannelWriter(chan, progress)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for f in files:
                parent, _, name = f.rel.rpartition("/")
                info = tarfile.TarInfo(f"{parent}/{tag}{name}" if parent else tag + name)
                info.mtime = f.mtime
                if f.link is not None:
                    info.type, info.linkname, info.mode = tarfile.SYMTYPE, f.link, 0o777
                    tar.addfile(info)
                    continue
                info.size, info.mode = f.size, f.mode & 0o700
                with _open_local(local / f.rel) as src:
                    tar.addfile(info, src)
        chan.shutdown_write()
        err = bytearray()
        while not chan.exit_status_ready() or chan.recv_stderr_ready() or chan.recv_ready():
            if chan.recv_stderr_ready():
                err.extend(chan.recv_stderr(65536))
            elif chan.recv_ready():
                chan.recv(65536)
            else:
                chan.status_event.wait(0.2)
        code = chan.recv_exit_status()
        chan.close()
        if code == -1:  # closed without an exit status: the connection went away
            raise EOFError("the connection closed before the push stream was unpacked")
    # Renamed into place only now; a failed stream leaves only temporary names (removed).
    cleanup = (f"cd -- {d} && find . -name {shell.q(tag + '*')} -exec sh -c "
               + shell.q(f'for f do b=${{f##*/}}; mv -fT -- "$f" "${{f%/*}}/${{b#{tag}}}"; done'
                         if code == 0 else 'rm -f -- "$@"') + " sh {} +")
    done = execute(c, shell.sh(cleanup), timeout=300, action="put pushed files in place")
    if code != 0 or done.exit_code != 0:
        message = (err.decode("utf-8", "replace") or done.stderr).strip()[-800:]
        full = "No space left" in message
        raise TransferError(host, f"unpacking the push in {remote_dir} failed (exit {code}): "
                            f"{message}. " + ("The host's disk is full; nothing was put in "
                                             "place." if full else "Nothing was put in place."))
    if on_progress:
        on_progress(total, total)
    return PushResult(host, "sftp", len(files), total, len(files), remote_dir)


class _ChannelWriter:
    """A file-like sink over an SSH channel for tarfile's stream mode."""

    def __init__(self, chan, on_sent: Callable[[int], None]) -> None:
        self.chan = chan
        self.on_sent = on_sent

    def write(self, data: bytes) -> int:
        send_all(self.chan, data)
        self.on_sent(len(data))
        return len(data)


def _push_sftp(c, local: Path, remote_dir: str, files: list[LocalFile],
               on_progress: Progress | None) -> PushResult:
    """Send ``files`` over SFTP, each under a temporary name unique to this transfer
    (process and random), then renamed into place: a host never sees a half-written
    file, and two pushes at once never mix their contents in one file."""
    host = c.fleet_host.name
    changed = files
    total = sum(f.size for f in changed if f.link is None)
    done = 0
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    with watched(c, f"push to {remote_dir}"), host_errors(host, f"push to {remote_dir} over SFTP"):
        sftp = sftp_client(c)
        top = shell.home_relative(remote_dir)
        made: set[str] = set()
        for f in changed:
            target = posixpath.join(top, f.rel)
            parent = posixpath.dirname(target)
            if parent not in made:
                _sftp_makedirs(sftp, parent)
                made.add(parent)
            tmp = os.fsencode(posixpath.join(parent, f".fabfleet-tmp.{tag}."
                                             f"{posixpath.basename(target)}"))
            if f.link is not None:
                sftp.symlink(os.fsencode(f.link), tmp)
                sftp.posix_rename(tmp, os.fsencode(target))
                continue
            base = done

            def cb(sent: int, _total: int, base: int = base) -> None:
                if on_progress:
                    on_progress(base + sent, total)
            try:
                with _open_local(local / f.rel) as src:
                    sftp.putfo(src, tmp, file_size=f.size, callback=cb, confirm=True)
                sftp.chmod(tmp, f.mode & 0o700)
                sftp.utime(tmp, (f.mtime, f.mtime))
                sftp.posix_rename(tmp, os.fsencode(target))
            except BaseException:
                with contextlib.suppress(Exception):
                    sftp.remove(tmp)
                raise
            done += f.size
    if on_progress:
        on_progress(total, total)
    return PushResult(host, "sftp", len(changed), total, len(files), remote_dir)


@contextlib.contextmanager
def _open_local(path: Path):
    """A local file to send; a local problem is a LocalError naming the path."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise LocalError(f"{path}: cannot read it to push: {exc.strerror or exc}") from None
    with f:
        yield f


def _sftp_makedirs(sftp, path: str) -> None:
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


# -- gather ----------------------------------------------------------------------------
@dataclass
class GatheredFile:
    remote: str
    local: str
    size: int
    status: str  # "copied", "unchanged" (identical local copy), "conflict" (left alone),
    #              "refused" (its name would land outside the destination)


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
    :class:`~fabfile.errors.LocalError` naming the local path.
    """
    host = c.fleet_host.name
    manifest = remote_manifest(c, remote_dir)
    wanted = sorted(rel for rel, st in manifest.items() if st[0] != "link"
                    and any(_glob_match(rel, p) for p in patterns))
    if not wanted:
        return []
    root = Path(dest)
    try:
        root.mkdir(parents=True, exist_ok=True)
        root = root.resolve()
    except OSError as exc:
        raise LocalError(f"{dest}: cannot create the gather directory: "
                         f"{exc.strerror or exc}") from None
    out, safe = [], []
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
                                        for rel, _, _, w in copied[i:i + 2000]])
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


def _stream(c, remote_dir: str, files: list[tuple[str, int, _HashingWriter]]) -> None:
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
    result = execute(c, cmd, timeout=None, keep=False, on_stdout=split,
                     action=f"copy {len(files)} files from {remote_dir}")
    for _, w in queue:
        w.close()
    if result.exit_code != 0:
        raise TransferError(host, f"reading the files in {remote_dir} failed (exit "
                            f"{result.exit_code}): {result.stderr.strip()[-500:]}. gather "
                            "again once the run has finished writing them.")


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
        result = execute(c, cmd, timeout=600, action="checksum files to gather")
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
