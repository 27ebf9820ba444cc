"""ipyparallel on the inventory's hosts: a real controller and real engines, with
ipyparallel installed in the project's venv on the hosts at the local version (from
wheels pushed with the project, as on hosts without Internet access), a client here
through tunnels, ``%px`` in a real kernel."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import install_pinned, remove_project, sh

ipyparallel = pytest.importorskip("ipyparallel")

HOSTS = "ws1,ws2,ws3,gpu1"
PINS = ("ipyparallel", "cloudpickle")


def ipp_processes(fleet, name: str) -> int:
    out = sh(fleet, name, "pgrep -f '[i]pyparallel\\.(controller|engine)' -u dev | wc -l")
    return int(out.strip())


@pytest.fixture(scope="module")
def ippproj(fleet, tmp_path_factory) -> Path:
    proj = tmp_path_factory.mktemp("ipp") / "ippproj"
    proj.mkdir()
    (proj / "pyproject.toml").write_text("")
    (proj / "ippfuncs.py").write_text(
        "import os\n\n\n"
        "def inc(x):\n    return x + 1\n\n\n"
        "def where():\n    return open('/etc/fabfleet-host').read().strip()\n\n\n"
        "def gpu():\n    return os.environ.get('CUDA_VISIBLE_DEVICES')\n")
    install_pinned(fleet, proj, PINS, HOSTS, "ipyparallel")
    yield proj
    remove_project(fleet, proj, HOSTS)


def project_funcs(monkeypatch, proj):
    """The project's own module, imported here as the user's code would be."""
    monkeypatch.chdir(proj)
    monkeypatch.syspath_prepend(str(proj))
    import ippfuncs
    return ippfuncs


def test_engines_on_three_hosts_pinned_gpus_then_nothing_left(fleet, ippproj, monkeypatch):
    f = project_funcs(monkeypatch, ippproj)
    hosts = fleet.inventory().select(host="ws1,ws2,gpu1")
    with hosts.ipyparallel() as rc:
        cluster = rc.fabfleet_cluster
        # ws1 1, ws2 1, gpu1 (max_jobs 2) 1: one of its two A100s is busy (38 GiB used
        # by someone else), so one engine, pinned to the free one
        assert len(rc.ids) == cluster.n_engines == 3
        assert cluster.engines == {"ws1": 1, "ws2": 1, "gpu1": 1}
        dv = rc[:]
        assert dv.apply_sync(f.inc, 1) == [2, 2, 2]
        hosts_of = dv.apply_sync(f.where)
        assert sorted(hosts_of) == ["gpu1", "ws1", "ws2"]
        pinned = dict(zip(hosts_of, dv.apply_sync(f.gpu)))
        assert pinned == {"gpu1": "GPU-5f0b7c2e-4a1d-4c35-9a0e-0d6b1c3f9e11", "ws1": None,
                          "ws2": None}
        assert dv.map_sync(f.inc, range(40)) == list(range(1, 41))
        ar = dv.execute("print('from', open('/etc/fabfleet-host').read().strip())",
                        block=True)
        assert sorted(s.strip() for s in ar.stdout) == ["from gpu1", "from ws1", "from ws2"]
        where = cluster.dirs["ws1"].replace("~", "$HOME", 1)
        modes = sh(fleet, "ws1", f"stat -c '%a %n' {where} {where}/engine.json "
                   f"{where}/profile/security/*.json {where}/profile/*.py").split("\n")
        assert [m.split()[0] for m in modes if m] == ["700", "600", "600", "600", "600"]
        # the controller listens on the host's address, behind CurveZMQ: the
        # connection info has the server key, and the tunnels are local
        assert cluster.info["curve_serverkey"] and cluster.listen == "127.0.0.1"
        assert cluster.connection_info()["interface"] == "tcp://127.0.0.1"
        local = Path(cluster.connection_file)  # for another client on this machine
        assert oct(local.stat().st_mode & 0o777) == "0o600"
        assert oct(local.parent.stat().st_mode & 0o777) == "0o700"
        other = ipyparallel.Client(str(local), timeout=30)
        try:
            assert sorted(other[:].apply_sync(f.where)) == ["gpu1", "ws1", "ws2"]
        finally:
            other.close()
    for name in ("ws1", "ws2", "gpu1"):
        assert ipp_processes(fleet, name) == 0
    assert sh(fleet, "ws1", f"ls -d {where} 2>/dev/null || echo gone").strip() == "gone"
    assert not local.exists()


def test_a_killed_engine_host_leaves_the_others_working(fleet, ippproj, monkeypatch):
    f = project_funcs(monkeypatch, ippproj)
    import testbed
    hosts = fleet.inventory().select(host="ws1,ws2,ws3")
    try:
        with hosts.ipyparallel() as rc:
            assert sorted(rc[:].apply_sync(f.where)) == ["ws1", "ws2", "ws3"]
            subprocess.run(["docker", "kill", fleet.container("ws3")], capture_output=True,
                           check=True)
            deadline = time.monotonic() + 60  # the controller drops it after 5 heartbeats
            while len(rc.ids) > 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert len(rc.ids) == 2
            assert sorted(rc[:].apply_sync(f.where)) == ["ws1", "ws2"]
            assert rc[:].map_sync(f.inc, range(10)) == list(range(1, 11))
    finally:
        subprocess.run(["docker", "start", fleet.container("ws3")], capture_output=True)
        deadline = time.monotonic() + 60
        while not testbed.ssh_ready(fleet.port("ws3")) and time.monotonic() < deadline:
            time.sleep(0.2)
    for name in ("ws1", "ws2"):
        assert ipp_processes(fleet, name) == 0


def test_engines_stop_when_their_controller_is_gone(fleet, ippproj, monkeypatch):
    """The controller killed from outside (not by fabfleet): the engines on every host
    stop by themselves after their missed heartbeats."""
    project_funcs(monkeypatch, ippproj)
    cluster = fleet.inventory().select(host="ws1,ws2").ipyparallel()
    rc = cluster.open()
    try:
        assert len(rc.ids) == 2
        rc.close()
        cluster.rc = None
        sh(fleet, "ws1", "pkill -KILL -f '[i]pyparallel.controller'")
        deadline = time.monotonic() + 60
        while ipp_processes(fleet, "ws2") and time.monotonic() < deadline:
            time.sleep(1)
        assert ipp_processes(fleet, "ws2") == 0
        assert ipp_processes(fleet, "ws1") == 0
    finally:
        cluster.close()


def test_a_gpu_host_whose_gpus_are_all_busy_starts_nothing(fleet, ippproj, monkeypatch):
    """gpu1's one free A100 taken by another process: no engine could be pinned there,
    so the cluster does not start (rather than silently missing that host) and nothing
    is left running on ws1."""
    project_funcs(monkeypatch, ippproj)
    hold = subprocess.Popen(["docker", "exec", "-e", "CUDA_VISIBLE_DEVICES=0",
                             fleet.container("gpu1"), "fake-gpu-hold", "4000", "120"])
    try:
        time.sleep(1)
        from fabfleet import CommandError
        with pytest.raises(CommandError) as info:
            with fleet.inventory().select(host="ws1,gpu1").ipyparallel():
                pass
        assert info.value.host == "gpu1" and "every GPU of the host is in use" in str(info.value)
    finally:  # the holder is root's in the container: dev cannot stop it
        hold.kill()
        subprocess.run(["docker", "exec", fleet.container("gpu1"), "pkill", "-f",
                        "fake-gpu-hold"], capture_output=True)
        deadline = time.monotonic() + 10
        while "fake-gpu-hold" in sh(fleet, "gpu1", "ps -eo args") and \
                time.monotonic() < deadline:
            time.sleep(0.2)
    for name in ("ws1", "gpu1"):
        assert ipp_processes(fleet, name) == 0


def test_a_host_without_ipyparallel_is_refused_before_anything_starts(fleet, ippproj,
                                                                      tmp_path, monkeypatch):
    other = tmp_path / "otherproj"  # no venv there: the hosts' system Python has none
    other.mkdir()
    (other / "pyproject.toml").write_text("")
    monkeypatch.chdir(other)
    from fabfleet import FanOutError
    with pytest.raises(FanOutError) as info:
        with fleet.inventory().select(host="ws1,ws2").ipyparallel():
            pass
    text = str(info.value)
    assert "ws1: cannot join an ipyparallel cluster" in text, text
    assert "ipyparallel is not installed there" in text and "setup-workdir" in text
    assert "ws2:" in text
    r = fleet.cli("jobs", "-H", "ws1", "--json", inventory=fleet.inventory_path, cwd=other)
    assert json.loads(r.stdout)["hosts"]["ws1"]["runs"] == []  # nothing was started


def test_the_core_install_says_how_to_get_ipyparallel(fleet, ippproj):
    r = fleet.cli("ipp-up", "-H", "ws1", inventory=fleet.inventory_path, cwd=ippproj)
    assert r.returncode == 2 and "pip install 'fabfleet[ipyparallel]'" in r.stderr
    assert "Traceback" not in r.stderr


def test_ipp_up_attach_and_down(fleet, ippproj, monkeypatch):
    from conftest import user_cli
    f = project_funcs(monkeypatch, ippproj)
    with_ipp = Path(sys.executable).parent  # this environment has the extra
    r = user_cli(with_ipp, "ipp-up", "-H", "ws1,ws2", inventory=fleet.inventory_path,
                 cwd=ippproj, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 engines on 2 hosts" in r.stdout and "ipyparallel(attach=True)" in r.stdout
    try:
        assert ipp_processes(fleet, "ws1") >= 2  # controller + engine
        r2 = fleet.cli("jobs", "-H", "ws1", "--json", inventory=fleet.inventory_path,
                       cwd=ippproj)
        tags = sorted(run["command"] for run in json.loads(r2.stdout)["hosts"]["ws1"]["runs"]
                      if run["status"] == "running")
        assert len(tags) == 2  # the controller and the engines are ordinary jobs
        hosts = fleet.inventory().select(host="ws1,ws2")
        with hosts.ipyparallel(attach=True) as rc:  # another process: only attaches
            assert sorted(rc[:].apply_sync(f.where)) == ["ws1", "ws2"]
        with hosts.ipyparallel(attach=True) as rc:  # the cluster is still there
            assert rc[:].apply_sync(f.inc, 1) == [2, 2]
    finally:
        r = user_cli(with_ipp, "ipp-down", "-H", "ws1,ws2", inventory=fleet.inventory_path,
                     cwd=ippproj)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ipp_processes(fleet, "ws1") == 0 and ipp_processes(fleet, "ws2") == 0
    left = sh(fleet, "ws1", f"ls -a ~/fabfleet/{ippproj.name}/.fabfleet/runs 2>/dev/null "
              "| grep -c '^.ipp-' || true")
    assert left.strip() == "0"
    with pytest.raises(Exception, match="no ipyparallel controller"):
        fleet.inventory().select(host="ws1,ws2").ipyparallel(attach=True)


# -- %px in a real kernel ------------------------------------------------------------
PX_CELLS = [
    """import os
