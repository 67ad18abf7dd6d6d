"""Outgoing webhooks (issue #16 item 6): URLs validated, requests signed with a key from a Secret, redirects to
another host not followed, addresses that resolve to instance metadata refused.

Receivers are real HTTP servers on loopback addresses (aiohttp); the signing key is a Secret in the real API
server (tests/conftest_kube.py), read by the controller's own reader (`shadowctl.cli.run_cmd`). A slow
receiver and an endless answer are in tests/test_controller_notify.py
(test_a_receiver_that_streams_or_trickles_cannot_hold_the_controller).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from aiohttp import web
from conftest_kube import KubeEnv
from controller_helpers import policy_doc

from shadowctl.cli.run_cmd import webhook_signing_key
from shadowctl.controller.clock import SystemClock
from shadowctl.controller.notify import WebhookGate
from shadowctl.kube import SECRET, KubeClient, ResourceRef
from shadowctl.machine import RolloutState
from shadowctl.policy import PolicyError, ShadowPolicy, parse_policies
from shadowctl.policy.model import Webhook
from shadowctl.policy.status import Phase
from shadowctl.webhooks import SIGNATURE_HEADER, HttpWebhooks, sign, verify


def receiver_verifies(key: bytes, body: bytes, header: str, tolerance_s: float = 300.0) -> bool:
    """What docs/controller.md tells a receiver to do, written out independently of shadowctl.webhooks."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    timestamp = parts["t"]
    if abs(time.time() - int(timestamp)) > tolerance_s:
        return False
    expected = hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"])


