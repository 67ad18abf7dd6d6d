"""`shadowctl tap`: run the output-capturing reverse proxy as a sidecar."""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import typer

from shadowctl.cli.common import fail
from shadowctl.compare.events import Variant, parse_broker_url
from shadowctl.tap.metrics import TapMetrics
from shadowctl.tap.proxy import MirrorConfig, TapConfig, TapError, TapProxy, default_topic, parse_listen, serve
from shadowctl.tap.publisher import BrokerSettings, EventPublisher
from shadowctl.tap.workers import Supervisor


@dataclass(frozen=True, slots=True)
class BrokerOptions:
    """The broker as given on the command line (picklable: a worker process builds its TLS context)."""

    host: str
    port: int
    tls: bool
    ca_file: str | None
    username: str | None
    password: str | None

    def settings(self) -> BrokerSettings:
        context = ssl.create_default_context(cafile=self.ca_file) if self.tls else None
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


def run_tap(settings: TapSettings, on_ready: Callable[[], None] | None = None) -> int:
    """Serve until SIGINT or SIGTERM; the exit code (a worker process's entry point too). `on_ready` is
    called once the tap listens."""
    metrics = TapMetrics(settings.config.variant.value)
    publisher = None
    if settings.broker is not None:
        publisher = EventPublisher(settings.broker.settings(), metrics, queue_size=settings.queue_size)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        proxy = TapProxy(settings.config, publisher, metrics)
        await serve(proxy, publisher, settings.host, settings.port, stop, reuse_port=settings.reuse_port,
                    on_ready=on_ready)

    try:
        asyncio.run(main())
    except TapError as exc:
        return fail(str(exc)).exit_code
    return 0


def _service(value: str) -> tuple[str, str]:
    namespace, sep, name = value.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise fail(f"--service {value!r}: expected NAMESPACE/NAME, e.g. llm/chat", code=2)
    return namespace, name


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
    queue_size: Annotated[int, typer.Option("--queue-size", min=1, help="Events held while the broker is slow.")]
    = 10_000,
    redact_prompts: Annotated[
        bool, typer.Option("--redact-prompts", help="Publish only the prompt's hash, not its text.")
    ] = False,
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
        str | None, typer.Option("--mirror-to", help="Candidate URL for application-level mirroring.")
    ] = None,
    mirror_percent: Annotated[float, typer.Option("--mirror-percent", min=0, max=100)] = 100.0,
    mirror_host: Annotated[str | None, typer.Option("--mirror-host", help="Host header of mirror copies.")] = None,
    mirror_model: Annotated[str | None, typer.Option("--mirror-model", help="Set `model` in copies.")] = None,
    mirror_temperature: Annotated[float | None, typer.Option("--mirror-temperature", min=0)] = None,
    mirror_seed: Annotated[int | None, typer.Option("--mirror-seed")] = None,
    workers: Annotated[
        int,
        typer.Option("--workers", min=1, max=64, envvar="SHADOWCTL_TAP_WORKERS",
                     help="Processes sharing the listen port (SO_REUSEPORT); about one per CPU the sidecar may use. "
                          "/metrics shows all of them together."),
    ] = 1,
) -> None:
    """Proxy an OpenAI-compatible model server and publish each answer to MQTT for comparison."""
    namespace, name = _service(service)
    try:
        host, port = parse_listen(listen)
    except TapError as exc:
        raise fail(str(exc), code=2) from None
    if not upstream.startswith(("http://", "https://")):
        raise fail(f"--upstream {upstream!r}: expected an http(s) URL, e.g. http://127.0.0.1:8000", code=2)
    if mirror_to is not None and not mirror_to.startswith(("http://", "https://")):
        raise fail(f"--mirror-to {mirror_to!r}: expected an http(s) URL", code=2)
    mirror = None
    if mirror_to is not None:
        mirror = MirrorConfig(url=mirror_to, percent=mirror_percent, host=mirror_host, model=mirror_model,
                              temperature=mirror_temperature, seed=mirror_seed)
    config = TapConfig(
        upstream=upstream, variant=variant, namespace=namespace, service=name,
        topic=topic or default_topic(namespace, name, variant), redact_prompts=redact_prompts,
        max_output_chars=max_output_chars, metrics_path=metrics_path, mirror=mirror,
        max_request_bytes=max_request_bytes, drain_s=drain_seconds,
    )
    broker = None
    if mqtt is not None:
        try:
            broker_host, broker_port, tls = parse_broker_url(mqtt)
        except ValueError as exc:
            raise fail(f"--mqtt: {exc}", code=2) from None
        broker = BrokerOptions(broker_host, broker_port, tls, mqtt_ca, mqtt_username, mqtt_password)
        try:
            broker.settings()  # a CA file that cannot be loaded fails here, before anything starts
        except (OSError, ssl.SSLError) as exc:
            raise fail(f"--mqtt-ca {mqtt_ca!r}: cannot load: {exc}") from None
    if workers > 1 and port == 0:
        raise fail(f"--listen {listen!r}: --workers needs a fixed port (each worker would get its own with 0)",
                   code=2)
    settings = TapSettings(config=config, host=host, port=port, broker=broker, queue_size=queue_size,
                           reuse_port=workers > 1)
    code = (run_tap(settings) if workers == 1
            else Supervisor(run_tap, settings, workers, stop_grace_s=drain_seconds + 5.0).run())
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add `shadowctl tap` to the CLI."""
    app.command("tap")(tap)
