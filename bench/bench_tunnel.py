"""fabfleet's tunnel against a direct connection, measured alternately in the same run.

An HTTP server runs on ws1 as a detached fabfleet job (on the host's loopback; the
testbed's host networking lets the benchmark also reach it directly). Baselines: the
direct connection (no encryption at all: the floor) and OpenSSH's `ssh -N -L` (what
people use today). Rows: a 100 MB download, and 200 small requests 20 at a time.

    .venv/bin/python bench/bench_tunnel.py
"""

import os
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import compare, ensure_testbed, ssh_argv

from fabfleet import Inventory
from fabfleet.host.jobs import start_job
from fabfleet.ssh.tunnel import Tunnel

SERVER = """\
import functools, http.server, os, sys
os.makedirs("www", exist_ok=True)
with open("www/big.bin", "wb") as f:
    f.write(os.urandom(1 << 20) * 100)
with open("www/small.txt", "w") as f:
    f.write("x" * 1000)
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory="www")
handler.log_message = lambda *a: None
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
"""


def fetch(url: str) -> int:
    with urllib.request.urlopen(url, timeout=60) as r:
        return len(r.read())


def wait_for(url: str, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            fetch(url)
            return
        except OSError:
            assert time.monotonic() < deadline, f"{what} did not come up"
            time.sleep(0.3)


if __name__ == "__main__":
    inv = Inventory.load(ensure_testbed())
    port = 8600 + os.getpid() % 300
    d = Path(tempfile.mkdtemp())
    (d / "serve.py").write_text(SERVER)
    with inv.connect("ws1") as c:
        job = start_job(c, d / "serve.py", [str(port)], project="bench-tunnel")
        try:
            direct = f"http://127.0.0.1:{port}"
            wait_for(f"{direct}/small.txt", "the server")
            with Tunnel(c, port) as t:
                tunneled = f"http://127.0.0.1:{t.local_port}"
                compare("download 100 MB (tunnel vs direct)",
                        lambda: fetch(f"{tunneled}/big.bin"), lambda: fetch(f"{direct}/big.bin"),
                        rounds=5)

                def many(base):
                    with ThreadPoolExecutor(20) as pool:
                        list(pool.map(lambda _: fetch(f"{base}/small.txt"), range(200)))
                compare("200 small requests, 20 at a time (tunnel vs direct)",
                        lambda: many(tunneled), lambda: many(direct), rounds=5)
                lport = port + 1000
                ssh = subprocess.Popen(ssh_argv("ws1")[:-3] + [
                    "-N", "-L", f"127.0.0.1:{lport}:127.0.0.1:{port}", "dev@127.0.0.1"])
                try:
                    openssh = f"http://127.0.0.1:{lport}"
                    wait_for(f"{openssh}/small.txt", "ssh -L")
                    compare("download 100 MB (tunnel vs ssh -L)",
                            lambda: fetch(f"{tunneled}/big.bin"),
                            lambda: fetch(f"{openssh}/big.bin"), rounds=5)
                    compare("200 small requests, 20 at a time (tunnel vs ssh -L)",
                            lambda: many(tunneled), lambda: many(openssh), rounds=5)
                    with Tunnel(c, port, openssh=True) as t2:  # the tunnel task's default
                        via = f"http://127.0.0.1:{t2.local_port}"
                        wait_for(f"{via}/small.txt", "the OpenSSH-backed tunnel")
                        compare("download 100 MB (tunnel via OpenSSH vs ssh -L)",
                                lambda: fetch(f"{via}/big.bin"),
                                lambda: fetch(f"{openssh}/big.bin"), rounds=5)
                        compare("200 small requests, 20 at a time (via OpenSSH vs ssh -L)",
                                lambda: many(via), lambda: many(openssh), rounds=5)
                finally:
                    ssh.terminate()
        finally:
            job.kill()
