"""Inventory parsing and host selection: pure data, no hosts needed."""

from __future__ import annotations

import os

import pytest

from fabfleet import Inventory, InventoryError, find_inventory

GOOD = """
defaults:
  user: dev
  key_file: ~/.ssh/id_ed25519
  env: {A: "1"}
hosts:
  ws1: {hostname: ws1.lab, port: 2222, groups: [workstations, gpu], env: {B: 2}}
  ws2: {hostname: ws2.lab, user: alice, host_key_policy: accept-new}
  gpu7: {groups: gpu, venv: ~/venvs/p, max_jobs: 4}
"""


def load(text: str) -> Inventory:
    return Inventory.from_text(text, "inv.yaml")


def test_defaults_are_inherited_and_overridden():
    inv = load(GOOD)
    ws1, ws2, gpu7 = inv["ws1"], inv["ws2"], inv["gpu7"]
    assert (ws1.user, ws1.port, ws1.groups) == ("dev", 2222, ("workstations", "gpu"))
    assert ws2.user == "alice" and ws2.host_key_policy == "accept-new"
    assert ws1.key_file == os.path.expanduser("~/.ssh/id_ed25519")  # local path: expanded
    assert gpu7.venv == "~/venvs/p"  # remote path: left for the remote shell
    assert ws1.env == {"A": "1", "B": "2"} and ws2.env == {"A": "1"}
    assert gpu7.address == "gpu7" and gpu7.max_jobs == 4 and gpu7.groups == ("gpu",)
    assert "user" in ws1.inherited and "user" not in ws2.inherited


@pytest.mark.parametrize("text, message", [
    ("hosts: {ws1: {port: abc}}", "inv.yaml: hosts.ws1.port: expected an integer between 1 and "
                                 "65535, got 'abc'"),
    ("hosts: {ws1: {prot: 22}}", "inv.yaml: hosts.ws1.prot: unknown key; expected one of"),
    ("hosts: {ws1: {host_key_policy: auto-add}}", "hosts.ws1.host_key_policy: expected 'strict'"
                                                  " or 'accept-new'"),
    ("hosts: {ws1: {groups: [a, 'b c']}}", "hosts.ws1.groups: expected a list of group names"),
    ("hosts: {ws1: {env: {'1X': y}}}", "hosts.ws1.env.1X: expected an environment variable"),
    ("hosts: {ws1: {connect_timeout: -1}}", "hosts.ws1.connect_timeout: expected a positive"),
    ("defaults: {hostname: x}\nhosts: {ws1: {}}", "defaults.hostname: unknown key"),
    ("hosts: []", "inv.yaml: hosts: expected a mapping of host names"),
    ("hosts: {ws1: {port: 22}\n  bad", "inv.yaml: not valid YAML (line"),
    ("- just a list", "inv.yaml: expected a mapping with 'hosts'"),
    ("hostz: {}", "inv.yaml: hostz: unknown top-level key"),
])
def test_validation_errors_name_file_host_and_key(text, message):
    with pytest.raises(InventoryError) as exc:
        load(text)
    assert message in str(exc.value)


@pytest.mark.parametrize("where", ["hosts: {ws1: {password: hunter2}}",
                                   "defaults: {password: x}\nhosts: {ws1: {}}"])
def test_password_is_refused_with_advice(where):
    with pytest.raises(InventoryError) as exc:
        load(where)
    msg = str(exc.value)
    assert "password: passwords are not accepted" in msg and "ssh-agent" in msg
    assert "hunter2" not in msg


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(InventoryError, match="no such inventory file.*FABFLEET_INVENTORY"):
        Inventory.load(tmp_path / "nope.yaml")


def test_select_by_names_globs_group_all():
    inv = load(GOOD)
    assert [h.name for h in inv.select(host="ws2,ws1")] == ["ws1", "ws2"]  # file order
    assert [h.name for h in inv.select(host="ws*")] == ["ws1", "ws2"]
    assert [h.name for h in inv.select(group="gpu")] == ["ws1", "gpu7"]
    assert len(inv.select(all=True)) == 3


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of --host"),
    ({"host": "ws1", "all": True}, "exactly one of --host"),
    ({"host": "ws9"}, "no host matches 'ws9'; known hosts: ws1, ws2, gpu7"),
    ({"group": "tpu"}, "no group named 'tpu'; known groups: workstations, gpu"),
])
def test_bad_selection_lists_known_names(kwargs, message):
    with pytest.raises(InventoryError, match=message.replace("(", r"\(")):
        load(GOOD).select(**kwargs)


def test_inventory_discovery_order(monkeypatch, tmp_path):
    """env > config > ./inventory.yaml or a parent up to the project root > XDG."""
    monkeypatch.delenv("FABFLEET_INVENTORY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "outer" / "proj"
    sub = root / "a" / "b"
    sub.mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    (tmp_path / "outer" / "inventory.yaml").write_text("")  # above the project: not used
    with pytest.raises(InventoryError, match="no inventory found") as info:
        find_inventory(start=sub)
    assert str(tmp_path / "outer" / "inventory.yaml") not in str(info.value)
    assert "fabfleet init" in str(info.value)
    (tmp_path / "xdg" / "fabfleet").mkdir(parents=True)
    (tmp_path / "xdg" / "fabfleet" / "inventory.yaml").write_text("")
    assert find_inventory(start=sub) == str(tmp_path / "xdg" / "fabfleet" / "inventory.yaml")
    (root / "inventory.yaml").write_text("")
    assert find_inventory(start=sub) == str(root / "inventory.yaml")
    (sub / "inventory.yaml").write_text("")
    assert find_inventory(start=sub) == str(sub / "inventory.yaml")
    assert find_inventory("conf.yaml", start=sub) == "conf.yaml"
    monkeypatch.setenv("FABFLEET_INVENTORY", "env.yaml")
    assert find_inventory("conf.yaml", start=sub) == "env.yaml"


def test_relative_local_paths_resolve_next_to_the_inventory(tmp_path):
    path = tmp_path / "conf" / "inventory.yaml"
    path.parent.mkdir()
    path.write_text("defaults: {key_file: keys/id, known_hosts: ./kh}\n"
                    "hosts: {ws1: {}, ws2: {key_file: /abs/id}}\n")
    inv = Inventory.load(path)
    assert inv["ws1"].key_file == str(tmp_path / "conf" / "keys" / "id")
    assert inv["ws1"].known_hosts == str(tmp_path / "conf" / "kh")
    assert inv["ws2"].key_file == "/abs/id"


def test_project_root_and_name(tmp_path):
    from fabfleet import find_project, project_name
    (tmp_path / "p" / "x" / "y").mkdir(parents=True)
    assert find_project(tmp_path / "p" / "x" / "y") == tmp_path / "p" / "x" / "y"
    (tmp_path / "p" / ".git").mkdir()
    assert find_project(tmp_path / "p" / "x" / "y") == tmp_path / "p"
    assert project_name(tmp_path / "p") == "p"
    assert project_name("/x/my proj!") == "my_proj_"
    assert project_name("/x/.hidden") == "hidden" and project_name("/x/...") == "project"
    assert project_name("/x/p", override="other") == "other"


def test_shipped_example_inventory_is_valid():
    here = os.path.dirname(__file__)
    inv = Inventory.load(os.path.join(here, "..", "inventory.yaml"))
    assert len(inv) >= 2
