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

How it is put in place: paho creates its socket in ``Client._create_socket`` (paho-mqtt 2.x), which
:func:`read_in_bulk` wraps on the paho client that aiomqtt holds (``aiomqtt.Client._client``). Both are
private names of the pinned versions: where either is missing, :func:`read_in_bulk` does nothing and says
so (the client then reads as before). Plain TCP only: over TLS, paho's socket is an SSL socket whose own
``pending()`` must keep working as it is.
"""

from __future__ import annotations

from typing import Any, Final

import aiomqtt

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
