"""Long jobs, tunnels, Jupyter and top on the testbed, from separate processes as users
run them: detach, reattach, follow, kill, a rebooted host, a reused pid."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import clone, sh, write

from fabfleet.host.jobs import Job, list_jobs
from fabfleet.ssh.tunnel import Tunnel


@pytest.fixture
def proj(tmp_path) -> Path:
    p = clone(tmp_path / "jobproj", "https://example.invalid/lab/jobproj.git")
    write(p / "ticks.py", """\
        import os, sys, time
        for i in range(int(sys.argv[1])):
            print("tick", i, flush=True)
            time.sleep(0.5)
        print("run dir", os.environ["FABFLEET_RUN_DIR"].endswith(os.environ["FABFLEET_RUN_ID"]))
        sys.exit(int(sys.argv[2]))
    """)
    write(p / "group.py", """\
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "300"])
        print("pids", os.getpid(), child.pid, flush=True)
        time.sleep(300)
    """)
    return p


def detach(fleet, proj, host, *args) -> str:
    r = fleet.cli("run-remote", "-H", host, *args, "--detach", "--json",
                  inventory=fleet.inventory_path, cwd=proj)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["hosts"][host]["ok"] and doc["hosts"][host]["error"] is None
    return doc["hosts"][host]["run_id"]


def jobs_json(fleet, proj, *args) -> dict:
    r = fleet.cli("jobs", *args, "--json", inventory=fleet.inventory_path, cwd=proj)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_detach_then_list_and_follow_from_new_processes(fleet, proj):
    started = time.monotonic()
    run_id = detach(fleet, proj, "ws1", "ticks.py", "--args", "6 7")
    assert time.monotonic() - started < 10  # returned while the job runs
    runs = {r["run_id"]: r for r in jobs_json(fleet, proj, "-H", "ws1")["hosts"]["ws1"]["runs"]}
    assert runs[run_id]["status"] == "running" and runs[run_id]["exit_code"] is None
    assert runs[run_id]["command"] == "ticks.py 6 7"
    r = fleet.cli("logs", run_id, "-H", "ws1", "--follow", inventory=fleet.inventory_path,
                  cwd=proj, timeout=60)
    assert r.returncode == 7, r.stderr
    assert r.stdout == "".join(f"tick {i}\n" for i in range(6)) + "run dir True\n"
    runs = {r["run_id"]: r for r in jobs_json(fleet, proj, "-g", "lab")["hosts"]["ws1"]["runs"]}
    assert (runs[run_id]["status"], runs[run_id]["exit_code"]) == ("exited", 7)
    r = fleet.cli("logs", run_id, "-H", "ws1", inventory=fleet.inventory_path, cwd=proj)
    assert r.returncode == 0 and r.stdout.startswith("tick 0\n")


def test_the_job_survives_the_local_process_being_killed(fleet, proj):
    proc = subprocess.Popen([str(fleet.bin / "fabfleet"), "run-remote", "-H", "ws2",
                             "ticks.py", "--args", "4 0", "--detach"], cwd=proj,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "FABFLEET_INVENTORY": str(fleet.inventory_path)})
    line = proc.stdout.readline()
    proc.kill()
    proc.wait()
    run_id = line.split()[-1]
    job = Job(fleet.inventory()["ws2"], run_id)
    final = job.wait(timeout=30, poll=0.5)
    assert (final["status"], final["exit_code"]) == ("exited", 0)
    assert job.logs()["data"].decode().count("tick") == 4


def test_kill_stops_the_process_group_and_records_killed(fleet, proj):
    run_id = detach(fleet, proj, "gpu1", "group.py")
    job = Job(fleet.inventory()["gpu1"], run_id)
    deadline = time.monotonic() + 20
    while not (out := job.logs()["data"].decode()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    pids = out.split()[1:3]
    r = fleet.cli("kill", run_id, "-H", "gpu1", inventory=fleet.inventory_path, cwd=proj)
    assert r.returncode == 0 and "killed with SIGTERM" in r.stdout, r.stdout + r.stderr
    assert sh(fleet, "gpu1", f"ps -o pid= -p {','.join(pids)} || true").split() == []
    state = job.status()
    assert state["status"] == "killed" and state["killed_by"] == "SIGTERM"
    r = fleet.cli("logs", run_id, "-H", "gpu1", "--follow", inventory=fleet.inventory_path,
                  cwd=proj)
    assert r.returncode == 143 and "was killed" in r.stderr
    r = fleet.cli("kill", run_id, "-H", "gpu1", inventory=fleet.inventory_path, cwd=proj)
    assert r.returncode == 0 and "is not running (status killed)" in r.stdout


def test_a_reused_pid_is_never_killed(fleet, proj):
    """A job whose recorded process is gone and whose pid now belongs to another
    process: it is 'lost', and kill leaves that other process alone."""
    run_id = detach(fleet, proj, "ws1", "ticks.py", "--args", "1 0")
    job = Job(fleet.inventory()["ws1"], run_id)
    job.wait(timeout=30, poll=0.3)
    other = sh(fleet, "ws1", "nohup sleep 300 >/dev/null 2>&1 & echo $!").strip()
    run_dir = job.status()["run_dir"]
    # Forge the registry: the job "still" runs with the other process's pid.
    sh(fleet, "ws1", f"cd {run_dir} && rm exit_code && python3 -c \"import json; "
       f"d = json.load(open('job.json')); d['pid'] = d['pgid'] = {other}; "
       "json.dump(d, open('job.json', 'w'))\"")
    assert job.status()["status"] == "lost"
    r = fleet.cli("kill", run_id, "-H", "ws1", inventory=fleet.inventory_path, cwd=proj)
    assert r.returncode == 0 and "is not running (status lost)" in r.stdout
    assert sh(fleet, "ws1", f"ps -o pid= -p {other}").strip() == other
    sh(fleet, "ws1", f"kill {other}")


def test_a_restarted_host_shows_the_job_lost(fleet, proj):
    run_id = detach(fleet, proj, "ws3", "group.py")
    subprocess.run(["docker", "restart", "-t", "1", fleet.container("ws3")], check=True,
                   capture_output=True)
    import testbed
    deadline = time.monotonic() + 60
    while not testbed.ssh_ready(fleet.port("ws3")):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with fleet.inventory().connect("ws3") as c:
        runs = {r["run_id"]: r for r in list_jobs(c, "jobproj")}
    assert runs[run_id]["status"] == "lost"


# -- tunnel ---------------------------------------------------------------------------------
SERVER = """\
import functools, http.server, os, sys
os.makedirs("www", exist_ok=True)
with open("www/big.bin", "wb") as f:
    f.write(os.urandom(1 << 20) * 40)
