"""Installed versions of packages in the host's env, and its Python: one JSON line.

Run with the arguments ``NAME…`` (through :mod:`fabfleet.hostside.boot`), it prints ``{"python": "3.11.2", NAME: "1.2.3" | null, …}``.
Used by the Dask preflight to compare the host's packages with the local ones.
"""

import json
import sys


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
