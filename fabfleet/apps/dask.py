"""Hand the fleet to Dask: a scheduler and workers on the inventory's hosts, as fabfleet
jobs, reached through a tunnel. Needs ``pip install 'fabfleet[dask]'`` locally and the
same dask/distributed in each host's env (``fabfleet setup-workdir --requirements``).

* **preflight** (one round trip per host, before anything starts): Python major.minor
  and the versions of the packages Dask insists on, against the local ones;
* **start**: the scheduler on one host (the first selected, or ``scheduler_host``), then
  per host one job running ``max_jobs`` worker processes, each in the host's env with
  its ``env`` vars. All are detached jobs (``fabfleet jobs`` lists them, ``kill`` and
  ``dask-down`` stop them). The scheduler's address comes from its scheduler file. The
  scheduler has an idle timeout and the workers a death timeout, so nothing is orphaned
  if the laptop disappears;
* **reach**: the client talks to the scheduler through a tunnel over the verified SSH
  connection (the dashboard through another): only SSH needs to be open to the laptop.
  Workers and the scheduler talk directly, at the inventory's ``hostname`` of the
  scheduler host: hosts must reach each other there;
* **code**: the project is pushed first (incrementally) and the scheduler and workers run
  in it, so functions from the project's modules import there; functions defined in
  ``__main__`` or a notebook travel by value (Dask's own rule).

Dask's own protocol has no authentication: anyone who can reach the scheduler's port can
run code as the user. Bind it to an address only the fleet can reach.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..config.deadlines import APP_START
from ..config.inventory import Host
from ..errors import CommandError, LocalError
from ..host.jobs import Job, start_job
from ..hostside import dask_app
from ..ssh.connect import connect
from ..ssh.launch import file_of
from ..ssh.tunnel import Tunnel
from . import handoff

REQUIRED = ("dask", "distributed", "cloudpickle", "msgpack")  # must match exactly
ALSO = ("tornado", "toolz")                                     # must be there
TAG_SCHEDULER, TAG_WORKERS = "dask-scheduler", "dask-workers"


def preflight(conns: dict[str, object], project: str) -> dict[str, dict]:
    """Versions on every host (one round trip each) against the local ones; raises
    :class:`FanOutError` naming each host, package and the fix, before anything starts."""
    if handoff.local_versions(["distributed"])["distributed"] is None:
        raise LocalError("Dask is not installed here: pip install 'fabfleet[dask]'")
    return handoff.preflight(conns, project, required=REQUIRED, also=ALSO, framework="Dask")


class DaskCluster:
    """A scheduler and workers on hosts, as fabfleet jobs; see the module docstring."""

    def __init__(self, hosts: Sequence[Host], *, project: str,
                 project_root: str | Path | None = None, push: bool = True,
                 scheduler_host: str | None = None, idle_timeout: str = "1h",
                 death_timeout: str = "60s", start_timeout: float = APP_START,
                 tls: bool = True, credentials_dir: str | Path | None = None) -> None:
        self.hosts, self.scheduler_name = handoff.service_host(hosts, scheduler_host,
                                                               "scheduler_host", "Dask")
        self.project = project
        self.project_root = Path(project_root) if project_root else None
        self.push = push and self.project_root is not None
        self.idle_timeout, self.death_timeout = idle_timeout, death_timeout
        self.start_timeout = start_timeout
        self.conns = {h.name: connect(h) for h in self.hosts}
        self.jobs: list[Job] = []
        self.address = self.dashboard_port = None
        self.tunnels: list[Tunnel] = []
        self.tls = tls
        self.credentials: dict[str, bytes] | None = None
        self.local_tls: Path | None = None
        self.keep_credentials = credentials_dir is not None
        self.credentials_dir = credentials_dir
        self.tls_token = secrets.token_hex(8)
        self.remote_tls: dict[str, str] = {}

    def start(self) -> DaskCluster:
        preflight(self.conns, self.project)
        if self.push:  # scheduler and workers run in the pushed project: its modules import
            handoff.push_project(self.conns, self.project_root, self.project)
        tls_dirs = {name: "" for name in self.conns}
        if self.tls:
            self.credentials = cluster_credentials()
            tls_dirs = {name: handoff.private_dir(c, self.project, f".dask-tls-{self.tls_token}",
                                                  self.credentials, what="Dask certificates")
                        for name, c in self.conns.items()}
            self.remote_tls = tls_dirs
            if self.credentials_dir is not None:  # kept for clients after this process
                self.local_tls = Path(self.credentials_dir)
                self.local_tls.mkdir(mode=0o700, parents=True, exist_ok=True)
            else:
                self.local_tls = Path(tempfile.mkdtemp(prefix="fabfleet-dask-tls-"))
            for name, data in self.credentials.items():
                fd = os.open(self.local_tls / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
        sc = self.conns[self.scheduler_name]
        listen = sc.fleet_host.hostname or sc.host
        launcher = file_of(dask_app)
        job = start_job(sc, launcher, ["scheduler", listen, self.idle_timeout,
                                       tls_dirs[self.scheduler_name]],
                        project=self.project, tag=TAG_SCHEDULER)
        self.jobs.append(job)
        info = handoff.wait_for_json(sc, job, f"{job.record['run_dir']}/scheduler.json",
                                     self.start_timeout, "Dask scheduler")
        self.address = info["address"]
        self.dashboard_port = (info.get("services") or {}).get("dashboard")
        for name, c in self.conns.items():
            self.jobs.append(start_job(
                c, launcher, ["workers", self.address, str(c.fleet_host.max_jobs), name,
                              self.death_timeout, tls_dirs[name]], project=self.project,
                tag=TAG_WORKERS))
        return self

    @property
    def n_workers(self) -> int:
        return sum(h.max_jobs for h in self.hosts)

    def client(self, timeout: float = 60.0):
        """A ``distributed.Client`` over a tunnel to the scheduler, once every worker
        has joined (or ``timeout`` passes)."""
        from distributed import Client
        sc = self.conns[self.scheduler_name]
        # to the address the scheduler listens on (the host's inventory address, which
        # on a real host is not 127.0.0.1)
        where, _, port = self.address.split("://", 1)[-1].rpartition(":")
        t = Tunnel(sc, int(port), remote_host=where.strip("[]")).start()
        self.tunnels.append(t)
        client = Client(f"{'tls' if self.tls else 'tcp'}://127.0.0.1:{t.local_port}",
                        timeout=timeout, security=self.security())
        try:
            client.wait_for_workers(self.n_workers, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - say which hosts are missing
            joined = {w.get("name") for w in client.scheduler_info()["workers"].values()}
            client.close()
            raise CommandError(self.scheduler_name, f"only {len(joined)} of {self.n_workers} "
                               f"Dask workers joined within {timeout:g}s ({exc}); see "
                               "`fabfleet jobs` and `fabfleet logs RUN_ID --stderr`") from None
        return client

    def security(self):
        """The ``distributed.Security`` a client of this cluster needs (``None``
        without TLS): the cluster's CA and certificate, encryption required."""
        if not self.tls:
            return None
        from distributed import Security
        d = self.local_tls
        return Security(tls_ca_file=str(d / "ca.pem"), tls_client_cert=str(d / "cert.pem"),
                        tls_client_key=str(d / "key.pem"), require_encryption=True)

    def dashboard(self) -> str | None:
        """The dashboard's local URL (through a tunnel of its own)."""
        if not self.dashboard_port:
            return None
        t = Tunnel(self.conns[self.scheduler_name], int(self.dashboard_port)).start()
        self.tunnels.append(t)
        return f"http://127.0.0.1:{t.local_port}/status"

    def stop(self) -> None:
        """Stop every job of this cluster (workers first) and close the tunnels."""
        for t in self.tunnels:
            t.close()
        try:
            handoff.stop_jobs(self.jobs, "Dask")
        finally:  # nothing of the cluster is left behind
            for name, where in self.remote_tls.items():
                handoff.remove_private_dir(self.conns[name], where, "Dask certificates")
            for c in self.conns.values():
                c.close()
            if self.local_tls is not None and not self.keep_credentials:
                import shutil
                shutil.rmtree(self.local_tls, ignore_errors=True)