os.environ["FABFLEET_INVENTORY"] = {inventory!r}
from fabfleet import Inventory
cluster = Inventory.load(os.environ["FABFLEET_INVENTORY"]).select(host="ws1,ws2").ipyparallel()
rc = cluster.open()
dv = rc[:]
dv.block = True  # %px waits for its results, as in ipyparallel's own examples
dv.activate()
print(len(rc.ids), "engines")""",
    """%px import ippfuncs""",
    """%%px
print("on", ippfuncs.where(), ippfuncs.inc(41))""",
    """%px x = ippfuncs.inc(1)""",
    """print(sorted(rc[:]["x"]))""",
    """def triple(x):  # defined in the notebook: travels by value
    return 3 * x
print(rc[:].apply_sync(triple, 5))""",
    """cluster.close()
print("closed")""",
]


def test_px_cells_in_a_notebook(fleet, ippproj):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from test_notebook import stream_text
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", sys.prefix,
                    "--name", "fabfleet-test"], check=True, capture_output=True)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src.format(inventory=str(fleet.inventory_path)))
                if "{inventory" in src else nbformat.v4.new_code_cell(src)
                for src in PX_CELLS]
    client = nbclient.NotebookClient(nb, kernel_name="fabfleet-test", timeout=180,
                                     resources={"metadata": {"path": str(ippproj)}})
    client.execute()
    out = [stream_text(c) for c in nb.cells]
    assert out[0] == "2 engines\n"
    # %%px shows each engine's output as "[stdout:N] …" (display data in a kernel)
    px = sorted(o["data"]["text/plain"].strip() for o in nb.cells[2].outputs
                if o["output_type"] == "display_data")
    assert px == ["[stdout:0] on ws1 42", "[stdout:1] on ws2 42"] or \
        px == ["[stdout:0] on ws2 42", "[stdout:1] on ws1 42"], nb.cells[2].outputs
    assert out[4] == "[2, 2]\n"
    assert out[5] == "[15, 15]\n"
    assert out[6] == "closed\n"
    for name in ("ws1", "ws2"):
        assert ipp_processes(fleet, name) == 0


# -- another user of the host ----------------------------------------------------------
@pytest.mark.lab
def test_another_user_can_neither_read_nor_attach_nor_listen(fleet, ippproj, monkeypatch):
    """On ``stock`` (its own address, 127.0.0.6, and a second user, eve): eve cannot read
    the connection files, a client of hers (real pyzmq + ipyparallel, the right ports,
    any key) gets no answer from the controller, and a subscriber of hers on the
    controller's output socket receives nothing while the engines print."""
    from conftest import user_cli
    monkeypatch.setenv("FABFLEET_SSH_CONFIG", str(fleet.lab_ssh_config))
    env = {"FABFLEET_SSH_CONFIG": str(fleet.lab_ssh_config)}
    box = fleet.container("stock")
    subprocess.run(["docker", "exec", "-u", "dev", box, "sh", "-c",  # a kept testbed's copy
                    f"rm -rf ~/fabfleet/{ippproj.name} ~/fabfleet/.venvs/{ippproj.name}"],
                   check=True)
    for args in (["push", "-H", "stock"],
                 ["setup-workdir", "-H", "stock", "--requirements", "requirements.txt"]):
        r = user_cli(fleet.bin, *args, inventory=fleet.lab_inventory, cwd=ippproj,
                     timeout=900, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
    project_funcs(monkeypatch, ippproj)
    # eve's own copy of pyzmq and ipyparallel (from the wheels), outside dev's files
    for wheel in (ippproj / "wheels").glob("*.whl"):
        subprocess.run(["docker", "cp", str(wheel), f"{box}:/tmp/"], check=True)
    unpack = ("import glob, zipfile\n"
              "for w in glob.glob('/tmp/*.whl'):\n"
              "    zipfile.ZipFile(w).extractall('/tmp/eve-site')\n")
    subprocess.run(["docker", "exec", "-u", "eve", box, "python3", "-c", unpack], check=True)
    from fabfleet import Inventory
    hosts = Inventory.load(fleet.lab_inventory).select(host="stock")
    with hosts.ipyparallel() as rc:
        cluster = rc.fabfleet_cluster
        assert cluster.listen == "127.0.0.6"
        where = cluster.dirs["stock"].replace("~", "/home/dev", 1)
        as_eve = ["docker", "exec", "-u", "eve", "-e", "PYTHONPATH=/tmp/eve-site", box,
                  "python3", "-c"]
        read = subprocess.run(as_eve + [
            f"open({where + '/profile/security/ipcontroller-client.json'!r}).read()"],
            capture_output=True, text=True, timeout=30)
        assert read.returncode != 0 and "Permission denied" in read.stderr
        # everything but the secrets: the ports (eve could see them with ss), the scheme
        public = {k: v for k, v in cluster.info.items() if k not in ("key", "curve_serverkey")}
        attach = ("import ipyparallel, json, sys\n"
                  f"cfg = json.loads({json.dumps(public)!r})\n"
                  "cfg['key'] = 'guess'\n"
                  "try:\n"
                  "    rc = ipyparallel.Client(cfg, timeout=5)\n"
                  "    print('attached', rc.ids)\n"
                  "except Exception as exc:\n"
                  "    print('refused', type(exc).__name__, exc)\n")
        tried = subprocess.run(as_eve + [attach], capture_output=True, text=True, timeout=60)
        assert "refused" in tried.stdout and "attached" not in tried.stdout, \
            tried.stdout + tried.stderr
        listen = ("import zmq, time\n"
                  "s = zmq.Context().socket(zmq.SUB)\n"
                  "s.setsockopt(zmq.SUBSCRIBE, b'')\n"
                  f"s.connect('tcp://127.0.0.6:{cluster.info['iopub']}')\n"
                  "got = s.poll(8000)\n"
                  "print('received' if got else 'nothing')\n")
        eve = subprocess.Popen(as_eve + [listen], stdout=subprocess.PIPE, text=True)
        for _ in range(12):  # engine output published while eve listens
            ar = rc[:].execute("print('secret result', 42)", block=True)
            assert "secret result 42" in ar.stdout[0]  # published: our client got it
            time.sleep(0.5)
        heard = eve.communicate(timeout=30)[0]
        assert heard.strip() == "nothing", heard
    left = subprocess.run(["docker", "exec", "-u", "dev", box, "sh", "-c",
                           "pgrep -f '[i]pyparallel' | wc -l; "
                           f"rm -rf ~/fabfleet/.venvs/{ippproj.name} ~/fabfleet/{ippproj.name}"],
                          capture_output=True, text=True)
    assert left.stdout.strip() == "0"
