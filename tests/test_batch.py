"""Cluster login nodes: a real single-node Slurm (``hpc``: slurmctld + slurmd + munge from
Debian, no accounting, ``MinJobAge=5``) and the PBS stand-in (``pbs``). Runs, commands,
detached jobs and Python calls become batch jobs; everything is driven from the user
install, as a user would."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import time

import pytest
from conftest import clone, write

from fabfleet import Inventory, remote

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("fresh_workers")]

TRAIN = """\
import os, sys, time
print("start", os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID"), sys.argv[1:],
      flush=True)
for i in range(int(os.environ.get("STEPS", "3"))):
    print("step", i, flush=True)
    time.sleep(float(os.environ.get("PAUSE", "1")))
print("to stderr", file=sys.stderr, flush=True)
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""


@pytest.fixture
def bproj(tmp_path):
    proj = clone(tmp_path / "bproj", "https://example.org/lab/bproj.git")
    write(proj / "train.py", TRAIN)
    write(proj / "sleepy.py", "import time, sys\nprint('up', flush=True)\ntime.sleep(float(sys.argv[1]))\n")
    return proj


def cli(fleet, proj, *args, timeout=180, env=None):
    return fleet.cli(*args, inventory=fleet.lab_inventory, cwd=proj, timeout=timeout, env=env)


