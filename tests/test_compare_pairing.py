"""The pure pairer (time is an argument) and strict event parsing."""

from __future__ import annotations

import pytest

from shadowctl.compare.events import (
    Endpoint,
    MalformedEvent,
    OutputEvent,
    Variant,
    event_json_schema,
    parse_broker_url,
    parse_event,
    parse_traceparent,
    trace_id,
)
from shadowctl.compare.pairing import Pairer

P, C, B = Variant.primary, Variant.candidate, Variant.baseline


def ev(rid: str, variant: Variant, *, shadow: bool | None = None, prompt: str = "h",
       endpoint: Endpoint = Endpoint.chat, output: str = "x") -> OutputEvent:
    return OutputEvent(request_id=rid, variant=variant,
                       shadow=(variant is not P) if shadow is None else shadow, service="ns/svc",
                       endpoint=endpoint, prompt_hash=prompt, output=output, status=200, started_at=0.0, e2e_s=0.1)


def test_pairs_in_either_order() -> None:
    p = Pairer(ttl=10)
    assert p.add(ev("a", P), now=0) == []
    (pair,) = p.add(ev("a", C), now=1)
    assert pair.primary.variant is P and pair.other.variant is C and pair.request_id == "a"
    assert p.add(ev("b", C), now=2) == []  # candidate first
    (pair,) = p.add(ev("b", P), now=3)
    assert pair.request_id == "b" and pair.variant is C
    assert len(p) == 0 and p.stats.paired[C] == 2


def test_duplicates_are_ignored_even_after_completion() -> None:
    p = Pairer(ttl=10)
    p.add(ev("a", C), now=0)
    assert p.add(ev("a", C), now=0.5) == []
    assert len(p.add(ev("a", P), now=1)) == 1
    assert p.add(ev("a", P), now=2) == []  # QoS 1 redelivery after the pair completed
    assert p.add(ev("a", C), now=3) == []
    assert p.stats.duplicates[C] == 2 and p.stats.duplicates[P] == 1 and p.stats.paired[C] == 1


def test_missing_partner_expires_and_is_counted() -> None:
    p = Pairer(ttl=5)
    p.add(ev("a", P), now=0)
    p.add(ev("b", C), now=1)
    p.add(ev("c", P), now=2)
    assert p.expire(now=5.5) == 1  # only "a" is older than the TTL
    assert p.stats.expired[P] == 1 and p.stats.missing[C] == 1
    assert p.add(ev("a", C), now=5.8) == []  # the late partner is not paired
    assert p.stats.late[C] == 1 and p.stats.duplicates[C] == 0
    assert p.expire(now=100) == 2
    assert p.stats.expired == {P: 2, C: 1, B: 0}
    assert p.stats.delivery_rate(C) == 0.0
    assert len(p) == 0


def test_ttl_counts_from_first_sight_not_event_clock() -> None:
    p = Pairer(ttl=5)
    p.add(ev("a", P), now=100)
    assert len(p.add(ev("a", C), now=104.9)) == 1


def test_memory_is_bounded_by_evicting_the_oldest() -> None:
    p = Pairer(ttl=1000, max_pending=3)
    for i in range(10):
        p.add(ev(f"r{i}", P), now=i)
    assert len(p) == 3
    assert p.stats.evicted[P] == 7
    assert p.add(ev("r6", C), now=11) == []  # evicted (and still remembered): its partner is late
    assert p.stats.late[C] == 1
    assert len(p.add(ev("r9", C), now=12)) == 1
    assert len(p._done) <= 3  # the memory of settled ids is bounded too


def test_baseline_pairs_and_completion() -> None:
    p = Pairer(ttl=10, expect_baseline=True)
    p.add(ev("a", B), now=0)
    (pb,) = p.add(ev("a", P), now=1)
    assert pb.variant is B
    assert len(p) == 1  # still waiting for the candidate
    (pc,) = p.add(ev("a", C), now=2)
    assert pc.variant is C and len(p) == 0
    p.add(ev("z", P), now=3)
    p.add(ev("z", C), now=3)
    p.expire(now=20)
    assert p.stats.missing[B] == 1 and p.stats.missing[C] == 0 and p.stats.expired[P] == 0
    assert p.stats.delivery_rate(B) == 0.5


