"""A simulated OpenAI-compatible model server with vLLM's metric names, for the local environment.

What it imitates, and the choices that are not obvious:

* Latency is really spent (``asyncio.sleep`` to absolute deadlines, so sleep
  overshoot does not accumulate over many tokens): a tap in front measures a
  real time to first token. ``time_scale`` shrinks every sleep so tests run
  fast; the histograms record measured time divided by ``time_scale``, i.e. the
  server's own notion of time, so bucket boundaries stay meaningful at any scale.
* TTFT counts from arrival, queue included, as vLLM's does; a request waits in
  the queue while ``max_running`` requests are generating.
* The metric families, labels and finish reasons are vLLM 0.33's: every ``vllm:``
  series carries ``model_name`` and ``engine``; ``vllm:inter_token_latency_seconds``
  observes every gap between two output tokens (its count is generated tokens minus
  one per request), ``vllm:request_time_per_output_token_seconds`` one mean gap per
  request; the removed ``vllm:time_per_output_token_seconds`` is not served.
* An injected error (knob ``error_rate``) answers HTTP 500 with an OpenAI error
  body and is finished by the engine with ``finished_reason="error"`` (with its
  end-to-end latency, as vLLM records it for every request the engine finishes). A
  client that disconnects mid-stream is not counted in ``vllm:request_success_total``
  nor in the latency of finished requests: vLLM drops those uncounted. A request
  refused before the engine (400) reaches only ``http_requests_total``.
* ``http_requests_total{handler,method,status}`` counts the ``/v1`` endpoints'
  answers with grouped status (``2xx``, ``4xx``, ``5xx``), as vLLM's
  prometheus-fastapi-instrumentator does; ``/metrics``, ``/health`` and ``/admin``
  are left out, as vLLM leaves out its own.
* Histogram buckets are vLLM's own boundaries (TTFT; inter-token and per-request
  TPOT; the request-latency buckets shared by e2e and queue time). Real vLLM takes
  finer ones from ``--custom-histogram-buckets``; ``fine_buckets`` is that here.
* GPU series are not served here: the DCGM exporter is another process on the node
  (:mod:`shadowctl.sim.dcgm` reads this server's GPU knobs).
* The answer is a pure function of the prompt (:mod:`shadowctl.sim.prompts`);
  ``noise_rate`` perturbs words (replica noise), ``drift_rate`` swaps the whole
  answer (a changed model).
* The ``model`` of a request must be a name the server serves (``model`` and any
  ``aliases``, as vLLM's ``--served-model-name A B``), or absent; any other name is
  answered 404 with vLLM's body, ``{"error": {"message": "The model `X` does not
  exist.", "type": "NotFoundError", "param": null, "code": 404}}``, after the body's
  own checks (400) and before the engine (no ``vllm:`` series counts it), so a
  client's model-name mistake shows. An Istio mirror copy carries the primary's
  model name: a candidate serves that name too (or lists it as an alias), as a real
  candidate behind the same route would.
* ``adapters`` are further served names, as vLLM's ``--lora-modules NAME=PATH``: listed
  on ``/v1/models`` with the base model as ``parent``, reported as the answer's
  ``model``, and answering differently from the base model on a share of prompts
  (each adapter's ``divergence``, 0 to 1): whether a prompt's answer differs, and
  how, is a pure function of the adapter's name and the prompt, so an adapter
  rollout has answers that really depend on the name asked for.
* ``prompt_quality`` maps system prompts to a quality (0 to 1), so a prompt rollout has answers that
  really depend on the system prompt: a chat request is answered with the reference answer to its
  messages after the leading system ones, with the words that quality gets wrong replaced
  (:func:`shadowctl.sim.prompts.degraded_answer`: a pure function of the request's text and the quality,
  and a better prompt's wrong words are a subset of a worse one's); a system prompt the table does not
  hold (or none) has quality 1. The simulated judge (:mod:`shadowctl.sim.judge`, ``skip_system``) scores
  answers against the same reference, so it sees the better prompt.

Knobs form a frozen dataclass; ``POST /admin/knobs`` (a partial JSON object)
replaces them at run time, so a demo can inject a regression mid-run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import json
import math
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from shadowctl.sim.errors import KnobError, SimError
from shadowctl.sim.judge import SimJudge
from shadowctl.sim.logs import log_to_stderr
from shadowctl.sim.prompts import (
    build_answer,
    count_prompt_tokens,
    degraded_answer,
    drifted_answer,
    perturb,
    prompt_seed,
    reference_answer,
    tokenize,
)
from shadowctl.sim.services import serve

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)
FINE_BUCKETS = tuple(round(0.001 * 1.05**i, 6) for i in range(260))
"""Log-spaced buckets 5% apart (1 ms to ~300 s): what the demo uses so that a 15-30% margin is resolvable.

