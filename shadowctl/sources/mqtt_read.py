"""Read the MQTT connection in bulk: one ``recv`` of up to 64 KiB, then every packet in it, per wake-up.

Why: the MQTT client (paho, under aiomqtt) reads one packet per call and each packet with several system
calls (one byte of command, one per byte of the remaining length, then the body), and aiomqtt calls it once
per "socket readable" wake-up of the event loop. At tens of thousands of output events a second that is
three or four ``recv`` calls and one loop iteration per event: about half of the output source's CPU
(docs/scaling.md, "Through Mosquitto"). :class:`BufferedSocket` answers paho's small reads from a buffer
filled by large ones, and says how much it holds through ``pending()``, the method aiomqtt already asks
an SSL socket (whose decrypted bytes the kernel cannot see either) before it goes back to the loop: so
every packet already received is handled in the same wake-up.

Nothing about delivery changes: the same packets, the same QoS 1 acknowledgements, in the same order.

**Taking QoS 1 messages directly** (:func:`take_publishes`): even read from a buffer, paho spends about as much
CPU on each received message as the output source spends pairing and scoring it (framing the packet byte by
byte, decoding it, two log calls, its callback locks and topic matcher, then aiomqtt's message and topic
objects). Where the buffer already holds a complete QoS 1 PUBLISH packet (MQTT 3.1.1, or MQTT 5 without
properties), the client's packet reader takes it from the buffer itself: topic, packet id and payload by
slicing, handed to the caller, and the PUBACK queued through paho exactly as paho would (``_send_puback``),
in the same order. Everything else (CONNACK, SUBACK, PINGRESP, QoS 0 or 2, an MQTT 5 PUBLISH with properties,
a packet not yet complete in the buffer, a malformed one) goes to paho's own reader as before, so paho still
owns the connection's state and errors. What a message taken this way does not get: paho's debug log lines
for it ("Received PUBLISH", "Sending PUBACK"), its per-topic callbacks (``message_callback_add``, which the
output source does not use) and aiomqtt's ``Message`` (the caller gets a :class:`Received`: topic and payload).

How it is put in place: paho creates its socket in ``Client._create_socket`` (paho-mqtt 2.x), which
:func:`read_in_bulk` wraps on the paho client that aiomqtt holds (``aiomqtt.Client._client``). Both are
private names of the pinned versions: where either is missing, :func:`read_in_bulk` does nothing and says
so (the client then reads as before). Plain TCP only: over TLS, paho's socket is an SSL socket whose own
``pending()`` must keep working as it is. :func:`take_publishes` replaces paho's ``_packet_read`` on that one
client and uses more of paho's private names (:data:`PAHO_PRIVATE`); it is put in place only for the paho
versions it was written against and tested with (:data:`DIRECT_PAHO_VERSIONS`), and where any of those names
is missing it does nothing (the client then works as before, only slower). ``tests/test_mqtt_read.py`` fails
when the installed paho is not one of those versions or lacks one of the names, so an upgrade cannot make
the output source silently slower.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import aiomqtt
import paho.mqtt
import paho.mqtt.client

CHUNK: Final = 65536
"""Bytes asked of the kernel per read."""


class BufferedSocket:
    """A socket whose ``recv`` reads :data:`CHUNK` bytes at a time and answers from what it holds; every other
    attribute is the socket's own."""

    __slots__ = ("_buffer", "_socket", "_start")

    def __init__(self, sock: Any) -> None:
        self._socket = sock
        self._buffer = b""
        self._start = 0

    def recv(self, size: int) -> bytes:
        """Up to `size` bytes: from the buffer where it holds any, else from one read of the socket (which may
        raise BlockingIOError, or return b"" at the end of the stream, as the socket's own recv does)."""
        if self._start >= len(self._buffer):
            data = self._socket.recv(max(size, CHUNK))
            if len(data) <= size:
                return bytes(data)
            self._buffer, self._start = bytes(data), 0
        end = self._start + size
        out = self._buffer[self._start:end]
        self._start = min(end, len(self._buffer))
        if self._start >= len(self._buffer):
            self._buffer, self._start = b"", 0
        return out

    def pending(self) -> int:
        """Bytes received and not yet read (aiomqtt reads on while there are any)."""
        return len(self._buffer) - self._start

    def next_publish(self, *, v5: bool = False) -> tuple[str, int, bytes] | None:
        """Topic, packet id and payload of the QoS 1 PUBLISH packet at the head of the buffer, taken out of it;
        None, taking nothing, where the head is not one, not whole yet, or not well formed (an empty topic or
        one that is not UTF-8, lengths that do not fit), or (`v5`: MQTT 5) carries properties: paho's reader
        then deals with it (a topic alias, for one, needs paho's state)."""
        buf, start = self._buffer, self._start
        size = len(buf)
        if size - start < 4 or buf[start] & 0xF6 != 0x32:  # PUBLISH, QoS 1, any DUP and RETAIN flags
            return None
        length, shift, i = 0, 0, start + 1
        while True:  # the remaining length: at most 4 bytes of 7 bits, least significant first
            if i >= size or i - start > 4:
                return None
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            shift += 7
            i += 1
            if byte < 0x80:
                break
        end = i + length
        mid_at = i + 2 + ((buf[i] << 8) | buf[i + 1]) if i + 2 <= size else end + 1
        if end > size or mid_at == i + 2 or mid_at + 2 > end:
            return None
        try:
            topic = buf[i + 2:mid_at].decode()
        except UnicodeDecodeError:
            return None
        mid = (buf[mid_at] << 8) | buf[mid_at + 1]
        at = mid_at + 2
        if v5:  # the properties' length comes next: only none (one zero byte) is taken here
            if at >= end or buf[at] != 0:
                return None
            at += 1
        payload = buf[at:end]
        if end >= size:
            self._buffer, self._start = b"", 0
        else:
            self._start = end
        return topic, mid, payload

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)