class Receiver:
    """Records each request's body and signature header; answers `status` (or a redirect to `location`)."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, str | None]] = []
        self.status = 200
        self.location: str | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((await request.read(), request.headers.get(SIGNATURE_HEADER)))
        if self.location is not None:
            raise web.HTTPTemporaryRedirect(self.location)
        return web.Response(status=self.status)


async def _serve(receiver: Receiver, host: str) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, 0).start()
    return runner, f"http://{host}:{runner.addresses[0][1]}"


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[Receiver, str, Receiver, str]]:
    """Two receivers on two loopback hosts (127.0.0.1 and 127.0.0.2: another host to a client)."""
    a, b = Receiver(), Receiver()
    runner_a, url_a = await _serve(a, "127.0.0.1")
    runner_b, url_b = await _serve(b, "127.0.0.2")
    try:
        yield a, url_a, b, url_b
    finally:
        await runner_a.cleanup()
        await runner_b.cleanup()


def _policy(url: str, *, hook_type: str = "event", signing: str | None = None) -> ShadowPolicy:
    hook: dict[str, Any] = {"name": "h", "url": url, "type": hook_type, "timeout": "2s", "retries": 0}
    if signing is not None:
        hook["signingSecret"] = signing
    doc = policy_doc(notifications={"webhooks": [hook]})
    doc["metadata"]["namespace"] = "llm"
    return parse_policies(yaml.safe_dump(doc))[0]


def _hook(policy: ShadowPolicy) -> Webhook:
    return policy.spec.notifications.webhooks[0]


async def _no_wait(seconds: float) -> None:
    return None


def _secret(value: bytes) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hook-key", "namespace": "llm"},
            "data": {"key": base64.b64encode(value).decode()}}


async def test_requests_are_signed_with_the_secrets_key_and_a_rotation_applies_at_once(
        receivers: tuple[Receiver, str, Receiver, str], kube_env: KubeEnv, tmp_path: Path) -> None:
    a, url, _, _ = receivers
    kube = await KubeClient.connect(kubeconfig=kube_env.kubeconfig(tmp_path / "k"))
    try:
        hooks = HttpWebhooks(_no_wait, signing_key=webhook_signing_key(kube))
        policy = _policy(url + "/hook", signing="hook-key")
        # No Secret yet: nothing is sent (never an unsigned request).
        with structlog.testing.capture_logs() as logs:
            assert await hooks.post(_hook(policy), {"n": 0}, namespace="llm") is None
        assert a.requests == []
        assert any(e["event"] == "webhook.refused" and "Secret llm/hook-key" in e["error"] for e in logs)
        await kube.create(SECRET, _secret(b"first-key"))
        assert await hooks.post(_hook(policy), {"n": 1}, namespace="llm") == 200
        body, header = a.requests[-1]
        assert header is not None and receiver_verifies(b"first-key", body, header)
        assert not receiver_verifies(b"other-key", body, header)
        assert not receiver_verifies(b"first-key", body.replace(b"1", b"2"), header)  # a changed body fails
        # Rotated: the next request is signed with the new key, no restart.
        secret = await kube.get(ResourceRef(SECRET, "hook-key", "llm"))
        secret["data"]["key"] = base64.b64encode(b"second-key").decode()
        await kube.replace(SECRET, secret)
        assert await hooks.post(_hook(policy), {"n": 2}, namespace="llm") == 200
        body, header = a.requests[-1]
        assert header is not None and receiver_verifies(b"second-key", body, header)
        assert not receiver_verifies(b"first-key", body, header)
        # A hook without signingSecret sends no signature header.
        assert await hooks.post(_hook(_policy(url + "/plain")), {"n": 3}, namespace="llm") == 200
        assert a.requests[-1][1] is None
        await hooks.aclose()
    finally:
        await kube.close()


def test_signature_format_and_replay_window() -> None:
    header = sign(b"k", b'{"a":1}', 1_700_000_000)
    assert header == "t=1700000000,v1=" + hmac.new(b"k", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert verify(b"k", b'{"a":1}', header, now=1_700_000_100)
    assert not verify(b"k", b'{"a":1}', header, now=1_700_000_301)  # older than 5 minutes: a replay
    assert not verify(b"k", b'{"a":1}', "v1=abc", now=1_700_000_000)


async def test_a_redirect_to_another_host_is_not_followed_and_closes_the_gate(
        receivers: tuple[Receiver, str, Receiver, str]) -> None:
    a, url_a, b, url_b = receivers
    a.location = url_b + "/stolen"
    hooks = HttpWebhooks(_no_wait)
    try:
        policy = _policy(url_a + "/hook", hook_type="confirm-promotion")
        assert await hooks.post(_hook(policy), {"x": 1}, namespace="llm") == 307
        state = RolloutState(phase=Phase.waiting_promotion, step=1, weight=50, candidate="v2")
        assert await WebhookGate(hooks, SystemClock()).check(policy, state) is False
        assert len(a.requests) == 2 and b.requests == []  # the other host never saw the payload
    finally:
        await hooks.aclose()


async def test_a_name_that_resolves_to_instance_metadata_is_refused() -> None:
    """`2852039166` passes the model's check (it is not an IP literal) but the resolver reads it as
    169.254.169.254: the adapter checks every resolved address before it connects."""
    hooks = HttpWebhooks(_no_wait)
    try:
        with structlog.testing.capture_logs() as logs:
            assert await hooks.post(_hook(_policy("http://2852039166/latest/meta-data")), {"x": 1}) is None
        refused = [e for e in logs if e["event"] == "webhook.refused"]
        assert refused and "169.254.169.254" in refused[0]["error"]
        assert not any(e["event"] == "webhook.failed" for e in logs)  # no connection was tried
    finally:
        await hooks.aclose()


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://hooks.example/x", "only http:// and https://"),
    ("https://user:pass@hooks.example/x", "credentials in the URL are not allowed"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://[fe80::1]/x", "link-local"),
    ("http://[::ffff:169.254.169.254]/x", "link-local"),
    ("http://metadata.google.internal/computeMetadata/v1", "instance-metadata service"),
    ("http:///x", "the host is missing"),
    ("http://hooks.example:99999/x", "not a URL"),
    ("http://hooks.example/a b", "whitespace"),
])
def test_webhook_urls_are_validated_at_load(url: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        _policy(url)
    assert message in str(info.value) and "spec.notifications.webhooks[0].url:" in str(info.value)


def test_cluster_and_private_urls_are_allowed() -> None:
    for url in ("http://hooks.llm.svc.cluster.local:8080/x", "https://10.0.0.7/x", "http://127.0.0.1:9/x"):
        assert _hook(_policy(url)).url == url
    with pytest.raises(PolicyError, match="NAME or NAME/KEY"):
        _policy("http://h/x", signing="a/b/c")
