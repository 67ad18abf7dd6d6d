"""RestReader (the standard library's HTTP, no kubernetes library) against the real kube-apiserver.

Every read is made through both readers where it can be, so that the reader `shadowctl get` uses
and the client the controller uses answer alike: the same objects, the same error classes for the
same statuses, the same retry rules; through the fault proxy for faults, straight to the API server
with client certificates (files and embedded data) as kubectl users connect.
"""

from __future__ import annotations

import base64
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest_kube import KubeEnv
from test_kube_client import REF, vs

from shadowctl.cli.connect import Conn, with_reader
from shadowctl.kube import (
    VIRTUAL_SERVICE,
    ConfigError,
    Forbidden,
    KubeClient,
    KubeReader,
    NotFound,
    ResourceRef,
    RestReader,
    RetryPolicy,
    Unauthorized,
    Unavailable,
)
from shadowctl.kube.kubeconfig import read_kubeconfig

FAST = RetryPolicy(attempts=3, base_delay=0.1, max_delay=1.0)


def names(items: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return sorted((o["metadata"]["name"], o["metadata"]["resourceVersion"], o["kind"]) for o in items)


def reader_for(path: Path, sleeps: list[float] | None = None, **options: Any) -> RestReader:
    async def record(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    reader = RestReader.for_kubeconfig(str(path), None, retry=options.pop("retry", FAST), sleep=record,
                                       rand=lambda: 0.5, **options)
    assert reader is not None, "a plain kubeconfig is read without the kubernetes library"
    return reader


def embedded(source: Path, target: Path) -> Path:
    """``source`` with its CA and client certificate files turned into ``*-data`` fields."""
    config = yaml.safe_load(source.read_text())
    cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
    for section, key in ((cluster, "certificate-authority"), (user, "client-certificate"), (user, "client-key")):
        section[f"{key}-data"] = base64.b64encode(Path(section.pop(key)).read_bytes()).decode()
    target.write_text(yaml.safe_dump(config))
    return target


async def test_both_readers_see_the_same_objects(kube_env: KubeEnv, tmp_path: Path) -> None:
    for i in range(3):
        obj = vs()
        obj["metadata"] = {"name": f"r{i}", "namespace": "default", "labels": {"tier": "a" if i else "b"}}
        kube_env.put_object(VIRTUAL_SERVICE, obj)
    direct = kube_env.direct_kubeconfig(tmp_path / "direct")
    client = await KubeClient.connect(kubeconfig=direct)
    try:
        for path in (direct, embedded(direct, tmp_path / "embedded"), kube_env.kubeconfig(tmp_path / "token")):
            reader = reader_for(path)
            try:
                for kwargs in ({}, {"label_selector": "tier=a"}, {"field_selector": "metadata.name=r2"}):
                    mine = await reader.list(VIRTUAL_SERVICE, "default", **kwargs)
                    theirs = await client.list(VIRTUAL_SERVICE, "default", **kwargs)
                    assert names(mine.items) == names(theirs.items) and mine.items, (path.name, kwargs)
                    assert mine.resource_version.isdigit()
                everywhere = await reader.list(VIRTUAL_SERVICE)  # all namespaces
                assert {"r0", "r1", "r2"} <= {o["metadata"]["name"] for o in everywhere.items}
                ref = ResourceRef(VIRTUAL_SERVICE, "r1", "default")
                assert await reader.get(ref) == await client.get(ref)
                assert reader.requests_by_verb == {"list": 4, "get": 1}  # one connection, kept alive
            finally:
                await reader.close()
    finally:
        await client.close()


async def test_the_same_errors_as_the_client(kube_env: KubeEnv, tmp_path: Path) -> None:
    kube_env.put_object(VIRTUAL_SERVICE, vs())
    reader = reader_for(kube_env.kubeconfig(tmp_path / "kc"))
    client = await KubeClient.connect(kubeconfig=kube_env.kubeconfig(tmp_path / "kc"))
    missing = ResourceRef(VIRTUAL_SERVICE, "nowhere", "default")
    try:
        with pytest.raises(NotFound) as mine:
            await reader.get(missing)
        with pytest.raises(NotFound) as theirs:
            await client.get(missing)
        assert (mine.value.message, mine.value.status, mine.value.reason) == (
            theirs.value.message, theirs.value.status, theirs.value.reason)
    finally:
        await reader.close()
        await client.close()

    # A service account without RBAC: the real authorizer's 403, with the server's words.
    nobody = kube_env.service_account_kubeconfig(tmp_path / "sa", "default", "nobody")
    reader = reader_for(nobody)
    try:
        with pytest.raises(Forbidden) as refused:
            await reader.list(VIRTUAL_SERVICE, "default")
        assert refused.value.status == 403 and "cannot list resource" in refused.value.message
    finally:
        await reader.close()

    # A token the API server never issued: 401.
    config = yaml.safe_load(kube_env.kubeconfig(tmp_path / "bad").read_text())
    config["users"][0]["user"]["token"] = kube_env.token[:-4] + ("AAAA" if not kube_env.token.endswith("AAAA")
                                                                  else "BBBB")
    (tmp_path / "bad").write_text(yaml.safe_dump(config))
    reader = reader_for(tmp_path / "bad")
    try:
        with pytest.raises(Unauthorized):
            await reader.get(REF)
    finally:
        await reader.close()


async def test_retries_follow_the_clients_rules(kube_env: KubeEnv, tmp_path: Path) -> None:
    kube_env.put_object(VIRTUAL_SERVICE, vs())
    sleeps: list[float] = []
    reader = reader_for(kube_env.kubeconfig(tmp_path / "kc"), sleeps)
    try:
        kube_env.fail_next(2, status=429, verb="get", retry_after=3)
        assert (await reader.get(REF))["metadata"]["name"] == "reviews"
        assert sleeps == [3.0, 3.0] and reader.requests_by_verb["get"] == 3

        sleeps.clear()
        kube_env.fail_next(3, status=500, verb="list")
        with pytest.raises(Unavailable) as info:
            await reader.list(VIRTUAL_SERVICE, "default")
        assert info.value.status == 500
        assert sleeps == pytest.approx([0.075, 0.15])  # 3 attempts, base 0.1, jitter 0.5 at rand() = 0.5

        sleeps.clear()
        kube_env.reset_next(1, verb="get")  # the connection dropped with no answer: a read is sent again
        assert (await reader.get(REF))["metadata"]["name"] == "reviews"
        assert len(sleeps) == 1
    finally:
        await reader.close()


async def test_no_server_is_unavailable_in_bounded_time(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }
    (tmp_path / "kc").write_text(yaml.safe_dump(config))
    sleeps: list[float] = []
    reader = reader_for(tmp_path / "kc", sleeps, timeout=1.0)
    with pytest.raises(Unavailable) as info:
        await reader.get(REF)
    assert "ConnectionRefusedError" in info.value.message and info.value.status is None
    assert reader.requests_by_verb["get"] == 3 and len(sleeps) == 2


async def test_relative_paths_are_relative_to_the_kubeconfig(
    kube_env: KubeEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As kubectl: a certificate path in a kubeconfig is relative to that file, not to the working folder."""
    kube_env.put_object(VIRTUAL_SERVICE, vs())
    config = yaml.safe_load(kube_env.direct_kubeconfig(tmp_path / "direct").read_text())
    home = tmp_path / "home"
    home.mkdir()
    cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
    for section, key in ((cluster, "certificate-authority"), (user, "client-certificate"), (user, "client-key")):
        (home / f"{key}.pem").write_bytes(Path(section[key]).read_bytes())  # noqa: ASYNC240
        section[key] = f"{key}.pem"
    (home / "config").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    reader = reader_for(home / "config")
    try:
        assert (await reader.get(REF))["metadata"]["name"] == "reviews"
    finally:
        await reader.close()
    assert read_kubeconfig(str(home / "config")).users["admin"]["client-key"] == str(home / "client-key.pem")


async def test_client_certificate_data_leaves_no_file_behind(kube_env: KubeEnv, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    reader = reader_for(embedded(kube_env.direct_kubeconfig(tmp_path / "direct"), tmp_path / "embedded"))
    await reader.close()
    assert list(scratch.iterdir()) == []


def write_exec_kubeconfig(kube_env: KubeEnv, tmp_path: Path) -> Path:
    """A kubeconfig whose user is an exec plugin (a script printing an ExecCredential with the admin token)."""
    plugin = tmp_path / "credential-plugin"
    credential = ('{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", '
                  f'"status": {{"token": "{kube_env.token}"}}}}')
    plugin.write_text(f"#!/bin/sh\ncat <<'EOF'\n{credential}\nEOF\n")
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    config = kube_env.kubeconfig_dict()
    config["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1",
                                           "command": str(plugin), "interactiveMode": "Never"}}
    path = tmp_path / "exec"
    path.write_text(yaml.safe_dump(config))
    return path


async def test_a_plugin_kubeconfig_is_left_to_the_client(kube_env: KubeEnv, tmp_path: Path) -> None:
    """An exec plugin needs the kubernetes library: no RestReader, and the command reads through the client."""
    kube_env.put_object(VIRTUAL_SERVICE, vs())
    path = write_exec_kubeconfig(kube_env, tmp_path)
    assert RestReader.for_kubeconfig(str(path), None) is None
    seen: list[str] = []

    async def body(reader: KubeReader, namespace: str) -> dict[str, Any]:
        seen.append(type(reader).__name__)
        return await reader.get(REF)

    assert (await with_reader(Conn(str(path), None, None), body))["metadata"]["name"] == "reviews"
    plain = kube_env.kubeconfig(tmp_path / "plain")
    assert (await with_reader(Conn(str(plain), None, None), body))["metadata"]["name"] == "reviews"
    assert seen == ["KubeClient", "RestReader"]


def read_endpoint(path: Path) -> str | None:
    """Build a reader for ``path`` and its Authorization header (where a token file is read)."""
    reader = RestReader.for_kubeconfig(str(path), None)
    return reader.endpoint.authorization() if reader is not None else None


def test_kubeconfig_problems_are_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    base = {
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }
    cases: list[tuple[dict[str, Any], str]] = [
        ({"current-context": "other"}, "context 'other' not found"),
        ({"contexts": [{"name": "c", "context": {"cluster": "gone", "user": "u"}}]}, "names cluster 'gone'"),
        ({"clusters": [{"name": "c", "cluster": {}}]}, "has no server"),
        ({"clusters": [{"name": "c", "cluster": {"server": "ftp://x"}}]}, "expected http(s)://"),
        ({"clusters": [{"name": "c", "cluster": {"server": "https://x", "certificate-authority-data": "%%%"}}]},
         "certificate-authority-data is not base64"),
        ({"clusters": [{"name": "c", "cluster": {"server": "https://x", "certificate-authority": "/nope.pem"}}]},
         "cannot load the TLS settings"),
        ({"users": [{"name": "u", "user": {"tokenFile": str(tmp_path / "no-token")}}]}, "cannot read the token file"),
        ({"clusters": "oops"}, "clusters must be a list"),
    ]
    for change, expected in cases:
        path = tmp_path / "kc"
        path.write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(ConfigError) as info:
            read_endpoint(path)
        assert expected in info.value.message, (change, info.value.message)
    (tmp_path / "kc").write_text("- a list\n")
    with pytest.raises(ConfigError, match="a kubeconfig is a mapping"):
        RestReader.for_kubeconfig(str(tmp_path / "kc"), None)


async def test_the_pods_service_account_when_no_kubeconfig(
    kube_env: KubeEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pod with no kubeconfig, as kubectl: the service account's token and CA. The pod's files are the
    boundary that cannot be real here: the folder is pointed at a temporary one, and the environment set."""
    from shadowctl.kube import rest

    kube_env.put_object(VIRTUAL_SERVICE, vs())
    account = tmp_path / "serviceaccount"
    account.mkdir()
    plane = kube_env.cluster.plane
    assert plane.ca is not None
    (account / "ca.crt").write_bytes(plane.ca.cert_file.read_bytes())
    (account / "token").write_text(kube_env.token)
    monkeypatch.setattr(rest, "SERVICE_ACCOUNT", account)
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    host, port = plane.url.removeprefix("https://").rsplit(":", 1)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    reader = RestReader.for_kubeconfig(None, None)
    assert reader is not None
    try:
        assert (await reader.get(REF))["metadata"]["name"] == "reviews"
        (account / "token").write_text("rotated-and-wrong")  # read again for each request
        with pytest.raises(Unauthorized):
            await reader.get(REF)
    finally:
        await reader.close()
