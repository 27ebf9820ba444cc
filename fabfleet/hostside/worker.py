"""The remote side of pickled payloads: a worker that runs calls read from stdin.

This file is sent to the host as source and run (through :mod:`fabfleet.hostside.boot`, its source on stdin) with the arguments ``VERSION CACHE``;
it needs nothing but the standard library (and cloudpickle, which the client ships when
the host lacks its version). It is also imported locally, for its constants and so the
tests can run it in a local subprocess and speak its protocol. Keep it importable by
the oldest Python a host may have (it must at least say hello, so that a mismatched
Python is refused with a clear message): no syntax newer than 3.6.

Frames, both ways: ``kind (1 byte) + call id (8 bytes) + length (8 bytes) + data``,
big-endian. Every frame of a call carries that call's id, so a late or stray frame can
never be taken as the answer to another call.

=====  =========  ============================================================
kind   direction  meaning
=====  =========  ============================================================
``H``  ← worker   hello (call 0): JSON {python, implementation, executable, pid,
                  cloudpickle}
``N``  ← worker   needs cloudpickle (call 0): the next ``Z`` frame carries it
``Z``  → worker   a zip of the client's cloudpickle package (cached on the host)
``C``  → worker   a call: ``cloudpickle.dumps((fn, args, kwargs))``
``D``  → worker   define a function for chunks (the call id field is its id, a hash of
                  its pickle): sent once per worker, kept; no reply
``M``  → worker   a map chunk: ``cloudpickle.dumps((function id, [item, …]))``; the
                  ``V`` reply is a list of ``("v", value)`` or ``("e", error)`` per item
``I``  → worker   interrupt that call: KeyboardInterrupt in the function; if it is
                  still running after the grace period (the frame's data, seconds),
                  the worker kills its process group and exits
``A``  ← worker   the call arrived (a worker dying before this is safely replaced);
                  not sent when the options say ``"ack": false`` (then the client
                  treats every call it sent as taken)
``O``  ← worker   what the function wrote to ``sys.stdout``, as it writes it
``R``  ← worker   what the function wrote to ``sys.stderr``
``V``  ← worker   the value: ``pickle.dumps(value)``, or cloudpickle's where the
                  standard pickler refuses it (see :func:`dumps_value`)
``E``  ← worker   the function raised: JSON {type, message, traceback, frames} — text,
                  never a pickled exception (which may not unpickle on the client)
=====  =========  ============================================================

Output written to file descriptors 1 and 2 directly (subprocesses, C code) arrives as
the channel's stderr. When stdin closes (the client went away: its process died, the
connection dropped) the worker kills its process group — the function and any children
it started — and exits at once.
"""

import json
import os
import signal
import struct
import sys
import threading
import traceback

HEADER = struct.Struct(">cQQ")
HELLO, NEED, ZIP, CALL, INTERRUPT = b"H", b"N", b"Z", b"C", b"I"
DEFINE, CHUNK = b"D", b"M"
ACK, STDOUT, STDERR, VALUE, ERROR = b"A", b"O", b"R", b"V", b"E"
MAX_FRAME = 1 << 40


class Channel(object):
    """Framed reads and writes over two binary file objects; writes are locked."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self.lock = threading.Lock()
        self.pid = os.getpid()

    def send(self, kind, call_id, data=b""):
        if os.getpid() != self.pid:  # a forked child must never speak for the worker
            os._exit(0)
        with self.lock:
            self.writer.write(HEADER.pack(kind, call_id, len(data)) + data)
            self.writer.flush()

    def _read_exactly(self, n):
        parts, got = [], 0
        while got < n:
            chunk = self.reader.read(min(n - got, 1 << 20))
            if not chunk:
                return None
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def recv(self):
        """The next ``(kind, call id, data)``, or ``None`` at end of input."""
        head = self._read_exactly(HEADER.size)
        if head is None:
            return None
        kind, call_id, n = HEADER.unpack(head)
        if n > MAX_FRAME:
            raise ValueError("frame of %d bytes: the stream is corrupt" % n)
        data = self._read_exactly(n)
        if data is None:
            return None
        return kind, call_id, data


class Output(object):
    """``sys.stdout``/``sys.stderr`` for the function: text goes out as frames of the
    current call (whole lines as they are printed; the rest on flush)."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, chan, kind, call_id):
        self.chan, self.kind, self.call_id = chan, kind, call_id
        self.buf = []

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError("write() argument must be str, not %s" % type(s).__name__)
        self.buf.append(s)
        if "\n" in s:
            self.flush()
        return len(s)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        if self.buf:
            text, self.buf = "".join(self.buf), []
            self.chan.send(self.kind, self.call_id, text.encode("utf-8", "replace"))

    def isatty(self):
        return False

    def writable(self):
        return True

    def fileno(self):  # C code and subprocess want a real descriptor: the channel's stderr
        return 2


