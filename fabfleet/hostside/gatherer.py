"""The host side of ``gather``: list, match, hash and send the files in one command.

Sent on stdin (:mod:`fabfleet.hostside.boot`) with one argument, a JSON spec, and run
with ``python -I`` (standard library only; :mod:`fabfleet.host.gather` is the client)::

    {"dir": DIR, "patterns": [GLOB, …], "local": {REL: SIZE or -1}, "overwrite": bool,
     "ask": BYTES or null, "only": [REL, …] or null}

``local`` is what the client already has under those names (a regular file's size, -1
for anything else). ``only`` skips the matching and sends exactly those files.

Everything goes back on stdout as frames, a ``>cQ`` header (kind, length) then the
data; the files in the listing's order:

* ``L`` the listing, JSON ``{"files": [[REL, SIZE], …], "unreadable": [[REL, SIZE], …],
  "denied": [DIR, …], "send": BYTES, "ask": bool}`` — ``send`` the bytes to come;
* then per listed file one of: ``D`` chunks of its bytes and ``E`` its end (the SHA-256
  of what was read, a space, ``same`` or ``changed`` — its size moved while it was
  read); ``H`` the SHA-256 alone (the client has a copy of the same size: it compares);
  ``K`` not sent (the client's copy differs and may not be overwritten); ``X`` it could
  not be read now (``gone`` or ``denied``);
* ``Z`` the end.

With ``ask`` (the client may fetch big gathers through OpenSSH instead) and at least
that many bytes to send, the listing says so and the program reads one byte: ``s``
sends them here; anything else (or end-of-file) leaves out the files to send (the client
fetches them with ``only``) and sends the rest (hashes, ``K``) as usual.
"""

import fnmatch
import hashlib
import json
import os
import queue
import stat
import struct
import sys
import threading

ISOLATED = True  # standard library only, nothing of the user's imported
HEADER = struct.Struct(">cQ")
BLOCK = 1 << 20


def glob_match(rel, pattern):
    """Whether ``rel`` matches a gather pattern: ``*`` as in :mod:`fnmatch`, a pattern
    without ``/`` only matches at the top, ``**/`` spans directories (the client's
    :func:`fabfleet.host.gather.gather` documents it; this is the one definition)."""
    pattern = pattern.lstrip("./") if pattern.startswith("./") else pattern
    if fnmatch.fnmatchcase(rel, pattern):
        return "/" in pattern or "/" not in rel or pattern.startswith("**")
    return pattern.startswith("**/") and fnmatch.fnmatchcase(rel, pattern[3:])


def listing(top, patterns):
    """``(files, unreadable, denied)``: the regular files under ``top`` matching
    ``patterns`` as sorted ``[rel, size]`` (readable ones, then the others), and the
    directories that could not be listed. Symlinks are never followed or listed."""
    files, unreadable, denied = [], [], []

    def walk_error(err):
        rel = os.path.relpath(err.filename, top) if err.filename else "."
        denied.append("" if rel == "." else rel)
    for root, dirs, names in os.walk(top, onerror=walk_error):
        base = os.path.relpath(root, top)
        base = "" if base == "." else base + "/"
        for name in names:
            rel = base + name
            if not any(glob_match(rel, p) for p in patterns):
                continue
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if os.access(path, os.R_OK):
                files.append([rel, st.st_size])
            else:
                unreadable.append([rel, st.st_size])
    files.sort()
    unreadable.sort()
    return files, unreadable, denied


def send(kind, data=b""):
    head = HEADER.pack(kind, len(data))
    if len(data) < 65536:
        write_all(head + data)
    else:
        write_all(head)
        write_all(data)


def write_all(data):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


class Hasher(object):
    """SHA-256 of the blocks given to it, computed in a thread of its own (hashlib lets go
    of the GIL), so hashing a file overlaps sending it, as ``sha256sum`` beside ``cat``
    would."""

    def __init__(self):
        self.blocks = queue.Queue(16)
        self.h = hashlib.sha256()
        self.thread = threading.Thread(target=self._run)
        self.thread.daemon = True
        self.thread.start()

    def _run(self):
        while True:
            block = self.blocks.get()
            if block is None:
                return
            self.h.update(block)

    def update(self, block):
        self.blocks.put(block)

    def hexdigest(self):
        self.blocks.put(None)
        self.thread.join()
        return self.h.hexdigest()


def stream(path, size):
    """Send one file's bytes and its end; an error opening it is an ``X`` frame."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        send(b"X", b"denied" if exc.errno in (1, 13) else b"gone")
        return
    h, total = (Hasher() if size >= 4 * BLOCK else hashlib.sha256()), 0
    try:
        while True:
            block = os.read(fd, BLOCK)
            if not block:
                break
            h.update(block)
            total += len(block)
            send(b"D", block)
        now = os.fstat(fd).st_size
    finally:
        os.close(fd)
    moved = total != size or now != size
    send(b"E", ("%s %s" % (h.hexdigest(), "changed" if moved else "same")).encode())


def main(argv):
    try:  # fewer, bigger writes to sshd (a pipe holds 64 KiB by default)
        import fcntl
        fcntl.fcntl(1, fcntl.F_SETPIPE_SZ, 1 << 20)
    except (ImportError, AttributeError, OSError):
        pass
    spec = json.loads(argv[0])
    top = os.path.expanduser(spec["dir"])
    if spec.get("only") is not None:
        files, unreadable, denied = [], [], []
        for rel in spec["only"]:
            try:
                files.append([rel, os.lstat(os.path.join(top, rel)).st_size])
            except OSError:
                files.append([rel, -1])
    elif os.path.isdir(top):
        files, unreadable, denied = listing(top, spec["patterns"])
    else:
        files, unreadable, denied = [], [], []
    local, overwrite = spec.get("local") or {}, spec.get("overwrite")
    plan = []  # per file: "send", "hash" or "keep"
    for rel, size in files:
        have = local.get(rel)
        if have is None or size < 0:
            plan.append("send")
        elif have == size:
            plan.append("hash")
        else:
            plan.append("send" if overwrite else "keep")
    todo = sum(size for (rel, size), what in zip(files, plan) if what == "send")
    ask = spec.get("ask") is not None and todo >= spec["ask"]
    send(b"L", json.dumps({"files": files, "unreadable": unreadable, "denied": denied,
                           "send": todo, "ask": ask}).encode())
    here = not ask or os.read(0, 1) == b"s"
    for (rel, size), what in zip(files, plan):
        path = os.path.join(top, rel)
        if what == "send" and not here:
            continue
        if what == "keep":
            send(b"K")
        elif what == "send":
            stream(path, size)
        else:
            try:
                send(b"H", digest(path).encode())
            except OSError as exc:
                send(b"X", b"denied" if exc.errno in (1, 13) else b"gone")
    send(b"Z")


if __name__ == "__main__":
    main(sys.argv[1:])
