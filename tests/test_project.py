"""fabfleet from the user's own project: the installed command, init, inventory
discovery, project-aware runs and per-project state — run as a user runs them, with the
package installed non-editable into a fresh venv (conftest.user_install), from
directories outside this repo."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import sh, write

from fabfleet.cli.options import SHORT_FLAGS
from fabfleet.tasks import ns

TASKS = ["init", "hosts", "check-env", "setup-workdir", "push", "run-remote", "run-pickle",
         "gather", "clean"]


@pytest.fixture
def myproj(tmp_path) -> Path:
    """A user's project: train.py imports the project's own helper.py and reads a data
    file by a relative path; an experiments/ subdirectory has a script of its own."""
    p = tmp_path / f"myproj-{int(time.time() * 1000) % 100000}"
    (p / ".git").mkdir(parents=True)
    write(p / "helper.py", "def scale(x):\n    return x * 10\n")
    write(p / "data.txt", "3\n")
    write(p / "train.py", """\
        import os, sys
        import helper
        n = int(open("data.txt").read())
        print("scaled", helper.scale(n), "args", sys.argv[1:])
        print("cwd", os.getcwd())
        print("run", os.environ["FABFLEET_RUN_ID"], os.environ["FABFLEET_RUN_DIR"])
    """)
    write(p / "experiments" / "exp.py", """\
        import os, sys
        sys.path.insert(0, os.path.dirname(os.getcwd()))  # the project root, as locally
        import helper
        print("exp", helper.scale(int(open("params.txt").read())), os.getcwd())
    """)
    write(p / "experiments" / "params.txt", "5\n")
    return p


# -- the installed command -------------------------------------------------------------
def test_installed_package_is_not_this_checkout(fleet, tmp_path):
    out = subprocess.run([str(fleet.bin / "python"), "-c",
                          "import fabfile, fabfile.tasks, fabfleet, fabfleet.cli.program, fabfleet.tasks; "
                          "print(fabfleet.__file__, fabfile.__file__)"],
                         capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert "site-packages" in out and "/work/" not in out.replace(str(tmp_path), "")


def test_list_version_and_help_for_every_task_from_anywhere(fleet, tmp_path):
    r = fleet.cli("--list", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in TASKS:
        assert name in r.stdout
    r = fleet.cli("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("fabfleet ")
    for name in TASKS:
        for args in ([name, "--help"], [name, "-h"], ["--help", name]):
            r = fleet.cli(*args, cwd=tmp_path)
            assert r.returncode == 0, (args, r.stderr)
            assert f"Usage: fabfleet [--core-opts] {name}" in r.stdout, (args, r.stdout)
            assert "not found" not in r.stderr + r.stdout
    r = fleet.cli("run-remote", "--help", cwd=tmp_path)
    assert "-H STRING, --host=STRING" in r.stdout and "--no-push" in r.stdout


def test_short_flags_have_one_meaning_everywhere():
    seen: dict[str, set[str]] = {}
    for name, t in ns.tasks.items():
        for arg in t.get_arguments():
            for flag in arg.names:
                if len(flag) == 1:
                    seen.setdefault(flag, set()).add(arg.name)
    assert all(len(longs) == 1 for longs in seen.values()), seen
    assert "h" not in seen  # -h stays --help
    assert {seen[v].pop() for v in ("H", "g", "a")} == {"host", "group", "all"}
    assert set(SHORT_FLAGS.values()) >= {"H", "g", "a"}


def test_no_inventory_lists_places_and_suggests_init(fleet, tmp_path):
    (tmp_path / "proj" / "sub").mkdir(parents=True)
    (tmp_path / "proj" / "pyproject.toml").write_text("")
    r = fleet.cli("hosts", cwd=tmp_path / "proj" / "sub",
                  env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert r.returncode == 2
    for place in (tmp_path / "proj" / "sub" / "inventory.yaml",
                  tmp_path / "proj" / "inventory.yaml",
                  tmp_path / "xdg" / "fabfleet" / "inventory.yaml"):
        assert str(place) in r.stderr
    assert str(tmp_path / "inventory.yaml") not in r.stderr  # stops at the project root
    assert "fabfleet init" in r.stderr and "Traceback" not in r.stderr


# -- run-remote in the synced project ---------------------------------------------------
@pytest.mark.parametrize("host", ["ws1", "ws2"])  # rsync host, SFTP-only host
def test_run_remote_imports_project_module_and_picks_up_edits(fleet, myproj, host):
    r = fleet.cli("run-remote", "-H", host, "train.py", "--args", "--epochs 3",
                  inventory=fleet.inventory_path, cwd=myproj)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "scaled 30 args ['--epochs', '3']"
    assert lines[1] == f"cwd /home/dev/fabfleet/{myproj.name}"
    run_id, run_dir = lines[2].split()[1:]
    assert run_dir == f"/home/dev/fabfleet/.runs/{myproj.name}/{run_id}"
    # a local edit made a second ago is what runs next
    write(myproj / "helper.py", "def scale(x):\n    return x * 100\n")
    r = fleet.cli("run-remote", "-H", host, "train.py", inventory=fleet.inventory_path,
                  cwd=myproj)
    assert r.returncode == 0 and r.stdout.startswith("scaled 300 "), r.stdout + r.stderr


def test_run_remote_from_a_subdirectory(fleet, myproj):
    r = fleet.cli("run-remote", "-H", "ws1", "exp.py", inventory=fleet.inventory_path,
                  cwd=myproj / "experiments")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"exp 50 /home/dev/fabfleet/{myproj.name}/experiments"
    # the project (not just the subdirectory) was pushed, under the project's name
    pushed = sh(fleet, "ws1", f"ls ~/fabfleet/{myproj.name}").split()
    assert [f for f in pushed if f != "__pycache__"] == [
        "data.txt", "experiments", "helper.py", "train.py"]


def test_no_push_runs_what_is_there_and_says_when_nothing_is(fleet, myproj):
    r = fleet.cli("run-remote", "-H", "ws3", "train.py", "--no-push",
                  inventory=fleet.inventory_path, cwd=myproj)
    assert r.returncode == 96
    assert f"ws3: train.py is not in ~/fabfleet/{myproj.name} on the host" in r.stderr
    assert "fabfleet-error" not in r.stderr  # the runner's own marker stays internal
    assert "fabfleet push" in r.stderr
    r = fleet.cli("push", "-H", "ws3", inventory=fleet.inventory_path, cwd=myproj)
    assert r.returncode == 0, r.stdout + r.stderr
    write(myproj / "helper.py", "def scale(x):\n    return -x\n")  # not pushed
    r = fleet.cli("run-remote", "-H", "ws3", "train.py", "--no-push",
                  inventory=fleet.inventory_path, cwd=myproj)
    assert r.returncode == 0 and r.stdout.startswith("scaled 30 "), r.stdout + r.stderr


def test_script_outside_the_project_travels_alone(fleet, myproj, tmp_path):
    lone = write(tmp_path / "elsewhere" / "lone.py", "import os; print('lone', os.getcwd())\n")
    r = fleet.cli("run-remote", "-H", "ws1", str(lone), inventory=fleet.inventory_path,
                  cwd=myproj)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"lone /home/dev/fabfleet/{myproj.name}"
    assert "elsewhere" not in sh(fleet, "ws1", f"ls -R ~/fabfleet/{myproj.name}")


def test_missing_module_hints_at_the_push(fleet, myproj):
    write(myproj / ".gitignore", "helper.py\n")
    r = fleet.cli("run-remote", "-H", "gpu1", "train.py", inventory=fleet.inventory_path,
                  cwd=myproj)
    assert r.returncode == 1
    assert "No module named 'helper'" in r.stderr and "excluded from the push" in r.stderr


# -- init, inv, discovery ---------------------------------------------------------------
def test_init_then_inv(fleet, myproj, tmp_path):
    xdg = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    r = fleet.cli("init", cwd=myproj, env=xdg)
    assert r.returncode == 0, r.stderr
    assert f"wrote {myproj / 'inventory.yaml'}" in r.stdout
    assert f"wrote {myproj / 'tasks.py'}" in r.stdout and "check-env --all" in r.stdout
    assert (myproj / "tasks.py").read_text().count("from fabfleet.tasks import ns") == 1
    starter = (myproj / "inventory.yaml").read_text()
    r = fleet.cli("hosts", cwd=myproj, env=xdg, program="inv")  # the starter inventory loads
    assert r.returncode == 0 and "ws1.example.org" in r.stdout, r.stdout + r.stderr
    # a second init never overwrites
    (myproj / "tasks.py").write_text("# mine\nfrom fabfile.tasks import ns\n")
    r = fleet.cli("init", cwd=myproj, env=xdg)
    assert r.returncode == 0 and "wrote" not in r.stdout
    assert "tasks.py: exists" in r.stdout and "using " + str(myproj / "inventory.yaml") in r.stdout
    assert (myproj / "tasks.py").read_text().startswith("# mine")
    assert (myproj / "inventory.yaml").read_text() == starter
    # plain `inv` runs the same tasks, from the project and from a subdirectory
    shutil.copy(fleet.inventory_path, myproj / "inventory.yaml")
    r = fleet.cli("--list", cwd=myproj, program="inv")
    assert all(name in r.stdout for name in TASKS)
    r = fleet.cli("run-remote", "-H", "ws1", "train.py", cwd=myproj, program="inv", env=xdg)
    assert r.returncode == 0 and r.stdout.startswith("scaled 30 "), r.stdout + r.stderr
    r = fleet.cli("run-remote", "-H", "ws1", "exp.py", cwd=myproj / "experiments",
                  program="inv", env=xdg)
    assert r.returncode == 0 and r.stdout.startswith("exp 50 "), r.stdout + r.stderr
    r = fleet.cli("run-remote", "--help", cwd=myproj, program="inv")
    assert r.returncode == 0 and "Usage: inv [--core-opts] run-remote" in r.stdout


def test_user_wide_inventory_with_relative_key_paths(fleet, myproj, tmp_path):
    conf = tmp_path / "xdg" / "fabfleet"
    conf.mkdir(parents=True)
    import testbed
    shutil.copy(testbed.KEY, conf / "id_ed25519")
    (conf / "id_ed25519").chmod(0o600)
    shutil.copy(fleet.known_hosts, conf / "known_hosts")
    text = (fleet.inventory_path.read_text()
            .replace(str(testbed.KEY), "id_ed25519")
            .replace(str(fleet.known_hosts), "./known_hosts"))
    assert "key_file: id_ed25519" in text
    (conf / "inventory.yaml").write_text(text)
    r = fleet.cli("run-remote", "-H", "ws2", "train.py", cwd=myproj,
                  env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert r.returncode == 0 and r.stdout.startswith("scaled 30 "), r.stdout + r.stderr


def test_invoke_yaml_in_the_project_names_the_inventory(fleet, myproj):
    shutil.copy(fleet.inventory_path, myproj / "fleet.yaml")
    (myproj / "invoke.yaml").write_text("fabfleet:\n  inventory: fleet.yaml\n")
    for program in ("fabfleet", "inv"):
        if program == "inv":
            (myproj / "tasks.py").write_text("from fabfile.tasks import ns\n")
        r = fleet.cli("hosts", cwd=myproj / "experiments", program=program)
        assert r.returncode == 0, (program, r.stderr)
        assert f"{myproj / 'fleet.yaml'}: 7 hosts" in r.stdout.replace("\n", ""), r.stdout


# -- per-project remote state ------------------------------------------------------------
def test_clean_in_one_project_leaves_another(fleet, tmp_path):
    projects = []
    for name in ("alpha", "beta"):
        p = tmp_path / name
        write(p / "pyproject.toml", "")
        write(p / "job.py", "print('ok')\n")
        r = fleet.cli("run-remote", "-H", "ws3", "job.py", inventory=fleet.inventory_path, cwd=p)
        assert r.returncode == 0, r.stdout + r.stderr
        projects.append(p)
    count = "ls ~/fabfleet/.runs/{} | wc -l"
    assert sh(fleet, "ws3", count.format("beta")).strip() == "1"
    r = fleet.cli("clean", "-H", "ws3", inventory=fleet.inventory_path, cwd=projects[0])
    assert r.returncode == 0, r.stdout + r.stderr
    left = sh(fleet, "ws3", "ls ~/fabfleet/.runs").split()
    assert "beta" in left and "alpha" not in left
    assert sh(fleet, "ws3", count.format("beta")).strip() == "1"
    r = fleet.cli("clean", "-H", "ws3", "--all-projects", inventory=fleet.inventory_path,
                  cwd=projects[0])
    assert r.returncode == 0 and sh(fleet, "ws3", "ls ~/fabfleet/.runs 2>&1 || true") \
        .startswith("ls: cannot access")


def test_venv_per_project(fleet, tmp_path):
    a, b = tmp_path / "withvenv", tmp_path / "plain"
    for p in (a, b):
        write(p / "setup.py", "")
        write(p / "prefix.py", "import sys; print(sys.prefix)\n")
    write(a / "requirements.txt", "# nothing to install offline\n")
    r = fleet.cli("setup-workdir", "-H", "gpu1", "--requirements", "requirements.txt",
                  inventory=fleet.inventory_path, cwd=a)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        r = fleet.cli("run-remote", "-H", "gpu1", "prefix.py", inventory=fleet.inventory_path,
                      cwd=a)
        assert r.stdout.strip() == "/home/dev/fabfleet/.venvs/withvenv", r.stderr
        r = fleet.cli("run-remote", "-H", "gpu1", "prefix.py", inventory=fleet.inventory_path,
                      cwd=b)
        assert r.stdout.strip() == "/usr", r.stderr
    finally:
        sh(fleet, "gpu1", "rm -rf ~/fabfleet/.venvs/withvenv")


def test_unmarked_cluttered_directory_is_not_pushed_by_surprise(fleet, tmp_path):
    d = tmp_path / "downloads"
    (d / "junk").mkdir(parents=True)
    for i in range(2001):
        (d / "junk" / f"{i}.txt").write_text("x")
    write(d / "job.py", "print('ran')\n")
    r = fleet.cli("run-remote", "-H", "ws1", "job.py", inventory=fleet.inventory_path, cwd=d)
    assert r.returncode == 2 and "2002 files" in r.stderr and "pyproject.toml" in r.stderr
    assert sh(fleet, "ws1", "ls ~/fabfleet").split().count("downloads") == 0
    # the home directory (no marker) is never a project: run from there (fleet.cli's
    # default cwd is $HOME), a script travels alone and nothing else is sent
    r = fleet.cli("run-remote", "-H", "ws1", str(d / "job.py"), inventory=fleet.inventory_path)
    assert r.returncode == 0 and r.stdout == "ran\n", r.stdout + r.stderr
