"""The connection keeper (``FABFLEET_PERSIST``): a second command reuses the first's SSH
connection, as OpenSSH's ControlPersist does, and stays the user's own command.

Which TCP connection a command used is read off the host: ``$SSH_CLIENT`` holds the
client's source port, the same for every command on one connection. Run from the
non-editable user install, with the keeper on (conftest turns it off elsewhere).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import user_cli, wait_until
from fabfleet.config.deadlines import KEEPALIVE_INTERVAL

PORT = ["run", "-H", "ws1", "--", "sh", "-c", "echo ${SSH_CLIENT% *}"]


@pytest.fixture
def keeper(fleet, tmp_path, monkeypatch):
    """``cli(*args)`` with the keeper on in a home of this test's; stopped afterwards."""
    monkeypatch.setenv("FABFLEET_PERSIST", "30")
    home = Path(os.environ["HOME"])

    def cli(*args, **kw):
        kw.setdefault("inventory", fleet.inventory_path)
        kw.setdefault("cwd", tmp_path)
        return user_cli(fleet.bin, *args, **kw)
    cli.dir = home / ".cache" / "fabfleet" / "keep"
    yield cli
    user_cli(fleet.bin, "disconnect")
    deadline = time.monotonic() + 10
    while list(cli.dir.glob("*.sock")) and time.monotonic() < deadline:
        time.sleep(0.1)


