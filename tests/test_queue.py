"""The GPU queue on hosts with GPU stand-ins: placement on free GPUs only, never two tasks
on one GPU (within a queue, across queues), foreign holders respected, the submitter gone,
a drainer killed (lost, then retry), cancel, a task's leftover child."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from conftest import clone, sh

import testbed
from fabfleet import Inventory

pytestmark = pytest.mark.usefixtures("fresh_workers")
GPU_HOSTS = ("ws1", "ws2")


@pytest.fixture
def gpus(fleet):
    """ws1 and ws2 as GPU boxes with two stand-in GPUs each (listed out of index order),
    back to GPU-less hosts afterwards."""
    lists = {h: testbed.gpu_list(f"{h}-{secrets.token_hex(2)}", 2) for h in GPU_HOSTS}
    for h, gl in lists.items():
        testbed.fake_gpus(fleet.container(h), gl)
    yield lists
    for h in GPU_HOSTS:
        testbed.fake_gpus(fleet.container(h), None)


@pytest.fixture
def qproj(tmp_path) -> Path:
    p = clone(tmp_path / "qproj", "https://example.invalid/lab/qproj.git")
    (p / "task.sh").write_text(textwrap.dedent("""\
        #!/bin/sh
        # record which GPUs this task got and when it ran; hold them for $2 seconds
        log=~/qlog-$1
        echo "$FABFLEET_HOST $CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER start $(date +%s.%N)" >> $log
        fake-gpu-hold 500 "$2"
        echo "$FABFLEET_HOST $CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER end $(date +%s.%N)" >> $log
    """))
    return p


def log_of(fleet, tag: str) -> list[tuple[str, str, str, float, float]]:
    """(host, uuids, order, start, end) per task run, from every GPU host's log."""
    runs = []
    for h in GPU_HOSTS:
        text = sh(fleet, h, f"cat ~/qlog-{tag} 2>/dev/null || true")
        starts: dict[str, list[float]] = {}
        for line in text.splitlines():
            host, uuids, order, what, when = line.split()
            if what == "start":
                starts.setdefault(uuids, []).append(float(when))
            else:
                runs.append((host, uuids, order, starts[uuids].pop(0), float(when)))
    return runs


def assert_no_overlap(runs) -> None:
    by_gpu: dict[str, list[tuple[float, float]]] = {}
    for host, uuids, _, start, end in runs:
        for u in uuids.split(","):
            by_gpu.setdefault(u, []).append((start, end))
    for u, spans in by_gpu.items():
        spans.sort()
        for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
            assert s2 >= e1, f"two tasks on {u} at once: {(s1, e1)} and {(s2, e2)}"


def submit(fleet, proj, tag, n, seconds, *extra) -> str:
    tasks = proj / f"tasks-{tag}.txt"
    tasks.write_text("".join(f"sh task.sh {tag} {seconds}\n" for _ in range(n)))
    name = f"q-{tag}"
    r = fleet.cli("queue-submit", "-H", ",".join(GPU_HOSTS), tasks.name, "--name", name,
                  *extra, inventory=fleet.inventory_path, cwd=proj)
    assert r.returncode == 0, r.stdout + r.stderr
    return name


def status(fleet, proj, name) -> dict:
    r = fleet.cli("queue-status", name, "-H", ",".join(GPU_HOSTS), "--json",
                  inventory=fleet.inventory_path, cwd=proj)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def wait_done(fleet, proj, name, timeout=120, hosts=GPU_HOSTS) -> dict:
    """queue-status (which moves waiting tasks to free GPUs) until no task waits or runs."""
    deadline = time.monotonic() + timeout
    while True:
        r = fleet.cli("queue-status", name, "-H", ",".join(hosts), "--json",
                      inventory=fleet.inventory_path, cwd=proj)
        assert r.returncode == 0, r.stdout + r.stderr
        doc = json.loads(r.stdout)
        if not any(t["state"] in ("queued", "running") for t in doc["tasks"]):
            return doc
        assert time.monotonic() < deadline, doc
        time.sleep(1)


