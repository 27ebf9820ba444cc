"""Payloads where users call them, on the testbed: any output stream, the project's own
modules, @remote functions everywhere, deadlines, frozen hosts, interrupts, a killed
client, executors, broken callbacks."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import Future
from pathlib import Path

import payload_funcs as pf
import pytest
from conftest import wait_until

import fabfleet
from fabfleet import (ConnectError, DeadlineError, RemoteError, remote,
                     run_payload, save_payload)
from fabfleet.ssh.exec import execute

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("fresh_workers")


def remote_sh(inv, name: str, command: str) -> str:
    with inv.connect(name) as c:
        return execute(c, command).stdout


def workers_on(inv, name: str) -> int:
    """Python worker processes of ours running on the host."""
    # "[f]" keeps the pattern from matching the shell that runs pgrep itself
    out = remote_sh(inv, name, "pgrep -f '[f]abfleet-worker' -u dev | wc -l")
    return int(out.strip())


@contextlib.contextmanager
def paused(fleet, name: str):
    subprocess.run(["docker", "pause", fleet.container(name)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["docker", "unpause", fleet.container(name)], check=True,
                       capture_output=True)


def script(tmp_path: Path, fleet, body: str, name: str = "user_script.py") -> Path:
    """A user's script in a project dir outside the repo, using the installed package
    from this checkout (the payload path does not depend on the CLI)."""
    p = tmp_path / name
    p.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
                 f"INVENTORY = {str(fleet.inventory_path)!r}\n" + textwrap.dedent(body))
    return p


# -- output ----------------------------------------------------------------------------
def test_prints_reach_redirected_and_text_only_streams(inv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert run_payload(inv["ws1"], pf.chatty, 2) == 2
    assert buf.getvalue() == "step 0\nstep 1\n"

    class TextOnly(io.TextIOBase):  # like ipykernel's OutStream: no .buffer
        def __init__(self):
            self.parts = []

        def write(self, s):
            self.parts.append(s)
            return len(s)
    text = TextOnly()
    with contextlib.redirect_stdout(text):
        run_payload(inv["ws1"], print, "ünïcode ✓")
    assert "".join(text.parts) == "ünïcode ✓\n"


def test_on_output_for_remote_and_map(inv):
    seen = []
    fn = remote("ws2", inventory=inv.path, on_output=lambda h, s, d: seen.append((h, s, d)))(
        pf.chatty)
    assert fn(1) == 1 and seen == [("ws2", "stdout", b"step 0\n")]
    got = []
    inv.select(host="ws1,gpu1").map(pf.chatty, [1, 1], on_output=lambda h, s, d: got.append(h))
    assert sorted(got) in (["gpu1", "ws1"], ["gpu1", "gpu1"], ["ws1", "ws1"])


def test_a_raising_output_callback_fails_its_item_not_the_map(inv):
    def bad(host, stream, data):
        raise RuntimeError("callback bug")
    results = inv.select(host="ws1,ws2").map(pf.chatty, [1, 0, 1, 0, 1], on_output=bad,
                                             return_exceptions=True)
    assert len(results) == 5
    for i in (0, 2, 4):  # their calls printed: the callback's error is theirs
        assert isinstance(results[i], fabfleet.LocalError) and "callback bug" in str(results[i])
    for i in (1, 3):  # silent items: their value, unless they shared a call (chunk) with one
        assert results[i] == 0 or isinstance(results[i], fabfleet.LocalError)


# -- the project's code travels ----------------------------------------------------------
def test_main_function_using_a_project_module(fleet, tmp_path):
    (tmp_path / "helper.py").write_text("import mathutil\n\ndef scale(x):\n    return mathutil.twice(x) * 5\n")
    (tmp_path / "mathutil.py").write_text("def twice(x):\n    return 2 * x\n")
    s = script(tmp_path, fleet, """
        import helper
        from fabfleet import Inventory, remote

        @remote("ws1", inventory=INVENTORY)
        def compute(x):
            return helper.scale(x)

        def plain(x):
            return helper.scale(x) + 1

        print(compute(3))
        print(Inventory.load(INVENTORY).select(host="ws1,ws2").map(plain, [1, 2]))
    """)
    out = subprocess.run([sys.executable, str(s)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["30", "[11, 21]"]


def test_remote_functions_are_ordinary_functions(fleet, inv, tmp_path):
    @remote("ws1", inventory=inv.path)
    def cube(x):
        return x ** 3

    assert cube(3) == 27 and cube.local(2) == 8 and cube.__name__ == "cube"
    assert inv.select(host="ws2,gpu1").map(cube, range(4)) == [0, 1, 8, 27]
    assert run_payload(inv["ws2"], cube, 4) == 64

    def uses_cube(x):  # a remote function used inside another: runs there, plainly
        return cube(x) + 1
    assert run_payload(inv["gpu1"], uses_cube, 2) == 9
    save_payload(tmp_path / "cube.pkl", cube, 5)
    r = fleet.cli("run-pickle", "-H", "ws1", str(tmp_path / "cube.pkl"),
                  inventory=fleet.inventory_path, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    import pickle
    assert pickle.loads((tmp_path / "gathered" / "ws1" / "cube.result.pkl").read_bytes()) == 125


def test_remote_rereads_the_inventory_only_when_it_changes(fleet, tmp_path):
    path = tmp_path / "inv.yaml"
    path.write_text(fleet.inventory_path.read_text())

    @remote("ws1", inventory=path)
    def where():
        return open("/etc/fabfleet-host").read().strip()
    assert where() == "ws1"
    cached = where._inventory.loaded[3]
    assert where() == "ws1" and where._inventory.loaded[3] is cached
    # ws1 now points at ws2's port: the edit is picked up on the next call
    text = path.read_text().replace(f"port: {fleet.port('ws1')}", f"port: {fleet.port('ws2')}")
    path.write_text(text)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert where() == "ws2"


# -- deadlines, frozen hosts, interrupts ---------------------------------------------------
def test_timeout_stops_the_function_and_the_next_call_works(inv):
    @remote("ws1", inventory=inv.path, timeout=2)
    def slow(tag):
        import time
        time.sleep(30)
        return tag
    started = time.monotonic()
    with pytest.raises(DeadlineError) as info:
        slow("x")
    assert info.value.host == "ws1" and "did not finish within 2s" in str(info.value)
    assert time.monotonic() - started < 8
    # ws1 has one job slot: the next call gets it at once, so the function is gone
    started = time.monotonic()
    assert run_payload(inv["ws1"], abs, -3) == 3
    assert time.monotonic() - started < 2
    assert workers_on(inv, "ws1") == inv["ws1"].max_jobs == 1


def test_map_timeout_is_per_item(inv):
    results = inv.select(host="ws1,ws2").map(pf.sleepy, [0, 5, 0], timeout=1.5,
                                             return_exceptions=True)
    assert results[0] == 0 and results[2] == 0
    assert isinstance(results[1], DeadlineError)


def test_frozen_host_fails_a_warm_call_in_bounded_time(fleet, inv):
    host = inv["ws3"]
    assert run_payload(host, abs, -1) == 1  # warm: connection and worker up
    with paused(fleet, "ws3"):
        started = time.monotonic()
        with pytest.raises(ConnectError) as info:
            run_payload(host, pf.sleepy, 1)
        elapsed = time.monotonic() - started
    assert info.value.host == "ws3" and "stopped answering" in str(info.value)
    bound = fabfleet.config.deadlines.KEEPALIVE_INTERVAL + host.connect_timeout + 2
    assert elapsed < bound + 3, elapsed


def test_frozen_host_during_map_other_hosts_finish(fleet, inv):
    hosts = inv.select(host="ws1,ws3")
    assert hosts.map(abs, [-1, -2]) == [1, 2]  # both warm
    with paused(fleet, "ws3"):
        started = time.monotonic()
        results = hosts.map(pf.sleepy, [0.5] * 6, return_exceptions=True)
        elapsed = time.monotonic() - started
    assert len(results) == 6 and results == [0.5] * 6, results  # ws3's item went to ws1
    assert elapsed < 30


@pytest.mark.parametrize("to", ["process", "terminal group"])
def test_ctrl_c_stops_the_remote_function_and_reraises(fleet, inv, tmp_path, to):
    s = script(tmp_path, fleet, """
        import time
        from fabfleet import Inventory, remote
        @remote("gpu1", inventory=INVENTORY)
        def forever():
            import time
            print("started", flush=True)
            time.sleep(300)
        try:
            forever()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        @remote("gpu1", inventory=INVENTORY)
        def after():
            return "works"
        print(after(), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, str(s)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            start_new_session=True)
    assert proc.stdout.readline() == "started\n"
    assert workers_on(inv, "gpu1") == 1
    if to == "process":
        proc.send_signal(signal.SIGINT)
    else:  # as a terminal does: every process of the group (not our ssh sessions)
        os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert out == "interrupted\nworks\n", err
    assert wait_until(lambda: workers_on(inv, "gpu1") == 0, 10)