@contextlib.contextmanager
def dask_cluster(hosts: Sequence[Host], *, project: str, **options) -> Iterator:
    """``with dask_cluster(hosts, project=…) as client:`` — a ``distributed.Client`` on
    a cluster started on ``hosts``; leaving the block closes it and stops every job."""
    cluster = DaskCluster(hosts, project=project, **options)
    try:
        cluster.start()
        client = cluster.client()
        try:
            client.fabfleet_cluster = cluster
            yield client
        finally:
            client.close()
    finally:
        cluster.stop()


def cluster_credentials(days: int = 30) -> dict[str, bytes]:
    """A new CA and one certificate signed by it, for one cluster's scheduler, workers
    and clients: ``{"ca.pem", "cert.pem", "key.pem"}`` (PEM). Made per cluster, so a
    certificate of one cluster opens no other."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fabfleet dask cluster CA")])
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fabfleet dask cluster")])

    def cert(subject, public_key, ca: bool):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
             .public_key(public_key).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                       ExtendedKeyUsageOID.CLIENT_AUTH]),
                                critical=False)
        return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    return {"ca.pem": cert(ca_name, ca_key.public_key(), True),
            "cert.pem": cert(name, key.public_key(), False),
            "key.pem": key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())}


def stop_project_clusters(c, project: str | None) -> list[str]:
    """Kill the Dask jobs (``dask-down``) of ``project`` on the host behind ``c``."""
    return handoff.stop_project_jobs(c, project, (TAG_WORKERS, TAG_SCHEDULER))
