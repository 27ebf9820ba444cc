"""Transfers on trees users really have: a remote symlink where the project now has a
directory, another user's unreadable output, renames that fail, rsync that fails early,
git's own ignore rules, and SSH keys kept next to the inventory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import sh, write

from fabfleet import TransferError
from fabfleet.host.files import local_files
from fabfleet.host.gather import gather
from fabfleet.host.push import push

pytestmark = pytest.mark.usefixtures("fresh_workers")


def as_root(fleet, name: str, command: str) -> None:
    subprocess.run(["docker", "exec", fleet.container(name), "sh", "-c", command],
                   check=True, timeout=60)


@pytest.mark.parametrize("host, method", [("ws1", "rsync"), ("ws2", "tar"), ("ws1", "sftp")])
def test_a_remote_symlink_where_the_project_has_a_directory_is_replaced(fleet, tmp_path,
                                                                         host, method):
    """Nothing is written through the link (its target lies outside the project)."""
    name = f"linked-{method}"
    sh(fleet, host, f"rm -rf ~/outside-{method} ~/fabfleet/{name}; mkdir -p ~/outside-{method} "
       f"~/fabfleet/{name} && ln -s ~/outside-{method} ~/fabfleet/{name}/data && "
       f"ln -s ~/outside-{method} ~/fabfleet/{name}/file-now-dir")
    proj = tmp_path / name
    write(proj / "data" / "x.txt", "x\n")
    write(proj / "data" / "deep" / "y.txt", "y\n")
    write(proj / "file-now-dir" / "z.txt", "z\n")
    with fleet.inventory().connect(host) as c:
        result = push(c, proj, f"~/fabfleet/{name}", method=method)
    assert result.method == method and result.files_sent == 3
    assert any("replaced" in w and "data" in w for w in result.warnings), result.warnings
    listing = sh(fleet, host, f"cd ~/fabfleet/{name} && find . | sort; echo OUT; "
                 f"ls -A ~/outside-{method}")
    inside, outside = listing.split("OUT\n")
    assert "./data/x.txt" in inside and "./data/deep/y.txt" in inside
    assert "./file-now-dir/z.txt" in inside
    assert sh(fleet, host, f"[ -d ~/fabfleet/{name}/data ] && [ ! -L ~/fabfleet/{name}/data ] "
              "&& echo dir").strip() == "dir"
    assert outside.strip() == ""


def test_unreadable_remote_dirs_are_warnings_not_connection_errors(fleet, tmp_path):
    """Root-owned output of a Docker run inside the project: push and gather go on and
    name it; the rest is pushed and gathered."""
    name = "rootout"
    sh(fleet, "ws1", f"rm -rf ~/fabfleet/{name}; mkdir -p ~/fabfleet/{name}/results")
    sh(fleet, "ws1", f"echo ok > ~/fabfleet/{name}/results/mine.csv")
    home = sh(fleet, "ws1", "echo $HOME").strip()
    as_root(fleet, "ws1", f"mkdir -m 700 {home}/fabfleet/{name}/results/docker && "
            f"echo x > {home}/fabfleet/{name}/results/docker/a.csv && "
            f"echo y > {home}/fabfleet/{name}/results/root.csv && "
            f"chmod 600 {home}/fabfleet/{name}/results/root.csv")
    try:
        proj = tmp_path / name
        write(proj / "train.py", "print(1)\n")
        with fleet.inventory().connect("ws1") as c:
            result = push(c, proj, f"~/fabfleet/{name}")
            assert result.files_sent == 1
            assert any("results/docker" in w and "permission denied" in w
                       for w in result.warnings), result.warnings
            got = {g.remote: g.status for g in gather(c, f"~/fabfleet/{name}", ["**/*.csv"],
                                                       tmp_path / "gathered")}
        assert got == {"results/mine.csv": "copied", "results/root.csv": "unreadable",
                       "results/docker": "unreadable"}, got
        assert (tmp_path / "gathered" / "results" / "mine.csv").read_text() == "ok\n"
    finally:
        as_root(fleet, "ws1", f"rm -rf {home}/fabfleet/{name}")


@pytest.mark.parametrize("host, method", [("ws2", "tar"), ("ws1", "sftp")])
def test_a_failed_rename_fails_the_push_and_leaves_no_temporary_file(fleet, tmp_path,
                                                                     host, method):
    name = f"badrename-{method}"
    sh(fleet, host, f"rm -rf ~/fabfleet/{name}; mkdir -p ~/fabfleet/{name}/b.txt/inside && "
       f"touch ~/fabfleet/{name}/b.txt/inside/keep")
    proj = tmp_path / name
    write(proj / "a.txt", "a\n")
    write(proj / "b.txt", "b\n")  # a directory on the host: the rename cannot replace it
    write(proj / "c.txt", "c\n")
    with fleet.inventory().connect(host) as c:
        with pytest.raises(TransferError) as exc:
            push(c, proj, f"~/fabfleet/{name}", method=method)
    assert "b.txt" in str(exc.value) or "Directory" in str(exc.value) or \
        "directory" in str(exc.value), str(exc.value)
    left = sh(fleet, host, f"cd ~/fabfleet/{name} && find . -name '*fabfleet-tmp*'")
    assert left.strip() == ""


def test_rsync_ending_early_says_why(fleet, tmp_path):
    """rsync forced to a host without rsync, with a file list bigger than a pipe: its
    own message, not a BrokenPipeError, and no hang."""
    proj = tmp_path / "manyfiles"
    for i in range(3000):
        write(proj / "d" / f"{'n' * 40}-{i:05d}.txt", "x")
    with fleet.inventory().connect("ws2") as c:  # ws2 has tar, no rsync
        with pytest.raises(TransferError) as exc:
            push(c, proj, "~/fabfleet/manyfiles", method="rsync")
    message = str(exc.value)
    assert "rsync" in message and ("not found" in message or "exited" in message), message
    assert "BrokenPipe" not in message


def test_git_excludes_and_inventory_keys_never_travel(fleet, tmp_path, monkeypatch):
    """.git/info/exclude and the user's global excludes (core.excludesFile) are git's
    rules, so git is asked; a key_file kept in the project is never pushed."""
    proj = tmp_path / "gitproj"
    proj.mkdir()
    subprocess.run(["git", "init", "-q", str(proj)], check=True)
    (proj / ".git" / "info").mkdir(exist_ok=True)
    (proj / ".git" / "info" / "exclude").write_text("notes-local.txt\n")
    global_ignore = tmp_path / "global-ignore"
    global_ignore.write_text(".env\n*.pem\n")
    home = Path(subprocess.run(["sh", "-c", "echo $HOME"], capture_output=True,
                               text=True).stdout.strip())
    (home / ".gitconfig").write_text(f"[core]\n\texcludesFile = {global_ignore}\n")
    for f in ("train.py", "notes-local.txt", ".env", "server.pem", "sub/.env", "id_lab"):
        write(proj / f, "secret\n" if f != "train.py" else "print(1)\n")
    rels = {f.rel for f in local_files(proj, never=[proj / "id_lab"])}
    assert rels == {"train.py"}, rels
    inv_text = fleet.inventory_path.read_text()
    key = next(line.split(":", 1)[1].strip() for line in inv_text.splitlines()
               if "key_file:" in line)
    (proj / "id_lab").write_bytes(Path(key).read_bytes())
    inv_path = proj / "inventory.yaml"
    inv_path.write_text(inv_text.replace(key, str(proj / "id_lab")))
    (proj / "id_lab").chmod(0o600)
    r = fleet.cli("push", "-H", "ws1", inventory=inv_path, cwd=proj)
    assert r.returncode == 0, r.stdout + r.stderr
    there = sh(fleet, "ws1", "cd ~/fabfleet/gitproj && find . -type f | sort").split()
    assert "./train.py" in there and "./inventory.yaml" in there
    for never in ("./notes-local.txt", "./.env", "./server.pem", "./sub/.env", "./id_lab"):
        assert never not in there, there
