"""fabfleet's map against Dask on the same hosts (ws1, ws2, gpu1: 4 job slots), in the
same run: 10,000 tiny items, and 200 items of 50 ms each. Dask is started by fabfleet
(`Inventory.dask()`), with dask/distributed installed in the bench project's venv on the
hosts from wheels pushed with it.

    .venv/bin/python bench/bench_dask.py
"""

from common import compare, ensure_testbed, pinned_project

from fabfleet import Inventory

HOSTS = "ws1,ws2,gpu1"

if __name__ == "__main__":
    inv = Inventory.load(ensure_testbed())
    hosts = inv.select(host=HOSTS)
    pinned_project(inv, hosts, "benchdask", ("dask", "distributed", "cloudpickle", "msgpack"))
    import work
    with hosts.dask() as client:
        hosts.map(work.inc, range(100))  # warm both
        client.gather(client.map(work.inc, range(100), pure=False))
        compare("10,000 tiny items: fabfleet map vs Dask client.map",
                lambda: hosts.map(work.inc, range(10_000)),
                lambda: client.gather(client.map(work.inc, range(10_000), pure=False)),
                rounds=3)
        compare("200 items x 50 ms: fabfleet map vs Dask client.map",
                lambda: hosts.map(work.nap, range(200)),
                lambda: client.gather(client.map(work.nap, range(200), pure=False)),
                rounds=3)