vLLM's own TTFT buckets are up to 2.5x apart; the judge refuses to pass a margin narrower than the
bucket spacing (it cannot tell), so a demo on them would end inconclusive. See docs/judge.md."""
VARIANT_HEADER = "x-sim-variant"


@dataclass(frozen=True)
class ModelKnobs:
    """How the simulated server behaves; times are in simulated seconds (multiplied by ``time_scale``)."""

    time_scale: float = 1.0
    """Real seconds slept per simulated second (0.01: a hundred times faster)."""
    ttft_median_s: float = 0.12
    ttft_sigma: float = 0.3
    """Lognormal sigma of TTFT around its median."""
    prefill_s_per_token: float = 0.00005
    """Extra TTFT per prompt token (long prompts start later)."""
    tpot_median_s: float = 0.02
    tpot_sigma: float = 0.15
    output_words_median: float = 60.0
    output_words_sigma: float = 0.5
    """Lognormal output length, drawn from the prompt (the same prompt, the same length)."""
    latency_factor: float = 1.0
    """Multiplies TTFT and TPOT of every request (a uniform regression)."""
    tail_probability: float = 0.0
    tail_factor: float = 1.0
    """With ``tail_probability`` a request's TTFT and TPOT are multiplied by ``tail_factor`` (p99 moves, p50 not)."""
    error_rate: float = 0.0
    """Probability of answering HTTP 500."""
    drift_rate: float = 0.0
    """Probability of answering something other than the reference answer."""
    noise_rate: float = 0.0
    """Per-word probability of a perturbation (replica-to-replica noise)."""
    max_running: int = 256
    """Requests generating at once; more wait in the queue."""
    gpu_util_percent: float = 70.0
    gpu_memory_used_mib: float = 38000.0
    gpu_power_watts: float = 300.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise KnobError(f"knob {f.name}: expected a finite number, got {value!r}")
            if value < 0:
                raise KnobError(f"knob {f.name}: must be >= 0, got {value!r}")
        for name in ("tail_probability", "error_rate", "drift_rate", "noise_rate"):
            if getattr(self, name) > 1:
                raise KnobError(f"knob {name}: a probability must be within 0..1, got {getattr(self, name)!r}")
        if self.time_scale <= 0:
            raise KnobError(f"knob time_scale: must be > 0, got {self.time_scale!r}")
        if self.gpu_util_percent > 100:
            raise KnobError(f"knob gpu_util_percent: must be within 0..100, got {self.gpu_util_percent!r}")
        if self.max_running < 1 or int(self.max_running) != self.max_running:
            raise KnobError(f"knob max_running: must be a positive integer, got {self.max_running!r}")

    def updated(self, changes: Mapping[str, Any]) -> ModelKnobs:
        """A copy with ``changes`` applied; KnobError names an unknown knob or a bad value."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise KnobError(f"unknown knob(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(changes)
        if "max_running" in values and isinstance(values["max_running"], float) and values["max_running"].is_integer():
            values["max_running"] = int(values["max_running"])
        return dataclasses.replace(self, **values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ServedRecord:
    """One request the server finished (successfully, by error injection, or by a client abort)."""

    request_id: str
    host: str
    path: str
    prompt_sha256: str
    stream: bool
    finish_reason: str
    completion_tokens: int
    ttft_s: float | None
    """Measured, in simulated seconds (None when no token was produced)."""
    e2e_s: float
    drifted: bool
    tail: bool
    output: str


@dataclass
class ServerStats:
    """Counts since start (``/admin/stats``)."""

    requests: int = 0
    succeeded: int = 0
    errors: int = 0
    aborted: int = 0
    bad_requests: int = 0
    unknown_model: int = 0
    """Requests for a model this server does not serve (answered 404)."""
    drifted: int = 0
    tail: int = 0
    by_finish_reason: collections.Counter[str] = field(default_factory=collections.Counter)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["by_finish_reason"] = dict(self.by_finish_reason)
        return out


FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
"""vLLM 0.33's ``finished_reason`` values; each series exists (at 0) from the start, as vLLM creates them."""
ENGINE = "0"
"""The ``engine`` label of a single-engine vLLM server."""
UNCOUNTED_PATHS = ("/metrics", "/health", "/admin/")
"""Paths vLLM's HTTP instrumentation leaves out (``/admin`` is the simulator's own)."""


