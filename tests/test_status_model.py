"""The typed `.status`: one model written by the controller, read leniently by everyone, and the
CRD's status schema generated from it (enforced by the real API server)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import Any

import pytest
import yaml
from controller_helpers import POLICY
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowctl.compare.comparators import AgreementTally
from shadowctl.controller.status import build_status, read_latency, read_tally, status_patch
from shadowctl.judge import Direction, Margin, MetricInput, MetricSpec, Paired, Samples, judge_fixed
from shadowctl.judge.fixed import FixedConfig
from shadowctl.kube import SHADOW_POLICY, Invalid, KubeClient, ResourceRef
from shadowctl.machine import RolloutState
from shadowctl.policy.crd import crd, status_openapi_schema
from shadowctl.policy.status import (
    CommandRecord,
    ComparatorCounts,
    HistoryEntry,
    PairedLatencyRecord,
    Phase,
    PolicyStatus,
    merge_patch,
)
from shadowctl.routers.base import RouteState

NOW = 1_800_000_000.0


def _state(**changes: Any) -> RolloutState:
    base = RolloutState(phase=Phase.progressing, step=1, weight=25, mirror_percent=None, candidate="chat-v2",
                        generation=3, rollout_started_at=NOW - 600, phase_started_at=NOW - 60,
                        message="step 2 of 3", history=(HistoryEntry(at=NOW - 600, from_="Pending", to="Shadowing",
                                                                     reason="rollout of chat-v2 started"),))
    return replace(base, **changes)


def _evidence() -> Any:
    import numpy as np

    spec = MetricSpec(name="ttft-p95", statistic="p95", direction=Direction.increase,
                      margin=Margin(0.1, relative=True), critical=True, min_samples=10)
    rng = np.random.default_rng(3)
    primary, candidate = rng.lognormal(0, 0.3, 400), rng.lognormal(0.02, 0.3, 400)
    return judge_fixed([MetricInput(spec, Samples(primary), Samples(candidate))], FixedConfig()).to_record()


def _paired() -> PairedLatencyRecord:
    ttft = Paired.of([0.2, 0.4, 0.8, 1.6], [0.22, 0.4, 0.9, 1.5], dropped=1, errored=2)
    return PairedLatencyRecord(ttft=ttft.to_record([0.095, -0.105]), phase_started_at=NOW - 60)


def _full() -> PolicyStatus:
    tally = AgreementTally(counts={"token-f1": ComparatorCounts(candidate_pairs=40, candidate_agree=31,
                                                                baseline_pairs=38, baseline_agree=33)},
                           skipped_primary_failed=2)
    return build_status(PolicyStatus(), _state(), now=NOW, generation=3, evidence=_evidence(),
                        routes=RouteState(75, 25, None), tally=tally,
                        command=CommandRecord(id="abc", command="resume", at="t0", by="ana", handled_at="t1",
                                              result="Progressing"),
                        error=None, target={"istio": {"virtualService": "chat"}}, paired=_paired())


def test_what_the_controller_writes_reads_back_as_the_same_model() -> None:
    written = _full()
    stored = json.loads(json.dumps(written.to_json(), allow_nan=False))  # what the API server keeps
    back = PolicyStatus.read(stored)
    assert back == written
    assert RolloutState.from_record(back.rollout) == _state()
    tally = read_tally(back, _state())
    assert tally is not None and tally.counts["token-f1"].candidate_agree == 31
    assert read_tally(back, _state(phase_started_at=NOW)) is None  # a tally of another phase is not reused
    latency = read_latency(back, _state())
    assert latency is not None and set(latency) == {"ttft"}
    ttft = latency["ttft"]
    assert (ttft.n, ttft.restored, ttft.dropped, ttft.errored) == (4, 4, 1, 2) and ttft.above(0.0) == 2
    assert read_latency(back, _state(phase_started_at=NOW)) is None  # nor are the pairs of another phase
    assert stored["pairedLatency"]["ttft"]["sumSq"] > 0 and 0.095 in stored["pairedLatency"]["ttft"]["le"]
    assert stored["lastVerdict"]["metrics"][0]["effectScale"] == "ratio"  # camelCase on the wire
    assert "crossed" not in stored["lastVerdict"]["metrics"][0]  # a None is left out, not stored as null


def test_what_a_tick_did_not_observe_keeps_its_old_value() -> None:
    old = _full()
    later = build_status(old, _state(), now=NOW + 10, generation=3, evidence=None, routes=None, tally=None,
                         command=None, error="cannot read the routes: boom")
    assert later.last_verdict == old.last_verdict and later.routes == old.routes
    assert later.outputs == old.outputs and later.last_command == old.last_command
    assert later.paired_latency == old.paired_latency and later.paired_latency is not None
    assert later.rollout_target == old.rollout_target
    ready = later.condition("Ready")
    assert ready is not None and ready.status == "False" and "boom" in ready.message
    progressing = later.condition("Progressing")
    old_progressing = old.condition("Progressing")
    assert progressing is not None and old_progressing is not None
    assert progressing.last_transition_time == old_progressing.last_transition_time  # unchanged condition
    assert later.comparable() != old.comparable()  # the error is a change worth writing
    quiet = build_status(old, _state(), now=NOW + 10, generation=3, evidence=None, routes=None, tally=None,
                         command=None, error=None)
    assert quiet.comparable() == old.comparable()  # only the tick's time moved: no write


@pytest.mark.parametrize(
    ("raw", "check"),
    [
        (None, lambda s: not s.written and s.phase is Phase.pending),
        ("not an object", lambda s: not s.written),
        ({"phase": "Bogus", "canaryWeight": 5}, lambda s: s.phase is Phase.pending and s.canary_weight == 5),
        ({"canaryWeight": "half", "message": "m"}, lambda s: s.canary_weight is None and s.message == "m"),
        ({"rollout": {"canaryWeight": 5}}, lambda s: s.rollout is None and s.history == []),
        ({"rollout": {"phase": "Shadowing", "history": [{"at": "x"}]}},
         lambda s: s.rollout is not None and s.rollout.phase is Phase.shadowing and s.history == []),
        ({"conditions": [{"type": "Ready"}], "phase": "Paused"}, lambda s: s.conditions == [] and s.phase == "Paused"),
        ({"lastVerdict": {"metrics": [{"name": "m", "interval": None, "sentence": None}]}},
         lambda s: s.last_verdict is not None and s.last_verdict.metrics[0].interval == []
         and s.last_verdict.metrics[0].sentence == ""),
        ({"lastCommand": {"command": "promote"}}, lambda s: s.last_command is None),
        ({"outputs": {"comparators": {"exact": {"candidatePairs": -3, "candidateAgree": 2}}}},
         lambda s: s.outputs is not None and s.outputs.comparators["exact"] == ComparatorCounts(candidate_agree=2)),
        ({"canaryWeight": 140, "routes": {"primaryWeight": 90, "candidateWeight": 10, "mirrorPercent": -1}},
         lambda s: s.canary_weight is None and s.routes is not None and s.routes.mirror_percent is None),
        ({"unknownField": 1, "phase": "Succeeded"}, lambda s: s.phase is Phase.succeeded),
        ({"pairedLatency": {"ttft": {"pairs": 3, "le": [0.0, 0.005], "counts": [2, 1]},
                            "tpot": {"pairs": 3, "le": [0.0], "counts": [4]},
                            "e2e": {"pairs": 3, "le": [0.0], "counts": [1, 2]}, "phaseStartedAt": 5}},
         lambda s: s.paired_latency == PairedLatencyRecord(phase_started_at=5)),  # not cumulative: not used
    ],
)
def test_reading_another_writers_status_never_fails(raw: Any, check: Any) -> None:
    """A status from an older controller, a CRD without the schema or a person with kubectl: each
    part that does not validate reads as its default, the rest is kept."""
    assert check(PolicyStatus.read(raw))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
KEYS = st.sampled_from(["phase", "canaryWeight", "rollout", "conditions", "lastVerdict", "outputs", "lastCommand",
                        "routes", "step", "history", "metrics", "at", "from", "to", "comparators", "x"])
STATUSES = st.dictionaries(KEYS, JSON_VALUES | st.dictionaries(KEYS, JSON_VALUES, max_size=5), max_size=8)


@settings(max_examples=300, deadline=None)
@given(STATUSES)
def test_any_json_reads_as_a_status(raw: dict[str, Any]) -> None:
    status = PolicyStatus.read(raw)
    assert isinstance(status.phase, Phase)
    assert PolicyStatus.read(status.to_json()) == status  # what was readable survives a write


def _apply(target: Any, patch: Any) -> Any:
    """RFC 7386 applied (the API server's side of a merge patch)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _apply(out.get(key), value)
    return out


NO_NULLS = st.recursive(
    st.booleans() | st.integers() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=4),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=3), NO_NULLS, max_size=5),
       st.dictionaries(st.text(max_size=3), NO_NULLS, max_size=5))
