"""Pytest fixtures for the real local Kubernetes control plane (a plugin module, see tests/conftest.py).

One :class:`~shadowctl.sim.cluster.LocalCluster` (etcd, kube-apiserver, the
Knative stand-in) serves the whole test session; a test reaches it through a
:class:`~shadowctl.sim.faultproxy.FaultProxy` so that it can inject the faults
a real server does not make on demand. Fixtures:

* ``local_cluster``: the session's control plane. When its binaries are
  missing the tests that need it **fail** (they do not skip), with the message
  that says to run ``hack/setup.sh``;
* ``kube_env``: a :class:`KubeEnv` per test: direct admin access (synchronous,
  for arranging and checking), the fault proxy, kubeconfigs. After the test it
  deletes every object the tests' kinds left in the test namespaces, so each
  test starts from empty namespaces;
* ``kube_client``: a :class:`KubeClient` through the fault proxy with no-wait
  retries whose sleeps are recorded in ``kube_sleeps``;
* ``crds_dir``: the upstream CRD folder the control plane installed from.

Why shared namespaces that are emptied, not a fresh namespace per test: without
a controller manager a deleted Namespace stays Terminating forever, and many
tests (and the example policies) name ``llm``. Emptying takes a few
deletecollection calls, far less than a control plane per test.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import pytest_asyncio

from shadowctl.kube import KubeClient, RetryPolicy
from shadowctl.kube.refs import GVR
from shadowctl.sim.cluster import ControlPlaneError, LocalCluster, default_crds_dir
from shadowctl.sim.faultproxy import FaultProxy, RequestRecord

JSON = dict[str, Any]
T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
# The session's control plane, for helpers that are not fixtures (tests/routers_util.py).
SESSION: dict[str, LocalCluster] = {}
TEST_NAMESPACES = ("default", "llm", "models", "ns", "ns1", "team-a", "team-b", "shadowctl-system", "shadowctl")
# What a test may leave behind, deleted in this order after each test.
CLEANED = tuple(
    GVR(group, version, plural, "")
    for group, version, plural in (
        ("shadowctl.dev", "v1alpha1", "shadowpolicies"),
        ("networking.istio.io", "v1", "virtualservices"),
        ("networking.istio.io", "v1", "destinationrules"),
        ("gateway.networking.k8s.io", "v1", "httproutes"),
        ("serving.kserve.io", "v1beta1", "inferenceservices"),
        ("serving.knative.dev", "v1", "services"),
        ("serving.knative.dev", "v1", "revisions"),
        ("serving.knative.dev", "v1", "configurations"),
        ("serving.knative.dev", "v1", "routes"),
        ("coordination.k8s.io", "v1", "leases"),
        ("", "v1", "events"),
        ("", "v1", "configmaps"),
        ("", "v1", "secrets"),
        ("rbac.authorization.k8s.io", "v1", "rolebindings"),
        ("rbac.authorization.k8s.io", "v1", "roles"),
        ("apps", "v1", "deployments"),
    )
)


@pytest.fixture
def crds_dir() -> Path:
    folder = default_crds_dir()
    if not folder.is_dir():
        pytest.fail(f"no upstream CRDs in {folder}: run hack/setup.sh")
    return folder


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[LocalCluster]:
    try:
        cluster = LocalCluster(crds=default_crds_dir())
        cluster.start()
    except ControlPlaneError as exc:
        pytest.fail(f"the local control plane cannot start: {exc}", pytrace=False)
    try:
        with cluster.plane.admin_client() as client:
            for ns in TEST_NAMESPACES:
                body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
                answer = client.post("/api/v1/namespaces", json=body)
                assert answer.status_code in (201, 409), answer.text
        SESSION["cluster"] = cluster
        yield cluster
    finally:
        SESSION.pop("cluster", None)
        cluster.stop()


@pytest.fixture(scope="session")
def _session_proxy(local_cluster: LocalCluster) -> Iterator[FaultProxy]:
    assert local_cluster.plane.ca is not None
    proxy = FaultProxy(local_cluster.url, str(local_cluster.plane.ca.cert_file))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


class KubeEnv:
    """One test's view of the session's control plane: admin calls, the fault proxy, kubeconfigs.

    Object helpers are synchronous (a separate process answers them, so they
    may be called from async tests) and go straight to the API server as the
    admin, never through the proxy: arranging a test never consumes its faults
    and never shows in :attr:`verb_counts`.
    """

    def __init__(self, cluster: LocalCluster, proxy: FaultProxy) -> None:
        self.cluster = cluster
        self.proxy = proxy
        self.admin = cluster.plane.admin_client()
        self.token = cluster.admin_token

    # --------------------------------------------------------------- where clients connect

    @property
    def url(self) -> str:
        """The fault proxy's URL (plain HTTP; authenticate with :attr:`token`)."""
        return self.proxy.url

    def kubeconfig_dict(self, namespace: str = "default", *, token: str | None = None) -> JSON:
        """A kubeconfig through the fault proxy, with the admin token unless ``token`` is given."""
        return self.cluster.plane.kubeconfig_dict(token=token or self.token, server=self.proxy.url, namespace=namespace)

    def kubeconfig(self, path: Path | str, namespace: str = "default", *, token: str | None = None) -> Path:
        """Write :meth:`kubeconfig_dict` to ``path``."""
        return self.cluster.plane.write_kubeconfig(path, token=token or self.token, server=self.proxy.url,
                                                   namespace=namespace)

    def direct_kubeconfig(self, path: Path | str, namespace: str = "default") -> Path:
        """An admin kubeconfig straight to the API server (client certificate), as kubectl users get."""
        return self.cluster.plane.write_kubeconfig(path, namespace=namespace)

    # --------------------------------------------------------------- faults (see FaultProxy)

    def fail_next(self, count: int, status: int = 500, *, verb: str | None = None, path: str | None = None,
                  retry_after: int | None = None) -> None:
        self.proxy.fail_next(count, status, verb=verb, path=path, retry_after=retry_after)

    def reset_next(self, count: int, *, verb: str | None = None, path: str | None = None) -> None:
        self.proxy.reset_next(count, verb=verb, path=path)

    def set_latency(self, seconds: float, *, verb: str | None = None) -> None:
        self.proxy.set_latency(seconds, verb=verb)

    def cut_watches(self) -> None:
        self.proxy.cut_watches()

    def expire_watches(self) -> None:
        """Watches from any resourceVersion up to now get 410 Expired (as after an etcd compaction)."""
        self.proxy.expire_watches(self.resource_version + 1)

    def compact(self, revision: int | None = None) -> None:
        """As etcd compacting at ``revision`` (default: now): a watch from an older resourceVersion gets 410 Expired.

        Unlike :meth:`expire_watches`, a watch from ``revision`` itself (a fresh
        list's version) still works, as after a real compaction: so a client can
        recover by listing and watching from the list's version.
        """
        self.proxy.expire_watches(self.resource_version if revision is None else revision)

    @property
    def verb_counts(self) -> Any:
        return self.proxy.verb_counts

    @property
    def request_log(self) -> Any:
        return self.proxy.request_log

    def reset_counts(self) -> None:
        self.proxy.reset_counts()

    @property
    def resource_version(self) -> int:
        """The API server's current resourceVersion (etcd's revision), from a list."""
        answer = self.admin.get("/api/v1/namespaces", params={"limit": "1"})
        return int(answer.json()["metadata"]["resourceVersion"])

    # --------------------------------------------------------------- objects, as the admin

    def _check(self, answer: httpx.Response, what: str) -> JSON:
        if answer.status_code >= 300:
            raise AssertionError(f"{what}: {answer.status_code} {answer.text[:800]}")
        return dict(answer.json())

    def get_object(self, gvr: GVR, namespace: str | None, name: str) -> JSON | None:
        """The object, or None when it does not exist."""
        answer = self.admin.get("/" + _path(gvr, namespace, name))
        if answer.status_code == 404:
            return None
        return self._check(answer, f"get {gvr.plural}/{name}")

    def list_objects(self, gvr: GVR, namespace: str | None = None) -> list[JSON]:
        body = self._check(self.admin.get("/" + _path(gvr, namespace)), f"list {gvr.plural}")
        return list(body.get("items") or [])

    def put_object(self, gvr: GVR, obj: JSON) -> JSON:
        """Create or replace ``obj``; a ``status`` in it is written through the status subresource too."""
        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") if gvr.namespaced else None
        current = self.get_object(gvr, ns, meta["name"])
        body = {k: v for k, v in obj.items()}
        body.setdefault("apiVersion", gvr.api_version)
        if gvr.kind:
            body.setdefault("kind", gvr.kind)
        if current is None:
            result = self._check(self.admin.post("/" + _path(gvr, ns), json=body), f"create {meta['name']}")
        else:
            body["metadata"] = {**meta, "resourceVersion": current["metadata"]["resourceVersion"]}
            result = self._check(self.admin.put("/" + _path(gvr, ns, meta["name"]), json=body),
                                 f"replace {meta['name']}")
        if "status" in obj and result.get("status") != obj["status"]:
            with_status = {**result, "status": obj["status"]}
            answer = self.admin.put("/" + _path(gvr, ns, meta["name"]) + "/status", json=with_status)
            if answer.status_code != 404:  # a kind without a status subresource stored it with the object
                result = self._check(answer, f"status of {meta['name']}")
        return result

    def patch(self, gvr: GVR, namespace: str | None, name: str, patch: JSON) -> JSON:
        """Merge-patch an object as the admin (a second writer, to provoke real conflicts)."""
        answer = self.admin.patch("/" + _path(gvr, namespace, name), json=patch,
                                  headers={"Content-Type": "application/merge-patch+json"})
        return self._check(answer, f"patch {name}")

    def patch_status(self, gvr: GVR, namespace: str | None, name: str, patch: JSON) -> JSON:
        """Merge-patch the status subresource as the admin (a second writer in the controller's place)."""
        answer = self.admin.patch("/" + _path(gvr, namespace, name) + "/status", json=patch,
                                  headers={"Content-Type": "application/merge-patch+json"})
        return self._check(answer, f"patch status of {name}")

    def service_account_kubeconfig(self, path: Path | str, namespace: str, name: str, *,
                                   cluster_role: str | None = None, context_namespace: str = "default") -> Path:
        """A kubeconfig through the fault proxy as ServiceAccount ``namespace/name`` (a TokenRequest token).

        Without ``cluster_role`` the account has no RBAC at all: the real authorizer answers 403.
        """
        token = self.cluster.service_account_token(self.admin, namespace, name, cluster_role=cluster_role,
                                                   seconds=3600)
        return self.kubeconfig(path, namespace=context_namespace, token=token)

    def delete_object(self, gvr: GVR, namespace: str | None, name: str) -> None:
        answer = self.admin.delete("/" + _path(gvr, namespace, name))
        if answer.status_code not in (200, 202, 404):
            self._check(answer, f"delete {name}")

    def wait_knative_settled(self, namespace: str, name: str, *, timeout: float = 15.0) -> JSON:
        """The Knative Service once the stand-in has written status for its current generation (polls).

        Settled: ``status.observedGeneration`` is ``metadata.generation``, ``status.traffic`` is set and
        the latest created revision is the latest ready one. Synchronous (the stand-in runs on its own
        thread), so sync fixtures can use it; it blocks an async test's event loop while it polls.
        """
        import time

        from shadowctl.kube.refs import KNATIVE_SERVICE

        deadline = time.monotonic() + timeout
        while True:
            svc = self.get_object(KNATIVE_SERVICE, namespace, name)
            status = (svc or {}).get("status") or {}
            if (svc is not None and status.get("observedGeneration") == svc["metadata"].get("generation")
                    and status.get("traffic") is not None
                    and status.get("latestCreatedRevisionName") == status.get("latestReadyRevisionName")):
                return svc
            if time.monotonic() > deadline:
                raise AssertionError(f"Knative Service {namespace}/{name} not settled within {timeout} s: {svc}")
            time.sleep(0.02)

    # --------------------------------------------------------------- cleanup

    def clean(self) -> None:
        """Delete what the tests' kinds hold in the test namespaces (finalizers first)."""
        for gvr in CLEANED:
            listed = self.admin.get(gvr.path(None))
            if listed.status_code == 404:
                continue  # a kind this session has not installed (KServe's, until a test asks for it)
            items = (listed.json().get("items")) or []
            namespaces = {item["metadata"]["namespace"] for item in items} & set(TEST_NAMESPACES)
            for item in items:
                meta = item["metadata"]
                if meta.get("finalizers") and meta["namespace"] in namespaces:
                    self.admin.patch(gvr.path(meta["namespace"], meta["name"]), json={"metadata": {"finalizers": None}},
                                     headers={"Content-Type": "application/merge-patch+json"})
            for ns in sorted(namespaces):
                answer = self.admin.delete(gvr.path(ns))
                assert answer.status_code == 200, f"cleaning {gvr.path(ns)}: {answer.status_code} {answer.text[:300]}"

    def close(self) -> None:
        self.admin.close()


