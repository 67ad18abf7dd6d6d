"""A real local Kubernetes control plane: etcd and kube-apiserver, started the way envtest starts them.

No kubelet, no controller manager, no scheduler: objects are stored, validated
(OpenAPI and CEL from the CRDs, RBAC, admission webhooks) and watched exactly
as on a cluster, but nothing runs Pods, and nothing deletes a Namespace's
contents (the namespace controller is absent), which is why tests share one
control plane and tidy their objects up themselves.

The binaries are the pinned ones ``hack/setup.sh`` builds from the Go modules
in ``hack/kube`` and ``hack/etcd`` into ``.venv/bin``; :func:`find_binaries`
says how to get them when they are missing. Each :class:`ControlPlane` gets
fresh certificates (its own CA, a serving certificate, an admin client
certificate in ``system:masters``), a service-account issuer with its signing
keys, free loopback ports and its own data folder, removed by :meth:`stop`.

The control plane is synchronous on purpose: it is started once per test
session, by the demo and by ``shadowctl sim cluster``, and waiting for a
process is not work an event loop should share.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import httpx
import yaml

from shadowctl.kube import KubeClient
from shadowctl.policy.crd import crd
from shadowctl.sim.errors import SimError
from shadowctl.sim.knative import KnativeStandIn
from shadowctl.sim.kserve import KServeStandIn
from shadowctl.sim.pki import CertFiles, LocalCA, signing_key_pair

JSON = dict[str, Any]

# The upstream CRDs the control plane installs besides shadowctl's own, by name, from any YAML file
# of the CRD folder (hack/setup.sh copies Istio's, Knative's and Gateway API's files there from their Go modules).
UPSTREAM_CRDS = frozenset({
    "virtualservices.networking.istio.io",
    "destinationrules.networking.istio.io",
    "services.serving.knative.dev",
    "configurations.serving.knative.dev",
    "revisions.serving.knative.dev",
    "routes.serving.knative.dev",
    "httproutes.gateway.networking.k8s.io",
})
KSERVE_CRD = "inferenceservices.serving.kserve.io"
KSERVE_CRD_FILE = "kserve-inferenceservices.yaml"
SHARED_CRDS = Path(__file__).resolve().parents[2].parent / "shared" / "crds"
"""The checkout's ``../shared/crds``: where KServe's CRD comes from when the CRD folder lacks it (KServe is not
on the Go module proxy, so hack/setup.sh cannot pin and copy it). Installed only on request
(:meth:`LocalCluster.enable_kserve`): its 2 MB schema adds 5 to 25 s to the API server's start on two cores."""
SERVICE_CIDR = "10.0.0.0/24"

# What the API server's audit log records when it is on (``audit_log=``): every write to a route object or a
# ShadowPolicy (and its status) with the object sent and the object stored (who wrote what, from which
# resourceVersion, and the resourceVersion it got), Leases' writes as metadata (who held the lease when),
# everything else as metadata. Fault campaigns replay it (bench/faults); RequestReceived is left out (each
# request appears once, when its answer is complete).
AUDIT_POLICY: dict[str, Any] = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "RequestResponse", "verbs": ["create", "update", "patch", "delete"],
         "resources": [{"group": "networking.istio.io", "resources": ["virtualservices"]},
                       {"group": "gateway.networking.k8s.io", "resources": ["httproutes"]},
                       {"group": "serving.knative.dev", "resources": ["services"]},
                       {"group": "serving.kserve.io", "resources": ["inferenceservices"]},
                       {"group": "shadowctl.dev", "resources": ["shadowpolicies", "shadowpolicies/status"]}]},
        {"level": "Metadata"},
    ],
}
START_TIMEOUT = 90.0


class ControlPlaneError(SimError):
    """The local control plane cannot start or answer; the message says which part and why."""


@dataclass(frozen=True)
class Binaries:
    """Paths of the three programs of the local control plane."""

    etcd: Path
    kube_apiserver: Path
    kubectl: Path


