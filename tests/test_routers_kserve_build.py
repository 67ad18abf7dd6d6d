"""The KServe builders, pure: ``new = f(current, target, state)`` on InferenceService objects.

The property tests are those of the Istio and Gateway API builders: the percent is always an
integer from 0 to 100 and equals the step, fields shadowctl does not own (unknown ones included)
survive every change, a second build changes nothing, and finalize leaves only the rollback's
``canaryTrafficPercent: 0``. The results are checked against KServe's CRD on the real API server
(``assert_valid``) where a test asks for the ``kserve`` fixture.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kserve_helpers import kserve  # noqa: F401 - the fixture
from routers_util import assert_valid, load

from shadowctl.policy.model import KServeTarget
from shadowctl.routers import MANAGED_ANNOTATION, kserve_build
from shadowctl.routers.base import (
    DestinationNotFound,
    RevisionsChanged,
    RouteNotFound,
    RouteState,
    Unsupported,
    WouldBeRejected,
)

TARGET = KServeTarget(inference_service="llm")
R1, R2, R3 = "llm-predictor-00001", "llm-predictor-00002", "llm-predictor-00003"


def isvc() -> dict[str, Any]:
    return load("isvc-llm.yaml")


def ctp(obj: dict[str, Any]) -> Any:
    return obj["spec"]["predictor"].get("canaryTrafficPercent", "absent")


def record(obj: dict[str, Any]) -> dict[str, Any] | None:
    raw = (obj["metadata"].get("annotations") or {}).get(MANAGED_ANNOTATION)
    return json.loads(raw) if raw else None


def without_ours(obj: dict[str, Any]) -> dict[str, Any]:
    """The object less canaryTrafficPercent and the ownership record: what shadowctl must never change."""
    out = copy.deepcopy(obj)
    out["spec"]["predictor"].pop("canaryTrafficPercent", None)
    annotations = out["metadata"].get("annotations") or {}
    annotations.pop(MANAGED_ANNOTATION, None)
    if "annotations" in out["metadata"] and not annotations:
        del out["metadata"]["annotations"]
    return out


def with_ready(obj: dict[str, Any], revision: str, *, created: str | None = None) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    predictor = out["status"]["components"]["predictor"]
    predictor["latestReadyRevision"] = revision
    predictor["latestCreatedRevision"] = created or revision
    return out


@pytest.mark.usefixtures("kserve")
def test_a_step_writes_only_the_percent_and_the_record() -> None:
    before = isvc()
    new, modified = kserve_build.build(before, TARGET, RouteState(90, 10))
    assert modified and ctp(new) == 10
    assert without_ours(new) == without_ours(before)
    assert record(new) == {"version": 1, "canary": {"component": "predictor", "primaryRevision": R1,
                                                    "candidateRevision": R2}}
    assert kserve_build.read_state(new, TARGET) == RouteState(90, 10)
    again = kserve_build.build(new, TARGET, RouteState(90, 10))
    assert not again.modified and again.obj == new
    assert_valid(new)


def test_the_shadow_phase_keeps_zero_and_cannot_mirror() -> None:
    new, modified = kserve_build.build(isvc(), TARGET, RouteState(100, 0))
    assert ctp(new) == 0 and record(new) is not None and modified  # the record, written at first touch
    with pytest.raises(Unsupported, match=r"cannot mirror.*shadow\.mode: tap"):
        kserve_build.build(isvc(), TARGET, RouteState(100, 0, 5.0))


@pytest.mark.usefixtures("kserve")
def test_rollback_sets_zero_and_never_restores_an_absent_percent() -> None:
    before = isvc()
    del before["spec"]["predictor"]["canaryTrafficPercent"]  # absent: KServe would give the latest 100%
    stepped, _ = kserve_build.build(before, TARGET, RouteState(50, 50))
    restored, modified = kserve_build.finalize(stepped, TARGET)
    assert modified and ctp(restored) == 0 and record(restored) is None
    assert without_ours(restored) == without_ours(before)
    assert kserve_build.read_state(restored, TARGET) == RouteState.primary_only()
    assert not kserve_build.finalize(restored, TARGET).modified
    assert kserve_build.finalize(restored, TARGET, keep_candidate=True).obj == restored
    assert_valid(restored)


def test_finalize_without_a_record_changes_nothing() -> None:
    obj = isvc()
    obj["spec"]["predictor"]["canaryTrafficPercent"] = 30  # someone else's canary: not ours to undo
    assert kserve_build.finalize(obj, TARGET) == (obj, False)


@pytest.mark.usefixtures("kserve")
def test_promote_removes_the_percent_as_kserve_documents() -> None:
    stepped, _ = kserve_build.build(isvc(), TARGET, RouteState(50, 50))
    promoted, modified = kserve_build.promote(stepped, TARGET)
    assert modified and ctp(promoted) == "absent" and record(promoted) is None
    assert without_ours(promoted) == without_ours(isvc())
    assert kserve_build.read_state(promoted, TARGET) == RouteState(0, 100)
    assert not kserve_build.promote(promoted, TARGET).modified
    assert_valid(promoted)


def test_promote_without_a_rollout_needs_a_settled_status() -> None:
    assert kserve_build.promote(isvc(), TARGET).modified  # `promote --full` before any step
    with pytest.raises(DestinationNotFound, match="not ready yet"):
        kserve_build.promote(with_ready(isvc(), R2, created=R3), TARGET)


def test_a_new_ready_revision_mid_rollout_gets_no_live_traffic() -> None:
    stepped, _ = kserve_build.build(isvc(), TARGET, RouteState(90, 10))
    moved = with_ready(stepped, R3)  # KServe already routes the 10% to it: its target is latestRevision
    assert kserve_build.read_state(moved, TARGET) == RouteState(90, 10)
    with pytest.raises(RevisionsChanged, match=f"{R3} became the latest ready one during the rollout of {R2}"):
        kserve_build.build(moved, TARGET, RouteState(50, 50))
    with pytest.raises(RevisionsChanged):
        kserve_build.promote(moved, TARGET)
    back, modified = kserve_build.build(moved, TARGET, RouteState(100, 0))  # taking traffic away is always safe
    assert modified and ctp(back) == 0 and record(back) == record(stepped)
    restarted, _ = kserve_build.finalize(moved, TARGET)
    fresh, _ = kserve_build.build(restarted, TARGET, RouteState(100, 0))
    assert (record(fresh) or {})["canary"]["candidateRevision"] == R3


@pytest.mark.parametrize(("edit", "error", "words"), [
    (lambda o: with_ready(o, R2, created=R3), DestinationNotFound, "latest created revision llm-predictor-00003 is not"),
    (lambda o: with_ready(o, R1), DestinationNotFound, "already the rolled-out one"),
    (lambda o: o["status"]["components"]["predictor"].pop("latestRolledoutRevision"), DestinationNotFound,
     "rolled out no revision yet"),
    (lambda o: o.pop("status"), DestinationNotFound, "no ready revision"),
    (lambda o: o["spec"].pop("predictor"), WouldBeRejected, "spec.predictor is missing"),
    (lambda o: o.update(apiVersion="serving.knative.dev/v1", kind="Service"), RouteNotFound,
     "not a KServe InferenceService"),
    (lambda o: o["spec"]["predictor"].update(canaryTrafficPercent="10"), WouldBeRejected,
     "spec.predictor.canaryTrafficPercent: expected an integer, got '10'"),
])
def test_first_touch_refusals_say_what_and_where(edit: Any, error: type[Exception], words: str) -> None:
    obj = isvc()
    out = edit(obj)
    obj = out if isinstance(out, dict) and "spec" in out else obj
    with pytest.raises(error) as info:
        kserve_build.build(obj, TARGET, RouteState(90, 10))
    assert words in str(info.value) and "models/llm" in str(info.value)


def test_a_percent_out_of_range_is_refused_before_writing() -> None:
    with pytest.raises(WouldBeRejected, match="from 0 to 100, got 101"):
        kserve_build.check_percent(isvc(), 101)
    obj = isvc()
    obj["spec"]["predictor"]["canaryTrafficPercent"] = 250
    with pytest.raises(WouldBeRejected, match=r"is 250, not 0\.\.100"):
        kserve_build.read_state(obj, TARGET)


def test_read_state_without_a_split() -> None:
    settled = with_ready(isvc(), R1)  # nothing newer than the rolled-out revision
    assert kserve_build.read_state(settled, TARGET) == RouteState.primary_only()
    stepped, _ = kserve_build.build(isvc(), TARGET, RouteState(50, 50))
    rolled = copy.deepcopy(stepped)
    rolled["status"]["components"]["predictor"]["latestRolledoutRevision"] = R2  # someone promoted it
    assert kserve_build.read_state(rolled, TARGET) == RouteState(0, 100)
    fresh = isvc()
    fresh["status"]["components"]["predictor"].pop("latestRolledoutRevision")
    with pytest.raises(DestinationNotFound, match="first revision takes all traffic"):
        kserve_build.read_state(fresh, TARGET)


def test_the_candidate_the_controller_observes() -> None:
    assert kserve_build.candidate_of(isvc(), settled=True) == R2
    assert kserve_build.candidate_of(with_ready(isvc(), R1), settled=True) is None
    assert kserve_build.candidate_of(with_ready(isvc(), R1), settled=False) == R1
    no_rollout = isvc()
    no_rollout["status"]["components"]["predictor"].pop("latestRolledoutRevision")
    assert kserve_build.candidate_of(no_rollout, settled=False) is None


# --------------------------------------------------------------------------- properties

_json = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=4),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                  max_size=3), max_leaves=6)


@st.composite
def inference_services(draw: st.DrawFn) -> dict[str, Any]:
    """The example InferenceService with a random starting percent (or none) and unknown fields anywhere."""
    obj = isvc()
    start = draw(st.one_of(st.none(), st.integers(0, 100)))
    if start is None:
        del obj["spec"]["predictor"]["canaryTrafficPercent"]
    else:
        obj["spec"]["predictor"]["canaryTrafficPercent"] = start
    for where in (obj, obj["metadata"], obj["spec"], obj["spec"]["predictor"], obj["status"],
                  obj["status"]["components"]["predictor"]):
        if draw(st.booleans()):
            where[f"x-{draw(st.sampled_from(['a', 'b']))}"] = draw(_json)
    if draw(st.booleans()):
        obj["metadata"]["annotations"] = {"other": draw(st.text(max_size=5))}
    return obj


_states = st.integers(0, 100).map(lambda w: RouteState(100 - w, w))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inference_services(), st.lists(_states, min_size=1, max_size=5), st.booleans())
def test_builds_keep_invariants(obj: dict[str, Any], states: list[RouteState], promote: bool) -> None:
    pristine = copy.deepcopy(obj)
    current = obj
    for state in states:
        new, _ = kserve_build.build(current, TARGET, state)
        value = ctp(new)
        assert isinstance(value, int) and 0 <= value <= 100 and value == state.candidate_weight
        assert without_ours(new) == without_ours(pristine), "everything else, unknown fields included, survives"
        assert kserve_build.read_state(new, TARGET) == state
        again = kserve_build.build(new, TARGET, state)
        assert not again.modified and again.obj == new
        current = new
    assert obj == pristine, "the input is never edited in place"
    end, _ = (kserve_build.promote if promote else kserve_build.finalize)(current, TARGET)
    assert without_ours(end) == without_ours(pristine)
    assert record(end) is None or set(record(end) or {}) == {"version"}
    assert ctp(end) == ("absent" if promote else 0)
