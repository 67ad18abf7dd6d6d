"""`shadowctl run`: the controller process (in-cluster, or against any cluster a kubeconfig reaches)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import ssl
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import structlog
import typer

from shadowctl.aio import cancel_and_wait
from shadowctl.cli.common import ContextOpt, KubeconfigOpt, configure_logging, fail
from shadowctl.cli.prom_opts import (
    URL_ENV,
    BasicAuthFileOpt,
    CaFileOpt,
    InsecureOpt,
    TimeoutOpt,
    TokenFileOpt,
    connection_options,
)
from shadowctl.compare.comparators import Embedder
from shadowctl.compare.events import parse_broker_url
from shadowctl.controller.analysis import Analyzer, BatchingSource
from shadowctl.controller.clock import SystemClock
from shadowctl.controller.manager import Manager
from shadowctl.controller.metrics import ControllerMetrics
from shadowctl.controller.notify import ClusterNotifier, Publish, WebhookGate
from shadowctl.controller.outputs import OutputHub, OutputSourcePort
from shadowctl.controller.reconciler import Reconciler
from shadowctl.controller.sampling import SamplingTuner
from shadowctl.controller.server import make_app, serve
from shadowctl.controller.shard import ALL, Shard
from shadowctl.controller.tracing import NO_TRACER, Tracer
from shadowctl.controller.writes import REFRESH_FLOOR
from shadowctl.errors import ShadowctlError
from shadowctl.kube import KubeClient, LeaderElector
from shadowctl.policy.model import ShadowPolicy
from shadowctl.routers.base import Unsupported
from shadowctl.routers.factory import router_for
from shadowctl.routers.tap import ChannelSettings, TapChannel
from shadowctl.sources.base import MetricSource, SourceConfigError
from shadowctl.sources.llmjudge import judge_for_policy
from shadowctl.sources.outputs import EmbedderUnavailable, MqttOutputSource, load_local_embedder
from shadowctl.sources.prometheus import PrometheusMetricSource
from shadowctl.sources.routing import RoutingSource, secret_connect
from shadowctl.sources.secrets import SecretReader, parse_secret_ref, read_secret_value, tls_provider
from shadowctl.tap.metrics import TapMetrics
from shadowctl.tap.publisher import BrokerSettings, EventPublisher, PublisherError, client_tls, file_password
from shadowctl.webhooks import HttpWebhooks, SigningKey


@dataclass(frozen=True)
class EventsMqttAuth:
    """How the controller logs in to the events broker (--events-mqtt-*): the outputs subscriber's settings,
    from files (a mounted Secret) since the events broker belongs to no one policy."""

    username: str | None = None
    password_file: str | None = None
    """Read at every connect: a rotated Secret mounted here applies at the next reconnect."""
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def events_broker_settings(url: str, auth: EventsMqttAuth) -> BrokerSettings:
    """The events publisher's broker settings; ValueError (a bad URL, a certificate without its key, TLS files on
    mqtt://) or OSError/ssl.SSLError (a file that does not load) say what is wrong, never with a password."""
    host, port, tls = parse_broker_url(url)
    if (auth.cert_file is None) != (auth.key_file is None):
        raise ValueError("--events-mqtt-cert and --events-mqtt-key go together")
    if not tls and (auth.ca_file or auth.cert_file):
        raise ValueError(f"--events-mqtt-ca and --events-mqtt-cert need an mqtts:// broker, not {url!r}")
    password = file_password(auth.password_file, "--events-mqtt-password-file") if auth.password_file else None
    return BrokerSettings(host, port, username=auth.username, password_provider=password,
                          tls=client_tls(auth.ca_file, auth.cert_file, auth.key_file) if tls else None,
                          client_id=f"shadowctl-events-{uuid.uuid4().hex[:8]}")


@dataclass(frozen=True)
class RunOptions:
    kubeconfig: str | None
    context: str | None
    namespace: str | None
    selector: str | None
    prometheus: str | None
    events_mqtt: str | None
    listen: str
    leader_elect: bool
    lease_name: str
    lease_namespace: str
    lease_duration: float
    renew_deadline: float
    retry_period: float
    min_interval: float
    prometheus_options: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments for PrometheusMetricSource: credentials, TLS, timeout, max_batch."""
    embedder: Embedder | None = None
    """The `semantic` comparator's local embedding model (--embedding-model), if any."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP base URL for the spans of looks and decisions (--otlp-endpoint); None: no tracing."""
    shard: Shard = ALL
    """Run only this shard's policies (--shard I/N), electing a leader on the shard's own Lease."""
    events_mqtt_auth: EventsMqttAuth = EventsMqttAuth()
    """User, password file, CA and client certificate for --events-mqtt."""
    pairing_workers: int = 1
    """Processes pairing each policy whose taps publish on partitions (--pairing-workers)."""
    status_refresh: float = REFRESH_FLOOR
    """Least seconds between status writes that only refresh figures (--status-refresh; controller/writes.py)."""


