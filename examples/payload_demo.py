"""Pickled functions on the testbed: @remote, run_payload, map over hosts, a remote error."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fabfleet import Inventory, RemoteError, remote, run_payload  # noqa: E402

inv = Inventory.load(os.environ.get("FABFLEET_INVENTORY", "inventory.yaml"))


@remote("gpu1")
def where(tag):
    import socket
    return tag, open("/etc/fabfleet-host").read().strip(), socket.gethostname() != ""


def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


print("@remote:", where("t1"))
print("run_payload:", run_payload(inv.connect("ws1"), fib, 90))
print("map:", inv.select(group="lab").map(fib, range(12)))
try:
    run_payload(inv.connect("ws2"), lambda: 1 / 0)
except RemoteError as exc:
    print("remote error came back:", exc.remote_type, "-", exc.remote_message)