async def eventually(check: Callable[[], Awaitable[T] | T], *, timeout: float = 15.0, every: float = 0.05) -> T:  # noqa: ASYNC109
    """Call ``check`` until it returns a truthy value without raising AssertionError; that value.

    For what the real control plane does after a write returns: the Knative
    stand-in writes status a moment later, a watch delivers an event later.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value  # type: ignore[return-value]
            last: BaseException | None = None
        except AssertionError as exc:
            last = exc
        if asyncio.get_running_loop().time() > deadline:
            if last is not None:
                raise last
            raise AssertionError(f"not true within {timeout} s: {check}")
        await asyncio.sleep(every)


def _path(gvr: GVR, namespace: str | None, name: str | None = None) -> str:
    path = gvr.path(namespace if gvr.namespaced else None).lstrip("/")
    return f"{path}/{name}" if name else path


@pytest.fixture
def kube_env(local_cluster: LocalCluster, _session_proxy: FaultProxy) -> Iterator[KubeEnv]:
    env = KubeEnv(local_cluster, _session_proxy)
    _session_proxy.reset()
    try:
        yield env
    finally:
        _session_proxy.reset()
        env.clean()
        env.close()


@pytest.fixture
def kube_sleeps() -> list[float]:
    return []


@pytest_asyncio.fixture
async def kube_client(kube_env: KubeEnv, tmp_path: Path, kube_sleeps: list[float]) -> AsyncIterator[KubeClient]:
    async def record_sleep(seconds: float) -> None:
        kube_sleeps.append(seconds)

    client = await KubeClient.connect(
        kubeconfig=kube_env.kubeconfig(tmp_path / "kubeconfig"),
        timeout=5.0,
        retry=RetryPolicy(attempts=4, base_delay=0.1, max_delay=1.0),
        sleep=record_sleep,
        rand=lambda: 0.5,
    )
    try:
        yield client
    finally:
        await client.close()


__all__ = ["KubeEnv", "RequestRecord", "eventually"]
