"""Reading the MQTT connection in bulk (shadowctl.sources.mqtt_read): the buffered socket on a real socket pair,
and a real aiomqtt client on a real Mosquitto receiving a burst of QoS 1 messages through it, intact and in
order. Nothing is mocked."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING

import aiomqtt
import pytest

from shadowctl.sources.mqtt_read import CHUNK, BufferedSocket, read_in_bulk

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