def port_of(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_second_command_uses_the_first_ones_connection(keeper, fleet, tmp_path):
    first = port_of(keeper(*PORT))
    assert port_of(keeper(*PORT)) == first
    # it is still each command's own: exit code, stderr, working directory, environment
    r = keeper("run", "-H", "ws1", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, "err" in r.stderr) == (3, "out\n", True)
    sub = tmp_path / "keeper-proj"  # a name no other test's project has on ws1
    sub.mkdir()
    (sub / "pyproject.toml").write_text("")
    (sub / "hello.py").write_text("import os\nprint('from', os.path.basename(os.getcwd()))\n")
    r = keeper("run-remote", "-H", "ws1", "hello.py", cwd=sub)
    assert (r.returncode, r.stdout) == (0, "from keeper-proj\n"), r.stderr
    r = keeper("clean", "-H", "ws1", "--code", "--force", cwd=sub)
    assert r.returncode == 0, r.stdout + r.stderr
    other = tmp_path / "other.yaml"
    other.write_text(fleet.inventory_path.read_text().replace("ws1:", "renamed:", 1))
    r = keeper("run", "-H", "renamed", "--", "true", inventory=other)
    assert r.returncode == 0, r.stderr
    r = keeper("run", "-H", "ws1", "--", "true", inventory=other)
    assert r.returncode != 0 and "no host matches 'ws1'" in r.stderr
    # the socket and its directory are the user's alone
    assert stat.S_IMODE(keeper.dir.stat().st_mode) == 0o700
    sock, = keeper.dir.glob("*.sock")
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    # disconnect closes it: the next command shakes hands anew
    r = user_cli(fleet.bin, "disconnect")
    assert r.returncode == 0 and "ws1" in r.stdout, r.stdout
    deadline = time.monotonic() + 10
    while list(keeper.dir.glob("*.sock")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(keeper.dir.glob("*.sock"))
    assert port_of(keeper(*PORT)) != first


def test_changed_known_hosts_means_a_new_verified_connection(keeper, fleet, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(fleet.known_hosts.read_text())
    inv = tmp_path / "inventory.yaml"
    inv.write_text(fleet.inventory_path.read_text().replace(str(fleet.known_hosts), str(known)))
    assert str(known) in inv.read_text()
    first = port_of(keeper(*PORT, inventory=inv))
    assert port_of(keeper(*PORT, inventory=inv)) == first
    # the same file rewritten: checked again, on a new connection
    known.write_text(known.read_text())
    second = port_of(keeper(*PORT, inventory=inv))
    assert second != first
    # a wrong key for ws1 now: the kept connection is not used, the host is refused
    port = fleet.port("ws1")
    wrong = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(tmp_path / "k")], capture_output=True)
    assert wrong.returncode == 0
    key = (tmp_path / "k.pub").read_text().split()[:2]
    known.write_text("".join(
        f"[127.0.0.1]:{port} {' '.join(key)}\n" if line.startswith(f"[127.0.0.1]:{port} ")
        else line + "\n" for line in known.read_text().splitlines()))
    r = keeper(*PORT, inventory=inv)
    assert r.returncode != 0
    assert "ws1" in r.stderr and "host key" in r.stderr.lower(), r.stderr


def _remote_sleepers(fleet, tag: str) -> str:
    return subprocess.run(["docker", "exec", fleet.container("ws1"), "pgrep", "-f", tag],
                          capture_output=True, text=True).stdout.strip()


def _client(fleet, tmp_path, *args):
    env = {**os.environ, "FABFLEET_INVENTORY": str(fleet.inventory_path)}
    env.pop("PYTHONPATH", None)
    return subprocess.Popen([str(fleet.bin / "fabfleet"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("how", ["ctrl-c", "client killed"])
def test_ctrl_c_or_a_killed_client_stops_the_command_in_the_keeper(keeper, fleet, tmp_path,
                                                                   how):
    port_of(keeper(*PORT))  # the keeper is up and holds ws1
    tag = f"sleep 7{os.getpid() % 1000}{len(how)}"
    proc = _client(fleet, tmp_path, "run", "-H", "ws1", "--", "sh", "-c", tag)
    assert wait_until(lambda: _remote_sleepers(fleet, tag), 30), "the command never started"
    proc.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    if how == "ctrl-c":
        assert proc.returncode == 130, err
        assert "interrupted" in err
    assert wait_until(lambda: not _remote_sleepers(fleet, tag), 30), "the remote command lived on"
    # the keeper is free again, its connection intact
    r = keeper(*PORT)
    assert r.returncode == 0, r.stderr


def test_a_busy_keeper_lets_the_next_command_run_in_its_own_process(keeper, fleet, tmp_path):
    first = port_of(keeper(*PORT))
    tag = f"sleep 8{os.getpid() % 1000}"
    proc = _client(fleet, tmp_path, "run", "-H", "ws1", "--", "sh", "-c", tag)
    try:
        assert wait_until(lambda: _remote_sleepers(fleet, tag), 30)
        started = time.monotonic()
        other = port_of(keeper(*PORT))
        assert other != first  # its own connection, not queued behind the sleeper
        assert time.monotonic() - started < 20
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def test_a_keeper_directory_others_could_write_is_not_used(keeper, fleet):
    keeper.dir.mkdir(parents=True, exist_ok=True)
    keeper.dir.chmod(0o777)
    try:
        a, b = port_of(keeper(*PORT)), port_of(keeper(*PORT))
        assert a != b  # each command its own connection: no keeper was started
        assert not list(keeper.dir.glob("*.sock"))
    finally:
        keeper.dir.chmod(0o700)


def test_a_frozen_host_fails_the_next_command_in_time_then_recovers(keeper, fleet):
    first = port_of(keeper(*PORT))
    subprocess.run(["docker", "pause", fleet.container("ws1")], check=True, capture_output=True)
    try:
        started = time.monotonic()
        r = keeper(*PORT, timeout=90)
        took = time.monotonic() - started
        assert r.returncode != 0
        assert "ws1" in r.stderr and "answering" in r.stderr, r.stderr
        assert took < KEEPALIVE_INTERVAL + 5 + 20
    finally:
        subprocess.run(["docker", "unpause", fleet.container("ws1")], capture_output=True)
    again = port_of(keeper(*PORT))
    assert again != first  # the dead connection was dropped, a new one made


def test_an_idle_keeper_closes_its_connections_and_exits(keeper, fleet, monkeypatch):
    monkeypatch.setenv("FABFLEET_PERSIST", "2")
    port_of(keeper(*PORT))
    assert list(keeper.dir.glob("*.sock"))

    def standbys():  # the idle sessions a kept connection holds on the host
        return subprocess.run(["docker", "exec", fleet.container("ws1"), "pgrep", "-u", "dev",
                               "-f", "fabfleet_n=;"], capture_output=True, text=True).stdout
    assert wait_until(lambda: not list(keeper.dir.glob("*.sock")), 15)
    assert wait_until(lambda: not standbys().strip(), 15), standbys()