class State(object):
    """What the main thread is running, shared with the reader thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.current = None     # call id of the running call
        self.in_call = False    # SIGINT raises only while the function runs
        self.calls = []         # queued (call id, blob)
        self.ready = threading.Condition(self.lock)
        self.closed = False


def kill_group_and_exit(code):
    """Kill everything this worker started (its process group), then exit."""
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    except OSError:
        pass
    os._exit(code)


def reader(chan, state, main_ident):
    """Reader thread: queue calls, deliver interrupts, die with the client."""
    while True:
        try:
            frame = chan.recv()
        except (OSError, ValueError):
            frame = None
        if frame is None:  # the client is gone: nothing must outlive it
            kill_group_and_exit(0)
        kind, call_id, data = frame
        if kind in (CALL, CHUNK, DEFINE):
            with state.lock:
                state.calls.append((kind, call_id, data))
                state.ready.notify()
        elif kind == INTERRUPT:
            grace = float(data or b"3")
            with state.lock:
                running = state.current == call_id and state.in_call
            if running:
                signal.pthread_kill(main_ident, signal.SIGINT)
                timer = threading.Timer(grace, hard_stop, args=(state, call_id))
                timer.daemon = True
                timer.start()


def hard_stop(state, call_id):
    """The function ignored the interrupt for the whole grace period."""
    with state.lock:
        still = state.current == call_id
    if still:
        kill_group_and_exit(1)


def error_info(exc):
    """The error as text: type, message, the formatted traceback, and its frames
    (file, line, function, source line or None) so that the client can show the source
    lines of by-value code it has and the host has not."""
    kind = type(exc)
    name = kind.__name__ if kind.__module__ in ("builtins", "exceptions") else \
        "%s.%s" % (kind.__module__, getattr(kind, "__qualname__", kind.__name__))
    frames = [[f.filename, f.lineno, f.name, f.line or None]
              for f in traceback.extract_tb(exc.__traceback__)]
    return {"type": name, "message": str(exc), "traceback": traceback.format_exc(),
            "frames": frames}


def error_frame(exc):
    return json.dumps(error_info(exc)).encode()


def run_chunk(fn, items):
    """``fn(item)`` for each item: ``(values, errors)`` — the values in order (``None``
    where an item failed) and ``{offset: error as text}`` for the items that raised. An
    interrupt (KeyboardInterrupt) stops the whole chunk."""
    values, errors = [], {}
    append = values.append
    for item in items:
        try:
            append(fn(item))
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - this item's error, as text
            errors[len(values)] = error_info(exc)
            append(None)
    return values, errors


def load_cloudpickle(chan, want, cache):
    """Import cloudpickle ``want``: the host's own, the cached copy, or one the client
    sends (unpacked next to the cache atomically: concurrent workers may race)."""
    if os.path.isdir(cache):
        sys.path.insert(0, cache)
    try:
        import cloudpickle
        if cloudpickle.__version__ == want:
            return cloudpickle
    except ImportError:
        pass
    chan.send(NEED, 0)
    frame = chan.recv()
    if frame is None:
        os._exit(0)
    import io
    import shutil
    import tempfile
    import zipfile
    parent = os.path.dirname(cache)
    try:  # several workers of one host may start at once: never fail on a race
        os.makedirs(parent, mode=0o700)
    except OSError:
        if not os.path.isdir(parent):
            raise
    tmp = tempfile.mkdtemp(dir=parent)
    zipfile.ZipFile(io.BytesIO(frame[2])).extractall(tmp)
    try:
        os.rename(tmp, cache)
    except OSError:  # another worker won the race: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    if cache not in sys.path:
        sys.path.insert(0, cache)
    for name in [m for m in sys.modules if m == "cloudpickle" or m.startswith("cloudpickle.")]:
        del sys.modules[name]
    import cloudpickle
    return cloudpickle


SHIPS_WITH = ("gpus",)  # travels as fabfleet_gpus (see fabfleet.ssh.launch)
_gpu_lock = []  # the descriptor holding this worker's GPU, for the worker's lifetime


def pin_gpu(options):
    """On a host with GPUs, hold one free GPU for this worker's lifetime (the queue's
    machine-wide lock) and make it the only one CUDA sees. ``(uuid or None, busy)``:
    ``busy`` when the host has GPUs but none is free."""
    import shutil
    if shutil.which("nvidia-smi") is None:
        return None, False
    import fabfleet_gpus
    gpus = fabfleet_gpus.smi("gpu", "index,uuid")
    if not gpus:
        return None, False  # no GPU, or nvidia-smi fails: nothing to pin
    got, fds = fabfleet_gpus.claim(1, options.get("allowed", "all"), options.get("slots", 1),
                                   options.get("max_memory_mib", 1024))
    if not got:
        return None, True
    _gpu_lock.extend(fds)
    os.environ["CUDA_VISIBLE_DEVICES"] = got[0][1]
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return got[0][1], False


def dumps_value(value, cloudpickle, pickle):
    """The value's pickle: the standard pickler's when it can (a plain value costs it
    a microsecond, cloudpickle twenty; it refuses anything it would only find by a name
    that is not this very object), else cloudpickle's (lambdas, classes sent by value)."""
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - PicklingError, AttributeError, TypeError, …
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def main(argv):
    want, cache = argv[0], os.path.expanduser(argv[1])
    options = json.loads(argv[3]) if len(argv) > 3 else {}
    ack = options.get("ack", True)
    gpu, gpu_busy = pin_gpu(options)
    try:  # lead a process group of our own: what kill_group_and_exit kills is ours alone
        if os.getpgid(0) != os.getpid():
            os.setpgid(0, 0)
    except OSError:
        pass
    # The protocol owns the original stdin/stdout; the function gets /dev/null and
    # writes to descriptor 1 land on stderr, so nothing can corrupt a frame.
    chan = Channel(os.fdopen(os.dup(0), "rb", buffering=0), os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    cloudpickle = load_cloudpickle(chan, want, cache)
    import pickle
    import platform
    chan.send(HELLO, 0, json.dumps({
        "python": list(sys.version_info[:3]), "implementation": platform.python_implementation(),
        "executable": sys.executable, "pid": os.getpid(),
        "cloudpickle": cloudpickle.__version__, "gpu": gpu, "gpu_busy": gpu_busy}).encode())

    state = State()

    def on_sigint(signum, frame):
        if state.in_call:
            raise KeyboardInterrupt
    signal.signal(signal.SIGINT, on_sigint)
    t = threading.Thread(target=reader, args=(chan, state, threading.current_thread().ident))
    t.daemon = True
    t.start()

    functions = {}  # id -> function, for map chunks (kept: sent once per worker)
    while True:
        with state.lock:
            while not state.calls:
                state.ready.wait()
            kind, call_id, blob = state.calls.pop(0)
            if kind == DEFINE:
                functions[call_id] = blob  # unpickled on first use, in the call's context
                continue
            state.current = call_id
        if ack:  # from here on the call may have effects
            chan.send(ACK, call_id)
        out, err = Output(chan, STDOUT, call_id), Output(chan, STDERR, call_id)
        try:
            if kind == CHUNK:
                fn_id, items = pickle.loads(blob)
                fn = functions[fn_id]
                if isinstance(fn, bytes):
                    fn = functions[fn_id] = pickle.loads(fn)
                fn, args, kwargs = run_chunk, (fn, items), {}
            else:
                fn, args, kwargs = pickle.loads(blob)
            blob = None
            sys.stdout, sys.stderr = out, err
            try:
                state.in_call = True
                value = fn(*args, **kwargs)
            finally:
                state.in_call = False
                if os.getpid() != chan.pid:  # a forked child returned here: vanish
                    os._exit(0)
                sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
                out.flush()
                err.flush()
            reply = (VALUE, dumps_value(value, cloudpickle, pickle))
        except BaseException as exc:  # noqa: BLE001 - everything goes back as text
            if os.getpid() != chan.pid:
                os._exit(0)
            reply = (ERROR, error_frame(exc))
        with state.lock:
            state.current = None
        chan.send(reply[0], call_id, reply[1])


if __name__ == "__main__":
    main(sys.argv[1:])
