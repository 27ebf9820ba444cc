"""CLI start-up: ``fabfleet --list`` and ``fabfleet run-remote --help`` against
``python -c pass`` (the same interpreter), measured alternately in the same run; the
first call of each fills the help cache (see fabfleet/cli/fast.py), so the rows show
what every later call costs. A row for ``fabfleet --version`` shows the full
program's start-up (Invoke imported), which every other task pays.

    .venv/bin/python bench/bench_startup.py
"""

import subprocess
import sys
import tempfile

from common import compare, fabfleet_argv

if __name__ == "__main__":
    cache = tempfile.mkdtemp()
    env = {"XDG_CACHE_HOME": cache, "PATH": "/usr/bin:/bin"}

    def run(argv):
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    base = [sys.executable, "-c", "pass"]
    for args in (["--list"], ["run-remote", "--help"], ["--version"]):
        compare(f"fabfleet {' '.join(args)} vs python -c pass",
                lambda: run(fabfleet_argv(*args)), lambda: run(base), rounds=9)
