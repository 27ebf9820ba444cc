"""Dask's scheduler and workers for fabfleet, started as detached jobs' scripts.

``scheduler HOST IDLE_TIMEOUT [TLS_DIR]``: becomes ``dask scheduler`` (same pid)
listening on HOST, a free port, the dashboard on the host's loopback, its address
written to ``$FABFLEET_RUN_DIR/scheduler.json``.
``workers ADDRESS NPROCS NAME DEATH_TIMEOUT [TLS_DIR]``: becomes ``dask worker`` with
NPROCS single-threaded worker processes (nannies) joining ADDRESS.

With TLS_DIR (a 0700 directory holding ``ca.pem``, ``cert.pem``, ``key.pem``), every
connection is TLS with certificates from the cluster's own CA, required both ways: no
one without those files can join or connect.
"""

import os
import sys


def tls_args(tls_dir):
    if not tls_dir:
        return []
    tls_dir = os.path.expanduser(tls_dir)
    return ["--tls-ca-file", os.path.join(tls_dir, "ca.pem"),
            "--tls-cert", os.path.join(tls_dir, "cert.pem"),
            "--tls-key", os.path.join(tls_dir, "key.pem")]


def scheduler(host, idle, tls_dir=""):
    os.execv(sys.executable, [
        sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", host, "--port", "0",
        "--protocol", "tls" if tls_dir else "tcp", "--dashboard-address", "127.0.0.1:0",
        "--scheduler-file", os.path.join(os.environ["FABFLEET_RUN_DIR"], "scheduler.json"),
        "--idle-timeout", idle] + tls_args(tls_dir))


def workers(address, nprocs, name, death, tls_dir=""):
    os.execv(sys.executable, [
        sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", nprocs,
        "--nthreads", "1", "--name", name, "--death-timeout", death, "--no-dashboard"]
        + tls_args(tls_dir))


COMMANDS = {"scheduler": scheduler, "workers": workers}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