for i in range(50):
    with open("www/f%d.txt" % i, "w") as f:
        f.write("file %d\\n" % i)
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory="www")
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), handler).serve_forever()
"""


@pytest.mark.parametrize("openssh", [False, True], ids=["paramiko", "openssh"])
def test_tunnel_concurrent_requests_large_download_and_refusals(fleet, proj, openssh):
    write(proj / "serve.py", SERVER)
    port = 8700 + os.getpid() % 200
    run_id = detach(fleet, proj, "ws1", "serve.py", "--args", str(port))
    events = []
    try:
        with fleet.inventory().connect("ws1") as c:
            with Tunnel(c, port + 1, on_event=events.append,  # nothing there
                        openssh=openssh) as refused:
                with pytest.raises((urllib.error.URLError, ConnectionError)):
                    urllib.request.urlopen(f"http://127.0.0.1:{refused.local_port}/", timeout=10)
                deadline = time.monotonic() + 10  # ssh reports it on its stderr
                while not events and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert events and "failed" in events[0], events
            with Tunnel(c, port, openssh=openssh) as t:
                base = f"http://127.0.0.1:{t.local_port}"
                deadline = time.monotonic() + 30
                while True:  # the server writes its files first
                    try:
                        urllib.request.urlopen(f"{base}/f49.txt", timeout=5).read()
                        break
                    except (urllib.error.URLError, ConnectionError):
                        assert time.monotonic() < deadline
                        time.sleep(0.3)
                results, errors = {}, []

                def get(i):
                    try:
                        results[i] = urllib.request.urlopen(f"{base}/f{i}.txt", timeout=30).read()
                    except Exception as exc:  # noqa: BLE001
                        errors.append(exc)
                threads = [threading.Thread(target=get, args=(i,)) for i in range(50)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join(60)
                assert not errors and all(results[i] == f"file {i}\n".encode() for i in range(50))
                big = urllib.request.urlopen(f"{base}/big.bin", timeout=60).read()
                remote_sum = sh(fleet, "ws1", "sha256sum ~/fabfleet/jobproj/www/big.bin").split()[0]
                assert len(big) == 40 << 20 and hashlib.sha256(big).hexdigest() == remote_sum
                if openssh:  # ssh's end: a socket only we may use, in a dir only we may enter
                    assert os.stat(t.private).st_mode & 0o777 == 0o700
                    assert os.stat(t.socket_path).st_mode & 0o077 == 0
            # closed: the port is free again (REUSEADDR passes TIME_WAIT, never a listener)
            import socket
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", t.local_port))
            s.listen(1)
            s.close()
            if openssh:  # its ssh is gone, and so is its private socket dir
                assert t.proc.poll() is not None and not os.path.exists(t.private)
    finally:
        Job(fleet.inventory()["ws1"], run_id).kill()


def test_tunnel_cli_prints_its_address_and_stops_on_sigterm(fleet, proj):
    proc = subprocess.Popen([str(fleet.bin / "fabfleet"), "tunnel", "-H", "ws1",
                             str(fleet.port("ws1"))],  # the host's own sshd, on its loopback
                            cwd=proj, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FABFLEET_INVENTORY": str(fleet.inventory_path)})
    line = proc.stdout.readline().strip()
    host, port = line.split(":")
    assert host == "127.0.0.1" and int(port) > 0
    import socket
    with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as s:
        s.settimeout(10)
        assert s.recv(4) == b"SSH-"  # the host's sshd, reached through the tunnel
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "tunnel closed" in err


def test_jupyter_on_a_host_without_jupyter_says_how_to_install_it(fleet, proj):
    r = fleet.cli("jupyter", "-H", "ws2", inventory=fleet.inventory_path, cwd=proj)
    assert r.returncode == 1
    assert "ws2: Jupyter is not installed" in r.stderr and "--requirements" in r.stderr
    assert "Traceback" not in r.stderr


def test_top_once_json_shows_gpus_and_jobs(fleet, proj):
    run_id = detach(fleet, proj, "gpu1", "group.py")
    try:
        r = fleet.cli("top", "--once", "--json", "-H", "gpu1,ws1,down",
                      inventory=fleet.inventory_path, cwd=proj)
        doc = json.loads(r.stdout)
        assert r.returncode == 1 and doc["ok"] is False
        gpu1 = doc["hosts"]["gpu1"]
        assert [g["utilization_pct"] for g in gpu1["gpus"]] == [3, 97]
        assert gpu1["gpus"][1]["memory_used_mib"] == 38912 and gpu1["cpus"] >= 1
        assert run_id in [j["run_id"] for j in gpu1["jobs"]]
        assert doc["hosts"]["ws1"]["gpus"] == [] and doc["hosts"]["down"]["ok"] is False
    finally:
        Job(fleet.inventory()["gpu1"], run_id).kill()


def test_jupyter_for_real_reconnects_and_answers_through_the_tunnel(fleet, tmp_path):
    """jupyter_server installed into the project's venv on a host without Internet access
    (wheels pushed with the project), then `fabfleet jupyter` twice: started, then
    reconnected; the token opens /api/status through the tunnel."""
    import sys
    proj = tmp_path / "nbproj"
    write(proj / "pyproject.toml", "")
    host_py = sh(fleet, "ws2", "python3 -c 'import platform; print(platform.python_version())'")
    dl = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                         "--python-version", host_py.strip(), "-d", str(proj / "wheels"),
                         "jupyter_server"], capture_output=True, text=True, timeout=300)
    if dl.returncode != 0:
        pytest.skip(f"cannot download jupyter_server wheels here: {dl.stderr[-300:]}")
    write(proj / "requirements.txt",
          f"--no-index\n--find-links /home/dev/fabfleet/{proj.name}/wheels\njupyter_server\n")
    for args in (["push", "-H", "ws2"],
                 ["setup-workdir", "-H", "ws2", "--requirements", "requirements.txt"]):
        r = fleet.cli(*args, inventory=fleet.inventory_path, cwd=proj, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    env = {**os.environ, "FABFLEET_INVENTORY": str(fleet.inventory_path)}
    job_id = None
    try:
        for attempt in ("started", "reconnected to the running server"):
            proc = subprocess.Popen([str(fleet.bin / "fabfleet"), "jupyter", "-H", "ws2"],
                                    cwd=proj, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            url = proc.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:") and "token=" in url, proc.stderr.read()
            status = json.loads(urllib.request.urlopen(url, timeout=30).read())
            assert "started" in status
            bad = url.split("token=")[0] + "token=wrong"
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(bad, timeout=30)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert f"Jupyter {attempt}" in err, err
            job_id = err.split("(job ")[1].split(";")[0]
            assert url.split("token=")[1] not in sh(fleet, "ws2", "ps -eo args")  # never in argv
    finally:
        if job_id:
            Job(fleet.inventory()["ws2"], job_id).kill()
        sh(fleet, "ws2", f"rm -rf ~/fabfleet/.venvs/{proj.name}")
