"""Reading the MQTT connection in bulk (shadowctl.sources.mqtt_read): the buffered socket on a real socket pair,
and a real aiomqtt client on a real Mosquitto receiving a burst of QoS 1 messages through it, intact and in
order; QoS 1 messages taken off the buffer directly (take_publishes), the paho version and private names that
needs, and the client without it. Nothing is mocked, except paho's version string in the one test that shows
an unknown version is refused."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

import aiomqtt
import paho.mqtt
import pytest

from shadowctl.sources.mqtt_read import (
    CHUNK,
    DIRECT_PAHO_VERSIONS,
    PAHO_PRIVATE,
    BufferedSocket,
    Received,
    paho_supported,
    read_in_bulk,
    take_publishes,
)

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker


def test_small_reads_come_from_one_large_read_and_pending_says_what_is_left() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        buffered = BufferedSocket(b)
        a.sendall(b"\x30\x05hello\x30\x03abc")
        assert buffered.recv(1) == b"\x30"
        assert buffered.pending() == 11  # the rest came with the first read
        assert buffered.recv(1) == b"\x05"
        assert buffered.recv(5) == b"hello"
        assert buffered.recv(100) == b"\x30\x03abc"  # no more than it holds, without touching the socket
        assert buffered.pending() == 0
        with pytest.raises(BlockingIOError):
            buffered.recv(1)  # nothing held, nothing on the socket: the socket's own answer
        big = bytes(range(256)) * (CHUNK // 128)  # two chunks' worth
        a.sendall(big)
        got = bytearray()
        while len(got) < len(big):
            try:
                got += buffered.recv(7)
            except BlockingIOError:
                continue
        assert bytes(got) == big
        assert buffered.fileno() == b.fileno()  # everything else is the socket's
        a.close()
        assert buffered.recv(1) == b""  # the end of the stream


@pytest.mark.asyncio
async def test_a_tls_client_keeps_its_own_socket() -> None:
    client = aiomqtt.Client("127.0.0.1", 1, tls_context=ssl.create_default_context())
    assert read_in_bulk(client) is False


@pytest.mark.asyncio
async def test_a_burst_of_qos1_messages_arrives_intact_and_in_order(mosquitto: MosquittoBroker) -> None:
    n = 3000
    received: list[bytes] = []
    subscriber = aiomqtt.Client(mosquitto.host, mosquitto.port)
    assert read_in_bulk(subscriber) is True
    async with subscriber:
        await subscriber.subscribe("bulk/#", qos=1)
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, max_inflight_messages=1000) as publisher:
            await asyncio.gather(*(publisher.publish(f"bulk/{i % 7}", f"{i:06d}".encode() * (1 + i % 50), qos=1)
                                   for i in range(n)))

        async def collect() -> None:
            async for message in subscriber.messages:
                assert isinstance(message.payload, bytes)
                received.append(message.payload)
                if len(received) == n:
                    return

        await asyncio.wait_for(collect(), 60)
        assert isinstance(subscriber._client._sock, BufferedSocket)  # the bulk reader was in use
    assert received == [f"{i:06d}".encode() * (1 + i % 50) for i in range(n)]


def _publish(topic: bytes, mid: int, payload: bytes, *, first: int = 0x32, properties: bytes | None = None) -> bytes:
    """A PUBLISH packet; with `properties` (their length byte included), an MQTT 5 one."""
    body = len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big") + (properties or b"") + payload
    length, n = bytearray(), len(body)
    while True:
        n, digit = n >> 7, n & 0x7F
        length.append(digit | (0x80 if n else 0))
        if not n:
            break
    return bytes([first]) + bytes(length) + body


_OPEN: list[socket.socket] = []


def _buffered(data: bytes) -> BufferedSocket:
    a, b = socket.socketpair()
    a.sendall(data)
    a.close()
    _OPEN.append(b)
    buffered = BufferedSocket(b)
    buffered.recv(0)  # one read of the socket fills the buffer (and returns nothing)
    return buffered


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def test_next_publish_takes_whole_qos1_publishes_and_leaves_everything_else() -> None:
    big = bytes(range(256)) * 2  # two bytes of remaining length
    data = (_publish(b"t/1", 7, b"hello") + _publish("t/é".encode(), 65535, big, first=0x3B)  # DUP and RETAIN set
            + b"\xd0\x00"  # PINGRESP
            + _publish(b"t/2", 1, b"x", first=0x30)[:0] + _publish(b"t/3", 2, b"q0", first=0x30))  # QoS 0
    buffered = _buffered(data)
    assert buffered.next_publish() == ("t/1", 7, b"hello")
    assert buffered.next_publish() == ("t/é", 65535, big)
    assert buffered.next_publish() is None  # PINGRESP: paho's
    assert buffered.recv(2) == b"\xd0\x00"
    assert buffered.next_publish() is None  # QoS 0: paho's
    assert buffered.pending() == len(_publish(b"t/3", 2, b"q0"))
    whole = _publish(b"t/4", 9, b"payload")
    for cut in range(1, len(whole)):  # not whole yet: nothing taken, paho reads the start and waits
        partial = _buffered(whole[:cut])
        assert partial.next_publish() is None
        assert partial.pending() == cut
    for bad in (_publish(b"", 1, b"empty topic"), _publish(b"\xff\xfe", 1, b"not UTF-8"),
                b"\x32\x03\x00\x09ab",  # the topic runs past the packet
                b"\x32\xff\xff\xff\xff\x7f"):  # five bytes of remaining length
        broken = _buffered(bad)
        assert broken.next_publish() is None
        assert broken.pending() == len(bad)
    v5 = _buffered(_publish(b"t/5", 3, b"p", properties=b"\x00")
                   + _publish(b"t/6", 4, b"q", properties=b"\x03\x23\x00\x01"))  # a topic alias: paho's
    assert v5.next_publish(v5=True) == ("t/5", 3, b"p")
    assert v5.next_publish(v5=True) is None
    assert v5.pending() == len(_publish(b"t/6", 4, b"q", properties=b"\x03\x23\x00\x01"))


@pytest.mark.asyncio
async def test_the_installed_paho_is_one_the_direct_path_was_written_for() -> None:
    """Fails on a paho-mqtt upgrade that take_publishes was not checked against: without this, the output source
    would only get slower (it falls back to paho's own reader). Check mqtt_read's private names against the new
    paho, then add its version to DIRECT_PAHO_VERSIONS."""
    client = aiomqtt.Client("127.0.0.1", 1)
    assert paho_supported(), (paho.mqtt.__version__, DIRECT_PAHO_VERSIONS)
    missing = [name for name in PAHO_PRIVATE if not hasattr(client._client, name)]
    assert not missing, f"paho {paho.mqtt.__version__} lacks {missing}"
    assert read_in_bulk(client) is True
    assert take_publishes(client, lambda m: None) is True


@pytest.mark.asyncio
async def test_the_direct_path_is_refused_where_it_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    manual = aiomqtt.Client("127.0.0.1", 1)
    manual._client.manual_ack_set(True)
    assert take_publishes(manual, lambda m: None) is False  # the caller acknowledges: paho's
    assert "_packet_read" not in vars(manual._client)
    monkeypatch.setattr(paho.mqtt, "__version__", "9.0.0")
    client = aiomqtt.Client("127.0.0.1", 1)
    assert take_publishes(client, lambda m: None) is False
    assert "_packet_read" not in vars(client._client)  # paho's own reader, untouched


async def _burst(mosquitto: MosquittoBroker, n: int, *, direct: bool, v5: bool = False) -> tuple[list[bytes], int]:
    """n QoS 1 messages published in one burst, as the subscriber received them, and how many came directly
    (`v5`: the subscriber speaks MQTT 5 and subscribes as a member of a shared subscription)."""
    inbox: list[asyncio.Queue[aiomqtt.Message | Received]] = []

    class Inbox(asyncio.Queue[aiomqtt.Message | Received]):
        def __init__(self, maxsize: int = 0) -> None:
            super().__init__(maxsize)
            inbox.append(self)

    subscriber = aiomqtt.Client(mosquitto.host, mosquitto.port, queue_type=Inbox,  # type: ignore[arg-type]
                                protocol=aiomqtt.ProtocolVersion.V5 if v5 else None)
    assert read_in_bulk(subscriber) is True
    assert take_publishes(subscriber, inbox[0].put_nowait) is direct
    received: list[bytes] = []
    direct_count = 0
    async with subscriber:
        await subscriber.subscribe("$share/g/bulk/#" if v5 else "bulk/#", qos=1)
        before = subscriber._client._last_bytes_received
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, max_inflight_messages=1000) as publisher:
            await asyncio.gather(*(publisher.publish(f"bulk/{i % 7}", f"{i:06d}".encode() * (1 + i % 50), qos=1)
                                   for i in range(n)))

        async def collect() -> None:
            nonlocal direct_count
            async for item in subscriber.messages:
                message = cast("aiomqtt.Message | Received", item)  # aiomqtt hands out whatever its queue holds
                payload = message.payload
                assert isinstance(payload, bytes | bytearray)
                received.append(bytes(payload))
                if isinstance(message, Received):
                    direct_count += 1
                    assert message.topic == f"bulk/{(len(received) - 1) % 7}"
                if len(received) == n:
                    return

        await asyncio.wait_for(collect(), 60)
        assert subscriber._client._last_bytes_received > before  # paho's keepalive sees the bytes
    return received, direct_count


@pytest.mark.asyncio
async def test_qos1_messages_taken_directly_arrive_intact_in_order_and_acknowledged(mosquitto: MosquittoBroker) -> None:
    """3,000 messages through Mosquitto, whose in-flight window (20 by default) sends more only as the
    subscriber's PUBACKs come back: all arrive, so the direct path acknowledged them; most came directly."""
    n = 3000
    received, direct = await _burst(mosquitto, n, direct=True)
    assert received == [f"{i:06d}".encode() * (1 + i % 50) for i in range(n)]
    assert direct > n // 2


@pytest.mark.asyncio
async def test_mqtt5_shared_subscription_messages_are_taken_directly_too(mosquitto: MosquittoBroker) -> None:
    """The pairing workers' standby setup (MQTT 5, $share/...): PUBLISH packets without properties come directly."""
    n = 2000
    received, direct = await _burst(mosquitto, n, direct=True, v5=True)
    assert received == [f"{i:06d}".encode() * (1 + i % 50) for i in range(n)]
    assert direct > n // 2


@pytest.mark.asyncio
async def test_without_the_direct_path_the_client_receives_through_paho(
        mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback: an unknown paho version leaves paho's reader in place, and the same burst arrives through it."""
    monkeypatch.setattr(paho.mqtt, "__version__", "9.0.0")
    n = 1000
    received, direct = await _burst(mosquitto, n, direct=False)
    assert received == [f"{i:06d}".encode() * (1 + i % 50) for i in range(n)]
    assert direct == 0


@pytest.mark.asyncio
async def test_the_output_source_takes_publishes_directly_and_drops_beyond_max_queued() -> None:
    from shadowctl.sources.outputs import MqttOutputSource

    source = MqttOutputSource("mqtt://127.0.0.1:1", "t/+", [], pair_ttl_s=60, expect_baseline=False, max_queued=1)
    client = source._client()
    assert "_packet_read" in vars(client._client)  # the direct path is in place on a plain-TCP 3.1.1 client
    source._deliver(Received("t/a", b"1"))
    source._deliver(Received("t/a", b"2"))  # the inbox is full: dropped (its partner expires as missing)
    assert source._inbox is not None and source._inbox.qsize() == 1
    assert source._inbox.get_nowait() == Received("t/a", b"1")
    tls = MqttOutputSource("mqtts://127.0.0.1:1", "t/+", [], pair_ttl_s=60, expect_baseline=False)
    assert "_packet_read" not in vars(tls._client()._client)  # TLS: no buffered socket, paho reads


@pytest.mark.asyncio
async def test_an_output_source_without_the_direct_path_says_so_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from structlog.testing import capture_logs

    from shadowctl.sources.outputs import MqttOutputSource

    monkeypatch.setattr(paho.mqtt, "__version__", "9.0.0")
    source = MqttOutputSource("mqtt://127.0.0.1:1", "t/+", [], pair_ttl_s=60, expect_baseline=False)
    with capture_logs() as logs:
        for _ in range(3):  # a client per (re)connection
            assert "_packet_read" not in vars(source._client()._client)
    said = [e for e in logs if "paho's own reader" in e["event"]]
    assert len(said) == 1 and said[0]["paho"] == "9.0.0"