def test_killed_client_leaves_no_remote_worker(fleet, inv, tmp_path):
    s = script(tmp_path, fleet, """
        from fabfleet import Inventory
        def busy(i):
            import time
            print("item", i, flush=True)
            time.sleep(60)
        Inventory.load(INVENTORY).select(host="ws1,gpu1").map(busy, range(10))
    """)
    masters = subprocess.run(["pgrep", "-f", "[f]abfleet-mux-"], capture_output=True,
                             text=True).stdout.split()
    proc = subprocess.Popen([sys.executable, str(s)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    seen = set()
    # ws1 (1 slot) + gpu1 (2 slots, but one free GPU: its second A100 is nearly full,
    # and each worker on a GPU host holds a GPU of its own)
    while len(seen) < 2:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        seen.add(line)
    assert wait_until(lambda: workers_on(inv, "ws1") == 1 and workers_on(inv, "gpu1") == 1, 10)
    proc.kill()
    proc.wait()
    assert wait_until(lambda: workers_on(inv, "ws1") + workers_on(inv, "gpu1") == 0, 10)
    # and its ssh masters on this machine ended with their sessions
    assert wait_until(lambda: set(subprocess.run(
        ["pgrep", "-f", "[f]abfleet-mux-"], capture_output=True, text=True).stdout.split())
        <= set(masters), 10)


def test_a_gpu_host_whose_gpus_are_all_busy_hands_its_items_to_the_others(fleet, inv):
    """gpu1's one free A100 taken by someone else (a root process in the container): the
    map's items go to ws1, none fails with "every GPU … in use" (seen in a bench run
    while an ipyparallel engine held that GPU)."""
    box = fleet.container("gpu1")
    hold = subprocess.Popen(["docker", "exec", "-e", "CUDA_VISIBLE_DEVICES=0", box,
                             "fake-gpu-hold", "4000", "300"])
    try:
        time.sleep(1)
        got = []
        values = inv.select(host="ws1,gpu1").map(
            pf.chatty, range(6), on_output=lambda h, s, d: got.append(h))
        assert values == list(range(6))
        assert set(got) == {"ws1"}
        # alone, the host's error is the map's
        with pytest.raises(Exception, match="gpu1: GpusBusyError: every GPU on the host"):
            inv.select(host="gpu1").map(pf.chatty, range(2))
    finally:
        hold.kill()
        subprocess.run(["docker", "exec", box, "pkill", "-f", "fake-gpu-hold"],
                       capture_output=True)


# -- executor, integrity ----------------------------------------------------------------
def test_executor_submit_map_and_hosts(inv):
    with inv.select(host="ws1,gpu1").executor(timeout=30) as ex:
        fut = ex.submit(pf.fibonacci, 30)
        assert isinstance(fut, Future) and fut.result(timeout=60) == 832040
        assert fut.host in ("ws1", "gpu1")
        assert list(ex.map(pf.fibonacci, range(8))) == [pf.fibonacci(i) for i in range(8)]
        bad = ex.submit(pf.fails, "nope")
        with pytest.raises(RemoteError, match="nope"):
            bad.result(timeout=60)
    with pytest.raises(RuntimeError):
        ex.submit(abs, 1)


def test_imap_unordered_yields_as_items_complete(inv):
    order = [o.index for o in inv.select(host="ws1,ws2").imap_unordered(pf.sleepy,
                                                                        [2, 0, 0])]
    assert sorted(order) == [0, 1, 2] and order[-1] == 0


def test_forked_child_cannot_answer_for_later_calls(inv):
    def fork_then_return(tag):
        import os
        os.fork()
        return tag
    host = inv["ws2"]
    assert [run_payload(host, fork_then_return, i) for i in range(5)] == list(range(5))
    assert run_payload(host, str, "x") == "x"


def test_workers_starting_together_on_a_fresh_host(inv):
    """Both job slots of gpu1 start a worker at once on a host without our cloudpickle
    cache: both unpack it (one wins the race), neither fails."""
    for _ in range(3):
        fabfleet.close_workers()
        remote_sh(inv, "gpu1", "rm -rf ~/.cache/fabfleet")
        assert inv.select(host="gpu1").map(pf.fibonacci, range(8)) == \
            [pf.fibonacci(i) for i in range(8)]