def bin_dir() -> Path:
    """Where ``hack/setup.sh`` puts the binaries: beside this interpreter (``.venv/bin``), or ``$SHADOWCTL_KUBE_BIN``."""
    override = os.environ.get("SHADOWCTL_KUBE_BIN")
    return Path(override) if override else Path(sys.executable).parent


def find_binaries() -> Binaries:
    """The pinned etcd, kube-apiserver and kubectl; ControlPlaneError naming what is missing and how to get it."""
    folder = bin_dir()
    paths = {name: folder / name for name in ("etcd", "kube-apiserver", "kubectl")}
    missing = [name for name, path in paths.items() if not os.access(path, os.X_OK)]
    if missing:
        raise ControlPlaneError(
            f"missing {', '.join(missing)} in {folder}: run hack/setup.sh, which builds them from the Go modules "
            "pinned in hack/kube and hack/etcd (or set SHADOWCTL_KUBE_BIN to a folder that holds them)"
        )
    return Binaries(paths["etcd"], paths["kube-apiserver"], paths["kubectl"])


def default_crds_dir() -> Path:
    """The upstream CRDs: ``$SHADOWCTL_CRDS``, else the copy ``hack/setup.sh`` made from the Go module cache
    (``.venv/share/shadowctl/crds``), else the checkout's ``../shared/crds`` where that copy is absent."""
    override = os.environ.get("SHADOWCTL_CRDS")
    if override:
        return Path(override)
    installed = Path(sys.prefix) / "share" / "shadowctl" / "crds"
    return SHARED_CRDS if not installed.is_dir() and SHARED_CRDS.is_dir() else installed


