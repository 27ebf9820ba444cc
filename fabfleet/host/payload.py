"""Pickled payloads: run Python functions on hosts and get their values back.

This module makes the calls: :func:`dumps_call` pickles a function with its arguments
(the project's own modules by value, so the host needs nothing but Python),
:func:`run_payload` and :func:`remote` run one, :func:`save_payload` writes one for
``fabfleet run-pickle``. Workers and their protocol are :mod:`fabfleet.host.pool` and
:mod:`fabfleet.hostside.worker`; spreading many calls over hosts is
:mod:`fabfleet.fleet.scheduler`. Unpickling a value trusts the host it came from.

Code sent by value keeps its file name (cloudpickle 3.1 replaces it with
``<dynamic-code>``), so a remote traceback names the user's file and line, and the
local side adds the source line (:func:`fabfleet.host.shipping.with_local_source`).
"""

from __future__ import annotations

import collections
import copy
import functools
import hashlib
import io
import os
import pickle
import sys
import sysconfig
import threading
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cloudpickle

from ..config.inventory import Host, HostSet
from ..config.settings import find_inventory
from ..errors import LocalError
from .pool import Output, call_on_host

PAYLOAD_MAGIC = b"FABFLEET-PAYLOAD-1\n"
_NEVER_BY_VALUE = {"__main__", "fabfleet", "fabfile", "cloudpickle"}  # __main__ goes by value anyway


# -- which code travels by value ---------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _installed_roots() -> tuple[str, ...]:
    """Directories whose modules the host is expected to have (or not need by value):
    the standard library and every site-packages / dist-packages on ``sys.path``."""
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots |= {p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")}
    return tuple(os.path.realpath(r) + os.sep for r in roots if r)


def is_project_module(module) -> bool:
    """A module of the user's own code — not the standard library, not installed (not
    under any site-packages), not fabfleet or cloudpickle: it is pickled by value."""
    name = getattr(module, "__name__", "")
    if name.partition(".")[0] in _NEVER_BY_VALUE:
        return False
    files = [getattr(module, "__file__", None)] + list(getattr(module, "__path__", None) or [])
    files = [f for f in files if f]
    if not files:
        return False  # built in, frozen, or made at run time
    roots = _installed_roots()
    return not any(os.path.realpath(f).startswith(roots) for f in files)


class _ByValue:
    """Registers the project's modules with cloudpickle's pickle-by-value, once each.

    The check reruns only when ``sys.modules`` grew, so a warm call pays one ``len``.
    Registrations are kept (they are the user's own modules, which hosts lack)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen = 0
        self.decided: dict[str, bool] = {}

    def refresh(self) -> None:
        if len(sys.modules) == self.seen:
            return
        with self.lock:
            modules = dict(sys.modules)
            for name in modules:
                top = name.partition(".")[0]
                if top in self.decided or top not in modules:
                    continue
                self.decided[top] = mine = is_project_module(modules[top])
                if mine:
                    cloudpickle.register_pickle_by_value(modules[top])
            self.seen = len(modules)


_by_value = _ByValue()


def _code_keeping_file(code: types.CodeType):
    """cloudpickle's code reducer, with the code's real file name put back: tracebacks
    on the host then name the user's file (the line numbers travel anyway)."""
    rebuild, args = _CLOUDPICKLE_CODE(code)
    return rebuild, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)


_CLOUDPICKLE_CODE = cloudpickle.Pickler.dispatch_table[types.CodeType]


class _Pickler(cloudpickle.Pickler):
    dispatch_table = collections.ChainMap({types.CodeType: _code_keeping_file},
                                          cloudpickle.Pickler.dispatch_table)


def dumps(obj: Any) -> bytes:
    """``cloudpickle.dumps`` (highest protocol), keeping by-value code's file names."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def dumps_call(fn: Callable, *args: Any, **kwargs: Any) -> bytes:
    """``cloudpickle`` the call ``fn(*args, **kwargs)``.

    Functions and classes from the project's own modules travel by value, with the
    modules they use (transitively), so a function calling ``helper.scale`` works on a
    host that has never seen helper.py; installed and standard-library modules go by
    reference. A :func:`remote` function is sent as the plain function it wraps.
    """
    fn = fn.local if isinstance(fn, RemoteFunction) else fn
    _by_value.refresh()
    try:
        return dumps((fn, args, kwargs))
    except Exception as exc:  # noqa: BLE001 - cloudpickle raises many kinds
        raise LocalError(f"cannot pickle the call to {getattr(fn, '__qualname__', fn)!r}: "
                         f"{type(exc).__name__}: {exc}. Arguments and closures must be "
                         "picklable (no open files, sockets, locks).") from exc


def dumps_function(fn: Callable) -> tuple[int, bytes]:
    """``(id, pickle)`` of a function alone, for map chunks: the id (a hash of the
    pickle) lets each worker keep it after the first chunk."""
    fn = fn.local if isinstance(fn, RemoteFunction) else fn
    _by_value.refresh()
    try:
        blob = dumps(fn)
    except Exception as exc:  # noqa: BLE001 - cloudpickle raises many kinds
        raise LocalError(f"cannot pickle {getattr(fn, '__qualname__', fn)!r}: "
                         f"{type(exc).__name__}: {exc}") from exc
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big"), blob


# -- payload files ---------------------------------------------------------------------
def save_payload(path: str | os.PathLike[str], fn: Callable, *args: Any, **kwargs: Any) -> Path:
    """Write a payload file for ``fabfleet run-pickle``: the call ``fn(*args, **kwargs)``."""
    path = Path(path)
    path.write_bytes(PAYLOAD_MAGIC + dumps_call(fn, *args, **kwargs))
    return path


def load_payload_bytes(path: str | os.PathLike[str]) -> bytes:
    """The pickled call inside a payload file (not unpickled here)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LocalError(f"{path}: cannot read the payload: {exc.strerror}") from None
    if not data.startswith(PAYLOAD_MAGIC):
        raise LocalError(f"{path}: not a fabfleet payload; make one with "
                         "fabfleet.save_payload(path, fn, *args, **kwargs)")
    return data[len(PAYLOAD_MAGIC):]


