"""map throughput: fabfleet's map over 1, 3, 4 and 16 hosts against local pools with
as many workers, measured alternately in the same run.

100,000 tiny items (``x + 1``): what matters is the per-item overhead. The baselines
are the strong ones: ``multiprocessing.Pool(N).map`` with its automatic chunksize, and
``ProcessPoolExecutor(N).map`` with ``chunksize=len // (4 N)`` (its default, 1, would be
a straw man). The 16-host inventory names the testbed's containers several times (each
entry is a connection and a worker of its own).

    .venv/bin/python bench/bench_map.py
"""

import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import compare, ensure_testbed

from fabfleet import Inventory, close_workers


def inc(x):
    return x + 1


ITEMS = range(100_000)

if __name__ == "__main__":
    inv = Inventory.load(ensure_testbed())
    text = Path(inv.path).read_text()
    extra = "".join(f"  alias{i}:\n    hostname: 127.0.0.1\n    port: {inv[name].port}\n"
                    f"    groups: [sixteen]\n"
                    for i, name in enumerate(["ws1", "ws2", "ws3", "ws1"] * 3))
    text = text.replace("hosts:\n", "hosts:\n", 1) + extra
    big = Path(tempfile.mkdtemp()) / "inventory.yaml"
    big.write_text(text)
    inv = Inventory.load(big)
    sixteen = [h.name for h in inv if "sixteen" in h.groups] + ["ws1", "ws2", "ws3", "gpu1"]
    for label, names in (("1 host", ["ws1"]), ("3 hosts", ["ws1", "ws2", "ws3"]),
                         ("4 hosts", ["ws1", "ws2", "ws3", "gpu1"]), ("16 hosts", sixteen)):
        hosts = inv.select(host=",".join(names))
        # A payload worker on a GPU host holds a free GPU of its own: gpu1 has one free
        # A100 (its second is nearly full), so it runs one worker whatever its max_jobs.
        slots = sum(1 if "gpu" in h.groups else h.max_jobs for h in hosts)
        assert hosts.map(inc, ITEMS) == [x + 1 for x in ITEMS]  # warm: connections, workers
        with multiprocessing.Pool(slots) as pool:
            pool.map(inc, range(100))
            compare(f"map 100,000 tiny items, {label} vs Pool({slots}).map",
                    lambda: hosts.map(inc, ITEMS), lambda: pool.map(inc, ITEMS), rounds=7)
        chunk = len(ITEMS) // (4 * slots)
        with ProcessPoolExecutor(slots) as ex:
            list(ex.map(inc, range(100)))
            compare(f"map 100,000 tiny items, {label} vs ProcessPool({slots}, chunksize={chunk})",
                    lambda: hosts.map(inc, ITEMS),
                    lambda: list(ex.map(inc, ITEMS, chunksize=chunk)), rounds=7)
        close_workers()
