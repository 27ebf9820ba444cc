"""Fact parsers on recorded probe outputs (no hosts): the pure half of check-env."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fabfleet import Host
from fabfleet.host.facts import (MARKER, interpret, parse_meminfo, parse_nvidia_smi, parse_probe_output,
                           parse_python)

DATA = Path(__file__).parent / "data"


def recorded(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def test_gpu_host_report():
    report = interpret(Host("gpu1"), recorded("probe_gpu1.json"), require=["json", "numpy"])
    assert report["ok"] is False  # numpy was required and is missing
    assert report["error"].startswith("gpu1: required packages missing: numpy")
    assert report["python"] == "3.11.2" and report["python_implementation"] == "CPython"
    assert [g["name"] for g in report["gpus"]] == ["NVIDIA A100-SXM4-40GB"] * 2
    assert report["gpus"][1] == {"index": 1, "name": "NVIDIA A100-SXM4-40GB",
                                 "memory_total_mib": 40960, "memory_used_mib": 38912,
                                 "utilization_pct": 97, "driver": "535.129.03",
                                 "uuid": None, "processes": []}  # (recorded before uuids)
    assert report["cpus"] >= 1 and report["mem_total"] > report["mem_available"] > 0
    assert report["work_dir"] == "/home/dev/fabfleet" and report["work_dir_writable"] is True


def test_missing_python_says_what_to_do():
    report = interpret(Host("nopy", python="python3"), recorded("probe_nopy.json"))
    assert report["ok"] is False and report["python"] is None
    assert "'python3' was not found" in report["error"] and "set `python:`" in report["error"]


def test_venv_that_does_not_activate_fails_the_host():
    raw = recorded("probe_ws1_venv.json")
    report = interpret(Host("ws1-venv", venv="~/nope"), raw)
    assert report["ok"] is False
    assert "venv ~/nope does not activate" in report["error"]


def test_nvidia_smi_without_driver_is_a_warning_not_gpus():
    raw = {"exit": 9, "stdout": (DATA / "nvidia_smi_no_driver.txt").read_text(), "stderr": ""}
    parsed = parse_nvidia_smi(raw)
    assert parsed["gpus"] == []
    assert parsed["gpu_error"].startswith("nvidia-smi exited 9: NVIDIA-SMI has failed")
    assert parse_nvidia_smi(None) == {"gpus": [], "gpu_error": None}


def test_meminfo_without_memavailable_falls_back_to_memfree():
    parsed = parse_meminfo((DATA / "meminfo_old_kernel.txt").read_text())
    assert parsed == {"mem_total": 1017228 * 1024, "mem_available": 201672 * 1024}


def test_python_version_mismatch_is_flagged():
    local = sys.version_info
    same = parse_python({"version": [local.major, local.minor, 0], "executable": "/x",
                         "implementation": "CPython"})
    pypy = parse_python({"version": [3, 9, 16], "executable": "/usr/bin/pypy3",
                         "implementation": "PyPy"})
    assert same["python_matches_local"] is True and pypy["python_matches_local"] is False
    raw = {**recorded("probe_gpu1.json"), "packages": {"ok": {}},
           "python": {"ok": {"version": [3, 9, 16],
           "executable": "/usr/bin/pypy3", "implementation": "PyPy"}}}
    report = interpret(Host("oldpy"), raw)
    assert report["ok"] is True  # scripts still run there ...
    assert any("pickled payloads will be refused" in w for w in report["warnings"])  # ... but


def test_a_fact_that_failed_remotely_becomes_a_warning():
    raw = {**recorded("probe_gpu1.json"), "packages": {"ok": {}},
           "meminfo": {"error": "FileNotFoundError: /proc"}}
    report = interpret(Host("mac1"), raw)
    assert report["ok"] is True and "mem_total" not in report
    assert "meminfo: FileNotFoundError: /proc" in report["warnings"]


def test_probe_output_is_found_after_login_noise():
    noise = "Welcome to Ubuntu!\nLast login: yesterday\n"
    assert parse_probe_output(f"{noise}\n{MARKER}\n{{\"a\": 1}}\n") == {"a": 1}
    with pytest.raises(ValueError):
        parse_probe_output("bash: python3: command not found\n")
