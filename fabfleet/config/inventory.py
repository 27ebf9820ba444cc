"""The inventory: one YAML file, validated into frozen :class:`Host` records.

This module is pure data: :class:`HostSet` loads, validates and selects hosts. The
:class:`fabfleet.Inventory` users see (:mod:`fabfleet.fleet.inventory`) adds what needs
connections (``connect``, ``map``, ``executor``) on top, so nothing here imports a
connection. Where the file is found is :mod:`fabfleet.config.settings`' job.
Every validation error names the file, the host and the key, and what was expected::

    inventory.yaml: hosts.ws1.port: expected an integer between 1 and 65535, got 'abc'
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from ..errors import InventoryError
from . import directives

HOST_KEY_POLICIES = ("strict", "accept-new")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Host:
    """One host, with ``defaults`` already applied. Paths are left as written (``~``
    in remote paths is the *remote* home); local paths (key, known_hosts) are expanded."""

    name: str
    hostname: str | None = None
    port: int | None = None
    user: str | None = None
    key_file: str | None = None
    groups: tuple[str, ...] = ()
    python: str = "python3"
    work_dir: str = "~/fabfleet"
    conda_env: str | None = None
    venv: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    max_jobs: int = 1
    connect_timeout: float = 10.0
    host_key_policy: str = "strict"
    known_hosts: str | None = None
    #: bastions to go through, first hop first (names of other inventory hosts)
    jump: tuple[str, ...] = ()
    #: shell lines run before the env is activated (``module load cuda``, ``source …``)
    setup: tuple[str, ...] = ()
    #: ``sh`` (POSIX sh, the default) or ``login`` (the user's login shell, as a login
    #: shell: profile scripts run, so ``module`` exists)
    shell: str = "sh"
    #: GPUs tasks may use: "all", or a list of indices or UUIDs
    gpus: Any = "all"
    #: how many queue tasks may share one GPU
    tasks_per_gpu: int = 1
    #: CPU-only queue tasks (``--gpus-per-task 0``) at once; default ``max_jobs``
    tasks_per_host: int | None = None
    #: ``slurm`` or ``pbs``: the host is a cluster's login node; runs become batch jobs
    scheduler: str | None = None
    #: default ``sbatch`` / ``qsub`` options for its jobs (words, as on their command line)
    sbatch: tuple[str, ...] = ()
    qsub: tuple[str, ...] = ()
    #: the jump hosts' own records, first hop first (resolved from ``jump`` on load)
    hops: tuple["Host", ...] = ()
    #: keys that came from ``defaults`` rather than the host's own entry; for hosts
    #: without ``hostname``, ~/.ssh/config wins over these (as ``ssh NAME`` would).
    inherited: frozenset[str] = frozenset()

    @property
    def address(self) -> str:
        """What we dial: ``hostname`` if given, else the name (for ~/.ssh/config)."""
        return self.hostname or self.name


def _expect(cond: bool, where: str, expected: str, value: Any) -> None:
    if not cond:
        raise InventoryError(f"{where}: expected {expected}, got {value!r}")


def _str(where: str, value: Any) -> str:
    _expect(isinstance(value, str) and value != "", where, "a non-empty string", value)
    return value


def _word(where: str, value: Any) -> str:
    """A value that becomes a command-line word (host name, user, interpreter): it may
    never start with ``-``, where ssh or a shell would read it as an option."""
    _expect(isinstance(value, str) and value != "" and not value.startswith("-")
            and not any(ch.isspace() or ch == "\0" for ch in value), where,
            "a non-empty string without spaces that does not start with '-'", value)
    return value


def _int(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(where: str, value: Any) -> int:
        _expect(isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
                where, f"an integer between {lo} and {hi}", value)
        return value
    return check


def _timeout(where: str, value: Any) -> float:
    _expect(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
            where, "a positive number of seconds", value)
    return float(value)


def _groups(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    _expect(isinstance(value, list) and all(isinstance(g, str) and _NAME_RE.match(g)
                                            for g in value),
            where, "a list of group names (letters, digits, '_', '.', '-')", value)
    return tuple(value)


def _env(where: str, value: Any) -> dict[str, str]:
    _expect(isinstance(value, dict), where, "a mapping of NAME: value", value)
    out = {}
    for k, v in value.items():
        _expect(isinstance(k, str) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k),
                f"{where}.{k}", "an environment variable name", k)
        _expect(isinstance(v, (str, int, float)) and not isinstance(v, bool),
                f"{where}.{k}", "a string or number", v)
        out[k] = str(v)
    return out


def _names(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    _expect(isinstance(value, list) and value and all(isinstance(n, str) and _NAME_RE.match(n)
                                                     for n in value),
            where, "a host name of this inventory, or a list of them (first hop first)", value)
    return tuple(value)


def _lines(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    _expect(isinstance(value, list) and all(isinstance(v, str) and "\0" not in v
                                            and "\n" not in v for v in value),
            where, "a list of shell lines (one command each)", value)
    return tuple(value)


def _shell(where: str, value: Any) -> str:
    _expect(value in ("sh", "login"), where,
            "'sh' (POSIX sh, the default) or 'login' (your login shell, with its profile)",
            value)
    return value


def _policy(where: str, value: Any) -> str:
    _expect(value in HOST_KEY_POLICIES, where,
            "'strict' or 'accept-new' (fabfleet never accepts any key blindly)", value)
    return value


def _gpus(where: str, value: Any) -> Any:
    if value == "all":
        return "all"
    _expect(isinstance(value, list) and value and all(
        isinstance(v, (int, str)) and not isinstance(v, bool) for v in value), where,
        "'all' or a list of GPU indices or UUIDs", value)
    return tuple(str(v) for v in value)


def _scheduler(where: str, value: Any) -> str:
    _expect(value in directives.SCHEDULERS, where,
            "'slurm' or 'pbs' (the host is a cluster's login node)", value)
    return value


def _directives(scheduler: str) -> Callable[[str, Any], tuple[str, ...]]:
    def check(where: str, value: Any) -> tuple[str, ...]:
        try:
            return directives.parse(scheduler, value, where)
        except directives.DirectiveError as exc:
            raise InventoryError(str(exc)) from None
    return check


def _local_path(where: str, value: Any) -> str:
    return os.path.expanduser(_str(where, value))


_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "hostname": _word,
    "port": _int(1, 65535),
    "user": _word,
    "key_file": _local_path,
    "groups": _groups,
    "python": _word,
    "work_dir": _str,
    "conda_env": _str,
    "venv": _str,
    "env": _env,
    "max_jobs": _int(1, 1024),
    "connect_timeout": _timeout,
    "host_key_policy": _policy,
    "known_hosts": _local_path,
    "jump": _names,
    "setup": _lines,
    "shell": _shell,
    "gpus": _gpus,
    "tasks_per_gpu": _int(1, 64),
    "tasks_per_host": _int(1, 1024),
    "scheduler": _scheduler,
    "sbatch": _directives("slurm"),
    "qsub": _directives("pbs"),
}
_SECRET_KEYS = {"password", "passphrase", "key_passphrase", "sudo_password"}


def _validate_entry(where: str, data: Any, *, allow: Iterable[str]) -> dict[str, Any]:
    if data is None:
        return {}
    _expect(isinstance(data, dict), where, "a mapping of settings", data)
    allowed = set(allow)
    out = {}
    for key, value in data.items():
        if key in _SECRET_KEYS:
            raise InventoryError(
                f"{where}.{key}: passwords are not accepted in the inventory (files get "
                "copied, committed and shared). Use an SSH key (`key_file`) and, if it has a "
                "passphrase, load it into ssh-agent with `ssh-add`.")
        if key not in allowed:
            raise InventoryError(
                f"{where}.{key}: unknown key; expected one of {', '.join(sorted(allowed))}")
        out[key] = _VALIDATORS[key](f"{where}.{key}", value)
    return out


class DuplicateKeyError(Exception):
    pass


# The C loader when PyYAML has it (several times faster on big inventories).
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_BaseLoader):
    """A safe loader that refuses a key given twice in one mapping (plain YAML keeps the
    last silently: a second ``ws1:`` would replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            if key in seen:
                first = seen[key]
                raise DuplicateKeyError(
                    f"{key!r} is given twice in the same mapping (line {first.line + 1} and "
                    f"line {key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


class HostSet:
    """Hosts loaded from one file, in file order. Select with :meth:`select`.

    Local paths in the file (``key_file``, ``known_hosts``) that are relative resolve
    against the file's own directory, so one inventory works from any project."""

    def __init__(self, hosts: Iterable[Host], path: str | os.PathLike[str] = "<memory>") -> None:
        self.path = str(path)
        self.hosts: dict[str, Host] = {h.name: h for h in hosts}

    # -- loading ---------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]):
        """Read and validate ``path``; raise :class:`InventoryError` naming file and key."""
        p = Path(path).expanduser()
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise InventoryError(
                f"{p}: no such inventory file. Create one with `fabfleet init`, or point "
                "FABFLEET_INVENTORY at yours.") from None
        except OSError as exc:
            raise InventoryError(f"{p}: cannot read the inventory: {exc}") from None
        return cls.from_text(text, p)

    @classmethod
    def from_text(cls, text: str, path: str | os.PathLike[str] = "<memory>"):
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except DuplicateKeyError as exc:
            raise InventoryError(f"{path}: {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise InventoryError(f"{path}: not valid YAML{at}: {problem}") from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Any, path: str | os.PathLike[str] = "<memory>"):
        _expect(isinstance(data, dict), f"{path}", "a mapping with 'hosts' (and optionally "
                "'defaults')", data)
        unknown = set(data) - {"defaults", "hosts"}
        if unknown:
            raise InventoryError(f"{path}: {sorted(unknown)[0]}: unknown top-level key; "
                                 "expected 'defaults' and 'hosts'")
        per_host = {f.name for f in fields(Host)} - {"name", "inherited", "hops"}
        defaults = _validate_entry(f"{path}: defaults", data.get("defaults"),
                                   allow=per_host - {"hostname"})
        raw_hosts = data.get("hosts")
        _expect(isinstance(raw_hosts, dict) and raw_hosts, f"{path}: hosts",
                "a mapping of host names to settings", raw_hosts)
        hosts = []
        for name, entry in raw_hosts.items():
            _expect(isinstance(name, str) and _NAME_RE.match(name), f"{path}: hosts",
                    "host names made of letters, digits, '_', '.', '-'", name)
            own = _validate_entry(f"{path}: hosts.{name}", entry, allow=per_host)
            merged = {**defaults, **own}
            for key in ("key_file", "known_hosts"):
                if key in merged:
                    merged[key] = _beside(path, merged[key])
            if "env" in defaults and "env" in own:
                merged["env"] = {**defaults["env"], **own["env"]}
            hosts.append(Host(name=name, inherited=frozenset(set(defaults) - set(own)),
                              **merged))
        return cls(_resolve_jumps(hosts, path), path)

    # -- selection -------------------------------------------------------------------
    @property
    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for h in self.hosts.values():
            for g in h.groups:
                out.setdefault(g, []).append(h.name)
        return out

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise InventoryError(
                f"{self.path}: no host named {name!r}; known hosts: {self._known()}") from None

    def _known(self) -> str:
        return ", ".join(self.hosts) or "(none)"

    def select(self, host: str | Iterable[str] | None = None, group: str | None = None,
               all: bool = False):  # noqa: A002 - mirrors --all
        """The hosts named by exactly one of ``host`` (names/globs, comma list),
        ``group`` or ``all``, as a new set of the same class, in file order."""
        given = [x for x in (host, group, all) if x]
        if len(given) != 1:
            raise InventoryError(
                f"choose hosts with exactly one of --host NAME[,NAME…], --group NAME or --all "
                f"(got {'none' if not given else 'several'}); known hosts: {self._known()}; "
                f"groups: {', '.join(self.groups) or '(none)'}")
        if all:
            return self
        if group:
            if group not in self.groups:
                raise InventoryError(f"{self.path}: no group named {group!r}; known groups: "
                                     f"{', '.join(self.groups) or '(none)'}")
            return type(self)([h for h in self if group in h.groups], self.path)
        patterns = [p.strip() for p in (host.split(",") if isinstance(host, str) else host)]
        chosen: set[str] = set()
        for pattern in filter(None, patterns):
            matches = fnmatch.filter(self.hosts, pattern)
            if not matches:
                raise InventoryError(f"{self.path}: no host matches {pattern!r}; known hosts: "
                                     f"{self._known()}")
            chosen.update(matches)
        if not chosen:
            raise InventoryError(f"--host {host!r} names no host; known hosts: {self._known()}")
        return type(self)([h for h in self if h.name in chosen], self.path)


def _resolve_jumps(hosts: list[Host], path: Any) -> list[Host]:
    """Each host's ``jump`` names → ``hops`` (the jump hosts' records, themselves with
    their own hops resolved); unknown names and loops are errors naming the host."""
    by_name = {h.name: h for h in hosts}
    done: dict[str, Host] = {}

    def resolve(h: Host, seen: tuple[str, ...]) -> Host:
        if h.name in done:
            return done[h.name]
        hops = []
        for n in h.jump:
            where = f"{path}: hosts.{h.name}.jump"
            if n not in by_name:
                raise InventoryError(f"{where}: no host named {n!r} in this inventory; known "
                                     f"hosts: {', '.join(by_name)}")
            if n == h.name or n in seen:
                raise InventoryError(f"{where}: {n!r} makes a loop of jumps "
                                     f"({' -> '.join(seen + (h.name, n))})")
            hops.append(resolve(by_name[n], seen + (h.name,)))
        # a hop's own route comes first: jump: [b] where b has jump: [a] goes a -> b
        route: list[Host] = []
        for hop in hops:
            for x in (*hop.hops, hop):
                if x.name not in {r.name for r in route}:
                    route.append(x)
        done[h.name] = replace(h, hops=tuple(route)) if route else h
        return done[h.name]
    return [resolve(h, ()) for h in hosts]


def _beside(inventory_path: str | os.PathLike[str], local: str) -> str:
    """A local path from the inventory: ``~`` expanded, relative ones next to the file."""
    if os.path.isabs(local) or str(inventory_path).startswith("<"):
        return local
    return str(Path(inventory_path).expanduser().resolve().parent / local)
