"""Push: sync a local tree into a directory on a host, only what changed.

One round trip lists the remote tree (and which of rsync and tar the host has); files
whose size and mtime already match are not sent. What changed goes by rsync when both
ends have it (over an OpenSSH subprocess with fabfleet's own host-key checks), else as
one tar stream over the connection, else file by file over SFTP. Every path lands
whole or not at all: under a temporary name unique to the transfer, renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


from ..config.deadlines import TREE_COMMAND, deadlines
from ..errors import LocalError, TransferError, host_errors
from ..ssh import shell
from ..ssh.connect import sftp_client, sftp_makedirs, ssh_command_for, start_openssh
from ..hostside import renamer
from ..hostside.runner import MARKER
from ..ssh.exec import execute, send_all, start_command
from ..ssh.launch import source
from ..ssh.shell import Remote
from ..ssh.liveness import watched
from .files import (FIND_LISTING, LocalFile, Progress, local_files, parse_find_listing,
                    sftp_manifest, unreadable_entries, unreadable_warning)

# -- push ------------------------------------------------------------------------------
METHODS = ("auto", "rsync", "tar", "sftp")


@dataclass
class PushResult:
    host: str
    method: str            # "rsync", "tar" or "sftp"
    files_sent: int
    bytes_sent: int
    files_total: int
    remote_dir: str
    seconds: float = 0.0
    #: what could not be read on the host (left as it was), and what was replaced
    warnings: tuple[str, ...] = ()


def state_script(remote_dir: str) -> str:
    """The listing's shell text (see :func:`remote_state`): the runner runs it too, when
    a run finds its project out of date (:func:`expectation`)."""
    d = shell.path(remote_dir)
    return (f"umask 077 && mkdir -p -- {d} && cd -- {d} || exit 4; "
            f"head -c 4000 {MARKER} 2>/dev/null | tr -d '\\n'; echo; "
            "for t in rsync tar; do command -v $t >/dev/null 2>&1 && printf '%s ' $t; "
            f"done; echo; {FIND_LISTING}")


def remote_state(c, remote_dir: str
                 ) -> tuple[dict | None, set[str], dict[str, tuple], list[str]]:
    """One round trip: create ``remote_dir``, say which of rsync and tar the host has,
    and list what is already there (see :func:`remote_manifest`); entries that could not
    be read (another user's, root's) come back as warnings naming them. First of all, the
    project marker found there (``None``: none)."""
    result = execute(c, shell.sh(state_script(remote_dir)), timeout=TREE_COMMAND,
                     action=f"list files in {remote_dir}")
    return parse_state(c, remote_dir, result.exit_code, result.stdout_bytes, result.stderr)


def parse_state(c, remote_dir: str, exit_code: int, stdout: bytes, stderr: str
                ) -> tuple[dict | None, set[str], dict[str, tuple], list[str]]:
    """:func:`state_script`'s output, however it was run, as :func:`remote_state` says."""
    if exit_code == 4:
        full = "No space left" in stderr
        raise TransferError(c.fleet_host.name, f"could not create {remote_dir}: "
                            f"{stderr.strip() or stdout.decode(errors='replace').strip()}. "
                            + ("The host's disk is full." if full else "Check that `work_dir` "
                               "in the inventory is writable for the user."))
    mark, _, rest = stdout.partition(b"\n")
    first, _, listing = rest.partition(b"\n")
    tools = set(first.decode(errors="replace").split())
    try:
        marker = json.loads(mark) if mark.strip() else None
    except ValueError:
        marker = {"id": "?", "from": "an unreadable marker"}
    denied = unreadable_entries(stderr)
    manifest = parse_find_listing(listing)
    if exit_code != 0 and denied is None:  # no find -printf: SFTP
        denied = []
        manifest = sftp_manifest(c, remote_dir, denied)
    manifest.pop(MARKER, None)
    return (marker if isinstance(marker, dict) else None, tools, manifest,
            [unreadable_warning(remote_dir, denied)] if denied else [])