def mqtt_password_provider(kube: KubeClient, policy: ShadowPolicy) -> Callable[[], Awaitable[str]] | None:
    """Reads spec.analysis.outputs.mqtt.passwordSecret (``name/key``, key ``password`` by default) from the
    policy's namespace at every connect; None when the policy names no Secret (then $SHADOWCTL_MQTT_PASSWORD)."""
    outputs = policy.spec.analysis.outputs
    ref = outputs.mqtt.password_secret if outputs is not None else None
    if ref is None:
        return None
    name, key = parse_secret_ref(ref, "password")
    namespace = policy.metadata.namespace

    async def read() -> str:
        return await read_secret_value(kube, namespace, name, key, field="spec.analysis.outputs.mqtt.passwordSecret")

    return read


def webhook_signing_key(kube: KubeClient) -> SigningKey:
    """A webhook's signing key from its Secret in the policy's namespace, read at every call (a rotated
    Secret signs the next request); surrounding whitespace is dropped, as for every Secret value."""

    async def read(namespace: str, name: str, key: str) -> bytes:
        text = await read_secret_value(kube, namespace, name, key, field="spec.notifications.webhooks[].signingSecret")
        return text.encode()

    return read


def cached_embedder(embed: Embedder, size: int = 4096) -> Embedder:
    """Remember recent embeddings: the primary's answer is compared with the candidate's and with the
    baseline replica's, and an embedding costs about 10 ms of CPU (thread-safe: lru_cache locks)."""

    @functools.lru_cache(maxsize=size)
    def one(text: str) -> tuple[float, ...]:
        return tuple(embed(text))

    return one