def test_twelve_tasks_on_four_gpus_never_share_one(fleet, gpus, qproj):
    tag = secrets.token_hex(3)
    name = submit(fleet, qproj, tag, 12, 1.5)
    doc = wait_done(fleet, qproj, name)
    assert [t["index"] for t in doc["tasks"]] == list(range(12))
    assert all(t["state"] == "exited" and t["exit_code"] == 0 for t in doc["tasks"]), doc
    assert {t["host"] for t in doc["tasks"]} == set(GPU_HOSTS)
    runs = log_of(fleet, tag)
    assert len(runs) == 12
    known = {g["uuid"]: h for h, gl in gpus.items() for g in gl}
    for host, uuids, order, _, _ in runs:
        assert order == "PCI_BUS_ID" and known[uuids] == host
    assert_no_overlap(runs)
    events = sorted([(s, 1) for *_, s, e in runs] + [(e, -1) for *_, s, e in runs])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 4
    # each task is an ordinary run: `logs` works on it
    one = doc["tasks"][0]
    r = fleet.cli("logs", one["run_id"], "-H", one["host"], inventory=fleet.inventory_path,
                  cwd=qproj)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_gpu_someone_else_holds_is_left_alone(fleet, gpus, qproj):
    held = gpus["ws1"][0]["uuid"]  # root's process (a co-tenant's), for 8 seconds
    subprocess.Popen(["docker", "exec", "-e", f"CUDA_VISIBLE_DEVICES={held}",
                      fleet.container("ws1"), "fake-gpu-hold", "2000", "8"])
    time.sleep(1)
    since = time.time()
    tag = secrets.token_hex(3)
    name = submit(fleet, qproj, tag, 6, 1)
    wait_done(fleet, qproj, name)
    runs = log_of(fleet, tag)
    on_held = [r for r in runs if held in r[1]]
    assert all(start > since + 6 for *_, start, _ in on_held), on_held  # only once released
    assert_no_overlap(runs)


