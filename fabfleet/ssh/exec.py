"""Run one remote command on a raw SSH channel: streamed output, deadlines, stdin sent once.

Invoke's runner adds ~10 ms per command (threads, polling sleeps) and reads stdin byte
by byte; here a command costs one channel round trip (~4 ms on loopback). Output goes
to callbacks as it arrives, so callers can stream it live, prefix it, or keep it.

Nothing waits forever: the connection's :class:`~fabfleet.ssh.liveness.Watchdog` probes
it while the command runs, and a host that does not answer within its
``connect_timeout`` fails the command with :class:`~fabfleet.errors.ConnectError`.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paramiko
from paramiko.common import cMSG_CHANNEL_REQUEST

from ..config.deadlines import deadlines
from ..errors import CommandError, ConnectError, host_errors
from .liveness import watchdog
from .shell import Remote, from_stdin

Sink = Callable[[bytes], None]


def start_command(chan, command: str) -> None:
    """Ask the host to run ``command`` on session channel ``chan`` without waiting for
    its yes, as OpenSSH's client does: stdin can follow at once and the output comes in
    the same round trip (paramiko's ``exec_command`` waits a round trip first). The
    reply still arrives before any output; a refusal closes the channel, which
    :func:`refused` then tells apart from a command that ended."""
    m = paramiko.Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(chan.remote_chanid)
    m.add_string("exec")
    m.add_boolean(True)
    m.add_string(command)
    chan._event_pending()
    chan.transport._send_user_message(m)


#: a session that waits for its command on stdin (see :func:`open_command`): the
#: reader of :func:`~fabfleet.ssh.shell.from_stdin`, whose ``read`` takes one byte at a
#: time, so nothing after the command is consumed
_STANDBY = from_stdin("", "").command
#: standby sessions kept ready per connection in the keeper (each holds one of the
#: host's MaxSessions, stock 10, and an idle ``sh`` there)
STANDBYS = 2
_standby_lock = threading.Lock()


def open_command(c, command: str, timeout: float):
    """A session channel on connection ``c`` running ``command`` (its stdin still ours).

    In the connection keeper a kept connection has :data:`STANDBYS` sessions already
    started, each an ``sh`` waiting for one line; the command goes to one of them as
    ``exec COMMAND`` — so it runs as if started now (the same command line, guard and
    all, in the same login session), without the two round trips of opening a session
    and of OpenSSH's zero initial window (sshd lets no stdin in before the command
    starts). Elsewhere: a new session, the command started with :func:`start_command`."""
    transport = c.client.get_transport()
    with _standby_lock:
        ready = getattr(transport, "_fabfleet_standby", None) or []
        chan = None
        while ready and chan is None:
            candidate = ready.pop(0)
            if not candidate.closed and not candidate.exit_status_ready():
                chan = candidate
    if chan is not None:
        send_all(chan, from_stdin("", "exec " + command).stdin)
        refill_standby(transport)
        return chan
    chan = transport.open_session(timeout=timeout)
    start_command(chan, command)
    if getattr(transport, "_fabfleet_standby", None) is not None:
        refill_standby(transport)
    return chan


def refill_standby(transport) -> None:
    """Start standby sessions on ``transport`` (in the background) up to
    :data:`STANDBYS`; from then on :func:`open_command` keeps them topped up."""
    def fill() -> None:
        while transport.is_active():
            with _standby_lock:
                ready = transport.__dict__.setdefault("_fabfleet_standby", [])
                ready[:] = [ch for ch in ready if not ch.closed]
                if len(ready) + getattr(transport, "_fabfleet_starting", 0) >= STANDBYS:
                    return
                transport._fabfleet_starting = getattr(transport, "_fabfleet_starting", 0) + 1
            try:
                chan = transport.open_session(timeout=15)
                start_command(chan, _STANDBY)
            except Exception:  # noqa: BLE001 - no standby: commands open their own
                return
            finally:
                with _standby_lock:
                    transport._fabfleet_starting -= 1
            with _standby_lock:
                transport._fabfleet_standby.append(chan)
    threading.Thread(target=fill, daemon=True, name="fabfleet-standby").start()


def refused(chan) -> bool:
    """Whether the host refused the command :func:`start_command` asked for (no yes came
    before the channel closed)."""
    return chan.closed and not chan.event_ready


def send_all(chan, data: bytes) -> None:
    """Send ``data`` on a channel in 1 MiB slices of one memoryview. Not
    ``chan.sendall``: it re-slices the rest after every 32 KiB packet, which is
    quadratic (32 MB took 2 s; this takes 0.2 s). Raises EOFError if the channel closed."""
    view, off = memoryview(data), 0
    while off < len(view):
        sent = chan.send(view[off:off + (1 << 20)])
        if sent == 0:
            raise EOFError("the channel closed while sending")
        off += sent


@dataclass(frozen=True)
class ExecResult:
    command: str
    exit_code: int
    stdout: str
    stderr: str
    seconds: float
    stdout_bytes: bytes = b""


def execute(c, command: str | Remote, *, timeout: float | None = 600,
            on_stdout: Sink | None = None, on_stderr: Sink | None = None, keep: bool = True,
            pty: bool = False, action: str | None = None,
            heartbeat: float | None = None, on_start: Callable[[object], None] | None = None
            ) -> ExecResult:
    """Run ``command`` on connection ``c`` and wait for its exit code.

    A :class:`~fabfleet.ssh.shell.Remote` gets its ``stdin`` sent, then end-of-file —
    unless ``heartbeat``: then stdin stays open and one byte goes every ``heartbeat``
    seconds, so the host side can tell that we are still there (the runner stops an
    attached run whose client went away) — or unless ``on_start``: it gets the channel
    once the command and its stdin are sent, to talk to the command (``send``) and end
    its stdin (``shutdown_write``) itself, say from ``on_stdout``.

    ``on_stdout``/``on_stderr`` receive raw bytes as they arrive; with ``keep`` the text
    is also collected into the result. ``timeout`` bounds the whole command: past it the
    channel is closed (which hangs up the remote process) and :class:`CommandError` is
    raised. A connection lost mid-command raises :class:`ConnectError`.
    Non-zero exit codes are returned, not raised: callers decide.
    """
    host = c.fleet_host.name
    remote = command if isinstance(command, Remote) else Remote(command)
    action = action or f"run `{remote.command[:80]}`"
    out: list[bytes] = []
    err: list[bytes] = []
    started = time.monotonic()
    dog = watchdog(c)
    with host_errors(host, action), dog.busy():
        limit = deadlines(c.fleet_host).handshake
        if pty:
            chan = c.client.get_transport().open_session(timeout=limit)
            chan.get_pty()
            start_command(chan, remote.command)
        else:
            chan = open_command(c, remote.command, limit)
        try:
            if remote.stdin:
                send_all(chan, remote.stdin)
            if on_start is not None:
                on_start(chan)
            elif heartbeat is None:
                chan.shutdown_write()
            beat = time.monotonic() + (heartbeat or 0)
            streams = ((chan.recv_ready, chan.recv, out, on_stdout),
                       (chan.recv_stderr_ready, chan.recv_stderr, err, on_stderr))
            while True:
                if timeout is not None and time.monotonic() - started > timeout:
                    raise CommandError(host, f"{action} did not finish within {timeout:g}s; "
                                       "it was stopped. Raise the timeout if it needs longer.")
                select.select([chan], [], [], 0.5 if heartbeat is None else min(0.5, heartbeat))
                if heartbeat is not None and time.monotonic() >= beat and not chan.closed:
                    beat = time.monotonic() + heartbeat
                    try:
                        chan.send(b".")
                    except (OSError, EOFError):
                        pass  # closing: the loop sees why
                got = False
                for ready, recv, kept, callback in streams:
                    while ready():
                        data = recv(1 << 16)
                        got = True
                        if keep:
                            kept.append(data)
                        if callback:
                            callback(data)
                if got:
                    continue
                # paramiko marks a channel "exited" (-1) when it merely closed, e.g. the
                # host died: only a real exit-status message counts as the command ending.
                exited = chan.status_event.is_set() and chan.exit_status != -1
                if exited and (chan.eof_received or chan.closed):
                    break
                alive = chan.get_transport().is_active()
                if not alive and not exited:
                    if dog.fired:
                        raise ConnectError(host, f"{dog.fired} during {action}. Output "
                                           "received so far was kept; check the host and "
                                           "run again.")
                    raise ConnectError(
                        host, f"the connection was lost during {action} (the host went down, "
                        "rebooted or dropped the session). Output received so far was kept; "
                        "check the host and run again.")
                if chan.closed:
                    if refused(chan):
                        raise CommandError(host, f"the host's sshd refused to run the command "
                                           f"for {action} (a ForceCommand, a restricted "
                                           "shell or a session limit?); try `ssh` to it by "
                                           "hand to see its reason")
                    break  # closed without exit status: killed by a signal (code 255)
            code = chan.recv_exit_status()
        finally:
            chan.close()
    raw = b"".join(out)
    return ExecResult(remote.command, code if code != -1 else 255, raw.decode("utf-8", "replace"),
                      b"".join(err).decode("utf-8", "replace"), time.monotonic() - started,
                      raw)
