"""Jupyter on a host, for ``fabfleet jupyter``.

``find``: prints the first installed app of lab, notebook, server (or ``none``) and a
free port on the host's loopback.
``launch PORT APP`` (a detached job's script): records where the server will listen in
``$FABFLEET_RUN_DIR/jupyter.json`` (0600; the token comes in the job's env file, never
on a command line), then becomes the Jupyter server (same pid), on 127.0.0.1 only.
``wait PID``: prints the server's own runtime info file once it exists, ``WAIT`` before,
``DEAD`` when the process is gone.
"""

import importlib.util
import json
import os
import socket
import sys

APPS = (("lab", "jupyterlab"), ("notebook", "notebook"), ("server", "jupyter_server"))


def find():
    apps = [a for a, mod in APPS if importlib.util.find_spec(mod) is not None]
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    print(apps[0] if apps else "none", port)


def launch(port, app):
    path = os.path.join(os.environ["FABFLEET_RUN_DIR"], "jupyter.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, json.dumps({"port": int(port), "app": app,
                             "token": os.environ["JUPYTER_TOKEN"]}).encode())
    os.close(fd)
    os.execv(sys.executable, [sys.executable, "-m", "jupyter", app, "--no-browser",
                              "--ip=127.0.0.1", "--port=%d" % int(port),
                              "--ServerApp.port_retries=0"])


def wait(pid):
    pid = int(pid)
    try:
        from jupyter_core.paths import jupyter_runtime_dir
        path = os.path.join(jupyter_runtime_dir(), "jpserver-%d.json" % pid)
    except ImportError:
        path = None
    try:
        os.kill(pid, 0)
    except OSError:
        print("DEAD")
        return
    if path and os.path.exists(path):
        with open(path) as f:
            print(f.read())
    else:
        print("WAIT")


COMMANDS = {"find": find, "launch": launch, "wait": wait}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
