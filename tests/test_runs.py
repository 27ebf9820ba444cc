"""setup-workdir, push, run-remote, gather and clean on the testbed, as users run them."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

import fabfleet
from conftest import clone
from fabfleet import ConnectError, LocalError, connect
from fabfleet.ssh.exec import execute


@pytest.fixture
def project(tmp_path) -> Path:
    """A small local project with a script, data, and things push must leave out."""
    p = tmp_path / "proj"
    (p / "pkg").mkdir(parents=True)
    (p / "pkg" / "__pycache__").mkdir()
    (p / "pkg" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    clone(p, "https://example.invalid/lab/proj.git")  # every test's copy: one project
    (p / ".gitignore").write_text("*.log\nbig/\n!keep.log\n")
    (p / "debug.log").write_text("no\n")
    (p / "keep.log").write_text("yes\n")
    (p / "big").mkdir()
    (p / "big" / "blob").write_text("no\n")
    (p / "pkg" / "util.py").write_text("VALUE = 42\n")
    (p / "data.txt").write_text("some data\n")
    (p / "main.py").write_text(textwrap.dedent("""\
        import json, os, sys
        sys.path.insert(0, os.getcwd())
        from pkg.util import VALUE
        os.makedirs("results", exist_ok=True)
        with open("results/out.json", "w") as f:
            json.dump({"argv": sys.argv[1:], "value": VALUE,
                       "data": open("data.txt").read()}, f)
        print("done", VALUE)
    """))
    return p


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def remote(fleet, name: str, command: str) -> str:
    with fleet.inventory().connect(name) as c:
        return execute(c, command).stdout


# -- run-remote ------------------------------------------------------------------------
def test_single_host_exit_code_args_and_cwd(fleet, tmp_path):
    script = write(tmp_path / "args.py", """\
        import os, sys
        print(repr(sys.argv[1:]))
        print("cwd", os.getcwd())
        print("omp", os.environ.get("OMP_NUM_THREADS"))
        sys.exit(7)
    """)
    r = fleet.cli("run-remote", "--host", "ws1", str(script), "--args",
                "--name 'a b' \"$HOME\" ';rm -rf ~' `id`", inventory=fleet.inventory_path,
                cwd=tmp_path)
    assert r.returncode == 7, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == repr(["--name", "a b", "$HOME", ";rm -rf ~", "`id`"])
    assert lines[1] == f"cwd /home/dev/fabfleet/{tmp_path.name}"
    assert lines[2] == "omp 2"  # the inventory's env
    assert "exited 7" in r.stderr
    assert "[ws1]" not in r.stdout  # one host: no prefix


def test_output_streams_before_the_script_ends(fleet, tmp_path):
    script = write(tmp_path / "slow.py", """\
        import time
        print("first", flush=True)
        time.sleep(3)
        print("second")
    """)
    seen = []
    with fleet.inventory().connect("ws1") as c:
        result = fabfleet.run_script(c, script, on_stdout=lambda d: seen.append(
            (time.monotonic(), d)))
        ended = time.monotonic()
    assert result.exit_code == 0
    first = next(t for t, d in seen if b"first" in d)
    assert ended - first > 2.0, "the first line only arrived at the end"
    out = remote(fleet, "ws1", f"cat {result.run_dir}/stdout {result.run_dir}/exit_code")
    assert out == "first\nsecond\n0\n"
    timing = json.loads(remote(fleet, "ws1", f"cat {result.run_dir}/timing.json"))
    assert 2.5 < timing["seconds"] < 30


def test_several_hosts_prefix_summary_and_failures(fleet, tmp_path):
    script = write(tmp_path / "who.py", """\
        import sys
        name = open("/etc/fabfleet-host").read().strip()
        print("hi from", name)
        print("warn", name, file=sys.stderr)
        sys.exit(3 if name == "ws2" else 0)
    """)
    r = fleet.cli("run-remote", "--host", "ws1,ws2,nopy,down", str(script),
                inventory=fleet.inventory_path, cwd=tmp_path)
    assert r.returncode == 1
    assert "[ws1] hi from ws1" in r.stdout and "[ws2] hi from ws2" in r.stdout
    assert "[ws1] warn ws1" in r.stderr
    ws2_row = next(line for line in r.stderr.splitlines() if line.startswith("│ ws2 "))
    assert "failed" in ws2_row and "│ 3 " in ws2_row
    assert "nopy: Python interpreter 'python3' was not found" in r.stderr
    assert "down: could not connect" in r.stderr
    assert "1/4 hosts ok" in r.stderr
    # nothing lost: the output of the hosts that ran is kept locally too
    logs = list((tmp_path / "gathered").glob("*/runs/*/stdout"))
    assert sorted(p.parts[-4] for p in logs) == ["ws1", "ws2"]


def test_missing_script_is_a_local_error_before_connecting(fleet, tmp_path):
    r = fleet.cli("run-remote", "--host", "down", "nope.py", inventory=fleet.inventory_path,
                cwd=tmp_path)
    assert r.returncode == 2
    assert "nope.py: script not found (nothing was sent to any host)" in r.stderr
    with pytest.raises(LocalError):
        fabfleet.run_many(fleet.inventory().select(host="ws1"), tmp_path / "nope.py")


def test_run_with_project_push(fleet, project):
    r = fleet.cli("run-remote", "--host", "ws2", "main.py", "--args", "x 'y z'",
                inventory=fleet.inventory_path, cwd=project)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "done 42"
    out = json.loads(remote(fleet, "ws2", "cat ~/fabfleet/proj/results/out.json"))
    assert out == {"argv": ["x", "y z"], "value": 42, "data": "some data\n"}


def test_an_unchanged_project_and_its_run_are_one_session(fleet, project, monkeypatch):
    """The push's listing travels with the run: an unchanged project costs one session
    (one round trip on a kept connection); anything changed, here or on the host, is
    pushed first and the new code runs."""
    import paramiko

    from fabfleet.config.settings import resolve_project
    from fabfleet.fleet.runs import run_many
    opened = []
    real = paramiko.Transport.open_session

    def counted(self, *a, **kw):
        opened.append(1)
        return real(self, *a, **kw)
    monkeypatch.setattr(paramiko.Transport, "open_session", counted)
    hosts = fleet.inventory().select(host="ws1")

    def run() -> tuple[int, str]:
        opened.clear()
        out: list[bytes] = []
        results = run_many(hosts, script=project / "main.py", project=resolve_project(project),
                           cwd=project, on_output=lambda h, s, d: out.append(d))
        assert results["ws1"].ok and results["ws1"].value.exit_code == 0, results["ws1"]
        return len(opened), b"".join(out).decode()
    run()
    assert run() == (1, "done 42\n")
    util = project / "pkg" / "util.py"
    util.write_text("VALUE = 43\n")
    os.utime(util, (time.time() + 5, time.time() + 5))
    sessions, out = run()
    assert out == "done 43\n" and sessions > 1
    assert run() == (1, "done 43\n")
    remote(fleet, "ws1", "echo 'VALUE = 0' > ~/fabfleet/proj/pkg/util.py")  # changed there
    sessions, out = run()
    assert out == "done 43\n" and sessions > 1
    remote(fleet, "ws1", "rm ~/fabfleet/proj/.fabfleet-project")  # the marker gone
    sessions, out = run()
    assert out == "done 43\n" and sessions > 1
    assert remote(fleet, "ws1", "cat ~/fabfleet/proj/.fabfleet-project")  # written again
    assert run() == (1, "done 43\n")


def test_the_bytecode_cache_is_used_only_while_nobody_else_could_write_it(fleet, tmp_path):
    """Host-side programs are compiled once per source and Python into a private cache
    (as __pycache__ is); a cache file or directory others could write is never run."""
    cache = "~/.cache/fabfleet/bytecode"
    remote(fleet, "ws1", f"rm -rf {cache}")
    hello = write(tmp_path / "hello.py", "print('hello')\n")

    def run() -> str:
        r = fleet.cli("run-remote", "--host", "ws1", str(hello),
                      inventory=fleet.inventory_path, cwd=tmp_path)
        return r.stdout + r.stderr
    assert "hello" in run()
    listing = remote(fleet, "ws1", f"stat -c '%a %n' {cache} {cache}/*")
    modes = [line.split()[0] for line in listing.splitlines()]
    assert modes[0] == "700" and len(modes) > 1 and set(modes[1:]) == {"600"}, listing
    # every cached program replaced by one that says so, as another user would try
    evil = ("import glob, marshal, os; [open(p, 'wb').write(marshal.dumps(compile("
            "'print(\"pwned\")', 'x', 'exec'))) for p in glob.glob(os.path.expanduser("
            "'~/.cache/fabfleet/bytecode/*'))]")
    remote(fleet, "ws1", f"python3 -c {shlex.quote(evil)} && chmod 666 {cache}/*")
    out = run()
    assert "hello" in out and "pwned" not in out, out
    remote(fleet, "ws1", f"python3 -c {shlex.quote(evil)} && chmod 600 {cache}/* && "
                         f"chmod 777 {cache}")
    out = run()
    assert "hello" in out and "pwned" not in out, out
    # the same files, ours alone: they are what runs (the cache is real)
    remote(fleet, "ws1", f"python3 -c {shlex.quote(evil)} && chmod 600 {cache}/* && "
                         f"chmod 700 {cache}")
    assert "pwned" in run()
    remote(fleet, "ws1", f"rm -rf {cache}")
    assert "hello" in run()


def test_host_dying_mid_run_is_reported_and_others_finish(fleet, tmp_path):
    script = write(tmp_path / "long.py", """\
        import time
        print("started", flush=True)
        time.sleep(8)
        print("finished")
    """)
    outputs: dict[str, bytes] = {"ws1": b"", "ws3": b""}

    def collect(host, stream, data):
        outputs[host] += data

    def killer():
        deadline = time.monotonic() + 20
        while b"started" not in outputs["ws3"] and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(["docker", "kill", fleet.container("ws3")], check=True,
                       capture_output=True)
    t = threading.Thread(target=killer)
    t.start()
    try:
        started = time.monotonic()
        res = fabfleet.run_many(fleet.inventory().select(host="ws1,ws3"), script,
                               on_output=collect, log_root=tmp_path / "gathered")
        elapsed = time.monotonic() - started
        t.join()
        assert elapsed < 25
        assert res["ws1"].ok and res["ws1"].value.exit_code == 0
        assert b"finished" in outputs["ws1"]
        err = res["ws3"].error
        assert isinstance(err, ConnectError) and err.host == "ws3"
        assert "connection was lost" in str(err)
        assert res.summary().startswith("1/2 hosts ok; ws3: ConnectError")
        kept = list((tmp_path / "gathered" / "ws3").glob("runs/*/stdout"))
        assert kept and kept[0].read_text() == "started\n"
    finally:
        subprocess.run(["docker", "start", fleet.container("ws3")], check=True,
                       capture_output=True)
        deadline = time.monotonic() + 30
        while not fabfile_testbed_ready(fleet, "ws3") and time.monotonic() < deadline:
            time.sleep(0.2)


def fabfile_testbed_ready(fleet, name):
    import testbed
    return testbed.ssh_ready(fleet.port(name))


def test_ctrl_c_stops_the_remote_process_group(fleet, tmp_path):
    script = write(tmp_path / "sleeper.py", """\
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "300"])
        print("pids", os.getpid(), child.pid, flush=True)
        time.sleep(300)
    """)
    env = {**os.environ, "FABFLEET_INVENTORY": str(fleet.inventory_path)}
    proc = subprocess.Popen([str(fleet.bin / "fabfleet"),
                             "run-remote", "--host", "ws1", str(script)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("pids "), line + proc.stderr.read()
    pids = line.split()[1:]
    alive = remote(fleet, "ws1", f"ps -o pid= -p {','.join(pids)}").split()
    assert sorted(alive) == sorted(pids)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "stopped run" in err and "on ws1" in err
    time.sleep(0.3)
    assert remote(fleet, "ws1", f"ps -o pid= -p {','.join(pids)} || true").split() == []


# -- push ------------------------------------------------------------------------------
@pytest.mark.parametrize("host, method, forced", [("ws1", "rsync", "auto"),
                                                  ("ws2", "tar", "auto"),
                                                  ("ws2", "sftp", "sftp")])
def test_push_excludes_and_unchanged_repush(fleet, project, host, method, forced):
    inv = fleet.inventory()
    target = f"~/fabfleet/push-{method}"
    with connect(inv[host]) as c:
        execute(c, f"rm -rf {target}")
        first = fabfleet.push(c, project, target, excludes=["data.txt"], method=forced)
        assert first.method == method
        assert first.files_sent == first.files_total == 4  # .gitignore keep.log main.py util.py
        listing = execute(c, f"cd {target} && find . -type f | sort").stdout.split()
        assert listing == ["./.gitignore", "./keep.log", "./main.py", "./pkg/util.py"]
        again = fabfleet.push(c, project, target, excludes=["data.txt"], method=forced)
        assert again.files_sent == 0 and again.bytes_sent < 200
        (project / "main.py").write_text("print('changed')\n")
        third = fabfleet.push(c, project, target, excludes=["data.txt"], method=forced)
        assert third.files_sent == 1
        assert execute(c, f"cat {target}/main.py").stdout == "print('changed')\n"
        mode = execute(c, f"stat -c %a {target}/main.py").stdout.strip()
        assert mode[1:] == "00"  # nothing readable by group or others


def test_push_cli_reports_counts(fleet, project):
    r = fleet.cli("push", "--host", "ws1,ws2", inventory=fleet.inventory_path, cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rsync" in r.stdout and "tar" in r.stdout and "2/2 hosts ok" in r.stdout


# -- gather / setup-workdir / clean ------------------------------------------------------
def test_gather_verifies_and_never_overwrites(fleet, project):
    r = fleet.cli("run-remote", "--host", "ws1,ws2", "main.py",
                inventory=fleet.inventory_path, cwd=project)
    assert r.returncode == 0, r.stderr
    r = fleet.cli("gather", "--host", "ws1,ws2", "results/*.json",
                inventory=fleet.inventory_path, cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    got = project / "gathered" / "ws1" / "results" / "out.json"
    assert json.loads(got.read_text())["value"] == 42
    assert (project / "gathered" / "ws2" / "results" / "out.json").exists()
    r = fleet.cli("gather", "--host", "ws1", "results/*.json", inventory=fleet.inventory_path,
                cwd=project)
    assert r.returncode == 0 and "│ 0      │ 1" in r.stdout  # unchanged, not copied again
    got.write_text("my local edits")
    r = fleet.cli("gather", "--host", "ws1", "results/*.json", inventory=fleet.inventory_path,
                cwd=project)
    assert r.returncode == 1 and "differs from the remote copy and was kept" in r.stdout
    assert got.read_text() == "my local edits"
    r = fleet.cli("gather", "--host", "ws1", "results/*.json", "--overwrite",
                inventory=fleet.inventory_path, cwd=project)
    assert r.returncode == 0 and json.loads(got.read_text())["value"] == 42


def test_setup_workdir_is_idempotent_and_venv_is_used(fleet, tmp_path):
    req = write(tmp_path / "requirements.txt", "# nothing to install offline\n")
    for _ in range(2):
        r = fleet.cli("setup-workdir", "--host", "gpu1", "--requirements", str(req),
                    inventory=fleet.inventory_path, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
    assert remote(fleet, "gpu1", "stat -c %a ~/fabfleet").strip() == "700"
    script = write(tmp_path / "prefix.py", "import sys; print(sys.prefix)\n")
    r = fleet.cli("run-remote", "--host", "gpu1", str(script), inventory=fleet.inventory_path,
                cwd=tmp_path)
    assert r.stdout.strip() == f"/home/dev/fabfleet/.venvs/{tmp_path.name}"
    remote(fleet, "gpu1", f"rm -rf ~/fabfleet/.venvs/{tmp_path.name}")


def test_clean_removes_runs_and_code(fleet, project):
    fleet.cli("run-remote", "--host", "ws3", "main.py", inventory=fleet.inventory_path,
              cwd=project)
    assert remote(fleet, "ws3", "ls ~/fabfleet/.runs/proj | wc -l").strip() != "0"
    r = fleet.cli("clean", "--host", "ws3", "--code", inventory=fleet.inventory_path, cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr
    assert remote(fleet, "ws3", "ls -d ~/fabfleet/.runs/proj ~/fabfleet/proj 2>&1 | "
                  "grep -c 'No such'").split() == ["2"]
