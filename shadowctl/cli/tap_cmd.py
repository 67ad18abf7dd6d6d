"""`shadowctl tap`: run the output-capturing reverse proxy as a sidecar."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, get_args

import typer

from shadowctl.cli.common import fail
from shadowctl.compare.events import Redacted, Variant, parse_broker_url
from shadowctl.compare.routing import valid_topic_level
from shadowctl.tap.metrics import TapMetrics
from shadowctl.tap.proxy import MirrorConfig, TapConfig, TapError, TapProxy, default_topic, parse_listen, serve
from shadowctl.tap.publisher import BrokerSettings, EventPublisher, client_tls
from shadowctl.tap.routes import RouteFollower
from shadowctl.tap.workers import Supervisor, worker_index

REDACTION_MODES = ("none", *get_args(Redacted))
"""The values of --redact: spec.analysis.outputs.redaction.mode's (without loading the policy model here)."""


@dataclass(frozen=True, slots=True)
class BrokerOptions:
    """The broker as given on the command line (picklable: a worker process builds its TLS context)."""

    host: str
    port: int
    tls: bool
    ca_file: str | None
    username: str | None
    password: str | None
    cert_file: str | None = None
    """Client certificate (PEM) for mutual TLS, with ``key_file`` (--mqtt-cert, --mqtt-key)."""
    key_file: str | None = None

    def settings(self) -> BrokerSettings:
        context = client_tls(self.ca_file, self.cert_file, self.key_file) if self.tls else None
        return BrokerSettings(host=self.host, port=self.port, username=self.username, password=self.password,
                              tls=context)


@dataclass(frozen=True, slots=True)
class TapSettings:
    """Everything one tap process needs, checked by the command before anything starts."""

    config: TapConfig
    host: str
    port: int
    broker: BrokerOptions | None
    queue_size: int
    reuse_port: bool = False
    route_policy: tuple[str, str] | None = None
    """NAMESPACE, NAME of the ShadowPolicy whose route setting this tap follows (--route-policy)."""
    tap_id: str = "tap"
    """This tap's id on the route-applied topic; a worker process appends ``-w<index>``."""


def run_tap(settings: TapSettings, on_ready: Callable[[], None] | None = None) -> int:
    """Serve until SIGINT or SIGTERM; the exit code (a worker process's entry point too). `on_ready` is
    called once the tap listens."""
    metrics = TapMetrics(settings.config.variant.value)
    publisher = None
    if settings.broker is not None:
        publisher = EventPublisher(settings.broker.settings(), metrics, queue_size=settings.queue_size)

    routes = None
    if settings.route_policy is not None and settings.broker is not None:
        index = worker_index()
        tap_id = settings.tap_id if index is None else f"{settings.tap_id}-w{index}"
        broker = settings.broker.settings()
        routes = RouteFollower(BrokerSettings(broker.host, broker.port, broker.username, broker.password, broker.tls,
                                              keepalive_s=10), *settings.route_policy, tap_id, metrics,
                               own_candidate_url=settings.config.mirror is not None)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        proxy = TapProxy(settings.config, publisher, metrics, routes)
        await serve(proxy, publisher, settings.host, settings.port, stop, reuse_port=settings.reuse_port,
                    on_ready=on_ready)

    try:
        asyncio.run(main())
    except TapError as exc:
        return fail(str(exc)).exit_code
    return 0


def _service(value: str, option: str = "--service") -> tuple[str, str]:
    namespace, sep, name = value.partition("/")
    if not sep or not valid_topic_level(namespace) or not valid_topic_level(name):
        raise fail(f"{option} {value!r}: expected NAMESPACE/NAME, e.g. llm/chat", code=2)
    return namespace, name


def default_tap_id() -> str:
    """The pod's name ($HOSTNAME in Kubernetes), else this machine's host name."""
    return os.environ.get("HOSTNAME") or socket.gethostname() or "tap"


