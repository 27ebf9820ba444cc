"""Pickled calls: cold, warm and map throughput against plain baselines, same run.

* cold call (new process: connect, start worker, ship nothing if cached, call) vs
  `ssh host python3 -c 'print(2+3)'` (a new OpenSSH connection and interpreter);
* warm call (connection and worker already up) vs a hand-rolled pickle pipe: one
  `ssh host python3 -c LOOP` kept open, each call a length-prefixed pickle written to its
  stdin and one read back (the least a persistent remote interpreter can cost), both
  calling `operator.add`; vs `python3 -c` over an already open OpenSSH ControlMaster
  connection (the best a shell loop can do), and vs a new interpreter per call on our own
  open connection;
* warm ``@remote`` against ``run_payload`` with a 64-host inventory (target: ≤ 0.05 ms
  more);
* a function from the project's own module (pickled by value) against a builtin;
* map of 200 small items over ws1, ws2, gpu1 vs 200 `ssh … python3 -c` calls, 3 at a time.

    .venv/bin/python bench/bench_payload.py
"""

import operator
import os
import pickle
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

from common import ROOT, compare, ensure_testbed, ssh_argv

from fabfleet import Inventory, close_workers, connect, remote, run_payload
from fabfleet.ssh.exec import execute


def add(a, b):
    return a + b


#: The hand-rolled pipe's remote loop: read a length-prefixed pickle, call, answer.
PIPE_LOOP = r"""
import os, pickle, struct
H = struct.Struct(">I")
def read(n):
    buf = b""
    while len(buf) < n:
        part = os.read(0, n - len(buf))
        if not part:
            raise SystemExit
        buf += part
    return buf
while True:
    fn, args = pickle.loads(read(H.unpack(read(4))[0]))
    out = pickle.dumps(fn(*args))
    os.write(1, H.pack(len(out)) + out)
"""


