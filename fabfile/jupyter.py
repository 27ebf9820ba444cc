"""Jupyter on a host: started as a detached job in the host's env and project, reached
through a tunnel over the verified connection.

The token is made here and reaches the server through a 0600 file in the project's run
dir (read by the job's runner, then deleted), never on a command line; the server's
port is a free one on the host, and the server only listens on the host's loopback.
A second call for the same host and project reconnects to the server already running.
"""

from __future__ import annotations

import io
import json
import secrets
import tempfile
import time
from pathlib import Path

from . import shell
from .connection import watched
from .errors import CommandError, LocalError, host_errors
from .execute import execute
from .inventory import Host
from .jobs import Job, list_jobs, start_job
from .project import layout
from .transfer import sftp_client
from .tunnel import Tunnel

TAG = "jupyter"
APPS = (("lab", "jupyterlab"), ("notebook", "notebook"), ("server", "jupyter_server"))

LAUNCHER = '''\
"""Started by `fabfleet jupyter` as a detached job: records where the server listens
(0600, in the run dir), then becomes the Jupyter server (same pid)."""
import json, os, sys
port, app = int(sys.argv[1]), sys.argv[2]
path = os.path.join(os.environ["FABFLEET_RUN_DIR"], "jupyter.json")
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(fd, json.dumps({"port": port, "app": app, "token": os.environ["JUPYTER_TOKEN"]}).encode())
os.close(fd)
os.execv(sys.executable, [sys.executable, "-m", "jupyter", app, "--no-browser",
                          "--ip=127.0.0.1", "--port=%d" % port, "--ServerApp.port_retries=0"])
'''

PROBE = '''\
import importlib.util, socket, sys
apps = [a for a, mod in %r if importlib.util.find_spec(mod) is not None]
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
print(apps[0] if apps else "none", port)
''' % (APPS,)

WAIT = '''\
import json, os, sys
pid = int(sys.argv[1])
try:
    from jupyter_core.paths import jupyter_runtime_dir
    path = os.path.join(jupyter_runtime_dir(), "jpserver-%d.json" % pid)
except ImportError:
    path = None
try:
    os.kill(pid, 0)
except OSError:
    print("DEAD"); sys.exit()
print(open(path).read() if path and os.path.exists(path) else "WAIT")
'''


def _python(c, code: str, *args: str, project: str | None = None, action: str) -> str:
    host: Host = c.fleet_host
    result = execute(c, shell.sh(shell.env_prefix(host, project) + f"exec {shell.q(host.python)}"
                                 f" -c {shell.q(code)} " + shell.join(args)),
                     timeout=60, action=action)
    if result.exit_code != 0:
        raise CommandError(host.name, f"could not {action}: {result.stderr.strip()[-500:]}",
                           exit_code=result.exit_code, stderr=result.stderr)
    return result.stdout.strip()


def running_server(c, project: str) -> tuple[Job, dict] | None:
    """The Jupyter job of ``project`` already running on the host, with its port/token."""
    for entry in reversed(list_jobs(c, project)):
        if entry.get("tag") == TAG and entry["status"] == "running":
            out = execute(c, shell.sh(f"cat -- {shell.path(entry['run_dir'])}/jupyter.json"),
                          timeout=30, action="read the Jupyter job's info")
            if out.exit_code == 0:
                return Job(c.fleet_host, entry["run_id"], entry), json.loads(out.stdout)
    return None


def start_server(c, project: str, cwd: str = "", timeout: float = 90.0) -> tuple[Job, dict]:
    """Start Jupyter (lab, else notebook, else jupyter_server) as a detached job and wait
    for the server's own info file. Raises :class:`CommandError` with the install line
    when the host's env has no Jupyter."""
    host: Host = c.fleet_host
    app, port = _python(c, PROBE, project=project, action="look for Jupyter").split()
    if app == "none":
        raise CommandError(host.name, "Jupyter is not installed in the host's env. Add "
                           "`jupyterlab` to a requirements.txt and run `fabfleet setup-workdir "
                           f"-H {host.name} --requirements requirements.txt`, or install it "
                           f"there: `{host.python} -m pip install jupyterlab`.")
    token = secrets.token_urlsafe(32)
    lay = layout(host, project)
    env_file = f"{lay['runs']}/.env-{secrets.token_hex(8)}.json"
    mk = shell.path(lay["runs"])
    execute(c, shell.sh(f"mkdir -p -- {mk} && chmod 700 -- {mk}"), timeout=30,
            action="prepare the run dir")
    with watched(c, "send the Jupyter token"), host_errors(host.name, "send the Jupyter token"):
        sftp = sftp_client(c)
        sftp.putfo(io.BytesIO(json.dumps({"JUPYTER_TOKEN": token}).encode()),
                   shell.home_relative(env_file))
        sftp.chmod(shell.home_relative(env_file), 0o600)
    with tempfile.TemporaryDirectory() as d:
        launcher = Path(d) / "fabfleet_jupyter.py"
        launcher.write_text(LAUNCHER)
        job = start_job(c, launcher, [port, app], project=project, cwd=cwd, env_file=env_file,
                        tag=TAG)
    deadline = time.monotonic() + timeout
    while True:
        out = _python(c, WAIT, str(job.record["pid"]), project=project,
                      action="wait for the Jupyter server")
        if out == "DEAD":
            err = job.logs(stream="stderr")["data"].decode("utf-8", "replace").strip()
            raise CommandError(host.name, f"Jupyter exited before it was ready:\n{err[-1500:]}")
        if out != "WAIT":
            info = json.loads(out)
            return job, {"port": int(info.get("port", port)), "token": token, "app": app}
        if time.monotonic() > deadline:
            job.kill()
            raise CommandError(host.name, f"Jupyter did not start within {timeout:g}s; it "
                               "was stopped. Look at `fabfleet logs RUN_ID --stderr`.")
        time.sleep(0.5)


def open_jupyter(c, project: str, *, cwd: str = "", local_port: int = 0,
                 on_event=None) -> tuple[Tunnel, str, Job, bool]:
    """Reconnect to the project's running server on the host, or start one; then tunnel.
    Returns ``(tunnel, url, job, reused)``; close the tunnel when done (the server keeps
    running as a job: ``fabfleet kill`` stops it)."""
    found = running_server(c, project)
    reused = found is not None
    job, info = found if found else start_server(c, project, cwd)
    if not info.get("token"):
        raise LocalError("the running Jupyter job has no token on record; kill it and start "
                         "again")
    tunnel = Tunnel(c, info["port"], local_port, on_event=on_event).start()
    path = "lab" if info.get("app") == "lab" else "tree" if info.get("app") == "notebook" \
        else "api/status"
    url = f"http://127.0.0.1:{tunnel.local_port}/{path}?token={info['token']}"
    return tunnel, url, job, reused
