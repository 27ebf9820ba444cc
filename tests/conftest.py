"""Real SSH hosts for the tests: the testbed's containers, started by pytest-docker.

The tests' hosts listen on 127.0.0.1:23xx (the demo's on 22xx), so both can run at
once. Every test gets the user's ~/.ssh/config and known_hosts kept out of the way.
"""

from __future__ import annotations

import os
import subprocess
import time
import sys
from pathlib import Path

import pytest

import testbed
from fabfleet import Inventory

PREFIX = 23
ROOT = Path(__file__).resolve().parent.parent
os.environ["FABFLEET_PORT_PREFIX"] = str(PREFIX)  # read by docker-compose.yml


@pytest.fixture(scope="session")
def docker_compose_command():
    return "docker-compose"  # Debian ships Compose v1 only


@pytest.fixture(scope="session")
def docker_compose_file():
    testbed.ensure_key()
    testbed.ensure_docker()
    return str(testbed.COMPOSE_FILE)


@pytest.fixture(scope="session")
def docker_compose_project_name():
    return "fabfleet-tests"


@pytest.fixture(scope="session")
def docker_setup():
    return ["up --build -d"]  # Compose v1 ignores --wait and starts nothing


@pytest.fixture(scope="session")
def docker_cleanup():
    # FABFLEET_KEEP_TESTBED=1 leaves the hosts up for the next run (while developing)
    return [] if os.environ.get("FABFLEET_KEEP_TESTBED") == "1" else ["down -v"]


