"""The connection keeper: runs ``fabfleet`` commands with connections kept between them.

Started by the first command that wants one (:mod:`.keeper`), detached, one per user
and fabfleet install; ``python -m fabfleet.cli.keeper_server SOCKET IDLE``. It runs one
command at a time, in its main thread, exactly as :mod:`.program` would in the
command's own process: with the command's stdin/stdout/stderr on descriptors 0-2 (so
rsync, ssh and the terminal see the same), its working directory, environment and
umask; SIGINT for its Ctrl-C; its exit code back. SSH connections a command opened
stay open (:mod:`fabfleet.ssh.keep`) for the next; payload workers, which hold the
project's code, do not. A command that arrives while another runs is told "busy" and
runs in its own process. ``IDLE`` seconds after the last command ended, or at
``fabfleet disconnect``, the keeper closes every connection and exits.
"""

from __future__ import annotations

import fcntl
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback

from .keeper import peer_is_us, recv_frame, send_frame

#: seconds between looks at the idle clock
_TICK = 1.0


class Keeper:
    def __init__(self, path: str, idle: float) -> None:
        self.path = path
        self.idle = idle
        self.lock = threading.Lock()
        self.busy = False
        self.running = False  # a command is in the main thread now (SIGINT goes to it)
        self.stopping = False
        self.last = time.monotonic()
        self.todo: queue.Queue = queue.Queue()
        self.sock: socket.socket | None = None

    # -- listening -----------------------------------------------------------------
    def bind(self) -> bool:
        """Listen at ``path``, unless another keeper already does (False)."""
        fd = os.open(self.path + ".lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.lockfile = os.fdopen(fd, "a")
        try:
            fcntl.flock(self.lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        try:
            os.unlink(self.path)  # a dead keeper's socket
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        sock.listen(16)
        self.sock = sock
        self.inode = os.stat(self.path).st_ino
        return True

    def accept_loop(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not peer_is_us(conn):
                conn.close()
                continue
            try:
                request, fds = recv_frame(conn, with_fds=3)
            except (OSError, ValueError):
                conn.close()
                continue
            if request is not None and request.get("stop"):  # fabfleet disconnect
                for fd in fds:
                    os.close(fd)
                from ..ssh import keep
                with self.lock:
                    self.stopping = True
                    was_busy = self.busy
                try:
                    send_frame(conn, {"exit": 0, "kept": keep.kept(), "busy_with": was_busy})
                finally:
                    conn.close()
                continue
            if request is None or len(fds) != 3:
                for fd in fds:
                    os.close(fd)
                conn.close()
                continue
            with self.lock:
                taken = self.busy or self.stopping
                if not taken:
                    self.busy = True
            if taken:
                for fd in fds:
                    os.close(fd)
                try:
                    send_frame(conn, {"busy": True})
                finally:
                    conn.close()
                continue
            self.todo.put((conn, request, fds))

    # -- the main thread -------------------------------------------------------------
    def serve(self) -> None:
        from ..ssh import keep
        from .program import program  # everything a command needs, imported once
        keep.activate()
        threading.Thread(target=self.accept_loop, daemon=True, name="fabfleet-accept").start()
        try:
            while True:
                try:
                    conn, request, fds = self.todo.get(timeout=_TICK)
                except queue.Empty:
                    if self.stopping or time.monotonic() - self.last > self.idle:
                        break
                    continue
                except KeyboardInterrupt:  # a late Ctrl-C of a finished command
                    continue
                try:
                    self.command(program, conn, request, fds)
                except KeyboardInterrupt:  # the command's Ctrl-C, in a gap of its end
                    pass
                self.idle = float(request.get("idle") or self.idle)  # the newest setting
                with self.lock:
                    self.busy = False
                self.last = time.monotonic()
        finally:
            with self.lock:
                self.stopping = True
            self.shut()

    def command(self, program, conn, request, fds) -> None:
        from .. import render
        from ..host.pool import close_workers
        from ..ssh import keep
        saved = [os.dup(i) for i in range(3)]
        streams = (sys.stdin, sys.stdout, sys.stderr)
        env, cwd = dict(os.environ), os.getcwd()
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        code = 1
        try:
            for i, fd in enumerate(fds):
                os.dup2(fd, i)
                os.close(fd)
            sys.stdin = open(0, "r", closefd=False)
            sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
            os.environ.clear()
            os.environ.update(request["env"])
            os.umask(int(request["umask"]))
            os.chdir(request["cwd"])
            sys.argv = list(request["argv"])
            render.console.cache_clear()
            watcher = threading.Thread(target=self.watch, args=(conn,), daemon=True,
                                       name="fabfleet-watch-client")
            with self.lock:
                self.running = True
            watcher.start()
            code = self.run_program(program, request["argv"])
        except Exception as exc:  # noqa: BLE001 - its directory went away, say
            print(f"fabfleet: the connection keeper could not run the command: {exc}",
                  file=sys.stderr)
        finally:
            with self.lock:
                self.running = False
            # a Ctrl-C sent just before the end is not to stop the cleanup below
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                close_workers()
            except Exception:  # noqa: BLE001 - a worker of a dead host
                pass
            keep.end_command()
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            sys.stdin, sys.stdout, sys.stderr = streams
            for i, fd in enumerate(saved):
                os.dup2(fd, i)
                os.close(fd)
            os.environ.clear()
            os.environ.update(env)
            os.chdir(cwd)
            render.console.cache_clear()
            for sig, handler in handlers.items():  # a task may have set its own
                signal.signal(sig, handler)
        try:
            send_frame(conn, {"exit": code})
        except OSError:
            pass
        try:
            conn.shutdown(socket.SHUT_RDWR)  # wakes the watcher's recv
        except OSError:
            pass
        conn.close()

    @staticmethod
    def run_program(program, argv) -> int:
        try:
            try:
                program.run(argv)
            except BrokenPipeError:  # `fabfleet … | head`: the reader left; not an error
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            return 0
        except SystemExit as exc:
            c = exc.code
            if c is None:
                return 0
            if isinstance(c, int):
                return c
            print(c, file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        except BaseException:  # noqa: BLE001 - told as the command's own traceback
            traceback.print_exc()
            return 1

    def watch(self, conn) -> None:
        """The command's client: a byte is its Ctrl-C; end of stream, that it is gone
        (killed, its terminal closed) — both interrupt the command."""
        while True:
            try:
                data = conn.recv(64)
            except OSError:
                data = b""
            with self.lock:
                if not self.running:
                    return
                os.kill(os.getpid(), signal.SIGINT)
            if not data:
                return

    def shut(self) -> None:
        from ..ssh import keep
        from ..ssh.connect import close_gateways
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass
        self.sock.close()
        keep.close_all()
        close_gateways()


def main(argv: list[str]) -> None:
    path, idle = argv[0], float(argv[1])  # IDLE: until the first command says
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    keeper = Keeper(path, idle)

    def stop(signum, frame):  # SIGTERM: stop after the current command
        keeper.stopping = True
    signal.signal(signal.SIGTERM, stop)
    if not keeper.bind():
        return
    keeper.serve()


if __name__ == "__main__":
    main(sys.argv[1:])
