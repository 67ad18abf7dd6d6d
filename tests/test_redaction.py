"""Personal data in output events: redaction by mode, what each comparator still does, and a tap that never
logs bodies (issue #16 item 5).

The tap tests run the real tap in-process against the OpenAI-compatible stub (tests/openai_stub.py) and
publish to a real Mosquitto; events are read back from the broker. Nothing is mocked.
"""

from __future__ import annotations

import io
import json
import logging
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import structlog
from openai_stub import OpenAIStub
from tap_helpers import collecting, eventually, free_port, running_tap

from shadowctl.cli.common import configure_logging
from shadowctl.compare.comparators import (
    RUNS_UNDER,
    AgreementTally,
    build_comparators,
    cannot_run,
    compare_pair,
    judge_inputs,
    sha256_text,
    tokens,
)
from shadowctl.compare.events import Endpoint, OutputEvent, ToolCall, Variant, parse_event
from shadowctl.compare.pairing import Pair
from shadowctl.compare.redaction import redact
from shadowctl.controller.analysis import agreement_input
from shadowctl.judge import NoData, Outcome, judge
from shadowctl.policy.model import Comparator, ComparatorName, Outputs, RedactionMode
from shadowctl.tap.proxy import MirrorConfig

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

ANSWER = "Paris is the capital of France, and its mayor is someone."


def event(variant: Variant, output: str = ANSWER, *, prompt: str | None = "Capital of France?",
          tools: list[ToolCall] | None = None, status: int = 200) -> OutputEvent:
    return OutputEvent(request_id="r1", variant=variant, shadow=variant is not Variant.primary, service="llm/chat",
                       endpoint=Endpoint.chat, prompt_hash="ab" * 32, prompt=prompt, output=output,
                       tool_calls=tools, status=status, started_at=1.7e9, e2e_s=0.5, output_tokens=11)


# --------------------------------------------------------------------------- redact()


def test_each_mode_keeps_lengths_and_counts_and_removes_what_it_says() -> None:
    tools = [ToolCall(name="lookup", arguments='{"city": "Paris", "n": 1}')]
    base = event(Variant.candidate, tools=tools)
    truncated = redact(base, RedactionMode.truncate, 10)
    assert truncated.output == ANSWER[:10] and truncated.prompt == "Capital of"
    assert truncated.output_hash == sha256_text(ANSWER) and truncated.output_chars == len(ANSWER)
    assert truncated.prompt_chars == len("Capital of France?")
    words = truncated.output_words
    assert words == len(tokens(ANSWER)) == 11
    assert truncated.tool_calls is not None and truncated.tool_calls[0].arguments == ""
    assert truncated.tool_calls[0].arguments_hash == sha256_text('{"city":"Paris","n":1}')
    hashed = redact(base, RedactionMode.hash, 10)
    assert hashed.output == "" and hashed.prompt is None and hashed.output_hash == sha256_text(ANSWER)
    assert (hashed.output_chars, hashed.output_words, hashed.output_tokens) == (len(ANSWER), words, 11)
    dropped = redact(base, RedactionMode.drop, 10)
    assert dropped.output == "" and dropped.prompt is None and dropped.output_hash is None
    assert dropped.tool_calls is None and (dropped.output_chars, dropped.output_words) == (len(ANSWER), words)
    assert dropped.prompt_hash == base.prompt_hash  # the pairing key is not personal data: it stays
    for e in (truncated, hashed, dropped):
        assert parse_event(e.to_json()) == e  # the wire form reads back
        assert "Paris" not in json.dumps({k: v for k, v in json.loads(e.to_json()).items() if k != "output"})
    # Never undone, never weakened: a stricter event stays as it is; a truncated one can be hashed.
    assert redact(dropped, RedactionMode.truncate, 10) == dropped
    assert redact(truncated, RedactionMode.hash, 10).output_hash == sha256_text(ANSWER)
    assert redact(base, RedactionMode.none, 10) is base
    # Unredacted events keep the wire form of a tap before these fields.
    assert "redaction" not in json.loads(base.to_json()) and "arguments_hash" not in base.to_json().decode()


# --------------------------------------------------------------------------- comparators on redacted events


def _pair(primary: OutputEvent, other: OutputEvent) -> Pair:
    return Pair(primary=primary, other=other)


# semantic needs a model; llm-judge asks one over HTTP (its redacted pairs: tests/test_llm_judge.py).
ALL = [Comparator(name=n, threshold=0.9) for n in ComparatorName
       if n not in (ComparatorName.semantic, ComparatorName.llm_judge)]


