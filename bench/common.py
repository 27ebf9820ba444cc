"""Shared helpers for the benchmarks: the demo testbed, plain-OpenSSH baselines, timing.

Every benchmark measures fabfleet and its baseline alternately in the same run and prints
the ratio of medians, because these machines are noisy: absolute numbers mean little.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import testbed  # noqa: E402

# fabfleet's own bytecode, compiled as `pip install` compiles it for a user: the editable
# install of ./.venv otherwise compiles every module on every start wherever
# PYTHONDONTWRITEBYTECODE is set (this workplace sets it: ~250 ms per process).
import compileall  # noqa: E402
compileall.compile_dir(str(ROOT / "fabfleet"), quiet=1)

PREFIX = int(os.environ.get("FABFLEET_BENCH_PREFIX", "22"))
INV = ROOT / "testbed" / "state" / "inventory.yaml"


def ensure_testbed() -> Path:
    """The demo testbed's inventory, starting the testbed if it is not answering."""
    if not (INV.exists() and all(testbed.ssh_ready(testbed.port(n, PREFIX), testbed.address(n))
                                 for n in testbed.HOSTS)):
        testbed.up(PREFIX)
    return INV


def ssh_argv(name: str) -> list[str]:
    """Plain OpenSSH to a testbed host, verifying keys like fabfleet does."""
    return ["ssh", "-i", str(testbed.KEY), "-p", str(testbed.port(name, PREFIX)),
            "-o", f"UserKnownHostsFile={testbed.STATE / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
            "-o", "ControlMaster=no", "dev@127.0.0.1"]


def scp_argv(name: str) -> list[str]:
    return ["scp", "-q", "-i", str(testbed.KEY), "-P", str(testbed.port(name, PREFIX)),
            "-o", f"UserKnownHostsFile={testbed.STATE / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]


def fabfleet_argv(*args: str) -> list[str]:
    """The ``fabfleet`` command of ./.venv, as a user runs it."""
    return [str(ROOT / ".venv" / "bin" / "fabfleet"), *args]


def run(argv: list[str], env: dict | None = None, **kw) -> None:
    subprocess.run(argv, check=kw.pop("check", True), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL,
                   env={**os.environ, "FABFLEET_INVENTORY": str(INV), **(env or {})}, **kw)


def parallel(argvs: list[list[str]]) -> None:
    procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for a in argvs]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"baseline failed: exit codes {codes}")


def compare(name: str, ours: Callable[[], None], baseline: Callable[[], None],
            rounds: int = 9, warmup: int = 1) -> float:
    """Time both alternately; print medians and ours/baseline. Returns the ratio."""
    a, b = [], []
    for i in range(warmup + rounds):
        for fn, acc in ((ours, a), (baseline, b)):
            t = time.perf_counter()
            fn()
            if i >= warmup:
                acc.append(time.perf_counter() - t)
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"{name:<46} fabfleet {ma * 1000:8.1f} ms   baseline {mb * 1000:8.1f} ms   "
          f"ratio {ma / mb:5.2f}x   [fabfleet {min(a) * 1000:.1f}-{max(a) * 1000:.1f}, "
          f"baseline {min(b) * 1000:.1f}-{max(b) * 1000:.1f} ms]", flush=True)
    return ma / mb


def git_project(path: Path, origin: str) -> Path:
    """``path`` (made if need be) as a clone of ``origin``: ``git init`` with that origin,
    which is what makes every run's copy the same project on the hosts."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    subprocess.run(["git", "-C", str(path), "remote", "add", "origin", origin], check=True)
    return path


def pinned_project(inv, hosts, name: str, packages) -> Path:
    """A fresh bench project ``name`` (a ``work.py`` with ``inc`` and a 50 ms ``nap``)
    pushed to ``hosts``, its venv there holding ``packages`` at this machine's versions
    from wheels pushed with it; the project's work.py is importable here (cwd, sys.path)."""
    import tempfile
    from importlib import metadata

    from fabfleet import push, setup_workdir
    from fabfleet.config.settings import layout
    from fabfleet.ssh.exec import execute
    proj = Path(tempfile.mkdtemp()) / name
    proj.mkdir()
    (proj / "pyproject.toml").write_text("")
    (proj / "work.py").write_text("def inc(x):\n    return x + 1\n\n\n"
                                  "def nap(x):\n    import time\n    time.sleep(0.05)\n"
                                  "    return x\n")
    pins = [f"{p}=={metadata.version(p)}" for p in packages]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                    "--python-version", "3.11.2", "-d", str(proj / "wheels"), *pins], check=True)
    (proj / "requirements.txt").write_text(
        f"--no-index\n--find-links /home/dev/fabfleet/{proj.name}/wheels\n" + "\n".join(pins))
    for h in hosts:
        with inv.connect(h.name) as c:
            # each run's project is a new temp dir: the last run's copy is another project
            execute(c, f"rm -rf ~/fabfleet/{proj.name}", timeout=60)
            push(c, proj, layout(h, proj.name)["project"])
            setup_workdir(c, project=proj.name, requirements=proj / "requirements.txt")
    os.chdir(proj)
    sys.path.insert(0, str(proj))
    return proj


class _Far:
    """What :func:`far_host` gives: ``inventory`` (one host, ``far``), ``home`` (a private
    HOME for the run), ``ssh_base`` (OpenSSH with the same key and checks, no host yet)
    and ``login``."""


def far_host(work: Path, rtt_ms: float):
    """Testbed host ws1 as ``far``, ``rtt_ms`` away through testbed/latency.py's proxy
    (directly at 0 ms), with a known_hosts, inventory and home of its own under ``work``."""
    import contextlib

    from testbed.latency import LatencyProxy

    from fabfleet import Inventory

    @contextlib.contextmanager
    def make():
        port0 = Inventory.load(ensure_testbed())["ws1"].port
        proxy = LatencyProxy(("127.0.0.1", port0), rtt_ms=rtt_ms) if rtt_ms else None
        with proxy or contextlib.nullcontext():
            port = proxy.port if proxy else port0
            work.mkdir(parents=True, exist_ok=True)
            far = _Far()
            far.home = work / "home"
            far.home.mkdir(exist_ok=True)
            line = (testbed.STATE / "known_hosts").read_text().splitlines()[0]
            kh = work / "known_hosts"
            kh.write_text(line.replace(f"[127.0.0.1]:{port0}", f"[127.0.0.1]:{port}") + "\n")
            far.inventory = work / "inventory.yaml"
            far.inventory.write_text(
                f"defaults: {{user: dev, key_file: {testbed.KEY}, known_hosts: {kh}}}\n"
                f"hosts:\n  far: {{hostname: 127.0.0.1, port: {port}}}\n")
            far.ssh_base = ["ssh", "-i", str(testbed.KEY), "-p", str(port), "-o",
                            f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes",
                            "-o", "BatchMode=yes"]
            far.login = "dev@127.0.0.1"
            yield far
    return make()
