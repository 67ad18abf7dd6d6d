"""Real Prometheus and Mosquitto servers, started as child processes on free local ports.

The local environment runs the real binaries from Debian's packages
(`prometheus`, `mosquitto`) rather than imitations: the controller's queries and
the taps' MQTT traffic go through the same software as in a cluster. Each
process gets its own temporary directory and is stopped (then killed, if it
does not stop) when the environment closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from aiohttp import web

from shadowctl.sim.errors import SimError


async def serve(app: web.Application, host: str, port: int, what: str) -> tuple[web.AppRunner, str]:
    """Serve an aiohttp app on ``host:port`` (0: a free port): its runner and URL. SimError naming `what`
    when it cannot listen."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SimError(f"{what}: cannot listen on {host}:{port}: {exc}") from exc
    return runner, f"http://{host}:{runner.addresses[0][1]}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str, *candidates: str) -> str:
    found = shutil.which(name) or next((c for c in candidates if Path(c).exists()), None)
    if found is None:
        raise SimError(f"{name} is not installed: run hack/setup.sh (it installs the Debian package {name})")
    return found


class _Process:
    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"

    def _spawn(self, argv: Sequence[str]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(list(argv), stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        finally:
            log.close()

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-1500:] if self.log_path.exists() else ""
            raise SimError(f"{self.name} exited with code {self.proc.returncode}: {tail}")

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        for _ in range(50):
            if proc.poll() is not None:
                return
            await asyncio.sleep(0.1)
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


@dataclass(frozen=True)
class ScrapeTarget:
    """One /metrics endpoint and the labels Kubernetes service discovery would give it.

    ``honor_labels`` is False as in a ServiceMonitor or PodMonitor by default (and the dcgm-exporter
    chart's): a label the endpoint exposes that the target also has is renamed ``exported_<name>``.
    """

    job: str
    address: str  # host:port
    labels: Mapping[str, str]
    path: str = "/metrics"
    honor_labels: bool = False


def scrape_configs(targets: Sequence[ScrapeTarget], scrape_interval: str | None = None) -> list[dict[str, object]]:
    """Prometheus ``scrape_configs`` for the targets, one job per ``job`` name (its first target's path and
    ``honor_labels`` stand for the job's)."""
    jobs: dict[str, list[ScrapeTarget]] = {}
    for target in targets:
        jobs.setdefault(target.job, []).append(target)
    out: list[dict[str, object]] = []
    for job, members in jobs.items():
        config: dict[str, object] = {"job_name": job, "metrics_path": members[0].path,
                                     "honor_labels": members[0].honor_labels}
        if scrape_interval is not None:
            config["scrape_interval"] = scrape_interval
        config["static_configs"] = [{"targets": [t.address], "labels": dict(t.labels)} for t in members]
        out.append(config)
    return out


class PrometheusProcess(_Process):
    """`prometheus` scraping the given targets every `scrape_interval`."""

    def __init__(self, workdir: Path, targets: Sequence[ScrapeTarget], scrape_interval: str = "1s") -> None:
        super().__init__("prometheus", workdir)
        self.port = free_port()
        self.targets = list(targets)
        self.scrape_interval = scrape_interval

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, object]:
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "scrape_configs": scrape_configs(self.targets),
        }

    async def start(self, wait_s: float = 30.0) -> None:
        binary = find_binary("prometheus", "/usr/bin/prometheus")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self._spawn([
            binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
        ])
        async with httpx.AsyncClient() as client:
            for _ in range(int(wait_s * 10)):
                self._check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/-/ready", timeout=1.0)).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise SimError(f"prometheus did not become ready within {wait_s:g}s (log: {self.log_path})")


class MosquittoProcess(_Process):
    """`mosquitto` listening on 127.0.0.1, anonymous, no persistence."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("mosquitto", workdir)
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def start(self, wait_s: float = 10.0) -> None:
        binary = find_binary("mosquitto", "/usr/sbin/mosquitto")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "mosquitto.conf"
        config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self._spawn([binary, "-c", str(config)])
        for _ in range(int(wait_s * 20)):
            self._check_alive()
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            await asyncio.sleep(0.05)
        raise SimError(f"mosquitto did not listen within {wait_s:g}s (log: {self.log_path})")
