"""Which files: the local tree a push sends, and the remote tree's listing.

Both push paths (and gather) work from these lists. The local list applies the
excludes (``.git/``, ``__pycache__/``, ``.gitignore`` entries, what git ignores, user
patterns; never the inventory's SSH keys) so rsync,
tar and SFTP hosts end up identical; symlinks are listed as links, never followed. The
remote listing is one ``find -printf`` round trip, NUL-separated, so any byte in a name
survives (SFTP when ``find`` cannot).
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config.deadlines import TREE_COMMAND
from ..errors import LocalError, host_errors
from ..ssh import shell
from ..ssh.connect import sftp_client
from ..ssh.exec import execute
from ..ssh.liveness import watched

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


def git_ignored(root: Path) -> set[str] | None:
    """What git ignores in the repository at ``root`` (``.gitignore`` files,
    ``.git/info/exclude``, the user's global excludes file), untracked paths relative to
    ``root``, directories once; ``None`` when ``root`` is not a repository or git is
    missing. Git is asked, so its own rules apply exactly."""
    if not (root / ".git").exists() or shutil.which("git") is None:
        return None
    try:
        found = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--others",
                                "--ignored", "--exclude-standard", "--directory"],
                               capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if found.returncode != 0:
        return None
    return {os.fsdecode(p).rstrip("/") for p in found.stdout.split(b"\0") if p}


def local_files(root: str | os.PathLike[str], excludes: Sequence[str] = (),
                never: Iterable[str | os.PathLike[str]] = ()) -> list[LocalFile]:
    """The files under ``root`` that a push sends, sorted, with excludes applied: ours
    (:data:`ALWAYS_EXCLUDED`), ``excludes``, ``.gitignore`` files and, in a git
    repository, everything git ignores. ``never``: files that are never sent wherever
    they are (the inventory's SSH keys)."""
    root = Path(root)
    if not root.is_dir():
        raise LocalError(f"{root}: not a directory; push sends a project directory")
    rules = _rules(ALWAYS_EXCLUDED) + _rules(excludes)
    ignored = git_ignored(root) or set()
    forbidden = {os.path.realpath(os.path.expanduser(os.fspath(p))) for p in never if p}
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
            if rel in ignored or _ignored(rules, rel, True):
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                filenames.append(d)  # a link to a directory is sent as a link
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            rel = f"{reldir}/{f}" if reldir else f
            full = os.path.join(dirpath, f)
            if rel in ignored or _ignored(rules, rel, False):
                continue
            if forbidden and os.path.realpath(full) in forbidden:
                continue  # an SSH key kept next to the inventory never leaves
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
# Files and links, NUL-separated; a file we may not read is listed with kind "u".
FIND_LISTING = ("find . \\( -type l -o -type f -readable \\) -printf '%P\\0%y\\0%s\\0%T@\\0%l\\0' "
                "-o -type f -printf '%P\\0u\\0%s\\0%T@\\0\\0'")


def remote_manifest(c, directory: str, unreadable: list[str] | None = None
                    ) -> dict[str, tuple]:
    """``{rel: (size, mtime)}`` of the files under a remote directory, ``{rel: ("link",
    target)}`` for its symlinks, ``{rel: ("unreadable", size)}`` for files we may not read
    (``{}`` if it does not exist). Directories that could not be read are added to
    ``unreadable``.

    One ``find -printf`` round trip, NUL-separated so any byte in a name survives
    (undecodable bytes come back as :func:`os.fsdecode` does); falls back to SFTP.
    """
    cmd = shell.sh(f"cd -- {shell.path(directory)} 2>/dev/null || exit 0; {FIND_LISTING}")
    result = execute(c, cmd, timeout=TREE_COMMAND, action=f"list files in {directory}")
    denied = unreadable_entries(result.stderr)
    if result.exit_code == 0 or denied is not None:
        if unreadable is not None:
            unreadable.extend(denied or [])
        return parse_find_listing(result.stdout_bytes)
    return sftp_manifest(c, directory, unreadable)


def unreadable_entries(stderr: str) -> list[str] | None:
    """``find``'s complaints → the entries it could not read, relative to where it ran
    (pure); ``None`` when it complained of anything else (no ``-printf``: busybox)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if not all("Permission denied" in ln for ln in lines):
        return None
    out = []
    for ln in lines:
        start, end = ln.find("‘"), ln.rfind("’")
        if start < 0:
            start, end = ln.find("'"), ln.rfind("'")
        name = ln[start + 1:end] if 0 <= start < end else ln
        out.append(name[2:] if name.startswith("./") else name)
    return out


def unreadable_warning(directory: str, names: Sequence[str]) -> str:
    """One warning naming what could not be read under ``directory``."""
    shown = ", ".join(f"{directory}/{n}" for n in names[:5]) + (" …" if len(names) > 5 else "")
    return (f"could not read {shown} on the host (permission denied: another user's or "
            "root's?): left as it is")


def sftp_manifest(c, directory: str, unreadable: list[str] | None = None
                  ) -> dict[str, tuple[int, int]]:
    """The listing over SFTP; directories it may not read are added to ``unreadable``."""
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
            except PermissionError:
                if unreadable is not None:
                    unreadable.append(rel)
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
            elif kind == b"u":
                manifest[os.fsdecode(name)] = ("unreadable", int(size))
            else:
                manifest[os.fsdecode(name)] = (int(size), int(float(mtime)))
        except ValueError:
            continue
    return manifest
