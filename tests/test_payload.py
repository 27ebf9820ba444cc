"""Pickled payloads against the testbed: values, errors, output, sizes, workers, map."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import payload_funcs as pf
import pytest


import fabfleet
from fabfleet import (CommandError, ConnectError, MapError, PythonMismatchError, RemoteError,
                     remote, run_payload, save_payload)
from fabfleet.ssh.exec import execute


pytestmark = pytest.mark.usefixtures("fresh_workers")


def test_clustrix_examples_match_local_results(inv):
    c = inv.connect("ws1")
    assert run_payload(c, pf.monte_carlo_pi, 20000) == pf.monte_carlo_pi(20000)
    assert run_payload(c, pf.fibonacci, 90) == pf.fibonacci(90)
    assert run_payload(c, pf.make_scaler(3), [1, 2.5]) == [3, 7.5]
    assert run_payload(c, pf.hypot_table, 5) == pf.hypot_table(5)


def test_lambdas_closures_and_main_functions(inv, tmp_path):
    offset = 10
    c = inv.connect("ws2")
    assert run_payload(c, lambda x, y=1: x + y + offset, 1, y=2) == 13
    assert run_payload(c, pf.fibonacci, n=10) == 55
    # A function defined in a script's __main__, through @remote, in a fresh interpreter.
    script = tmp_path / "main_fn.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
from fabfleet import remote

@remote("ws1", inventory={str(inv.path)!r})
def where(tag):
    import os
    return tag, open("/etc/fabfleet-host").read().strip(), os.getpid() != {0}

print(where("t1"))
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "('t1', 'ws1', True)"


def test_remote_decorator_finds_inventory_like_the_cli(fleet, monkeypatch):
    monkeypatch.setenv("FABFLEET_INVENTORY", str(fleet.inventory_path))

    @remote("gpu1")
    def host_marker():
        return open("/etc/fabfleet-host").read().strip()
    assert host_marker() == "gpu1"
    assert host_marker.local is not None


def test_remote_exception_carries_host_type_and_traceback(inv):
    with pytest.raises(RemoteError) as exc:
        run_payload(inv.connect("ws1"), pf.fails, "bad input 42")
    err = exc.value
    assert err.host == "ws1" and err.remote_type == "ValueError"
    assert err.remote_message == "bad input 42"
    assert "in inner" in err.remote_traceback and "payload_funcs.py" in err.remote_traceback
    # file and line of by-value code (cloudpickle 3.1 would write <dynamic-code>), and the
    # source line from this machine, as a local traceback shows it
    assert f'{pf.__file__}", line 44, in inner' in err.remote_traceback
    assert "    raise ValueError(message)" in err.remote_traceback
    assert "<dynamic-code>" not in err.remote_traceback
    assert str(err).startswith("ws1: ValueError: bad input 42")
    # the worker survives a raising function
    assert run_payload(inv.connect("ws1"), pf.fibonacci, 5) == 5


def test_prints_arrive_while_the_function_runs(inv, capfd):
    started = time.monotonic()
    seen = []

    def watch(host, stream, data):
        seen.append((time.monotonic() - started, host, stream, data))
    fabfleet.call_on_host(inv["ws1"], fabfleet.host.payload.dumps_call(pf.chatty, 4), on_output=watch)
    ended = time.monotonic() - started
    first = next(t for t, _, s, d in seen if b"step 0" in d)
    assert ended - first > 1.0
    assert b"".join(d for *_, s, d in seen if s == "stdout") == b"".join(
        b"step %d\n" % i for i in range(4))
    # by default prints go to our stdout
    run_payload(inv.connect("ws1"), print, "hello from afar")
    assert "hello from afar" in capfd.readouterr().out


def test_32mb_argument_and_result(inv):
    big = bytes(range(256)) * (32 * 4096)
    assert len(big) == 32 << 20
    c = inv.connect("ws3")
    started = time.monotonic()
    digest = run_payload(c, lambda b: __import__("hashlib").sha256(b).hexdigest(), big)
    assert digest == __import__("hashlib").sha256(big).hexdigest()
    back = run_payload(c, lambda n: b"z" * n, 32 << 20)
    assert back == b"z" * (32 << 20)
    assert time.monotonic() - started < 30


def test_version_mismatch_is_refused_before_sending(inv):
    with pytest.raises(PythonMismatchError) as exc:
        run_payload(inv.connect("oldpy"), pf.fibonacci, 3)
    msg = str(exc.value)
    assert msg.startswith("oldpy: refusing to send a pickled function")
    assert "PyPy 3.9" in msg and f"CPython {sys.version_info[0]}.{sys.version_info[1]}" in msg
    assert "Nothing was sent" in msg


def test_host_without_python_and_down_host(inv):
    with pytest.raises(CommandError, match=r"^nopy: Python interpreter 'python3' was not found"):
        run_payload(inv.connect("nopy"), pf.fibonacci, 3)
    with pytest.raises(ConnectError, match="^down: could not connect"):
        run_payload(inv.connect("down"), pf.fibonacci, 3)


def test_cloudpickle_is_shipped_and_cached(inv, fleet):
    with inv.connect("gpu1") as c:
        execute(c, "rm -rf ~/.cache/fabfleet")
        assert "No module named 'cloudpickle'" in execute(
            c, "python3 -c 'import cloudpickle'").stderr
    assert run_payload(inv.connect("gpu1"), pf.fibonacci, 20) == 6765
    import cloudpickle
    with inv.connect("gpu1") as c:
        listing = execute(c, "ls ~/.cache/fabfleet/").stdout.split()
    # cloudpickle, and the host-side programs' bytecode (see hostside/boot.py)
    assert listing == ["bytecode", f"cloudpickle-{cloudpickle.__version__}"]


@pytest.fixture(params=["openssh", "paramiko"])
def worker_path(request, monkeypatch):
    """Workers as sessions of the laptop's ssh (the default where it has one), or as
    Paramiko channels (FABFLEET_OPENSSH=0, or no ssh): both must keep every promise."""
    fabfleet.close_workers()
    monkeypatch.setenv("FABFLEET_OPENSSH", "1" if request.param == "openssh" else "0")
    yield request.param
    fabfleet.close_workers()


def local_masters() -> set[str]:
    """Our ssh masters running on this machine (their command lines name the socket)."""
    out = subprocess.run(["pgrep", "-f", "[f]abfleet-mux-"], capture_output=True, text=True)
    return set(out.stdout.split())


def test_dead_worker_is_replaced_transparently(inv, worker_path):
    host = inv["ws2"]
    first = fabfleet.call_on_host(host, fabfleet.host.payload.dumps_call(__import__("os").getpid))
    with inv.connect("ws2") as c:
        execute(c, f"kill -9 {first}")
    time.sleep(0.2)
    second = fabfleet.call_on_host(host, fabfleet.host.payload.dumps_call(__import__("os").getpid))
    assert second != first


def test_worker_dying_during_a_call_is_reported_not_retried(inv, tmp_path, worker_path):
    marker = f"/tmp/fabfleet-ran-{time.time_ns()}"

    def crash():
        import os
        with open(marker, "a") as f:
            f.write("x")
        os._exit(3)
    with pytest.raises(CommandError) as exc:
        run_payload(inv.connect("ws1"), crash)
    assert str(exc.value).startswith("ws1: the Python worker exited with code 3")
    with inv.connect("ws1") as c:
        assert execute(c, f"cat {marker}").stdout == "x"  # ran exactly once
    assert run_payload(inv.connect("ws1"), pf.fibonacci, 6) == 8  # next call: fresh worker


def test_warm_calls_reuse_connection_and_worker(inv, worker_path):
    c = inv.connect("ws1")
    before = local_masters()
    pids = {run_payload(c, __import__("os").getpid) for _ in range(20)}
    assert len(pids) == 1
    pool = fabfleet.host.pool.pool_for(inv["ws1"])
    assert len(pool.conns) == 1 and len(pool.idle) == 1
    assert pool.idle[0].via == worker_path
    master = getattr(pool.conns[0], "_fabfleet_master", None)
    if worker_path == "paramiko":
        assert master is None and local_masters() == before
        return
    # the master's socket: in a directory only we may enter, the socket only ours
    assert os.stat(master.private).st_mode & 0o777 == 0o700
    assert os.stat(master.path).st_uid == os.getuid()
    assert local_masters() - before
    fabfleet.close_workers()  # the master, its socket and the remote worker go with it
    assert not os.path.exists(master.private) and master.proc is None
    assert local_masters() <= before
    with inv.connect("ws1") as conn:
        assert execute(conn, "pgrep -f '[f]abfleet-worker' -u dev | wc -l").stdout.strip() \
            == "0"


def test_an_ssh_that_refuses_the_host_leaves_workers_on_paramiko(inv, monkeypatch, tmp_path):
    """The laptop's ssh refuses what our own checks accepted (an older ssh, a stricter
    ssh_config, a key ssh cannot use): the calls still run, on Paramiko channels, and
    nothing of the failed ssh lingers. Never a connection with weaker checks."""
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Host key verification failed.' >&2\nexit 255\n")
    fake.chmod(0o755)
    fabfleet.close_workers()
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    assert run_payload(inv.connect("ws2"), pf.fibonacci, 10) == 55
    pool = fabfleet.host.pool.pool_for(inv["ws2"])
    assert [w.via for w in pool.idle] == ["paramiko"]
    master = pool.conns[0]._fabfleet_master
    assert master.failed == "ssh exited with 255: Host key verification failed."
    fabfleet.close_workers()
    assert not os.path.exists(master.private)


def test_map_keeps_order_spreads_and_reports_item_errors(inv):
    lab = inv.select(group="lab")

    def where(x):
        import time
        time.sleep(0.2)
        if x == 5:
            raise KeyError("five")
        return x * x, open("/etc/fabfleet-host").read().strip()
    with pytest.raises(MapError) as exc:
        lab.map(where, range(10))
    outcomes = exc.value.outcomes
    assert [o.index for o in outcomes] == list(range(10))
    assert [o.value[0] for o in outcomes if o.ok] == [x * x for x in range(10) if x != 5]
    assert len({o.host for o in outcomes}) >= 3  # spread over hosts
    bad = outcomes[5]
    assert isinstance(bad.error, RemoteError) and bad.error.remote_type == "KeyError"
    assert str(exc.value).startswith(f"1/10 items failed; item 5 on {bad.host}: RemoteError")
    values = lab.map(where, range(10), return_exceptions=True)
    assert isinstance(values[5], RemoteError) and values[3][0] == 9


def test_map_routes_around_dead_and_mismatched_hosts(inv):
    hosts = inv.select(host="ws1,down,oldpy")
    assert hosts.map(pf.fibonacci, range(12)) == [pf.fibonacci(i) for i in range(12)]


def test_run_pickle_cli_saves_results_and_summary(fleet, tmp_path):
    save_payload(tmp_path / "job.pkl", pf.fibonacci, 30)
    save_payload(tmp_path / "bad.pkl", pf.fails, "nope")
    r = fleet.cli("run-pickle", "--host", "ws1,gpu1,down", str(tmp_path / "job.pkl"),
                inventory=fleet.inventory_path, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    for h in ("ws1", "gpu1"):
        with open(tmp_path / "gathered" / h / "job.result.pkl", "rb") as f:
            assert pickle.load(f) == 832040
    summary = json.loads((tmp_path / "gathered" / "job.summary.json").read_text())
    assert summary["hosts"]["ws1"]["ok"] and not summary["hosts"]["down"]["ok"]
    assert summary["hosts"]["down"]["error_type"] == "ConnectError"
    r = fleet.cli("run-pickle", "--host", "ws1", str(tmp_path / "bad.pkl"),
                inventory=fleet.inventory_path, cwd=tmp_path)
    assert r.returncode == 1 and "ValueError: nope" in r.stdout
    summary = json.loads((tmp_path / "gathered" / "bad.summary.json").read_text())
    assert "in inner" in summary["hosts"]["ws1"]["traceback"]
    (tmp_path / "junk.pkl").write_bytes(b"not a payload")
    r = fleet.cli("run-pickle", "--host", "ws1", str(tmp_path / "junk.pkl"),
                inventory=fleet.inventory_path, cwd=tmp_path)
    assert r.returncode == 2 and "not a fabfleet payload" in r.stderr