@pytest.mark.parametrize("mode", [RedactionMode.truncate, RedactionMode.hash, RedactionMode.drop])
def test_what_each_comparator_does_under_each_mode(mode: RedactionMode) -> None:
    """The comparators RUNS_UNDER names score redacted pairs as they would the whole texts (equal answers agree,
    different ones do not); the others score nothing, and the pair is counted as redacted for them."""
    comps = build_comparators(ALL)
    tools = [ToolCall(name="f", arguments='{"a": 1, "b": 2}')]
    p = redact(event(Variant.primary, tools=tools), mode, 20)
    same = redact(event(Variant.candidate, tools=[ToolCall(name="f", arguments='{"b":2,"a":1}')]), mode, 20)
    other_text = "Lyon is a city in France where nobody asked about capitals at all, truly."
    different = redact(event(Variant.candidate, other_text, tools=[ToolCall(name="f", arguments='{"a": 3}')]),
                       mode, 20)
    agree = compare_pair(_pair(p, same), comps)
    disagree = compare_pair(_pair(p, different), comps)
    assert agree is not None and disagree is not None
    runs = set(RUNS_UNDER[mode])
    # Whole-text comparators on answers longer than maxChars, and refusal below 2000 characters, cannot score.
    expect = runs - {ComparatorName.normalized_exact, ComparatorName.json_valid, ComparatorName.json_structure,
                     ComparatorName.refusal, ComparatorName.semantic, ComparatorName.llm_judge}
    assert set(agree.scores) == expect
    assert set(agree.redacted) == {c.name for c in comps} - expect
    assert all(agree.agrees.values())
    for name in expect & {ComparatorName.exact, ComparatorName.tool_calls, ComparatorName.token_f1,
                          ComparatorName.rouge_l}:
        assert not disagree.agrees[name], name
    tally = AgreementTally().add(agree).add(disagree)
    for name in {c.name for c in comps} - expect:
        assert tally.counts[name.value].candidate_pairs == 0 and tally.counts[name.value].redacted_pairs == 2


def test_truncated_short_answers_keep_every_comparator() -> None:
    """Under truncate an answer no longer than maxChars is whole: the JSON comparators still run on it."""
    comps = build_comparators(ALL)
    p = redact(event(Variant.primary, '{"a": 1}'), RedactionMode.truncate, 500)
    c = redact(event(Variant.candidate, '{"a": 2}'), RedactionMode.truncate, 500)
    result = compare_pair(_pair(p, c), comps)
    assert result is not None and result.redacted == () and result.agrees[ComparatorName.json_structure]


def test_a_pair_of_redacted_and_whole_events_compares_like_two_redacted_ones() -> None:
    """A tap started without --redact beside one with it (or the controller redacting on arrival): the whole
    answer is hashed or cut to the other's prefix, so equal answers still agree."""
    comps = build_comparators([Comparator(name=ComparatorName.exact), Comparator(name=ComparatorName.token_f1)])
    whole = event(Variant.primary)
    result = compare_pair(_pair(whole, redact(event(Variant.candidate), RedactionMode.truncate, 12)), comps)
    assert result is not None and result.scores == {ComparatorName.exact: 1.0, ComparatorName.token_f1: 1.0}


def test_a_comparator_the_policy_redacts_away_is_no_data_with_the_reason() -> None:
    outputs = Outputs.model_validate({
        "mqtt": {"broker": "mqtt://b:1883"}, "redaction": {"mode": "drop"},
        "comparators": [{"name": "token-f1"}, {"name": "length-ratio"}],
    })
    comps = build_comparators(outputs.comparators)
    p, c = (redact(event(v), RedactionMode.drop, 1) for v in (Variant.primary, Variant.candidate))
    tally = AgreementTally().add_many([compare_pair(_pair(p, c), comps)] * 3)
    inputs = {i.comparator: i for i in judge_inputs(tally, outputs)}
    assert inputs["token-f1"].unavailable == cannot_run(ComparatorName.token_f1, RedactionMode.drop)
    f1 = agreement_input(inputs["token-f1"], 1)
    assert isinstance(f1.candidate, NoData) and "redaction mode 'drop'" in f1.candidate.reason
    lr = agreement_input(inputs["length-ratio"], 1)
    assert not isinstance(lr.candidate, NoData) and inputs["length-ratio"].candidate_pairs == 3
    # In the verdict (what .status.lastVerdict records): no data with the reason, and never a pass.
    verdict = judge([f1, lr], final=True)
    assert verdict.outcome is not Outcome.passed
    record = {m.name: m for m in verdict.to_record().metrics}
    assert record["agreement/token-f1"].outcome == "nodata"
    assert "redaction mode 'drop'" in json.dumps(verdict.to_record().model_dump(mode="json"))


