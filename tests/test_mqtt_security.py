"""MQTT over TLS with passwords and an ACL: a real Mosquitto configured by shadowctl.sim.mosquitto.

The broker listens with a certificate from a throw-away CA (shadowctl.sim.pki), a password file
hashed by mosquitto_passwd and the ACL the docs describe (a tap publishes only its service's
topics; the controller reads outputs and writes only route settings and events). Real taps in
front of the OpenAI stub publish; the controller's MqttOutputSource receives. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiomqtt
import httpx
import pytest
import structlog
from conftest_mqtt import MOSQUITTO, MosquittoBroker
from openai_stub import OpenAIStub
from tap_helpers import eventually
from typer.testing import CliRunner

from shadowctl.aio import cancel_and_wait
from shadowctl.cli.app import app
from shadowctl.cli.tap_cmd import BrokerOptions
from shadowctl.compare.events import OutputEvent, Variant
from shadowctl.sim.mosquitto import (
    MOSQUITTO_PASSWD,
    AclRule,
    BrokerFiles,
    controller_rules,
    tap_rules,
    write_broker_config,
)
from shadowctl.sim.pki import LocalCA
from shadowctl.sources.outputs import MqttOutputSource
from shadowctl.tap.metrics import TapMetrics
from shadowctl.tap.proxy import TapConfig, TapProxy, bound_port, default_topic, start_server
from shadowctl.tap.publisher import BrokerSettings, EventPublisher, PublisherRefused

pytestmark = pytest.mark.skipif(not (Path(MOSQUITTO).exists() and Path(MOSQUITTO_PASSWD).exists()),
                                reason="needs mosquitto and mosquitto_passwd (Debian package mosquitto)")

CHAT = {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}]}
USERS = {"tap-chat": "chat-pw", "tap-other": "other-pw", "shadowctl": "controller-pw"}


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, BrokerFiles, LocalCA]]:
    ca = LocalCA(tmp_path / "pki")
    broker = MosquittoBroker(tmp_path)
    rules: dict[str, list[AclRule]] = {
        "tap-chat": tap_rules("ns", "chat", "chat-policy"),
        "tap-other": tap_rules("ns", "other"),
        "shadowctl": controller_rules(),
    }
    files = write_broker_config(tmp_path / "broker", broker.port, ca, USERS, rules)
    broker.config = files.config
    broker.start()
    yield broker, files, ca
    broker.stop()


def _tls(ca: LocalCA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.cert_file))


@contextlib.asynccontextmanager
async def _tap(upstream: str, files: BrokerFiles, ca: LocalCA, user: str, password: str, *,
               service: str = "chat", settings: BrokerSettings | None = None
               ) -> AsyncIterator[tuple[str, TapMetrics, EventPublisher]]:
    metrics = TapMetrics("primary")
    settings = settings or BrokerSettings(files.host, files.port, username=user, password=password, tls=_tls(ca),
                                          timeout_s=5.0, keepalive_s=5)
    publisher = EventPublisher(settings, metrics, queue_size=5, backoff_initial_s=0.05, backoff_max_s=0.2)
    config = TapConfig(upstream=upstream, variant=Variant.primary, namespace="ns", service=service,
                       topic=default_topic("ns", service, Variant.primary))
    runner = await start_server(TapProxy(config, publisher, metrics), "127.0.0.1", 0)
    task = asyncio.create_task(publisher.run())
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}", metrics, publisher
    finally:
        await runner.cleanup()
        await cancel_and_wait(task)


@contextlib.asynccontextmanager
async def _controller(files: BrokerFiles, ca: LocalCA, topic: str = "shadowctl/outputs/ns/+/+", *,
                      tls: ssl.SSLContext | None = None) -> AsyncIterator[list[OutputEvent]]:
    """The controller's output source (user shadowctl) over TLS; yields the events it received so far."""
    source = MqttOutputSource(files.url, topic, [], pair_ttl_s=60, expect_baseline=False, username="shadowctl",
                              password=USERS["shadowctl"], tls_context=tls or _tls(ca))
    got: list[OutputEvent] = []

    async def consume() -> None:
        async for event in source.events():
            got.append(event)

    task = asyncio.create_task(consume())
    try:
        await asyncio.wait_for(source.subscribed.wait(), 10)
        yield got
    finally:
        await cancel_and_wait(task)


async def _ask(client: httpx.AsyncClient, url: str, request_id: str) -> int:
    answer = await client.post(url + "/v1/chat/completions", json=CHAT, headers={"x-request-id": request_id})
    return answer.status_code


async def test_a_tap_with_its_credentials_publishes_and_the_controller_receives_over_tls(
    stub: OpenAIStub, secure_broker: tuple[MosquittoBroker, BrokerFiles, LocalCA]
) -> None:
    _, files, ca = secure_broker
    async with (_controller(files, ca) as got, _tap(stub.url, files, ca, "tap-chat", USERS["tap-chat"]) as tap,
                httpx.AsyncClient() as client):
        url, metrics, publisher = tap
        await asyncio.wait_for(publisher.connected.wait(), 10)
        assert await _ask(client, url, "ok-1") == 200
        await eventually(lambda: [e.request_id for e in got] == ["ok-1"], what="the event over TLS")
        assert metrics.registry.get_sample_value("shadowctl_tap_broker_refused_total") == 0


