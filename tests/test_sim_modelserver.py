"""The simulated model server over real HTTP: OpenAI formats, vLLM metrics, and every knob."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from shadowctl.sim.errors import KnobError
from shadowctl.sim.modelserver import TTFT_BUCKETS, ModelKnobs, SimModelServer
from shadowctl.sim.prompts import reference_answer

FAST = ModelKnobs(time_scale=0.01, ttft_median_s=0.1, tpot_median_s=0.01, output_words_median=20)
PROMPT = "What does time to first token measure?"


def chat_body(prompt: str = PROMPT, *, model: str = "chat-7b", **extra: Any) -> dict[str, Any]:
    """A chat request for the model the ``server`` fixture serves (``model``: another server's name)."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **extra}


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest_asyncio.fixture
async def server() -> AsyncIterator[SimModelServer]:
    srv = SimModelServer("chat-7b", variant="primary", knobs=FAST, seed=1, pod="chat-primary-abc", namespace="llm")
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def stream_events(session: aiohttp.ClientSession, url: str, body: Any) -> list[Any]:
    events: list[Any] = []
    async with session.post(url, json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if not line:
                continue
            assert line.startswith("data: "), line
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """A vllm: sample of model chat-7b, engine 0 (vLLM 0.33 labels every vllm: series with both)."""
    return samples[(name, tuple(sorted({"model_name": "chat-7b", "engine": "0", **labels}.items())))]


def http_value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], handler: str, status: str,
               method: str = "POST") -> float:
    """``http_requests_total`` as prometheus-fastapi-instrumentator labels it (0 where the series is absent)."""
    key = ("http_requests_total", tuple(sorted({"handler": handler, "method": method, "status": status}.items())))
    return samples.get(key, 0.0)


async def test_non_streaming_chat_and_completions_are_openai_format(
    server: SimModelServer, session: aiohttp.ClientSession
) -> None:
    status, body = await post(session, server.url + "/v1/chat/completions", chat_body())
    assert status == 200
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "chat-7b"
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    content = choice["message"]["content"]
    assert content == reference_answer(PROMPT, median_words=20, sigma=FAST.output_words_sigma)
    usage = body["usage"]
    assert usage["completion_tokens"] == len(content.split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    status, body = await post(session, server.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 5})
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert len(body["choices"][0]["text"].split()) == 5 == body["usage"]["completion_tokens"]
    assert content.startswith(body["choices"][0]["text"])  # same prompt text, same answer, cut at max_tokens


async def test_streaming_chat_is_valid_sse_and_equals_the_non_streamed_answer(
    server: SimModelServer, session: aiohttp.ClientSession
) -> None:
    events = await stream_events(
        session, server.url + "/v1/chat/completions",
        chat_body(stream=True, stream_options={"include_usage": True}),
    )
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"][0]["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    _, plain = await post(session, server.url + "/v1/chat/completions", chat_body())
    assert text == plain["choices"][0]["message"]["content"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == len(chunks) - 2

    events = await stream_events(session, server.url + "/v1/completions", {"prompt": PROMPT, "stream": True})
    assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])
    assert "usage" not in events[-2]  # no usage chunk unless asked for
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == " ".join(text.split()[:16])


async def test_models_health_and_bad_requests(server: SimModelServer, session: aiohttp.ClientSession) -> None:
    async with session.get(server.url + "/v1/models") as resp:
        assert (await resp.json())["data"][0]["id"] == "chat-7b"
    async with session.get(server.url + "/health") as resp:
        assert resp.status == 200
    status, body = await post(session, server.url + "/v1/chat/completions", {"messages": "hi"})
    assert status == 400 and body["error"]["param"] == "messages" and body["error"]["code"] == 400
    status, body = await post(session, server.url + "/v1/chat/completions", chat_body(max_tokens=0))
    assert status == 400 and body["error"]["param"] == "max_tokens"
    async with session.post(server.url + "/v1/completions", data=b"{not json") as resp:
        assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]["message"]
    assert server.stats.bad_requests == 3 and server.stats.requests == 0
    async with session.get(server.url + "/metrics") as resp:
        samples = metrics(await resp.text())
    # Refused before the engine: in vLLM's HTTP counts as 4xx, never in vllm:request_success_total.
    assert http_value(samples, "/v1/chat/completions", "4xx") == 2 and http_value(samples, "/v1/completions", "4xx") == 1
    assert http_value(samples, "/v1/models", "2xx", method="GET") == 1
    assert not any(dict(k[1]).get("handler") in ("/health", "/metrics") for k in samples if k[0] == "http_requests_total")
    assert sum(v for k, v in samples.items() if k[0] == "vllm:request_success_total") == 0