@pytest.fixture(scope="session")
def user_install(tmp_path_factory) -> Path:
    """fabfleet as a user gets it: a wheel built from this checkout and installed, not
    editable, into a fresh venv outside the repo. Returns the venv's ``bin`` dir.

    Every CLI test runs this ``fabfleet`` (or its ``inv``), so a module or file missing
    from the wheel fails the suite."""
    d = tmp_path_factory.mktemp("user-install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--disable-pip-version-check", "-w", str(d / "dist"), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel, = (d / "dist").glob("fabfleet-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(d / "venv")], check=True, timeout=300)
    subprocess.run([str(d / "venv" / "bin" / "pip"), "install", "-q",
                    "--disable-pip-version-check", str(wheel)],
                   check=True, capture_output=True, timeout=600)
    return d / "venv" / "bin"


@pytest.fixture(scope="session")
def fleet(docker_services, tmp_path_factory, user_install):
    """The running testbed: ``fleet.inventory_path``, ``fleet.known_hosts``, ``fleet.port()``."""
    for name in testbed.HOSTS:
        docker_services.wait_until_responsive(
            check=lambda n=name: testbed.ssh_ready(testbed.port(n, PREFIX), testbed.address(n)),
            timeout=60, pause=0.1)
    state = tmp_path_factory.mktemp("fleet")
    known = testbed.scan_host_keys(PREFIX, state / "known_hosts")
    path = state / "inventory.yaml"
    path.write_text(testbed.inventory_text(PREFIX, known))

    class Fleet:
        inventory_path = path
        known_hosts = known
        prefix = PREFIX
        compose_project = "fabfleet-tests"

        @staticmethod
        def port(name: str) -> int:
            return testbed.port(name, PREFIX)

        @staticmethod
        def inventory() -> Inventory:
            return Inventory.load(path)

        @staticmethod
        def container(name: str) -> str:
            return f"fabfleet-tests_{name}_1"

        @staticmethod
        def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
            """``fabfleet ARGS`` from the user install (see :func:`user_cli`)."""
            return user_cli(user_install, *args, **kwargs)

        bin = user_install

        #: the lab hosts' inventory and ssh_config (see testbed.lab_inventory_text)
        lab_inventory = state / "lab_inventory.yaml"
        lab_ssh_config = state / "lab_ssh_config"

    Fleet.lab_inventory.write_text(testbed.lab_inventory_text(PREFIX, known))
    Fleet.lab_ssh_config.write_text(testbed.lab_ssh_config(PREFIX))
    return Fleet


@pytest.fixture(autouse=True)
def _isolated_ssh(tmp_path_factory, monkeypatch):
    """Keep the developer's ~/.ssh out: empty ssh config, a throwaway home."""
    home = tmp_path_factory.mktemp("home")
    empty = home / "ssh_config"
    empty.write_text("")
    monkeypatch.setenv("FABFLEET_SSH_CONFIG", str(empty))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("FABFLEET_INVENTORY", raising=False)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    # each test's own home would get its own connection keeper, left running for a
    # minute after the test; tests/test_keep.py turns it on where it is the subject
    monkeypatch.setenv("FABFLEET_PERSIST", "0")


@pytest.fixture
def fresh_workers():
    """Close every payload worker and connection after the test (fresh pools next)."""
    yield
    import fabfleet
    from fabfleet.ssh.connect import close_gateways
    fabfleet.close_workers()
    close_gateways()


@pytest.fixture
def inv(fleet):
    """The testbed's inventory, loaded."""
    return fleet.inventory()


def user_cli(bin_dir: Path, *args: str, inventory: Path | None = None,
             cwd: Path | None = None, timeout: float = 120, env: dict | None = None,
             program: str = "fabfleet") -> subprocess.CompletedProcess:
    """Run ``fabfleet ARGS`` (or ``inv``) from the user install, as a user would: in
    ``cwd`` (default: a directory outside the repo), capturing everything."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PYTHONPATH", None)
    if inventory is not None:
        full_env["FABFLEET_INVENTORY"] = str(inventory)
    return subprocess.run([str(bin_dir / program), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or full_env["HOME"])


def wait_until(check, timeout: float) -> bool:
    """Whether ``check()`` came true within ``timeout`` seconds (asked every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


def clone(path: Path, origin: str) -> Path:
    """``path`` as a clone of the repository ``origin`` (a git origin is what makes two
    copies of a project the same project on the hosts): made, ``git init``, origin set."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    subprocess.run(["git", "-C", str(path), "remote", "add", "origin", origin], check=True)
    return path


def write(path: Path, text: str) -> Path:
    """Write dedented ``text`` to ``path`` (parents made); the path."""
    import textwrap
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def sh(fleet, name: str, command: str) -> str:
    """``command``'s stdout on testbed host ``name`` (a fresh verified connection)."""
    from fabfleet.ssh.exec import execute
    with fleet.inventory().connect(name) as c:
        return execute(c, command).stdout


def install_pinned(fleet, proj: Path, packages, hosts: str, what: str) -> None:
    """Make ``proj`` a project whose venv on ``hosts`` has ``packages`` at this machine's
    versions, installed from wheels pushed with it (as on hosts without Internet access);
    skips the test when the wheels cannot be downloaded here. A copy of the project kept
    from an earlier run (``FABFLEET_KEEP_TESTBED``) is removed first."""
    from importlib import metadata
    host_py = sh(fleet, hosts.split(",")[0],
                 "python3 -c 'import platform; print(platform.python_version())'")
    pins = [f"{p}=={metadata.version(p)}" for p in packages]
    dl = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                         "--python-version", host_py.strip(), "-d", str(proj / "wheels"), *pins],
                        capture_output=True, text=True, timeout=900)
    if dl.returncode != 0:
        pytest.skip(f"cannot download the {what} wheels here: {dl.stderr[-300:]}")
    (proj / "requirements.txt").write_text(
        f"--no-index\n--find-links /home/dev/fabfleet/{proj.name}/wheels\n" + "\n".join(pins))
    remove_project(fleet, proj, hosts)
    for args in (["push", "-H", hosts],
                 ["setup-workdir", "-H", hosts, "--requirements", "requirements.txt"]):
        r = fleet.cli(*args, inventory=fleet.inventory_path, cwd=proj, timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr


def remove_project(fleet, proj: Path, hosts: str) -> None:
    """Remove ``proj``'s code and venv from ``hosts``."""
    for name in hosts.split(","):
        sh(fleet, name, f"rm -rf ~/fabfleet/{proj.name} ~/fabfleet/.venvs/{proj.name}")
