"""ShadowPolicy model: examples validate, cross-field rules reject what they must."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from shadowctl.cli.policy_files import load_policies
from shadowctl.policy import PolicyError, parse_policies
from shadowctl.policy.duration import format_duration, parse_duration
from shadowctl.policy.model import Margin, ShadowPolicy

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "policies").glob("*.yaml"))


def _base() -> dict[str, Any]:
    return yaml.safe_load((REPO / "policies" / "chat-istio.yaml").read_text())


def _errors(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policies(yaml.safe_dump(doc, sort_keys=False), "p.yaml")
    return [f"{p.path}: {p.message}" for p in info.value.problems]


def test_at_least_three_examples_validate() -> None:
    assert len(EXAMPLES) >= 3
    kinds = set()
    for path in EXAMPLES:
        for policy in load_policies(path):
            assert isinstance(policy, ShadowPolicy)
            kinds.add("istio" if policy.spec.target.istio else "knative")
            kinds.add("canary" if policy.spec.canary else "shadow-only")
    assert kinds == {"istio", "knative", "canary", "shadow-only"}


def test_example_values_are_read() -> None:
    policy = load_policies(REPO / "policies" / "chat-istio.yaml")[0]
    assert policy.key == "llm/chat-llama"
    assert policy.spec.shadow is not None and policy.spec.shadow.mirror_percent == 20
    assert policy.spec.canary is not None and policy.spec.canary.steps == [5, 20, 50]
    assert policy.spec.canary.step_duration == timedelta(minutes=15)
    errors = next(m for m in policy.spec.analysis.metrics if m.name == "errors")
    assert errors.margin == Margin(value=0.005, relative=False)
    ttft = policy.spec.analysis.metrics[0]
    assert ttft.margin == Margin(value=0.10, relative=True)
    assert policy.spec.analysis.outputs is not None
    assert policy.spec.analysis.outputs.pair_ttl == timedelta(minutes=2)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("1h30m", 5400), ("250ms", 0.25), ("1d", 86400), ("1.5h", 5400), (45, 45)],
)
def test_durations_parse(text: Any, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "10", "m", "10 m", "1h-30m", "-5s", "tomorrow", True, [], "5s5"])
def test_bad_durations_are_rejected(bad: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize("seconds", [0.25, 1, 59, 61, 3600, 5400, 90061])
def test_duration_round_trip(seconds: float) -> None:
    td = timedelta(seconds=seconds)
    assert parse_duration(format_duration(td)) == td


def test_margin_forms() -> None:
    assert Margin.model_validate("10%") == Margin(value=0.1, relative=True)
    assert Margin.model_validate("0.5pp") == Margin(value=0.005, relative=False)
    assert Margin.model_validate(0.02) == Margin(value=0.02, relative=False)
    with pytest.raises(ValueError, match="not a margin"):
        Margin.model_validate("ten percent")


def test_target_needs_exactly_one() -> None:
    doc = _base()
    doc["spec"]["target"]["knative"] = {"service": "chat"}
    assert any("exactly one of 'istio', 'knative', 'gatewayAPI', 'kserve' or 'tap'" in e for e in _errors(doc))
    doc["spec"]["target"] = {}
    assert any("exactly one of 'istio', 'knative', 'gatewayAPI', 'kserve' or 'tap'" in e for e in _errors(doc))


def test_gateway_api_target() -> None:
    doc = _base()
    doc["spec"]["target"] = {"gatewayAPI": {"httpRoute": "chat", "rule": "chat-default",
                                            "primary": {"name": "chat-v1", "port": 8000},
                                            "candidate": {"name": "chat-v2", "namespace": "canary"}}}
    target = ShadowPolicy.model_validate(doc).spec.target
    assert target.gateway_api is not None and target.gateway_api.candidate.label() == "canary/chat-v2"
    assert target.model_dump(by_alias=True, exclude_none=True)["gatewayAPI"]["httpRoute"] == "chat"
    doc["spec"]["target"]["gatewayAPI"]["candidate"] = {"name": "chat-v1"}
    assert any("the same backend" in e for e in _errors(doc))
    doc["spec"]["target"]["gatewayAPI"]["candidate"] = {"name": "Chat_v2"}
    assert any("not a valid Service" in e for e in _errors(doc))
    doc["spec"]["target"]["gatewayAPI"]["candidate"] = {"name": "chat-v2"}
    doc["spec"]["shadow"] = {"mirrorPercent": 5, "virtualService": {"name": "x", "candidate": {"host": "y"}}}
    assert any("the HTTPRoute mirrors itself" in e for e in _errors(doc))


def test_steps_must_increase_and_fit_max_weight() -> None:
    doc = _base()
    doc["spec"]["canary"]["steps"] = [5, 5, 50]
    assert any("strictly increasing" in e for e in _errors(doc))
    doc["spec"]["canary"]["steps"] = [5, 20, 60]
    assert any("above maxWeight (50)" in e for e in _errors(doc))
    doc["spec"]["canary"]["steps"] = [0, 20]
    assert any(e.startswith("spec.canary.steps[0]") for e in _errors(doc))


def test_knative_without_virtual_service_cannot_mirror() -> None:
    doc = _base()
    doc["spec"]["target"] = {"knative": {"service": "chat"}}
    assert any("cannot mirror by itself" in e for e in _errors(doc))
    doc["spec"]["shadow"]["mode"] = "tap"
    parse_policies(yaml.safe_dump(doc), "ok.yaml")  # application-level mirroring is allowed


def test_metric_names_unique_and_query_placeholders_known() -> None:
    doc = _base()
    metrics = doc["spec"]["analysis"]["metrics"]
    metrics[1]["name"] = metrics[0]["name"]
    assert any("used twice" in e for e in _errors(doc))
    doc = _base()
    doc["spec"]["analysis"]["metrics"][0] = {
        "name": "custom",
        "query": 'histogram_quantile(0.9, rate(x_bucket{ns="{{ namespce }}"}[{{ window }}]))',
    }
    errs = _errors(doc)
    assert any("{{ namespce }}" in e and "spec.analysis.metrics[0].query" in e for e in errs)


def test_preset_xor_query() -> None:
    doc = _base()
    doc["spec"]["analysis"]["metrics"][0]["query"] = "up"
    assert any("exactly one of 'preset' or 'query'" in e for e in _errors(doc))


def test_ratio_needs_rate_statistic() -> None:
    doc = _base()
    doc["spec"]["analysis"]["metrics"][3]["statistic"] = "p95"
    assert any("statistic 'rate'" in e for e in _errors(doc))


def test_nothing_to_roll_out_or_judge() -> None:
    doc = _base()
    del doc["spec"]["shadow"]
    del doc["spec"]["canary"]
    assert any("nothing to roll out" in e for e in _errors(doc))
    doc = _base()
    doc["spec"]["analysis"]["metrics"] = []
    del doc["spec"]["analysis"]["outputs"]
    assert any("nothing would be judged" in e for e in _errors(doc))


def test_progress_deadline_must_cover_phases() -> None:
    doc = _base()
    doc["spec"]["progressDeadline"] = "30m"
    assert any("progressDeadline" in e for e in _errors(doc))


def test_wrong_kind_and_api_version() -> None:
    doc = _base()
    doc["kind"] = "Rollout"
    doc["apiVersion"] = "v1"
    errs = _errors(doc)
    assert any(e.startswith("kind: must be 'ShadowPolicy'") for e in errs)
    assert any(e.startswith("apiVersion: must be") for e in errs)


def test_policy_is_frozen() -> None:
    policy = load_policies(EXAMPLES[0])[0]
    with pytest.raises(ValueError, match="frozen"):
        policy.metadata.name = "x"  # type: ignore[misc]


def test_fixed_block_reaches_the_judge_config() -> None:
    """policies/kayenta-fixed.yaml: every Kayenta option lands in the fixed judge's configuration."""
    from shadowctl.judge.fixed import config_from_policy

    policy = load_policies(REPO / "policies" / "kayenta-fixed.yaml")[0]
    config = config_from_policy(policy.spec.analysis)
    assert (config.confidence, config.tolerance, config.pass_score, config.marginal_score) == (0.98, 0.25, 95, 75)
    assert dict(config.group_weights) == {"cost": 60}
    cost, power, util = (config.options(n) for n in ("cost-per-1k-tokens", "gpu-power", "gpu-util"))
    assert (cost.effect_measure, cost.allowed_increase, cost.critical_increase) == ("meanRatio", 1.1, 1.5)
    assert cost.must_have_data and cost.groups == ("cost",) and cost.outliers == "remove"
    assert (power.effect_measure, power.allowed_increase, power.must_have_data) == ("cles", 0.8, False)
    assert util.muted and util.groups == ("gpu",) and util.outlier_factor == 3.0


