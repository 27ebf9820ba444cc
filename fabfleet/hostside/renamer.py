"""On the host, after a tar push: put the pushed files in place, all in one process.

Run as ``python3 -I -S -c SOURCE TAG`` with NUL-separated paths on stdin (``find -print0``
of the files that arrived under temporary names): each is renamed to its base name
without ``TAG`` — like ``mv -fT``: a link is renamed, not followed; a directory in the way
is an error, reported on stderr (exit 1), the others still renamed. One process for a
thousand files takes ~20 ms where one ``mv`` each takes 1.5 s.
"""

import os
import sys


def main(tag):
    tag, bad = os.fsencode(tag), 0
    for path in sys.stdin.buffer.read().split(b"\0"):
        if path:
            head, base = os.path.split(path)
            try:
                os.replace(path, os.path.join(head, base[len(tag):]))
            except OSError as exc:
                bad = 1
                sys.stderr.write("mv: %s: %s\n" % (os.fsdecode(path), exc.strerror))
    return bad


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
