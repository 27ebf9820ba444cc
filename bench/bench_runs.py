"""run-remote and push against plain OpenSSH, measured alternately in the same run.

* `fabfleet run-remote -H ws1 train.py` in a project of 50 files (unchanged since the
  last push: the incremental sync is one round trip) vs `scp train.py` + `ssh python3
  train.py` (bar: 1.5); the same for a script outside any project (travels alone);
* push of a 1,000-file tree, first and unchanged, vs plain `rsync -a` over ssh with
  the same key and known_hosts checks; a first push of 200 MB (20 x 10 MB) by rsync
  (ws1) and by the tar stream (ws2, no rsync there) vs the same rsync.

    .venv/bin/python bench/bench_runs.py
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from common import (compare, ensure_testbed, fabfleet_argv, git_project, run, scp_argv,
                    ssh_argv)


if __name__ == "__main__":
    ensure_testbed()
    work = Path(tempfile.mkdtemp(prefix="fabfleet-bench-"))
    hello = work / "hello.py"
    hello.write_text("print('hello')\n")
    dest = "dev@127.0.0.1:bench-hello.py"
    # One identity across runs (a git origin): the copy an earlier run pushed to the host
    # is this project's, not a stranger's of the same name.
    proj = git_project(work / "bench-runs-proj", "https://example.org/bench/runs-proj.git")
    (proj / "lib").mkdir(parents=True)
    (proj / "pyproject.toml").write_text("")
    for i in range(48):
        (proj / "lib" / f"m{i}.py").write_text(f"X = {i}\n" * 20)
    (proj / "train.py").write_text("print('hello')\n")
    run(fabfleet_argv("push", "-H", "ws1"), cwd=proj)
    for label, persist in (("first command", "0"), ("kept connections", "60")):
        keeper = {"FABFLEET_PERSIST": persist}
        compare(f"run-remote -H ws1 train.py, project unchanged ({label})",
                lambda: run(fabfleet_argv("run-remote", "-H", "ws1", "train.py"), cwd=proj,
                            env=keeper),
                lambda: (run(scp_argv("ws1") + [str(proj / "train.py"), dest]),
                         run(ssh_argv("ws1") + ["python3", "bench-hello.py"])))
        compare(f"run-remote -H ws1 hello.py, no project ({label})",
                lambda: run(fabfleet_argv("run-remote", "-H", "ws1", str(hello)), cwd="/",
                            env=keeper),
                lambda: (run(scp_argv("ws1") + [str(hello), dest]),
                         run(ssh_argv("ws1") + ["python3", "bench-hello.py"])))
    run(fabfleet_argv("disconnect"))

    from fabfleet import Inventory, connect, push, run_script
    inv = Inventory.load(ensure_testbed())
    c = connect(inv["ws1"])
    compare("run_script() on an open connection (library)",
            lambda: run_script(c, hello),
            lambda: (run(scp_argv("ws1") + [str(hello), dest]),
                     run(ssh_argv("ws1") + ["python3", "bench-hello.py"])))

    tree = work / "tree"
    for i in range(1000):
        d = tree / f"d{i // 50}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.py").write_text(f"# file {i}\n" + "x = 1\n" * 40)
    rsync_ssh = " ".join(ssh_argv("ws1")[:-1])

    def plain_rsync(target):
        subprocess.run(["rsync", "-a", "-e", rsync_ssh, f"{tree}/",
                        f"dev@127.0.0.1:{target}"], check=True, stdout=subprocess.DEVNULL)

    def wipe():
        subprocess.run(ssh_argv("ws1") + ["rm -rf bench-ours bench-rsync"], check=True)

    for host in ("ws1", "ws2"):  # ws2 has no rsync: fabfleet sends a tar stream there
        with connect(inv[host]) as hc:
            def first_ours(hc=hc):
                subprocess.run(ssh_argv(host) + ["rm -rf bench-ours"], check=True)
                push(hc, tree, "~/bench-ours")
            compare(f"push 1000 files, first ({host}, {'tar' if host == 'ws2' else 'rsync'})",
                    first_ours,
                    lambda: (wipe(), plain_rsync("bench-rsync")), rounds=5)
            compare(f"push 1000 files, unchanged ({host})",
                    lambda hc=hc: push(hc, tree, "~/bench-ours"),
                    lambda: plain_rsync("bench-rsync"), rounds=5)
    # a first push of 200 MB (20 files of 10 MB) vs rsync: ws1 by rsync, ws2 (no rsync) by
    # the tar stream, through OpenSSH
    bulk = work / "bulk"
    bulk.mkdir()
    for i in range(20):
        (bulk / f"part{i}.bin").write_bytes(os.urandom(10 << 20))

    def rsync_bulk():
        subprocess.run(ssh_argv("ws1") + ["rm -rf bench-rsync-bulk"], check=True)
        subprocess.run(["rsync", "-a", "-e", rsync_ssh, f"{bulk}/",
                        "dev@127.0.0.1:bench-rsync-bulk"], check=True, stdout=subprocess.DEVNULL)
    for host in ("ws1", "ws2"):
        with connect(inv[host]) as hc:
            def first_bulk(hc=hc, host=host):
                subprocess.run(ssh_argv(host) + ["rm -rf bench-ours-bulk"], check=True)
                push(hc, bulk, "~/bench-ours-bulk")
            compare(f"push 200 MB, first ({host}, {'tar' if host == 'ws2' else 'rsync'}) vs rsync",
                    first_bulk, rsync_bulk, rounds=5)
            subprocess.run(ssh_argv(host) + ["rm -rf bench-ours-bulk bench-rsync-bulk"],
                           check=True)
    # the same unchanged push from the command line (the project is the 1000-file tree)
    git_project(tree, "https://example.org/bench/runs-tree.git")
    (tree / "pyproject.toml").write_text("")
    run(fabfleet_argv("push", "-H", "ws1"), cwd=tree)
    plain_rsync("bench-rsync")
    for label, persist in (("first command", "0"), ("kept connections", "60")):
        compare(f"fabfleet push -H ws1, 1000 files unchanged ({label}) vs rsync",
                lambda persist=persist: run(fabfleet_argv("push", "-H", "ws1"), cwd=tree,
                                            env={"FABFLEET_PERSIST": persist}),
                lambda: plain_rsync("bench-rsync"), rounds=5)
    run(fabfleet_argv("disconnect"))
    wipe()
    shutil.rmtree(work)
