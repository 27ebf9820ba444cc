"""gather of 20 × 10 MB from ws1 against `scp -r` of the same directory, same run.

    .venv/bin/python bench/bench_gather.py
"""

import shutil
import subprocess
import tempfile

from common import compare, ensure_testbed, scp_argv, ssh_argv

from fabfleet import Inventory, gather

if __name__ == "__main__":
    inv = Inventory.load(ensure_testbed())
    subprocess.run(ssh_argv("ws1") + [
        "rm -rf ~/fabfleet/bench-gather && mkdir -p ~/fabfleet/bench-gather/res && "
        "cd ~/fabfleet/bench-gather/res && for i in $(seq 1 20); do "
        "head -c 10000000 /dev/urandom > f$i.bin; done"], check=True)
    c = inv.connect("ws1")

    def ours():
        d = tempfile.mkdtemp()
        files = gather(c, "~/fabfleet/bench-gather", ["res/*.bin"], d)
        assert [f.status for f in files] == ["copied"] * 20
        shutil.rmtree(d)

    def scp():
        d = tempfile.mkdtemp()
        subprocess.run(scp_argv("ws1") + ["-r", "dev@127.0.0.1:fabfleet/bench-gather/res", d],
                       check=True)
        shutil.rmtree(d)
    compare("gather 20 x 10 MB (verified) vs scp -r", ours, scp, rounds=5)
    subprocess.run(ssh_argv("ws1") + ["rm -rf ~/fabfleet/bench-gather"], check=True)
