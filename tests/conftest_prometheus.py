"""Pytest plugin: a real Prometheus server (Debian package `prometheus`) on a free port.

Enable with ``pytest_plugins = ["conftest_prometheus"]`` (tests/ is on sys.path) in tests/conftest.py
or in a test module.

`PrometheusServer` runs /usr/bin/prometheus with its own temporary data dir and
config; `backfill` writes OpenMetrics text into TSDB blocks with `promtool tsdb
create-blocks-from openmetrics` before the server starts (the blocks are then
loaded from disk, so their data may lie anywhere in the past; retention is set
to 100y so that they are never deleted). Tests query at fixed timestamps inside
the backfilled data, which makes every `increase` exact.

`VictoriaMetricsServer` runs /usr/bin/victoria-metrics (Debian package `victoria-metrics`) the same way:
its own data dir, a free port, retention 100y. Its query API is Prometheus' (`/api/v1/query`,
`/api/v1/query_range`, `/api/v1/series`), so the Prometheus source talks to it unchanged. Data goes in
through `/api/v1/import/prometheus` (the text format with millisecond timestamps; the backfill's
OpenMetrics lines are converted) and `/internal/force_flush` makes it searchable at once, where
Prometheus needs promtool's blocks before it starts. One server is shared by the whole session
(`victoria_metrics`): each module imports its own series at its own times, and duplicates of a sample
(same series, same timestamp) are dropped (`-dedup.minScrapeInterval=1ms`), so a module that imports its
data again changes nothing. `metric_store` (module-scoped, parametrized) gives a test module either.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
import yaml

from shadowctl.sim.services import ScrapeTarget, scrape_configs

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
HAVE_PROMETHEUS = Path(PROMETHEUS).exists() and Path(PROMTOOL).exists()
SKIP_REASON = "needs the prometheus and promtool binaries (Debian package prometheus)"
VICTORIA_METRICS = shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"
HAVE_VICTORIA_METRICS = Path(VICTORIA_METRICS).exists()
VM_SKIP_REASON = "needs the victoria-metrics binary (Debian package victoria-metrics; hack/setup.sh installs it)"
STORES = ("prometheus", "victoria-metrics")
"""The Prometheus-compatible servers `metric_store` runs a module against."""



def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """Terminate a server process, killed after 10 s (None or already gone: nothing to do)."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

class MetricStore(Protocol):
    """What the tests use of a server: its base URL and how many queries it answered."""

    @property
    def url(self) -> str: ...

    def query_count(self) -> float: ...


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backfill(openmetrics: str, data_dir: Path) -> None:
    """Write OpenMetrics text (ending in `# EOF`) as TSDB blocks into `data_dir`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    source = data_dir.parent / (data_dir.name + ".om")
    source.write_text(openmetrics if openmetrics.endswith("# EOF\n") else openmetrics + "# EOF\n")
    subprocess.run(
        [PROMTOOL, "tsdb", "create-blocks-from", "openmetrics", str(source), str(data_dir)],
        check=True, capture_output=True, timeout=60,
    )


class PrometheusServer:
    """One Prometheus process; `url` is its base URL."""

    def __init__(self, root: Path, scrape_targets: list[ScrapeTarget] | None = None, scrape_interval: str = "1s") -> None:
        self.root = root
        self.data_dir = root / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.scrape_targets = scrape_targets or []
        self.scrape_interval = scrape_interval
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = self.root / "prometheus.yml"
        settings: dict[str, object] = {"global": {"scrape_interval": self.scrape_interval, "evaluation_interval": "1m"}}
        if self.scrape_targets:
            # honor_labels as each target says (False by default, as a ServiceMonitor or PodMonitor has it).
            settings["scrape_configs"] = scrape_configs(self.scrape_targets, self.scrape_interval)
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.root / "prometheus.log").open("ab")
        self._proc = subprocess.Popen(
            [
                PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={self.data_dir}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=100y",
                "--log.level=warn", "--web.enable-lifecycle",
            ],
            stdout=log, stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(self.root / 'prometheus.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("prometheus did not become ready within 30s")

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None

    def query_count(self) -> float:
        """How many /api/v1/query and /api/v1/query_range calls the server has answered (any status)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            if family.name != "prometheus_http_requests":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("handler") in (
                    "/api/v1/query", "/api/v1/query_range"
                ):
                    total += sample.value
        return total


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not become ready within 30s")