def free_port() -> int:
    """A free TCP port on the loopback interface (the kernel's pick; a tiny race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _version_of(binary: Path, *args: str) -> str:
    try:
        out = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ControlPlaneError(f"cannot run {binary}: {exc}") from exc
    return out


@dataclass(frozen=True)
class Versions:
    """What the control plane runs, for reports: ``kube-apiserver v1.37.2``, ``etcd 3.6.16``."""

    kubernetes: str
    etcd: str

    def __str__(self) -> str:
        return f"kube-apiserver {self.kubernetes}, etcd {self.etcd}"


class ControlPlane:
    """etcd plus kube-apiserver on free loopback ports, CRDs installed; ``start()``, then ``stop()``.

    ``crds`` names the upstream CRD folder (default :func:`default_crds_dir`);
    the CRDs of :data:`UPSTREAM_CRDS` it holds are installed, with those in
    ``extra_crds`` files. With ``audit_log`` (a path outside the data folder, kept after :meth:`stop`) the
    API server writes its audit log there, one JSON event a line, by ``audit_policy`` (default
    :data:`AUDIT_POLICY`). shadowctl's own
    CRD comes from the model (:func:`shadowctl.policy.crd.crd`), so it is always
    the one the code expects.
    """

    def __init__(self, *, crds: Path | None = None, workdir: Path | None = None, extra_crds: Sequence[Path] = (),
                 audit_log: Path | None = None, audit_policy: dict[str, Any] | None = None) -> None:
        self.binaries = find_binaries()
        self.audit_log = audit_log
        self.audit_policy = audit_policy if audit_policy is not None else AUDIT_POLICY
        self.crds_dir = crds if crds is not None else default_crds_dir()
        self.extra_crds = tuple(extra_crds)
        self._own_workdir = workdir is None
        base = Path(os.environ.get("SHADOWCTL_CLUSTER_TMP", "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()))
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="shadowctl-cluster-", dir=base))
        self.pki_dir = self.workdir / "pki"
        self.etcd_port = 0
        self.port = 0
        self._procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.ca: LocalCA | None = None
        self.admin_cert: CertFiles | None = None
        self.versions = Versions("", "")
        self.installed_crds: list[str] = []

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """The API server's URL: ``https://127.0.0.1:<port>``."""
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start etcd, then kube-apiserver; wait until ready; install the CRDs. ControlPlaneError on failure."""
        try:
            self._make_pki()
            self._start_etcd()
            self._start_apiserver()
            with self.admin_client() as client:
                self._wait_ready(client)
                self._install_crds(client)
                self.versions = Versions(self._server_version(client), self._etcd_version())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop kube-apiserver, then etcd (SIGTERM, then SIGKILL after 10 s), and remove the data folder."""
        for _name, proc, _log in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self._procs.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> str | None:
        """None while both processes run, else which one ended and the tail of its log."""
        for name, proc, log in self._procs:
            if proc.poll() is not None:
                return f"{name} exited with status {proc.returncode}: {_tail(log)}"
        return None

    # ----------------------------------------------------------------- clients and kubeconfigs

    def admin_client(self, timeout: float = 30.0) -> httpx.Client:
        """A synchronous HTTP client authenticated as the admin (``system:masters``), for setup and tests."""
        assert self.ca is not None and self.admin_cert is not None, "start() first"
        context = ssl.create_default_context(cafile=str(self.ca.cert_file))
        context.load_cert_chain(str(self.admin_cert.cert), str(self.admin_cert.key))
        return httpx.Client(base_url=self.url, verify=context, timeout=timeout)

    def kubeconfig_dict(
        self, *, token: str | None = None, server: str | None = None, namespace: str = "default", user: str = "admin"
    ) -> JSON:
        """A kubeconfig for the admin certificate, or for a bearer ``token``; ``server`` overrides the URL (a proxy)."""
        assert self.ca is not None and self.admin_cert is not None, "start() first"
        server = server or self.url
        cluster: JSON = {"server": server}
        if server.startswith("https://"):
            cluster["certificate-authority"] = str(self.ca.cert_file)
        credentials: JSON = (
            {"token": token}
            if token is not None
            else {"client-certificate": str(self.admin_cert.cert), "client-key": str(self.admin_cert.key)}
        )
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "shadowctl-local", "cluster": cluster}],
            "users": [{"name": user, "user": credentials}],
            "contexts": [
                {"name": "shadowctl-local", "context": {"cluster": "shadowctl-local", "user": user, "namespace": namespace}}
            ],
            "current-context": "shadowctl-local",
        }

    def write_kubeconfig(self, path: Path | str, **options: Any) -> Path:
        """Write :meth:`kubeconfig_dict` to ``path`` (mode 0600) and return it."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(self.kubeconfig_dict(**options), sort_keys=False))
        target.chmod(0o600)
        return target

    # ----------------------------------------------------------------- internals

    def _make_pki(self) -> None:
        self.ca = LocalCA(self.pki_dir)
        self.ca.issue(
            "apiserver",
            "kube-apiserver",
            hosts=("127.0.0.1", "localhost", "10.0.0.1", "kubernetes", "kubernetes.default",
                   "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"),
        )
        self.admin_cert = self.ca.issue("admin", "shadowctl-admin", organizations=("system:masters",), client=True)
        signing_key_pair(self.pki_dir, "sa")

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self._procs.append((name, proc, log))
        return proc

    def _start_etcd(self) -> None:
        self.etcd_port, peer = free_port(), free_port()
        data = self.workdir / "etcd"
        client_url = f"http://127.0.0.1:{self.etcd_port}"
        self._spawn("etcd", [
            str(self.binaries.etcd),
            f"--data-dir={data}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ])
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{client_url}/health", timeout=2).status_code == 200:
                    return
            self._check_alive("etcd")
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"etcd did not answer on {client_url}/health within {START_TIMEOUT:.0f} s")
            time.sleep(0.1)

    def _start_apiserver(self) -> None:
        self.port = free_port()
        pki = self.pki_dir
        self._spawn("kube-apiserver", [
            str(self.binaries.kube_apiserver),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # No kubelet and no Endpoints for the kubernetes Service: a loopback address cannot be one.
            "--endpoint-reconciler-type=none",
            f"--secure-port={self.port}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-issuer={self.url}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            # No controller manager runs: nothing else would clean up expired tokens or events.
            "--event-ttl=1h",
            *self._audit_flags(),
            "--v=0",
        ])

    def _audit_flags(self) -> list[str]:
        if self.audit_log is None:
            return []
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(self.audit_policy, sort_keys=False))
        self.audit_log.parent.mkdir(parents=True, exist_ok=True)
        # The log backend in blocking mode: each event is written as its request completes, not batched (a
        # client may have its answer a moment before the event is in the file); no rotation: a campaign
        # reads the whole file.
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}", "--audit-log-mode=blocking",
                "--audit-log-format=json", "--audit-log-maxsize=0"]

    def _check_alive(self, name: str) -> None:
        ended = self.alive()
        if ended:
            raise ControlPlaneError(f"{name} did not start: {ended}")

    def _wait_ready(self, client: httpx.Client) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last = "no answer"
        while True:
            try:
                answer = client.get("/readyz", timeout=5)
                if answer.status_code == 200:
                    # The namespace "default" comes from a bootstrap loop that needs the endpoint
                    # reconciler, which is off here: create it (409 when the loop was first).
                    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}
                    created = client.post("/api/v1/namespaces", json=body)
                    if created.status_code in (201, 409):
                        return
                    last = f"creating namespace default: {created.status_code} {created.text[:300]}"
                else:
                    last = f"/readyz answered {answer.status_code}: {answer.text[-300:]}"
            except httpx.HTTPError as exc:
                last = str(exc) or type(exc).__name__
            self._check_alive("kube-apiserver")
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"kube-apiserver not ready on {self.url} within {START_TIMEOUT:.0f} s: {last}")
            time.sleep(0.2)

    def _crd_documents(self) -> Iterator[JSON]:
        yield crd()  # shadowctl's own, generated from the policy model
        seen = set()
        files = sorted(self.crds_dir.glob("*.yaml")) if self.crds_dir.is_dir() else []
        for path in [*files, *self.extra_crds]:
            extra = path in self.extra_crds
            for doc in yaml.safe_load_all(path.read_text()):
                if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                    continue
                name = (doc.get("metadata") or {}).get("name")
                if (extra or name in UPSTREAM_CRDS) and name not in seen:
                    seen.add(name)
                    yield doc

    def kserve_crd_file(self) -> Path | None:
        """KServe's InferenceService CRD: in the CRD folder, else in the checkout's ``../shared/crds`` (None: neither)."""
        for folder in (self.crds_dir, SHARED_CRDS):
            if (folder / KSERVE_CRD_FILE).is_file():
                return folder / KSERVE_CRD_FILE
        return None

    def install_crd_file(self, path: Path) -> None:
        """Install the CRDs of one YAML file into the running API server and wait until they are served."""
        docs = [d for d in yaml.safe_load_all(path.read_text())
                if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition"]
        with self.admin_client() as client:
            installed = self.installed_crds
            self._install_crds(client, docs)
            self.installed_crds = [*installed, *(n for n in self.installed_crds if n not in installed)]

    def _install_crds(self, client: httpx.Client, docs: Sequence[JSON] | None = None) -> None:
        path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        names = []
        for doc in (docs if docs is not None else self._crd_documents()):
            answer = client.post(path, json=doc)
            if answer.status_code not in (201, 409):
                raise ControlPlaneError(f"CRD {doc['metadata']['name']} refused: {answer.status_code} {answer.text[:500]}")
            names.append(doc["metadata"]["name"])
        deadline = time.monotonic() + START_TIMEOUT
        for name in names:
            while True:
                stored = client.get(f"{path}/{name}").json()
                conditions = {c.get("type"): c.get("status") for c in (stored.get("status") or {}).get("conditions") or []}
                if conditions.get("Established") == "True":
                    break
                if time.monotonic() > deadline:
                    raise ControlPlaneError(f"CRD {name} not established within {START_TIMEOUT:.0f} s: {conditions}")
                time.sleep(0.05)
            group = stored["spec"]["group"]
            version = next(v["name"] for v in stored["spec"]["versions"] if v.get("served"))
            plural = stored["spec"]["names"]["plural"]
            # Established is set before discovery serves the resource; kubectl needs discovery.
            while True:
                listing = client.get(f"/apis/{group}/{version}")
                if listing.status_code == 200 and any(r.get("name") == plural for r in listing.json().get("resources", [])):
                    break
                if time.monotonic() > deadline:
                    raise ControlPlaneError(f"CRD {name} not in discovery within {START_TIMEOUT:.0f} s")
                time.sleep(0.05)
        self.installed_crds = names

    def _server_version(self, client: httpx.Client) -> str:
        return str(client.get("/version").json().get("gitVersion", "unknown"))

    def _etcd_version(self) -> str:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            return str(httpx.get(f"http://127.0.0.1:{self.etcd_port}/version", timeout=5).json().get("etcdserver"))
        return "unknown"


def _tail(path: Path, size: int = 1500) -> str:
    try:
        data = path.read_bytes()[-size:]
    except OSError:
        return "(no log)"
    return data.decode("utf-8", "replace").strip()


def dump_json(obj: Any) -> str:
    """Compact JSON for request bodies and logs."""
    return json.dumps(obj, separators=(",", ":"))


# ----------------------------------------------------------------- the local cluster: control plane + stand-ins

ADMIN_SA = ("kube-system", "shadowctl-admin")


class _StandIn(Protocol):
    kube: KubeClient

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=_StandIn)


class _StandInThread(Generic[S]):
    """A stand-in controller (Knative's, KServe's) on an event loop of its own thread, since LocalCluster's
    callers are synchronous (fixtures, ``shadowctl sim cluster``)."""

    def __init__(self, name: str, kubeconfig: Path, make: Callable[[KubeClient], S]) -> None:
        self.name = name
        self.kubeconfig = kubeconfig
        self.make = make
        self.stand_in: S | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> S:
        """Connect as ``name`` and start the stand-in; ControlPlaneError when it does not start within 30 s."""
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def begin() -> None:
                kube = await KubeClient.connect(kubeconfig=self.kubeconfig, component=self.name)
                self.stand_in = self.make(kube)
                await self.stand_in.start()

            try:
                loop.run_until_complete(begin())
            except BaseException as exc:
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        started.wait(30)
        if failure or self.stand_in is None:
            raise ControlPlaneError(f"{self.name} did not start: {failure[0] if failure else 'timeout'}")
        return self.stand_in

    def stop(self) -> None:
        """Stop the stand-in and its loop; safe when it never started."""
        loop = self._loop
        if loop is None:
            return
        stand_in = self.stand_in

        async def stop_it() -> None:
            if stand_in is not None:
                await stand_in.stop()
                await stand_in.kube.close()
                # TLS connections (its watch, the API server's webhook calls) finish closing a few loop
                # iterations later; stopping the loop first leaks their sockets (aiohttp's "graceful
                # shutdown" advice).
                await asyncio.sleep(0.25)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop_it(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(15)
        self._loop = None


class LocalCluster:
    """A :class:`ControlPlane` plus what the tests and the demo need around it.

    * the Knative stand-in (:mod:`shadowctl.sim.knative`): its webhook
      registered with the API server, its controller watching Services, both on
      a background thread with their own event loop;
    * with ``kserve`` (or after :meth:`enable_kserve`), KServe's CRD and its stand-in
      (:mod:`shadowctl.sim.kserve`): a controller writing InferenceServices' status, on its own
      background thread and event loop;
    * an admin bearer token (a ServiceAccount bound to ``cluster-admin``, from
      the TokenRequest API) for clients that cannot present the admin
      certificate, such as those behind the fault proxy.
    """

    def __init__(self, *, crds: Path | None = None, knative: bool = True, kserve: bool = False,
                 audit_log: Path | None = None, audit_policy: dict[str, Any] | None = None) -> None:
        self.plane = ControlPlane(crds=crds, audit_log=audit_log, audit_policy=audit_policy)
        self.knative = knative
        self.kserve = kserve
        self._kserve: _StandInThread[KServeStandIn] | None = None
        self._knative: _StandInThread[KnativeStandIn] | None = None
        self.admin_token = ""

    @property
    def url(self) -> str:
        return self.plane.url

    def start(self) -> None:
        """Start the control plane, the stand-ins and the admin token; ControlPlaneError on failure."""
        self.plane.start()
        try:
            with self.plane.admin_client() as client:
                self.admin_token = self.service_account_token(client, *ADMIN_SA, cluster_role="cluster-admin")
                if self.knative and "services.serving.knative.dev" in self.plane.installed_crds:
                    self._start_knative(client)
            if self.kserve:
                self.enable_kserve()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the stand-ins, then the control plane."""
        for thread in (self._kserve, self._knative):
            if thread is not None:
                thread.stop()
        self._kserve = self._knative = None
        self.plane.stop()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def service_account_token(
        self, client: httpx.Client, namespace: str, name: str, *, cluster_role: str | None = None,
        seconds: int = 86_400,
    ) -> str:
        """Create ServiceAccount ``namespace/name`` if needed (bound to ``cluster_role`` if given); a token for it."""
        sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}
        _ok(client.post(f"/api/v1/namespaces/{namespace}/serviceaccounts", json=sa), f"ServiceAccount {name}", 409)
        if cluster_role:
            binding = {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": f"{name}-{cluster_role}"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            }
            _ok(client.post("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", json=binding),
                f"ClusterRoleBinding {name}", 409)
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                   "spec": {"expirationSeconds": seconds}}
        answer = client.post(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", json=request)
        _ok(answer, f"token for {namespace}/{name}")
        return str(answer.json()["status"]["token"])

    def enable_kserve(self) -> None:
        """Install KServe's CRD (see :data:`SHARED_CRDS`) and start the KServe stand-in; once (later calls return).
        ControlPlaneError when the CRD is in neither folder."""
        if self._kserve is not None:
            return
        if KSERVE_CRD not in self.plane.installed_crds:
            found = self.plane.kserve_crd_file()
            if found is None:
                raise ControlPlaneError(f"KServe's CRD ({KSERVE_CRD_FILE}) is neither in {self.plane.crds_dir} nor in "
                                        f"{SHARED_CRDS}")
            self.plane.install_crd_file(found)
        self._start_kserve()

    def _start_kserve(self) -> None:
        kubeconfig = self.plane.write_kubeconfig(self.plane.workdir / "kserve-stand-in.kubeconfig")
        self._kserve = _StandInThread("kserve-stand-in", kubeconfig, KServeStandIn)
        self._kserve.start()

    def _start_knative(self, client: httpx.Client) -> None:
        plane = self.plane
        assert plane.ca is not None
        serving = plane.ca.issue("knative-webhook", "knative-webhook", hosts=("127.0.0.1", "localhost"))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(serving.cert), str(serving.key))
        kubeconfig = plane.write_kubeconfig(plane.workdir / "knative-stand-in.kubeconfig")
        ca_pem = plane.ca.pem
        self._knative = _StandInThread("knative-stand-in", kubeconfig,
                                       lambda kube: KnativeStandIn(kube, context, ca_pem))
        stand_in = self._knative.start()
        config = stand_in.webhook_configuration()
        _ok(client.post("/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations", json=config),
            "the Knative webhook's registration")
        # The API server applies a new webhook configuration a moment later: probe with a bad dry run.
        probe = {"apiVersion": "serving.knative.dev/v1", "kind": "Service",
                 "metadata": {"name": "webhook-probe", "namespace": "default"},
                 "spec": {"traffic": [{"latestRevision": True, "percent": 7}]}}
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            answer = client.post("/apis/serving.knative.dev/v1/namespaces/default/services?dryRun=All", json=probe)
            if answer.status_code == 422 and "Traffic targets sum to 7" in answer.text:
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"the Knative webhook is not called: {answer.status_code} {answer.text[:300]}")
            time.sleep(0.1)


def _ok(answer: httpx.Response, what: str, *also: int) -> None:
    if answer.status_code >= 300 and answer.status_code not in also:
        raise ControlPlaneError(f"{what}: the API server answered {answer.status_code}: {answer.text[:500]}")
