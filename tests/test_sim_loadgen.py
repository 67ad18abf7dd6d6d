"""The load generator against a real simulated model server: it stops by itself and counts what happened."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from shadowctl.sim.errors import SimError
from shadowctl.sim.loadgen import LoadConfig, LoadGenerator, LoadResult, main
from shadowctl.sim.modelserver import ModelKnobs, SimModelServer
from shadowctl.sim.prompts import CATEGORIES, PromptMix, classify_prompt, sample_request


@pytest_asyncio.fixture
async def server() -> AsyncIterator[SimModelServer]:
    srv = SimModelServer("m", knobs=ModelKnobs(time_scale=0.005, output_words_median=20), seed=3)
    await srv.start()
    yield srv
    await srv.stop()


async def test_stops_after_the_request_count_and_counts_statuses(server: SimModelServer) -> None:
    server.set_knobs(error_rate=0.2)
    result = await LoadGenerator(LoadConfig(url=server.url, rps=400, max_requests=120, duration_s=None,
                                            concurrency=8, model="m", seed=1)).run()
    assert result.sent == result.completed == 120 == server.stats.requests
    assert result.status_counts["500"] == server.stats.errors > 0
    assert result.status_counts["200"] == server.stats.succeeded == result.ok
    assert result.cancelled == 0
    streamed = [o for o in result.outcomes if o.stream and o.status == 200]
    assert streamed and all(o.ttft_s is not None and o.ttft_s <= o.latency_s for o in streamed)
    assert {o.category for o in result.outcomes} == set(CATEGORIES)
    summary = result.summary()
    assert summary["sent"] == 120 and summary["latency_s"]["p50"] is not None


async def test_stops_after_its_duration(server: SimModelServer) -> None:
    result = await LoadGenerator(LoadConfig(url=server.url, rps=100, duration_s=0.5, model="m", seed=2)).run()
    assert 15 <= result.sent <= 100  # Poisson(50)
    assert result.completed == result.sent == server.stats.requests


async def test_a_wrong_model_name_shows_as_404s(server: SimModelServer) -> None:
    """The server answers only the names it serves, as vLLM does: a client's model-name mistake is counted."""
    result = await LoadGenerator(LoadConfig(url=server.url, rps=400, max_requests=20, duration_s=None,
                                            model="not-m", seed=4)).run()
    assert result.status_counts == {"404": 20} and result.ok == 0
    assert server.stats.unknown_model == 20 and server.stats.requests == 0


async def test_transport_errors_are_counted_not_raised() -> None:
    result = await LoadGenerator(LoadConfig(url="http://127.0.0.1:9", rps=200, max_requests=5, seed=1)).run()
    assert result.status_counts == {"error": 5} and result.ok == 0
    assert all(o.error for o in result.outcomes)


def test_bad_configuration_is_refused_with_a_message() -> None:
    with pytest.raises(SimError, match="must stop by itself"):
        LoadConfig(url="http://x", duration_s=None, max_requests=None)
    with pytest.raises(SimError, match="rps"):
        LoadConfig(url="http://x", rps=0)
    with pytest.raises(SimError, match="http://"):
        LoadConfig(url="localhost:8080")
    with pytest.raises(SystemExit) as info:
        main(["--url", "http://x", "--rps", "-1"])
    assert info.value.code == 2


def test_the_prompt_mix_is_varied_and_self_consistent() -> None:
    rng = random.Random(4)
    specs = [sample_request(rng, PromptMix()) for _ in range(400)]
    assert {s.category for s in specs} == set(CATEGORIES)
    assert {s.path for s in specs} == {"/v1/chat/completions", "/v1/completions"}
    assert 0.35 <= sum(s.stream for s in specs) / len(specs) <= 0.65
    assert len({s.body["max_tokens"] for s in specs}) >= 4
    # the server answers each kind the way the prompt asks (JSON for JSON requests, code for code)
    assert all(classify_prompt(spec.prompt_text) == spec.category for spec in specs)
    assert min(len(s.prompt_text) for s in specs if s.category == "long") > 3000


def test_percentile_is_nearest_rank() -> None:
    assert LoadResult.percentile([], 0.5) is None
    assert LoadResult.percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0
    assert LoadResult.percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
