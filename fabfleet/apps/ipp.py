"""Hand the fleet to ipyparallel: a controller on one host, engines on every host (one per
``max_jobs`` slot; one per free GPU, pinned, on GPU hosts), as fabfleet jobs, and an
``ipyparallel.Client`` here through tunnels over the verified SSH connection. Needs
``pip install 'fabfleet[ipyparallel]'`` locally and the same ipyparallel in each host's
env (``fabfleet setup-workdir --requirements``).

* **preflight** (one round trip per host, before anything starts): Python major.minor,
  ipyparallel and cloudpickle at the local versions, pyzmq/jupyter_client/ipykernel there;
* **start**: the project is pushed (engines run in it: its modules import); a private
  dir (0700) per host, ``<runs>/.ipp-<token>``; the controller as a job on the first
  selected host (or ``controller_host``) listening on that host's inventory address;
  its connection files (0600, in that dir) are read back and the engines' one is sent
  (0600, over SFTP) to each host, where one job runs that host's engines;
* **secure by default**: every socket of the controller speaks CurveZMQ with the
  controller's own key pair, and messages carry ipyparallel's HMAC key: without the
  0600 connection file no one — another user of a host, anyone on the network — can
  register an engine, attach a client, or subscribe to what the engines publish
  (output, results); nothing secret is on a command line;
* **reach**: the client's connection info is rewritten to local tunnels (one per client
  channel, over the one connection to the controller's host): only SSH needs to be open
  to the laptop. Engines and the controller talk directly, at the controller host's
  inventory address: hosts must reach each other there;
* **nothing left behind**: :meth:`IppCluster.stop` (leaving the ``with`` block,
  ``ipp-down``) stops engines then the controller and removes the private dirs; engines
  whose controller is gone stop by themselves after :data:`MISSES` missed heartbeats.

Results are unpickled here: that trusts the hosts (the README says so).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..config.deadlines import APP_START, QUICK_COMMAND
from ..config.inventory import Host
from ..config.settings import layout
from ..errors import CommandError, HostError, LocalError
from ..host.jobs import Job, list_jobs, start_job
from ..hostside import ipp_app
from ..ssh import shell
from ..ssh.connect import connect
from ..ssh.exec import execute
from ..ssh.launch import file_of, shipped_with
from ..ssh.tunnel import Tunnel
from . import handoff

REQUIRED = ("ipyparallel", "cloudpickle")             # must match exactly
ALSO = ("pyzmq", "jupyter_client", "ipykernel")       # must be there
TAG_CONTROLLER, TAG_ENGINES = "ipp-controller", "ipp-engines"
#: heartbeats (3 s apart) an engine may miss before the controller drops it, and the
#: controller's (3.5 s apart) before an engine stops itself
MISSES = 5
#: the controller's sockets a client connects to (ports in its connection file)
CLIENT_CHANNELS = ("registration", "control", "mux", "task", "iopub", "notification",
                   "broadcast")


def preflight(conns: dict[str, object], project: str) -> dict[str, dict]:
    """The hosts' versions against the local ones, before anything starts (see
    :func:`fabfleet.apps.handoff.preflight`)."""
    if handoff.local_versions(["ipyparallel"])["ipyparallel"] is None:
        raise LocalError("ipyparallel is not installed here: pip install "
                         "'fabfleet[ipyparallel]'")
    return handoff.preflight(conns, project, required=REQUIRED, also=ALSO,
                             framework="ipyparallel")


def local_connection_info(info: dict, ports: dict[str, int]) -> dict:
    """The controller's client connection info with every channel moved to a local
    tunnel port (pure)."""
    out = {k: v for k, v in info.items() if k not in CLIENT_CHANNELS}
    out.update(ports, interface="tcp://127.0.0.1", location="127.0.0.1", ssh="")
    return out


class IppCluster:
    """A controller and engines on hosts, as fabfleet jobs; see the module docstring.

    ``with cluster as rc:`` starts it and yields a client; leaving the block closes the
    client and stops everything. In a notebook, where a block cannot span cells:
    ``rc = cluster.open()`` … ``cluster.close()``. ``IppCluster.attach(hosts, project=…)``
    reaches a cluster started by ``fabfleet ipp-up`` instead (closing it then leaves the
    cluster running)."""

    def __init__(self, hosts: Sequence[Host], *, project: str,
                 project_root: str | Path | None = None, push: bool = True,
                 controller_host: str | None = None, start_timeout: float = APP_START,
                 engine_timeout: float = 60.0) -> None:
        self.hosts, self.controller_name = handoff.service_host(
            hosts, controller_host, "controller_host", "ipyparallel")
        self.project = project
        self.project_root = Path(project_root) if project_root else None
        self.push = push and self.project_root is not None
        self.start_timeout, self.engine_timeout = start_timeout, engine_timeout
        self.conns = {h.name: connect(h) for h in self.hosts}
        self.token = secrets.token_hex(8)
        self.jobs: list[Job] = []
        self.dirs: dict[str, str] = {}       # host -> its private dir
        self.info: dict | None = None        # the controller's client connection info
        self.listen: str | None = None       # the address the controller listens on
        self.engines: dict[str, int] = {}    # host -> engines started there
        self.tunnels: list[Tunnel] = []
        self.rc = None
        self.attached = False
        #: a local copy of the rewritten connection info (see :meth:`connection_info`)
        self.connection_file: str | None = None

    # -- starting ------------------------------------------------------------------
    def start(self) -> IppCluster:
        preflight(self.conns, self.project)
        if self.push:
            handoff.push_project(self.conns, self.project_root, self.project)
        name = f".ipp-{self.token}"
        cc = self.conns[self.controller_name]
        where = handoff.private_dir(cc, self.project, name, {}, what="ipyparallel files")
        self.dirs[self.controller_name] = where
        job = start_job(cc, file_of(ipp_app),
                        ["controller", where, cc.fleet_host.hostname or cc.host, str(MISSES)],
                        project=self.project, tag=TAG_CONTROLLER)
        self.jobs.append(job)
        security = f"{where}/profile/security"
        engine_file = handoff.wait_for_file(cc, job, f"{security}/ipcontroller-engine.json",
                                            self.start_timeout, "ipyparallel controller")
        self.info = json.loads(handoff.wait_for_file(
            cc, job, f"{security}/ipcontroller-client.json", QUICK_COMMAND,
            "ipyparallel controller"))
        self.listen = self.info["interface"].split("://", 1)[1]
        files = {"engine.json": engine_file,
                 **{f"{n}.py": text.encode() for n, text in shipped_with(ipp_app).items()}}
        started = []
        for hname, c in self.conns.items():
            host: Host = c.fleet_host
            self.dirs[hname] = handoff.private_dir(c, self.project, name, files,
                                                   what="ipyparallel files")
            opts = json.dumps({"allowed": host.gpus, "slots": host.tasks_per_gpu})
            ejob = start_job(c, file_of(ipp_app), ["engines", self.dirs[hname],
                                                   str(host.max_jobs), opts, str(MISSES)],
                             project=self.project, tag=TAG_ENGINES)
            self.jobs.append(ejob)
            started.append((hname, c, ejob))
        for hname, c, ejob in started:
            plan = handoff.wait_for_json(c, ejob, f"{ejob.record['run_dir']}/engines.json",
                                         QUICK_COMMAND, "ipyparallel engines")
            self.engines[hname] = int(plan["count"])
        for hname, count in self.engines.items():
            if count == 0:  # a GPU box whose GPUs are all someone else's
                raise CommandError(hname, "every GPU of the host is in use by other "
                                   "processes (see `fabfleet top`): no engine could start "
                                   "there, so the cluster was not started. Wait for a free "
                                   "GPU, or leave the host out.")
        return self

    @classmethod
    def attach(cls, hosts: Sequence[Host], *, project: str, **options) -> IppCluster:
        """The cluster of ``project`` running on ``hosts`` (started by ``ipp-up``), ready
        for :meth:`client`; :meth:`close` then leaves it running."""
        self = cls(hosts, project=project, push=False, **options)
        self.attached = True
        for hname, c in self.conns.items():
            for entry in list_jobs(c, project):
                if entry["status"] != "running" or entry.get("tag") not in (TAG_CONTROLLER,
                                                                           TAG_ENGINES):
                    continue
                if entry["tag"] == TAG_ENGINES:
                    plan = _read_json(c, f"{entry['run_dir']}/engines.json")
                    self.engines[hname] = self.engines.get(hname, 0) + int(plan["count"])
                elif self.info is None:
                    self.controller_name = hname
                    ctl = _read_json(c, f"{entry['run_dir']}/controller.json")
                    self.info = _read_json(c, f"{ctl['dir']}/profile/security/"
                                              "ipcontroller-client.json")
                    self.listen = self.info["interface"].split("://", 1)[1]
        if self.info is None:
            self.close()
            raise LocalError(f"no ipyparallel controller of project {project!r} is running "
                             f"on {', '.join(self.conns)}: start one with `fabfleet ipp-up`")
        return self

    # -- reaching it ---------------------------------------------------------------
    @property
    def n_engines(self) -> int:
        return sum(self.engines.values())

    def connection_info(self) -> dict:
        """The client connection info, rewritten to local tunnels (opened on first use;
        also written, 0600 in a private dir, to :attr:`connection_file` for other
        clients on this machine while the tunnels stay open)."""
        if not self.tunnels:
            cc = self.conns[self.controller_name]
            for channel in CLIENT_CHANNELS:
                self.tunnels.append(Tunnel(cc, int(self.info[channel]),
                                           remote_host=self.listen).start())
        info = local_connection_info(self.info, dict(zip(
            CLIENT_CHANNELS, (t.local_port for t in self.tunnels))))
        if self.connection_file is None:
            private = tempfile.mkdtemp(prefix="fabfleet-ipp-")  # 0700
            path = os.path.join(private, "ipcontroller-client.json")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            self.connection_file = path
        return info

    def client(self, timeout: float | None = None):
        """An ``ipyparallel.Client`` over the tunnels, once every engine has registered
        (or ``timeout`` passes: then an error naming the hosts whose engines are missing)."""
        import ipyparallel
        timeout = self.engine_timeout if timeout is None else timeout
        rc = ipyparallel.Client(self.connection_info(), timeout=timeout)
        try:
            rc.wait_for_engines(self.n_engines, timeout=timeout, interactive=False)
        except TimeoutError:
            have = len(rc.ids)
            rc.close()
            raise CommandError(self.controller_name, f"only {have} of {self.n_engines} "
                               f"ipyparallel engines registered within {timeout:g}s"
                               f"{self._why_missing()}; see `fabfleet jobs` and `fabfleet "
                               "logs RUN_ID --host HOST --stderr`") from None
        rc.fabfleet_cluster = self
        self.rc = rc
        return rc

    def _why_missing(self) -> str:
        notes = []
        for job in self.jobs[1:]:
            try:
                state = job.status()
            except HostError as exc:
                notes.append(f"{job.host.name}: {exc}")
                continue
            if state["status"] != "running":
                err = job.logs(stream="stderr")["data"].decode("utf-8", "replace")
                notes.append(f"{job.host.name}: the engines exited ({state['status']}, code "
                             f"{state['exit_code']}): {err.strip()[-400:]}")
        return (" (" + "; ".join(notes) + ")") if notes else ""

    def open(self):
        """Start the cluster (unless attached) and return its client."""
        if not self.attached and not self.jobs:
            try:
                self.start()
            except BaseException:
                self.stop()
                raise
        try:
            return self.client()
        except BaseException:
            self.close()
            raise

    # -- stopping ------------------------------------------------------------------
    def close(self) -> None:
        """Close the client and the tunnels; stop the cluster unless attached."""
        if self.rc is not None:
            self.rc.close()
            self.rc = None
        if self.attached:
            self._close_tunnels()
            for c in self.conns.values():
                c.close()
        else:
            self.stop()

    def _close_tunnels(self) -> None:
        for t in self.tunnels:
            t.close()
        self.tunnels.clear()
        if self.connection_file is not None:
            shutil.rmtree(os.path.dirname(self.connection_file), ignore_errors=True)
            self.connection_file = None

    def stop(self) -> None:
        """Stop every engine, then the controller; remove the private dirs."""
        self._close_tunnels()
        try:
            handoff.stop_jobs(self.jobs, "ipyparallel")
        finally:
            for hname, where in self.dirs.items():
                handoff.remove_private_dir(self.conns[hname], where, "ipyparallel files")
            for c in self.conns.values():
                c.close()

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def _read_json(c, path: str) -> dict:
    out = execute(c, shell.sh(f"cat -- {shell.path(path)}"), timeout=QUICK_COMMAND,
                  action="read the ipyparallel cluster's files")
    if out.exit_code != 0:
        raise CommandError(c.fleet_host.name, f"could not read {path}: "
                           f"{out.stderr.strip()[-300:]}")
    return json.loads(out.stdout)


def stop_project_clusters(c, project: str) -> list[str]:
    """``ipp-down`` on one host: stop ``project``'s engines and controller there and
    remove their private dirs."""
    stopped = handoff.stop_project_jobs(c, project, (TAG_ENGINES, TAG_CONTROLLER))
    runs = shell.path(layout(c.fleet_host, project)["runs"])
    execute(c, shell.sh(f"rm -rf -- {runs}/.ipp-*"), timeout=QUICK_COMMAND,
            action="remove the ipyparallel files")
    return stopped
