"""Pytest fixtures for a real Mosquitto broker on a free port (a plugin module).

Enable with ``pytest_plugins = ["conftest_mqtt"]`` (tests/ is on sys.path); test modules
may list it themselves. Fixtures:

* ``mosquitto_broker``: a :class:`MosquittoBroker` not yet started (start, stop, pause, resume);
* ``mosquitto``: the same, started and ready.

Tests that use them skip with a reason when ``/usr/sbin/mosquitto`` is missing.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shadowctl.sim.mosquitto import MOSQUITTO, start_broker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MosquittoBroker:
    """One mosquitto process bound to 127.0.0.1:port; can be stopped and started again on the same port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.url = f"mqtt://{self.host}:{self.port}"
        self.config = workdir / f"mosquitto-{self.port}.conf"
        self.log = workdir / f"mosquitto-{self.port}.log"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\nmax_inflight_messages 1000\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            raise RuntimeError("already started")
        self.proc = start_broker(self.config, self.log, self.host, self.port, timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # in case it was paused
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the broker keeps its socket but answers nothing (a 'slow' broker)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    if not os.path.exists(MOSQUITTO):
        pytest.skip(f"needs the mosquitto binary ({MOSQUITTO}; Debian package mosquitto)")
    broker = MosquittoBroker(tmp_path)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_broker: MosquittoBroker) -> MosquittoBroker:
    mosquitto_broker.start()
    return mosquitto_broker
