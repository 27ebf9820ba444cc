"""What ``fabfleet init`` writes: a starter inventory and a one-line ``tasks.py`` (the
files in ``starter_files/``) — never over an existing file."""

from __future__ import annotations

import os
import re
from pathlib import Path

FILES = Path(__file__).resolve().parent / "starter_files"


def starter_inventory(user: str) -> str:
    """The starter inventory, with ``user`` as the default SSH user."""
    text = (FILES / "inventory.yaml.txt").read_text()
    return re.sub(r"(?m)^(  user: )dev\b", lambda m: m.group(1) + user, text, count=1)


def starter_tasks() -> str:
    return (FILES / "tasks.py.txt").read_text()


def write_new(name: str, text: str) -> str | None:
    """Create ``name`` in the current directory and return its path; ``None`` (nothing
    written) when it exists."""
    try:
        with open(name, "x") as f:
            f.write(text)
    except FileExistsError:
        return None
    return os.path.abspath(name)
