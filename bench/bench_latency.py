"""The key flows at real latency: each through the same 50 ms round-trip proxy
(testbed/latency.py) as its OpenSSH equivalent, measured alternately in the same run;
each line also gives the number of round trips (wall time ÷ RTT).

* check-env of one host (library call) vs ``ssh host python3 -c …`` (the same facts);
* a warm payload call vs a command on an open OpenSSH ControlMaster connection;
* run-remote of an unchanged project (CLI: a first command, and with kept connections)
  vs ``scp`` the script + ``ssh`` run it;
* an unchanged push (library) vs ``rsync`` of the same tree;
* a gather of 5 small files (library) vs ``scp -r`` of their directory;
* a cold ``@remote`` call in a new process vs ``ssh host python3 -c``.

    .venv/bin/python bench/bench_latency.py [RTT_MS]
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import compare, ensure_testbed, git_project

import testbed
from testbed.latency import LatencyProxy

from fabfleet import Inventory, check_hosts, close_workers, push, run_payload

RTT_MS = float(sys.argv[1]) if len(sys.argv) > 1 else 50.0


def trips(label: str, fn, rounds: int = 5) -> float:
    t = time.perf_counter()
    for _ in range(rounds):
        fn()
    per = (time.perf_counter() - t) / rounds
    print(f"    {label}: {per * 1000:.0f} ms = {per / (RTT_MS / 1000):.1f} round trips")
    return per


if __name__ == "__main__":
    inv0 = Inventory.load(ensure_testbed())
    work = Path(tempfile.mkdtemp())
    with LatencyProxy(("127.0.0.1", inv0["ws1"].port), rtt_ms=RTT_MS) as proxy:
        line = (testbed.STATE / "known_hosts").read_text().splitlines()[0]
        kh = work / "known_hosts"
        kh.write_text(line.replace(f"[127.0.0.1]:{inv0['ws1'].port}",
                                   f"[127.0.0.1]:{proxy.port}") + "\n")
        inv_path = work / "inventory.yaml"
        inv_path.write_text(f"defaults: {{user: dev, key_file: {testbed.KEY}, "
                            f"known_hosts: {kh}}}\nhosts:\n  far: {{hostname: 127.0.0.1, "
                            f"port: {proxy.port}}}\n")
        inv = Inventory.load(inv_path)
        ssh = ["ssh", "-i", str(testbed.KEY), "-p", str(proxy.port), "-o",
               f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes", "-o",
               "BatchMode=yes", "-o", "ControlMaster=no", "dev@127.0.0.1"]
        probe = ("import json, os, shutil, sys; print(json.dumps([sys.version, "
                 "os.cpu_count(), shutil.disk_usage('.').free, open('/proc/meminfo').read()]))")
        print(f"at {RTT_MS:g} ms round trip:")
        compare(f"check-env 1 host vs ssh python3 -c ({RTT_MS:g} ms)",
                lambda: check_hosts(inv), lambda: subprocess.run(
                    ssh + ["python3", "-c", repr(probe)], check=True, capture_output=True),
                rounds=5)
        trips("check-env", lambda: check_hosts(inv), 3)
        sock = work / "cm.sock"
        base = ssh[:-3]  # without "-o ControlMaster=no": ssh takes the first value given
        master = subprocess.Popen(base + ["-o", "ControlMaster=yes", "-o",
                                          f"ControlPath={sock}", "-N", "dev@127.0.0.1"])
        deadline = time.monotonic() + 15
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        viacm = ssh[:-1] + \
            ["-o", f"ControlPath={sock}", "dev@127.0.0.1"]
        with inv.connect("far") as c:
            run_payload(c, abs, -1)
            compare(f"warm call vs ssh over a ControlMaster ({RTT_MS:g} ms)",
                    lambda: run_payload(c, abs, -2),
                    lambda: subprocess.run(viacm + ["true"], check=True, capture_output=True),
                    rounds=9)
            trips("warm call", lambda: run_payload(c, abs, -2), 9)
            # One identity across runs (a git origin), so that the copy an earlier run
            # pushed to the host is this project's, not a stranger's of that name.
            proj = git_project(work / "bench-latency-proj",
                               "https://example.org/bench/latency-proj.git")
            (proj / "pyproject.toml").write_text("")
            for i in range(50):
                (proj / f"mod{i}.py").write_text(f"X = {i}\n")
            push(c, proj, "~/fabfleet/bench-latency")
            rsync = ["rsync", "-rlt", "-e", " ".join(ssh[:-1]), f"{proj}/",
                     "dev@127.0.0.1:fabfleet/bench-latency-rsync/"]
            subprocess.run(rsync, check=True, capture_output=True)
            compare(f"unchanged push 50 files vs rsync ({RTT_MS:g} ms)",
                    lambda: push(c, proj, "~/fabfleet/bench-latency"),
                    lambda: subprocess.run(rsync, check=True, capture_output=True), rounds=5)
            trips("unchanged push", lambda: push(c, proj, "~/fabfleet/bench-latency"), 3)
            from fabfleet import gather
            from fabfleet.ssh.exec import execute
            execute(c, "mkdir -p ~/fabfleet/bench-latency/res && cd ~/fabfleet/bench-latency/res"
                       " && for i in 1 2 3 4 5; do echo $i > r$i.csv; done")
            dest = work / "gathered"
            compare(f"gather 5 small files vs scp -r ({RTT_MS:g} ms)",
                    lambda: gather(c, "~/fabfleet/bench-latency", ["res/*.csv"], dest),
                    lambda: subprocess.run(
                        ["scp", "-q", "-r", "-i", str(testbed.KEY), "-P", str(proxy.port), "-o",
                         f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes",
                         "dev@127.0.0.1:fabfleet/bench-latency/res", str(work / "scp")],
                        check=True, capture_output=True), rounds=5)
        master.terminate()
        (proj / "main.py").write_text("import mod3\nprint(mod3.X)\n")
        cli = [str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "fabfleet"),
               "run-remote", "-H", "far", "main.py"]
        env = {"FABFLEET_INVENTORY": str(inv_path), "PATH": "/usr/bin:/bin"}
        subprocess.run(cli, check=True, capture_output=True, cwd=proj, env=env)
        scp = ["scp", "-q", "-i", str(testbed.KEY), "-P", str(proxy.port), "-o",
               f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes",
               str(proj / "main.py"), "dev@127.0.0.1:fabfleet/bench-latency-rsync/main.py"]
        for label, persist in (("first command", "0"), ("kept connections", "60")):
            keeper = {**env, "FABFLEET_PERSIST": persist}
            compare(f"run-remote unchanged project ({label}) vs scp+ssh ({RTT_MS:g} ms)",
                    lambda: subprocess.run(cli, check=True, capture_output=True, cwd=proj,
                                           env=keeper),
                    lambda: (subprocess.run(scp, check=True, capture_output=True),
                             subprocess.run(ssh + ["cd fabfleet/bench-latency-rsync && "
                                                   "python3 main.py"], check=True,
                                            capture_output=True)), rounds=5)
        subprocess.run([cli[0], "disconnect"], capture_output=True, env=env)
        cold = ("import os; from fabfleet import remote\n"
                "@remote('far', inventory=os.environ['FABFLEET_INVENTORY'])\n"
                "def f(x):\n    return x + 1\n"
                "assert f(1) == 2\n")
        compare(f"cold @remote in a new process vs ssh python3 -c ({RTT_MS:g} ms)",
                lambda: subprocess.run([sys.executable, "-c", cold], check=True,
                                       capture_output=True, env={**env, "PATH": "/usr/bin:/bin"}),
                lambda: subprocess.run(ssh + ["python3", "-c", "'print(2)'"], check=True,
                                       capture_output=True), rounds=5)
        close_workers()
