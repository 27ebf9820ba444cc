"""Moving files: push a project to a host (rsync or SFTP), gather results back.

Both push paths send the same file list, computed here from the local tree with the
excludes applied (``.git/``, ``__pycache__/``, ``.gitignore`` entries, user patterns),
so rsync and SFTP hosts end up identical. The SFTP path compares size and mtime with
the remote tree and sends only changed files, each written to a temporary name and
renamed, so a host never sees a half-written file.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import shell
from .errors import LocalError, TransferError, host_errors
from .execute import execute

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
            if not _ignored(rules, rel, True) and not os.path.islink(os.path.join(dirpath, d)):
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            rel = f"{reldir}/{f}" if reldir else f
            full = os.path.join(dirpath, f)
            if _ignored(rules, rel, False) or not os.path.isfile(full):
                continue
            st = os.stat(full)
            out.append(LocalFile(rel, st.st_size, int(st.st_mtime), stat.S_IMODE(st.st_mode)))
    return out


# -- remote tree listing ----------------------------------------------------------------
def remote_manifest(c, directory: str) -> dict[str, tuple[int, int]]:
    """``{rel: (size, mtime)}`` of the files under a remote directory (``{}`` if absent).

    One ``find -printf`` round trip (GNU find); falls back to walking over SFTP.
    """
    cmd = shell.sh(f"cd {shell.path(directory)} 2>/dev/null || exit 0; "
                   "find . -type f -printf '%P\\t%s\\t%T@\\n'")
    result = execute(c, cmd, timeout=300, action=f"list files in {directory}")
    if result.exit_code == 0:
        manifest = {}
        for line in result.stdout.splitlines():
            parts = line.rsplit("\t", 2)
            if len(parts) == 3:
                manifest[parts[0]] = (int(parts[1]), int(float(parts[2])))
        return manifest
    return _sftp_manifest(c, directory)


def _sftp_manifest(c, directory: str) -> dict[str, tuple[int, int]]:
    host = c.fleet_host.name
    manifest: dict[str, tuple[int, int]] = {}
    with host_errors(host, f"list {directory} over SFTP"):
        sftp = c.sftp()
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


def _remote_state(c, remote_dir: str) -> tuple[bool, dict[str, tuple[int, int]]]:
    """One round trip: create ``remote_dir``, say whether the host has rsync, and list
    the files already there (``{rel: (size, mtime)}``; GNU find, else SFTP)."""
    d = shell.path(remote_dir)
    cmd = shell.sh(f"mkdir -p -- {d} && cd -- {d} || exit 1; "
                   "if command -v rsync >/dev/null 2>&1; then echo rsync; else echo none; fi; "
                   "find . -type f -printf '%P\\0%s\\0%T@\\0' || exit 3")
    result = execute(c, cmd, timeout=300, action=f"list files in {remote_dir}")
    if result.exit_code == 1:
        raise TransferError(c.fleet_host.name, f"could not create {remote_dir}: "
                            f"{result.stderr.strip() or result.stdout.strip()}. Check that "
                            "`work_dir` in the inventory is writable for the user.")
    first, _, listing = result.stdout.partition("\n")
    if result.exit_code != 0:
        return first.strip() == "rsync", _sftp_manifest(c, remote_dir)
    return first.strip() == "rsync", parse_find_listing(listing)


def parse_find_listing(text: str) -> dict[str, tuple[int, int]]:
    """``find -printf '%P\\0%s\\0%T@\\0'`` output → ``{rel: (size, whole-second mtime)}``
    (NUL-separated, so names with newlines survive)."""
    parts = text.split("\0")
    manifest = {}
    for i in range(0, len(parts) - 2, 3):
        try:
            manifest[parts[i]] = (int(parts[i + 1]), int(float(parts[i + 2])))
        except ValueError:
            continue
    return manifest


def ssh_command_for(c) -> list[str]:
    """An OpenSSH command line with the connection's settings (for rsync ``-e``).

    Same user, port, key, timeout and host-key checks as fabfleet's own connections:
    the same known_hosts files, and ``StrictHostKeyChecking`` per the host's policy.
    """
    host = c.fleet_host
    argv = ["ssh", "-p", str(c.port), "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, int(host.connect_timeout))}",
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
    remote_rsync, manifest = _remote_state(c, remote_dir)
    use_rsync = method == "rsync" or (method == "auto" and remote_rsync
                                      and shutil.which("rsync") is not None)
    changed = [f for f in files if manifest.get(f.rel) != (f.size, f.mtime)]
    if not changed:
        result = PushResult(c.fleet_host.name, "rsync" if use_rsync else "sftp", 0, 0,
                            len(files), remote_dir)
    elif use_rsync:
        result = _push_rsync(c, Path(local_dir), remote_dir, changed, on_progress)
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
            "-e", shell.join(ssh_command_for(c)), f"{local}/", target]
    listing = b"\0".join(f.rel.encode() for f in files) + (b"\0" if files else b"")
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


def _push_sftp(c, local: Path, remote_dir: str, files: list[LocalFile],
               on_progress: Progress | None) -> PushResult:
    host = c.fleet_host.name
    changed = files
    total = sum(f.size for f in changed)
    done = 0
    with host_errors(host, f"push to {remote_dir} over SFTP"):
        sftp = c.sftp()
        top = shell.home_relative(remote_dir)
        made: set[str] = set()
        for f in changed:
            target = posixpath.join(top, f.rel)
            parent = posixpath.dirname(target)
            if parent not in made:
                _sftp_makedirs(sftp, parent)
                made.add(parent)
            tmp = posixpath.join(parent, f".fabfleet-tmp.{posixpath.basename(target)}")
            base = done

            def cb(sent: int, _total: int, base: int = base) -> None:
                if on_progress:
                    on_progress(base + sent, total)
            sftp.put(str(local / f.rel), tmp, callback=cb, confirm=True)
            sftp.chmod(tmp, f.mode & 0o700)
            sftp.utime(tmp, (f.mtime, f.mtime))
            sftp.posix_rename(tmp, target)
            done += f.size
    if on_progress:
        on_progress(total, total)
    return PushResult(host, "sftp", len(changed), total, len(files), remote_dir)


def _sftp_makedirs(sftp, path: str) -> None:
    parts = []
    while path not in ("", ".", "/"):
        try:
            sftp.stat(path)
            break
        except FileNotFoundError:
            parts.append(path)
            path = posixpath.dirname(path)
    for p in reversed(parts):
        sftp.mkdir(p, mode=0o700)


# -- gather ----------------------------------------------------------------------------
@dataclass
class GatheredFile:
    remote: str
    local: str
    size: int
    status: str  # "copied", "unchanged" (identical local copy), "conflict" (left alone)


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

    Each file is verified by size and SHA-256 against the remote copy before it takes
    its place. An existing local file with other content is never overwritten unless
    ``overwrite``: it is reported as ``"conflict"``.
    """
    host = c.fleet_host.name
    manifest = remote_manifest(c, remote_dir)
    wanted = sorted(rel for rel in manifest if any(_glob_match(rel, p) for p in patterns))
    if not wanted:
        return []
    sums = _remote_sha256(c, remote_dir, wanted)
    out = []
    with host_errors(host, f"gather from {remote_dir}"):
        sftp = c.sftp()
        top = shell.home_relative(remote_dir)
        for rel in wanted:
            local = Path(dest) / rel
            size = manifest[rel][0]
            if local.exists():
                if local.stat().st_size == size and _sha256(local) == sums[rel]:
                    out.append(GatheredFile(rel, str(local), size, "unchanged"))
                    continue
                if not overwrite:
                    out.append(GatheredFile(rel, str(local), size, "conflict"))
                    continue
            local.parent.mkdir(parents=True, exist_ok=True)
            part = local.with_name(local.name + ".fabfleet-part")
            sftp.get(posixpath.join(top, rel), str(part))
            got_size, got_sum = part.stat().st_size, _sha256(part)
            if got_size != size or got_sum != sums[rel]:
                part.unlink()
                raise TransferError(host, f"{rel}: the copy does not match the remote file "
                                    f"(size {got_size} vs {size}, sha256 differs). The file may "
                                    "be changing while gathered; wait for the run to finish and "
                                    "gather again.")
            os.replace(part, local)
            out.append(GatheredFile(rel, str(local), size, "copied"))
    return out


def _remote_sha256(c, remote_dir: str, rels: list[str]) -> dict[str, str]:
    host = c.fleet_host.name
    sums: dict[str, str] = {}
    for i in range(0, len(rels), 500):  # keep command lines well under ARG_MAX
        batch = rels[i:i + 500]
        cmd = shell.sh(f"cd {shell.path(remote_dir)} && sha256sum -- "
                       + " ".join(shell.q(r) for r in batch))
        result = execute(c, cmd, timeout=600, action="checksum files to gather")
        if result.exit_code != 0:
            raise TransferError(host, f"sha256sum failed in {remote_dir}: "
                                f"{result.stderr.strip()[-500:]}. gather needs coreutils' "
                                "sha256sum on the host.")
        for line in result.stdout.splitlines():
            digest, _, name = line.partition("  ")
            sums[name] = digest
    return sums