def test_filters_live_traffic_embeddings_unexpected_baseline_and_prompt_mismatch() -> None:
    p = Pairer(ttl=10)
    p.add(ev("a", P), now=0)
    assert p.add(ev("a", C, shadow=False), now=0) == []  # canary live traffic, not a mirror copy
    assert p.add(ev("a", B), now=0) == []  # no baseline expected
    assert p.add(ev("e", P, endpoint=Endpoint.embeddings), now=0) == []
    assert p.add(ev("a", C, prompt="other"), now=1) == []
    assert p.stats.not_shadow == 1 and p.stats.unexpected_baseline == 1
    assert p.stats.not_compared_endpoint == 1 and p.stats.prompt_mismatch == 1
    assert p.stats.as_dict()["promptMismatch"] == 1


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ttl"):
        Pairer(ttl=0)
    with pytest.raises(ValueError, match="max_pending"):
        Pairer(ttl=1, max_pending=0)


def test_event_parsing_is_strict() -> None:
    good = ev("a", P).to_json()
    assert parse_event(good).request_id == "a"
    with pytest.raises(MalformedEvent, match="status"):
        parse_event(good.replace(b'"status":200', b'"status":"200"'))  # no coercion
    with pytest.raises(MalformedEvent, match="surprise: Extra inputs"):
        parse_event(good.replace(b'"output":"x"', b'"output":"x","surprise":1'))
    with pytest.raises(MalformedEvent, match="schema"):
        parse_event(good.replace(b"output-event/v1", b"output-event/v2"))
    with pytest.raises(MalformedEvent):
        parse_event(b"not json")
    schema = event_json_schema()
    assert schema["$id"] == "shadowctl.dev/output-event/v1" and "request_id" in schema["required"]


def test_traceparent_parsing_and_the_field_on_the_wire() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert parse_traceparent(tp) == tp and parse_traceparent(tp.encode() + b" ") == tp
    assert trace_id(tp) == "4bf92f3577b34da6a3ce929d0e0e4736"
    future = "cc" + tp[2:]
    assert parse_traceparent(future + "-what-comes-later") == future  # a later version may add fields
    for bad in (None, "", tp.upper(), tp + "-x", "ff" + tp[2:], tp[:-1], tp.replace("-", "_"),
                "00-" + "0" * 32 + "-00f067aa0ba902b7-01", tp[:36] + "0" * 16 + "-01", future + "x"):
        assert parse_traceparent(bad) is None, bad
    event = ev("r", C).model_copy(update={"traceparent": tp})
    assert parse_event(event.to_json()).traceparent == tp
    assert b"traceparent" not in ev("r", C).to_json()  # absent: the bytes a tap before the field wrote
    with pytest.raises(MalformedEvent, match="traceparent"):
        parse_event(event.to_json().replace(tp.encode(), b"not-a-traceparent"))
    assert "traceparent" in event_json_schema()["properties"]


def test_broker_urls() -> None:
    assert parse_broker_url("mqtt://broker") == ("broker", 1883, False)
    assert parse_broker_url("mqtts://broker:8884/") == ("broker", 8884, True)
    assert parse_broker_url("mqtt://[::1]:1999") == ("::1", 1999, False)
    for bad in ("http://x", "mqtt://", "mqtt://h:99999", "mqtt://u:p@h", "mqtt://h/topic"):
        with pytest.raises(ValueError, match="mqtt"):
            parse_broker_url(bad)


def test_the_documented_event_schema_is_the_code_s() -> None:
    """docs/outputs.md quotes event_json_schema() whole: a field added to the event must appear there."""
    import json
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "outputs.md").read_text()
    block = doc.split("The full JSON schema (`event_json_schema()`):", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(block) == event_json_schema()