def test_the_merge_patch_turns_the_old_object_into_the_new_one(old: dict[str, Any], new: dict[str, Any]) -> None:
    patch = merge_patch(old, new)
    assert _apply(copy.deepcopy(old), patch) == new
    assert merge_patch(new, new) == {}


def test_a_tick_that_leaves_its_phase_tags_the_counts_with_the_phase_they_belong_to() -> None:
    """A look of the old phase, written by the tick that starts a new one (a new candidate mid-shadow):
    the agreement tally and the pairs keep the old phase's tag, so the new phase does not take them."""
    tally = AgreementTally(counts={"exact": ComparatorCounts(candidate_pairs=9, candidate_agree=9)})
    new_phase = _state(phase=Phase.shadowing, step=None, weight=0, phase_started_at=NOW)
    written = build_status(_full(), new_phase, now=NOW, generation=4, evidence=None, routes=None, tally=tally,
                           command=None, error=None, paired=_paired(), since=NOW - 60)
    assert written.outputs is not None and written.outputs.phase_started_at == NOW - 60
    assert read_tally(written, new_phase) is None and read_latency(written, new_phase) is None
    assert read_tally(written, _state()) is not None  # (the old phase's, as written)


def test_a_target_that_changed_kind_leaves_nothing_of_the_old_one() -> None:
    """A plain merge of the new status would keep `rolloutTarget.istio` beside the new `knative`."""
    old = _full().to_json()
    new = build_status(PolicyStatus.read(old), _state(), now=NOW, generation=3, evidence=None, routes=None,
                       tally=None, command=None, error=None, target={"knative": {"service": "chat"}})
    patched = _apply(old, status_patch(old, new))
    assert patched["rolloutTarget"] == {"knative": {"service": "chat"}}
    assert PolicyStatus.read(patched) == new


