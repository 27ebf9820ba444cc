"""Connections against real sshd containers: host keys, auth, timeouts, errors."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from dataclasses import replace

import paramiko
import pytest

from fabfleet import AuthError, ConnectError, HostKeyError, Inventory, connect


@pytest.fixture
def inv(fleet) -> Inventory:
    return fleet.inventory()


def test_connects_with_verified_key_and_nodelay(inv):
    with inv.connect("ws1") as c:
        assert c.run("cat /etc/fabfleet-host").stdout.strip() == "ws1"
        sock = c.client.get_transport().sock
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_unknown_host_key_is_refused_under_strict(inv, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    host = replace(inv["ws1"], known_hosts=str(empty))
    with pytest.raises(HostKeyError) as exc:
        connect(host).run("true")
    msg = str(exc.value)
    assert msg.startswith("ws1: refusing to connect to [127.0.0.1]:")
    assert f"ssh-keyscan -p {host.port} 127.0.0.1 >> {empty}" in msg
    assert "accept-new" in msg
    assert empty.read_text() == ""  # nothing recorded


def test_accept_new_records_then_verifies(inv, tmp_path):
    kh = tmp_path / "kh"
    host = replace(inv["ws1"], known_hosts=str(kh), host_key_policy="accept-new")
    with connect(host) as c:
        c.run("true")
    line = kh.read_text()
    assert line.startswith(f"[127.0.0.1]:{host.port} ssh-")
    with connect(replace(host, host_key_policy="strict")) as c:  # now known: strict passes
        assert c.run("echo ok").stdout == "ok\n"


def test_changed_key_is_refused_even_with_accept_new(inv, tmp_path):
    kh = tmp_path / "kh"
    fake = paramiko.Ed25519Key.generate() if hasattr(paramiko.Ed25519Key, "generate") else None
    if fake is None:  # paramiko cannot generate ed25519 keys: ask ssh-keygen
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(tmp_path / "fake")], check=True)
    pub = (tmp_path / "fake.pub").read_text().split() if fake is None else \
        [fake.get_name(), fake.get_base64()]
    host = replace(inv["ws1"], known_hosts=str(kh), host_key_policy="accept-new")
    kh.write_text(f"[127.0.0.1]:{host.port} {pub[0]} {pub[1]}\n")
    with pytest.raises(HostKeyError) as exc:
        connect(host).run("true")
    msg = str(exc.value)
    assert msg.startswith("ws1: the host key CHANGED")
    assert f"ssh-keygen -R '[127.0.0.1]:{host.port}' -f {kh}" in msg
    assert kh.read_text().count("\n") == 1  # the stale entry was not replaced


def test_wrong_key_is_an_auth_error(inv, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    host = replace(inv["ws1"], key_file=str(tmp_path / "k"))
    with pytest.raises(AuthError) as exc:
        connect(host).run("true")
    assert str(exc.value).startswith("ws1: authentication failed")
    assert "authorized_keys" in str(exc.value)


def test_missing_key_file_is_reported_before_connecting(inv, tmp_path):
    with pytest.raises(AuthError, match=r"^ws1: key_file .*/missing does not exist"):
        connect(replace(inv["ws1"], key_file=str(tmp_path / "missing")))


def test_nothing_listening_is_a_connect_error(inv):
    started = time.monotonic()
    with pytest.raises(ConnectError) as exc:
        inv.connect("down").run("true")
    assert str(exc.value).startswith("down: could not connect to 127.0.0.1:")
    assert "Connection refused" in str(exc.value)
    assert time.monotonic() - started < 2


def test_a_host_that_never_answers_times_out(inv):
    """A port that accepts TCP but never speaks SSH must not hang us."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    host = replace(inv["ws1"], port=server.getsockname()[1], connect_timeout=1.5)
    started = time.monotonic()
    with pytest.raises(ConnectError) as exc:
        connect(host).run("true")
    elapsed = time.monotonic() - started
    server.close()
    assert str(exc.value).startswith("ws1: ")
    assert 1 <= elapsed < 6


def test_alias_host_resolves_through_ssh_config(fleet, tmp_path, monkeypatch):
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"Host lab-alias\n  HostName 127.0.0.1\n  Port {fleet.port('ws1')}\n"
                   "  User dev\n")
    monkeypatch.setenv("FABFLEET_SSH_CONFIG", str(cfg))
    inv = Inventory.from_dict({
        "defaults": {"user": "nobody-from-defaults",  # ssh_config's User wins over defaults
                     "key_file": fleet.inventory()["ws1"].key_file,
                     "known_hosts": str(fleet.known_hosts)},
        "hosts": {"lab-alias": {}}}, "alias.yaml")
    with inv.connect("lab-alias") as c:
        assert (c.host, c.port, c.user) == ("127.0.0.1", fleet.port("ws1"), "dev")
        assert c.run("cat /etc/fabfleet-host").stdout.strip() == "ws1"