def read_in_bulk(client: aiomqtt.Client) -> bool:
    """Make `client` read its connection through a :class:`BufferedSocket` (before it connects); False where this
    client cannot (TLS, or a version of aiomqtt or paho without the hook: it then reads as before)."""
    paho = getattr(client, "_client", None)
    create = getattr(paho, "_create_socket", None)
    if paho is None or create is None or getattr(paho, "_ssl", False) or getattr(paho, "_transport", "") != "tcp":
        return False

    def create_buffered() -> BufferedSocket:
        return BufferedSocket(create())

    paho._create_socket = create_buffered
    return True


DIRECT_PAHO_VERSIONS: Final = ("2.2.",)
"""paho-mqtt versions (prefixes) :func:`take_publishes` was written against and tested with."""

PAHO_PRIVATE: Final = ("_packet_read", "_in_packet", "_send_puback", "_msgtime_mutex", "_last_bytes_received",
                       "_protocol", "_manual_ack", "_sock")
"""The private names of paho's client that :func:`take_publishes` reads, calls or replaces."""


@dataclass(frozen=True, slots=True)
class Received:
    """A message :func:`take_publishes` took off the connection: what the output source reads of a message."""

    topic: str
    payload: bytes


def take_publishes(client: aiomqtt.Client, deliver: Callable[[Received], None]) -> bool:
    """Have `client` hand each QoS 1 message that its :class:`BufferedSocket` holds whole to `deliver` directly,
    and acknowledge it, instead of passing it through paho's and aiomqtt's per-message machinery (see the
    module docstring). Call after :func:`read_in_bulk`, before connecting. `deliver` runs on the event loop
    and must not raise. False, changing nothing, where this client cannot: another paho version, a missing
    private name, manual acknowledgements."""
    inner = getattr(client, "_client", None)
    if inner is None or not paho_supported() or any(not hasattr(inner, name) for name in PAHO_PRIVATE):
        return False
    if inner._manual_ack:
        return False
    v5 = inner._protocol == paho.mqtt.client.MQTTv5
    read_packet = inner._packet_read
    send_puback = inner._send_puback
    clock = getattr(paho.mqtt.client, "time_func", time.monotonic)
    success = paho.mqtt.client.MQTT_ERR_SUCCESS

    def packet_read() -> Any:
        sock = inner._sock
        if inner._in_packet["command"] != 0 or not isinstance(sock, BufferedSocket):
            return read_packet()  # paho is part way through a packet, or this is not our socket
        taken = 0
        while (item := sock.next_publish(v5=v5)) is not None:
            topic, mid, payload = item
            deliver(Received(topic, payload))
            rc = send_puback(mid)
            taken += 1
            if rc:
                return rc
        if not taken:
            return read_packet()
        with inner._msgtime_mutex:  # what paho's keepalive reads: bytes came in
            inner._last_bytes_received = clock()
        return success

    inner._packet_read = packet_read
    return True


def paho_version() -> str:
    """The installed paho-mqtt's version ("" where it does not say)."""
    return str(getattr(paho.mqtt, "__version__", ""))


def paho_supported() -> bool:
    """Whether the installed paho-mqtt is one :func:`take_publishes` was written for (:data:`DIRECT_PAHO_VERSIONS`)."""
    return paho_version().startswith(DIRECT_PAHO_VERSIONS)
