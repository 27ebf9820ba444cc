"""How fabfleet's tasks take their arguments: one task class, host selection declared
once, flag values checked, settings read from Invoke's config.

* :class:`FleetTask`: fixed short flags (``-H -g -a -j -x -t``; ``-h`` is always help),
  ``TASK --help`` even for tasks with a positional argument, and every
  :class:`~fabfleet.errors.FleetError` turned into ``Exit("fabfleet: …", code)``;
* :func:`hosts_task`: a task over a host selection gets ``--host/--group/--all`` (with
  their help) added, and receives the selected inventory as its second argument;
* :func:`project` and :func:`inventory`: the task's project and inventory, from the
  ``fabfleet`` section of Invoke's config, through the one resolver
  (:mod:`fabfleet.config.settings`).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from typing import Any

from invoke import Collection, Exit, Task, task

#: One letter, one meaning, in every task (Invoke would otherwise pick first letters:
#: ``-h`` for --host, hiding --help, and ``-p`` for four different flags).
SHORT_FLAGS = {"host": "H", "group": "g", "all": "a", "json": "j", "exclude": "x",
               "timeout": "t", "module": "m"}
HELP_WORDS = ("--help", "-h")
SELECT_HELP = {
    "host": "host names or shell-style globs, comma-separated (ws1,gpu*)",
    "group": "every host in this inventory group",
    "all": "every host in the inventory",
}


class FleetTask(Task):
    """An Invoke task with fabfleet's fixed short flags and error handling (see the
    module docstring): 2 for inventory and local (usage) errors, 1 for host errors —
    never a traceback."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["auto_shortflags"] = False
        super().__init__(*args, **kwargs)
        self.help_text = dict(self.help)  # Invoke pops entries from .help as it parses

    def arg_opts(self, name, default, taken_names):  # noqa: D102 - Invoke API
        opts = super().arg_opts(name, default, taken_names)
        short = SHORT_FLAGS.get(name.strip("_"))
        if short and short not in taken_names:
            opts["names"].append(short)
        return opts

    def __call__(self, *args, **kwargs):
        if any(kwargs.get(p) in HELP_WORDS for p in self.positional):
            print_task_help(self)
            return None
        from ..errors import FleetError, InventoryError, LocalError
        try:
            return super().__call__(*args, **kwargs)
        except FleetError as exc:
            code = 2 if isinstance(exc, (InventoryError, LocalError)) else 1
            raise Exit(f"fabfleet: {exc}", code) from None


def print_task_help(t: Task) -> None:
    """Invoke's own ``--help TASK`` output, under the name the user typed."""
    from invoke import Program
    binary = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fabfleet"
    binary = "fabfleet" if binary.startswith("fabfleet") else "inv"
    name = t.name.replace("_", "-")
    t.help = dict(getattr(t, "help_text", t.help))
    Program(namespace=Collection(t), binary=binary).run([binary, "--help", name], exit=False)


def fleet_task(*args, **kwargs):
    """``@task`` with :class:`FleetTask`."""
    return task(*args, klass=FleetTask, **kwargs)


def hosts_task(*args, help: dict | None = None, **kwargs):  # noqa: A002 - Invoke's name
    """``@fleet_task`` for a task over a host selection: the body is ``fn(c, hosts,
    …)``; the task gets ``--host/-H``, ``--group/-g`` and ``--all/-a`` (exactly one of
    them, checked by the inventory) and passes the selected hosts as ``hosts``."""
    def decorate(fn):
        params = list(inspect.signature(fn).parameters.values())
        select = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
                  for n, d in (("host", None), ("group", None), ("all", False))]

        @functools.wraps(fn)
        def body(c, *a, host=None, group=None, all=False, **kw):  # noqa: A002 - --all
            return fn(c, select_hosts(c, host, group, all), *a, **kw)
        positional = [p for p in params[2:] if p.default is inspect.Parameter.empty]
        optional = [p for p in params[2:] if p.default is not inspect.Parameter.empty]
        body.__signature__ = inspect.Signature([params[0], *positional, *select, *optional])
        return fleet_task(*args, help={**SELECT_HELP, **(help or {})}, **kwargs)(body)
    return decorate


# -- the command after `--` ------------------------------------------------------------
_raw: list[str] = []


def set_raw_command(argv: list[str]) -> list[str]:
    """Keep the words after the first ``--`` of ``argv`` exactly as given (Invoke joins
    them into one string, its ``remainder``, which would split ``'a b'``); ``argv``
    without them. Fabric's form ``fabfleet -H ws1 -- CMD`` (no task) means ``run``."""
    _raw[:] = []
    if "--" not in argv:
        return argv
    cut = argv.index("--")
    _raw.extend(argv[cut + 1:])
    head = argv[:cut]
    if len(head) > 1 and head[1].split("=")[0] in ("-H", "--host", "-g", "--group", "-a",
                                                    "--all"):
        head = [head[0], "run", *head[1:]]
    if "queue-submit" in head and _raw:  # its FILE is the command after `--`
        head = [*head, COMMAND_AS_FILE]
    return head + ["--"]


#: What ``queue-submit`` gets as FILE when the task is the command after ``--``.
COMMAND_AS_FILE = "@command-after-dashes"


def raw_command() -> list[str]:
    """The words after ``--`` on the command line (see :func:`set_raw_command`)."""
    return list(_raw)


# -- flag values -----------------------------------------------------------------------
def number(flag: str, value: Any, kind=float, minimum: float = 0):
    """A numeric flag value, or a usage error naming the flag (never a traceback)."""
    if value is None or value == "":
        return None
    try:
        n = kind(value)
    except (TypeError, ValueError):
        raise Exit(f"fabfleet: --{flag} {value!r}: expected a "
                   f"{'whole ' if kind is int else ''}number", 2) from None
    if n < minimum or (kind is float and n != n):
        raise Exit(f"fabfleet: --{flag} {value!r}: expected at least {minimum}", 2)
    return n


def port(flag: str, value: Any, allow_zero: bool = False) -> int:
    p = number(flag, value, int, 0 if allow_zero else 1)
    if p is None or p > 65535:
        raise Exit(f"fabfleet: {flag} {value!r}: expected a port number "
                   f"({'0-' if allow_zero else '1-'}65535)", 2)
    return p


# -- settings --------------------------------------------------------------------------
def settings(c) -> dict:
    """The ``fabfleet`` section of Invoke's merged config (``invoke.yaml`` and friends)."""
    return dict(c.config.get("fabfleet") or {})


def project(c):
    """The :class:`~fabfleet.config.settings.Project` of the current directory, with
    Invoke's ``fabfleet`` settings."""
    from ..config.settings import resolve_project
    return resolve_project(config=settings(c))


def inventory(c):
    from ..config.settings import find_inventory
    from ..fleet.inventory import Inventory
    return Inventory.load(find_inventory(project(c).inventory_setting() or ""))


def select_hosts(c, host, group, all_):
    return inventory(c).select(host=host, group=group, all=all_)


def one_host(c, host):
    """The one host ``-H`` names (a usage error otherwise)."""
    if not host:
        raise Exit("fabfleet: name the host with -H/--host HOST", 2)
    selected = inventory(c).select(host=host)
    if len(selected) != 1:
        raise Exit(f"fabfleet: -H {host!r} names {len(selected)} hosts; give exactly one", 2)
    return next(iter(selected))
