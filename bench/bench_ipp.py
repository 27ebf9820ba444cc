"""fabfleet's map against ipyparallel on the same hosts (ws1, ws2, ws3: 3 engines, 3 job
slots; not gpu1, whose one free GPU an engine holds while fabfleet's map would want it),
in the same run, the cluster started by fabfleet
(`Inventory.ipyparallel()`), ipyparallel installed in the bench project's venv on the
hosts from wheels pushed with it: 10,000 tiny items and 200 items of 50 ms each against a
load-balanced view's `map_sync`, and the time to start and stop the whole cluster.

    .venv/bin/python bench/bench_ipp.py
"""

import time

from common import compare, ensure_testbed, pinned_project

from fabfleet import Inventory

HOSTS = "ws1,ws2,ws3"

if __name__ == "__main__":
    inv = Inventory.load(ensure_testbed())
    hosts = inv.select(host=HOSTS)
    pinned_project(inv, hosts, "benchipp", ("ipyparallel", "cloudpickle"))
    import work
    starts = []
    for _ in range(3):
        t = time.perf_counter()
        with hosts.ipyparallel() as rc:
            starts.append(time.perf_counter() - t)
            n = len(rc.ids)
    print(f"ipyparallel cluster start ({n} engines on 3 hosts), median of 3: "
          f"{sorted(starts)[1]:.1f} s")
    with hosts.ipyparallel() as rc:
        lview = rc.load_balanced_view()
        hosts.map(work.inc, range(100))  # warm both
        lview.map_sync(work.inc, range(100))
        compare("10,000 tiny items: fabfleet map vs ipyparallel map_sync",
                lambda: hosts.map(work.inc, range(10_000)),
                lambda: lview.map_sync(work.inc, range(10_000)), rounds=3)
        compare("10,000 tiny items: fabfleet map vs ipyparallel map_sync(chunksize=500)",
                lambda: hosts.map(work.inc, range(10_000)),
                lambda: lview.map_sync(work.inc, range(10_000), chunksize=500), rounds=3)
        compare("200 items x 50 ms: fabfleet map vs ipyparallel map_sync",
                lambda: hosts.map(work.nap, range(200)),
                lambda: lview.map_sync(work.nap, range(200)), rounds=3)