async def test_a_tap_with_wrong_credentials_is_refused_and_requests_still_succeed(
    stub: OpenAIStub, secure_broker: tuple[MosquittoBroker, BrokerFiles, LocalCA]
) -> None:
    _, files, ca = secure_broker
    with structlog.testing.capture_logs() as logs:
        async with (_controller(files, ca) as got,
                    _tap(stub.url, files, ca, "tap-chat", "not-the-password") as tap,
                    httpx.AsyncClient() as client):
            url, metrics, publisher = tap
            await eventually(lambda: (metrics.registry.get_sample_value("shadowctl_tap_broker_refused_total") or 0)
                             >= 2, what="the broker refusing twice")
            codes = [await _ask(client, url, f"refused-{i}") for i in range(10)]
            assert codes == [200] * 10  # the user's requests never wait for the broker
            assert not publisher.connected.is_set()
            assert metrics.registry.get_sample_value("shadowctl_tap_broker_connected") == 0
            dropped = metrics.registry.get_sample_value("shadowctl_tap_events_dropped_total", {"reason": "queue_full"})
            assert dropped is not None and dropped >= 4  # a queue of 5, 10 events, nothing published
            assert got == []
    refusals = [e for e in logs if "refused the credentials" in e["event"]]
    assert len(refusals) == 1 and refusals[0]["log_level"] == "error"  # logged once, however many retries
    assert all("not-the-password" not in str(e) for e in logs)


async def test_the_acl_keeps_a_tap_to_its_own_services_topics(
    stub: OpenAIStub, secure_broker: tuple[MosquittoBroker, BrokerFiles, LocalCA]
) -> None:
    """tap-other's credentials are good, but it publishes chat's topic: the broker drops the event (MQTT 3.1.1
    cannot tell the publisher); chat's own tap, right after, gets through."""
    _, files, ca = secure_broker
    async with _controller(files, ca) as got, httpx.AsyncClient() as client:
        async with _tap(stub.url, files, ca, "tap-other", USERS["tap-other"]) as (url, metrics, publisher):
            await asyncio.wait_for(publisher.connected.wait(), 10)
            assert await _ask(client, url, "forged-1") == 200
            await eventually(lambda: (metrics.registry.get_sample_value("shadowctl_tap_events_published_total")
                                      or 0) >= 1, what="the broker acknowledging the forged event")
        async with _tap(stub.url, files, ca, "tap-chat", USERS["tap-chat"]) as (url, _, publisher):
            await asyncio.wait_for(publisher.connected.wait(), 10)
            assert await _ask(client, url, "genuine-1") == 200
            await eventually(lambda: any(e.request_id == "genuine-1" for e in got), what="chat's own event")
        assert [e.request_id for e in got] == ["genuine-1"]


async def test_the_controller_cannot_publish_outputs_but_may_publish_routes(
    secure_broker: tuple[MosquittoBroker, BrokerFiles, LocalCA]
) -> None:
    """Raw clients on both sides: every message is collected, valid event or not."""
    _, files, ca = secure_broker
    outputs: list[bytes] = []
    routes: list[bytes] = []
    ready = asyncio.Event()

    async def subscribe(user: str, topic: str, into: list[bytes]) -> None:
        async with aiomqtt.Client(files.host, files.port, username=user, password=USERS[user],
                                  tls_context=_tls(ca)) as client:
            await client.subscribe(topic, qos=1)
            ready.set()
            async for message in client.messages:
                into.append(bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b"")

    readers = []
    try:
        for user, topic, into in (("shadowctl", "shadowctl/outputs/#", outputs),
                                  ("tap-chat", "shadowctl/route/ns/chat-policy", routes)):
            ready.clear()
            readers.append(asyncio.create_task(subscribe(user, topic, into)))
            await asyncio.wait_for(ready.wait(), 10)
        async with aiomqtt.Client(files.host, files.port, username="shadowctl", password=USERS["shadowctl"],
                                  tls_context=_tls(ca)) as controller:
            await controller.publish("shadowctl/outputs/ns/chat/primary", b"from-the-controller", qos=1)
            await controller.publish("shadowctl/route/ns/chat-policy", b"route-1", qos=1)
        async with aiomqtt.Client(files.host, files.port, username="tap-chat", password=USERS["tap-chat"],
                                  tls_context=_tls(ca)) as tap:
            await tap.publish("shadowctl/outputs/ns/chat/primary", b"from-the-tap", qos=1)
        await eventually(lambda: routes == [b"route-1"], what="the route setting reaching the tap")
        await eventually(lambda: b"from-the-tap" in outputs, what="the tap's event reaching the controller")
        assert outputs == [b"from-the-tap"]  # the controller's own publish to an outputs topic was dropped
    finally:
        await cancel_and_wait(*readers)


