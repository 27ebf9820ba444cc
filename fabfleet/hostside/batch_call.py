"""A pickled call run as a batch job (a login node's ``run_payload``, ``@remote``, map).

The client uploads into the run dir (0700): this file, the payload worker's source as
``fabfleet_worker.py`` (its error and chunk helpers), the local cloudpickle as
``cloudpickle.zip`` and the call as ``call.bin``. The runner in the job runs this with the
env's Python in the project's dir; the outcome lands in ``result`` atomically: ``V`` +
the pickled value, or ``E`` + the error as JSON (type, message, traceback, frames), as
the worker sends them.
"""

import os
import pickle
import sys

SHIPS_WITH = ("worker",)  # uploaded next to this file as fabfleet_worker.py


def main(run_dir):
    sys.path.insert(0, os.path.join(run_dir, "cloudpickle.zip"))
    import cloudpickle
    import fabfleet_worker as worker
    with open(os.path.join(run_dir, "call.bin"), "rb") as f:
        kind, define, blob, client = pickle.load(f)
    try:
        if tuple(client[:3]) != (sys.implementation.name,) + tuple(sys.version_info[:2]):
            raise RuntimeError(  # pickled code loads only on the same major.minor
                "this compute node runs %s %d.%d (%s), the client %s %d.%d: pickled functions "
                "only load on the same Python; point `python:` (or the env in `setup:`) at "
                "a matching interpreter" % ((sys.implementation.name,) + tuple(sys.version_info[:2])
                                            + (sys.executable,) + tuple(client[:3])))
        if kind == "chunk":  # map items: fn(item) each, per item a value or an error
            fn = pickle.loads(define)
            _, items = pickle.loads(blob)
            value = worker.run_chunk(fn, items)
        else:
            fn, args, kwargs = pickle.loads(blob)
            value = fn(*args, **kwargs)
        out = b"V" + cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:  # noqa: BLE001 - everything goes back as text
        out = b"E" + worker.error_frame(exc)
    path = os.path.join(run_dir, "result")
    with open(path + ".tmp", "wb") as f:
        f.write(out)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)
    sys.stdout.flush()
    return 0 if out[:1] == b"V" else 1


if __name__ == "__main__":
    sys.exit(main(os.environ["FABFLEET_RUN_DIR"]))