async def run_controller(opts: RunOptions, stop: asyncio.Event | None = None, *,
                         metric_source: MetricSource | None = None) -> None:
    """Wire the adapters and run until `stop` is set (or the task is cancelled).

    `metric_source` replaces the Prometheus wiring (the fault campaign, bench/faults, runs this whole
    process with a stub source at the port); everything else is as `shadowctl run` wires it."""
    log = structlog.get_logger("shadowctl.run")
    tracer: Tracer = NO_TRACER
    shutdown_tracing: Callable[[], None] | None = None
    if opts.otlp_endpoint:
        from shadowctl import __version__
        from shadowctl.otel import OtelTracer  # the OpenTelemetry SDK loads only when tracing is on

        otel = OtelTracer(opts.otlp_endpoint, __version__)
        tracer, shutdown_tracing = otel, otel.shutdown
    clock = SystemClock()
    kube = await KubeClient.connect(kubeconfig=opts.kubeconfig, context=opts.context)
    webhooks = HttpWebhooks(clock.sleep, signing_key=webhook_signing_key(kube))
    if metric_source is None:
        default = PrometheusMetricSource(opts.prometheus, **opts.prometheus_options) if opts.prometheus else None
        # A policy may name its own Prometheus (spec.analysis.prometheus); requests are routed by server.
        connect = secret_connect(kube, opts.prometheus_options)
        metric_source = RoutingSource(default, connect, clock=clock.now, on_refused=connect.invalidate)
    source = BatchingSource(metric_source)

    judge_secrets = SecretReader(kube)  # the llm-judge comparators' API keys (cached 30 s, re-read after a 401/403)

    def make_output_source(policy: ShadowPolicy) -> OutputSourcePort:
        outputs = policy.spec.analysis.outputs
        workers = min(opts.pairing_workers, outputs.mqtt.partitions if outputs is not None else 1)
        if workers > 1:
            from shadowctl.sources.partitioned import partitioned_source

            try:
                return partitioned_source(policy, workers=workers, password=os.environ.get("SHADOWCTL_MQTT_PASSWORD"),
                                          password_provider=mqtt_password_provider(kube, policy))
            except SourceConfigError as exc:
                log.warning("outputs.one_process", policy=policy.key, reason=str(exc))
        return MqttOutputSource.from_policy(policy, password=os.environ.get("SHADOWCTL_MQTT_PASSWORD"),
                                            password_provider=mqtt_password_provider(kube, policy),
                                            tls_provider=tls_provider(
                                                kube, policy.metadata.namespace,
                                                outputs.mqtt.tls if outputs is not None else None,
                                                field="spec.analysis.outputs.mqtt.tls"),
                                            embedder=opts.embedder,
                                            model_judge=judge_for_policy(policy, kube, secrets=judge_secrets))

    hub = OutputHub(make_output_source)

    def make_tap_channel(policy: ShadowPolicy) -> TapChannel:
        """The channel to a policy's taps (shadow.mode: tap): the outputs broker, with the same credentials."""
        outputs = policy.spec.analysis.outputs
        if outputs is None:
            raise Unsupported(f"{policy.key}: shadow.mode: tap needs spec.analysis.outputs.mqtt: the controller "
                              "sends the taps their route setting over that broker")
        host, port, tls = parse_broker_url(outputs.mqtt.broker)
        return TapChannel(ChannelSettings(
            host, port, username=outputs.mqtt.username, password=os.environ.get("SHADOWCTL_MQTT_PASSWORD"),
            password_provider=mqtt_password_provider(kube, policy),
            tls=ssl.create_default_context() if tls else None,
            tls_provider=tls_provider(kube, policy.metadata.namespace, outputs.mqtt.tls,
                                      field="spec.analysis.outputs.mqtt.tls"),
        ), policy.metadata.namespace, policy.metadata.name)
    publisher: EventPublisher | None = None
    publish: Publish | None = None
    tasks: list[asyncio.Task[None]] = []
    if opts.events_mqtt:
        try:
            events_broker = events_broker_settings(opts.events_mqtt, opts.events_mqtt_auth)
        except (ValueError, OSError, ssl.SSLError) as exc:
            raise PublisherError(f"--events-mqtt: {exc}") from None
        # A broker that refuses the credentials is logged once and retried; the controller carries on.
        publisher = EventPublisher(events_broker, TapMetrics("controller"))
        tasks.append(asyncio.create_task(publisher.run()))
        pub = publisher

        async def _publish(topic: str, payload: bytes) -> None:
            pub.offer(topic, payload)

        publish = _publish
    metrics = ControllerMetrics()
    tuner = SamplingTuner()  # the adaptive sampling target: the analyzer observes pairs, the tap routers publish F
    reconciler = Reconciler(kube, functools.partial(router_for, tap_channel=make_tap_channel, sampling=tuner.fraction),
                            Analyzer(source, hub, tracer=tracer, sampling=tuner), clock,
                            notifier=ClusterNotifier(kube, clock, webhooks, publish), gate=WebhookGate(webhooks, clock),
                            metrics=metrics, leading=lambda: elector is None or elector.holds(),
                            status_refresh=opts.status_refresh)
    manager = Manager(kube, reconciler, clock, namespace=opts.namespace, label_selector=opts.selector,
                      min_interval=opts.min_interval, shard=opts.shard)
    listen_host, _, listen_port = opts.listen.rpartition(":")
    runner = await serve(make_app(metrics.registry, lambda: manager.ready.is_set() or not elector_leading()),
                         listen_host or "0.0.0.0", int(listen_port))
    identity = f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    elector = LeaderElector(kube, name=opts.shard.lease_name(opts.lease_name), namespace=opts.lease_namespace,
                            identity=identity, lease_duration=opts.lease_duration, renew_deadline=opts.renew_deadline,
                            retry_period=opts.retry_period) if opts.leader_elect else None

    def elector_leading() -> bool:
        return elector is not None and elector.is_leader

    async def lead() -> None:
        metrics.leader.set(1)
        try:
            await manager.run()
        finally:
            metrics.leader.set(0)

    async def main() -> None:
        if elector is None:
            await lead()
            return
        while True:  # leadership lost: stand by and try again
            await elector.run(lead)

    log.info("controller.start", identity=identity, namespace=opts.namespace or "(all)", selector=opts.selector,
             shard=str(opts.shard), lease=opts.shard.lease_name(opts.lease_name) if opts.leader_elect else None,
             prometheus=opts.prometheus, leader_election=opts.leader_elect)
    main_task = asyncio.create_task(main())
    stopper: asyncio.Task[bool] | None = None
    try:
        if stop is None:
            await main_task
        else:
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({main_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if main_task.done():
                main_task.result()
    finally:
        await cancel_and_wait(main_task, stopper)
        await cancel_and_wait(*tasks)  # after the manager: the events of its last ticks are offered by then
        await hub.close()
        await runner.cleanup()
        await webhooks.aclose()
        await source.aclose()
        await kube.close()
        if shutdown_tracing is not None:
            await asyncio.to_thread(shutdown_tracing)  # exports the last spans; the SDK's flush blocks
        log.info("controller.stopped")


def run(
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: Annotated[str | None, typer.Option("-n", "--namespace", help="Watch one namespace (default: all).")]
    = None,
    selector: Annotated[str | None, typer.Option("-l", "--selector",
                                                  help="Only policies with these labels (shard across controllers).")]
    = None,
    shard: Annotated[str | None, typer.Option(
        "--shard", metavar="I/N", envvar="SHADOWCTL_SHARD", show_default=False,
        help="Run only shard I of N (counted from 0: 0/2 and 1/2 for two shards). A policy's shard is a "
             "stable hash of its namespace/name (docs/scaling.md), kept in its label shadowctl.dev/shard-bucket, "
             "which the shard that owns a new policy writes; each shard watches only its own labels. Each "
             "shard elects its own leader on the Lease <lease-name>-I-of-N, so run every shard with the same "
             "N, two replicas each for a standby. Combines with -n and -l, which apply first.")] = None,
    prometheus: Annotated[str | None, typer.Option("--prometheus", envvar=URL_ENV,
                                                    help="Prometheus (or Thanos/Mimir/VictoriaMetrics) base URL.")]
    = None,
    prometheus_token_file: TokenFileOpt = None,
    prometheus_basic_auth_file: BasicAuthFileOpt = None,
    prometheus_ca_file: CaFileOpt = None,
    prometheus_insecure: InsecureOpt = False,
    prometheus_timeout: TimeoutOpt = 10.0,
    prometheus_max_batch: Annotated[int, typer.Option(
        "--prometheus-max-batch", min=1,
        help="Most parts in one batched query (window lengths for presets, rollouts for custom queries).")] = 20,
    pairing_workers: Annotated[int, typer.Option(
        "--pairing-workers", metavar="W", min=1, max=64, envvar="SHADOWCTL_PAIRING_WORKERS",
        help="Pair each policy's output events in W worker processes, one set of partitions each, where the "
             "policy's taps publish on partitions (spec.analysis.outputs.mqtt.partitions P > 1; at most P "
             "workers). One process pairs about 10,000 events per CPU second (docs/scaling.md). Policies with "
             "the semantic comparator or outputs.mqtt.tls are paired in the controller's process.")] = 1,
    embedding_model: Annotated[str | None, typer.Option(
        "--embedding-model", envvar="SHADOWCTL_EMBEDDING_MODEL", show_default=False,
        help="Directory of a local sentence-transformers model for the 'semantic' comparator "
             "(needs the 'semantic' extra; never downloaded).")] = None,
    events_mqtt: Annotated[str | None, typer.Option(
        "--events-mqtt", envvar="SHADOWCTL_EVENTS_MQTT",
        help="Broker for the rollout events topic (spec.notifications.mqtt), mqtt://HOST:PORT or "
             "mqtts://HOST:PORT. A broker that refuses the credentials is logged once and retried; rollouts go "
             "on.")] = None,
    events_mqtt_username: Annotated[str | None, typer.Option(
        "--events-mqtt-username", envvar="SHADOWCTL_EVENTS_MQTT_USERNAME", show_default=False,
        help="User name on the events broker (its ACL lets this user write shadowctl/events/#).")] = None,
    events_mqtt_password_file: Annotated[str | None, typer.Option(
        "--events-mqtt-password-file", envvar="SHADOWCTL_EVENTS_MQTT_PASSWORD_FILE", show_default=False,
        help="File holding the events broker password (mount a Secret here); read at every connect, so a rotated "
             "Secret applies at the next reconnect.")] = None,
    events_mqtt_ca: Annotated[str | None, typer.Option(
        "--events-mqtt-ca", envvar="SHADOWCTL_EVENTS_MQTT_CA", show_default=False,
        help="CA bundle (PEM file) to verify the events broker (mqtts; default: the system's CAs).")] = None,
    events_mqtt_cert: Annotated[str | None, typer.Option(
        "--events-mqtt-cert", envvar="SHADOWCTL_EVENTS_MQTT_CERT", show_default=False,
        help="Client certificate (PEM file) for mutual TLS with the events broker (with --events-mqtt-key).")]
    = None,
    events_mqtt_key: Annotated[str | None, typer.Option(
        "--events-mqtt-key", envvar="SHADOWCTL_EVENTS_MQTT_KEY", show_default=False,
        help="The private key (PEM file) of --events-mqtt-cert.")] = None,
    otlp_endpoint: Annotated[str | None, typer.Option(
        "--otlp-endpoint", envvar="OTEL_EXPORTER_OTLP_ENDPOINT", show_default=False,
        help="Export a trace span per look and per decision over OTLP/HTTP to this base URL "
             "(e.g. http://otel-collector:4318; /v1/traces is added). Off by default.")] = None,
    listen: Annotated[str, typer.Option("--listen", help="Address of /metrics, /healthz and /readyz.")]
    = "0.0.0.0:8080",
    leader_elect: Annotated[bool, typer.Option("--leader-elect/--no-leader-elect",
                                               help="Take part in Lease-based leader election.")] = True,
    lease_name: Annotated[str, typer.Option(
        "--lease-name", help="The Lease for leader election (with --shard I/N: <lease-name>-I-of-N).")]
    = "shadowctl-controller",
    lease_namespace: Annotated[str, typer.Option("--lease-namespace", envvar="POD_NAMESPACE")] = "shadowctl",
    lease_duration: Annotated[float, typer.Option("--lease-duration", help="Seconds.")] = 15.0,
    renew_deadline: Annotated[float, typer.Option("--renew-deadline", help="Seconds.")] = 10.0,
    retry_period: Annotated[float, typer.Option("--retry-period", help="Seconds.")] = 2.0,
    log_format: Annotated[str, typer.Option("--log-format", help="json or console.")] = "json",
    min_interval: Annotated[float, typer.Option("--min-interval", hidden=True)] = 0.0,
    status_refresh: Annotated[float, typer.Option(
        "--status-refresh", metavar="SECONDS", min=0.0, envvar="SHADOWCTL_STATUS_REFRESH",
        help="A policy's .status is written at once when a decision changes (phase, step, weights, a metric's "
             "outcome, an error); sample counts and estimates that alone changed are refreshed at most every "
             "max(SECONDS, 3 x the policy's interval). Fewer writes let several controllers share one API "
             "server (docs/scaling.md); 0 writes every look's figures.")] = REFRESH_FLOOR,
) -> None:
    """Run the controller: carry out every ShadowPolicy it selects, until stopped (SIGTERM/Ctrl-C).

    In a cluster it uses the pod's service account; elsewhere the kubeconfig. Only the replica that
    holds the Lease acts; the others stand by.

    Example: shadowctl run --prometheus http://prometheus.monitoring:9090 -n llm
    """
    if log_format not in ("json", "console"):
        raise fail("--log-format must be json or console", 2)
    try:
        chosen = Shard.parse(shard) if shard is not None else ALL
    except ValueError as exc:
        raise fail(f"--shard: {exc}", 2) from None
    configure_logging(log_format)
    prom = connection_options(prometheus_token_file, prometheus_basic_auth_file, prometheus_ca_file,
                              prometheus_insecure, prometheus_timeout)
    prom["max_batch"] = prometheus_max_batch
    embedder = None
    if embedding_model is not None:
        try:
            embedder = cached_embedder(load_local_embedder(embedding_model))
        except EmbedderUnavailable as exc:
            raise fail(f"--embedding-model: {exc}", 2) from None
    if otlp_endpoint:
        from shadowctl.otel import TracingConfigError, traces_url

        try:
            traces_url(otlp_endpoint)
        except TracingConfigError as exc:
            raise fail(str(exc), 2) from None
    events_auth = EventsMqttAuth(events_mqtt_username, events_mqtt_password_file, events_mqtt_ca, events_mqtt_cert,
                                 events_mqtt_key)
    if events_mqtt:
        try:
            events_broker_settings(events_mqtt, events_auth)  # bad URL or files: said now, before anything starts
        except (ValueError, OSError, ssl.SSLError) as exc:
            raise fail(f"--events-mqtt: {exc}", 2) from None
        if events_auth.password_file is not None and not os.access(events_auth.password_file, os.R_OK):
            raise fail(f"--events-mqtt-password-file {events_auth.password_file}: cannot be read", 2)
    elif events_auth != EventsMqttAuth():
        raise fail("--events-mqtt-username, -password-file, -ca, -cert and -key need --events-mqtt", 2)
    opts = RunOptions(kubeconfig, context, namespace, selector, prometheus, events_mqtt, listen, leader_elect,
                      lease_name, lease_namespace, lease_duration, renew_deadline, retry_period, min_interval, prom,
                      embedder, otlp_endpoint or None, chosen, events_auth, pairing_workers, status_refresh)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await run_controller(opts, stop)

    try:
        asyncio.run(_main())
    except ShadowctlError as exc:
        raise fail(str(exc)) from None
    except ValueError as exc:
        raise fail(str(exc), 2) from None


def register(app: typer.Typer) -> None:
    app.command("run")(run)
