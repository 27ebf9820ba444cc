"""check-env over many hosts: client CPU and peak memory against parallel-ssh.

64 and 256 inventory entries, aliases of the testbed's sshds (each entry is a
connection of its own), checked with ``check_hosts`` in a fresh process; the baseline is
parallel-ssh (``pssh.clients.ParallelSSHClient``, libssh2 in C) running the same kind of
one-line probe (``python3 -c`` printing the version) on the same aliases, 32 at a time
like fabfleet's default. Printed per size: wall time (the ``compare`` row), client CPU
seconds per host and peak RSS for both, and the growth from 64 to 256 hosts.

    .venv/bin/pip install -q -e '.[bench]'    # parallel-ssh, the baseline
    .venv/bin/python bench/bench_scale.py
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, compare, ensure_testbed

try:
    import pssh  # noqa: F401 - the baseline, run in its own process below
except ImportError:
    sys.exit("bench_scale.py: the baseline needs parallel-ssh: "
             ".venv/bin/pip install -q -e '.[bench]'")

import testbed

PY = sys.executable
PORTS = [testbed.port(n, int(__import__("common").PREFIX)) for n in ("ws1", "ws2", "ws3", "gpu1")]

OURS = r"""
import json, resource, sys, time
from fabfleet import Inventory, check_hosts
inv = Inventory.load(sys.argv[1])
t = time.process_time()
report = check_hosts(inv.select(group="many"))
assert report["ok"], [h for h, r in report["hosts"].items() if not r["ok"]][:3]
print(json.dumps({"cpu": time.process_time() - t,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

BASE = r"""
import json, resource, sys, time
from pssh.clients import ParallelSSHClient
from pssh.config import HostConfig
hosts, key, n = json.loads(sys.argv[1]), sys.argv[2], 0
t = time.process_time()
client = ParallelSSHClient([h for h, _ in hosts], user="dev", pkey=key, pool_size=32,
                           host_config=[HostConfig(port=p) for _, p in hosts])
out = client.run_command("python3 -c 'import sys; print(sys.version_info[:3])'")
client.join(out)
for o in out:
    n += len(list(o.stdout))
    assert o.exit_code == 0, o
assert n == len(hosts)
print(json.dumps({"cpu": time.process_time() - t,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def inventory(n: int, path: Path) -> None:
    text = testbed.inventory_text(int(__import__("common").PREFIX), testbed.STATE / "known_hosts")
    text += "".join(f"  many{i}:\n    hostname: 127.0.0.1\n    port: {PORTS[i % len(PORTS)]}\n"
                    f"    groups: [many]\n" for i in range(n))
    path.write_text(text)


def measure(argv: list[str]) -> dict:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{argv[:3]} failed: {out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    ensure_testbed()
    tmp = Path(tempfile.mkdtemp())
    seen = {}
    for n in (64, 256):
        inv = tmp / f"inventory-{n}.yaml"
        inventory(n, inv)
        hosts = json.dumps([["127.0.0.1", PORTS[i % len(PORTS)]] for i in range(n)])
        ours_argv = [PY, "-c", OURS, str(inv)]
        base_argv = [PY, "-c", BASE, hosts, str(testbed.KEY)]
        samples = {"ours": [], "base": []}
        compare(f"check-env over {n} hosts vs parallel-ssh (process)",
                lambda: samples["ours"].append(measure(ours_argv)),
                lambda: samples["base"].append(measure(base_argv)), rounds=3)
        med = {k: sorted(v, key=lambda r: r["cpu"])[len(v) // 2] for k, v in samples.items()}
        seen[n] = med
        print(f"  {n} hosts: client CPU per host fabfleet {med['ours']['cpu'] / n * 1e3:.1f} ms, "
              f"parallel-ssh {med['base']['cpu'] / n * 1e3:.1f} ms "
              f"({med['ours']['cpu'] / med['base']['cpu']:.2f}x); peak RSS fabfleet "
              f"{med['ours']['rss'] / 1024:.0f} MiB, parallel-ssh {med['base']['rss'] / 1024:.0f} MiB "
              f"({med['ours']['rss'] / med['base']['rss']:.2f}x)", flush=True)
    grow = {k: seen[256][k]["cpu"] / seen[64][k]["cpu"] for k in ("ours", "base")}
    print(f"  growth 64 -> 256 hosts (client CPU): fabfleet {grow['ours']:.2f}x, "
          f"parallel-ssh {grow['base']:.2f}x", flush=True)
