"""The local testbed: sshd containers on 127.0.0.1, plus a ready inventory for them.

Used by ``inv testbed.up`` / ``testbed.down`` (for people) and by ``tests/conftest.py``
(through pytest-docker). Hosts differ the way real fleets do:

====== ===== =====================================================
name   port  what it is
====== ===== =====================================================
ws1    PP01  plain Debian host: python3, rsync
ws2    PP02  no rsync (push goes over SFTP)
gpu1   PP03  a stand-in ``nvidia-smi`` reporting two A100s
nopy   PP04  no Python at all
ws3    PP05  plain; the tests stop and kill this one
oldpy  PP05  same machine as ws3, but ``python: pypy3`` (Python 3.9)
down   PP99  nothing listens there
====== ===== =====================================================

``PP`` is the port prefix: 22 for the demo, 23 for the tests, so both can run at once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATE = HERE / "state"
COMPOSE_FILE = HERE / "docker-compose.yml"
KEY = STATE / "id_ed25519"
HOSTS = {"ws1": 1, "ws2": 2, "gpu1": 3, "nopy": 4, "ws3": 5}


def port(name: str, prefix: int) -> int:
    return prefix * 100 + HOSTS[name]


def ensure_key() -> Path:
    """The testbed's client key (made once; its .pub is mounted as authorized_keys)."""
    STATE.mkdir(exist_ok=True)
    if not KEY.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                        "fabfleet-testbed", "-f", str(KEY)], check=True)
    return KEY


def ensure_docker() -> None:
    """Start dockerd and build the base image if needed (testbed/ensure-docker.sh)."""
    subprocess.run([str(HERE / "ensure-docker.sh")], check=True)


def ssh_ready(p: int) -> bool:
    """True once something on 127.0.0.1:p answers with an SSH banner."""
    try:
        with socket.create_connection(("127.0.0.1", p), timeout=1) as s:
            s.settimeout(2)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def wait_ready(prefix: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for name in HOSTS:
        while not ssh_ready(port(name, prefix)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"testbed host {name} (127.0.0.1:{port(name, prefix)}) "
                                   "did not start sshd; see `docker-compose logs`")
            time.sleep(0.1)


def scan_host_keys(prefix: int, path: Path) -> Path:
    """Write the hosts' current keys to ``path`` (the testbed's own known_hosts)."""
    lines = []
    for name in HOSTS:
        out = subprocess.run(["ssh-keyscan", "-t", "ed25519", "-p", str(port(name, prefix)),
                              "127.0.0.1"], capture_output=True, text=True, timeout=30)
        lines += [ln for ln in out.stdout.splitlines() if ln and not ln.startswith("#")]
    path.write_text("\n".join(lines) + "\n")
    return path


def inventory_text(prefix: int, known_hosts: Path, work_dir: str = "~/fabfleet") -> str:
    """A ready inventory for the testbed on ports ``prefix``01…"""
    p = {name: port(name, prefix) for name in HOSTS}
    return f"""\
# Written by `inv testbed.up` for the local testbed; safe to delete.
defaults:
  user: dev
  key_file: {KEY}
  known_hosts: {known_hosts}
  host_key_policy: strict
  connect_timeout: 5
  work_dir: {work_dir}
hosts:
  ws1:
    hostname: 127.0.0.1
    port: {p['ws1']}
    groups: [lab, cpu]
    env: {{OMP_NUM_THREADS: "2"}}
  ws2:                      # no rsync: push uses SFTP
    hostname: 127.0.0.1
    port: {p['ws2']}
    groups: [lab, cpu]
  gpu1:                     # nvidia-smi reports two A100s
    hostname: 127.0.0.1
    port: {p['gpu1']}
    groups: [lab, gpu]
    max_jobs: 2
  ws3:
    hostname: 127.0.0.1
    port: {p['ws3']}
    groups: [lab, cpu]
  nopy:                     # no Python installed
    hostname: 127.0.0.1
    port: {p['nopy']}
    groups: [broken]
  oldpy:                    # ws3's machine, but PyPy 3.9: payloads are refused
    hostname: 127.0.0.1
    port: {p['ws3']}
    python: pypy3
    groups: [broken]
  down:                     # nothing listens here
    hostname: 127.0.0.1
    port: {prefix * 100 + 99}
    connect_timeout: 2
    groups: [broken]
"""


def compose(*args: str, prefix: int, project: str = "fabfleet-testbed") -> None:
    env = {**os.environ, "FABFLEET_PORT_PREFIX": str(prefix)}
    subprocess.run(["docker-compose", "-p", project, "-f", str(COMPOSE_FILE), *args],
                   check=True, env=env)


def up(prefix: int = 22) -> Path:
    """Start the demo testbed and write ``testbed/state/inventory.yaml``; return its path."""
    ensure_key()
    ensure_docker()
    compose("up", "--build", "-d", prefix=prefix)
    wait_ready(prefix)
    known = scan_host_keys(prefix, STATE / "known_hosts")
    inv = STATE / "inventory.yaml"
    inv.write_text(inventory_text(prefix, known))
    return inv


def down(prefix: int = 22) -> None:
    compose("down", "-v", "--remove-orphans", prefix=prefix)