def test_fixed_defaults_follow_netflix_aca_judge() -> None:
    from shadowctl.judge.fixed import config_from_policy

    doc = _base()
    doc["spec"]["analysis"]["method"] = "fixed"
    config = config_from_policy(parse_policies(yaml.safe_dump(doc), "p.yaml")[0].spec.analysis)
    assert (config.confidence, config.tolerance) == (0.98, 0.25)
    assert config.options("errors").nan_strategy == "remove" and config.options("errors").groups == ("default",)


def test_fixed_options_are_bounded_and_explained() -> None:
    doc = _base()
    analysis = doc["spec"]["analysis"]
    analysis["passScore"] = 90
    assert any("moved to spec.analysis.fixed.passScore" in e for e in _errors(doc))
    del analysis["passScore"]
    analysis["fixed"] = {"tolerance": 0.1}
    assert any("set method: fixed" in e for e in _errors(doc))
    analysis["method"] = "fixed"
    analysis["fixed"] = {"confidence": 1.5, "groupWeights": {"nope": 10}}
    errors = _errors(doc)
    assert any("confidence" in e for e in errors)
    analysis["fixed"] = {"groupWeights": {"nope": 10}}
    assert any("no metric is in: nope" in e for e in _errors(doc))
    analysis["metrics"][0]["group"] = "a"
    analysis["metrics"][1]["group"] = "b"
    analysis["fixed"] = {"groupWeights": {"a": 70, "b": 40}}
    assert any("add up to 110" in e for e in _errors(doc))
    analysis["fixed"] = {"marginalScore": 96}
    assert any("marginalScore must not be above passScore" in e for e in _errors(doc))
    analysis["fixed"] = {}
    analysis["metrics"][0]["fixed"] = {"effectSize": {"measure": "cles", "allowedIncrease": 1.5}}
    assert any("probability with measure cles" in e for e in _errors(doc))
    analysis["metrics"][0]["fixed"] = {"outliers": {"strategy": "trim"}}
    assert any("outliers.strategy" in e for e in _errors(doc))
    analysis["metrics"][0]["fixed"] = {}
    analysis["metrics"][0]["groups"] = ["x"]
    assert any("'group' or 'groups'" in e for e in _errors(doc))