def expectation(files: Sequence[LocalFile], identity: dict[str, str], remote_dir: str
                ) -> dict:
    """What a run checks first on the host (``spec["expect"]``) so that an unchanged
    project costs no listing round trip of its own: this project's marker there, and
    every file of the push as the listing would show it if unchanged. If anything
    differs, the runner runs :func:`state_script` instead and nothing else."""
    return {"dir": remote_dir, "id": identity["id"],
            "files": [[f.rel, list(f.state())] for f in files],
            "listing": state_script(remote_dir)}


def check_marker(host: str, remote_dir: str, marker: dict | None,
                 identity: dict[str, str]) -> None:
    """Refuse to push into a directory another project with the same name filled."""
    if marker is None or marker.get("id") == identity["id"]:
        return
    raise TransferError(host, f"{remote_dir} holds another project of the same name (pushed "
                        f"from {marker.get('from', 'elsewhere')}); this one is "
                        f"{identity['from']}. Nothing was pushed. Give this project its own "
                        "name on the hosts (`fabfleet: {project: NAME}` in its invoke.yaml), "
                        "or, if it is the same project moved, remove the old copy first: "
                        "`fabfleet clean --code --force`.")


def _write_marker(c, remote_dir: str, identity: dict[str, str]) -> None:
    """The marker that tells this project from others of its name (stdin, then renamed)."""
    d = shell.path(remote_dir)
    data = json.dumps({**identity, "at": time.time()}).encode()
    done = execute(c, Remote(shell.sh(f"cd -- {d} && umask 077 && cat > {MARKER}.tmp && "
                                      f"mv -f -- {MARKER}.tmp {MARKER}"), data),
                   timeout=TREE_COMMAND, action=f"mark {remote_dir} as this project's")
    if done.exit_code != 0:
        raise TransferError(c.fleet_host.name, f"could not write {remote_dir}/{MARKER}: "
                            f"{done.stderr.strip()[-300:]}")


def in_the_way(files: Sequence[LocalFile], manifest: dict[str, tuple]) -> list[str]:
    """Remote files or symlinks where the local tree has a directory (pure): they are
    replaced, as rsync does — never written through (a link's target lies outside the
    project)."""
    parents = {rel for f in files for rel in _parents(f.rel)}
    return sorted(p for p in parents if p in manifest)


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")[:-1]
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _replace(c, remote_dir: str, paths: list[str]) -> str:
    """Remove the files or links in the way of local directories; the warning."""
    cmd = shell.sh(f"cd -- {shell.path(remote_dir)} && rm -f -- "
                   + " ".join(shell.q("./" + p) for p in paths))
    done = execute(c, cmd, timeout=TREE_COMMAND, action=f"replace links in {remote_dir}")
    if done.exit_code != 0:
        raise TransferError(c.fleet_host.name, f"could not remove {', '.join(paths[:5])} in "
                            f"{remote_dir} (a file or link where the project has a directory):"
                            f" {done.stderr.strip()[-300:]}. Nothing was pushed.")
    return (f"replaced {', '.join(paths[:5])}{' …' if len(paths) > 5 else ''} in {remote_dir}: "
            "a file or symlink on the host where the project has a directory")