def test_events_redacted_by_the_taps_alone_still_say_why() -> None:
    """The policy says none, the taps were started with --redact hash: token-f1 scores nothing, and its
    no-data reason says the events are redacted rather than that no pairs came."""
    outputs = Outputs.model_validate({"mqtt": {"broker": "mqtt://b:1883"}, "comparators": [{"name": "token-f1"}]})
    comps = build_comparators(outputs.comparators)
    p, c = (redact(event(v), RedactionMode.hash, 1) for v in (Variant.primary, Variant.candidate))
    tally = AgreementTally().add(compare_pair(_pair(p, c), comps))
    item = judge_inputs(tally, outputs)[0]
    data = agreement_input(item, 1).candidate
    assert isinstance(data, NoData) and "could not score any of 1 candidate pairs" in data.reason


def test_policy_redaction_defaults_and_bounds() -> None:
    outputs = Outputs.model_validate({"mqtt": {"broker": "mqtt://b:1883"}, "comparators": [{"name": "exact"}]})
    assert outputs.redaction.mode is RedactionMode.none and outputs.redaction.max_chars == 500
    with pytest.raises(ValueError, match="maxChars"):
        Outputs.model_validate({"mqtt": {"broker": "mqtt://b:1883"}, "comparators": [{"name": "exact"}],
                                "redaction": {"mode": "truncate", "maxChars": 0}})


# --------------------------------------------------------------------------- the tap: no bodies in logs


MARKER_PROMPT = "zq-prompt-marker-4711"
MARKER_ANSWER = "zq-answer-marker-4712"


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Any:
    """structlog at debug into a buffer (as `shadowctl` configures it, JSON lines), and the standard library's
    loggers (httpx, paho, asyncio) at DEBUG into caplog."""
    buffer = io.StringIO()
    configure_logging("json", "debug")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buffer))
    caplog.set_level(logging.DEBUG)
    try:
        yield buffer
    finally:
        structlog.reset_defaults()


@pytest.mark.parametrize("mode", ["none", "hash", "drop", "truncate"])
async def test_the_tap_never_logs_bodies(mode: str, stub: OpenAIStub, mosquitto: MosquittoBroker,
                                         debug_logs: io.StringIO, caplog: pytest.LogCaptureFixture) -> None:
    """Requests with a marker in the prompt and the answer, streamed and not, a request the upstream refuses,
    a mirror copy that fails, and a request to a dead upstream: the markers are in no log line at debug level;
    with redaction hash or drop they are in no MQTT payload either (read back from the broker); with truncate
    only the first --redact-max-chars characters of each text are."""
    stub.answer = f"The answer is {MARKER_ANSWER} for you."
    chat = {"model": "m", "messages": [{"role": "user", "content": f"Please remember {MARKER_PROMPT} now."}]}
    dead = MirrorConfig(url=f"http://127.0.0.1:{free_port()}", percent=100.0)
    async with (
        running_tap(stub.url, broker=(mosquitto.host, mosquitto.port), mirror=dead, redaction=mode,
                    redact_max_chars=5) as tap,
        collecting(mosquitto.host, mosquitto.port, tap.topic) as got,
        httpx.AsyncClient() as client,
    ):
        await client.post(tap.url + "/v1/chat/completions", json=chat)
        await client.post(tap.url + "/v1/chat/completions", json={**chat, "stream": True})
        await client.post(tap.url + "/v1/completions", json={"model": "m", "prompt": MARKER_PROMPT})
        await client.post(tap.url + "/v1/chat/completions", content=b"{not json " + MARKER_PROMPT.encode())
        await eventually(lambda: len(got.messages) == 4, what="4 events")
        await eventually(lambda: tap.sample("shadowctl_tap_mirror_requests_total", {"outcome": "failed"}) >= 1,
                         what="the failed mirror copies")
    async with running_tap(f"http://127.0.0.1:{free_port()}", redaction=mode) as gone, httpx.AsyncClient() as client:
        r = await client.post(gone.url + "/v1/chat/completions", json=chat)
        assert r.status_code == 502
    lines = debug_logs.getvalue().splitlines() + [r.getMessage() for r in caplog.records]
    assert any("mirror copy failed" in line for line in lines)  # debug lines were written, and read here
    leaked = [line for line in lines if MARKER_PROMPT in line or MARKER_ANSWER in line]
    assert leaked == []
    events = [parse_event(m) for m in got.messages]
    payloads = b"".join(got.messages).decode()
    if mode == "none":
        assert MARKER_ANSWER in payloads and MARKER_PROMPT in payloads
    elif mode == "truncate":
        assert MARKER_ANSWER not in payloads and MARKER_PROMPT not in payloads
        assert all(len(e.output) <= 5 and (e.prompt is None or len(e.prompt) <= 5) for e in events)
    else:
        assert MARKER_ANSWER not in payloads and MARKER_PROMPT not in payloads
    if mode != "none":
        ok = [e for e in events if e.status == 200]
        assert ok and all(e.redaction == mode and e.output_chars == len(stub.answer) for e in ok)
        assert all(e.output_words == len(tokens(stub.answer)) and e.output_tokens for e in ok)
        assert all((e.output_hash == sha256_text(stub.answer)) is (mode != "drop") for e in ok)
