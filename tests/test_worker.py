"""The remote worker (fabfleet/hostside/worker.py) run locally in a subprocess, spoken to in its own
protocol: framing, call ids, output, errors, the fork guard, interrupts, death on EOF.
No SSH: this is the module's own contract, as the hosts run it."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time

import cloudpickle
import pytest

from fabfleet.hostside import worker as proto
from fabfleet.ssh.output import PrefixedOutput
from fabfleet.ssh.launch import source


def worker_source() -> str:
    return source(proto)


class LocalWorker:
    """The worker's source run by this Python, exactly as a host runs it (``-c``)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", worker_source(), cloudpickle.__version__,
             "/nonexistent-cache", "fabfleet-worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
        self.chan = proto.Channel(self.proc.stdout, self.proc.stdin)
        kind, cid, data = self.recv()
        assert (kind, cid) == (proto.HELLO, 0)
        self.hello = json.loads(data)
        self.next_id = 0

    def recv(self, timeout: float = 10):
        result = []
        t = threading.Thread(target=lambda: result.append(self.chan.recv()), daemon=True)
        t.start()
        t.join(timeout)
        assert result, "the worker sent nothing in time"
        return result[0]

    def send_call(self, fn, *args, **kwargs) -> int:
        self.next_id += 1
        self.chan.send(proto.CALL, self.next_id, cloudpickle.dumps((fn, args, kwargs)))
        return self.next_id

    def call(self, fn, *args, **kwargs):
        """(result frame kind, decoded value or error, every frame seen)"""
        cid = self.send_call(fn, *args, **kwargs)
        frames = []
        while True:
            kind, fid, data = self.recv()
            assert fid == cid, (kind, fid, cid)
            frames.append((kind, data))
            if kind == proto.VALUE:
                return kind, pickle.loads(data), frames
            if kind == proto.ERROR:
                return kind, json.loads(data), frames

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def w():
    worker = LocalWorker()
    yield worker
    worker.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().split()[2] != "Z"


def test_hello_value_and_call_ids(w):
    assert w.hello["python"][:2] == list(sys.version_info[:2]) and w.hello["pid"] == w.proc.pid
    kind, value, frames = w.call(divmod, 17, 5)
    assert kind == proto.VALUE and value == (3, 2)
    assert frames[0][0] == proto.ACK  # acknowledged before it ran
    assert w.call(sum, [1, 2, 3])[1] == 6 and w.next_id == 2


def test_output_frames_carry_text_and_stray_fd_writes_stay_off_the_protocol(w):
    def talk():
        print("héllo", end="")
        print(" wörld")
        sys.stderr.write("to stderr\n")
        os.write(1, b"raw fd 1\n")  # must not corrupt a frame: it goes to stderr
        return "done"
    kind, value, frames = w.call(talk)
    assert value == "done"
    out = b"".join(d for k, d in frames if k == proto.STDOUT).decode()
    err = b"".join(d for k, d in frames if k == proto.STDERR).decode()
    assert out == "héllo wörld\n" and err == "to stderr\n"


def test_errors_come_back_as_text(w):
    def boom():
        raise KeyError("missing")
    kind, err, _ = w.call(boom)
    assert kind == proto.ERROR and err["type"] == "KeyError" and "'missing'" in err["message"]
    assert "in boom" in err["traceback"]
    assert w.call(abs, -4)[1] == 4  # the worker survives


def test_a_forked_child_never_answers_for_the_worker(w):
    def fork_and_return(tag):
        import os
        os.fork()  # both parent and child return from here
        return tag
    for i in range(5):
        kind, value, _ = w.call(fork_and_return, i)
        assert (kind, value) == (proto.VALUE, i)
    time.sleep(0.3)
    assert w.call(str.upper, "still mine")[1] == "STILL MINE"


def test_interrupt_raises_keyboardinterrupt_in_the_function(w):
    def sleeper():
        import time
        time.sleep(60)
    cid = w.send_call(sleeper)
    assert w.recv()[0] == proto.ACK
    started = time.monotonic()
    w.chan.send(proto.INTERRUPT, cid, b"3")
    kind, fid, data = w.recv()
    assert (kind, fid) == (proto.ERROR, cid) and json.loads(data)["type"] == "KeyboardInterrupt"
    assert time.monotonic() - started < 2
    assert w.call(abs, -1)[1] == 1  # and it takes the next call


def test_interrupt_of_another_call_id_is_ignored(w):
    def short():
        import time
        time.sleep(0.5)
        return "finished"
    cid = w.send_call(short)
    w.chan.send(proto.INTERRUPT, cid + 99, b"3")
    frames = [w.recv() for _ in range(2)]
    assert frames[1][0] == proto.VALUE and pickle.loads(frames[1][2]) == "finished"


def test_a_function_ignoring_the_interrupt_is_killed_after_grace(w):
    def stubborn():
        import time
        while True:
            try:
                time.sleep(60)
            except KeyboardInterrupt:
                pass
    cid = w.send_call(stubborn)
    assert w.recv()[0] == proto.ACK
    started = time.monotonic()
    w.chan.send(proto.INTERRUPT, cid, b"1")
    assert w.proc.wait(10) != 0
    assert 0.9 < time.monotonic() - started < 5


def test_end_of_input_kills_the_worker_and_its_children(w):
    def spawn():
        import subprocess
        return subprocess.Popen(["sleep", "300"]).pid
    child = w.call(spawn)[1]
    assert alive(child)
    w.proc.stdin.close()  # the client went away
    w.proc.wait(5)
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_prefixed_output_decodes_split_characters_for_text_streams():
    import io
    plain, prefixed = io.StringIO(), io.StringIO()
    out = PrefixedOutput(prefix=False, stdout=plain)
    both = PrefixedOutput(prefix=True, stdout=prefixed)
    data = "naïve ✓ done\nlast".encode()
    cut = data.index("✓".encode()) + 1  # inside the 3-byte character
    for chunk in (data[:cut], data[cut:]):
        out("ws1", "stdout", chunk)
        both("ws1", "stdout", chunk)
        both("ws2", "stdout", chunk)
    out.flush()
    both.flush()
    assert plain.getvalue() == "naïve ✓ done\nlast"
    lines = prefixed.getvalue().splitlines()
    assert sorted(lines) == ["[ws1] last", "[ws1] naïve ✓ done", "[ws2] last",
                             "[ws2] naïve ✓ done"]


def test_prefixed_output_follows_sys_stdout_at_write_time():
    import contextlib
    import io
    out = PrefixedOutput(prefix=False)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out("ws1", "stdout", b"caught\n")
    assert buf.getvalue() == "caught\n"


def test_worker_source_is_the_module():
    assert "def main(argv)" in worker_source() and worker_source().endswith("main(sys.argv[1:])\n")
