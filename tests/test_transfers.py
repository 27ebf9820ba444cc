"""Transfers on trees users really have: a remote symlink where the project now has a
directory, another user's unreadable output, renames that fail, rsync that fails early,
git's own ignore rules, and SSH keys kept next to the inventory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import sh, write

from fabfleet import TransferError
from fabfleet.host.files import local_files
from fabfleet.host.gather import gather
from fabfleet.host.push import push
from fabfleet.ssh.exec import execute

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


# -- gather: one remote command --------------------------------------------------------
def _counting_sessions(c, monkeypatch) -> list[int]:
    """Count the sessions opened on connection ``c`` (each remote command opens one)."""
    c.open()
    transport = c.client.get_transport()
    opened, real = [], transport.open_session
    monkeypatch.setattr(transport, "open_session",
                        lambda *a, **kw: opened.append(1) or real(*a, **kw))
    return opened


def test_gather_lists_hashes_and_sends_in_one_remote_command(fleet, tmp_path, monkeypatch):
    """The local copies go with the command: an identical one costs only its hash, one
    that differs is kept (or, with overwrite, replaced), a new file comes whole."""
    sh(fleet, "ws1", "rm -rf ~/fabfleet/g1 && mkdir -p ~/fabfleet/g1/results/deep && "
       "cd ~/fabfleet/g1/results && echo new > new.csv && echo same > same.csv && "
       "echo remote-longer > longer.csv && echo abc > samesize.csv && "
       "echo deep > deep/d.csv && echo no > skip.txt")
    dest = tmp_path / "gathered"
    write(dest / "results" / "same.csv", "same\n")
    write(dest / "results" / "longer.csv", "short\n")
    write(dest / "results" / "samesize.csv", "xyz\n")
    with fleet.inventory().connect("ws1") as c:
        opened = _counting_sessions(c, monkeypatch)
        got = {g.remote: g.status for g in gather(c, "~/fabfleet/g1", ["results/**"], dest)}
        assert len(opened) == 1, "listing, hashes and bytes should be one remote command"
        assert got == {"results/new.csv": "copied", "results/same.csv": "unchanged",
                       "results/longer.csv": "conflict", "results/samesize.csv": "conflict",
                       "results/deep/d.csv": "copied", "results/skip.txt": "copied"}
        assert (dest / "results" / "longer.csv").read_text() == "short\n"  # kept
        assert (dest / "results" / "deep" / "d.csv").read_text() == "deep\n"
        opened.clear()
        got = {g.remote: g.status for g in gather(c, "~/fabfleet/g1", ["results/*.csv"], dest,
                                                  overwrite=True)}
        # a copy of the same size but other content is told apart by its hash, then fetched
        assert len(opened) == 2
    assert got["results/longer.csv"] == got["results/samesize.csv"] == "copied"
    assert got["results/same.csv"] == got["results/new.csv"] == "unchanged"
    assert (dest / "results" / "longer.csv").read_text() == "remote-longer\n"
    assert (dest / "results" / "samesize.csv").read_text() == "abc\n"
    assert not list(dest.rglob("*fabfleet-part*"))


def test_a_big_gather_streams_its_bytes_through_openssh(fleet, tmp_path, monkeypatch):
    """Past the bulk threshold the host asks; the bytes then come through the laptop's
    `ssh` (same key checks), verified the same way, and the hashes of the copies this
    side already has still come over the first command."""
    import fabfleet.host.gather as g
    monkeypatch.setattr(g, "BULK", 1000)
    monkeypatch.setattr(g, "OPENSSH_GAIN", 0)
    through = []
    real = g._stream_openssh
    monkeypatch.setattr(g, "_stream_openssh",
                        lambda *a, **kw: through.append(1) or real(*a, **kw))
    sh(fleet, "ws2", "rm -rf ~/fabfleet/g2 && mkdir -p ~/fabfleet/g2/out && cd ~/fabfleet/g2/out "
       "&& head -c 3000000 /dev/urandom > a.bin && head -c 2000 /dev/urandom > b.bin && "
       "echo kept > kept.bin")
    remote_sums = sh(fleet, "ws2", "cd ~/fabfleet/g2/out && sha256sum a.bin b.bin kept.bin")
    dest = tmp_path / "gathered"
    write(dest / "out" / "kept.bin", "kept\n")
    with fleet.inventory().connect("ws2") as c:
        got = {g_.remote: g_.status for g_ in gather(c, "~/fabfleet/g2", ["out/*"], dest)}
    assert through == [1]
    assert got == {"out/a.bin": "copied", "out/b.bin": "copied", "out/kept.bin": "unchanged"}
    local_sums = subprocess.run(["sha256sum", "a.bin", "b.bin", "kept.bin"], cwd=dest / "out",
                                capture_output=True, text=True, check=True).stdout
    assert local_sums.split() == remote_sums.split()


def test_a_host_without_python_is_gathered_with_its_shell_tools(fleet, tmp_path):
    sh(fleet, "nopy", "rm -rf ~/fabfleet/g3 && mkdir -p ~/fabfleet/g3/r && "
       "echo one > ~/fabfleet/g3/r/1.txt && echo two > ~/fabfleet/g3/r/2.txt")
    write(tmp_path / "gathered" / "r" / "2.txt", "two\n")
    with fleet.inventory().connect("nopy") as c:
        got = {g.remote: g.status for g in gather(c, "~/fabfleet/g3", ["r/*"],
                                                  tmp_path / "gathered")}
    assert got == {"r/1.txt": "copied", "r/2.txt": "unchanged"}
    assert (tmp_path / "gathered" / "r" / "1.txt").read_text() == "one\n"


def test_a_file_that_changes_size_while_gathered_is_not_put_in_place(fleet, tmp_path):
    """A file still being written (its size moves between listing and reading) fails the
    gather with a clear reason; nothing half-written is left under its name."""
    sh(fleet, "ws1", "rm -rf ~/fabfleet/g4 && mkdir -p ~/fabfleet/g4 && "
       "head -c 40000000 /dev/zero > ~/fabfleet/g4/growing.log")
    with fleet.inventory().connect("ws1") as c:
        c.open()  # appends to the file for two seconds while it is gathered
        chan = c.client.get_transport().open_session()
        chan.exec_command("for i in $(seq 200); do head -c 100000 /dev/zero >> "
                          "~/fabfleet/g4/growing.log; sleep 0.01; done")
        with pytest.raises(TransferError) as info:
            for _ in range(20):
                gather(c, "~/fabfleet/g4", ["*.log"], tmp_path / "g", overwrite=True)
        chan.recv_exit_status()
        execute(c, "rm -rf ~/fabfleet/g4")
    assert "changing" in str(info.value) and info.value.host == "ws1"
    assert not list((tmp_path / "g").glob("*fabfleet-part*"))


def test_a_big_tar_push_goes_through_openssh_and_lands_whole(fleet, tmp_path, monkeypatch):
    import fabfleet.host.push as p
    through = []
    real = p._tar_through_openssh
    monkeypatch.setattr(p, "_tar_through_openssh",
                        lambda *a, **kw: through.append(1) or real(*a, **kw))
    tree = tmp_path / "bigtree"
    write(tree / "small.txt", "s\n")
    (tree / "data").mkdir()
    (tree / "data" / "blob.bin").write_bytes(os.urandom(6 << 20))
    (tree / "link").symlink_to("small.txt")
    sh(fleet, "ws2", "rm -rf ~/fabfleet/bigtar")
    with fleet.inventory().connect("ws2") as c:
        result = push(c, tree, "~/fabfleet/bigtar", method="tar")
    assert through == [1] and result.method == "tar" and result.files_sent == 3
    got = sh(fleet, "ws2", "cd ~/fabfleet/bigtar && sha256sum data/blob.bin small.txt && "
             "readlink link && find . -name '.fabfleet-tmp*' | wc -l")
    want = subprocess.run(["sha256sum", "data/blob.bin", "small.txt"], cwd=tree,
                          capture_output=True, text=True, check=True).stdout
    assert got.split() == want.split() + ["small.txt", "0"]
