"""Jupyter on a host: started as a detached job in the host's env and project, reached
through a tunnel over the verified connection.

The token is made here and reaches the server through a 0600 file in the project's run
dir (read by the job's runner, then deleted), never on a command line; the server's
port is a free one on the host, and the server only listens on the host's loopback.
A second call for the same host and project reconnects to the server already running.
"""

from __future__ import annotations

import json
import secrets
import time

from ..config.deadlines import APP_START, QUICK_COMMAND
from ..config.inventory import Host
from ..config.settings import layout
from ..errors import CommandError, LocalError, host_errors
from ..host.jobs import Job, list_jobs, start_job
from ..hostside import jupyter_app
from ..ssh import shell
from ..ssh.connect import sftp_client, sftp_put_private
from ..ssh.exec import execute
from ..ssh.launch import file_of, python_command
from ..ssh.liveness import watched
from ..ssh.tunnel import Tunnel

TAG = "jupyter"

def _jupyter(c, command: str, *args: str, project: str | None = None, action: str) -> str:
    """Run a :mod:`fabfleet.hostside.jupyter_app` sub-command in the host's env; its stdout."""
    host: Host = c.fleet_host
    result = execute(c, python_command(host, jupyter_app, [command, *args], project=project),
                     timeout=QUICK_COMMAND, action=action)
    if result.exit_code != 0:
        raise CommandError(host.name, f"could not {action}: {result.stderr.strip()[-500:]}",
                           exit_code=result.exit_code, stderr=result.stderr)
    return result.stdout.strip()


def running_server(c, project: str) -> tuple[Job, dict] | None:
    """The Jupyter job of ``project`` already running on the host, with its port/token."""
    for entry in reversed(list_jobs(c, project)):
        if entry.get("tag") == TAG and entry["status"] == "running":
            out = execute(c, shell.sh(f"cat -- {shell.path(entry['run_dir'])}/jupyter.json"),
                          timeout=QUICK_COMMAND, action="read the Jupyter job's info")
            if out.exit_code == 0:
                return Job(c.fleet_host, entry["run_id"], entry), json.loads(out.stdout)
    return None


def start_server(c, project: str, cwd: str = "", timeout: float = APP_START) -> tuple[Job, dict]:
    """Start Jupyter (lab, else notebook, else jupyter_server) as a detached job and wait
    for the server's own info file. Raises :class:`CommandError` with the install line
    when the host's env has no Jupyter."""
    host: Host = c.fleet_host
    app, port = _jupyter(c, "find", project=project, action="look for Jupyter").split()
    if app == "none":
        raise CommandError(host.name, "Jupyter is not installed in the host's env. Add "
                           "`jupyterlab` to a requirements.txt and run `fabfleet setup-workdir "
                           f"-H {host.name} --requirements requirements.txt`, or install it "
                           f"there: `{host.python} -m pip install jupyterlab`.")
    token = secrets.token_urlsafe(32)
    lay = layout(host, project)
    env_file = f"{lay['runs']}/.env-{secrets.token_hex(8)}.json"
    mk = shell.path(lay["runs"])
    made = execute(c, shell.sh(f"umask 077 && mkdir -p -- {mk} && chmod 700 -- {mk}"),
                   timeout=QUICK_COMMAND, action="prepare the run dir")
    if made.exit_code != 0:  # never send the token into a dir that is not private
        raise CommandError(host.name, f"could not make the private run dir {lay['runs']}: "
                           f"{made.stderr.strip()[-300:]}; the token was not sent. Check "
                           "that `work_dir` is writable and yours.", exit_code=made.exit_code,
                           stderr=made.stderr)
    with watched(c, "send the Jupyter token"), host_errors(host.name, "send the Jupyter token"):
        # 0600 from its creation, before it holds the token
        sftp_put_private(sftp_client(c), json.dumps({"JUPYTER_TOKEN": token}).encode(),
                         env_file)
    job = start_job(c, file_of(jupyter_app), ["launch", port, app], project=project, cwd=cwd,
                    env_file=env_file, tag=TAG)
    deadline = time.monotonic() + timeout
    while True:
        out = _jupyter(c, "wait", str(job.record["pid"]), project=project,
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
