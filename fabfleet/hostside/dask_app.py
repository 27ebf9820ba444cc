"""Dask's scheduler and workers for fabfleet, started as detached jobs' scripts.

``scheduler HOST IDLE_TIMEOUT``: becomes ``dask scheduler`` (same pid) listening on HOST,
a free port, the dashboard on the host's loopback, its address written to
``$FABFLEET_RUN_DIR/scheduler.json``.
``workers ADDRESS NPROCS NAME DEATH_TIMEOUT``: becomes ``dask worker`` with NPROCS
single-threaded worker processes (nannies) joining ADDRESS.
"""

import os
import sys


def scheduler(host, idle):
    os.execv(sys.executable, [
        sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", host, "--port", "0",
        "--dashboard-address", "127.0.0.1:0",
        "--scheduler-file", os.path.join(os.environ["FABFLEET_RUN_DIR"], "scheduler.json"),
        "--idle-timeout", idle])


def workers(address, nprocs, name, death):
    os.execv(sys.executable, [
        sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", nprocs,
        "--nthreads", "1", "--name", name, "--death-timeout", death, "--no-dashboard"])


COMMANDS = {"scheduler": scheduler, "workers": workers}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
