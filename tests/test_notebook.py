"""The seed's use: a Jupyter notebook (a real ipykernel, run by nbclient) using @remote,
map, a project helper module, remote errors, a GPU check and a kernel interrupt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

KERNEL = "fabfleet-test"

CELLS = [
    # 0: setup
    """import os
os.environ["FABFLEET_INVENTORY"] = {inventory!r}
from fabfleet import Inventory, RemoteError, remote
inv = Inventory.load(os.environ["FABFLEET_INVENTORY"])""",
    # 1: a remote function that prints (the OutStream has no .buffer)
    """@remote("ws1")
def hello(name):
    host = open("/etc/fabfleet-host").read().strip()
    print(f"hello {{name}} from {{host}} ✓")
    return len(name)
print("returned", hello("notebook"))""",
    # 2: map over a group, a function defined in the notebook
    """def square(x):
    return x * x
print(inv.select(group="lab").map(square, range(8)))""",
    # 3: the project's own module, pickled by value
    """import helper
@remote("ws2")
def use_helper(x):
    return helper.scale(x)
print("helper", use_helper(4))""",
    # 4: a remote error
    """@remote("ws1")
def divide(a, b):
    return a / b
try:
    divide(1, 0)
except RemoteError as exc:
    print("remote error", exc.host, exc.remote_type)
    # the cell's file and line, and the line itself, as in a local traceback
    where = f'{{divide.local.__code__.co_filename}}", line 3, in divide'
    print(where in exc.remote_traceback, "    return a / b" in exc.remote_traceback)""",
    # 5: a GPU check
    """@remote("gpu1")
def gpus():
    import subprocess
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
print(gpus().count("A100"), "GPUs")""",
    # 6: interrupted mid-call
    """@remote("ws1")
def forever():
    import time
    print("started", flush=True)
    time.sleep(300)
forever()""",
    # 7: the next call works at once (ws1 has one job slot: the interrupted one is free)
    """import time
t = time.monotonic()
print("returned", hello("again"), time.monotonic() - t < 3)""",
]


def stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


@pytest.fixture(scope="session")
def kernel():
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", sys.prefix,
                    "--name", KERNEL], check=True, capture_output=True)
    return KERNEL


def test_notebook_with_remote_calls_and_an_interrupt(fleet, kernel, tmp_path):
    (tmp_path / "helper.py").write_text("def scale(x):\n    return x * 10\n")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src.format(inventory=str(fleet.inventory_path)))
                for src in CELLS]
    nb.cells[6].metadata["tags"] = ["raises-exception"]
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            timer = None
            if i == 6:
                pid = client.km.provisioner.pid
                timer = threading.Timer(4, os.kill, args=(pid, signal.SIGINT))
                timer.start()
            started = time.monotonic()
            client.execute_cell(cell, i)
            if timer is not None:
                timer.join()
                assert time.monotonic() - started < 15
    out = [stream_text(c) for c in nb.cells]
    assert out[1] == "hello notebook from ws1 ✓\nreturned 8\n"
    assert out[2] == "[0, 1, 4, 9, 16, 25, 36, 49]\n"
    assert out[3] == "helper 40\n"
    assert out[4] == "remote error ws1 ZeroDivisionError\nTrue True\n"
    assert out[5] == "2 GPUs\n"
    assert out[6] == "started\n"
    errors = [o for o in nb.cells[6].outputs if o.output_type == "error"]
    assert errors and errors[0].ename == "KeyboardInterrupt"
    assert out[7] == "hello again from ws1 ✓\nreturned 5 True\n"
