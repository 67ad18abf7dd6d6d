"""The Prometheus metric source (also Thanos Query and Mimir): the one place that knows PromQL.

- :mod:`.presets`: what each preset queries, the labels that select a variant, how gauge parts combine;
- :mod:`.promql`: a policy's metric rendered into escaped PromQL for each variant (its requests);
- :mod:`.source`: the :class:`~shadowctl.sources.base.MetricSource` that answers them, batched.
"""

from shadowctl.sources.prometheus.promql import PrometheusRequest, build_request, build_requests
from shadowctl.sources.prometheus.source import PrometheusMetricSource

__all__ = ["PrometheusMetricSource", "PrometheusRequest", "build_request", "build_requests"]
