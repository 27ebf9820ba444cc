"""A module of the example project: hello.py imports it on the hosts after the push."""

import os


def cpus() -> int:
    return os.cpu_count() or 1