def runs(fleet, proj, host="hpc"):
    r = cli(fleet, proj, "jobs", "-H", host, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return {x["run_id"]: x for x in json.loads(r.stdout)["hosts"][host]["runs"]}


def detach(fleet, proj, host, *args):
    r = cli(fleet, proj, "run-remote", "-H", host, *args, "--detach", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)["hosts"][host]["run_id"]


def wait_status(fleet, proj, run_id, want, host="hpc", within=60):
    deadline = time.monotonic() + within
    while True:
        state = runs(fleet, proj, host)[run_id]
        if state["status"] in want:
            return state
        assert time.monotonic() < deadline, state
        time.sleep(1)


def container(fleet, name):
    return fleet.container(name)


def dexec(fleet, name, *argv, user="dev"):
    return subprocess.run(["docker", "exec", "-u", user, container(fleet, name), *argv],
                          capture_output=True, text=True, timeout=60)


# -- exit codes, streaming, directives -------------------------------------------------------
@pytest.mark.parametrize("host", ["hpc", "pbs"])
def test_a_script_runs_as_a_batch_job_with_its_exit_code(fleet, bproj, host):
    flag = ["--sbatch", "--time=10 --cpus-per-task=1"] if host == "hpc" else \
        ["--qsub", "-l walltime=00:10:00"]
    for code in (0, 3):
        r = cli(fleet, bproj, "run-remote", "-H", host, "train.py", "--args", str(code), *flag)
        assert r.returncode == code, r.stdout + r.stderr
        lines = r.stdout.splitlines()
        job = lines[0].split()[1]
        assert job != "None" and job[0].isdigit(), lines  # it ran inside a batch job
        assert [ln for ln in lines if ln.startswith("step")] == ["step 0", "step 1", "step 2"]
        assert "to stderr" in r.stdout  # the job's stderr joins its output, as sbatch's does
        assert re.search(rf"submitted {'slurm' if host == 'hpc' else 'pbs'} job \S+", r.stderr)


def test_output_streams_while_the_job_runs(fleet, bproj):
    env = {**os.environ, "FABFLEET_INVENTORY": str(fleet.lab_inventory)}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen([str(fleet.bin / "fabfleet"), "run", "-H", "hpc", "--", "sh", "-c",
                             "echo first; sleep 6; echo second"], cwd=bproj, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        seen = time.monotonic()
        rest = proc.stdout.read()
        proc.wait(60)
        ended = time.monotonic()
    finally:
        proc.kill()
    assert first.strip() == "first" and rest.strip() == "second"
    assert ended - seen > 4, "the first line only arrived when the job had ended"
    assert proc.returncode == 0


def test_module_load_in_setup_runs_inside_the_job(fleet, bproj):
    r = cli(fleet, bproj, "run", "-H", "hpc", "--", "sh", "-c",
            'echo "$SLURM_JOB_ID $CUDA_HOME $(command -v nvcc)"')
    assert r.returncode == 0, r.stdout + r.stderr
    job, cuda, nvcc = r.stdout.split()
    assert job.isdigit() and cuda == "/opt/cuda-12.2" and nvcc == "/opt/cuda-12.2/bin/nvcc"


def test_a_missing_command_is_127_from_the_compute_node(fleet, bproj):
    r = cli(fleet, bproj, "run", "-H", "hpc", "--", "no-such-program-here")
    assert r.returncode == 127, r.stdout + r.stderr
    assert "no-such-program-here: not found on the compute node" in r.stdout


def test_directives_fabfleet_owns_and_wrong_schedulers_are_refused(fleet, bproj):
    r = cli(fleet, bproj, "run-remote", "-H", "hpc", "train.py", "--sbatch", "--output=/tmp/x")
    assert r.returncode != 0 and "--output is not accepted" in r.stderr, r.stderr
    r = cli(fleet, bproj, "run-remote", "-H", "pbs", "train.py", "--sbatch", "--time=1")
    assert r.returncode != 0 and "use --qsub" in r.stderr, r.stderr
    r = cli(fleet, bproj, "run-remote", "-H", "stock", "train.py", "--sbatch", "--time=1",
            env={"FABFLEET_SSH_CONFIG": str(fleet.lab_ssh_config)})
    assert r.returncode != 0 and "not a cluster's login node" in r.stderr, r.stderr
    r = cli(fleet, bproj, "run-remote", "-H", "hpc", "train.py", "--sbatch", "--partition=nope")
    assert r.returncode != 0, r.stdout + r.stderr
    assert "sbatch failed" in r.stderr and "partition" in r.stderr.lower(), r.stderr


def test_env_values_reach_the_job_but_not_its_script(fleet, bproj, tmp_path):
    token = "tok-" + secrets.token_hex(8)
    text = fleet.lab_inventory.read_text().replace(
        "    scheduler: slurm\n", f"    scheduler: slurm\n    env: {{HF_TOKEN: {token}}}\n")
    inv = tmp_path / "inventory.yaml"
    inv.write_text(text)
    r = fleet.cli("run", "-H", "hpc", "--detach", "--json", "--", "sh", "-c",
                  'test "$HF_TOKEN" = ' + token + ' && echo seen', inventory=inv, cwd=bproj)
    assert r.returncode == 0, r.stdout + r.stderr
    run_id = json.loads(r.stdout)["hosts"]["hpc"]["run_id"]
    r = fleet.cli("logs", run_id, "-H", "hpc", "--follow", inventory=inv, cwd=bproj)
    assert r.returncode == 0 and r.stdout.strip() == "seen", r.stdout + r.stderr
    state = runs(fleet, bproj)[run_id]
    job_id = state["job_id"]
    script = dexec(fleet, "hpc", "cat", f"{state['run_dir']}/job.sh").stdout
    assert token not in script and "#!/bin/sh" in script
    mode = dexec(fleet, "hpc", "stat", "-c", "%a", f"{state['run_dir']}/env.sh",
                 state["run_dir"]).stdout.split()
    assert mode == ["600", "700"]
    kept = dexec(fleet, "hpc", "scontrol", "write", "batch_script", job_id, "-")
    assert token not in kept.stdout  # the scheduler's copy of the script holds no secret


# -- the registry: pending, cancelled, forgotten, lost -----------------------------------------
def test_a_third_job_on_a_full_node_is_pending_then_cancelled(fleet, bproj):
    ids = [detach(fleet, bproj, "hpc", "sleepy.py", "--args", "60", "--sbatch",
                  "--cpus-per-task=1") for _ in range(3)]
    try:
        for run_id in ids[:2]:
            assert wait_status(fleet, bproj, run_id, {"running"})["job_id"]
        deadline = time.monotonic() + 30  # the reason is "Priority" until a scheduling pass
        while (third := runs(fleet, bproj)[ids[2]])["reason"] != "Resources":
            assert third["status"] == "pending" and time.monotonic() < deadline, third
            time.sleep(1)
        assert third["sched_state"] == "PENDING", third
        table = cli(fleet, bproj, "jobs", "-H", "hpc", env={"COLUMNS": "250"}).stdout
        assert "pending (Resources)" in table, table
        r = cli(fleet, bproj, "kill", ids[0], "-H", "hpc")
        assert r.returncode == 0 and "cancelled" in r.stdout, r.stdout + r.stderr
        state = runs(fleet, bproj)[ids[0]]
        assert state["status"] == "killed" and state["killed_by"] == "scancel", state
        assert wait_status(fleet, bproj, ids[2], {"running"})  # it got the freed CPU
    finally:
        for run_id in ids:
            cli(fleet, bproj, "kill", run_id, "-H", "hpc")
    left = dexec(fleet, "hpc", "squeue", "-h", "-u", "dev", "-t", "PD,R", "-o", "%i")
    assert not left.stdout.strip(), left.stdout


def test_a_forgotten_job_is_reported_from_its_exit_file(fleet, bproj):
    run_id = detach(fleet, bproj, "hpc", "train.py", "--args", "5")
    state = wait_status(fleet, bproj, run_id, {"exited"})
    job_id = state["job_id"]
    deadline = time.monotonic() + 60  # MinJobAge=5: scontrol forgets it some seconds later
    while dexec(fleet, "hpc", "scontrol", "show", "job", job_id).returncode == 0:
        assert time.monotonic() < deadline
        time.sleep(2)
    state = runs(fleet, bproj)[run_id]
    assert (state["status"], state["exit_code"], state["sched_state"]) == ("exited", 5, None)
    r = cli(fleet, bproj, "logs", run_id, "-H", "hpc", "--follow")
    assert r.returncode == 5 and "step 2" in r.stdout


def test_a_job_killed_before_its_exit_file_is_never_exited_0(fleet, bproj):
    run_id = detach(fleet, bproj, "hpc", "sleepy.py", "--args", "60")
    wait_status(fleet, bproj, run_id, {"running"})
    time.sleep(1)
    # The job's runner and script die at once (an OOM kill, a node crash): no exit file.
    dexec(fleet, "hpc", "pkill", "-KILL", "-f", "batch-run|sleepy.py", user="root")
    state = wait_status(fleet, bproj, run_id, {"lost", "killed", "exited"})
    assert state["status"] in ("lost", "killed"), state
    assert state["exit_code"] != 0, state
    r = cli(fleet, bproj, "logs", run_id, "-H", "hpc", "--follow")
    assert r.returncode != 0, r.stdout + r.stderr


def test_the_submitter_killed_mid_job_and_a_new_process_gets_the_result(fleet, bproj):
    env = {**os.environ, "FABFLEET_INVENTORY": str(fleet.lab_inventory), "PAUSE": "2"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen([str(fleet.bin / "fabfleet"), "run-remote", "-H", "hpc",
                             "train.py", "--args", "3"], cwd=bproj, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("start")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        err = proc.stderr.read()
    finally:
        proc.kill()
    run_id = re.search(r"\(run (\S+)\)", err).group(1)
    r = cli(fleet, bproj, "logs", run_id, "-H", "hpc", "--follow")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "step 2" in r.stdout and runs(fleet, bproj)[run_id]["status"] == "exited"


def test_ctrl_c_cancels_the_job(fleet, bproj):
    env = {**os.environ, "FABFLEET_INVENTORY": str(fleet.lab_inventory)}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen([str(fleet.bin / "fabfleet"), "run-remote", "-H", "hpc",
                             "sleepy.py", "--args", "120"], cwd=bproj, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    run_id = re.search(r"\(run (\S+)\)", err).group(1)
    state = wait_status(fleet, bproj, run_id, {"killed", "exited", "lost"})
    assert state["status"] == "killed" and state["killed_by"] == "scancel", state
    left = dexec(fleet, "hpc", "squeue", "-h", "-u", "dev", "-t", "PD,R", "-o", "%i")
    assert not left.stdout.strip(), left.stdout


def test_a_job_over_its_time_limit_is_killed_timeout(fleet, bproj):
    """Slurm's limits are whole minutes: this one takes a little over one."""
    r = cli(fleet, bproj, "run-remote", "-H", "hpc", "sleepy.py", "--args", "300",
            "--sbatch", "--time=1", timeout=200)
    assert r.returncode == 143, r.stdout + r.stderr
    assert "TIMEOUT" in r.stderr, r.stderr


def test_pbs_walltime_qdel_and_history(fleet, bproj):
    r = cli(fleet, bproj, "run-remote", "-H", "pbs", "sleepy.py", "--args", "30",
            "--qsub", "-l walltime=00:00:02")
    assert r.returncode != 0 and "TIMEOUT" in r.stderr, r.stdout + r.stderr
    run_id = detach(fleet, bproj, "pbs", "sleepy.py", "--args", "60")
    wait_status(fleet, bproj, run_id, {"running"}, host="pbs")
    r = cli(fleet, bproj, "kill", run_id, "-H", "pbs")
    assert r.returncode == 0, r.stdout + r.stderr
    state = wait_status(fleet, bproj, run_id, {"killed"}, host="pbs")
    assert state["killed_by"] == "qdel", state
    done = detach(fleet, bproj, "pbs", "train.py", "--args", "4")
    state = wait_status(fleet, bproj, done, {"exited"}, host="pbs")
    time.sleep(7)  # out of the server's history (5 s): qstat -x no longer knows it
    assert "Unknown Job Id" in dexec(fleet, "pbs", "qstat", "-f", "-F", "json", "-x",
                                     state["job_id"]).stderr
    state = runs(fleet, bproj, "pbs")[done]
    assert (state["status"], state["exit_code"]) == ("exited", 4)


# -- functions and check-env ---------------------------------------------------------------
def test_remote_functions_run_as_batch_jobs(fleet, bproj, monkeypatch):
    monkeypatch.chdir(bproj)

    @remote("hpc", inventory=fleet.lab_inventory)
    def where(n):
        import os
        import socket
        print("inside", flush=True)
        return socket.gethostname(), os.environ.get("SLURM_JOB_ID"), n * 2

    @remote("pbs", inventory=fleet.lab_inventory)
    def boom():
        raise ValueError("no such experiment")

    node, job, value = where(21)
    assert job and job.isdigit() and value == 42
    with pytest.raises(Exception) as err:
        boom()
    assert type(err.value).__name__ == "RemoteError" and "no such experiment" in str(err.value)
    assert "ValueError" in str(err.value)
    inv = Inventory.load(fleet.lab_inventory)
    assert inv.select("hpc").map(lambda x: x * x, range(4)) == [0, 1, 4, 9]


def test_check_env_on_login_nodes_runs_one_compute_check_then_reuses_it(fleet, bproj):
    for _ in range(2):
        r = cli(fleet, bproj, "check-env", "-H", "hpc,pbs", "--require", "json", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        hosts = json.loads(r.stdout)["hosts"]
    hpc = hosts["hpc"]
    assert hpc["scheduler"]["name"] == "slurm" and hpc["scheduler"]["version"].startswith("slurm")
    assert [q["name"] for q in hpc["scheduler"]["queues"]] == ["debug"]
    assert hpc["compute"]["shared"] and hpc["compute"]["cached"]
    assert hpc["compute"]["packages"] == {"json": "unknown"}
    assert [q["name"] for q in hosts["pbs"]["scheduler"]["queues"]] == ["workq"]
    r = cli(fleet, bproj, "check-env", "-H", "hpc", "--require", "surely_not_a_pkg")
    assert r.returncode == 1 and "missing on the compute node" in r.stdout, r.stdout


def test_a_work_dir_the_compute_nodes_do_not_share_is_named(fleet, bproj, tmp_path):
    """Stand-in for a work dir on a disk only the login node has (one container cannot
    mount a file system for the job alone): a setup line that runs only inside jobs
    points the job at a run dir that does not exist there."""
    text = fleet.lab_inventory.read_text().replace(
        '    setup: ["module load cuda/12.2"]\n',
        '    setup: ["module load cuda/12.2", "[ -z \\"$SLURM_JOB_ID\\" ] || '
        'fabfleet_run_dir=/nonexistent/run"]\n    work_dir: ~/wd-notshared\n')
    assert "wd-notshared" in text
    inv = tmp_path / "inventory.yaml"
    inv.write_text(text)
    r = fleet.cli("check-env", "-H", "hpc", "--json", inventory=inv, cwd=bproj, timeout=240)
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)["hosts"]["hpc"]
    assert report["compute"]["shared"] is False, report["compute"]
    assert "not on a file system the compute nodes share" in report["error"], report["error"]
    assert "wd-notshared" in report["error"]


def test_a_call_on_a_compute_node_with_another_python_says_so(fleet, bproj, tmp_path,
                                                              monkeypatch):
    text = fleet.lab_inventory.read_text().replace(
        "    scheduler: slurm\n", "    scheduler: slurm\n    python: pypy3\n")
    inv = tmp_path / "inventory.yaml"
    inv.write_text(text)
    monkeypatch.chdir(bproj)

    @remote("hpc", inventory=inv)
    def one():
        return 1

    with pytest.raises(Exception) as err:
        one()
    assert "pickled functions only load on the same Python" in str(err.value), str(err.value)
    assert "pypy" in str(err.value)


def test_clean_keeps_a_pending_batch_job_and_force_cancels_it(fleet, bproj):
    ids = [detach(fleet, bproj, "hpc", "sleepy.py", "--args", "60", "--sbatch",
                  "--cpus-per-task=1") for _ in range(3)]
    try:
        wait_status(fleet, bproj, ids[2], {"pending"})
        r = cli(fleet, bproj, "clean", "-H", "hpc")
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "still pending" in out, out
        assert set(ids) <= set(runs(fleet, bproj))  # every run dir kept
        r = cli(fleet, bproj, "clean", "-H", "hpc", "--force")
        assert r.returncode == 0, r.stdout + r.stderr
        assert not set(ids) & set(runs(fleet, bproj))
        deadline = time.monotonic() + 30
        while dexec(fleet, "hpc", "squeue", "-h", "-u", "dev", "-t", "PD,R", "-o",
                    "%i").stdout.strip():
            assert time.monotonic() < deadline, "clean --force left jobs queued or running"
            time.sleep(1)
    finally:
        for run_id in ids:
            cli(fleet, bproj, "kill", run_id, "-H", "hpc")