@pytest.fixture
def mtls_broker(tmp_path: Path) -> Iterator[tuple[BrokerFiles, LocalCA]]:
    """The same broker with ``require_certificate true``: every client also presents a certificate from the CA."""
    ca = LocalCA(tmp_path / "pki")
    broker = MosquittoBroker(tmp_path)
    rules = {"tap-chat": tap_rules("ns", "chat"), "shadowctl": controller_rules()}
    files = write_broker_config(tmp_path / "broker", broker.port, ca, USERS, rules, require_certificate=True)
    broker.config = files.config
    broker.start()
    yield files, ca
    broker.stop()


async def test_a_tap_needs_its_client_certificate_when_the_broker_requires_one(
    stub: OpenAIStub, mtls_broker: tuple[BrokerFiles, LocalCA], tmp_path: Path
) -> None:
    """The broker settings the tap's flags make (BrokerOptions: --mqtt mqtts://..., --mqtt-ca, user and password,
    with and without --mqtt-cert/--mqtt-key): without a certificate the broker ends the TLS session (under TLS 1.3
    with an alert after the handshake, which only paho's log shows), the tap says so once and counts it, and
    serves every request; with its certificate it publishes and the controller (with its own) receives."""
    files, ca = mtls_broker
    controller_cert = ca.issue("controller", "shadowctl", client=True)
    tap_cert = ca.issue("tap-chat", "tap-chat", client=True)
    controller_tls = _tls(ca)
    controller_tls.load_cert_chain(str(controller_cert.cert), str(controller_cert.key))
    without = BrokerOptions(files.host, files.port, True, str(ca.cert_file), "tap-chat", USERS["tap-chat"])
    with_cert = BrokerOptions(files.host, files.port, True, str(ca.cert_file), "tap-chat", USERS["tap-chat"],
                              str(tap_cert.cert), str(tap_cert.key))
    with structlog.testing.capture_logs() as logs:
        async with _controller(files, ca, tls=controller_tls) as got, httpx.AsyncClient() as client:
            async with _tap(stub.url, files, ca, "", "", settings=without.settings()) as (url, metrics, publisher):
                await eventually(lambda: (metrics.registry.get_sample_value("shadowctl_tap_broker_refused_total")
                                          or 0) >= 1, limit=20, what="the broker refusing a tap without certificate")
                assert [await _ask(client, url, f"no-cert-{i}") for i in range(5)] == [200] * 5
                assert not publisher.connected.is_set()
                assert isinstance(publisher.last_error, PublisherRefused), publisher.last_error
                assert "refused the TLS client certificate (TLS alert CERTIFICATE_REQUIRED)" in str(
                    publisher.last_error)
            async with _tap(stub.url, files, ca, "", "", settings=with_cert.settings()) as (url, metrics, publisher):
                await asyncio.wait_for(publisher.connected.wait(), 10)
                assert await _ask(client, url, "with-cert-1") == 200
                await eventually(lambda: any(e.request_id == "with-cert-1" for e in got), what="the event over mTLS")
                assert metrics.registry.get_sample_value("shadowctl_tap_broker_refused_total") == 0
                assert publisher.last_error is None
            assert [e.request_id for e in got] == ["with-cert-1"]
    refusals = [e for e in logs if "refused the credentials" in e["event"]]
    assert len(refusals) == 1 and "CERTIFICATE_REQUIRED" in refusals[0]["error"]
    assert all(USERS["tap-chat"] not in str(e) for e in logs)


@pytest.fixture
def structlog_restored() -> Iterator[None]:
    """The CLI sets logging up for the whole process (warnings only): put back what the other tests expect."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.parametrize(("args", "message"), [
    (["--mqtt-cert", "c.pem", "--mqtt", "mqtts://127.0.0.1:8883"], "--mqtt-cert and --mqtt-key go together"),
    (["--mqtt-key", "k.pem", "--mqtt", "mqtts://127.0.0.1:8883"], "--mqtt-cert and --mqtt-key go together"),
    (["--mqtt-cert", "c.pem", "--mqtt-key", "k.pem", "--mqtt", "mqtt://127.0.0.1:1883"],
     "--mqtt-cert needs an mqtts:// broker"),
    (["--mqtt-cert", "c.pem", "--mqtt-key", "k.pem"], "--mqtt-cert and --mqtt-key need --mqtt"),
    (["--mqtt-cert", "/nonexistent/c.pem", "--mqtt-key", "/nonexistent/k.pem", "--mqtt", "mqtts://127.0.0.1:8883"],
     "--mqtt-cert '/nonexistent/c.pem', --mqtt-key '/nonexistent/k.pem': cannot load"),
])
@pytest.mark.usefixtures("structlog_restored")
def test_the_tap_checks_its_client_certificate_flags_before_it_starts(args: list[str], message: str) -> None:
    answer = CliRunner().invoke(app, ["tap", "--upstream", "http://127.0.0.1:9", "--service", "ns/chat",
                                      "--listen", "127.0.0.1:0", *args])
    assert answer.exit_code != 0 and message in answer.output, answer.output
