"""Any command, not only Python scripts: `fabfleet run HOSTS -- COMMAND`, shebang scripts
and -m in run-remote, and one program launched across hosts (rendezvous, --gang)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import clone, sh, write

from fabfleet import run_command

pytestmark = pytest.mark.usefixtures("fresh_workers")

RENDEZVOUS = """\
    import os, socket, sys, time
    idx, n = int(os.environ["FABFLEET_HOST_INDEX"]), int(os.environ["FABFLEET_NUM_HOSTS"])
    first, port = os.environ["FABFLEET_FIRST_HOST"], int(os.environ["FABFLEET_PORT"])
    assert os.environ["FABFLEET_HOSTS"].split(",")[idx] == os.environ["FABFLEET_HOST"]
    if idx == 0:
        srv = socket.create_server(("", port))
        srv.settimeout(60)
        seen = {"0"}
        while len(seen) < n:
            conn, _ = srv.accept()
            seen.add(conn.recv(16).decode())
            conn.close()
        print("first saw", ",".join(sorted(seen)), flush=True)
    else:
        for _ in range(300):
            try:
                s = socket.create_connection((first, port), 2)
                break
            except OSError:
                time.sleep(0.1)
        s.sendall(str(idx).encode())
        print("sent", idx, flush=True)
"""


@pytest.fixture
def cmdproj(tmp_path) -> Path:
    p = clone(tmp_path / "cmdproj", "https://example.invalid/lab/cmdproj.git")
    write(p / "prepare.sh", """\
        #!/bin/bash
        set -e
        printf '[%s]\\n' "$@"
        echo "bash in $(basename "$PWD")"
        exit 3
    """)
    write(p / "pkg" / "__init__.py", "")
    write(p / "pkg" / "train.py", "import sys\nprint('module', sys.argv[1:])\n")
    write(p / "rendezvous.py", RENDEZVOUS)
    return p


def run(fleet, proj, *args, **kw) -> subprocess.CompletedProcess:
    return fleet.cli(*args, inventory=fleet.inventory_path, cwd=proj, **kw)


def test_an_argument_vector_reaches_the_program_word_for_word(fleet, cmdproj):
    hostile = ["a b", "-x", "$HOME", "it's", '"q"', "`id`", "; rm -rf ~", "*"]
    r = run(fleet, cmdproj, "run", "-H", "ws1", "--", "printf", "[%s]\\n", *hostile)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [f"[{w}]" for w in hostile]
    # the command runs in the pushed project, as scripts do
    r = run(fleet, cmdproj, "run", "-H", "ws1", "--", "ls", "pkg")
    assert r.returncode == 0 and "train.py" in r.stdout, r.stdout + r.stderr


def test_shell_strings_exit_codes_and_fabrics_form(fleet, cmdproj):
    r = run(fleet, cmdproj, "run", "-H", "ws1", "--shell", "ls | grep -c .sh && exit 5")
    assert (r.returncode, r.stdout.strip()) == (5, "1"), r.stdout + r.stderr
    r = run(fleet, cmdproj, "-H", "ws1,ws2", "--", "sh", "-c", 'echo "$FABFLEET_HOST"; exit 0')
    assert r.returncode == 0 and "[ws1] ws1" in r.stdout and "[ws2] ws2" in r.stdout, r.stderr
    r = run(fleet, cmdproj, "run", "-H", "ws1,ws2", "--", "sh", "-c",
            '[ "$FABFLEET_HOST" = ws1 ] || exit 9')
    assert r.returncode == 1 and "9" in r.stderr  # the per-host table names ws2's code


def test_a_command_missing_on_the_host(fleet, cmdproj):
    r = run(fleet, cmdproj, "run", "-H", "ws1", "--", "no-such-tool", "--version")
    assert r.returncode == 127
    assert "ws1: no-such-tool: not found on this host" in r.stderr and "PATH" in r.stderr


def test_shebang_scripts_and_modules(fleet, cmdproj):
    r = run(fleet, cmdproj, "run-remote", "-H", "ws1", "prepare.sh", "--args", "1 'two words'")
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["[1]", "[two words]", "bash in cmdproj"]
    r = run(fleet, cmdproj, "run-remote", "-H", "ws1", "prepare.sh", "--", "x  y", "-z")
    assert r.returncode == 3 and r.stdout.splitlines()[:2] == ["[x  y]", "[-z]"], r.stdout
    r = run(fleet, cmdproj, "run-remote", "-H", "ws1", "-m", "pkg.train", "--args", "--lr 0.1")
    assert r.returncode == 0 and "module ['--lr', '0.1']" in r.stdout, r.stdout + r.stderr
    env_python = write(cmdproj / "which.py", "#!/usr/bin/env python3\nimport sys\n"
                                             "print(sys.executable)\n")
    r = run(fleet, cmdproj, "run-remote", "-H", "ws1", env_python.name)
    assert r.returncode == 0 and "python3" in r.stdout, r.stdout + r.stderr


def test_a_detached_command_followed_to_its_exit_code(fleet, cmdproj):
    r = run(fleet, cmdproj, "run", "-H", "ws2", "--detach", "--json", "--", "sh", "-c",
            "sleep 1; echo finished; exit 4")
    assert r.returncode == 0, r.stdout + r.stderr
    run_id = json.loads(r.stdout)["hosts"]["ws2"]["run_id"]
    jobs = json.loads(run(fleet, cmdproj, "jobs", "-H", "ws2", "--json").stdout)
    mine = [j for j in jobs["hosts"]["ws2"]["runs"] if j["run_id"] == run_id]
    assert mine and mine[0]["command"].startswith("sh -c"), jobs
    r = run(fleet, cmdproj, "logs", run_id, "-H", "ws2", "--follow")
    assert (r.returncode, r.stdout) == (4, "finished\n"), r.stdout + r.stderr


def test_timeout_and_ctrl_c_stop_a_command_on_the_host(fleet, cmdproj):
    started = time.monotonic()
    r = run(fleet, cmdproj, "run", "-H", "ws1", "--timeout", "2", "--", "sleep", "299")
    assert r.returncode == 124 and time.monotonic() - started < 30
    proc = subprocess.Popen([str(fleet.bin / "fabfleet"), "run", "-H", "ws1", "--", "sh", "-c",
                             "echo up; sleep 298"], cwd=cmdproj, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FABFLEET_INVENTORY": str(fleet.inventory_path)})
    assert proc.stdout.readline().strip() == "up"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    time.sleep(0.5)
    assert "sleep 29" not in sh(fleet, "ws1", "ps -eo args")


def test_three_hosts_rendezvous_through_the_launch_variables(fleet, cmdproj):
    r = run(fleet, cmdproj, "run", "-H", "ws1,ws2,ws3", "--gang", "--", "python3",
            "rendezvous.py", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[ws1] first saw 0,1,2" in r.stdout
    assert "[ws2] sent 1" in r.stdout and "[ws3] sent 2" in r.stdout


def test_a_gang_ends_every_host_when_one_fails(fleet, cmdproj):
    started = time.monotonic()
    r = run(fleet, cmdproj, "run", "-H", "ws1,ws2,ws3", "--gang", "--", "sh", "-c",
            'if [ "$FABFLEET_HOST_INDEX" = 1 ]; then sleep 1; exit 7; fi; sleep 297',
            timeout=120)
    assert r.returncode == 1 and time.monotonic() - started < 60, r.stdout + r.stderr
    assert "7" in r.stderr
    for h in ("ws1", "ws2", "ws3"):
        assert "sleep 297" not in sh(fleet, h, "ps -eo args"), h


def test_run_command_from_python(fleet):
    with fleet.inventory().connect("ws3") as c:
        out: list[bytes] = []
        result = run_command(c, ["sh", "-c", "echo $0 $1", "x y", "z"], project="pyapi",
                             on_stdout=out.append)
        assert result.exit_code == 0 and b"".join(out) == b"x y z\n"
        result = run_command(c, "exit 6", shell=True, project="pyapi")
        assert result.exit_code == 6
