"""What the package layout promises a user, tried as a user would, with the package
installed non-editable (conftest.user_install), from directories outside this repo:
a Fabric project with its own fabfile.py, one project setting for runs and payload
workers alike, and text from users shown verbatim."""

from __future__ import annotations

import json

from conftest import sh, user_cli, write

FABFILE = """\
    from fabric import task
    from invoke import Collection

    from fabfleet import Inventory, remote
    from fabfleet.tasks import ns as fleet


    @task
    def hello(c):
        \"\"\"Say hello from the project's own fabfile.\"\"\"
        print("hello from my fabfile:", Inventory.__name__, callable(remote))


    ns = Collection(hello)
    ns.add_collection(fleet, "fleet")
"""


def test_a_fabric_project_with_its_own_fabfile_adds_fabfleets_tasks(fleet, tmp_path):
    proj = tmp_path / "fabproj"
    (proj / ".git").mkdir(parents=True)
    write(proj / "fabfile.py", FABFILE)
    listed = user_cli(fleet.bin, "--list", program="fab", cwd=proj)
    assert listed.returncode == 0, listed.stderr
    assert "hello" in listed.stdout and "fleet.check-env" in listed.stdout \
        and "fleet.run-remote" in listed.stdout
    mine = user_cli(fleet.bin, "hello", program="fab", cwd=proj)
    assert mine.returncode == 0, mine.stderr
    assert mine.stdout == "hello from my fabfile: Inventory True\n"
    theirs = user_cli(fleet.bin, "fleet.check-env", "-H", "ws1", "--json", program="fab",
                      cwd=proj, inventory=fleet.inventory_path)
    assert theirs.returncode == 0, theirs.stderr
    assert json.loads(theirs.stdout)["hosts"]["ws1"]["ok"] is True


def test_import_fabfile_gives_the_same_objects_from_the_installed_package(fleet, tmp_path):
    code = ("import fabfile, fabfile.tasks, fabfleet, fabfleet.tasks\n"
            "assert fabfile.Inventory is fabfleet.Inventory\n"
            "assert fabfile.run_payload is fabfleet.run_payload\n"
            "assert fabfile.tasks.ns is fabfleet.tasks.ns\n"
            "print('same', fabfleet.__file__)\n")
    r = user_cli(fleet.bin, "-c", code, program="python", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("same ") and "site-packages" in r.stdout


def test_the_project_setting_reaches_runs_and_payload_workers_alike(fleet, tmp_path):
    """``fabfleet.project: foo`` in invoke.yaml: run-remote and a payload worker started
    from a script in the same project both activate <work_dir>/.venvs/foo."""
    venv = "~/fabfleet/.venvs/setting-foo/bin"
    sh(fleet, "ws1", f"mkdir -p {venv} && echo 'export FLEET_VENV=setting-foo' > "
                     f"{venv}/activate")
    proj = tmp_path / "some-dir-name"
    (proj / ".git").mkdir(parents=True)
    write(proj / "invoke.yaml", "fabfleet:\n  project: setting-foo\n")
    write(proj / "show.py", """\
        import os
        print("venv", os.environ.get("FLEET_VENV"), "cwd", os.path.basename(os.getcwd()))
    """)
    write(proj / "payload.py", """\
        import os
        from fabfleet import Inventory, run_payload
        inv = Inventory.load(os.environ["FABFLEET_INVENTORY"])

        def remote_env(name):
            import os
            return os.environ.get(name)
        print("venv", run_payload(inv.connect("ws1"), remote_env, "FLEET_VENV"))
    """)
    run = user_cli(fleet.bin, "run-remote", "-H", "ws1", "show.py", cwd=proj,
                   inventory=fleet.inventory_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "venv setting-foo cwd setting-foo\n"
    call = user_cli(fleet.bin, "payload.py", program="python", cwd=proj,
                    inventory=fleet.inventory_path)
    assert call.returncode == 0, call.stderr
    assert call.stdout == "venv setting-foo\n"
    sh(fleet, "ws1", "rm -rf ~/fabfleet/.venvs/setting-foo ~/fabfleet/setting-foo")


def test_arguments_that_look_like_markup_are_shown_verbatim(fleet, tmp_path):
    proj = tmp_path / "markup"
    (proj / ".git").mkdir(parents=True)
    write(proj / "echo.py", "import sys\nprint(*sys.argv[1:])\n")
    args = "data.paths=[/data/a] 'torch[cuda]' '[bold red]x[/]'"
    env = {"COLUMNS": "400"}
    run = user_cli(fleet.bin, "run-remote", "-H", "ws1", "echo.py", "--args", args, cwd=proj,
                   inventory=fleet.inventory_path, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "data.paths=[/data/a] torch[cuda] [bold red]x[/]\n"
    for _ in range(2):  # every call, not only the first
        listed = user_cli(fleet.bin, "jobs", "-H", "ws1", cwd=proj,
                          inventory=fleet.inventory_path, env=env)
        assert listed.returncode == 0, listed.stderr
        assert "echo.py data.paths=[/data/a] torch[cuda] [bold red]x[/]" in listed.stdout
        assert "Traceback" not in listed.stderr


def test_init_writes_the_files_that_ship_with_the_package(fleet, tmp_path):
    proj = tmp_path / "fresh"
    proj.mkdir()
    r = user_cli(fleet.bin, "init", cwd=proj, env={"USER": "alice"})
    assert r.returncode == 0, r.stderr
    inventory = (proj / "inventory.yaml").read_text()
    assert "  user: alice\n" in inventory and "hosts:" in inventory
    assert (proj / "tasks.py").read_text().splitlines()[-1] == \
        "from fabfleet.tasks import ns  # noqa: F401"
    listed = user_cli(fleet.bin, "--list", program="inv", cwd=proj)
    assert listed.returncode == 0 and "check-env" in listed.stdout, listed.stderr
    from fabfleet import Inventory
    assert [h.name for h in Inventory.load(proj / "inventory.yaml")] == ["ws1"]


def test_stray_modules_in_the_remote_home_shadow_nothing(fleet, tmp_path):
    """A ~/json.py or ~/struct.py on the host (the cwd of `python -c` over SSH) must not
    break the probe, the worker or the runner."""
    from conftest import sh
    from fabfleet import Inventory, check_hosts, close_workers, run_payload
    strays = "~/json.py ~/struct.py ~/subprocess.py"
    sh(fleet, "ws2", "for f in json struct subprocess; do echo 'raise SystemExit(\"shadowed\")' "
                     "> ~/$f.py; done")
    try:
        close_workers()
        inv = Inventory.load(fleet.inventory_path)
        assert check_hosts(inv.select(host="ws2"))["ok"]
        assert run_payload(inv["ws2"], abs, -7) == 7
        proj = tmp_path / "strays"
        (proj / ".git").mkdir(parents=True)
        write(proj / "t.py", "print('ran')\n")
        r = user_cli(fleet.bin, "run-remote", "-H", "ws2", "t.py", cwd=proj,
                     inventory=fleet.inventory_path)
        assert r.returncode == 0 and r.stdout == "ran\n", r.stdout + r.stderr
    finally:
        close_workers()
        sh(fleet, "ws2", f"rm -f {strays}")
