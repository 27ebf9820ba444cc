"""`inv check-env` and `inv hosts` as a user runs them, against the testbed."""

from __future__ import annotations

import json
import time



from fabfleet import check_env, check_hosts, fan_out


def test_check_env_json_contract(fleet):
    r = fleet.cli("check-env", "--all", "--json", inventory=fleet.inventory_path)
    assert r.returncode == 1, r.stderr  # nopy, oldpy's missing nothing, down: not all ok
    doc = json.loads(r.stdout)
    assert set(doc) == {"ok", "hosts"} and doc["ok"] is False
    hosts = doc["hosts"]
    assert list(hosts) == ["ws1", "ws2", "gpu1", "ws3", "nopy", "oldpy", "down"]
    for name in ("ws1", "ws2", "gpu1", "ws3"):
        h = hosts[name]
        assert h["ok"] is True and h["error"] is None, h
        assert h["python"].startswith("3.11.") and h["python_matches_local"] is True
        assert h["cpus"] >= 1 and h["mem_total"] > 0 and h["disk_free"] > 0
        assert h["work_dir_writable"] is True
    assert len(hosts["gpu1"]["gpus"]) == 2 and hosts["ws1"]["gpus"] == []
    assert hosts["nopy"]["ok"] is False and "'python3' was not found" in hosts["nopy"]["error"]
    assert hosts["oldpy"]["python"].startswith("3.9") and hosts["oldpy"]["python_matches_local"] \
        is False
    assert hosts["down"]["ok"] is False and hosts["down"]["python"] is None
    assert hosts["down"]["error"].startswith("down: could not connect to 127.0.0.1:")


def test_check_env_exit_zero_when_all_pass_and_table(fleet):
    r = fleet.cli("check-env", "--group", "lab", inventory=fleet.inventory_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4/4 hosts ready" in r.stdout
    assert "2× A100-SXM4-40GB" in r.stdout


def test_require_missing_package_fails_with_advice(fleet):
    r = fleet.cli("check-env", "--host", "ws1", "--require", "json,numpy", "--json",
                inventory=fleet.inventory_path)
    assert r.returncode == 1
    ws1 = json.loads(r.stdout)["hosts"]["ws1"]
    assert ws1["packages"]["numpy"] is None and ws1["packages"]["json"]
    assert "required packages missing: numpy" in ws1["error"]


def test_unknown_host_lists_known_ones(fleet):
    r = fleet.cli("check-env", "--host", "ws9", inventory=fleet.inventory_path)
    assert r.returncode == 2
    assert "no host matches 'ws9'; known hosts: ws1, ws2, gpu1, ws3, nopy, oldpy, down" in r.stderr
    assert "Traceback" not in r.stderr


def test_broken_yaml_and_password_are_clean_errors(fleet, tmp_path):
    bad = tmp_path / "inv.yaml"
    bad.write_text("hosts:\n  ws1: {port: 22\n")
    r = fleet.cli("check-env", "--all", inventory=bad)
    assert r.returncode == 2 and f"{bad}: not valid YAML (line" in r.stderr
    bad.write_text("hosts:\n  ws1: {password: s3cret}\n")
    r = fleet.cli("hosts", inventory=bad)
    assert r.returncode == 2 and "hosts.ws1.password: passwords are not accepted" in r.stderr
    assert "s3cret" not in r.stderr and "Traceback" not in r.stderr


def test_unknown_host_key_in_check_env(fleet, tmp_path):
    empty = tmp_path / "kh"
    empty.write_text("")
    text = fleet.inventory_path.read_text().replace(str(fleet.known_hosts), str(empty))
    inv = tmp_path / "inv.yaml"
    inv.write_text(text)
    r = fleet.cli("check-env", "--host", "ws2", "--json", inventory=inv)
    ws2 = json.loads(r.stdout)["hosts"]["ws2"]
    assert r.returncode == 1 and ws2["ok"] is False and ws2["error_type"] == "HostKeyError"
    assert "ssh-keyscan -p" in ws2["error"]


def test_hosts_table(fleet):
    r = fleet.cli("hosts", inventory=fleet.inventory_path)
    assert r.returncode == 0
    for name in ("ws1", "gpu1", "down", "pypy3", "lab,gpu"):
        assert name in r.stdout


def test_library_check_env_on_a_connection(fleet):
    inv = fleet.inventory()
    with inv.connect("gpu1") as c:
        report = check_env(c)
    assert report["ok"] is True and report["gpus"][0]["memory_total_mib"] == 40960


def test_dead_host_does_not_delay_the_others(fleet):
    """`down` is refused at once; a hung host costs its own timeout, not everyone's."""
    inv = fleet.inventory()
    started = time.monotonic()
    report = check_hosts(inv.select(host="ws1,ws2,gpu1,down"))
    assert time.monotonic() - started < 5
    assert [n for n, h in report["hosts"].items() if h["ok"]] == ["ws1", "ws2", "gpu1"]


def test_fan_out_deadline_and_bound():
    """Pure fan-out behaviour (callables, no SSH): bounded, deadline per host, order kept."""
    from fabfleet import Host
    hosts = [Host(f"h{i}") for i in range(6)]
    live = []
    peak = []

    def fn(h):
        live.append(h.name)
        peak.append(len(live))
        time.sleep(30 if h.name == "h2" else 0.2)
        live.remove(h.name)
        if h.name == "h4":
            raise ValueError("boom")
        return h.name.upper()

    started = time.monotonic()
    res = fan_out(hosts, fn, max_workers=3, timeout=1.0)
    assert time.monotonic() - started < 3
    assert max(peak) <= 3
    assert list(res) == [h.name for h in hosts]
    assert res.succeeded == {"h0": "H0", "h1": "H1", "h3": "H3", "h5": "H5"}
    assert set(res.failed) == {"h2", "h4"}
    assert res.summary().startswith("4/6 hosts ok; h2: ConnectError: no answer within the 1s")
    assert "h4: ValueError: boom" in res.summary()


def test_another_projects_tasks_py_can_import_fabfile(fleet, tmp_path):
    (tmp_path / "tasks.py").write_text(
        "from invoke import task\n"
        "from fabfleet import Inventory, check_env\n\n"
        "@task\n"
        "def ready(c, name):\n"
        "    inv = Inventory.load(c.config.get('inv_path') or __import__('os').environ"
        "['FABFLEET_INVENTORY'])\n"
        "    with inv.connect(name) as conn:\n"
        "        print(name, check_env(conn)['ok'])\n")
    import subprocess
    import sys
    import os
    r = subprocess.run([sys.executable, "-m", "invoke", "ready", "ws2"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "FABFLEET_INVENTORY": str(fleet.inventory_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ws2 True"
