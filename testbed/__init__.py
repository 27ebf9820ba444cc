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

Lab-like hosts, with the inventory :func:`lab_inventory_text` and the ssh_config
:func:`lab_ssh_config` (all stock ``sshd_config`` limits, each on its own loopback
address; the lab image has Lmod with a ``cuda/12.2`` module, zsh, a conda stand-in at
``/opt/conda`` with an env ``lab``, and a second user ``eve``):

======= ===== ============ ==================================================
name    port  address      what it is
======= ===== ============ ==================================================
stock   PP20  127.0.0.6    reached by an ssh_config alias; known by its ECDSA
                           key only (it also has RSA and Ed25519); zsh login
bastion PP21  127.0.0.7    known by its RSA key only; resolves ``inner.lab``
inner   PP22  127.0.0.8    only an ECDSA host key; reached as ``inner.lab``
                           through the bastion
======= ===== ============ ==================================================

``closedgw`` (PP23, 127.0.0.9) is a bastion whose sshd has ``AllowTcpForwarding no``.

Cluster login nodes (the lab image plus Slurm; in :func:`lab_inventory_text` too):
``hpc`` (PP30, 127.0.0.10) runs a real single-node Slurm 22.05 (slurmctld on PP40,
slurmd on PP41; partition ``debug``, 2 CPUs, ``MinJobAge=5``, no accounting); ``pbs``
(PP31, 127.0.0.11) has the PBS Pro stand-in (``testbed/pbs/fakepbs``: 2 job slots, 5 s of
finished-job history).

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
HOSTS = {"ws1": 1, "ws2": 2, "gpu1": 3, "nopy": 4, "ws3": 5,
         "stock": 20, "bastion": 21, "inner": 22, "closedgw": 23, "hpc": 30, "pbs": 31}
#: where each host listens (the default hosts on 127.0.0.1)
ADDRESSES = {"stock": "127.0.0.6", "bastion": "127.0.0.7", "inner": "127.0.0.8",
             "closedgw": "127.0.0.9", "hpc": "127.0.0.10", "pbs": "127.0.0.11"}
#: the one key type recorded for the lab hosts, as older known_hosts files have them
RECORDED_TYPES = {"stock": "ecdsa", "bastion": "rsa", "inner": "ecdsa"}
LAB = ("stock", "bastion", "inner", "closedgw", "hpc", "pbs")


def address(name: str) -> str:
    return ADDRESSES.get(name, "127.0.0.1")


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