def import_lines(openmetrics: str) -> str:
    """OpenMetrics sample lines (``name{labels} value seconds``) as the Prometheus text format that
    VictoriaMetrics imports (timestamps in milliseconds); comments and ``# EOF`` are dropped."""
    out = []
    for line in openmetrics.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        series_and_value, _, stamp = line.rpartition(" ")
        out.append(f"{series_and_value} {round(float(stamp) * 1000)}")
    return "\n".join(out) + "\n"


class VictoriaMetricsServer:
    """One single-node VictoriaMetrics process; `url` is its base URL (the Prometheus query API is at /api/v1)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log_path = self.root / "victoria-metrics.log"
        log = log_path.open("ab")
        self._proc = subprocess.Popen(
            [
                VICTORIA_METRICS, f"-storageDataPath={self.root / 'data'}", f"-httpListenAddr=127.0.0.1:{self.port}",
                "-retentionPeriod=100y", "-dedup.minScrapeInterval=1ms", "-loggerLevel=ERROR",
                # Answer at once for any time: the default holds back the last 30 s (-search.latencyOffset)
                # and caches rollups, which would hide the samples a live test just scraped.
                "-search.latencyOffset=0s", "-search.disableCache",
            ],
            stdout=log, stderr=log,
        )
        log.close()
        try:
            _wait_ready(f"{self.url}/health", self._proc, log_path, "victoria-metrics")
        except RuntimeError:
            self.stop()
            raise

    def load(self, openmetrics: str) -> None:
        """Import OpenMetrics sample lines (see :func:`import_lines`) and make them searchable now."""
        request = urllib.request.Request(f"{self.url}/api/v1/import/prometheus",
                                         data=import_lines(openmetrics).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=60) as resp:
            assert resp.status == 204, resp.status
        with urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=30):
            pass

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None

    def query_count(self) -> float:
        """How many /api/v1/query and /api/v1/query_range calls the server has answered.

        VictoriaMetrics renders /metrics at most once a second (a read within a second of the last one
        answers the same numbers), so this waits a little over a second first."""
        time.sleep(1.1)
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        # VictoriaMetrics' own exposition (no TYPE lines) is read line by line: prometheus_client's
        # parser takes its untyped *_total lines for another family.
        paths = ('vm_http_requests_total{path="/api/v1/query"} ', 'vm_http_requests_total{path="/api/v1/query_range"} ')
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(paths))


@pytest.fixture(scope="session")
def victoria_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetricsServer]:
    """One VictoriaMetrics for the session (skips without the binary); modules import their own data."""
    if not HAVE_VICTORIA_METRICS:
        pytest.skip(VM_SKIP_REASON)
    server = VictoriaMetricsServer(tmp_path_factory.mktemp("victoria-metrics"))
    server.start()
    yield server
    server.stop()


class PrometheusFactory:
    """Starts servers for one test module and stops them all at its end."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self._tmp = tmp
        self.servers: list[PrometheusServer] = []

    def __call__(self, openmetrics: str | None = None, scrape_targets: list[ScrapeTarget] | None = None) -> PrometheusServer:
        server = PrometheusServer(self._tmp.mktemp("prometheus"), scrape_targets)
        if openmetrics is not None:
            backfill(openmetrics, server.data_dir)
        self.servers.append(server)
        server.start()
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture(scope="module")
def prometheus_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusFactory]:
    """Skips without the binaries; every server it starts is stopped when the module ends."""
    if not HAVE_PROMETHEUS:
        pytest.skip(SKIP_REASON)
    factory = PrometheusFactory(tmp_path_factory)
    yield factory
    factory.stop_all()