def push(c, local_dir: str | os.PathLike[str], remote_dir: str, *,
         excludes: Sequence[str] = (), method: str = "auto",
         on_progress: Progress | None = None,
         files: Sequence[LocalFile] | None = None,
         identity: dict[str, str] | None = None,
         state: tuple | None = None) -> PushResult:
    """Sync ``local_dir`` into ``remote_dir`` on the host; return what was sent.

    ``method`` is ``"auto"`` (rsync when both ends have it, else a tar stream when the
    host has tar, else SFTP), or one of ``"rsync"``, ``"tar"``, ``"sftp"`` to force it.
    One round trip lists the remote tree first; files whose size and mtime already match
    are not sent, so an unchanged tree costs that round trip alone. ``files`` is
    :func:`local_files`' answer when the caller already has it. Remote files not in the
    local tree are left alone (runs write results into the project).

    ``identity`` (a project's, :func:`~fabfleet.config.settings.project_identity`): the
    first push leaves it in ``remote_dir`` as a marker, and a push of another project
    into the same directory is refused. ``state``: :func:`remote_state`'s answer when
    the caller already has it (a run that found its project stale brings it back).
    """
    if method not in METHODS:
        raise LocalError(f"push method {method!r}: expected {', '.join(METHODS[:-1])} or "
                         f"{METHODS[-1]}")
    started = time.monotonic()
    files = list(files) if files is not None else \
        local_files(local_dir, excludes, never=[c.fleet_host.key_file])
    marker, tools, manifest, warnings = state if state is not None else \
        remote_state(c, remote_dir)
    warnings = list(warnings)
    if identity is not None:
        check_marker(c.fleet_host.name, remote_dir, marker, identity)
    if method == "auto":
        method = "rsync" if "rsync" in tools and shutil.which("rsync") is not None else \
            "tar" if "tar" in tools else "sftp"
    changed = [f for f in files if manifest.get(f.rel) != f.state()]
    blocking = in_the_way(changed, manifest)
    if blocking:
        warnings.append(_replace(c, remote_dir, blocking))
    if not changed:
        result = PushResult(c.fleet_host.name, method, 0, 0, len(files), remote_dir)
    else:
        send = {"rsync": _push_rsync, "tar": _push_tar, "sftp": _push_sftp}[method]
        result = send(c, Path(local_dir), remote_dir, changed, on_progress)
    if identity is not None and marker is None:
        _write_marker(c, remote_dir, identity)
    result.warnings = tuple(warnings)
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
            f"--timeout={deadlines(c.fleet_host).rsync_io}",
            "-e", shell.join(ssh_command_for(c)), f"{local}/", target]
    listing = b"\0".join(os.fsencode(f.rel) for f in files) + (b"\0" if files else b"")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        raise LocalError(f"cannot run rsync: {exc}; install rsync or use --method sftp") from exc
    # stderr drained and stdin fed beside the stdout loop: a pipe's worth of rsync errors
    # (or an rsync that exits before reading its file list) never blocks us.
    errors = bytearray()
    drain = threading.Thread(target=lambda: errors.extend(proc.stderr.read()), daemon=True)
    drain.start()

    def feed() -> None:
        with contextlib.suppress(OSError):  # rsync ended early: its own message says why
            proc.stdin.write(listing)
            proc.stdin.close()
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
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
    code = proc.wait()
    drain.join(10)
    feeder.join(1)
    stderr = errors.decode(errors="replace")
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
    """Send ``files`` as one tar stream over the SSH connection (hosts without rsync; from
    :data:`BULK` bytes through the laptop's ``ssh`` when it has one): each lands under a temporary name unique to this transfer, and only when the whole
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
    def write_tar(sink) -> None:
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
    with watched(c, f"push to {remote_dir}"), host_errors(host, f"push to {remote_dir}"):
        if total >= BULK and shutil.which("ssh") is not None:
            code, err = _tar_through_openssh(c, extract, write_tar, progress)
        else:
            code, err = _tar_over_channel(c, extract, write_tar, progress)
    # Renamed into place only now; a failed stream leaves only temporary names (removed).
    # Every rename counts (not only the last); whatever is left under a temporary name
    # after a failure is removed.
    pattern = shell.q(tag + "*")
    # One process renames them all where the host has Python (1000 files: 20 ms, where
    # one `mv` each takes 1.5 s); else one `mv -T` per file.
    moves = shell.q(f's=0; for f do b=${{f##*/}}; mv -fT -- "$f" "${{f%/*}}/${{b#{tag}}}" '
                    '|| s=1; done; exit $s')
    rename = (f"if command -v python3 >/dev/null 2>&1; then find . -name {pattern} -print0 | "
              f"python3 -I -S -c {shell.q(source(renamer))} {shell.q(tag)}; else find . -name "
              f"{pattern} -exec sh -c {moves} sh {{}} +; fi")
    remove = f"find . -name {pattern} -exec rm -f -- {{}} +"
    cleanup = (f"cd -- {d} && {{ {rename} || {{ {remove}; exit 1; }}; }}" if code == 0
               else f"cd -- {d} && {remove}")
    done = execute(c, shell.sh(cleanup), timeout=TREE_COMMAND, action="put pushed files in place")
    if code != 0 or done.exit_code != 0:
        message = (err.decode("utf-8", "replace") or done.stderr).strip()[-800:]
        full = "No space left" in message
        raise TransferError(host, f"unpacking the push in {remote_dir} failed (exit {code}): "
                            f"{message}. " + ("The host's disk is full; nothing was put in "
                                             "place." if full else "Nothing was put in place."))
    if on_progress:
        on_progress(total, total)
    return PushResult(host, "tar", len(files), total, len(files), remote_dir)


#: Pushes of at least this many bytes (to a host without rsync) stream the tar through
#: the laptop's OpenSSH when it has one: its C packet loop moves bulk bytes several times
#: faster than Paramiko's; the same route, key and host-key checks (ssh_command_for).
BULK = 4 << 20


def _tar_over_channel(c, extract: str, write_tar, progress) -> tuple[int, bytearray]:
    chan = c.client.get_transport().open_session(timeout=deadlines(c.fleet_host).handshake)
    start_command(chan, extract)
    write_tar(_ChannelWriter(chan, progress))
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
    return code, err


def _tar_through_openssh(c, extract: str, write_tar, progress) -> tuple[int, bytearray]:
    """The tar stream into ``extract`` run by the local ``ssh`` (see :data:`BULK`)."""
    try:
        proc, err, drain = start_openssh(c, extract, stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL)
    except OSError:  # no usable ssh after all: the connection we have
        return _tar_over_channel(c, extract, write_tar, progress)
    try:
        write_tar(_PipeWriter(proc.stdin, progress))
        proc.stdin.close()
    except BrokenPipeError:
        pass  # ssh or tar ended early: its exit code and stderr say why
    except BaseException:
        proc.kill()
        raise
    finally:
        code = proc.wait()
        drain.join(10)
    if code == 255 and not err:
        raise EOFError("the connection closed before the push stream was unpacked")
    return code, err


class _PipeWriter:
    """tarfile's sink over a pipe to a local ``ssh``."""

    def __init__(self, pipe, on_sent: Callable[[int], None]) -> None:
        self.pipe, self.on_sent = pipe, on_sent

    def write(self, data: bytes) -> int:
        self.pipe.write(data)
        self.on_sent(len(data))
        return len(data)


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
                sftp_makedirs(sftp, parent)
                made.add(parent)
            tmp = os.fsencode(posixpath.join(parent, f".fabfleet-tmp.{tag}."
                                             f"{posixpath.basename(target)}"))
            if f.link is not None:
                sftp.symlink(os.fsencode(f.link), tmp)
                try:
                    _rename(sftp, tmp, target, f.rel, host)
                except BaseException:
                    with contextlib.suppress(Exception):
                        sftp.remove(tmp)
                    raise
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
                _rename(sftp, tmp, target, f.rel, host)
            except BaseException:
                with contextlib.suppress(Exception):
                    sftp.remove(tmp)
                raise
            done += f.size
    if on_progress:
        on_progress(total, total)
    return PushResult(host, "sftp", len(changed), total, len(files), remote_dir)


def _rename(sftp, tmp: bytes, target: str, rel: str, host: str) -> None:
    """Put one pushed file in place; a refusal by the host (a directory of that name,
    permissions) fails the push naming the file, not as a lost connection."""
    try:
        sftp.posix_rename(tmp, os.fsencode(target))
    except OSError as exc:
        if isinstance(exc, (ConnectionError, TimeoutError)):
            raise
        raise TransferError(host, f"could not put {rel} in place on the host ({exc}): is "
                            "there a directory, or a file you may not replace, of that name? "
                            "The files before it were pushed; nothing was half-written."
                            ) from exc


@contextlib.contextmanager
def _open_local(path: Path):
    """A local file to send; a local problem is a LocalError naming the path."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise LocalError(f"{path}: cannot read it to push: {exc.strerror or exc}") from None
    with f:
        yield f
