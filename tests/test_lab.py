"""fabfleet against hosts set up the way labs are (testbed.LAB): stock sshd limits, hosts
known by an older key type only, every kind of known_hosts line, a bastion whose inner
host only it can resolve, environment modules through ``setup:`` and a login shell, a
conda installation, a Python without ensurepip, and a link 50 ms away."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from conftest import sh, user_cli, write

import testbed
from fabfleet import Inventory, check_hosts, run_payload
from fabfleet.fleet.checks import check_hosts as check_many
from fabfleet.ssh.exec import execute
from testbed.latency import LatencyProxy

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("fresh_workers")]


@pytest.fixture
def lab(fleet, monkeypatch):
    """The lab inventory, with the lab ssh_config in force (``stock`` is an alias)."""
    monkeypatch.setenv("FABFLEET_SSH_CONFIG", str(fleet.lab_ssh_config))
    return Inventory.load(fleet.lab_inventory)


def variant(fleet, tmp_path, *, known_hosts: str | None = None, extra: str = "",
            replace: tuple[str, str] | None = None) -> Inventory:
    """The lab inventory with another known_hosts text, extra hosts, or one edit."""
    text = fleet.lab_inventory.read_text()
    if known_hosts is not None:
        kh = tmp_path / "known_hosts"
        kh.write_text(known_hosts)
        text = text.replace(str(fleet.known_hosts), str(kh))
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    path = tmp_path / "inventory.yaml"
    path.write_text(text + extra)
    return Inventory.load(path)


def keys(name: str, key_type: str | None = None, as_name: str | None = None) -> str:
    return "\n".join(testbed.host_key_lines(name, 23, key_type, as_name)) + "\n"


def fake_key(tmp_path: Path, key_type: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-f",
                    str(tmp_path / f"fake-{key_type}")], check=True)
    return " ".join((tmp_path / f"fake-{key_type}.pub").read_text().split()[:2])


# -- host keys, as strict as OpenSSH -------------------------------------------------------
def test_hosts_known_by_one_older_key_type_connect_under_strict(lab):
    report = check_many(lab)
    assert report["ok"], json.dumps(report["hosts"], indent=1)
    assert report["hosts"]["inner"]["route"] == ["bastion"]
    assert report["hosts"]["stock"]["route"] == []


def test_a_type_other_than_the_recorded_one_is_not_new(fleet, lab, tmp_path):
    """inner only has an ECDSA key; known_hosts records an Ed25519 one for it: not a new
    host (accept-new would append), not silently accepted — refused, nothing written."""
    kh = keys("bastion") + f"[inner.lab]:{fleet.port('inner')} {fake_key(tmp_path, 'ed25519')}\n"
    inv = variant(fleet, tmp_path, known_hosts=kh,
                  replace=("host_key_policy: strict", "host_key_policy: accept-new"))
    report = check_hosts(inv.select(host="inner"))
    err = report["hosts"]["inner"]["error"]
    assert report["hosts"]["inner"]["error_type"] == "HostKeyError", err
    assert "offers none of the host-key types known_hosts records" in err
    assert (tmp_path / "known_hosts").read_text() == kh


def test_hashed_wildcard_negated_ca_and_revoked_lines(fleet, lab, tmp_path):
    port = fleet.port("stock")
    hashed = tmp_path / "hashed"
    hashed.write_text(keys("stock"))
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(hashed)], check=True,
                   capture_output=True)
    wildcard = keys("bastion").replace(f"[127.0.0.7]:{fleet.port('bastion')}",
                                       f"[127.0.0.?]:{fleet.port('bastion')},!nomatch.example")
    ca = f"@cert-authority *.example.org {fake_key(tmp_path, 'ed25519')}\n"
    other_revoked = f"@revoked * {fake_key(tmp_path, 'ecdsa')}\n"
    text = ca + other_revoked + hashed.read_text() + wildcard + keys("inner", as_name="inner.lab")
    inv = variant(fleet, tmp_path, known_hosts=text)
    report = check_hosts(inv.select(host="stock,bastion,inner"))
    assert report["ok"], json.dumps(report["hosts"], indent=1)
    # the same key @revoked: refused, naming the line, never "remove it"
    revoked = text + f"@revoked [127.0.0.6]:{port} " + " ".join(keys("stock").split()[1:3]) + "\n"
    inv = variant(fleet, tmp_path, known_hosts=revoked)
    err = check_hosts(inv.select(host="stock"))["hosts"]["stock"]["error"]
    lines = revoked.count("\n")
    assert f"marked @revoked in {tmp_path / 'known_hosts'} line {lines}" in err
    assert "never remove the @revoked line" in err
    # a negated pattern takes the line out
    negated = keys("stock").replace(f"[127.0.0.6]:{port}", f"[127.0.0.*]:{port},![127.0.0.6]:{port}")
    inv = variant(fleet, tmp_path, known_hosts=negated)
    err = check_hosts(inv.select(host="stock"))["hosts"]["stock"]["error"]
    assert "is not in" in err and "ssh-keyscan -p" in err


def test_accept_new_never_records_into_dev_null(fleet, lab, tmp_path, monkeypatch):
    cfg = tmp_path / "ssh_config"
    cfg.write_text(fleet.lab_ssh_config.read_text() + "Host *\n    UserKnownHostsFile /dev/null\n")
    monkeypatch.setenv("FABFLEET_SSH_CONFIG", str(cfg))
    text = fleet.lab_inventory.read_text().replace(f"  known_hosts: {fleet.known_hosts}\n", "")
    text = text.replace("host_key_policy: strict", "host_key_policy: accept-new")
    path = write(tmp_path / "inv.yaml", text)
    report = check_hosts(Inventory.load(path).select(host="stock"))
    err = report["hosts"]["stock"]["error"]
    assert "has nowhere to record it" in err and "/dev/null" in err


def test_an_unreadable_line_is_skipped_and_named(fleet, lab, tmp_path):
    text = keys("bastion") + f"[127.0.0.6]:{fleet.port('stock')} ecdsa-sha2-nistp256 AAAA!!\n"
    inv = variant(fleet, tmp_path, known_hosts=text)
    report = check_hosts(inv.select(host="stock,bastion"))
    assert report["hosts"]["bastion"]["ok"]
    assert "line 2" in report["hosts"]["stock"]["error"]


# -- bastions ------------------------------------------------------------------------------
def test_many_targets_behind_one_stock_bastion(fleet, lab, tmp_path):
    """16 hosts behind a bastion with stock MaxStartups (10): one login on the bastion,
    handshakes through it bounded; targets closing while others run never take the
    shared connection down (three rounds)."""
    extra = "".join(f"  inner{i}:\n    hostname: inner.lab\n    port: {fleet.port('inner')}\n"
                    f"    jump: bastion\n    groups: [many]\n" for i in range(16))
    inv = variant(fleet, tmp_path, extra=extra)
    for _ in range(3):
        report = check_hosts(inv.select(group="many"))
        assert report["ok"], {h: r["error"] for h, r in report["hosts"].items() if not r["ok"]}
    from fabfleet.ssh.connect import open_gateways
    assert open_gateways() == ["bastion"]


def test_changed_or_unknown_bastion_key_is_refused_on_every_path(fleet, lab, tmp_path):
    bastion = f"[127.0.0.7]:{fleet.port('bastion')}"
    changed = keys("inner", as_name="inner.lab") + f"{bastion} {fake_key(tmp_path, 'rsa')}\n"
    proj = tmp_path / "labproj1"
    write(proj / "pyproject.toml", "")
    write(proj / "t.py", "print('ran')\n")
    for text, words in ((changed, "the host key CHANGED"),
                        (keys("inner", as_name="inner.lab"), "is not in")):
        inv = variant(fleet, tmp_path, known_hosts=text)
        for args in (["check-env", "-H", "inner"], ["push", "-H", "inner"],
                     ["run-remote", "-H", "inner", "t.py"]):
            r = user_cli(fleet.bin, *args, inventory=Path(inv.path), cwd=proj,
                         env={"FABFLEET_SSH_CONFIG": str(fleet.lab_ssh_config)})
            out = r.stdout + r.stderr
            assert r.returncode != 0 and "inner: through bastion bastion:" in out, out
            assert words in out and "ran\n" not in r.stdout.splitlines(keepends=True), out


def test_push_and_run_through_the_bastion(fleet, lab, tmp_path):
    proj = tmp_path / "viabastion"
    write(proj / "pyproject.toml", "")
    write(proj / "t.py", "print('on', open('/etc/fabfleet-host').read().strip())\n")
    env = {"FABFLEET_SSH_CONFIG": str(fleet.lab_ssh_config)}
    r = user_cli(fleet.bin, "push", "-H", "inner", inventory=fleet.lab_inventory, cwd=proj,
                 env=env)
    assert r.returncode == 0 and "rsync" in r.stdout, r.stdout + r.stderr
    r = user_cli(fleet.bin, "run-remote", "-H", "inner", "t.py", inventory=fleet.lab_inventory,
                 cwd=proj, env=env)
    assert r.returncode == 0 and r.stdout == "on inner\n", r.stdout + r.stderr
    r = user_cli(fleet.bin, "hosts", inventory=fleet.lab_inventory, cwd=proj,
                 env={**env, "COLUMNS": "300"})
    row, = [line for line in r.stdout.splitlines() if line.startswith("│ inner ")]
    assert "│ bastion " in row, r.stdout


def test_ssh_config_proxyjump_and_none(fleet, lab, tmp_path, monkeypatch):
    cfg = tmp_path / "ssh_config"
    cfg.write_text(fleet.lab_ssh_config.read_text() + f"""\