class _Metrics:
    def __init__(self, model: str, fine_buckets: bool = False) -> None:
        ttft_buckets = FINE_BUCKETS if fine_buckets else TTFT_BUCKETS
        tpot_buckets = FINE_BUCKETS if fine_buckets else TPOT_BUCKETS
        latency_buckets = FINE_BUCKETS if fine_buckets else REQUEST_LATENCY_BUCKETS
        self.registry = CollectorRegistry()
        reg = self.registry
        label = ["model_name", "engine"]
        values = (model, ENGINE)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            label, registry=reg, buckets=ttft_buckets,
        ).labels(*values)
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            label, registry=reg, buckets=tpot_buckets,
        ).labels(*values)
        self.request_tpot = Histogram(
            "vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.",
            label, registry=reg, buckets=tpot_buckets,
        ).labels(*values)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            label, registry=reg, buckets=latency_buckets,
        ).labels(*values)
        self.queue = Histogram(
            "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
            label, registry=reg, buckets=latency_buckets,
        ).labels(*values)
        # prometheus_client appends _total to counter names itself.
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", label, registry=reg
        ).labels(*values)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", label, registry=reg
        ).labels(*values)
        self._success = Counter(
            "vllm:request_success", "Count of successfully processed requests.",
            ["model_name", "engine", "finished_reason"], registry=reg,
        )
        self.running = Gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", label, registry=reg
        ).labels(*values)
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", label, registry=reg
        ).labels(*values)
        self.http = Counter(
            "http_requests", "Total number of requests by method, status and handler.",
            ["method", "status", "handler"], registry=reg,
        )
        self.model = model
        for reason in FINISH_REASONS:
            self._success.labels(model, ENGINE, reason)

    def finished(self, reason: str, e2e_s: float) -> None:
        """One request the engine finished: its reason and its end-to-end latency."""
        self._success.labels(self.model, ENGINE, reason).inc()
        self.e2e.observe(e2e_s)

    def answered(self, method: str, handler: str, status: int) -> None:
        self.http.labels(method, f"{status // 100}xx", handler).inc()


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _error_response(
    status: int, message: str, err_type: str, param: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.json_response(body, status=status, headers=headers)


@dataclass
class _Plan:
    answer: str
    tokens: list[str]
    finish_reason: str
    ttft_s: float
    tpots_s: list[float]
    drifted: bool
    tail: bool


class SimModelServer:
    """One simulated model server (an aiohttp application); see the module docstring.

    ::

        server = SimModelServer("chat-7b", variant="candidate", knobs=ModelKnobs(time_scale=0.01))
        url = await server.start()           # http://127.0.0.1:PORT
        server.set_knobs(error_rate=0.1)     # or POST /admin/knobs
        await server.stop()
    """

    def __init__(
        self,
        model: str = "sim-model",
        *,
        variant: str = "primary",
        knobs: ModelKnobs | None = None,
        seed: int | None = None,
        pod: str | None = None,
        namespace: str = "default",
        history: int = 10_000,
        fine_buckets: bool = False,
        aliases: Sequence[str] = (),
        adapters: Mapping[str, float] | None = None,
        judge: SimJudge | None = None,
        prompt_quality: Mapping[str, float] | None = None,
    ) -> None:
        """`adapters`: LoRA adapter names served besides the model, each with the share of prompts (0 to 1)
        it answers differently from the base model. `judge`: answer judge prompts (the llm-judge comparator's
        default layout) with a deterministic verdict (:mod:`shadowctl.sim.judge`). `prompt_quality`: system
        prompt text -> quality (0 to 1) of the answers it gets (see the module docstring)."""
        self.model = model
        self.prompt_quality: dict[str, float] | None = dict(prompt_quality) if prompt_quality is not None else None
        for quality in (self.prompt_quality or {}).values():
            if not 0.0 <= quality <= 1.0:
                raise SimError(f"prompt quality {quality!r}: must be within 0..1")
        self.judge = judge
        self.adapters: dict[str, float] = dict(adapters or {})
        for name, divergence in self.adapters.items():
            if not 0.0 <= divergence <= 1.0 or name == model or name in aliases:
                raise SimError(f"adapter {name!r}: divergence must be within 0..1 and the name not the model's")
        self.served_names: tuple[str, ...] = (model, *(a for a in aliases if a != model))
        """The names requests may ask for; the first is the one answers report (vLLM's ``--served-model-name``)."""
        self.variant = variant
        self.pod = pod or f"{model}-{variant}-0"
        self.namespace = namespace
        self._knobs = knobs or ModelKnobs()
        self._rng = random.Random(seed)
        self._metrics = _Metrics(model, fine_buckets)
        self._running = 0
        self._slot_free = asyncio.Condition()
        self.stats = ServerStats()
        self.served: collections.deque[ServedRecord] = collections.deque(maxlen=history)
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self.created = int(time.time())

    # ----------------------------------------------------------------- knobs and lifecycle

    @property
    def knobs(self) -> ModelKnobs:
        return self._knobs

    def set_knobs(self, knobs: ModelKnobs | None = None, /, **changes: Any) -> ModelKnobs:
        """Replace the knobs (whole, or some by name); returns the new ones. Raises KnobError."""
        new = (knobs or self._knobs).updated(changes)
        self._knobs = new
        return new

    @property
    def registry(self) -> CollectorRegistry:
        return self._metrics.registry

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count_answers])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_get("/admin/knobs", self._get_knobs)
        app.router.add_post("/admin/knobs", self._post_knobs)
        app.router.add_get("/admin/stats", self._get_stats)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on ``host:port`` (0: a free port); returns the URL. Raises SimError when it cannot bind."""
        self._runner, self._url = await serve(self.app(), host, port, f"model server {self.model}/{self.variant}")
        return self._url

    @property
    def url(self) -> str:
        if self._url is None:
            raise SimError("the model server is not started")
        return self._url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ----------------------------------------------------------------- simple endpoints

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": self.created, "owned_by": "shadowctl-sim",
                     "root": self.model, "parent": None, "max_model_len": 32768}
                    for name in self.served_names
                ] + [
                    {"id": name, "object": "model", "created": self.created, "owned_by": "shadowctl-sim",
                     "root": f"/adapters/{name}", "parent": self.model, "max_model_len": 32768}
                    for name in self.adapters
                ],
            }
        )

    @web.middleware
    async def _count_answers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """``http_requests_total`` as vLLM's instrumentation counts it: by route, method and grouped status."""
        counted = not request.path.startswith(UNCOUNTED_PATHS)
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "none"
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            if counted:
                self._metrics.answered(request.method, name, exc.status)
            raise
        if counted:
            self._metrics.answered(request.method, name, response.status)
        return response

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _metrics_handler(self, _: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _get_knobs(self, _: web.Request) -> web.Response:
        return web.json_response(self._knobs.to_dict())

    async def _post_knobs(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
        except ValueError:
            return web.json_response({"error": "POST /admin/knobs: the body is not JSON"}, status=400)
        if not isinstance(changes, dict):
            return web.json_response({"error": "POST /admin/knobs: expected a JSON object of knob: value"}, status=400)
        try:
            knobs = self.set_knobs(**changes)
        except KnobError as exc:
            return web.json_response({"error": f"POST /admin/knobs: {exc}"}, status=400)
        return web.json_response(knobs.to_dict())

    async def _get_stats(self, _: web.Request) -> web.Response:
        return web.json_response(self.stats.to_dict())

    # ----------------------------------------------------------------- generation

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate_endpoint(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate_endpoint(request, chat=False)

    @staticmethod
    def _parse(body: Any, chat: bool) -> tuple[str, int | None, bool, bool]:
        """Prompt text, max_tokens, stream, include_usage; raises _BadRequest."""
        if not isinstance(body, dict):
            raise _BadRequest("the request body must be a JSON object")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _BadRequest("'messages' must be a non-empty list", "messages")
            parts = []
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise _BadRequest(f"messages[{i}] must be an object with a 'role'", "messages")
                content = m.get("content")
                if isinstance(content, list):
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                parts.append(content if isinstance(content, str) else "")
            text = "\n".join(parts)
            limit = body.get("max_completion_tokens", body.get("max_tokens"))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise _BadRequest("'prompt' must be a string", "prompt")
            text = prompt
            limit = body.get("max_tokens", 16)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise _BadRequest("'max_tokens' must be a positive integer", "max_tokens")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _BadRequest("'stream' must be a boolean", "stream")
        options = body.get("stream_options")
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        return text, limit, stream, include_usage

    def adapter_answer(self, adapter: str, text: str) -> str:
        """An adapter's answer without noise: the base model's reference, or on its `divergence` share of
        prompts (chosen by a hash of the adapter's name and the prompt) an answer of its own."""
        k = self._knobs
        if prompt_seed(text, f"adapter-pick:{adapter}") / 2**64 < self.adapters[adapter]:
            answer = build_answer(text, median_words=k.output_words_median, sigma=k.output_words_sigma,
                                  salt=f"adapter:{adapter}")
            if answer != reference_answer(text, median_words=k.output_words_median, sigma=k.output_words_sigma):
                return answer
            return build_answer(text, median_words=k.output_words_median, sigma=k.output_words_sigma,
                                salt=f"adapter2:{adapter}")
        return reference_answer(text, median_words=k.output_words_median, sigma=k.output_words_sigma)

    def quality_of(self, body: Mapping[str, Any]) -> tuple[float, str] | None:
        """(quality, the text after the system prompt) of a chat request under ``prompt_quality`` (None: the
        server has no table, or the body is not a chat request)."""
        messages = body.get("messages")
        if self.prompt_quality is None or not isinstance(messages, list):
            return None
        n, system = 0, []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "developer"):
                break
            content = m.get("content")
            system.append(content if isinstance(content, str) else "")
            n += 1
        rest: list[str] = []
        for m in messages[n:]:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            rest.append(content if isinstance(content, str) else "")
        quality = self.prompt_quality.get("\n".join(system), 1.0) if n else 1.0
        return quality, "\n".join(rest)

    def _plan(self, text: str, limit: int | None, prompt_tokens: int, adapter: str | None = None,
              quality: tuple[float, str] | None = None) -> _Plan:
        k = self._knobs
        rng = self._rng
        verdict = self.judge.reply(text) if self.judge is not None else None
        if verdict is not None:  # a judge prompt: the verdict, without drift or noise
            tokens = tokenize(verdict)
            ttft = k.ttft_median_s * k.latency_factor
            return _Plan(verdict, tokens, "stop", ttft, [k.tpot_median_s * k.latency_factor] * (len(tokens) - 1),
                         False, False)
        if quality is not None:  # a prompt rollout: the answer to the user's part, as good as the system prompt
            q, asked = quality
            reference = degraded_answer(
                reference_answer(asked, median_words=k.output_words_median, sigma=k.output_words_sigma), q, asked)
        elif adapter is not None:
            reference = self.adapter_answer(adapter, text)
        else:
            reference = reference_answer(text, median_words=k.output_words_median, sigma=k.output_words_sigma)
        drifted = rng.random() < k.drift_rate
        answer = (
            drifted_answer(text, rng, median_words=k.output_words_median, sigma=k.output_words_sigma)
            if drifted
            else reference
        )
        answer = perturb(answer, k.noise_rate, rng)
        tokens = tokenize(answer)
        finish = "stop"
        if limit is not None and len(tokens) > limit:
            tokens = tokens[:limit]
            finish = "length"
        tail = rng.random() < k.tail_probability
        factor = k.latency_factor * (k.tail_factor if tail else 1.0)
        ttft = (k.ttft_median_s * math.exp(rng.gauss(0.0, k.ttft_sigma)) + k.prefill_s_per_token * prompt_tokens) * factor
        tpots = [k.tpot_median_s * math.exp(rng.gauss(0.0, k.tpot_sigma)) * factor for _ in tokens[1:]]
        return _Plan("".join(tokens), tokens, finish, ttft, tpots, drifted, tail)

    async def _acquire_slot(self) -> None:
        if self._running < self._knobs.max_running:  # one event loop: no await between test and set
            self._running += 1
            return
        async with self._slot_free:
            await self._slot_free.wait_for(lambda: self._running < self._knobs.max_running)
            self._running += 1

    async def _release_slot(self) -> None:
        async with self._slot_free:
            self._running -= 1
            self._slot_free.notify_all()

    async def _tokens(self, plan: _Plan, arrival: float, started: float, scale: float) -> AsyncIterator[tuple[int, str]]:
        """Yield (index, token) at each token's deadline; deadlines are absolute so overshoot does not add up."""
        deadline = started + plan.ttft_s * scale
        last = arrival
        for i, token in enumerate(plan.tokens):
            if i > 0:
                deadline += plan.tpots_s[i - 1] * scale
            delay = deadline - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            if i == 0:
                self._metrics.ttft.observe((now - arrival) / scale)
            else:
                self._metrics.itl.observe((now - last) / scale)
            last = now
            self._metrics.generation_tokens.inc()
            yield i, token

    async def _generate_endpoint(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        arrival = time.monotonic()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            body = await request.json()
        except ValueError:
            self.stats.bad_requests += 1
            return _error_response(400, "the request body is not valid JSON", "BadRequestError")
        try:
            text, limit, stream, include_usage = self._parse(body, chat)
        except _BadRequest as exc:
            self.stats.bad_requests += 1
            return _error_response(400, exc.message, "BadRequestError", exc.param)
        asked = body.get("model")
        if asked is not None and not isinstance(asked, str):
            self.stats.bad_requests += 1
            return _error_response(400, "'model' must be a string", "BadRequestError", "model")
        adapter = asked if asked in self.adapters else None
        answered_as = adapter or self.model
        if asked and asked not in self.served_names and adapter is None:  # vLLM: absent or empty: the served model
            self.stats.unknown_model += 1
            return _error_response(404, f"The model `{asked}` does not exist.", "NotFoundError")
        self.stats.requests += 1
        knobs = self._knobs
        scale = knobs.time_scale
        prompt_sha = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        headers = {VARIANT_HEADER: self.variant, "x-request-id": request_id}

        def record(finish: str, tokens: int, ttft: float | None, output: str, plan: _Plan | None) -> None:
            self.served.append(
                ServedRecord(
                    request_id=request_id, host=request.headers.get("Host", ""), path=request.path,
                    prompt_sha256=prompt_sha, stream=stream, finish_reason=finish, completion_tokens=tokens,
                    ttft_s=ttft, e2e_s=(time.monotonic() - arrival) / scale,
                    drifted=bool(plan and plan.drifted), tail=bool(plan and plan.tail), output=output,
                )
            )
            self.stats.by_finish_reason[finish] += 1

        if self._rng.random() < knobs.error_rate:
            self.stats.errors += 1
            self._metrics.finished("error", (time.monotonic() - arrival) / scale)
            record("error", 0, None, "", None)
            return _error_response(
                500, "simulated engine failure (knob error_rate)", "InternalServerError", headers=headers
            )

        prompt_tokens = count_prompt_tokens(text)
        plan = self._plan(text, limit, prompt_tokens, adapter, self.quality_of(body) if chat else None)
        if plan.drifted:
            self.stats.drifted += 1
        if plan.tail:
            self.stats.tail += 1
        self._metrics.waiting.inc()
        try:
            await self._acquire_slot()
        finally:
            self._metrics.waiting.dec()
        started = time.monotonic()
        self._metrics.queue.observe((started - arrival) / scale)
        self._metrics.prompt_tokens.inc(prompt_tokens)
        self._metrics.running.inc()
        rid = ("chatcmpl-" if chat else "cmpl-") + request_id.replace("-", "")[:24]
        created = int(time.time())
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(plan.tokens),
            "total_tokens": prompt_tokens + len(plan.tokens),
        }
        finish = "abort"
        emitted = 0
        first: float | None = None
        try:
            if not stream:
                async for _ in self._tokens(plan, arrival, started, scale):
                    emitted += 1
                    first = first if first is not None else (time.monotonic() - arrival) / scale
                if chat:
                    choice: dict[str, Any] = {
                        "index": 0, "message": {"role": "assistant", "content": plan.answer},
                        "logprobs": None, "finish_reason": plan.finish_reason,
                    }
                else:
                    choice = {"index": 0, "text": plan.answer, "logprobs": None, "finish_reason": plan.finish_reason}
                payload = {
                    "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": answered_as, "choices": [choice], "usage": usage,
                }
                finish = plan.finish_reason
                return web.json_response(payload, headers=headers)

            response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache"})
            await response.prepare(request)
            obj = "chat.completion.chunk" if chat else "text_completion"

            def chunk(delta: str | None, finish_reason: str | None, *, role: bool = False) -> bytes:
                if chat:
                    d: dict[str, Any] = {}
                    if role:
                        d["role"] = "assistant"
                    if delta is not None:
                        d["content"] = delta
                    c: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}
                else:
                    c = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
                data = {"id": rid, "object": obj, "created": created, "model": answered_as, "choices": [c]}
                return b"data: " + json.dumps(data).encode() + b"\n\n"

            if chat:
                await response.write(chunk("", None, role=True))
            async for _, token in self._tokens(plan, arrival, started, scale):
                await response.write(chunk(token, None))
                emitted += 1
                first = first if first is not None else (time.monotonic() - arrival) / scale
            await response.write(chunk(None if chat else "", plan.finish_reason))
            if include_usage:
                data = {"id": rid, "object": obj, "created": created, "model": answered_as, "choices": [],
                        "usage": usage}
                await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            finish = plan.finish_reason
            return response
        except ConnectionError:
            finish = "abort"  # the client hung up mid-stream: vLLM aborts the request and counts it nowhere
            return response
        except asyncio.CancelledError:
            finish = "abort"
            raise
        finally:
            self._metrics.running.dec()
            await self._release_slot()
            if finish == "abort":
                self.stats.aborted += 1
            else:
                e2e = (time.monotonic() - arrival) / scale
                self._metrics.finished(finish, e2e)
                if emitted > 1 and first is not None:
                    self._metrics.request_tpot.observe((e2e - first) / (emitted - 1))
                self.stats.succeeded += 1
            record(finish, emitted, first, "".join(plan.tokens[:emitted]), plan)


# ----------------------------------------------------------------------------- standalone


def _knob_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("knobs (see ModelKnobs)")
    for f in dataclasses.fields(ModelKnobs):
        kind = int if f.name == "max_running" else float
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"knob_{f.name}", type=kind, default=None)


