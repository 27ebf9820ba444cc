"""Shared hosts and hostile inputs: what another user of the host can see, scripts too big
for a command line, clients that die mid-run, followers that leave, many short jobs."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import threading
import time

import pytest
from conftest import sh, user_cli, write

from fabfleet import Inventory
from fabfleet.host.jobs import Job

pytestmark = pytest.mark.usefixtures("fresh_workers")


def as_eve(fleet, name: str, command: str) -> str:
    """``command``'s stdout as eve, the other user of lab host ``name``."""
    return subprocess.run(["docker", "exec", "-u", "eve", fleet.container(name), "sh", "-c",
                           command], capture_output=True, text=True, timeout=60).stdout


def every_cmdline(fleet, name: str) -> str:
    """Every process's command line on the host, as eve reads them in /proc."""
    return as_eve(fleet, name, "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f "
                  "2>/dev/null; echo; done")


@pytest.mark.lab
def test_no_secret_script_or_spec_on_any_command_line(fleet, tmp_path, monkeypatch):
    """eve lists /proc/*/cmdline while an attached run, a detached job and a payload worker
    of yours are active: no env: value, no inline script content, no run spec."""
    monkeypatch.setenv("FABFLEET_SSH_CONFIG", str(fleet.lab_ssh_config))
    secret = "hf_" + secrets.token_hex(12)
    marker = "MARK" + secrets.token_hex(8)
    text = fleet.lab_inventory.read_text().replace(
        "    max_jobs: 12\n", f"    max_jobs: 12\n    env:\n      HF_TOKEN: {secret}\n", 1)
    assert secret in text
    inv_path = write(tmp_path / "inventory.yaml", text)
    proj = tmp_path / "secretive"
    write(proj / "pyproject.toml", "")
    write(proj / "waits.py", f"""\
        import os, sys, time
        # {marker}
        assert os.environ["HF_TOKEN"] == {secret!r}
        print("up", flush=True)
        time.sleep(float(sys.argv[1]))
    """)
    env = {"FABFLEET_SSH_CONFIG": str(fleet.lab_ssh_config)}
    r = user_cli(fleet.bin, "run-remote", "-H", "stock", "waits.py", "--args", "20",
                 "--detach", inventory=inv_path, cwd=proj, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    attached = subprocess.Popen(
        [str(fleet.bin / "fabfleet"), "run-remote", "-H", "stock", "waits.py", "--args", "20",
         "--no-push"], cwd=proj, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env, "FABFLEET_INVENTORY": str(inv_path)})
    try:
        assert "up" in attached.stdout.readline()
        inv = Inventory.load(inv_path)
        from fabfleet import run_payload
        assert run_payload(inv.connect("stock"),
                           lambda: __import__("os").environ.get("HF_TOKEN")) == secret
        seen = every_cmdline(fleet, "stock")
        assert "waits.py" in seen  # eve does see the processes ...
        for hidden in (secret, marker, '"run_id"', "script_b64", "def main"):
            assert hidden not in seen, hidden  # ... but nothing of what they carry
    finally:
        attached.send_signal(signal.SIGINT)
        attached.communicate(timeout=30)


