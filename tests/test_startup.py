"""`fabfleet --list` and `TASK --help` from the user install: served from the user's
cache once the real program printed them, byte for byte the same, never from a cache
file someone else could have written, and never stale when the task definitions or the
project's Invoke config change."""

from __future__ import annotations

import os

from conftest import user_cli, write


def listing(user_install, home, cwd, *args):
    env = {"XDG_CACHE_HOME": str(home / "cache"), "COLUMNS": "100"}
    r = user_cli(user_install, *(args or ("--list",)), cwd=cwd, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def cache_files(home):
    d = home / "cache" / "fabfleet" / "help"
    return sorted(d.glob("*.txt")) if d.exists() else []


def test_list_and_help_come_from_the_cache_unchanged(user_install, tmp_path):
    first = listing(user_install, tmp_path, tmp_path)
    assert "run-remote" in first and "check-env" in first
    files = cache_files(tmp_path)
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
    assert (files[0].parent.stat().st_mode & 0o777) == 0o700
    assert listing(user_install, tmp_path, tmp_path) == first
    files[0].write_text("Subcommands:\n  pwned   from the cache\n")  # proves it is read
    assert "pwned" in listing(user_install, tmp_path, tmp_path)
    help_text = listing(user_install, tmp_path, tmp_path, "run-remote", "--help")
    assert "--sbatch" in help_text and listing(user_install, tmp_path, tmp_path, "run-remote",
                                               "--help") == help_text


def test_a_cache_file_others_could_write_is_not_used(user_install, tmp_path):
    first = listing(user_install, tmp_path, tmp_path)
    f, = cache_files(tmp_path)
    f.write_text("Subcommands:\n  pwned\n")
    os.chmod(f, 0o666)
    assert listing(user_install, tmp_path, tmp_path) == first  # the real program answered
    os.chmod(f.parent, 0o777)
    f.write_text("Subcommands:\n  pwned\n")
    os.chmod(f, 0o600)
    assert listing(user_install, tmp_path, tmp_path) == first


def test_the_projects_invoke_config_is_part_of_the_key(user_install, tmp_path):
    proj = tmp_path / "proj"
    write(proj / "pyproject.toml", "")
    dashed = listing(user_install, tmp_path, proj)
    assert "run-remote" in dashed
    write(proj / "invoke.yaml", "tasks:\n  auto_dash_names: false\n")
    again = listing(user_install, tmp_path, proj)
    # a new key (the config could change what Invoke prints): the real program answered
    assert len(cache_files(tmp_path)) == 2 and again == dashed


def test_a_failing_help_is_not_cached(user_install, tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = user_cli(user_install, "no-such-task", "--help", cwd=tmp_path, env=env)
    assert r.returncode != 0 and not cache_files(tmp_path)


def test_version_comes_from_the_cache_and_names_the_installed_version(user_install, tmp_path):
    import fabfleet
    first = listing(user_install, tmp_path, tmp_path, "--version")
    assert first == f"fabfleet {fabfleet.__version__}\n"
    assert len(cache_files(tmp_path)) == 1
    assert listing(user_install, tmp_path, tmp_path, "-V") == first
    assert listing(user_install, tmp_path, tmp_path, "--version") == first
    assert len(cache_files(tmp_path)) == 2  # one per spelling