# -- one call --------------------------------------------------------------------------
def run_payload(c_or_host, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on a host and return its value.

    ``c_or_host`` is a connection from :func:`fabfleet.connect` / ``Inventory.connect`` (its
    host's pooled worker is used) or a :class:`Host`. The function's prints reach this
    process's ``sys.stdout``/``sys.stderr`` as they happen. Raises :class:`RemoteError`
    (with the remote traceback) when it raises there, :class:`PythonMismatchError` before
    sending anything when the host's Python differs, :class:`HostError` subclasses for
    the rest. For a deadline or an output callback use :func:`call`.
    """
    host = c_or_host if isinstance(c_or_host, Host) else c_or_host.fleet_host
    return call_on_host(host, dumps_call(fn, *args, **kwargs))


def call(c_or_host, fn: Callable, args: Sequence[Any] = (), kwargs: dict | None = None, *,
         timeout: float | None = None, on_output: Output | None = None) -> Any:
    """:func:`run_payload` with options: ``timeout`` (seconds; the function is stopped on
    the host and :class:`~fabfleet.errors.DeadlineError` raised) and ``on_output``
    (``(host, "stdout"|"stderr", bytes)`` instead of mirroring to ``sys.stdout``)."""
    host = c_or_host if isinstance(c_or_host, Host) else c_or_host.fleet_host
    return call_on_host(host, dumps_call(fn, *args, **(kwargs or {})), on_output=on_output,
                        timeout=timeout)


class _InventoryCache:
    """The inventory a :func:`remote` function uses: found and parsed once, re-read only
    when its file changes (checked with one ``stat`` per call)."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = path
        self.found: dict[tuple[str | None, str], str] = {}
        self.loaded: tuple[str, int, int, HostSet] | None = None
        self.lock = threading.Lock()

    def hosts(self) -> HostSet:
        if self.path is not None:
            path = os.fspath(self.path)
        else:
            key = (os.environ.get("FABFLEET_INVENTORY"), os.getcwd())
            path = self.found.get(key)
            if path is None:
                path = self.found[key] = find_inventory()
        try:
            st = os.stat(path)
        except OSError:
            self.found.clear()
            return HostSet.load(path)  # raises the clear "no such inventory" error
        cached = self.loaded
        if cached and cached[0] == path and cached[1] == st.st_mtime_ns and cached[2] == st.st_size:
            return cached[3]
        with self.lock:
            hosts = HostSet.load(path)
            self.loaded = (path, st.st_mtime_ns, st.st_size, hosts)
        return hosts


class RemoteFunction:
    """A function that runs on a host when called (made by :func:`remote`).

    To the rest of the API it is the plain function it wraps: ``map``, ``run_payload``,
    ``save_payload`` and executors send ``.local``, and pickling one (say, as a global
    another remote function uses) pickles ``.local`` — the host never needs fabfleet.
    """

    def __init__(self, fn: Callable, host: str, inventory: str | os.PathLike[str] | None,
                 timeout: float | None, on_output: Output | None) -> None:
        functools.update_wrapper(self, fn)
        self.local = fn
        self.host = host
        self.timeout = timeout
        self.on_output = on_output
        self._inventory = _InventoryCache(inventory)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        host = self._inventory.hosts()[self.host]
        return call_on_host(host, dumps_call(self.local, *args, **kwargs),
                            on_output=self.on_output, timeout=self.timeout)

    def __get__(self, obj, objtype=None):
        return self if obj is None else functools.partial(self, obj)

    def __reduce__(self):
        return copy.copy, (self.local,)  # copy.copy(fn) is fn: stdlib only on the host

    def __repr__(self) -> str:
        return f"<remote function {self.__qualname__} on {self.host}>"


def remote(host: str, inventory: str | os.PathLike[str] | None = None, *,
           timeout: float | None = None, on_output: Output | None = None):
    """Decorator: calling the function runs it on ``host`` and returns its value.

    ``inventory`` is a path; ``None`` finds it as the CLI does. ``timeout`` (seconds)
    stops the function on the host when it runs longer; ``on_output`` receives its
    output instead of ``sys.stdout``/``sys.stderr``. The plain function is ``.local``.
    """
    def decorate(fn: Callable) -> RemoteFunction:
        return RemoteFunction(fn, host, inventory, timeout, on_output)
    return decorate
