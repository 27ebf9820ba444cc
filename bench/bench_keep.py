"""A second command within a minute: fabfleet's connection keeper vs OpenSSH's
ControlMaster, at 0, 20 and 60 ms round trip (testbed/latency.py's delay proxy), each
line with the round trips it took (wall time ÷ RTT) beside OpenSSH's.

* ``fabfleet run -H far -- true`` (the keeper already holds the connection) vs
  ``ssh -S SOCKET far true`` on an open ControlMaster;
* ``fabfleet check-env -H far`` vs the same facts by ``python3 -c`` over the master;
* the cold forms: ``FABFLEET_PERSIST=0 fabfleet run …`` vs plain ``ssh far true``.

    .venv/bin/python bench/bench_keep.py [RTT_MS …]
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, compare, ensure_testbed, far_host

RTTS = [float(a) for a in sys.argv[1:]] or [0.0, 20.0, 60.0]
PROBE = ("import json, os, shutil, sys; print(json.dumps([sys.version, os.cpu_count(), "
         "shutil.disk_usage('.').free, open('/proc/meminfo').read()]))")


#: label -> median seconds at 0 ms, to tell round trips from fixed (CPU) time
_AT_ZERO: dict[str, float] = {}


def trips(label: str, argv, env, rtt: float, cwd, rounds: int = 5) -> None:
    """Median wall time; at a real RTT also wall ÷ RTT and (wall − the same at 0 ms) ÷
    RTT: the round trips themselves, without the fixed local and remote CPU time."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env, cwd=cwd)
        times.append(time.perf_counter() - t)
    per = statistics.median(times)
    if not rtt:
        _AT_ZERO[label] = per
        print(f"    {label}: {per * 1000:.0f} ms")
        return
    extra = (per - _AT_ZERO[label]) / (rtt / 1000) if label in _AT_ZERO else float("nan")
    print(f"    {label}: {per * 1000:.0f} ms = {per / (rtt / 1000):.1f} RTT of wall time, "
          f"{extra:.1f} round trips beyond its time at 0 ms")


def at(rtt: float, work: Path) -> None:
    with far_host(work / f"rtt{rtt:g}", rtt) as far:
        fab = str(ROOT / ".venv" / "bin" / "fabfleet")
        warm_env = {**os.environ, "FABFLEET_INVENTORY": str(far.inventory),
                    "FABFLEET_PERSIST": "60", "HOME": str(far.home)}
        cold_env = {**warm_env, "FABFLEET_PERSIST": "0"}
        sock = far.home / "cm.sock"
        master = subprocess.Popen(far.ssh_base + ["-o", "ControlMaster=yes", "-o",
                                                  f"ControlPath={sock}", "-N", far.login])
        try:
            deadline = time.monotonic() + 15
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            viacm = far.ssh_base + ["-o", "ControlMaster=no", "-o", f"ControlPath={sock}",
                                    far.login]
            run = [fab, "run", "-H", "far", "--", "true"]
            check = [fab, "check-env", "-H", "far"]
            # the first command: starts the keeper, which keeps its connection
            subprocess.run(run, check=True, capture_output=True, env=warm_env, cwd=far.home)
            print(f"at {rtt:g} ms round trip:")
            compare(f"2nd command: run -- true vs ssh -S ControlMaster ({rtt:g} ms)",
                    lambda: subprocess.run(run, check=True, capture_output=True, env=warm_env,
                                           cwd=far.home),
                    lambda: subprocess.run(viacm + ["true"], check=True, capture_output=True),
                    rounds=7)
            compare(f"2nd command: check-env vs ControlMaster python3 ({rtt:g} ms)",
                    lambda: subprocess.run(check, check=True, capture_output=True,
                                           env=warm_env, cwd=far.home),
                    lambda: subprocess.run(viacm + ["python3", "-c", repr(PROBE)], check=True,
                                           capture_output=True), rounds=7)
            plain = far.ssh_base + ["-o", "ControlMaster=no", far.login]
            compare(f"cold command: run -- true vs plain ssh true ({rtt:g} ms)",
                    lambda: subprocess.run(run, check=True, capture_output=True, env=cold_env,
                                           cwd=far.home),
                    lambda: subprocess.run(plain + ["true"], check=True, capture_output=True),
                    rounds=5)
            home = far.home
            trips("fabfleet run, 2nd command", run, warm_env, rtt, home)
            trips("ssh true over a ControlMaster", viacm + ["true"], None, rtt, home)
            trips("fabfleet check-env, 2nd command", check, warm_env, rtt, home)
            trips("ssh python3 -c over a ControlMaster",
                  viacm + ["python3", "-c", repr(PROBE)], None, rtt, home)
            trips("fabfleet run, cold (FABFLEET_PERSIST=0)", run, cold_env, rtt, home)
            trips("plain ssh true", plain + ["true"], None, rtt, home)
        finally:
            master.terminate()
            subprocess.run([fab, "disconnect"], capture_output=True, env=warm_env)


if __name__ == "__main__":
    ensure_testbed()
    work = Path(tempfile.mkdtemp())
    for rtt in RTTS:
        at(rtt, work)
