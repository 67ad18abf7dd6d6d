"""The llm-judge comparator's I/O: a judge model behind an OpenAI-compatible endpoint scores candidate pairs.

Why it is built this way:

* **Never blocks pairing.** The output source hands each candidate pair to :meth:`PairJudge.offer`, which
  only counts and enqueues (a bounded queue); ``concurrency`` worker tasks ask the judge. A pair that finds
  the queue full, or comes after ``maxPairsPerInterval`` pairs were taken in this analysis interval, is
  not judged (counted ``capped``): a judge slower than the traffic samples the pairs, it does not hold
  them up.
* **A rate cap bounds the cost.** Every request to the judge takes a start time at least
  ``1/requestsPerSecond`` after the previous one's (reserved under the loop, so concurrent workers cannot
  both take one), so over any span T at most ``T * requestsPerSecond + 1`` requests start. Each judged
  pair costs two requests (both orders, :mod:`shadowctl.compare.llmjudge`).
* **No verdict is no data, never a pass.** A timeout, a connection error, an HTTP error, a reply without
  ``[[A]]``/``[[B]]``/``[[C]]``, or a prompt template that cannot be read leaves the pair unjudged
  (counted ``failed``, the reason kept in ``last_error``); only judged pairs reach the tally, so a judge
  that never answers leaves the comparator without data.
* **Credentials** come from a Secret through :class:`~shadowctl.sources.secrets.SecretReader` (read again
  at once after a 401 or 403, so a rotated key applies); the prompt template from a ConfigMap key (a
  versioned name, e.g. kustomize's configMapGenerator hash), read through the same short-lived cache idea.
  Neither value reaches a log or an error.

A failed candidate answer (non-2xx or cut off) is a loss without asking the judge (as every comparator
counts it a disagreement); a pair whose primary failed is not judged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import structlog

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.comparators import PairResult, scorable
from shadowctl.compare.events import Variant, trace_id
from shadowctl.compare.llmjudge import (
    Choice,
    TemplateError,
    check_template,
    combine,
    no_verdict_reason,
    parse_choice,
    question_of,
    render,
    template_version,
)
from shadowctl.compare.llmjudge import Outcome as JudgeOutcome
from shadowctl.compare.pairing import Pair
from shadowctl.kube import CONFIG_MAP, KubeClient, KubeError, NotFound, ResourceRef
from shadowctl.policy.model import MAX_JUDGE_PROMPT_CHARS, ComparatorName, LlmJudge, ShadowPolicy
from shadowctl.sources.base import SourceError
from shadowctl.sources.secrets import SecretReader, parse_secret_ref

log = structlog.get_logger(__name__)

API_KEY = "apiKey"
"""The key of the judge's bearer token in its Secret when ``apiKeySecret`` names none."""
QUEUE_FACTOR = 4
"""Pairs waiting for a worker, at most, per unit of concurrency (beyond it a pair is not judged)."""
TEMPLATE_TTL_S = 30.0
"""How long a template read from a ConfigMap is reused."""
MAX_REPLY_BYTES = 256 * 1024
"""A judge reply larger than this is not a verdict (the judge is asked for a sentence and a mark)."""


class JudgeCallFailed(SourceError):
    """The judge model did not give a verdict: a timeout, an error, or a reply without [[A]], [[B]] or [[C]]."""


class JudgeModel(Protocol):
    """One question to the judge model."""

    async def ask(self, prompt: str) -> str:
        """The judge's reply to ``prompt`` (its text); JudgeCallFailed when there is none."""
        ...

    async def aclose(self) -> None:
        """Release the connection pool."""
        ...