@pytest.mark.parametrize("size_kb", [100, 250, 1024])
def test_scripts_of_any_size_travel_alone(fleet, tmp_path, size_kb):
    """A script outside any project, far bigger than a command line allows, runs."""
    filler = "# " + "x" * 97 + "\n"
    body = "import hashlib, sys\nprint('size', len(open(sys.argv[0], 'rb').read()))\n"
    script = tmp_path / "scripts" / "big.py"
    write(script, body + filler * (size_kb * 1024 // len(filler)))
    proj = tmp_path / f"bigscript{size_kb}"  # the script is not in it: it travels alone
    write(proj / "pyproject.toml", "")
    r = fleet.cli("run-remote", "-H", "ws1", str(script), "--no-push",
                  inventory=fleet.inventory_path, cwd=proj)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"size {script.stat().st_size}" in r.stdout


def remote_ps(fleet, host: str, pattern: str) -> list[str]:
    out = sh(fleet, host, "ps -eo pid=,args=")
    return [line for line in out.splitlines() if pattern in line and "ps -eo" not in line]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_an_attached_run_ends_with_its_client(fleet, tmp_path, how):
    """The client is killed mid-run: the host stops the script (and its children) within
    the stop grace; no copy keeps running to race a re-run."""
    tag = "orphan" + secrets.token_hex(4)
    script = write(tmp_path / f"{tag}.py", """\
        import subprocess, time
        subprocess.Popen(["sleep", "301"])
        print("up", flush=True)
        time.sleep(300)
    """)
    proc = subprocess.Popen([str(fleet.bin / "fabfleet"), "run-remote", "-H", "ws1",
                             str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FABFLEET_INVENTORY": str(fleet.inventory_path)})
    assert proc.stdout.readline().strip() == "up", proc.stderr.read()
    assert remote_ps(fleet, "ws1", tag)
    proc.send_signal(how)
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 15
    while remote_ps(fleet, "ws1", tag) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert remote_ps(fleet, "ws1", tag) == [] and remote_ps(fleet, "ws1", "sleep 301") == []


def test_many_short_jobs_followed_to_their_exit_code(fleet, tmp_path):
    """Thirty jobs that end while being followed: every follower gets the job's own exit
    code (never `lost`)."""
    proj = tmp_path / "shortjobs"
    write(proj / "pyproject.toml", "")
    write(proj / "quick.py", """\
        import sys, time
        time.sleep(float(sys.argv[1]))
        print("done", flush=True)
        sys.exit(int(sys.argv[2]))
    """)
    inv = fleet.inventory()
    from fabfleet.host.jobs import start_job
    from fabfleet.host.push import push
    with inv.connect("ws1") as c:
        push(c, proj, "~/fabfleet/shortjobs")
        jobs = [start_job(c, proj / "quick.py", [f"{0.1 * (i % 10):.1f}", str(i % 7)],
                          project="shortjobs", script_in_project="quick.py") for i in range(30)]
    results: dict[int, dict] = {}

    def follow(i: int, job: Job) -> None:
        results[i] = job.logs(follow=True)
    threads = [threading.Thread(target=follow, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 30
    for i, report in results.items():
        assert (report["status"], report["exit_code"]) == ("exited", i % 7), report
        assert report["data"] == b"done\n"


def test_a_follower_leaves_nothing_behind(fleet, tmp_path):
    """Ctrl-C on `logs --follow` (or its connection dropping) ends the follower on the
    host too, instead of polling until the job ends."""
    proj = tmp_path / "follow"
    write(proj / "pyproject.toml", "")
    write(proj / "long.py", "import time\nprint('x', flush=True)\ntime.sleep(120)\n")
    r = fleet.cli("run-remote", "-H", "ws3", "long.py", "--detach", "--json",
                  inventory=fleet.inventory_path, cwd=proj)
    assert r.returncode == 0, r.stdout + r.stderr
    run_id = json.loads(r.stdout)["hosts"]["ws3"]["run_id"]
    boots = len(remote_ps(fleet, "ws3", "fabfleet-runner"))  # runners: the job's
    env = {**os.environ, "FABFLEET_INVENTORY": str(fleet.inventory_path)}
    try:
        for sig in (signal.SIGINT, signal.SIGKILL):
            proc = subprocess.Popen([str(fleet.bin / "fabfleet"), "logs", run_id, "-H", "ws3",
                                     "--follow"], cwd=proj, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env)
            assert proc.stdout.readline().strip() == "x"
            assert len(remote_ps(fleet, "ws3", "fabfleet-runner")) == boots + 1
            proc.send_signal(sig)
            proc.communicate(timeout=30)
            deadline = time.monotonic() + 10
            while len(remote_ps(fleet, "ws3", "fabfleet-runner")) > boots \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(remote_ps(fleet, "ws3", "fabfleet-runner")) == boots, sig
    finally:
        fleet.cli("kill", run_id, "-H", "ws3", inventory=fleet.inventory_path, cwd=proj)


def test_run_ids_that_are_paths_are_refused(fleet, tmp_path):
    for bad in ("../../x", "/etc", "..", "a/b", "~"):
        r = fleet.cli("logs", bad, "-H", "ws1", inventory=fleet.inventory_path, cwd=tmp_path)
        assert r.returncode != 0 and "run id" in (r.stdout + r.stderr), (bad, r.stderr)


# -- clean and project identity ------------------------------------------------------------
def test_two_projects_with_one_name_never_mix(fleet, tmp_path):
    """~/a/exp and ~/b/exp (no git origin: the path identifies them): the second push is
    refused before anything is written, clean --code from it keeps the first's code, and
    `fabfleet.project` gives it a home of its own."""
    a, b = tmp_path / "a" / "exp", tmp_path / "b" / "exp"
    for p in (a, b):
        write(p / "pyproject.toml", "")
        write(p / "which.py", f"print({str(p)!r})\n")
    sh(fleet, "ws3", "rm -rf ~/fabfleet/exp ~/fabfleet/exp-b ~/fabfleet/.runs/exp")
    cli = lambda p, *args: fleet.cli(*args, inventory=fleet.inventory_path, cwd=p)  # noqa: E731
    assert cli(a, "push", "-H", "ws3").returncode == 0
    r = cli(b, "run-remote", "-H", "ws3", "which.py")
    assert r.returncode != 0 and "holds another project of the same name" in r.stdout + r.stderr
    assert str(a) in r.stdout + r.stderr and str(b) not in sh(fleet, "ws3",
                                                              "cat ~/fabfleet/exp/which.py")
    r = cli(b, "clean", "-H", "ws3", "--code")
    assert "another project of the same name" in r.stdout + r.stderr, r.stdout + r.stderr
    assert sh(fleet, "ws3", "cat ~/fabfleet/exp/which.py").strip() == f"print({str(a)!r})"
    write(b / "invoke.yaml", "fabfleet:\n  project: exp-b\n")
    r = cli(b, "run-remote", "-H", "ws3", "which.py")
    assert r.returncode == 0 and r.stdout.strip() == str(b), r.stdout + r.stderr
    r = cli(a, "clean", "-H", "ws3", "--code")
    assert r.returncode == 0 and sh(fleet, "ws3", "ls ~/fabfleet").split().count("exp") == 0


def test_clean_keeps_running_jobs_and_what_it_did_not_make(fleet, tmp_path):
    proj = tmp_path / "keeper"
    write(proj / "pyproject.toml", "")
    write(proj / "long.py", "import time\nprint('up', flush=True)\ntime.sleep(120)\n")
    write(proj / "short.py", "print('done')\n")
    cli = lambda *args: fleet.cli(*args, inventory=fleet.inventory_path, cwd=proj)  # noqa: E731
    assert cli("run-remote", "-H", "ws3", "short.py").returncode == 0
    r = cli("run-remote", "-H", "ws3", "long.py", "--detach", "--json")
    run_id = json.loads(r.stdout)["hosts"]["ws3"]["run_id"]
    r = cli("clean", "-H", "ws3", "--code")
    out = r.stdout + r.stderr
    assert r.returncode == 0 and f"kept ~/fabfleet/.runs/keeper/{run_id}" not in out
    assert run_id in out and "still running" in out and "jobs of this project" in out, out
    listed = json.loads(cli("jobs", "-H", "ws3", "--json").stdout)
    runs = listed["hosts"]["ws3"]["runs"]
    assert [(j["run_id"], j["status"]) for j in runs] == [(run_id, "running")], runs
    r = cli("clean", "-H", "ws3", "--code", "--force")
    assert r.returncode == 0 and "! ws3: kept" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert remote_ps(fleet, "ws3", "long.py") == []
    assert sh(fleet, "ws3", "ls ~/fabfleet").split().count("keeper") == 0
    # a directory fabfleet did not make is never removed by clean --code
    sh(fleet, "ws3", "mkdir -p ~/fabfleet/handmade && echo mine > ~/fabfleet/handmade/notes")
    hand = tmp_path / "handmade"
    write(hand / "pyproject.toml", "")
    r = fleet.cli("clean", "-H", "ws3", "--code", inventory=fleet.inventory_path, cwd=hand)
    assert "fabfleet did not create it" in r.stdout + r.stderr
    assert sh(fleet, "ws3", "cat ~/fabfleet/handmade/notes").strip() == "mine"
    sh(fleet, "ws3", "rm -rf ~/fabfleet/handmade")


def test_ctrl_c_while_hosts_are_still_pushing_starts_nothing_after_it(fleet, tmp_path):
    """Ctrl-C (KeyboardInterrupt, as in a notebook: the process lives on) during a
    multi-host run whose pushes are under way: no host starts the script after it."""
    from fabfleet import RunInterrupted
    from fabfleet.fleet.runs import run_many
    tag = "late" + secrets.token_hex(4)
    proj = tmp_path / tag
    write(proj / "pyproject.toml", "")
    write(proj / "start.py", f"""\
        import os, time
        open(os.path.expanduser("~/{tag}.started"), "w").write(repr(time.time()))
        time.sleep(60)
    """)
    (proj / "data.bin").write_bytes(os.urandom(150 * 1024 * 1024))
    names = ("ws1", "ws2", "ws3")
    when: list[float] = []

    def interrupt_once_pushing() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                "data.bin" in sh(fleet, h, f"ls -a ~/fabfleet/{tag} 2>/dev/null || true")
                for h in names):
            time.sleep(0.05)
        when.append(time.time())
        os.kill(os.getpid(), signal.SIGINT)  # as the terminal's Ctrl-C does
    threading.Thread(target=interrupt_once_pushing, daemon=True).start()
    inv = fleet.inventory()
    try:
        with pytest.raises(RunInterrupted):
            run_many([inv[h] for h in names], proj / "start.py", cwd=proj)
        time.sleep(8)  # a host that was still pushing would have started by now
        started = {h: sh(fleet, h, f"cat ~/{tag}.started 2>/dev/null || true").strip()
                   for h in names}
        # (a script started just before the interrupt may record its time a moment after)
        late = {h: t for h, t in started.items() if t and float(t) > when[0] + 0.5}
        assert late == {}, (late, when)
        assert sum(bool(t) for t in started.values()) < 3, "every push ended before Ctrl-C"
        for h in names:
            assert remote_ps(fleet, h, "start.py") == []
    finally:
        for h in names:
            sh(fleet, h, f"rm -rf ~/fabfleet/{tag} ~/{tag}.started")