def test_tap_target_urls_and_rules() -> None:
    """spec.target.tap: the candidate's URL is http(s) with a host, no credentials, query or metadata address; a
    URL or a rewrite is needed; its shadow phase goes through the taps and it needs the outputs broker."""
    doc = yaml.safe_load((REPO / "policies" / "summarize-adapter.yaml").read_text())
    for url, why in [("http://user:pw@chat.llm.svc:8000", "credentials"), ("ftp://chat.llm.svc", "http"),
                     ("http://chat.llm.svc:8000/v1?x=1", "query"), ("http://169.254.169.254/", "link-local"),
                     ("http://:8000", "host")]:
        doc["spec"]["target"]["tap"]["candidateURL"] = url
        assert any(why in e for e in _errors(doc)), (url, _errors(doc))
    doc["spec"]["target"]["tap"] = {"service": "summarize"}
    assert any("give candidateURL" in e for e in _errors(doc))
    doc["spec"]["target"]["tap"] = {"service": "summarize", "candidateURL": "http://summarize-v2.llm.svc:8000"}
    doc["spec"]["shadow"]["mode"] = "istio"
    assert any("set shadow.mode: tap" in e for e in _errors(doc))
    doc["spec"]["shadow"]["mode"] = "tap"
    assert parse_policies(yaml.safe_dump(doc), "p.yaml")[0].spec.target.tap is not None
    del doc["spec"]["analysis"]["outputs"]
    doc["spec"]["analysis"]["metrics"] = doc["spec"]["analysis"]["metrics"][:1]  # no paired metric either
    assert any("needs spec.analysis.outputs.mqtt" in e for e in _errors(doc))