def ssh_ready(p: int, addr: str = "127.0.0.1") -> bool:
    """True once something on addr:p answers with an SSH banner."""
    try:
        with socket.create_connection((addr, p), timeout=1) as s:
            s.settimeout(2)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def wait_ready(prefix: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for name in HOSTS:
        while not ssh_ready(port(name, prefix), address(name)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"testbed host {name} ({address(name)}:{port(name, prefix)}) "
                                   "did not start sshd; see `docker-compose logs`")
            time.sleep(0.1)


def host_key_lines(name: str, prefix: int, key_type: str | None = None,
                   as_name: str | None = None) -> list[str]:
    """known_hosts lines for host ``name`` (its ``key_type`` key: default ed25519 for
    the default hosts, :data:`RECORDED_TYPES` for the lab ones), written for
    ``as_name`` (default: its address) and its port."""
    key_type = key_type or RECORDED_TYPES.get(name, "ed25519")
    p, addr = port(name, prefix), address(name)
    out = subprocess.run(["ssh-keyscan", "-t", key_type, "-p", str(p), addr],
                         capture_output=True, text=True, timeout=30)
    lines = [ln for ln in out.stdout.splitlines() if ln and not ln.startswith("#")]
    if as_name:
        lines = [ln.replace(f"[{addr}]:{p}", f"[{as_name}]:{p}", 1) for ln in lines]
    return lines


def scan_host_keys(prefix: int, path: Path) -> Path:
    """Write the hosts' current keys to ``path`` (the testbed's own known_hosts). The
    lab hosts are recorded by one older key type each; the inner host under the name
    the bastion resolves."""
    lines = []
    for name in HOSTS:
        lines += host_key_lines(name, prefix, as_name="inner.lab" if name == "inner" else None)
    path.write_text("\n".join(lines) + "\n")
    return path


def defaults(known_hosts: Path, work_dir: str) -> str:
    """The ``defaults:`` block every testbed inventory shares."""
    return f"""\
defaults:
  user: dev
  key_file: {KEY}
  known_hosts: {known_hosts}
  host_key_policy: strict
  connect_timeout: 5
  work_dir: {work_dir}
"""


def inventory_text(prefix: int, known_hosts: Path, work_dir: str = "~/fabfleet") -> str:
    """A ready inventory for the testbed on ports ``prefix``01…"""
    p = {name: port(name, prefix) for name in HOSTS}
    return f"""\
# Written by `inv testbed.up` for the local testbed; safe to delete.
{defaults(known_hosts, work_dir)}hosts:
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


def lab_ssh_config(prefix: int) -> str:
    """ssh_config for the lab hosts: ``stock`` is an alias only this file resolves."""
    return f"""\
Host stock
    HostName {address('stock')}
    Port {port('stock', prefix)}
"""


def lab_inventory_text(prefix: int, known_hosts: Path, work_dir: str = "~/fabfleet") -> str:
    """An inventory of the lab hosts: ``inner`` is reached through ``bastion``."""
    return f"""\
# The testbed's lab-like hosts (stock sshd, other addresses, a bastion).
{defaults(known_hosts, work_dir)}hosts:
  stock:                    # no hostname: the ssh_config alias resolves it
    groups: [lab2]
    max_jobs: 12
  bastion:
    hostname: {address('bastion')}
    port: {port('bastion', prefix)}
    groups: [gateways]
  inner:
    hostname: inner.lab     # only the bastion resolves this name
    port: {port('inner', prefix)}
    jump: bastion
    groups: [lab2]
  closedgw:
    hostname: {address('closedgw')}
    port: {port('closedgw', prefix)}
    groups: [gateways]
  hpc:                      # a Slurm login node: runs are batch jobs
    hostname: {address('hpc')}
    port: {port('hpc', prefix)}
    scheduler: slurm
    sbatch: ["--partition=debug"]
    shell: login            # Lmod's `module` comes from the login profile
    setup: ["module load cuda/12.2"]
    max_jobs: 4
    groups: [cluster]
  pbs:                      # a PBS login node (the stand-in)
    hostname: {address('pbs')}
    port: {port('pbs', prefix)}
    scheduler: pbs
    qsub: ["-q", "workq"]
    max_jobs: 4
    groups: [cluster]
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


def fake_gpus(container: str, gpus: list[dict] | None) -> None:
    """Make ``container`` a GPU box with ``gpus`` (``[{"index", "uuid", "name",
    "memory_total", "memory_used", "utilization"}]``, any order) for the nvidia-smi
    stand-in — or, with ``None``, a host without GPUs again (no nvidia-smi on PATH)."""
    import json
    if gpus is None:
        script = ("rm -f /usr/local/bin/nvidia-smi /etc/fake-gpus/gpus.json; "
                  "rm -f /var/lib/fake-gpus/holders/*")
    else:
        script = ("mkdir -p /etc/fake-gpus && cat > /etc/fake-gpus/gpus.json && "
                  "ln -sf /usr/local/lib/fake-gpu/nvidia-smi /usr/local/bin/nvidia-smi")
    subprocess.run(["docker", "exec", "-i", container, "sh", "-c", script], check=True,
                   input=json.dumps(gpus or []).encode(), timeout=60)


def gpu_list(prefix: str, count: int, *, start: int = 0) -> list[dict]:
    """``count`` idle stand-in GPUs with UUIDs unique to ``prefix``, listed out of index
    order (as nvidia-smi may number them otherwise than CUDA)."""
    import hashlib
    out = []
    for i in range(start, start + count):
        h = hashlib.sha256(f"{prefix}-{i}".encode()).hexdigest()
        out.append({"index": i, "uuid": f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}",
                    "name": "NVIDIA A100-SXM4-40GB", "memory_total": 40960,
                    "memory_used": 0, "utilization": 0})
    return list(reversed(out))