def test_the_crds_status_schema_is_the_models() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert schema == status_openapi_schema()
    props = schema["properties"]
    assert props["phase"]["enum"] == [p.value for p in Phase]
    assert set(props) == {field.alias or name for name, field in PolicyStatus.model_fields.items()}
    assert props["rollout"]["properties"]["history"]["items"]["required"] == ["at", "from", "to"]
    assert props["rolloutTarget"]["x-kubernetes-preserve-unknown-fields"] is True
    text = yaml.safe_dump(schema)
    assert "$ref" not in text and "anyOf" not in text  # structural


async def test_the_api_server_keeps_the_model_and_refuses_another_shape(kube_client: KubeClient) -> None:
    """On the real kube-apiserver with the generated CRD: the controller's status is stored as written;
    a status of another shape is refused (422) and nothing of it is stored."""
    doc = yaml.safe_load(POLICY)
    await kube_client.create(SHADOW_POLICY, doc)
    ref = ResourceRef(SHADOW_POLICY, doc["metadata"]["name"], doc["metadata"]["namespace"])
    written = _full()
    stored = await kube_client.patch_status(ref, {"status": status_patch({}, written)})
    assert PolicyStatus.of(stored) == written
    for bad in ({"phase": "Bogus"}, {"canaryWeight": "half"}, {"rollout": {"phase": None}},
                {"conditions": [{"type": "Ready", "status": "Maybe"}]}, {"canaryWeight": 101},
                {"outputs": {"comparators": {"exact": {"candidatePairs": -1}}}},
                {"pairedLatency": {"ttft": {"pairs": 1, "le": [0.0] * 65, "counts": [0] * 65}}},
                {"pairedLatency": {"tpot": {"pairs": -1}}}):
        with pytest.raises(Invalid):
            await kube_client.patch_status(ref, {"status": bad})
    assert PolicyStatus.of(await kube_client.get(ref)) == written