class OpenAIJudge:
    """A judge model behind an OpenAI-compatible ``POST {url}/chat/completions`` (temperature 0)."""

    def __init__(self, url: str, model: str, *, timeout_s: float,
                 api_key: Callable[[], Awaitable[str | None]] | None = None,
                 on_refused: Callable[[], None] | None = None, max_tokens: int = 256) -> None:
        """``api_key``: read before every request (a cached Secret); ``on_refused``: called on a 401 or 403
        (forget the cached key, so the next request reads the Secret again)."""
        self.endpoint = f"{url.rstrip('/')}/chat/completions"
        self.model = model
        self.timeout_s = timeout_s
        self.api_key = api_key
        self.on_refused = on_refused
        self.max_tokens = max_tokens
        self._client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)

    async def ask(self, prompt: str) -> str:
        headers = {"content-type": "application/json"}
        try:
            key = await self.api_key() if self.api_key is not None else None
        except SourceError as exc:
            raise JudgeCallFailed(f"no judge credentials: {exc}") from exc
        if key:
            headers["authorization"] = f"Bearer {key}"
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": self.max_tokens, "stream": False}
        try:
            async with asyncio.timeout(self.timeout_s):  # the whole exchange, not httpx's per-read timeout
                response = await self._client.post(self.endpoint, json=body, headers=headers)
        except TimeoutError:
            raise JudgeCallFailed(f"judge {self.endpoint}: no answer within {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise JudgeCallFailed(f"judge {self.endpoint}: {type(exc).__name__}: {exc}") from exc
        if response.status_code in (401, 403):
            if self.on_refused is not None:
                self.on_refused()
            raise JudgeCallFailed(f"judge {self.endpoint} refused the credentials (HTTP {response.status_code})")
        if response.status_code != 200:
            raise JudgeCallFailed(f"judge {self.endpoint}: HTTP {response.status_code}")
        if len(response.content) > MAX_REPLY_BYTES:
            raise JudgeCallFailed(f"judge {self.endpoint}: a reply over {MAX_REPLY_BYTES} bytes")
        return _reply_text(response, self.endpoint)

    async def aclose(self) -> None:
        await self._client.aclose()


def _reply_text(response: httpx.Response, endpoint: str) -> str:
    try:
        data: Any = response.json()
        text = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise JudgeCallFailed(f"judge {endpoint}: not an OpenAI chat completion") from None
    if not isinstance(text, str):
        raise JudgeCallFailed(f"judge {endpoint}: the reply has no text")
    return text


class RateCap:
    """Start times at least ``1/rate`` apart (see the module docstring); ``sleep`` and ``clock`` injectable."""

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.gap = 1.0 / rate
        self.clock = clock
        self.sleep = sleep
        self._next = -float("inf")

    async def take(self) -> float:
        """Wait for this request's start time (reserved at once, so no await between test and set); returns it."""
        now = self.clock()
        start = max(now, self._next)
        self._next = start + self.gap
        if start > now:
            await self.sleep(start - now)
        return start


@dataclass
class JudgeStats:
    """What the judge did since the source started (a health signal beside the tally)."""

    offered: int = 0
    judged: int = 0
    wins: int = 0
    ties: int = 0
    losses: int = 0
    failed: int = 0
    """Pairs without a verdict: a timeout, an error, an unreadable reply or template (no data)."""
    capped: int = 0
    """Pairs not judged: over maxPairsPerInterval, or the queue full."""
    requests: int = 0
    started_at: list[tuple[float, float]] = field(default_factory=list)
    """(reserved start, actual start) of the first 10,000 requests (the rate-cap test reads them)."""

    def as_dict(self) -> dict[str, int]:
        return {"offered": self.offered, "judged": self.judged, "wins": self.wins, "ties": self.ties,
                "losses": self.losses, "failed": self.failed, "capped": self.capped, "requests": self.requests}


Template = Callable[[], Awaitable[str]]
"""Gives the judge prompt template (checked: it holds every placeholder); raises SourceError or TemplateError."""
Deliver = Callable[[PairResult], None]


class PairJudge:
    """Judges candidate pairs in the background: offer, then results arrive through ``deliver``."""

    def __init__(self, spec: LlmJudge, model: JudgeModel, template: Template, *, interval_s: float,
                 clock: Callable[[], float] = time.monotonic, rate: RateCap | None = None) -> None:
        self.spec = spec
        self.model = model
        self.template = template
        self.interval_s = interval_s
        self.clock = clock
        self.rate = rate or RateCap(spec.rate.requests_per_second, clock=clock)
        self.stats = JudgeStats()
        self.last_error: str | None = None
        self.template_version: str | None = None
        """The short hash of the template the last judged pair used (the prompt's version as judged)."""
        self._queue: asyncio.Queue[tuple[Pair, Deliver]] = asyncio.Queue(maxsize=QUEUE_FACTOR * spec.concurrency)
        self._window = -1
        self._taken = 0
        self._workers: list[asyncio.Task[None]] = []

    def offer(self, pair: Pair, deliver: Deliver) -> None:
        """Take one pair for judging, without waiting (a baseline pair, or a failed primary: ignored).

        A failed candidate answer is delivered at once as a loss; a redacted pair the judge cannot read is
        delivered as redacted; otherwise the pair waits for a worker, unless this interval's cap is reached or
        the queue is full (then it is counted ``capped`` and not judged)."""
        if pair.variant is not Variant.candidate or not pair.primary.ok:
            return
        self.stats.offered += 1
        name = ComparatorName.llm_judge
        if not scorable(name, pair.primary, pair.other):
            deliver(PairResult(pair.request_id, pair.variant, {}, {}, None, (name,)))
            return
        if not pair.other.ok:
            self._count(JudgeOutcome.loss)
            deliver(_result(pair, JudgeOutcome.loss))
            return
        window = int(self.clock() // self.interval_s)
        if window != self._window:
            self._window, self._taken = window, 0
        if self._taken >= self.spec.rate.max_pairs_per_interval:
            self.stats.capped += 1
            return
        try:
            self._queue.put_nowait((pair, deliver))
        except asyncio.QueueFull:
            self.stats.capped += 1
            return
        self._taken += 1

    def problem(self) -> str | None:
        """Why the comparator has no data, when the judge failed every pair it was asked about (else None)."""
        return no_verdict_reason(self.stats.judged, self.stats.failed, self.last_error)

    async def run(self) -> None:
        """Ask the judge until cancelled (``concurrency`` workers)."""
        self._workers = [asyncio.create_task(self._work(), name=f"llm-judge worker {i}")
                         for i in range(self.spec.concurrency)]
        try:
            await asyncio.gather(*self._workers)
        finally:
            for worker in self._workers:
                await cancel_and_wait(worker)
            await self.model.aclose()

    async def _work(self) -> None:
        while True:
            pair, deliver = await self._queue.get()
            try:
                outcome = await self.judge(pair)
            except (JudgeCallFailed, SourceError, TemplateError) as exc:
                self.stats.failed += 1
                if str(exc) != self.last_error:
                    log.warning("llm-judge.no-verdict", request_id=pair.request_id, error=str(exc))
                self.last_error = str(exc)
                continue
            self._count(outcome)
            deliver(_result(pair, outcome))

    async def judge(self, pair: Pair) -> JudgeOutcome:
        """Ask both orders (candidate as A, then as B) and combine them; JudgeCallFailed without a verdict."""
        template = check_template(await self.template())
        self.template_version = template_version(template)
        question = question_of(pair.primary)
        limit = self.spec.max_answer_chars
        first = await self._ask(render(template, question, pair.other.output, pair.primary.output, max_chars=limit))
        second = await self._ask(render(template, question, pair.primary.output, pair.other.output, max_chars=limit))
        return combine(first, second)

    async def _ask(self, prompt: str) -> Choice:
        reserved = await self.rate.take()
        self.stats.requests += 1
        if len(self.stats.started_at) < 10_000:
            self.stats.started_at.append((reserved, self.clock()))
        reply = await self.model.ask(prompt)
        choice = parse_choice(reply)
        if choice is None:
            raise JudgeCallFailed(f"the judge's reply ends with no verdict ([[A]], [[B]] or [[C]]): {reply[-120:]!r}")
        return choice

    def _count(self, outcome: JudgeOutcome) -> None:
        self.stats.judged += 1
        if outcome is JudgeOutcome.win:
            self.stats.wins += 1
        elif outcome is JudgeOutcome.tie:
            self.stats.ties += 1
        else:
            self.stats.losses += 1


def _result(pair: Pair, outcome: JudgeOutcome) -> PairResult:
    name = ComparatorName.llm_judge
    traceparent = pair.primary.traceparent or pair.other.traceparent
    return PairResult(pair.request_id, pair.variant, {name: outcome.score}, {name: outcome.score >= 0.5},
                      trace_id(traceparent) if traceparent else None)


# --------------------------------------------------------------------------- from a policy


def inline_template(text: str) -> Template:
    async def get() -> str:
        return text

    return get


def config_map_template(kube: KubeClient, namespace: str, name: str, key: str, *, field: str,
                        ttl: float = TEMPLATE_TTL_S, clock: Callable[[], float] = time.monotonic) -> Template:
    """The template under ``key`` of ConfigMap ``namespace/name``, reused for ``ttl`` seconds."""
    held: list[tuple[float, str]] = []

    async def get() -> str:
        now = clock()
        if held and now - held[0][0] < ttl:
            return held[0][1]
        where = f"ConfigMap {namespace}/{name} ({field})"
        try:
            obj = await kube.get(ResourceRef(CONFIG_MAP, name, namespace))
        except NotFound:
            raise JudgeCallFailed(f"{where} not found") from None
        except KubeError as exc:
            raise JudgeCallFailed(f"cannot read {where}: {exc}") from exc
        text = (obj.get("data") or {}).get(key)
        if not isinstance(text, str):
            raise JudgeCallFailed(f"{where} has no key {key!r}")
        if len(text) > MAX_JUDGE_PROMPT_CHARS:
            raise JudgeCallFailed(f"{where}: key {key!r} holds {len(text)} characters, over {MAX_JUDGE_PROMPT_CHARS}")
        held[:] = [(now, check_template(text))]
        return text

    return get


def judge_spec(policy: ShadowPolicy) -> LlmJudge | None:
    """The policy's llm-judge comparator's settings (None: it has none)."""
    outputs = policy.spec.analysis.outputs
    if outputs is None:
        return None
    return next((c.judge for c in outputs.comparators if c.judge is not None), None)


def judge_for_policy(policy: ShadowPolicy, kube: KubeClient | None, *, secrets: SecretReader | None = None,
                     clock: Callable[[], float] = time.monotonic) -> PairJudge | None:
    """The PairJudge a policy's llm-judge comparator describes (None: the policy has none). Credentials and a
    ConfigMap template need ``kube``; without it they are no data (the pair's verdict fails, never passes)."""
    spec = judge_spec(policy)
    if spec is None:
        return None
    namespace = policy.metadata.namespace
    field_ = "spec.analysis.outputs.comparators[llm-judge].judge"
    reader = secrets if secrets is not None else (SecretReader(kube) if kube is not None else None)
    api_key: Callable[[], Awaitable[str | None]] | None = None
    on_refused: Callable[[], None] | None = None
    if spec.api_key_secret is not None:
        name, key = parse_secret_ref(spec.api_key_secret, API_KEY)

        async def read_key() -> str | None:
            if reader is None:
                raise JudgeCallFailed(f"{field_}.apiKeySecret: no Kubernetes client to read Secret {name}")
            return await reader.text(namespace, name, key, field=f"{field_}.apiKeySecret")

        def forget() -> None:
            if reader is not None:
                reader.invalidate(namespace, name)

        api_key, on_refused = read_key, forget
    prompt = spec.prompt
    if prompt.text is not None:
        template = inline_template(prompt.text)
    elif prompt.config_map_ref is not None and kube is not None:
        ref = prompt.config_map_ref
        template = config_map_template(kube, namespace, ref.name, ref.key, field=f"{field_}.prompt.configMapRef",
                                       clock=clock)
    else:
        async def missing() -> str:
            raise JudgeCallFailed(f"{field_}.prompt.configMapRef: no Kubernetes client to read the ConfigMap")

        template = missing
    model = OpenAIJudge(spec.url, spec.model, timeout_s=spec.timeout.total_seconds(), api_key=api_key,
                        on_refused=on_refused)
    return PairJudge(spec, model, template, interval_s=policy.spec.analysis.interval.total_seconds(), clock=clock)
