"""The verdict says how many copies the shadow budget let through (#18 item 3, "the verdict says how many pairs
the budget allowed"), from the taps' own counts to the verdict's evidence.

Real parts, nothing mocked: two primary taps follow the policy's route setting (a model rewrite, a 100% mirror, a
resent baseline and a budget of 4 copies per second per tap) from :class:`TapRouter` over a real Mosquitto, in
front of the OpenAI stub; each reports its copies by outcome on its route-applied topic; the router's read sums the
counted taps' reports; the controller's :class:`OutputHub` pairs the taps' events with the real MQTT output source,
and the :class:`Analyzer` writes the copies into the verdict.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import TYPE_CHECKING, Any

import httpx
from openai_stub import OpenAIStub
from tap_helpers import eventually
from test_controller_tap import NAME, NS
from test_tap_rewrite import router, two_taps

from shadowctl.compare.events import Variant
from shadowctl.compare.routing import (
    AppliedReport,
    AppliedState,
    Budget,
    CopyCounts,
    CopyOutcomes,
    Rewrite,
    TapCopies,
    parse_report,
)
from shadowctl.controller.analysis import Analyzer, copies_sentence, with_copies
from shadowctl.controller.outputs import OutputHub
from shadowctl.judge import Outcome, Verdict
from shadowctl.machine import RolloutState
from shadowctl.policy.model import ShadowPolicy
from shadowctl.policy.status import Phase
from shadowctl.routers.base import CountsCopies, RouteState
from shadowctl.routers.tap import CandidateShape
from shadowctl.sources.outputs import MqttOutputSource

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

ADAPTER = "lora-b"
OUTCOME = re.compile(r'shadowctl_tap_(mirror|baseline)_requests_total\{outcome="([a-z_]+)"\} (\S+)')


def _policy(broker_url: str) -> ShadowPolicy:
    doc: dict[str, Any] = {
        "apiVersion": "shadowctl.dev/v1alpha1", "kind": "ShadowPolicy",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "target": {"tap": {"service": NAME, "rewrite": {"model": ADAPTER}}},
            "shadow": {"mode": "tap", "mirrorPercent": 100, "minPairs": 1,
                       "budget": {"requestsPerSecond": 4}},
            "analysis": {
                "interval": "10s",
                "outputs": {"mqtt": {"broker": broker_url, "topic": f"shadowctl/outputs/{NS}/{NAME}/+"},
                            "comparators": [{"name": "exact"}], "baseline": {"mode": "resend", "percent": 50},
                            "minPairs": 1},
            },
        },
    }
    return ShadowPolicy.model_validate(doc)


def _counted(page: str) -> dict[tuple[str, str], float]:
    return {(m.group(1), m.group(2)): float(m.group(3)) for m in OUTCOME.finditer(page)}


async def test_the_verdict_says_what_the_budget_let_through_summed_over_the_taps(mosquitto: MosquittoBroker,
                                                                                 stub: OpenAIStub) -> None:
    """A burst of 40 requests on each of two taps under a budget of 4 copies per second per tap: most copies and
    resends are skipped. Each tap's report carries its counts (equal to its /metrics); the router's read sums the
    two; the verdict's pair-based evidence carries the sum and its reason says how many pairs and how many copies
    the budget skipped. Fails if the taps do not report, the router does not sum, or the analyzer drops it."""
    policy = _policy(mosquitto.url)
    shadow = policy.spec.shadow
    assert shadow is not None and shadow.budget is not None
    shape = CandidateShape(Rewrite(model=ADAPTER), baseline_percent=50.0,
                           budget=Budget(requests_per_second=4))
    hub = OutputHub(lambda p: MqttOutputSource.from_policy(p))
    analyzer = Analyzer(None, hub)
    since = 1_000.0
    state = RolloutState(phase=Phase.shadowing, phase_started_at=since, rollout_started_at=since, candidate="v2")
    try:
        await analyzer.look(policy, state, since + 1)  # starts the output source
        source = hub._entries[policy.key].source
        assert isinstance(source, MqttOutputSource)
        await eventually(lambda: source.subscribed.is_set(), what="the source subscribed")
        async with two_taps(stub.url, mosquitto) as (a, b):
            tap_router = router(mosquitto, shape)
            assert isinstance(tap_router, CountsCopies)
            await tap_router.apply(RouteState(100, 0, 100.0))
            async with httpx.AsyncClient(trust_env=False, timeout=30,
                                         limits=httpx.Limits(max_connections=100)) as client:
                answers = await asyncio.gather(*(
                    client.post(tap.url + "/v1/chat/completions",
                                content=json.dumps({"model": "base", "messages": [
                                    {"role": "user", "content": f"question {i}"}]}).encode(),
                                headers={"content-type": "application/json", "x-request-id": f"v{i}"})
                    for tap in (a, b) for i in range(40 * (tap is b), 40 * (tap is b) + 40)))
                assert all(r.status_code == 200 for r in answers)
                await eventually(lambda: len(stub.seen) >= 80 + 2, what="users' requests and some copies")
                await asyncio.sleep(0.3)  # copies in flight land
                pages = [_counted((await client.get(t.url + "/metrics")).text) for t in (a, b)]
            expected = [CopyCounts(
                mirror=CopyOutcomes(sent=int(p.get(("mirror", "sent"), 0)),
                                    skipped_budget=int(p.get(("mirror", "skipped_budget"), 0))),
                baseline=CopyOutcomes(sent=int(p.get(("baseline", "sent"), 0)),
                                      skipped_budget=int(p.get(("baseline", "skipped_budget"), 0))))
                for p in pages]
            for counts in expected:  # the budget skipped most: 4 per second per tap, for mirror and resends together
                assert counts.mirror.sent + counts.mirror.skipped_budget == 40, counts
                assert 1 <= counts.mirror.sent + counts.baseline.sent <= 12, counts
                assert counts.mirror.skipped_budget >= 20, counts

            def reported() -> bool:  # each tap's report (republished every 0.5 s here) carries its /metrics counts
                assert a.follower is not None and b.follower is not None
                return [t.follower.report().copies for t in (a, b) if t.follower is not None] == expected
            await eventually(reported, what="the taps' reports carry their counts")
            await asyncio.sleep(1.2)  # the reports on the broker are at least that fresh
            await tap_router.read()
            copies = tap_router.copies()
            assert copies is not None and copies.taps == 2
            assert copies.counts == expected[0] + expected[1]
            await eventually(lambda: source.pairer.stats.paired[Variant.candidate] >= 2, what="some pairs")
            verdict = (await analyzer.look(policy, state, since + 9, copies=copies)).verdict
    finally:
        await hub.close()
    total = copies.counts.mirror
    by = {r.name: r.to_record() for r in verdict.results}
    extra = by["agreement/exact"].extra
    assert extra is not None and extra["copies"]["mirror"]["sent"] == total.sent
    assert extra["copies"]["mirror"]["skippedBudget"] == total.skipped_budget
    assert extra["copies"]["baseline"] == copies.counts.baseline.model_dump(mode="json", by_alias=True)
    pairs = int(by["agreement/exact"].samples.candidate or 0)
    assert (f"; {pairs} pairs; the taps sent {total.sent} copies, the budget skipped {total.skipped} "
            f"({total.skipped_budget} over its rate or tokens, 0 by the queue back-off)") in verdict.reason, \
        verdict.reason
    assert f"(generation {copies.generation}, 2 taps)" in verdict.reason


def test_a_report_carries_copies_only_under_a_budget_or_a_resent_baseline() -> None:
    """An older controller refuses a report with a key it does not know: without a budget and a resent baseline,
    the report is byte for byte what it was; with them, it round-trips with its counts. The sentence and the
    evidence leave a verdict without pair-based metrics alone."""
    plain = AppliedReport(tap="t", state=AppliedState.applied, generation=3, reported_at="2025-01-01T00:00:00Z")
    assert b"copies" not in plain.to_json()
    counted = plain.model_copy(update={"copies": CopyCounts(mirror=CopyOutcomes(sent=2, skipped_queue=5))})
    back = parse_report(counted.to_json())
    assert back.copies is not None and back.copies.mirror.skipped == 5 and back == counted
    copies = TapCopies(3, 1, back.copies)
    assert copies_sentence(copies) == ("the taps sent 2 copies, the budget skipped 5 (0 over its rate or tokens, "
                                       "5 by the queue back-off) (generation 3, 1 tap)")
    alone = Verdict(Outcome.cont, (), "still undecided")
    assert with_copies(alone, copies) is alone
    assert with_copies(alone, None) is alone