async def test_a_model_it_does_not_serve_is_404_as_vllm_answers_it(session: aiohttp.ClientSession) -> None:
    """vLLM's _check_model: a name not among --served-model-name is 404 NotFoundError (after the body's own
    400 checks, before the engine); an absent or empty name is the served model; aliases are served too."""
    srv = SimModelServer("llama-chat", aliases=["llama-chat-lora"], knobs=FAST)
    await srv.start()
    try:
        status, body = await post(session, srv.url + "/v1/chat/completions", chat_body(model="llama-chat-v2"))
        assert status == 404
        assert body == {"error": {"message": "The model `llama-chat-v2` does not exist.", "type": "NotFoundError",
                                  "param": None, "code": 404}}
        status, body = await post(session, srv.url + "/v1/completions", {"model": "gpt-4o", "prompt": PROMPT})
        assert status == 404 and body["error"]["message"] == "The model `gpt-4o` does not exist."
        status, body = await post(session, srv.url + "/v1/completions", {"model": "gpt-4o", "prompt": 3})
        assert status == 400  # the body is checked first
        status, body = await post(session, srv.url + "/v1/completions", {"model": 7, "prompt": PROMPT})
        assert status == 400 and body["error"]["param"] == "model"
        for name in ("llama-chat", "llama-chat-lora", ""):
            status, body = await post(session, srv.url + "/v1/chat/completions", chat_body(model=name, max_tokens=2))
            assert status == 200 and body["model"] == "llama-chat", name
        status, body = await post(session, srv.url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert status == 200 and body["model"] == "llama-chat"
        async with session.get(srv.url + "/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["llama-chat", "llama-chat-lora"]
        assert srv.stats.unknown_model == 2 and srv.stats.requests == 4 and srv.stats.bad_requests == 2
        async with session.get(srv.url + "/metrics") as resp:
            samples = metrics(await resp.text())
        assert http_value(samples, "/v1/chat/completions", "4xx") == 1 and http_value(samples, "/v1/completions", "4xx") == 3
        e2e = ("vllm:e2e_request_latency_seconds_count", (("engine", "0"), ("model_name", "llama-chat")))
        assert samples[e2e] == 4  # a 404 never reaches the engine
    finally:
        await srv.stop()


async def test_metrics_have_vllm_names_and_counts_match_requests(
    server: SimModelServer, session: aiohttp.ClientSession
) -> None:
    prompts = [f"Question number {i}: is it safe to retry POST requests?" for i in range(12)]
    bodies = [chat_body(p, max_tokens=8, stream=i % 2 == 0) for i, p in enumerate(prompts)]
    tokens = 0
    for body in bodies:
        if body["stream"]:
            events = await stream_events(session, server.url + "/v1/chat/completions", body)
            tokens += sum(1 for e in events[:-1] if e["choices"][0]["delta"].get("content"))
        else:
            _, answer = await post(session, server.url + "/v1/chat/completions", body)
            tokens += answer["usage"]["completion_tokens"]
    async with session.get(server.url + "/metrics") as resp:
        assert resp.status == 200
        samples = metrics(await resp.text())
    n = len(bodies)
    for name in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert value(samples, f"vllm:{name}_seconds_count") == n, name
    gaps = tokens - n  # every request produced at least one token
    assert value(samples, "vllm:inter_token_latency_seconds_count") == gaps
    # One observation per request with at least two tokens; the name removed in vLLM 0.13 is not served.
    assert 0 < value(samples, "vllm:request_time_per_output_token_seconds_count") <= n
    assert not any(k[0].startswith("vllm:time_per_output_token") for k in samples)
    assert http_value(samples, "/v1/chat/completions", "2xx") == n
    assert value(samples, "vllm:generation_tokens_total") == tokens
    assert value(samples, "vllm:prompt_tokens_total") > 0
    finished = sum(value(samples, "vllm:request_success_total", finished_reason=r) for r in ("stop", "length"))
    assert finished == n
    for reason in ("abort", "error", "repetition"):  # every reason's series exists from the start
        assert value(samples, "vllm:request_success_total", finished_reason=reason) == 0
    assert value(samples, "vllm:num_requests_running") == 0
    # vLLM's TTFT bucket boundaries, cumulative, ending in +Inf == count
    le = sorted(float(dict(k[1])["le"]) for k in samples if k[0] == "vllm:time_to_first_token_seconds_bucket")
    assert le == [*TTFT_BUCKETS, float("inf")]
    assert not any(k[0].startswith("DCGM_") for k in samples)  # the DCGM exporter serves those


async def test_latency_is_really_spent(session: aiohttp.ClientSession) -> None:
    """A lower bound only: a stream cannot deliver its first token before the sampled TTFT has passed."""
    knobs = ModelKnobs(time_scale=0.1, ttft_median_s=0.5, ttft_sigma=0.0, prefill_s_per_token=0.0, tpot_median_s=0.1,
                       tpot_sigma=0.0)
    srv = SimModelServer("m", knobs=knobs)
    await srv.start()
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        first = None
        async with session.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": True}) as r:
            async for raw in r.content:
                if first is None and raw.startswith(b"data: {"):
                    first = loop.time() - start
        total = loop.time() - start
        assert first is not None and first >= 0.05  # 0.5 simulated seconds at time_scale 0.1
        assert total >= 0.05 + 3 * 0.01
        assert srv.served[-1].ttft_s is not None and srv.served[-1].ttft_s >= 0.5
    finally:
        await srv.stop()


async def test_queueing_beyond_max_running(session: aiohttp.ClientSession) -> None:
    knobs = ModelKnobs(time_scale=0.05, ttft_median_s=0.4, ttft_sigma=0.0, prefill_s_per_token=0.0, max_running=1)
    srv = SimModelServer("m", knobs=knobs)
    await srv.start()
    try:
        body = {"prompt": PROMPT, "max_tokens": 1}
        await asyncio.gather(*(post(session, srv.url + "/v1/completions", body) for _ in range(3)))
        async with session.get(srv.url + "/metrics") as resp:
            samples = metrics(await resp.text())
        queued = samples[("vllm:request_queue_time_seconds_sum", (("engine", "0"), ("model_name", "m")))]
        assert queued >= (0.4 + 0.8) * 0.9  # the 2nd waits one TTFT, the 3rd two
    finally:
        await srv.stop()


async def test_error_rate_knob(server: SimModelServer, session: aiohttp.ClientSession) -> None:
    server.set_knobs(error_rate=0.3, ttft_median_s=0.01)
    results = await asyncio.gather(
        *(post(session, server.url + "/v1/completions", {"prompt": f"p{i}", "max_tokens": 1}) for i in range(300))
    )
    errors = [body for status, body in results if status == 500]
    assert 0.2 <= len(errors) / 300 <= 0.4  # binomial sd 0.026: a 4-sigma bound
    assert errors[0]["error"]["type"] == "InternalServerError" and errors[0]["error"]["code"] == 500
    assert server.stats.errors == len(errors)
    async with session.get(server.url + "/metrics") as resp:
        samples = metrics(await resp.text())
    # vLLM 0.33: the engine finishes them with reason "error" and records their end-to-end latency.
    assert value(samples, "vllm:request_success_total", finished_reason="error") == len(errors)
    assert value(samples, "vllm:request_success_total", finished_reason="abort") == 0
    assert value(samples, "vllm:time_to_first_token_seconds_count") == 300 - len(errors)
    assert value(samples, "vllm:e2e_request_latency_seconds_count") == 300
    assert http_value(samples, "/v1/completions", "5xx") == len(errors)
    assert http_value(samples, "/v1/completions", "2xx") == 300 - len(errors)


async def test_drift_and_noise_knobs(session: aiohttp.ClientSession) -> None:
    prompts = [f"Case {i}: should I enable request batching on my inference server?" for i in range(60)]
    primary = SimModelServer("a", variant="primary", knobs=FAST, seed=1)
    replica = SimModelServer("a", variant="baseline", knobs=FAST.updated({"noise_rate": 0.1}), seed=2)
    candidate = SimModelServer("b", variant="candidate", knobs=FAST.updated({"drift_rate": 0.5}), seed=3)
    for s in (primary, replica, candidate):
        await s.start()
    try:
        async def answers(srv: SimModelServer) -> list[str]:
            out = await asyncio.gather(*(post(session, srv.url + "/v1/chat/completions", chat_body(p, model=srv.model))
                                     for p in prompts))
            return [body["choices"][0]["message"]["content"] for _, body in out]

        a, r, c = await answers(primary), await answers(replica), await answers(candidate)
        reference = [reference_answer(p, median_words=20, sigma=FAST.output_words_sigma) for p in prompts]
        assert a == reference  # no knob: the deterministic answer, whatever the model's name or the seed
        noisy = sum(x != y for x, y in zip(a, r, strict=True))
        assert noisy >= 30  # ~20 words at 10% each: nearly every answer has a perturbed word
        overlap = [len(set(x.split()) & set(y.split())) / len(set(x.split())) for x, y in zip(a, r, strict=True)]
        assert sum(overlap) / len(overlap) > 0.7  # ...but stays close: the noise baseline
        drifted = sum(x != y for x, y in zip(a, c, strict=True))
        assert drifted == candidate.stats.drifted and 15 <= drifted <= 45
    finally:
        for s in (primary, replica, candidate):
            await s.stop()


async def test_tail_regression_moves_p99_not_p50(session: aiohttp.ClientSession) -> None:
    """TTFT as the server measured it (wall time / time_scale) over 300 requests per server.

    time_scale 0.5 (median 0.1 s of wall time): at 0.05 the scheduler's delays on a loaded machine were
    multiplied by 20 and raised the baseline's p99 enough to hide the tail (ratio 1.8 instead of >= 2.5).
    """
    base = ModelKnobs(time_scale=0.5, ttft_median_s=0.2, ttft_sigma=0.2, prefill_s_per_token=0.0)
    servers = [SimModelServer("m", knobs=base, seed=5),
               SimModelServer("m", knobs=base.updated({"tail_probability": 0.05, "tail_factor": 8.0}), seed=6)]
    for s in servers:
        await s.start()
    try:
        limit = asyncio.Semaphore(16)

        async def one(srv: SimModelServer, i: int) -> None:
            async with limit:
                await post(session, srv.url + "/v1/completions", {"prompt": f"q{i}", "max_tokens": 1})

        quantiles = []
        for srv in servers:
            await asyncio.gather(*(one(srv, i) for i in range(300)))
            ttfts = sorted(r.ttft_s for r in srv.served if r.ttft_s is not None)
            quantiles.append((ttfts[len(ttfts) // 2], ttfts[int(len(ttfts) * 0.99)]))
        (p50_base, p99_base), (p50_tail, p99_tail) = quantiles
        assert 0.75 <= p50_tail / p50_base <= 1.33
        assert p99_tail / p99_base >= 2.5
        assert 5 <= servers[1].stats.tail <= 30
    finally:
        for s in servers:
            await s.stop()


async def test_admin_knobs_endpoint(server: SimModelServer, session: aiohttp.ClientSession) -> None:
    status, body = await post(session, server.url + "/admin/knobs", {"latency_factor": 2.5, "max_running": 8.0})
    assert status == 200 and body["latency_factor"] == 2.5 and body["max_running"] == 8
    assert server.knobs.latency_factor == 2.5
    status, body = await post(session, server.url + "/admin/knobs", {"drift_rate": 1.5})
    assert status == 400 and "drift_rate" in body["error"] and "0..1" in body["error"]
    status, body = await post(session, server.url + "/admin/knobs", {"ttft": 1})
    assert status == 400 and "unknown knob(s) ttft" in body["error"]
    status, body = await post(session, server.url + "/admin/knobs", ["x"])
    assert status == 400
    assert server.knobs.latency_factor == 2.5  # refused changes leave the knobs as they were
    with pytest.raises(KnobError, match="time_scale"):
        ModelKnobs(time_scale=0)


async def test_client_disconnect_mid_stream_is_counted_nowhere(session: aiohttp.ClientSession) -> None:
    """vLLM 0.33 aborts a request whose client hung up and counts it in no vllm: series (vLLM #31503)."""
    knobs = ModelKnobs(time_scale=0.05, ttft_median_s=0.01, tpot_median_s=0.5, output_words_median=40)
    srv = SimModelServer("m", knobs=knobs)
    await srv.start()
    try:
        async with session.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 30, "stream": True}) as r:
            await r.content.readline()  # the first token, then hang up
        await asyncio.wait_for(_until(lambda: srv.stats.aborted == 1), 10)
        assert srv.served[-1].finish_reason == "abort" and srv.served[-1].completion_tokens < 30
        async with session.get(srv.url + "/metrics") as resp:
            samples = metrics(await resp.text())
        finished = {dict(k[1])["finished_reason"]: v for k, v in samples.items() if k[0] == "vllm:request_success_total"}
        assert set(finished) == {"stop", "length", "abort", "error", "repetition"} and sum(finished.values()) == 0
        assert samples[("vllm:e2e_request_latency_seconds_count", (("engine", "0"), ("model_name", "m")))] == 0
    finally:
        await srv.stop()


async def _until(condition: Any) -> None:
    for _ in range(2000):  # the server notices the hang-up at its next write
        if condition():
            return
        await asyncio.sleep(0.01)


def test_standalone_prints_its_url_and_rejects_bad_knobs(tmp_path: Any) -> None:
    bad = subprocess.run([sys.executable, "-m", "shadowctl.sim.modelserver", "--error-rate", "3"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "knob error_rate" in bad.stderr and "Traceback" not in bad.stderr
    proc = subprocess.Popen([sys.executable, "-m", "shadowctl.sim.modelserver", "--port", "0", "--model", "x"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as resp:
            assert json.load(resp)["data"][0]["id"] == "x"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_dcgm_exporter_names_the_gpus_pod_as_the_exporter_does() -> None:
    from shadowctl.sim.dcgm import SimDcgmExporter

    server = SimModelServer("m", pod="chat-v2-7b9c4d-r2n5t", namespace="llm", knobs=FAST.updated({"gpu_util_percent": 81}))
    pod_labels = {"container", "namespace", "pod"}
    old_labels = {"container_name", "pod_namespace", "pod_name"}
    for options, names in (({}, pod_labels), ({"old_names": True}, old_labels), ({"kubernetes": False}, set())):
        exporter = SimDcgmExporter("node-a", **options)
        exporter.attach(server, gpus=2)
        exporter.add_idle_gpus(1)
        util = [(labels, value) for name, _, labels, value in exporter.series() if name == "DCGM_FI_DEV_GPU_UTIL"]
        assert [v for _, v in util] == [81.0, 81.0, 0.0]
        assert [set(labels) & (pod_labels | old_labels) for labels, _ in util] == [names, names, set()], options
        if names:
            pod = "pod" if "pod" in names else "pod_name"
            assert {labels[pod] for labels, _ in util[:2]} == {"chat-v2-7b9c4d-r2n5t"}
        assert len({labels["UUID"] for labels, _ in util}) == 3 and {labels["Hostname"] for labels, _ in util} == {"node-a"}
