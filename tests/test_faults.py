"""An operator's bad day on real sshd hosts: frozen hosts mid-run/push/gather, a full
remote disk, runs that must stop, leftover children, concurrent pushes, hostile file
names, out-of-tree symlinks — and a table of bad inputs, each a clear error."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import textwrap
import threading
import time

import pytest
from conftest import sh, write

from fabfleet import ConnectError, HostError, TransferError, connect, gather, push
from fabfleet.config.deadlines import KEEPALIVE_INTERVAL
from fabfleet.ssh.exec import execute

FROZEN_BOUND = KEEPALIVE_INTERVAL + 5 + 15  # interval + connect_timeout + rsync/poll slack


@contextlib.contextmanager
def paused(fleet, name: str, after: threading.Event | None = None):
    """Freeze ``name`` (at once, or when ``after`` is set, from a thread)."""
    def freeze():
        if after is not None:
            after.wait(60)
        subprocess.run(["docker", "pause", fleet.container(name)], capture_output=True)
    t = threading.Thread(target=freeze, daemon=True)
    t.start()
    try:
        if after is None:
            t.join()
        yield
    finally:
        if after is not None:
            after.set()
        t.join(70)
        subprocess.run(["docker", "unpause", fleet.container(name)], capture_output=True)


def gone(fleet, name: str, pids: list[str]) -> bool:
    out = sh(fleet, name, f"ps -o pid= -p {','.join(pids)} || true")
    return out.split() == []


# -- frozen hosts -------------------------------------------------------------------------
def test_frozen_host_mid_run_is_bounded_named_and_others_finish(fleet, tmp_path):
    script = write(tmp_path / "job.py", """\
        import time
        print("started", flush=True)
        time.sleep(6)
        print("finished", flush=True)
    """)
    started = time.monotonic()
    proc = subprocess.Popen([str(fleet.bin / "fabfleet"), "run-remote", "-H", "ws1,ws3",
                             str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FABFLEET_INVENTORY": str(fleet.inventory_path)})
    seen = threading.Event()

    def watch():
        for line in proc.stdout:
            watch.lines.append(line)
            if line.startswith("[ws3] started"):
                seen.set()
    watch.lines = []
    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    with paused(fleet, "ws3", after=seen):
        assert seen.wait(30)
        proc.wait(FROZEN_BOUND + 20)
        reader.join(5)
    elapsed = time.monotonic() - started
    err = proc.stderr.read()
    assert proc.returncode == 1, err
    assert "[ws1] finished\n" in watch.lines
    assert "ws3: the host stopped answering" in err and "1/2 hosts ok" in err
    assert elapsed < FROZEN_BOUND + 15


@pytest.mark.parametrize("method", ["sftp", "rsync", "tar"])  # tar: through OpenSSH (150 MB)
def test_frozen_host_mid_push_is_bounded(fleet, tmp_path, method):
    tree = tmp_path / "big"
    tree.mkdir()
    with open(tree / "blob.bin", "wb") as f:
        f.write(os.urandom(1 << 20) * 150)  # 150 MB: still moving when the host freezes
    moving = threading.Event()
    with connect(fleet.inventory()["ws3"]) as c:
        execute(c, "rm -rf ~/frozen-push")
        with paused(fleet, "ws3", after=moving):
            started = time.monotonic()
            with pytest.raises(HostError) as info:
                for i in range(3):  # if one finishes before the freeze, the next one won't
                    push(c, tree, f"~/frozen-push/{i}", method=method,
                         on_progress=lambda done, total: moving.set() if done else None)
            elapsed = time.monotonic() - started
    assert info.value.host == "ws3" and isinstance(info.value, (ConnectError, TransferError))
    assert elapsed < FROZEN_BOUND + 15, elapsed


def test_frozen_host_mid_gather_is_bounded(fleet, tmp_path):
    with connect(fleet.inventory()["ws3"]) as c:
        execute(c, "mkdir -p ~/fabfleet/g && head -c 150000000 /dev/zero > ~/fabfleet/g/big.bin")
        freeze = threading.Event()
        threading.Timer(0.3, freeze.set).start()
        with paused(fleet, "ws3", after=freeze):
            started = time.monotonic()
            with pytest.raises(HostError) as info:
                for _ in range(3):  # if one finishes before the freeze, the next one won't
                    gather(c, "~/fabfleet/g", ["*.bin"], tmp_path / "out", overwrite=True)
            elapsed = time.monotonic() - started
    assert info.value.host == "ws3" and "Traceback" not in str(info.value)
    assert elapsed < FROZEN_BOUND + 15, elapsed
    assert not list((tmp_path / "out").glob("big.bin"))  # never a partial file in place
    sh(fleet, "ws3", "rm -rf ~/fabfleet/g")


# -- runs that must end -----------------------------------------------------------------
def test_timeout_stops_the_whole_process_group(fleet, tmp_path):
    script = write(tmp_path / "forever.py", """\
        import os, subprocess, time
        child = subprocess.Popen(["sleep", "300"])
        print("pids", os.getpid(), child.pid, flush=True)
        time.sleep(300)
    """)
    started = time.monotonic()
    r = fleet.cli("run-remote", "-H", "ws1", str(script), "--timeout", "2",
                  inventory=fleet.inventory_path, cwd=tmp_path)
    assert time.monotonic() - started < 15
    assert r.returncode == 124, r.stderr
    assert "was stopped after 2s (--timeout) with its whole process group" in r.stderr
    pids = r.stdout.split()[1:3]
    assert gone(fleet, "ws1", pids)
    run_dir = r.stderr.split("run dir ")[1].split(")")[0]
    timing = sh(fleet, "ws1", f"cat {run_dir}/timing.json; cat {run_dir}/exit_code")
    assert '"stopped": "timeout"' in timing and timing.rstrip().endswith("124")


def test_background_child_is_stopped_when_the_script_exits(fleet, tmp_path):
    script = write(tmp_path / "bg.py", """\
        import subprocess
        child = subprocess.Popen(["sleep", "300"])
        print("child", child.pid, flush=True)
    """)
    started = time.monotonic()
    r = fleet.cli("run-remote", "-H", "ws1", str(script), inventory=fleet.inventory_path,
                  cwd=tmp_path)
    assert time.monotonic() - started < 10
    assert r.returncode == 0, r.stderr
    assert "left 1 process(es) running in its process group" in r.stderr
    assert gone(fleet, "ws1", [r.stdout.split()[1]])
    r = fleet.cli("run-remote", "-H", "ws1", str(script), "--keep-children",
                  inventory=fleet.inventory_path, cwd=tmp_path)
    child = r.stdout.split()[1]
    assert r.returncode == 0 and "kept, as asked" in r.stderr
    assert not gone(fleet, "ws1", [child])
    sh(fleet, "ws1", f"kill {child}")


def test_a_daemon_holding_the_output_does_not_hang_the_run(fleet, tmp_path):
    script = write(tmp_path / "daemon.py", """\
        import os, time
        if os.fork() == 0:
            os.setsid()              # escapes the script's process group
            if os.fork() == 0:
                time.sleep(300)      # still holding stdout and stderr
            os._exit(0)
        print("parent done", flush=True)
    """)
    started = time.monotonic()
    r = fleet.cli("run-remote", "-H", "ws1", str(script), inventory=fleet.inventory_path,
                  cwd=tmp_path)
    assert time.monotonic() - started < 15
    assert r.returncode == 0 and r.stdout == "parent done\n", r.stderr
    assert "still holds its output open" in r.stderr
    sh(fleet, "ws1", "pkill -f 'sleep 300' -u dev; pkill -f daemon.py -u dev; true")


def test_runner_failure_is_not_the_scripts_exit_code(fleet, tmp_path):
    inv = tmp_path / "inv.yaml"
    inv.write_text(fleet.inventory_path.read_text().replace(
        "work_dir: ~/fabfleet", "work_dir: /etc/fabfleet-nope"))
    write(tmp_path / "ok.py", "print('never')\n")
    r = fleet.cli("run-remote", "-H", "ws1", "ok.py", "--no-push", inventory=inv, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "ws1: the run could not start" in r.stderr
    assert "cannot create the working directory /etc/fabfleet-nope" in r.stderr


@pytest.fixture
def tiny_host(fleet, tmp_path):
    """A host whose work dir is a 5 MB tmpfs (a full disk on demand)."""
    import testbed
    name, port = "fabfleet-tests-tiny", fleet.prefix * 100 + 10
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    subprocess.run(["docker", "run", "-d", "--name", name, "--network", "host", "--init",
                    "--tmpfs", "/home/dev/small:size=5m,uid=1000,gid=1000,mode=0700",
                    "-e", "FABFLEET_HOST=tiny", "-e", f"SSH_PORT={port}",
                    "-v", f"{testbed.KEY}.pub:/testbed/authorized_keys:ro",
                    "fabfleet-testbed:plain"], check=True, capture_output=True)
    try:
        deadline = time.monotonic() + 30
        while not testbed.ssh_ready(port):
            assert time.monotonic() < deadline, "tiny host did not start"
            time.sleep(0.1)
        inv = tmp_path / "tiny.yaml"
        inv.write_text(textwrap.dedent(f"""\
            defaults: {{user: dev, key_file: {testbed.KEY}, known_hosts: {tmp_path / 'kh'},
                        host_key_policy: accept-new, connect_timeout: 5}}
            hosts:
              tiny: {{hostname: 127.0.0.1, port: {port}, work_dir: ~/small}}
        """))
        yield inv
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def test_full_remote_disk_never_blocks_the_script(fleet, tiny_host, tmp_path):
    script = write(tmp_path / "loud.py", """\
        import sys
        line = "x" * 1023 + "\\n"
        for _ in range(12 * 1024):          # 12 MB of output into a 5 MB disk
            sys.stdout.write(line)
        print("the end")
    """)
    started = time.monotonic()
    r = fleet.cli("run-remote", "-H", "tiny", str(script), inventory=tiny_host, cwd=tmp_path,
                  timeout=120)
    assert time.monotonic() - started < 60
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.endswith("the end\n") and len(r.stdout) > 12 * 1024 * 1024
    assert "could not save stdout in the run dir: No space left on device" in r.stderr
    # a push into the full disk says so, and names the host
    big = tmp_path / "bigproj"
    big.mkdir()
    (big / "pyproject.toml").write_text("")
    (big / "data.bin").write_bytes(os.urandom(8 << 20))
    r = fleet.cli("push", "-H", "tiny", "--method", "sftp", inventory=tiny_host, cwd=big)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert "tiny:" in r.stdout
    # the same through the tar stream (8 MB: it goes through OpenSSH): named, nothing in place
    r = fleet.cli("push", "-H", "tiny", "--method", "tar", inventory=tiny_host, cwd=big)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr
    assert "tiny:" in r.stdout and "disk is full" in r.stdout + r.stderr, r.stdout + r.stderr


# -- transfers: atomic and contained -----------------------------------------------------
def test_concurrent_sftp_pushes_leave_whole_files(fleet, tmp_path):
    versions = {}
    for v in ("a", "b"):
        d = tmp_path / v
        d.mkdir()
        for i in range(6):
            (d / f"f{i}.bin").write_bytes(os.urandom(512 * 1024))
        versions[v] = d
    digests = {i: {hashlib.sha256((versions[v] / f"f{i}.bin").read_bytes()).hexdigest()
                   for v in versions} for i in range(6)}
    host = fleet.inventory()["ws2"]
    for round_ in range(4):
        with connect(host) as c1, connect(host) as c2:
            execute(c1, "rm -rf ~/race")
            errors = []

            def go(c, d):
                try:
                    push(c, d, "~/race", method="sftp")
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)
            ts = [threading.Thread(target=go, args=(c1, versions["a"])),
                  threading.Thread(target=go, args=(c2, versions["b"]))]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            assert not errors, errors
            out = execute(c1, "cd ~/race && sha256sum f*.bin && ls -A").stdout.split("\n")
        for i in range(6):
            line = next(ln for ln in out if ln.endswith(f"f{i}.bin"))
            assert line.split()[0] in digests[i], (round_, i)
        assert not [ln for ln in out if "fabfleet-tmp" in ln]


@pytest.mark.parametrize("host", ["ws1", "ws2"])
def test_out_of_tree_symlink_content_never_reaches_the_host(fleet, tmp_path, host):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT\n")
    secret.chmod(0o600)
    proj = tmp_path / "symproj"
    proj.mkdir()
    (proj / "pyproject.toml").write_text("")
    (proj / "leak").symlink_to(secret)
    (proj / "inside.txt").write_text("fine\n")
    (proj / "alias.txt").symlink_to("inside.txt")
    r = fleet.cli("push", "-H", host, inventory=fleet.inventory_path, cwd=proj)
    assert r.returncode == 0, r.stdout + r.stderr
    out = sh(fleet, host, "cd ~/fabfleet/symproj && readlink leak; readlink alias.txt; "
             "cat alias.txt; grep -rs TOP-SECRET ~ | wc -l")
    assert out.split("\n")[:4] == [str(secret), "inside.txt", "fine", "0"]


def test_hostile_remote_names_stay_inside_gathered(fleet, tmp_path):
    with connect(fleet.inventory()["ws1"]) as c:
        execute(c, "rm -rf ~/fabfleet/hostile && mkdir -p ~/fabfleet/hostile/results && "
                   "cd ~/fabfleet/hostile/results && mkdir \"$(printf 'x\\n..')\" && "
                   "echo pwn > \"$(printf 'x\\n..')/evil.txt\" && "
                   "echo nl > \"$(printf 'new\\nline.txt')\" && "
                   "echo raw > \"$(printf 'bad\\377name.txt')\" && echo ok > plain.txt")
        files = gather(c, "~/fabfleet/hostile", ["results/**"], tmp_path / "gathered" / "ws1")
    assert sorted(f.status for f in files) == ["copied"] * 4
    got = {p.relative_to(tmp_path).as_posix() for p in (tmp_path).rglob("*") if p.is_file()}
    assert all(p.startswith("gathered/ws1/results/") for p in got), got
    assert (tmp_path / "gathered" / "ws1" / "results" / "new\nline.txt").read_text() == "nl\n"
    assert not (tmp_path / "gathered" / "ws1" / "evil.txt").exists()
    assert (tmp_path / "gathered" / "ws1" / "results" / "x\n.." / "evil.txt").exists()
    assert os.path.exists(os.path.join(os.fsencode(tmp_path / "gathered" / "ws1" / "results"),
                                       b"bad\xffname.txt"))


def test_gather_refuses_a_path_through_a_local_symlink(fleet, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "gathered" / "ws1"
    (dest / "results").mkdir(parents=True)
    (dest / "results" / "sub").symlink_to(outside)
    with connect(fleet.inventory()["ws1"]) as c:
        execute(c, "mkdir -p ~/fabfleet/lnk/results/sub && echo x > ~/fabfleet/lnk/results/sub/f")
        files = gather(c, "~/fabfleet/lnk", ["results/**"], dest)
    assert [f.status for f in files] == ["refused"]
    assert list(outside.iterdir()) == []


# -- bad input: one clear paragraph each, never a traceback --------------------------------
BAD_INPUTS = [
    (["hosts", "-H", ",,"], None, 2, "names no host"),
    (["check-env", "-g", "nope"], None, 2, "no group named 'nope'"),
    (["check-env"], None, 2, "exactly one of --host"),
    (["run-remote", "-H", "ws1", "ok.py", "--timeout", "abc"], None, 2, "--timeout 'abc'"),
    (["run-remote", "-H", "ws1", "ok.py", "--max-parallel", "abc"], None, 2,
     "--max-parallel 'abc'"),
    (["run-remote", "-H", "ws1", "ok.py", "--max-parallel", "0"], None, 2, "at least 1"),
    (["run-remote", "-H", "ws1", "ok.py", "--args", "'open"], None, 2, "--args"),
    (["run-remote", "-H", "ws1", "missing.py"], None, 2, "script not found"),
    (["gather", "-H", "ws1", "'a"], None, 2, "patterns \"'a\""),
    (["push", "-H", "ws1", "--method", "ftp"], None, 2, "expected auto, rsync, tar or sftp"),
    (["run-pickle", "-H", "ws1", "nope.pkl"], None, 2, "cannot read the payload"),
    (["hosts"], "hosts:\n  ws1: {port: 22}\n  ws1: {port: 23}\n", 2, "given twice"),
    (["hosts"], "hosts:\n  ws1: {hostname: '-oProxyCommand=touch /tmp/x'}\n", 2,
     "does not start with '-'"),
    (["hosts"], "hosts:\n  ws1: {python: '-c'}\n", 2, "hosts.ws1.python"),
    (["hosts"], "hosts: [ws1]\n", 2, "expected a mapping of host names"),
    (["check-env", "-H", "ws1"], "KNOWN_HOSTS_BROKEN", 1, "line 2"),
]


@pytest.mark.parametrize("args, inventory, code, message", BAD_INPUTS,
                         ids=[" ".join(a[0]) + (f" [{a[1][:14]}]" if a[1] else "")
                              for a in BAD_INPUTS])
def test_bad_input_is_one_clear_error(fleet, tmp_path, args, inventory, code, message):
    write(tmp_path / "ok.py", "print('ok')\n")
    inv = fleet.inventory_path
    if inventory == "KNOWN_HOSTS_BROKEN":
        kh = tmp_path / "kh"
        # ws2's line, then a broken one for ws1: skipped as ssh skips it, and named
        kh.write_text(fleet.known_hosts.read_text().splitlines()[1] + "\n"
                      "[127.0.0.1]:2301 ssh-ed25519 AAAAnotbase64!!\n")
        inv = tmp_path / "inv.yaml"
        inv.write_text(fleet.inventory_path.read_text().replace(str(fleet.known_hosts), str(kh)))
    elif inventory is not None:
        inv = tmp_path / "inv.yaml"
        inv.write_text(inventory)
    r = fleet.cli(*args, inventory=inv, cwd=tmp_path)
    assert r.returncode == code, r.stdout + r.stderr
    assert message in r.stdout + r.stderr, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_work_dir_starting_with_a_dash_is_a_path_not_an_option(fleet, tmp_path):
    inv = tmp_path / "inv.yaml"
    inv.write_text(fleet.inventory_path.read_text().replace(
        "work_dir: ~/fabfleet", "work_dir: -rf"))
    write(tmp_path / "pyproject.toml", "")
    write(tmp_path / "where.py", "import os; print(os.getcwd())\n")
    r = fleet.cli("run-remote", "-H", "ws2", "where.py", inventory=inv, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"/home/dev/-rf/{tmp_path.name}"
    sh(fleet, "ws2", "rm -rf ./-rf")
