"""`shadowctl tap --workers N`: N processes on one port that look like one tap from outside.

The real command in a subprocess, the OpenAI stub upstream and a real Mosquitto broker; nothing is
mocked. Requests go over fresh connections, which the kernel spreads across the workers
(SO_REUSEPORT), so counts that add up in every scrape show that /metrics sums all workers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from openai_stub import OpenAIStub
from tap_helpers import collecting, eventually, free_port
from typer.testing import CliRunner

from shadowctl.cli.app import app
from shadowctl.compare.events import parse_event

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

CHAT = {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
TOPIC = "shadowctl/outputs/ns/chat/primary"


def _workers_of(pid: int) -> list[int]:
    """Live worker processes of a supervisor (its children, minus multiprocessing's resource tracker)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z" and b"resource_tracker" not in cmdline:
            out.append(int(entry.name))
    return sorted(out)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class TapProcess:
    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "shadowctl", "tap", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.text: str | None = None

    def output(self) -> str:
        """What the tap printed (once it has exited)."""
        if self.text is None and self.proc.poll() is not None:
            assert self.proc.stdout is not None
            self.text = self.proc.stdout.read().decode(errors="replace")
        return self.text or ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the supervisor did not stop within 30 s of SIGTERM") from None
        finally:
            self.text = self.output()
            assert self.proc.stdout is not None
            self.proc.stdout.close()


@pytest.fixture
def tap_workers(stub: OpenAIStub, mosquitto: MosquittoBroker) -> Iterator[tuple[TapProcess, str, int]]:
    port = free_port()
    tap = TapProcess(["--listen", f"127.0.0.1:{port}", "--upstream", stub.url, "--service", "ns/chat",
                      "--mqtt", mosquitto.url, "--workers", "2"])
    try:
        deadline = time.monotonic() + 60
        while not (_listening(port) and len(_workers_of(tap.proc.pid)) == 2):
            assert tap.proc.poll() is None, f"the tap exited: {tap.output()}"
            assert time.monotonic() < deadline, "the workers did not start within 60 s"
            time.sleep(0.1)
        yield tap, f"http://127.0.0.1:{port}", port
    finally:
        tap.stop()


async def _send(url: str, ids: list[str]) -> list[bytes]:
    """One request per fresh connection (so the kernel picks a worker for each)."""
    bodies = []
    for rid in ids:
        async with httpx.AsyncClient(timeout=15) as client:
            r = await client.post(url + "/v1/chat/completions", json=CHAT, headers={"x-request-id": rid})
            assert r.status_code == 200
            bodies.append(r.content)
    return bodies


def _requests_total(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("shadowctl_tap_requests_total{"))


async def _scrapes(url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        async with httpx.AsyncClient(timeout=15) as client:
            out.append(_requests_total((await client.get(url + "/metrics")).text))
    return out


async def test_workers_serve_one_port_and_metrics_add_up(tap_workers: tuple[TapProcess, str, int],
                                                         stub: OpenAIStub, mosquitto: MosquittoBroker) -> None:
    _, url, _ = tap_workers
    async with collecting(mosquitto.host, mosquitto.port, TOPIC) as got:
        ids = [f"w-{i}" for i in range(30)]
        bodies = await _send(url, ids)
        assert set(bodies) == {b"".join(stub.chunks("chat"))}  # byte-identical through every worker
        await eventually(lambda: len(got.messages) >= 30, 20, "30 events from the workers")
        assert sorted(parse_event(m).request_id for m in got.messages) == sorted(ids)
    # Any worker may answer a scrape; each must count all 30 (2**-29 odds that one worker had them all).
    assert await _scrapes(url, 6) == [30.0] * 6


async def test_a_worker_that_dies_is_replaced_and_its_counts_are_kept(tap_workers: tuple[TapProcess, str, int]
                                                                      ) -> None:
    tap, url, _ = tap_workers
    await _send(url, [f"before-{i}" for i in range(20)])
    victim = _workers_of(tap.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)  # its open and queued connections are lost, as with any process
    await eventually(lambda: victim not in _workers_of(tap.proc.pid), 10, "the killed worker to exit")
    await _send(url, [f"during-{i}" for i in range(10)])  # the other worker takes every new connection
    await eventually(lambda: len(_workers_of(tap.proc.pid)) == 2 and victim not in _workers_of(tap.proc.pid),
                     30, "a new worker in place of the killed one")
    await _send(url, [f"after-{i}" for i in range(10)])
    assert await _scrapes(url, 6) == [40.0] * 6  # the dead worker's counters were not lost


def test_sigterm_stops_every_worker_and_frees_the_port(tap_workers: tuple[TapProcess, str, int]) -> None:
    tap, _, port = tap_workers
    workers = _workers_of(tap.proc.pid)
    assert tap.stop() == 0
    assert not [p for p in workers if Path(f"/proc/{p}").exists() and "Z" not in
                Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nobody holds it any more


def test_workers_that_cannot_listen_stop_the_tap_with_the_reason() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        tap = TapProcess(["--listen", f"127.0.0.1:{port}", "--upstream", "http://127.0.0.1:9", "--service",
                          "ns/chat", "--workers", "2"])
        try:
            code = tap.proc.wait(timeout=60)
        finally:
            tap.stop()
    assert code != 0
    assert f"cannot listen on 127.0.0.1:{port}" in tap.output()
    assert "Traceback" not in tap.output()


def test_workers_need_a_fixed_port() -> None:
    result = CliRunner().invoke(app, ["tap", "--upstream", "http://127.0.0.1:8000", "--service", "ns/chat",
                                      "--listen", "127.0.0.1:0", "--workers", "2"])
    assert result.exit_code == 2
    assert "--workers needs a fixed port" in result.output


def test_workers_must_be_positive() -> None:
    result = CliRunner().invoke(app, ["tap", "--upstream", "http://127.0.0.1:8000", "--service", "ns/chat",
                                      "--workers", "0"])
    assert result.exit_code == 2
    assert "--workers" in result.output