class PicklePipe:
    """A persistent ``ssh host python3 -c PIPE_LOOP``: what a user would hand-roll."""

    H = struct.Struct(">I")

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv + ["python3", "-c", f"'{PIPE_LOOP}'"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.w, self.r = self.proc.stdin.fileno(), self.proc.stdout.fileno()

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = os.read(self.r, n - len(buf))
            if not part:
                raise SystemExit("the pickle pipe's ssh ended")
            buf += part
        return buf

    def call(self, fn, *args):
        blob = pickle.dumps((fn, args))
        os.write(self.w, self.H.pack(len(blob)) + blob)
        return pickle.loads(self._read(self.H.unpack(self._read(4))[0]))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def per_call_ms(fn, calls: int = 200) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1000


if __name__ == "__main__":
    inv = Inventory.load(ensure_testbed())
    code = ("import sys; sys.path.insert(0, %r); from fabfleet import Inventory, run_payload; "
            "inv = Inventory.load(%r); run_payload(inv.connect('ws1'), abs, -1)"
            % (str(ROOT), str(inv.path)))
    compare("cold call in a new process (connect+worker+call)",
            lambda: subprocess.run([sys.executable, "-c", code], check=True),
            lambda: subprocess.run(ssh_argv("ws1") + ["python3", "-c", "'print(2+3)'"],
                                   check=True, stdout=subprocess.DEVNULL), rounds=7)

    c = inv.connect("ws1")
    run_payload(c, add, 1, 2)
    pipe = PicklePipe(ssh_argv("ws1"))
    assert pipe.call(operator.add, 1, 2) == 3 and run_payload(c, operator.add, 1, 2) == 3
    compare("warm call vs a pickle pipe over ssh (200 calls)",
            lambda: [run_payload(c, operator.add, 1, 2) for _ in range(200)],
            lambda: [pipe.call(operator.add, 1, 2) for _ in range(200)], rounds=15)
    ours = [per_call_ms(lambda: run_payload(c, operator.add, 1, 2)) for _ in range(15)]
    theirs = [per_call_ms(lambda: pipe.call(operator.add, 1, 2)) for _ in range(15)]
    print(f"warm call per call: fabfleet {statistics.median(ours):.3f} ms, pickle pipe "
          f"{statistics.median(theirs):.3f} ms (medians of 15 x 200 calls)")
    pipe.close()
    ctl = tempfile.mkdtemp() + "/ctl"
    base = ssh_argv("ws1")[:-3]  # without "-o ControlMaster=no dev@127.0.0.1"
    subprocess.run(base + ["-o", "ControlMaster=yes", "-o", f"ControlPath={ctl}", "-N", "-f",
                           "dev@127.0.0.1"], check=True)
    mux = base + ["-o", f"ControlPath={ctl}", "dev@127.0.0.1"]
    compare("warm call vs python3 -c over an open ControlMaster",
            lambda: run_payload(c, add, 1, 2),
            lambda: subprocess.run(mux + ["python3", "-c", "'print(2+3)'"], check=True,
                                   stdout=subprocess.DEVNULL), rounds=25)
    conn = connect(inv["ws1"])
    conn.open()
    compare("warm call vs new python3 on our open connection",
            lambda: run_payload(c, add, 1, 2),
            lambda: execute(conn, "python3 -c 'print(2+3)'"), rounds=25)
    ts = []
    for _ in range(500):
        t = time.perf_counter()
        run_payload(c, add, 1, 2)
        ts.append(time.perf_counter() - t)
    print(f"warm call latency over 500 calls: median {statistics.median(ts) * 1000:.2f} ms, "
          f"p95 {sorted(ts)[474] * 1000:.2f} ms")

    # @remote over run_payload, with a 64-host inventory (found and parsed once; one
    # stat per call to notice edits). Target: <= 0.05 ms more than run_payload.
    big = Path(tempfile.mkdtemp()) / "inventory.yaml"
    text = inv.path and Path(inv.path).read_text()
    extra = "".join(f"  extra{i}:\n    hostname: 127.0.0.1\n    port: {2300 + i}\n"
                    for i in range(57))
    big.write_text(text + extra)
    assert len(Inventory.load(big)) == 64

    @remote("ws1", inventory=big)
    def radd(a, b):
        return a + b

    def median_us(fn, n=400):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e6
    radd(1, 2)
    pairs = [(median_us(lambda: radd(1, 2)), median_us(lambda: run_payload(c, add, 1, 2)))
             for _ in range(5)]
    over = statistics.median(r - p for r, p in pairs)
    print(f"warm @remote (64-host inventory) median {statistics.median(r for r, _ in pairs):.0f} us, "
          f"run_payload {statistics.median(p for _, p in pairs):.0f} us: overhead {over:.0f} us "
          f"({statistics.median(r / p for r, p in pairs):.3f}x)")
    compare("warm @remote (64-host inventory) vs run_payload (200 calls)",
            lambda: [radd(1, 2) for _ in range(200)],
            lambda: [run_payload(c, add, 1, 2) for _ in range(200)], rounds=15)

    # The project's own module pickled by value: a function calling helper code.
    sys.path.insert(0, str(ROOT / "tests"))
    import payload_funcs
    compare("warm call of a project-module function vs builtin",
            lambda: run_payload(c, payload_funcs.fibonacci, 10),
            lambda: run_payload(c, add, 1, 2), rounds=200)

    lab = inv.select(host="ws1,ws2,gpu1")
    lab.map(abs, range(6))  # start the workers and connections once

    def baseline_map():
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda i: subprocess.run(
                ssh_argv(["ws1", "ws2", "gpu1"][i % 3]) + ["python3", "-c", f"'print({i}*2)'"],
                check=True, stdout=subprocess.DEVNULL), range(200)))
    compare("map 200 items over 3 hosts vs 200 ssh calls, 3 at a time",
            lambda: lab.map(abs, range(200)), baseline_map, rounds=3)
    subprocess.run(["ssh", "-o", f"ControlPath={ctl}", "-O", "exit", "x"],
                   stderr=subprocess.DEVNULL)
    close_workers()
