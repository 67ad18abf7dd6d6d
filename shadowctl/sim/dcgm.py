"""A stand-in for NVIDIA's dcgm-exporter: the GPU series of one node, as the exporter exposes them.

The real exporter runs as a DaemonSet pod on every GPU node and is scraped from
*its own* pod, so what matters for the presets is which labels name the pod that
holds a GPU (docs/metrics.md, "GPU metrics"):

* each series carries the exporter's GPU labels (``gpu``, ``UUID``, ``pci_bus_id``,
  ``device``, ``modelName``, ``Hostname``, ``DCGM_FI_DRIVER_VERSION``);
* with the Kubernetes mapping (``DCGM_EXPORTER_KUBERNETES=true``, which the Helm
  chart sets) it adds ``container``, ``namespace`` and ``pod`` of the GPU's pod, or
  ``container_name``, ``pod_namespace`` and ``pod_name`` with ``--use-old-namespace``
  (``old_names``). A GPU no pod holds has no pod labels.

Scraped as the chart's ServiceMonitor does (``honorLabels: false``, see
:class:`shadowctl.sim.services.ScrapeTarget`), Prometheus renames the clashing
labels to ``exported_*`` and ``namespace`` / ``pod`` name the exporter's pod.

The values are read from the model servers' GPU knobs at every scrape, so a knob
changed at run time shows in the next scrape.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from shadowctl.sim.errors import SimError
from shadowctl.sim.modelserver import ModelKnobs, SimModelServer
from shadowctl.sim.services import serve

GPU_MODEL = "NVIDIA H100 80GB HBM3"
DRIVER_VERSION = "570.124.06"

FIELDS = (
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", "gpu_util_percent"),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", "gpu_memory_used_mib"),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", "gpu_power_watts"),
)
"""The fields served: (series name, help, the ModelKnobs attribute that gives the value)."""


@dataclass(frozen=True)
class _Gpu:
    index: int
    uuid: str
    server: SimModelServer | None
    container: str


class SimDcgmExporter:
    """The DCGM exporter of one simulated node; see the module docstring.

    ::

        exporter = SimDcgmExporter("gpu-node-1")
        exporter.attach(candidate_server, gpus=2)   # the candidate's pod holds GPUs 0 and 1
        exporter.add_idle_gpus(1)                   # GPU 2 is free
        url = await exporter.start()
    """

    def __init__(self, node: str = "sim-gpu-node", *, old_names: bool = False, kubernetes: bool = True) -> None:
        self.node = node
        self.old_names = old_names
        self.kubernetes = kubernetes
        self._gpus: list[_Gpu] = []
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    def attach(self, server: SimModelServer, gpus: int = 1, container: str = "vllm") -> None:
        """Give ``gpus`` GPUs of this node to the model server's pod."""
        if gpus < 1:
            raise SimError(f"a pod holds at least one GPU, not {gpus}")
        for _ in range(gpus):
            self._gpus.append(self._gpu(server, container))

    def add_idle_gpus(self, count: int) -> None:
        """GPUs no pod holds: the exporter serves them without pod labels, at zero use."""
        for _ in range(count):
            self._gpus.append(self._gpu(None, ""))

    def _gpu(self, server: SimModelServer | None, container: str) -> _Gpu:
        index = len(self._gpus)
        uid = uuid.UUID(bytes=hashlib.sha256(f"{self.node}/{index}".encode()).digest()[:16])
        return _Gpu(index, f"GPU-{uid}", server, container)

    def series(self) -> Iterator[tuple[str, str, dict[str, str], float]]:
        """Every (name, help, labels, value) the exporter serves now."""
        idle = ModelKnobs(gpu_util_percent=0.0, gpu_memory_used_mib=0.0, gpu_power_watts=60.0)
        for name, help_text, knob in FIELDS:
            for gpu in self._gpus:
                labels = {
                    "gpu": str(gpu.index), "UUID": gpu.uuid, "pci_bus_id": f"00000000:{0x18 + gpu.index:02X}:00.0",
                    "device": f"nvidia{gpu.index}", "modelName": GPU_MODEL, "Hostname": self.node,
                    "DCGM_FI_DRIVER_VERSION": DRIVER_VERSION,
                }
                if gpu.server is not None and self.kubernetes:
                    names = ("container_name", "pod_namespace", "pod_name") if self.old_names else (
                        "container", "namespace", "pod")
                    labels.update(zip(names, (gpu.container, gpu.server.namespace, gpu.server.pod), strict=True))
                knobs = gpu.server.knobs if gpu.server is not None else idle
                yield name, help_text, labels, float(getattr(knobs, knob))

    # ----------------------------------------------------------------- serving

    @property
    def url(self) -> str:
        if self._url is None:
            raise SimError("the DCGM exporter is not started")
        return self._url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve ``/metrics`` on ``host:port`` (0: a free port); returns the URL."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner, self._url = await serve(app, host, port, "the DCGM exporter")
        return self._url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


class _Collector(Collector):
    def __init__(self, exporter: SimDcgmExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        for name, help_text, labels, value in self._exporter.series():
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(name, help_text)
            family.add_sample(name, labels, value)  # label names differ between GPUs (an idle one has no pod)
        yield from families.values()