def main(argv: list[str] | None = None) -> int:
    """``python -m shadowctl.sim.modelserver``: serve until interrupted; prints the URL."""
    log_to_stderr()
    parser = argparse.ArgumentParser(prog="python -m shadowctl.sim.modelserver",
                                     description="A simulated OpenAI-compatible model server with vLLM metrics.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--model", default="sim-model", help="the served model name")
    parser.add_argument("--alias", action="append", default=[], metavar="NAME",
                        help="another name requests may ask for (repeatable); other names are answered 404")
    parser.add_argument("--variant", default="primary", help="reported in the x-sim-variant response header")
    parser.add_argument("--pod", default=None, help="the simulated pod's name (default: MODEL-VARIANT-0)")
    parser.add_argument("--namespace", default="default", help="the simulated pod's namespace")
    parser.add_argument("--seed", type=int, default=None)
    _knob_arguments(parser)
    args = parser.parse_args(argv)
    changes = {k.removeprefix("knob_"): v for k, v in vars(args).items() if k.startswith("knob_") and v is not None}
    try:
        knobs = ModelKnobs().updated(changes)
    except KnobError as exc:
        parser.error(str(exc))

    async def serve() -> None:
        server = SimModelServer(args.model, variant=args.variant, knobs=knobs, seed=args.seed, pod=args.pod,
                                namespace=args.namespace, aliases=args.alias)
        url = await server.start(args.host, args.port)
        print(url, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except SimError as exc:
        print(f"modelserver: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
