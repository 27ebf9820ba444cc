"""The exceptions fabfleet raises, and the one place third-party errors become ours.

    FleetError                    root: ``except FleetError`` catches everything below
    ├── InventoryError            bad inventory file, unknown host/group, bad selection
    ├── LocalError                a problem on this machine (missing script, file exists)
    ├── HostError                 something went wrong with one host; carries ``.host``
    │   ├── ConnectError          host unreachable, refused, timed out, dropped
    │   ├── AuthError             the host refused our key / user
    │   ├── HostKeyError          unknown or changed host key (never silently accepted)
    │   ├── CommandError          a remote command failed (exit code, stderr tail)
    │   │   └── DeadlineError     a call's timeout= expired; the function was stopped
    │   ├── TransferError         push / gather / payload transfer failed
    │   ├── PythonMismatchError   remote Python major.minor differs from the local one
    │   └── RemoteError           the function raised on the host; carries the traceback
    ├── RunInterrupted            Ctrl-C during a run; the remote processes were stopped
    └── FanOutError               several hosts failed; message is a one-line summary

Every :class:`HostError` message starts with the host name, then says what was tried,
what happened and what to try next. Paramiko, socket and Invoke exceptions are only
caught in :func:`host_errors`, which maps them to the tree with ``raise … from exc``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator


class FleetError(Exception):
    """Root of every error fabfleet raises on purpose."""


class InventoryError(FleetError):
    """The inventory file is invalid, or a host selection does not match it."""


class LocalError(FleetError):
    """Something on the local machine is missing or in the way."""


class HostError(FleetError):
    """An error tied to one host. ``str(err)`` starts with ``err.host``."""

    def __init__(self, host: str, message: str) -> None:
        self.host = host
        self.detail = message
        super().__init__(f"{host}: {message}")


class ConnectError(HostError):
    """The host could not be reached, or the connection dropped."""


class AuthError(HostError):
    """The host rejected our credentials."""


class HostKeyError(HostError):
    """The host's key is unknown (and the policy is strict) or has changed."""


class CommandError(HostError):
    """A remote command exited non-zero (or could not be started)."""

    def __init__(self, host: str, message: str, *, exit_code: int | None = None,
                 stderr: str = "") -> None:
        self.exit_code = exit_code
        self.stderr = stderr
        super().__init__(host, message)


class TransferError(HostError):
    """Copying files or data to or from the host failed."""


class GpusBusyError(CommandError):
    """Every GPU of the host is someone else's: no worker could start there (a map hands
    its work to the other hosts)."""


class PythonMismatchError(HostError):
    """The host's Python cannot load pickles made by ours."""


class DeadlineError(CommandError):
    """A call did not finish within its ``timeout=``; the remote function was stopped."""


class RemoteError(HostError):
    """The remote function raised. ``.remote_type`` and ``.remote_traceback`` are text."""

    def __init__(self, host: str, remote_type: str, message: str, remote_traceback: str) -> None:
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback
        super().__init__(
            host,
            f"{remote_type}: {message}\n\nRemote traceback (from {host}):\n"
            f"{remote_traceback.rstrip()}",
        )


class RunInterrupted(FleetError):
    """Ctrl-C arrived during a run; ``.stopped`` lists hosts whose processes were killed."""

    def __init__(self, run_id: str, stopped: list[str]) -> None:
        self.run_id = run_id
        self.stopped = stopped
        where = ", ".join(stopped) if stopped else "no host (none was still running)"
        super().__init__(f"interrupted: stopped run {run_id}'s remote processes on {where} "
                         "(SIGTERM to their process group, then SIGKILL). What they wrote so "
                         "far is in each host's run dir.")


class FanOutError(FleetError):
    """One or more hosts of a fan-out failed; ``.errors`` maps host to exception."""

    def __init__(self, summary: str, errors: dict[str, BaseException]) -> None:
        self.errors = errors
        super().__init__(summary)


def _tail(text: str, lines: int = 5) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


@contextlib.contextmanager
def host_errors(host: str, action: str) -> Iterator[None]:
    """Translate paramiko/socket/invoke exceptions raised inside into :class:`HostError`.

    ``action`` says what was being attempted ("connect to 127.0.0.1:2201 as dev",
    "run 'python3 -V'"); it goes into the message. Our own errors pass through (host
    keys are judged by :mod:`fabfleet.ssh.hostkeys`, which raises :class:`HostKeyError`
    itself, naming the file and line).
    """
    # Imported here so that importing fabfleet.errors stays cheap for pure parsers.
    import invoke.exceptions  # the errors Fabric raises, not the task machinery
    import paramiko

    try:
        yield
    except FleetError:
        raise
    except paramiko.BadHostKeyException as exc:  # only if paramiko was given keys itself
        raise HostKeyError(
            host,
            f"the host key CHANGED, refusing to {action}: {exc.hostname} offers another key "
            "than the one recorded. This can be an attack; or the host was reinstalled.",
        ) from exc
    except paramiko.AuthenticationException as exc:
        raise AuthError(
            host,
            f"authentication failed while trying to {action} ({exc}). Check `user` and "
            "`key_file` in the inventory, that the key is loaded (`ssh-add -l`) if it has a "
            "passphrase, and that its public half is in ~/.ssh/authorized_keys on the host.",
        ) from exc
    except paramiko.ssh_exception.NoValidConnectionsError as exc:
        reasons = {os.strerror(e.errno) if e.errno else str(e) for e in exc.errors.values()}
        raise ConnectError(
            host,
            f"could not {action}: {'; '.join(sorted(reasons))} (nothing accepts SSH "
            "connections there). Check that the host is up and sshd is running, and that "
            "`hostname` and `port` in the inventory are right.",
        ) from exc
    except (socket.timeout, TimeoutError) as exc:
        raise ConnectError(
            host,
            f"timed out while trying to {action}. Check that the host is up and the port "
            "is right, or raise `connect_timeout` in the inventory.",
        ) from exc
    except (ConnectionError, socket.gaierror, OSError) as exc:
        raise ConnectError(
            host,
            f"could not {action}: {exc}. Check that the host is up, that `hostname` and "
            "`port` in the inventory are right, and that `ssh` to it works.",
        ) from exc
    except paramiko.ChannelException as exc:
        raise ConnectError(
            host,
            f"the host refused to open a channel ({exc.text or exc.code}) while trying to "
            f"{action}. For a new session that is sshd's MaxSessions (10 per connection by "
            "default): lower `max_jobs`, or raise MaxSessions in the host's sshd_config; for "
            "a forwarded port, nothing listens there or forwarding is not allowed.",
        ) from exc
    except (paramiko.SSHException, EOFError) as exc:
        raise ConnectError(
            host,
            f"the SSH session failed while trying to {action}: {exc or type(exc).__name__}. "
            "The host may have gone down or dropped the connection; try again, and check "
            "its sshd logs if it persists.",
        ) from exc
    except invoke.exceptions.UnexpectedExit as exc:
        result = exc.result
        raise CommandError(
            host,
            f"`{result.command}` exited {result.exited} while trying to {action}.\n"
            f"{_tail(result.stderr) or _tail(result.stdout)}",
            exit_code=result.exited,
            stderr=result.stderr,
        ) from exc
    except invoke.exceptions.CommandTimedOut as exc:
        raise CommandError(
            host,
            f"`{exc.result.command}` did not finish within {exc.timeout}s while trying to "
            f"{action}; the host may be overloaded or the command stuck.",
        ) from exc
