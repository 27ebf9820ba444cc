"""`inv check-env` over three testbed hosts vs. a parallel plain-OpenSSH loop.

Baseline: one `ssh host python3 -c '<print version>'` per host, all in parallel: the
cheapest thing a person would write to ask "is Python there?". fabfleet's run includes
starting the `inv` process, loading the inventory, verifying host keys and gathering
every fact. Target: ratio <= 1 (bar: 2). The first row is a first command (the
connection keeper off: ``FABFLEET_PERSIST=0``), the second a command within a minute of
the last (the keeper holds the connections) — against the same plain loop, which pays
its handshakes each time (see bench_keep.py for OpenSSH with a ControlMaster).

    .venv/bin/python bench/bench_check_env.py
"""

from common import compare, ensure_testbed, fabfleet_argv, parallel, run, ssh_argv

HOSTS = ["ws1", "ws2", "gpu1"]

if __name__ == "__main__":
    ensure_testbed()
    probe = "import sys, json; print(json.dumps(list(sys.version_info)))"
    argv = fabfleet_argv("check-env", "--host", ",".join(HOSTS), "--json")
    compare("check-env --host ws1,ws2,gpu1 (CLI, first command)",
            lambda: run(argv, env={"FABFLEET_PERSIST": "0"}),
            lambda: parallel([ssh_argv(h) + ["python3", "-c", repr(probe)] for h in HOSTS]))
    compare("check-env --host ws1,ws2,gpu1 (CLI, kept connections)",
            lambda: run(argv, env={"FABFLEET_PERSIST": "60"}),
            lambda: parallel([ssh_argv(h) + ["python3", "-c", repr(probe)] for h in HOSTS]))
    run(fabfleet_argv("disconnect"))
    # The same work from Python (a notebook, another fabfile): no process start-up.
    from fabfleet import Inventory, check_hosts
    hosts = Inventory.load(ensure_testbed()).select(host=",".join(HOSTS))
    compare("check_hosts() over ws1,ws2,gpu1 (library call)",
            lambda: check_hosts(hosts),
            lambda: parallel([ssh_argv(h) + ["python3", "-c", repr(probe)] for h in HOSTS]))
