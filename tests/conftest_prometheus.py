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
data again changes nothing. A module-scoped fixture parametrized over `STORES` gives a test module either
(`server` in test_prometheus_backfill.py).

Live scraping: both scrape the same `scrape_configs` (`shadowctl.sim.services.scrape_configs`, every 1 s).
A Prometheus is started for the targets (`prometheus_factory(scrape_targets=...)`); the session's
VictoriaMetrics is started with `-promscrape.config` pointing at a file that `VictoriaMetricsServer.scrape`
rewrites (SIGHUP reloads it), so a module adds its targets and removes them at its end without a second
process. `scrapers` (with a test parametrized over `STORES`, ids ``prometheus`` / ``victoria-metrics``)
starts either for a test's targets.
"""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest
import yaml

from shadowctl.sim.services import ScrapeTarget, scrape_configs
from shadowctl.sources.prometheus.promql import escape_regex, quote

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
    """One single-node VictoriaMetrics process; `url` is its base URL (the Prometheus query API is at /api/v1).

    It also scrapes, as Prometheus does: `-promscrape.config` names a file holding the `scrape_configs` of
    every target `scrape` was given (none at first), every `scrape_interval`.

    Two query settings differ from VictoriaMetrics' defaults. `-search.latencyOffset=0s`, so that a live
    test sees at once what was just scraped, as it does on Prometheus: by default the last 30 s are held
    back from answers (on the assumption that samples of those seconds may still arrive from other
    agents), and a test that waits for a count to appear and then asks for the window ending at the last
    scrape would wait 30 s more, and a window ending "now" would miss its last 30 s. `-search.disableCache`,
    for the imported data: the rollup result cache assumes samples arrive with current timestamps, and the
    modules import theirs into the past after others have queried (VictoriaMetrics' advice for backfilling).
    """

    def __init__(self, root: Path, scrape_interval: str = "1s") -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.scrape_interval = scrape_interval
        self.scrape_file = root / "promscrape.yml"
        self._scraping: dict[int, list[ScrapeTarget]] = {}
        self._handles = itertools.count(1)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._write_scrape_file()
        log_path = self.root / "victoria-metrics.log"
        log = log_path.open("ab")
        self._proc = subprocess.Popen(
            [
                VICTORIA_METRICS, f"-storageDataPath={self.root / 'data'}", f"-httpListenAddr=127.0.0.1:{self.port}",
                "-retentionPeriod=100y", "-dedup.minScrapeInterval=1ms", "-loggerLevel=ERROR",
                f"-promscrape.config={self.scrape_file}",
                "-search.latencyOffset=0s", "-search.disableCache",  # see the class docstring
            ],
            stdout=log, stderr=log,
        )
        log.close()
        try:
            _wait_ready(f"{self.url}/health", self._proc, log_path, "victoria-metrics")
        except RuntimeError:
            self.stop()
            raise

    def _write_scrape_file(self) -> None:
        targets = [t for group in self._scraping.values() for t in group]
        settings = {"global": {"scrape_interval": self.scrape_interval},
                    "scrape_configs": scrape_configs(targets, self.scrape_interval)}
        self.scrape_file.write_text(yaml.safe_dump(settings, sort_keys=False))

    def _reload(self, expected: set[str]) -> None:
        """Have the server read the scrape file again and wait until it scrapes exactly `expected` (addresses)."""
        self._write_scrape_file()
        assert self._proc is not None and self._proc.poll() is None, "victoria-metrics is not running"
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=5) as resp:
                active = json.load(resp)["data"]["activeTargets"]
            if {t["labels"]["instance"] for t in active} == expected:
                return
            time.sleep(0.1)
        raise RuntimeError(f"victoria-metrics did not take up the scrape targets {sorted(expected)} within 30s")

    def _addresses(self) -> set[str]:
        return {t.address for group in self._scraping.values() for t in group}

    def scrape(self, targets: list[ScrapeTarget]) -> int:
        """Scrape `targets` too from now on (as Prometheus would with them in its config); returns a handle
        for :meth:`unscrape`. Targets of the same `job` scraped at once share that job's settings.

        Returns once every target's first scrape is searchable. VictoriaMetrics makes a series it has not
        seen before searchable only at its next index update, up to about 10 s after its first sample
        (measured with 1.79.5; Prometheus: at once); `/internal/force_flush` does that update now. Series
        a target creates later (a label value seen for the first time) still take those seconds."""
        handle = next(self._handles)
        self._scraping[handle] = list(targets)
        self._reload(self._addresses())
        instances = quote("|".join(escape_regex(t.address) for t in targets))
        query = urllib.parse.urlencode({"query": f"count(up{{instance=~{instances}}})"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=30):
                pass
            with urllib.request.urlopen(f"{self.url}/api/v1/query?{query}", timeout=5) as resp:
                rows = json.load(resp)["data"]["result"]
            if rows and float(rows[0]["value"][1]) == len(targets):
                return handle
            time.sleep(0.1)
        raise RuntimeError(f"victoria-metrics did not scrape {sorted(t.address for t in targets)} within 30s")

    def unscrape(self, handle: int) -> None:
        """Stop scraping the targets `scrape` returned `handle` for."""
        if self._scraping.pop(handle, None) is not None:
            self._reload(self._addresses())

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


class Scrapers:
    """Starts a store scraping targets, as in a cluster: `scrapers("prometheus", targets)` starts a Prometheus
    for them (`prometheus_factory`), `scrapers("victoria-metrics", targets)` has the session's VictoriaMetrics
    scrape them too; either way the same `scrape_configs`, every second. `stop_all` undoes what it started
    (the Prometheus servers themselves stop with `prometheus_factory` at the end of the module). A store
    whose binary is missing skips the test that asks for it."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self._undo: list[Callable[[], None]] = []

    def __call__(self, store: str, targets: list[ScrapeTarget]) -> MetricStore:
        if store == "prometheus":
            factory: PrometheusFactory = self._request.getfixturevalue("prometheus_factory")
            server = factory(scrape_targets=targets)
            self._undo.append(server.stop)
            return server
        assert store == "victoria-metrics", store
        vm: VictoriaMetricsServer = self._request.getfixturevalue("victoria_metrics")
        handle = vm.scrape(targets)
        self._undo.append(lambda: vm.unscrape(handle))
        return vm

    def stop_all(self) -> None:
        while self._undo:
            self._undo.pop()()


@pytest.fixture
def scrapers(request: pytest.FixtureRequest) -> Iterator[Scrapers]:
    """Stores scraping a test's targets (see `Scrapers`); they stop scraping when the test ends."""
    scrapers = Scrapers(request)
    yield scrapers
    scrapers.stop_all()
