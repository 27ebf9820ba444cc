"""fabfleet's map against Dask on the same hosts (ws1, ws2, gpu1: 4 job slots), in the
same run: 10,000 tiny items, and 200 items of 50 ms each. Dask is started by fabfleet
(`Inventory.dask()`), with dask/distributed installed in the bench project's venv on the
hosts from wheels pushed with it.

    .venv/bin/python bench/bench_dask.py
"""

import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from common import compare, ensure_testbed

from fabfleet import Inventory, push, setup_workdir
from fabfleet.config.settings import layout
from fabfleet.ssh.exec import execute

HOSTS = "ws1,ws2,gpu1"

if __name__ == "__main__":
    inv = Inventory.load(ensure_testbed())
    proj = Path(tempfile.mkdtemp()) / "benchdask"
    proj.mkdir()
    (proj / "pyproject.toml").write_text("")
    (proj / "work.py").write_text("def inc(x):\n    return x + 1\n\n\n"
                                  "def nap(x):\n    import time\n    time.sleep(0.05)\n"
                                  "    return x\n")
    pins = [f"{p}=={metadata.version(p)}" for p in ("dask", "distributed", "cloudpickle",
                                                    "msgpack")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                    "--python-version", "3.11.2", "-d", str(proj / "wheels"), *pins], check=True)
    (proj / "requirements.txt").write_text(
        f"--no-index\n--find-links /home/dev/fabfleet/{proj.name}/wheels\n" + "\n".join(pins))
    hosts = inv.select(host=HOSTS)
    for h in hosts:
        with inv.connect(h.name) as c:
            # each run's project is a new temp dir: the last run's copy is another project
            execute(c, f"rm -rf ~/fabfleet/{proj.name}", timeout=60)
            push(c, proj, layout(h, proj.name)["project"])
            setup_workdir(c, project=proj.name, requirements=proj / "requirements.txt")
    os.chdir(proj)
    sys.path.insert(0, str(proj))
    import work
    with hosts.dask() as client:
        hosts.map(work.inc, range(100))  # warm both
        client.gather(client.map(work.inc, range(100), pure=False))
        compare("10,000 tiny items: fabfleet map vs Dask client.map",
                lambda: hosts.map(work.inc, range(10_000)),
                lambda: client.gather(client.map(work.inc, range(10_000), pure=False)),
                rounds=3)
        compare("200 items x 50 ms: fabfleet map vs Dask client.map",
                lambda: hosts.map(work.nap, range(200)),
                lambda: client.gather(client.map(work.nap, range(200), pure=False)),
                rounds=3)