Host viaconfig
    HostName inner.lab
    Port {fleet.port('inner')}
    ProxyJump dev@127.0.0.7:{fleet.port('bastion')}
Host direct
    HostName 127.0.0.7
    Port {fleet.port('bastion')}
    ProxyJump none
""")
    monkeypatch.setenv("FABFLEET_SSH_CONFIG", str(cfg))
    inv = variant(fleet, tmp_path, extra="  viaconfig: {}\n  direct: {}\n")
    report = check_hosts(inv.select(host="viaconfig,direct"))
    assert report["ok"], json.dumps(report["hosts"], indent=1)
    assert report["hosts"]["viaconfig"]["route"] == ["127.0.0.7"]
    assert report["hosts"]["direct"]["route"] == []


def test_a_target_the_bastion_cannot_reach(fleet, lab, tmp_path):
    inv = variant(fleet, tmp_path, extra="  nowhere:\n    hostname: inner.lab\n    port: 1\n"
                                         "    jump: bastion\n")
    err = check_hosts(inv.select(host="nowhere"))["hosts"]["nowhere"]["error"]
    assert err.startswith("nowhere: bastion bastion could not reach inner.lab:1"), err


def test_a_bastion_that_refuses_to_forward(fleet, lab, tmp_path):
    inv = variant(fleet, tmp_path, extra=f"  behindclosed:\n    hostname: inner.lab\n"
                                         f"    port: {fleet.port('inner')}\n"
                                         "    jump: closedgw\n")
    err = check_hosts(inv.select(host="behindclosed"))["hosts"]["behindclosed"]["error"]
    assert err.startswith("behindclosed: bastion closedgw refused to forward"), err
    assert "AllowTcpForwarding" in err


# -- stock sshd limits ---------------------------------------------------------------------
def test_max_jobs_12_on_stock_sshd(lab):
    """MaxSessions 10: twelve workers need two connections, and all 24 items run."""
    started = time.monotonic()
    out = lab.select(host="stock").map(lambda x: __import__("time").sleep(0.5) or x * 2,
                                       range(24))
    assert out == [x * 2 for x in range(24)]
    assert time.monotonic() - started < 12
    from fabfleet.host.pool import pool_for
    assert len(pool_for(lab["stock"]).conns) == 2


# -- the host's environment: setup, login shells, modules, conda ---------------------------
SHOW = "import os, shutil; print(os.environ.get('CUDA_HOME'), shutil.which('nvcc'))\n"


def test_module_load_through_setup_in_a_login_shell(fleet, lab, tmp_path):
    inv = variant(fleet, tmp_path, replace=("    jump: bastion\n", "    jump: bastion\n"
                                            "    setup: [module load cuda]\n    shell: login\n"))
    proj = tmp_path / "mods"
    write(proj / "pyproject.toml", "")
    write(proj / "show.py", SHOW)
    env = {"FABFLEET_SSH_CONFIG": str(fleet.lab_ssh_config)}
    want = "/opt/cuda-12.2 /opt/cuda-12.2/bin/nvcc\n"
    r = user_cli(fleet.bin, "run-remote", "-H", "inner", "show.py", inventory=Path(inv.path),
                 cwd=proj, env=env)
    assert r.returncode == 0 and r.stdout == want, r.stdout + r.stderr

    def seen():
        import os
        import shutil
        return os.environ.get("CUDA_HOME"), shutil.which("nvcc")
    assert run_payload(inv.connect("inner"), seen) == ("/opt/cuda-12.2", "/opt/cuda-12.2/bin/nvcc")
    r = user_cli(fleet.bin, "run-remote", "-H", "inner", "show.py", "--detach", "--json",
                 inventory=Path(inv.path), cwd=proj, env=env)
    run_id = json.loads(r.stdout)["hosts"]["inner"]["run_id"]
    r = user_cli(fleet.bin, "logs", run_id, "-H", "inner", "--follow", inventory=Path(inv.path),
                 cwd=proj, env=env)
    assert r.returncode == 0 and r.stdout == want, r.stdout + r.stderr


def test_a_module_outside_a_login_shell_is_explained(fleet, lab, tmp_path):
    inv = variant(fleet, tmp_path, replace=("    jump: bastion\n",
                                            "    jump: bastion\n    setup: [module load cuda]\n"))
    report = check_hosts(inv.select(host="inner"))
    err = report["hosts"]["inner"]["error"]
    assert "setup line failed: 'module load cuda'" in err or "module load cuda" in err, err
    assert "set `shell: login`" in err
    proj = tmp_path / "labproj2"
    write(proj / "pyproject.toml", "")
    write(proj / "show.py", SHOW)
    r = user_cli(fleet.bin, "run-remote", "-H", "inner", "show.py", inventory=Path(inv.path),
                 cwd=proj, env={"FABFLEET_SSH_CONFIG": str(fleet.lab_ssh_config)})
    assert r.returncode == 97
    assert "the setup line `module load cuda` failed" in r.stderr and "shell: login" in r.stderr


def test_conda_env_activates_for_runs_and_workers(fleet, lab, tmp_path):
    inv = variant(fleet, tmp_path, replace=("    jump: bastion\n",
                                            "    jump: bastion\n    conda_env: lab\n"))

    def env():
        import os
        import sys
        return os.environ.get("CONDA_DEFAULT_ENV"), sys.executable
    assert run_payload(inv.connect("inner"), env) == ("lab", "/opt/conda/envs/lab/bin/python3")
    assert check_hosts(inv.select(host="inner"))["ok"]
    bad = variant(fleet, tmp_path, replace=("    jump: bastion\n",
                                            "    jump: bastion\n    conda_env: nosuch\n"))
    err = check_hosts(bad.select(host="inner"))["hosts"]["inner"]["error"]
    assert "conda env nosuch does not activate" in err and "EnvironmentNameNotFound" in err


def test_micromamba_env_activates_on_a_host_without_conda(fleet, lab, tmp_path):
    inv = variant(fleet, tmp_path, replace=("    max_jobs: 12\n",
                                            "    max_jobs: 12\n    conda_env: mm\n"))

    def env():
        import os
        import sys
        return os.environ.get("CONDA_DEFAULT_ENV"), sys.executable
    assert run_payload(inv.connect("stock"), env) == ("mm", "/opt/micromamba/envs/mm/bin/python3")
    report = check_hosts(inv.select(host="stock"))
    assert report["ok"], report["hosts"]["stock"]["error"]


def test_requirements_on_a_python_without_ensurepip(fleet, lab, tmp_path):
    proj = tmp_path / "noensurepip"
    write(proj / "pyproject.toml", "")
    write(proj / "requirements.txt", "--no-index\n")
    env = {"FABFLEET_SSH_CONFIG": str(fleet.lab_ssh_config)}
    with lab.connect("inner") as c:
        assert execute(c, "python3 -m venv /tmp/x").exit_code != 0  # really no ensurepip
        execute(c, "rm -rf ~/fabfleet/.venvs/noensurepip ~/.cache/fabfleet/pip-*")
    r = user_cli(fleet.bin, "setup-workdir", "-H", "inner", "--requirements", "requirements.txt",
                 inventory=fleet.lab_inventory, cwd=proj, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    with lab.connect("inner") as c:
        out = execute(c, "ls ~/fabfleet/.venvs/noensurepip/bin/python && "
                         "ls ~/.cache/fabfleet/pip-*.pyz && stat -c %a ~/.cache/fabfleet/pip-*.pyz")
    assert out.exit_code == 0 and out.stdout.strip().endswith("600"), out.stdout + out.stderr


# -- latency -------------------------------------------------------------------------------
def test_key_flows_at_50ms_round_trip(fleet, tmp_path):
    """Through a 50 ms proxy: check-env, run-remote in an unchanged project, a warm call:
    bounded in round trips (a new round trip per file or per call would blow the bound)."""
    rtt = 0.05
    with LatencyProxy(("127.0.0.1", fleet.port("ws1")), rtt_ms=rtt * 1000) as proxy:
        line = fleet.known_hosts.read_text().splitlines()[0]
        kh = write(tmp_path / "kh", line.replace(f"[127.0.0.1]:{fleet.port('ws1')}",
                                                 f"[127.0.0.1]:{proxy.port}") + "\n")
        inv_path = write(tmp_path / "inv.yaml", f"""\
            defaults: {{user: dev, key_file: {testbed.KEY}, known_hosts: {kh},
                       connect_timeout: 10}}
            hosts:
              far: {{hostname: 127.0.0.1, port: {proxy.port}}}
        """)
        inv = Inventory.load(inv_path)
        t = time.monotonic()
        assert check_hosts(inv)["ok"]
        check_trips = (time.monotonic() - t) / rtt
        with inv.connect("far") as c:
            run_payload(c, abs, -1)  # cold
            t = time.monotonic()
            for _ in range(5):
                assert run_payload(c, abs, -2) == 2
            warm_trips = (time.monotonic() - t) / 5 / rtt
        proj = tmp_path / "labproj3"
        sh(fleet, "ws1", "rm -rf ~/fabfleet/labproj3")  # a kept testbed's earlier copy
        write(proj / "pyproject.toml", "")
        for i in range(20):
            write(proj / f"mod{i}.py", f"X = {i}\n")
        write(proj / "main.py", "import mod3\nprint(mod3.X)\n")
        r = user_cli(fleet.bin, "run-remote", "-H", "far", "main.py", inventory=inv_path,
                     cwd=proj)
        assert r.stdout == "3\n", r.stdout + r.stderr
        t = time.monotonic()
        r = user_cli(fleet.bin, "run-remote", "-H", "far", "main.py", inventory=inv_path,
                     cwd=proj)
        run_trips = (time.monotonic() - t) / rtt
        assert r.returncode == 0 and r.stdout == "3\n", r.stderr
    # measured here: check-env ~7, warm call ~1, unchanged run-remote ~9 (+ the CLI's start)
    assert check_trips < 20, check_trips
    assert warm_trips < 2.5, warm_trips
    assert run_trips < 30, run_trips


# -- services on real addresses ------------------------------------------------------------
def test_tunnel_to_a_service_on_the_hosts_own_address(fleet, lab):
    """A service bound to the host's address (127.0.0.6 here), not its loopback: the
    tunnel reaches it with --remote-host; without it, the refusal is reported."""
    import socket
    import urllib.request

    from fabfleet import Tunnel
    with socket.socket() as s:
        s.bind(("127.0.0.6", 0))
        port = s.getsockname()[1]
    with lab.connect("stock") as c:
        pid = execute(c, f"cd /tmp && nohup python3 -m http.server {port} --bind 127.0.0.6 "
                         ">/dev/null 2>&1 & echo $!").stdout.strip()
        try:
            deadline = time.monotonic() + 10
            while execute(c, f"python3 -c 'import socket; socket.create_connection("
                             f"(\"127.0.0.6\", {port}), 1)'").exit_code != 0:
                assert time.monotonic() < deadline, "the test service did not start"
                time.sleep(0.2)
            with Tunnel(c, port, remote_host="127.0.0.6") as t:
                body = urllib.request.urlopen(f"http://127.0.0.1:{t.local_port}/",
                                              timeout=10).read()
            assert b"Directory listing" in body
            events: list[str] = []
            with Tunnel(c, port, on_event=events.append) as t:
                with pytest.raises(OSError):
                    urllib.request.urlopen(f"http://127.0.0.1:{t.local_port}/", timeout=10)
            assert events and f"127.0.0.1:{port} failed" in events[0]
        finally:
            execute(c, f"kill {pid}")


# -- shared hosts --------------------------------------------------------------------------
def test_a_work_dir_another_user_prepared_is_refused(fleet, lab, tmp_path):
    """eve makes /tmp/sharedwd (0777) before you: nothing of yours is sourced or run
    there; every entry point says why."""
    box = fleet.container("stock")
    subprocess.run(["docker", "exec", "-u", "eve", box, "sh", "-c",
                    "rm -rf /tmp/sharedwd; mkdir -m 777 /tmp/sharedwd"], check=True)
    try:
        inv = variant(fleet, tmp_path, replace=("  work_dir: ~/fabfleet\n",
                                                "  work_dir: /tmp/sharedwd\n"))
        err = check_hosts(inv.select(host="stock"))["hosts"]["stock"]["error"]
        assert "/tmp/sharedwd is not yours alone" in err and "Nothing was run" in err, err
        from fabfleet import CommandError
        with pytest.raises(CommandError) as exc:
            run_payload(inv.connect("stock"), abs, -1)
        assert "is not yours alone" in str(exc.value)
        proj = tmp_path / "labproj4"
        write(proj / "pyproject.toml", "")
        write(proj / "t.py", "print('ran')\n")
        r = user_cli(fleet.bin, "run-remote", "-H", "stock", "t.py", "--no-push",
                     inventory=Path(inv.path), cwd=proj,
                     env={"FABFLEET_SSH_CONFIG": str(fleet.lab_ssh_config)})
        assert r.returncode == 97 and "is not yours alone" in r.stderr and "ran" not in r.stdout
    finally:
        subprocess.run(["docker", "exec", "-u", "eve", box, "rm", "-rf", "/tmp/sharedwd"])
