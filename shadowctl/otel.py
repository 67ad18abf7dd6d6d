"""OpenTelemetry adapter of the controller's tracing port (:mod:`shadowctl.controller.tracing`).

Built by ``shadowctl run`` only when ``--otlp-endpoint`` (or ``OTEL_EXPORTER_OTLP_ENDPOINT``) is given,
and imported only then: the OpenTelemetry SDK is not loaded by any other command. Spans go to an
OTLP/HTTP (protobuf) receiver, batched on the SDK's own thread: an unreachable collector costs the
controller nothing but dropped spans (the SDK logs them), never a tick.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from shadowctl.errors import ShadowctlError

SERVICE = "shadowctl-controller"
TRACES_PATH = "/v1/traces"


class TracingConfigError(ShadowctlError, ValueError):
    """The OTLP endpoint is not an http(s) URL."""


def traces_url(endpoint: str) -> str:
    """The traces URL of an OTLP/HTTP endpoint given as ``OTEL_EXPORTER_OTLP_ENDPOINT`` is: a base URL
    to which the signal's path is added (a URL already ending in /v1/traces is kept)."""
    url = endpoint.strip()
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1].strip("/")) == 0:
        raise TracingConfigError(f"--otlp-endpoint {endpoint!r}: expected an http(s) URL such as "
                                 "http://otel-collector:4318")
    url = url.rstrip("/")
    return url if url.endswith(TRACES_PATH) else url + TRACES_PATH


class _Span:
    __slots__ = ("_span",)

    def __init__(self, span: Any) -> None:
        self._span = span

    @property
    def recording(self) -> bool:
        return bool(self._span.is_recording())

    def set(self, attributes: Mapping[str, Any]) -> None:
        self._span.set_attributes(dict(attributes))


class OtelTracer:
    """The :class:`shadowctl.controller.tracing.Tracer` port on an OpenTelemetry SDK tracer provider of its
    own (the process-wide global provider is left alone)."""

    def __init__(self, endpoint: str, version: str, *, exporter: SpanExporter | None = None,
                 timeout_s: float = 10.0) -> None:
        self.url = traces_url(endpoint)
        resource = Resource.create({SERVICE_NAME: SERVICE, SERVICE_VERSION: version})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(
            BatchSpanProcessor(exporter or OTLPSpanExporter(endpoint=self.url, timeout=timeout_s)))
        self._tracer = self.provider.get_tracer("shadowctl.controller", version)

    @contextmanager
    def _span(self, name: str, attributes: Mapping[str, Any]) -> Iterator[_Span]:
        with self._tracer.start_as_current_span(name, attributes=dict(attributes)) as span:
            yield _Span(span)

    def span(self, name: str, attributes: Mapping[str, Any]) -> AbstractContextManager[_Span]:
        return self._span(name, attributes)

    def shutdown(self) -> None:
        """Export what is queued, then stop (blocks up to the exporter's timeout: call it off the event loop)."""
        self.provider.shutdown()
