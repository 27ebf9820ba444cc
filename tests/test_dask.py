"""Dask on the inventory's hosts (real scheduler, real workers), with dask/distributed
installed in the project's venv on the hosts at the local version — from wheels pushed
with the project, as on hosts without Internet access."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import install_pinned, remove_project, sh

distributed = pytest.importorskip("distributed")


HOSTS = "ws1,ws2,ws3"


def dask_processes(fleet, name: str) -> int:
    out = sh(fleet, name, "pgrep -f '[d]istributed.cli' -u dev | wc -l")
    return int(out.strip())


@pytest.fixture(scope="module")
def daskproj(fleet, tmp_path_factory) -> Path:
    proj = tmp_path_factory.mktemp("dask") / "daskproj"
    proj.mkdir()
    (proj / "pyproject.toml").write_text("")
    (proj / "daskfuncs.py").write_text(
        "def inc(x):\n    return x + 1\n\n\n"
        "def slow_square(x):\n    import time\n    time.sleep(0.2)\n    return x * x\n")
    install_pinned(fleet, proj, ("dask", "distributed", "cloudpickle", "msgpack"), HOSTS,
                   "Dask")
    yield proj
    remove_project(fleet, proj, HOSTS)


def project_funcs(monkeypatch, daskproj):
    """The project's own module, imported here as the user's code would be."""
    monkeypatch.chdir(daskproj)
    monkeypatch.syspath_prepend(str(daskproj))
    import daskfuncs
    return daskfuncs


def test_client_on_three_hosts_then_nothing_left(fleet, daskproj, monkeypatch):
    f = project_funcs(monkeypatch, daskproj)
    hosts = fleet.inventory().select(host=HOSTS)
    with hosts.dask() as client:
        workers = client.scheduler_info()["workers"].values()
        assert len(workers) == sum(h.max_jobs for h in hosts) == 3
        assert client.gather(client.map(f.inc, range(200))) == [x + 1 for x in range(200)]
        assert client.submit(f.inc, 41).result() == 42
        assert client.submit(lambda x: x * 3, 5).result() == 15  # by value
        where = set(client.run(lambda: open("/etc/fabfleet-host").read().strip()).values())
        assert where == {"ws1", "ws2", "ws3"}
        url = client.fabfleet_cluster.dashboard()
        import urllib.request
        assert urllib.request.urlopen(url, timeout=30).status == 200
    for name in HOSTS.split(","):
        assert dask_processes(fleet, name) == 0


def test_a_killed_worker_host_mid_map(fleet, daskproj, monkeypatch):
    f = project_funcs(monkeypatch, daskproj)
    import testbed
    hosts = fleet.inventory().select(host=HOSTS)
    try:
        with hosts.dask(death_timeout="20s") as client:
            futures = client.map(f.slow_square, range(60))
            done = threading.Event()

            def kill_when_started():
                deadline = time.monotonic() + 30
                while sum(f.done() for f in futures) < 5 and time.monotonic() < deadline:
                    time.sleep(0.05)
                subprocess.run(["docker", "kill", fleet.container("ws3")], capture_output=True)
                done.set()
            threading.Thread(target=kill_when_started, daemon=True).start()
            assert client.gather(futures) == [x * x for x in range(60)]
            assert done.is_set()
    finally:
        subprocess.run(["docker", "start", fleet.container("ws3")], capture_output=True)
        deadline = time.monotonic() + 60
        while not testbed.ssh_ready(fleet.port("ws3")) and time.monotonic() < deadline:
            time.sleep(0.2)
    for name in ("ws1", "ws2"):
        assert dask_processes(fleet, name) == 0


def test_a_mismatch_is_refused_before_anything_starts(fleet, daskproj, tmp_path, monkeypatch):
    other = tmp_path / "otherproj"  # no venv there: the hosts' system Python has no Dask
    other.mkdir()
    (other / "pyproject.toml").write_text("")
    monkeypatch.chdir(other)
    from fabfleet import FanOutError
    with pytest.raises(FanOutError) as info:
        with fleet.inventory().select(host="ws1,ws2").dask():
            pass
    assert "ws1: cannot join a Dask cluster" in str(info.value)
    assert "dask is not installed there" in str(info.value) and "setup-workdir" in str(info.value)
    r = fleet.cli("jobs", "-H", "ws1", "--json", inventory=fleet.inventory_path, cwd=other)
    assert json.loads(r.stdout)["hosts"]["ws1"]["runs"] == []  # nothing was started


def test_the_core_install_says_how_to_get_dask(fleet, daskproj):
    r = fleet.cli("dask-up", "-H", "ws1", inventory=fleet.inventory_path, cwd=daskproj)
    assert r.returncode == 2 and "pip install 'fabfleet[dask]'" in r.stderr
    assert "Traceback" not in r.stderr


def test_dask_up_and_down(fleet, daskproj):
    from conftest import user_cli
    with_dask = Path(sys.executable).parent  # this environment has the dask extra
    r = user_cli(with_dask, "dask-up", "-H", "ws1,ws2", inventory=fleet.inventory_path,
                 cwd=daskproj, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "scheduler: tls://127.0.0.1:" in r.stdout and "(2 workers on 2 hosts)" in r.stdout
    assert "security=Security(tls_ca_file=" in r.stdout  # how to connect with the certs
    assert dask_processes(fleet, "ws1") >= 2  # scheduler + worker(s)
    r = user_cli(with_dask, "dask-down", "-H", "ws1,ws2", inventory=fleet.inventory_path,
                 cwd=daskproj)
    assert r.returncode == 0, r.stdout + r.stderr
    assert dask_processes(fleet, "ws1") == 0 and dask_processes(fleet, "ws2") == 0


def test_the_cluster_admits_only_holders_of_its_certificates(fleet, daskproj, monkeypatch):
    """TLS by default: a client without the cluster's certificates (anyone on the network,
    another user of the host) cannot connect, in plain TCP or in TLS; the certificates
    on the hosts are 0600 in a 0700 dir."""
    import ssl

    from distributed import Client, Security
    f = project_funcs(monkeypatch, daskproj)
    hosts = fleet.inventory().select(host="ws1,ws2")
    with hosts.dask() as client:
        cluster = client.fabfleet_cluster
        assert cluster.address.startswith("tls://")
        assert client.submit(f.inc, 1).result() == 2
        port = int(cluster.address.rsplit(":", 1)[1])
        with pytest.raises((OSError, TimeoutError, ssl.SSLError)):
            Client(f"tcp://127.0.0.1:{port}", timeout=5)
        other = cluster_credentials_elsewhere()
        with pytest.raises((OSError, TimeoutError, ssl.SSLError)):
            Client(f"tls://127.0.0.1:{port}", timeout=5, security=Security(
                tls_ca_file=str(other / "ca.pem"), tls_client_cert=str(other / "cert.pem"),
                tls_client_key=str(other / "key.pem"), require_encryption=True))
        where = cluster.remote_tls["ws1"].replace("~", "$HOME", 1)
        modes = sh(fleet, "ws1", f"stat -c '%a' {where} {where}/*").split()
        assert modes == ["700", "600", "600", "600"]
    assert sh(fleet, "ws1", f"ls -d {where} 2>/dev/null || echo gone").strip() == "gone"


def cluster_credentials_elsewhere():
    """Certificates of another cluster: valid TLS, the wrong CA."""
    import tempfile

    from fabfleet.apps.dask import cluster_credentials
    d = Path(tempfile.mkdtemp())
    for name, data in cluster_credentials().items():
        (d / name).write_bytes(data)
    return d


@pytest.mark.lab
def test_dask_on_a_host_whose_address_is_not_loopback_and_a_co_tenant(fleet, daskproj,
                                                                       monkeypatch):
    """The lab host ``stock`` listens on 127.0.0.6 (as a LAN host would on its own
    address): the client's tunnel goes there. Another user of that host, eve, can
    neither read the cluster's certificates nor complete a TLS handshake without one."""
    from conftest import user_cli
    monkeypatch.setenv("FABFLEET_SSH_CONFIG", str(fleet.lab_ssh_config))
    env = {"FABFLEET_SSH_CONFIG": str(fleet.lab_ssh_config)}
    subprocess.run(["docker", "exec", "-u", "dev", fleet.container("stock"), "sh", "-c",
                    f"rm -rf ~/fabfleet/{daskproj.name}"], check=True)  # a kept testbed's
    for args in (["push", "-H", "stock"],
                 ["setup-workdir", "-H", "stock", "--requirements", "requirements.txt"]):
        r = user_cli(fleet.bin, *args, inventory=fleet.lab_inventory, cwd=daskproj,
                     timeout=600, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
    f = project_funcs(monkeypatch, daskproj)
    from fabfleet import Inventory
    hosts = Inventory.load(fleet.lab_inventory).select(host="stock")
    with hosts.dask() as client:
        cluster = client.fabfleet_cluster
        assert cluster.address.startswith("tls://127.0.0.6:")
        assert client.submit(f.inc, 41).result() == 42
        port = int(cluster.address.rsplit(":", 1)[1])
        where = cluster.remote_tls["stock"].replace("~", "/home/dev", 1)
        as_eve = ["docker", "exec", "-u", "eve", fleet.container("stock"), "python3", "-c"]
        read = subprocess.run(as_eve + [f"open({where + '/key.pem'!r}).read()"],
                              capture_output=True, text=True, timeout=30)
        assert read.returncode != 0 and "Permission denied" in read.stderr
        handshake = (
            "import socket, ssl\n"
            "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n"
            "ctx.check_hostname = False\nctx.verify_mode = ssl.CERT_NONE\n"
            f"s = ctx.wrap_socket(socket.create_connection(('127.0.0.6', {port}), 5))\n"
            "s.sendall(b'hello'); print('answered', s.recv(10))\n")
        knock = subprocess.run(as_eve + [handshake], capture_output=True, text=True,
                               timeout=30)
        assert knock.returncode != 0 and "answered" not in knock.stdout, knock.stdout
    sh_lab = subprocess.run(["docker", "exec", "-u", "dev", fleet.container("stock"), "sh",
                             "-c", f"rm -rf ~/fabfleet/.venvs/{daskproj.name}"])
    assert sh_lab.returncode == 0
