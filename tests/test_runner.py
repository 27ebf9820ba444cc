"""The host-side runner's job status, run locally on this Linux machine's /proc: the
moment between a job's process ending and its runner writing the exit code is
"running", never "lost" (a `logs --follow` then exited 255 instead of the job's code)."""

from __future__ import annotations

import json
import os
import subprocess

from fabfleet.hostside import runner


def job_dir(tmp_path, *, runner_alive: bool):
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = os.getpid()
    job = {"run_id": "r1", "pid": dead.pid, "pgid": dead.pid, "start_ticks": 12345,
           "boot_id": runner.boot_id(), "started": 0, "argv": ["python3", "-u", "x.py"],
           "runner_pid": me if runner_alive else dead.pid,
           "runner_ticks": runner.start_ticks(me) if runner_alive else 1}
    d = tmp_path / "proj" / "r1"
    d.mkdir(parents=True)
    (d / "job.json").write_text(json.dumps(job))
    return d


def test_a_job_whose_runner_is_finishing_is_running_then_exited(tmp_path):
    d = job_dir(tmp_path, runner_alive=True)
    assert runner.job_status(str(d))["status"] == "running"
    (d / "exit_code").write_text("5\n")
    state = runner.job_status(str(d))
    assert (state["status"], state["exit_code"]) == ("exited", 5)


def test_a_job_gone_with_its_runner_and_no_exit_code_is_lost(tmp_path):
    d = job_dir(tmp_path, runner_alive=False)
    assert runner.job_status(str(d))["status"] == "lost"


def test_an_attached_run_that_just_ended_reads_its_exit_code(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    d = tmp_path / "proj" / "r2"
    d.mkdir(parents=True)
    (d / "pid").write_text(str(dead.pid))
    assert runner.job_status(str(d))["status"] == "lost"
    (d / "exit_code").write_text("0\n")
    assert runner.job_status(str(d))["status"] == "exited"


def test_run_ids_are_one_component_of_our_own_format():
    assert runner.valid_run_id("20261201-104211-laptop-4242-a1b2c3")
    for bad in ("../../x", "/etc", "-rf", "", "a/b", "a b", ".", "x" * 101):
        assert not runner.valid_run_id(bad), bad


def test_the_stopper_never_signals_a_pid_that_is_not_the_runs(tmp_path):
    """A pid file the script overwrote with 1, our own pid, or another process group
    leader without the run's id: none is the run's process."""
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    mine = subprocess.Popen(["sleep", "30"], start_new_session=True,
                            env={**os.environ, "FABFLEET_RUN_ID": "r-1"})
    try:
        assert not runner.is_run_process(1, "r-1")
        assert not runner.is_run_process(os.getpid(), "r-1")
        assert not runner.is_run_process(other.pid, "r-1")
        assert runner.is_run_process(mine.pid, "r-1")
        assert not runner.is_run_process(mine.pid, "r-2")
    finally:
        other.kill()
        mine.kill()