def _check_sample(value: float) -> float:
    """--sample is a fraction in (0, 1]."""
    from shadowctl.tap.sampling import check_fraction

    try:
        return check_fraction(value, "")
    except ValueError as exc:
        raise typer.BadParameter(str(exc).removeprefix(": ")) from None


def tap(
    upstream: Annotated[str, typer.Option("--upstream", help="The model server, e.g. http://127.0.0.1:8000.")],
    service: Annotated[str, typer.Option("--service", help="NAMESPACE/NAME of the service this tap fronts.")],
    variant: Annotated[Variant, typer.Option("--variant", help="Which deployment this is.", case_sensitive=False)]
    = Variant.primary,
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to accept requests on.")] = "0.0.0.0:8080",
    mqtt: Annotated[
        str | None, typer.Option("--mqtt", help="Broker, mqtt://HOST:PORT or mqtts://HOST:PORT (none: metrics only).")
    ] = None,
    topic: Annotated[
        str | None, typer.Option("--topic", help="Default shadowctl/outputs/<namespace>/<service>/<variant>.")
    ] = None,
    mqtt_username: Annotated[str | None, typer.Option("--mqtt-username", envvar="SHADOWCTL_MQTT_USERNAME")] = None,
    mqtt_password: Annotated[
        str | None, typer.Option("--mqtt-password", envvar="SHADOWCTL_MQTT_PASSWORD", show_default=False)
    ] = None,
    mqtt_ca: Annotated[str | None, typer.Option("--mqtt-ca", help="CA bundle for mqtts (default: system).")] = None,
    mqtt_cert: Annotated[str | None, typer.Option(
        "--mqtt-cert", envvar="SHADOWCTL_MQTT_CERT", show_default=False,
        help="Client certificate (PEM file) for mutual TLS with the broker (mqtts only; with --mqtt-key), for a "
             "broker with require_certificate true. A broker that refuses it is logged once and counted on "
             "shadowctl_tap_broker_refused_total; requests are served either way.")] = None,
    mqtt_key: Annotated[str | None, typer.Option(
        "--mqtt-key", envvar="SHADOWCTL_MQTT_KEY", show_default=False,
        help="The private key (PEM file) of --mqtt-cert.")] = None,
    queue_size: Annotated[int, typer.Option("--queue-size", min=1, help="Events held while the broker is slow.")]
    = 10_000,
    redact_prompts: Annotated[
        bool, typer.Option("--redact-prompts", help="Publish only the prompt's hash, not its text.")
    ] = False,
    redact: Annotated[
        str, typer.Option(
            "--redact", envvar="SHADOWCTL_TAP_REDACT", metavar="[none|truncate|hash|drop]",
            help="What events keep of prompts and answers: none (the texts), truncate (the first "
                 "--redact-max-chars characters and the answer's hash), hash (only hashes) or drop (only lengths "
                 "and token counts). Use the policy's spec.analysis.outputs.redaction.mode; see docs/outputs.md "
                 "for which comparators each mode leaves.")
    ] = "none",
    redact_max_chars: Annotated[
        int, typer.Option("--redact-max-chars", min=1, help="With --redact truncate: characters kept of each text "
                                                            "(the policy's redaction.maxChars).")
    ] = 500,
    sample: Annotated[
        float, typer.Option("--sample", metavar="F", callback=_check_sample,
                            help="Publish the output events of this fraction of requests only (0.1: one in ten), "
                                 "chosen by a hash of x-request-id so that the primary's, the candidate's and the "
                                 "baseline's taps keep the same requests and no pair is broken; give every tap of "
                                 "a policy the same F (spec.analysis.outputs.sampling). A route setting's "
                                 "sampleFraction (--route-policy) overrides it. Every request is still "
                                 "forwarded and measured. /metrics: shadowctl_tap_sampled_requests_total.")
    ] = 1.0,
    partitions: Annotated[
        int, typer.Option("--partitions", metavar="P", min=1, max=256,
                          help="Publish each request's events on one of P partitions: the topic gets one more "
                               "level, 0..P-1, chosen by a hash of x-request-id (the same on every tap, so the two "
                               "events of a pair share a partition), and several controller workers can pair "
                               "disjoint partitions. Give every tap of a policy the policy's "
                               "spec.analysis.outputs.mqtt.partitions. 1: no partition level.")
    ] = 1,
    max_output_chars: Annotated[int, typer.Option("--max-output-chars", min=1)] = 200_000,
    max_request_bytes: Annotated[
        int, typer.Option("--max-request-bytes", min=1, help="Larger request bodies are refused with 413.")
    ] = 64 * 1024 * 1024,
    drain_seconds: Annotated[
        float, typer.Option("--drain-seconds", min=0,
                            help="On SIGTERM, time given to requests in flight before they are cut.")
    ] = 10.0,
    metrics_path: Annotated[
        str, typer.Option("--metrics-path", help="Path of the tap's metrics (other paths pass through).")
    ] = "/metrics",
    mirror_to: Annotated[
        str | None, typer.Option("--mirror-to", help="Candidate URL for application-level mirroring (with "
                                 "--route-policy: where the candidate's requests go, instead of the setting's URL).")
    ] = None,
    mirror_percent: Annotated[float, typer.Option(
        "--mirror-percent", min=0, max=100,
        help="Share of requests copied to --mirror-to (ignored with --route-policy: the setting says).")] = 100.0,
    mirror_host: Annotated[str | None, typer.Option("--mirror-host", help="Host header of mirror copies.")] = None,
    mirror_model: Annotated[str | None, typer.Option("--mirror-model", help="Set `model` in copies.")] = None,
    mirror_temperature: Annotated[float | None, typer.Option("--mirror-temperature", min=0)] = None,
    mirror_seed: Annotated[int | None, typer.Option("--mirror-seed")] = None,
    baseline_resend: Annotated[float | None, typer.Option(
        "--baseline-resend", metavar="PERCENT", min=0, max=100,
        help="Noise baseline for baseline.mode: resend where no route setting drives the taps (an Istio "
             "VirtualService or an HTTPRoute mirrors): send this percent of requests once more, unchanged, to "
             "--upstream, and publish the answers as variant baseline, the primary's agreement with itself. "
             "Chosen by a hash of x-request-id, the same on every tap. Costs the primary's GPU for as long as the "
             "tap runs (no shadow budget applies): set it on the primary's taps for the rollout. Not with "
             "--route-policy (the setting's baselinePercent says there).")] = None,
    route_policy: Annotated[
        str | None,
        typer.Option("--route-policy", metavar="NAMESPACE/NAME",
                     help="Route as the controller says for this ShadowPolicy (shadow.mode: tap): follow its "
                          "setting on the MQTT topic shadowctl/route/NAMESPACE/NAME (needs --mqtt), mirror and "
                          "send to the candidate the shares it gives, report what is applied, and route "
                          "primary-only while there is no setting or it is older than 3 analysis intervals."),
    ] = None,
    tap_id: Annotated[
        str | None,
        typer.Option("--tap-id", envvar="SHADOWCTL_TAP_ID",
                     help="This tap's name in its route-applied reports (default: $HOSTNAME, the pod's name; "
                          "each worker process adds -w<index>). Unique per tap."),
    ] = None,
    workers: Annotated[
        int,
        typer.Option("--workers", min=1, max=64, envvar="SHADOWCTL_TAP_WORKERS",
                     help="Processes sharing the listen port (SO_REUSEPORT); about one per CPU the sidecar may use. "
                          "/metrics shows all of them together."),
    ] = 1,
) -> None:
    """Proxy an OpenAI-compatible model server and publish each answer to MQTT for comparison."""
    namespace, name = _service(service)
    if redact not in REDACTION_MODES:
        raise fail(f"--redact {redact!r}: expected one of {', '.join(REDACTION_MODES)}", code=2)
    try:
        host, port = parse_listen(listen)
    except TapError as exc:
        raise fail(str(exc), code=2) from None
    if not upstream.startswith(("http://", "https://")):
        raise fail(f"--upstream {upstream!r}: expected an http(s) URL, e.g. http://127.0.0.1:8000", code=2)
    if mirror_to is not None and not mirror_to.startswith(("http://", "https://")):
        raise fail(f"--mirror-to {mirror_to!r}: expected an http(s) URL", code=2)
    followed = _service(route_policy, "--route-policy") if route_policy is not None else None
    if followed is not None and mqtt is None:
        raise fail("--route-policy needs --mqtt: the route setting comes from the broker", code=2)
    if baseline_resend is not None and baseline_resend <= 0:
        raise fail(f"--baseline-resend {baseline_resend:g}: a percent above 0 (leave it out for no resends)", code=2)
    if followed is not None and baseline_resend is not None:
        raise fail("--baseline-resend is for taps without --route-policy: a tap that follows a route setting "
                   "resends what its baselinePercent says (the policy's spec.analysis.outputs.baseline)", code=2)
    the_tap_id = tap_id or default_tap_id()
    if not valid_topic_level(the_tap_id):
        raise fail(f"--tap-id {the_tap_id!r}: one MQTT topic level, without '/', '+' or '#'", code=2)
    mirror = None
    if mirror_to is not None:
        mirror = MirrorConfig(url=mirror_to, percent=mirror_percent, host=mirror_host, model=mirror_model,
                              temperature=mirror_temperature, seed=mirror_seed)
    config = TapConfig(
        upstream=upstream, variant=variant, namespace=namespace, service=name,
        topic=topic or default_topic(namespace, name, variant), redact_prompts=redact_prompts,
        redaction=redact, redact_max_chars=redact_max_chars, sample=sample, partitions=partitions,
        max_output_chars=max_output_chars, metrics_path=metrics_path, mirror=mirror,
        max_request_bytes=max_request_bytes, drain_s=drain_seconds, routed=followed is not None,
        baseline_percent=baseline_resend,
    )
    broker = None
    if mqtt is not None:
        try:
            broker_host, broker_port, tls = parse_broker_url(mqtt)
        except ValueError as exc:
            raise fail(f"--mqtt: {exc}", code=2) from None
        if (mqtt_cert is None) != (mqtt_key is None):
            raise fail("--mqtt-cert and --mqtt-key go together: the client certificate and its private key", code=2)
        if mqtt_cert is not None and not tls:
            raise fail(f"--mqtt-cert needs an mqtts:// broker (--mqtt {mqtt!r}): a client certificate is sent in "
                       "the TLS handshake", code=2)
        broker = BrokerOptions(broker_host, broker_port, tls, mqtt_ca, mqtt_username, mqtt_password, mqtt_cert,
                               mqtt_key)
        try:
            broker.settings()  # a CA, certificate or key file that cannot be loaded fails here, before anything starts
        except (OSError, ssl.SSLError) as exc:
            files = ", ".join(f"{o} {f!r}" for o, f in (("--mqtt-ca", mqtt_ca), ("--mqtt-cert", mqtt_cert),
                                                         ("--mqtt-key", mqtt_key)) if f is not None)
            raise fail(f"{files}: cannot load: {exc}") from None
    elif mqtt_cert is not None or mqtt_key is not None:
        raise fail("--mqtt-cert and --mqtt-key need --mqtt", code=2)
    if workers > 1 and port == 0:
        raise fail(f"--listen {listen!r}: --workers needs a fixed port (each worker would get its own with 0)",
                   code=2)
    settings = TapSettings(config=config, host=host, port=port, broker=broker, queue_size=queue_size,
                           reuse_port=workers > 1, route_policy=followed, tap_id=the_tap_id)
    code = (run_tap(settings) if workers == 1
            else Supervisor(run_tap, settings, workers, stop_grace_s=drain_seconds + 5.0).run())
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add `shadowctl tap` to the CLI."""
    app.command("tap")(tap)
