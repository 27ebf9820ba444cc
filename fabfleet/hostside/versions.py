"""Installed versions of packages in the host's env, and its Python: one JSON line.

``python -c SOURCE NAME…`` prints ``{"python": "3.11.2", NAME: "1.2.3" | null, …}``.
Used by the Dask preflight to compare the host's packages with the local ones.
"""

import sys

# `python -c` puts the current directory (the home dir, over SSH) first on sys.path: a
# stray ~/json.py must not shadow the standard library this module imports below (only
# when run on the host: imported locally, sys.path is the importer's business).
if __name__ == "__main__" and sys.path and sys.path[0] in ("", "."):
    del sys.path[0]

import json


def versions(names):
    try:
        from importlib import metadata
    except ImportError:  # Python < 3.8: report the interpreter, no packages
        metadata = None
    out = {"python": "%d.%d.%d" % sys.version_info[:3]}
    for name in names:
        try:
            out[name] = metadata.version(name) if metadata else None
        except Exception:
            out[name] = None
    return out


if __name__ == "__main__":
    print(json.dumps(versions(sys.argv[1:])))