def test_two_queues_at_once_never_share_a_gpu(fleet, gpus, qproj):
    tags = [secrets.token_hex(3), secrets.token_hex(3)]
    procs = []
    for tag in tags:
        (qproj / f"tasks-{tag}.txt").write_text(f"sh task.sh {tag} 1\n" * 6)
        procs.append(subprocess.Popen(
            [str(fleet.bin / "fabfleet"), "queue-submit", "-H", ",".join(GPU_HOSTS),
             f"tasks-{tag}.txt", "--name", f"q-{tag}"], cwd=qproj,
            env={**os.environ, "FABFLEET_INVENTORY": str(fleet.inventory_path)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, out + err
    for tag in tags:
        wait_done(fleet, qproj, f"q-{tag}")
    runs = log_of(fleet, tags[0]) + log_of(fleet, tags[1])
    assert len(runs) == 12
    assert_no_overlap(runs)


def test_the_submitter_killed_right_after_submit(fleet, gpus, qproj):
    """The submitting process dies at once; every task still runs, and a new process
    reads the queue by its name."""
    tag = secrets.token_hex(3)
    code = textwrap.dedent(f"""\
        import os, signal
        from fabfleet import Inventory
        inv = Inventory.load({str(fleet.inventory_path)!r})
        inv.select(host="ws1,ws2").queue(["sh task.sh {tag} 1"] * 5, name="q-{tag}")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([str(fleet.bin / "python"), "-c", code], cwd=qproj, timeout=120,
                       capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    inv = Inventory.load(fleet.inventory_path)
    final = inv.select(host="ws1,ws2").queue(name=f"q-{tag}").wait(timeout=120)
    assert [t["state"] for t in final["tasks"]] == ["exited"] * 5
    assert len(log_of(fleet, tag)) == 5


def test_a_killed_drainer_leaves_tasks_lost_until_retry(fleet, gpus, qproj):
    tag = secrets.token_hex(3)
    name = submit(fleet, qproj, tag, 8, 2)
    time.sleep(1)
    for h in GPU_HOSTS:
        sh(fleet, h, "pkill -KILL -f queue_app.py || true")
    time.sleep(5)
    doc = status(fleet, qproj, name)
    states = {t["state"] for t in doc["tasks"]}
    assert "lost" in states, doc
    r = fleet.cli("queue-retry", name, "-H", ",".join(GPU_HOSTS), inventory=fleet.inventory_path,
                  cwd=qproj)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = wait_done(fleet, qproj, name)
    assert [t["state"] for t in doc["tasks"]] == ["exited"] * 8, [
        (t["state"], t["exit_code"], t["host"]) for t in doc["tasks"]]
    assert_no_overlap(log_of(fleet, tag))


def test_cancel_stops_running_tasks_and_starts_no_more(fleet, gpus, qproj):
    tag = secrets.token_hex(3)
    name = submit(fleet, qproj, tag, 8, 60)
    deadline = time.monotonic() + 30
    while sum(t["state"] == "running" for t in status(fleet, qproj, name)["tasks"]) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    r = fleet.cli("queue-cancel", name, "-H", ",".join(GPU_HOSTS), "--json",
                  inventory=fleet.inventory_path, cwd=qproj)
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 15  # each running task's group: SIGTERM, then SIGKILL
    while True:
        doc = status(fleet, qproj, name)
        if {t["state"] for t in doc["tasks"]} == {"cancelled"}:
            break
        assert time.monotonic() < deadline, doc
        time.sleep(0.5)
    for h in GPU_HOSTS:
        assert "fake-gpu-hold" not in sh(fleet, h, "ps -eo args")


def test_a_leftover_child_holding_its_gpu_is_stopped(fleet, gpus, qproj):
    """A task exits leaving a child that holds its GPU: the runner stops it, the GPU is
    free again, and the next task gets it."""
    tag = secrets.token_hex(3)
    lines = (f"sh -c 'fake-gpu-hold 100 120 & sleep 0.5; echo left >> ~/qlog-{tag}-left'\n"
             * 2 + f"sh task.sh {tag} 1\n" * 2)
    (qproj / "left.txt").write_text(lines)
    r = fleet.cli("queue-submit", "-H", "ws1", "left.txt", "--name", f"q-{tag}",
                  inventory=fleet.inventory_path, cwd=qproj)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = wait_done(fleet, qproj, f"q-{tag}", 60, hosts=("ws1",))
    assert [t["state"] for t in doc["tasks"]] == ["exited"] * 4, doc
    assert "fake-gpu-hold 100" not in sh(fleet, "ws1", "ps -eo args")


def test_top_and_check_env_name_who_holds_each_gpu(fleet, gpus):
    held = gpus["ws2"][1]["uuid"]
    holder = subprocess.Popen(["docker", "exec", "-e", f"CUDA_VISIBLE_DEVICES={held}",
                               fleet.container("ws2"), "fake-gpu-hold", "1234", "30"])
    try:
        time.sleep(1)
        r = fleet.cli("top", "--once", "--json", "-H", "ws2", inventory=fleet.inventory_path)
        assert r.returncode == 0, r.stdout + r.stderr
        listed = json.loads(r.stdout)["hosts"]["ws2"]["gpus"]
        assert [g["index"] for g in listed] == [0, 1]  # by index, whatever nvidia-smi's order
        by_uuid = {g["uuid"]: g["processes"] for g in listed}
        assert [(p["user"], p["memory_mib"], p["mine"]) for p in by_uuid[held]] == \
            [("root", 1234, False)]
        assert [p for u, procs in by_uuid.items() if u != held for p in procs] == []
        r = fleet.cli("check-env", "-H", "ws2", inventory=fleet.inventory_path)
        assert "is held by root:" in r.stdout and "not yours" in r.stdout, r.stdout
    finally:
        holder.kill()


def _where_and_when(seconds: float):
    import os
    import time as t
    start = t.time()
    t.sleep(seconds)
    return os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("CUDA_DEVICE_ORDER"), \
        start, t.time()


def test_map_over_gpu_hosts_never_shares_a_gpu(fleet, gpus, tmp_path):
    """max_jobs 4 on hosts with 2 GPUs each: every payload worker holds one GPU, so no
    two items ever run on one GPU at once (and each sees only its own)."""
    text = fleet.inventory_path.read_text()
    path = tmp_path / "inventory.yaml"
    path.write_text(text + "".join(f"  {h}-4:\n    hostname: 127.0.0.1\n    port: "
                                   f"{fleet.port(h)}\n    max_jobs: 4\n" for h in GPU_HOSTS))
    inv = Inventory.load(path)
    out = inv.select(host="ws1-4,ws2-4").map(_where_and_when, [0.4] * 16)
    known = {g["uuid"] for gl in gpus.values() for g in gl}
    assert all(u in known and order == "PCI_BUS_ID" for u, order, _, _ in out), out
    runs = [("?", u, o, s, e) for u, o, s, e in out]
    assert_no_overlap(runs)
    assert len({u for u, *_ in out}) == 4  # all four GPUs were used


def test_waiting_tasks_move_to_a_host_whose_gpus_are_free(fleet, gpus, qproj):
    """Every GPU is held when the queue is submitted (an even split); ws2's come free
    soon, ws1's much later: queue-status moves ws1's waiting tasks to ws2, each runs once."""
    holders = []
    for h, seconds in (("ws1", 40), ("ws2", 4)):
        uuids = ",".join(g["uuid"] for g in gpus[h])
        holders.append(subprocess.Popen(["docker", "exec", "-e", f"CUDA_VISIBLE_DEVICES={uuids}",
                                         fleet.container(h), "fake-gpu-hold", "2000",
                                         str(seconds)]))
    try:
        time.sleep(1)
        tag = secrets.token_hex(3)
        name = submit(fleet, qproj, tag, 6, 1)
        first = status(fleet, qproj, name)
        assert sorted({t["host"] for t in first["tasks"]}) == ["ws1", "ws2"]
        # queue-status (rebalancing), as a user back at the laptop would run it
        doc = wait_done(fleet, qproj, name, 30)
        assert all(t["state"] == "exited" for t in doc["tasks"]), doc
        assert sorted(t["index"] for t in doc["tasks"]) == list(range(6))  # each once
        assert {t["host"] for t in doc["tasks"]} == {"ws2"}
        runs = log_of(fleet, tag)
        assert len(runs) == 6 and {r[0] for r in runs} == {"ws2"}
        assert_no_overlap(runs)
    finally:
        for p in holders:
            p.kill()


def test_a_process_that_escaped_its_task_and_holds_the_gpu_is_stopped(fleet, gpus, qproj):
    """A task's child leaves its process group (setsid) and keeps the GPU after the task
    ends: no task is put on that GPU while it holds it; the drainer stops it and
    queue-status reports it."""
    tag = secrets.token_hex(3)
    (qproj / "escape.txt").write_text(
        "sh -c 'setsid fake-gpu-hold 100 300 > /dev/null 2>&1 & sleep 0.5'\n"
        + f"sh task.sh {tag} 1\n" * 3)
    name = f"q-{tag}"
    r = fleet.cli("queue-submit", "-H", "ws1", "escape.txt", "--name", name,
                  "--gpus-per-task", "2", inventory=fleet.inventory_path, cwd=qproj)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = wait_done(fleet, qproj, name, 60, hosts=("ws1",))
    assert all(t["state"] == "exited" for t in doc["tasks"]), doc
    assert [x["run_id"] for x in doc["leftovers"]] == [doc["tasks"][0]["run_id"]] * 2 or \
        {x["run_id"] for x in doc["leftovers"]} == {doc["tasks"][0]["run_id"]}, doc
    assert "fake-gpu-hold 100 300" not in sh(fleet, "ws1", "ps -eo args")
    first_end = float(sh(fleet, "ws1", "stat -c %Y ~/fabfleet/.runs/qproj/"
                         f"{doc['tasks'][0]['run_id']}/exit_code").strip())
    runs = log_of(fleet, tag)
    assert len(runs) == 3 and all(start >= first_end + 1 for *_, start, _ in runs)
