"""fabfleet's map against ipyparallel on the same hosts (ws1, ws2, ws3: 3 engines, 3 job
slots; not gpu1, whose one free GPU an engine holds while fabfleet's map would want it),
in the same run, the cluster started by fabfleet
(`Inventory.ipyparallel()`), ipyparallel installed in the bench project's venv on the
hosts from wheels pushed with it: 10,000 tiny items and 200 items of 50 ms each against a
load-balanced view's `map_sync`, and the time to start and stop the whole cluster.

    .venv/bin/python bench/bench_ipp.py
"""

import os
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from common import compare, ensure_testbed

from fabfleet import Inventory, push, setup_workdir
from fabfleet.config.settings import layout
from fabfleet.ssh.exec import execute

HOSTS = "ws1,ws2,ws3"

if __name__ == "__main__":
    inv = Inventory.load(ensure_testbed())
    proj = Path(tempfile.mkdtemp()) / "benchipp"
    proj.mkdir()
    (proj / "pyproject.toml").write_text("")
    (proj / "work.py").write_text("def inc(x):\n    return x + 1\n\n\n"
                                  "def nap(x):\n    import time\n    time.sleep(0.05)\n"
                                  "    return x\n")
    pins = [f"{p}=={metadata.version(p)}" for p in ("ipyparallel", "cloudpickle")]
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
    starts = []
    for _ in range(3):
        t = time.perf_counter()
        with hosts.ipyparallel() as rc:
            starts.append(time.perf_counter() - t)
            n = len(rc.ids)
    print(f"ipyparallel cluster start ({n} engines on 3 hosts), median of 3: "
          f"{sorted(starts)[1]:.1f} s")
    with hosts.ipyparallel() as rc:
        lview = rc.load_balanced_view()
        hosts.map(work.inc, range(100))  # warm both
        lview.map_sync(work.inc, range(100))
        compare("10,000 tiny items: fabfleet map vs ipyparallel map_sync",
                lambda: hosts.map(work.inc, range(10_000)),
                lambda: lview.map_sync(work.inc, range(10_000)), rounds=3)
        compare("10,000 tiny items: fabfleet map vs ipyparallel map_sync(chunksize=500)",
                lambda: hosts.map(work.inc, range(10_000)),
                lambda: lview.map_sync(work.inc, range(10_000), chunksize=500), rounds=3)
        compare("200 items x 50 ms: fabfleet map vs ipyparallel map_sync",
                lambda: hosts.map(work.nap, range(200)),
                lambda: lview.map_sync(work.nap, range(200)), rounds=3)
