"""The demo's scenarios and the policy they run (timings accelerated so a rollout takes minutes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shadowctl.policy.status import Phase


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    expected: Phase  # the phase the rollout must end in
    candidate: dict[str, Any] = field(default_factory=dict)  # model-server knobs of the candidate
    expect_failed: tuple[str, ...] = ()
    """The metrics one of which must name the rollback (more than one where the fault fails several)."""


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("good", "The candidate answers like the primary and is a little faster: it is promoted.",
                 Phase.succeeded, {"ttft_median_s": 0.115}),
        Scenario("bad-latency", "The candidate's time to first token is 30% longer: rolled back during shadow.",
                 Phase.rolled_back, {"latency_factor": 1.3}, ("ttft-p50",)),
        Scenario("bad-output", "Half of the candidate's answers drift from what the primary says: rolled back on "
                 "output agreement.", Phase.rolled_back, {"drift_rate": 0.5}, ("agreement/token-f1",)),
        # A failed answer also disagrees with the primary's (compare_pair), so the same fault fails output
        # agreement: whichever bound is crossed first names the rollback, and either is right.
        Scenario("errors", "7% of the candidate's requests fail with HTTP 500 inside the engine: rolled back on "
                 "the error rate (vllm-errors), or on output agreement if that is crossed first (a failed answer "
                 "disagrees).", Phase.rolled_back, {"error_rate": 0.07}, ("errors", "agreement/")),
        # The 3% made slow leave the lower half, so the median moves too (to about the 51.5th percentile):
        # a small, real increase the p50 test may detect first on a long run; either names the rollback.
        Scenario("tail", "3% of the candidate's requests are 4x slower (p99 moves a lot, the median a little): "
                 "rolled back on ttft-p99, or on ttft-p50 if its small shift is detected first.", Phase.rolled_back,
                 {"tail_probability": 0.03, "tail_factor": 4.0}, ("ttft-p99", "ttft-p50")),
    )
}


@dataclass(frozen=True)
class Timing:
    """How fast the demo runs; `short` is the test suite's form."""

    rps: float = 50.0
    shadow_min: str = "30s"
    shadow_max: str = "150s"
    step_duration: str = "15s"
    # A p99 with a 30% margin needs about a thousand samples per arm before it can pass; at 40-60% of
    # 50 req/s that takes 60-100 s, so a step gets up to 3 minutes before it is inconclusive.
    step_max: str = "180s"
    interval: str = "5s"
    steps: tuple[int, ...] = (40, 70)
    deadline_s: float = 600.0


FULL = Timing()
SHORT = Timing(rps=50.0, shadow_min="20s", shadow_max="120s", step_duration="10s", step_max="150s",
               interval="4s", steps=(60,), deadline_s=360.0)

POLICY_TEMPLATE = """\
apiVersion: shadowctl.dev/v1alpha1
kind: ShadowPolicy
metadata:
  name: chat
  namespace: llm
spec:
  target:
{target}
  trigger: manual
  shadow:
    mirrorPercent: 50
    minDuration: {shadow_min}
    maxDuration: {shadow_max}
    minPairs: 100
{shadow_mode}  canary:
    steps: [{steps}]
    stepDuration: {step_duration}
    maxStepDuration: {step_max}
  analysis:
    interval: {interval}
    alpha: 0.05
    beta: 0.05
    variants:
      primary: {{pod: "chat-v1-.*"}}
      candidate: {{pod: "chat-v2-.*"}}
    metrics:
      - {{name: ttft-p50, preset: vllm-ttft, statistic: p50, margin: 15%, critical: true, minSamples: 200}}
      - {{name: ttft-p99, preset: vllm-ttft, statistic: p99, margin: 30%, critical: true, minSamples: 500}}
      - {{name: errors, preset: vllm-errors, kind: ratio, statistic: rate, margin: 2pp, minSamples: 200}}
    outputs:
      mqtt:
        broker: {broker}
        topic: shadowctl/outputs/llm/chat/+
      comparators:
        - {{name: token-f1, threshold: 0.6}}
      baseline: {baseline}
      minRelativeAgreement: 0.85
      pairTTL: 30s
      minPairs: 100
  onInconclusive: rollback
  progressDeadline: 10m
  promotion: auto
"""


TARGETS: dict[str, str] = {
    # istio/chat.yaml's VirtualService: subsets v1 and v2 of one host.
    "istio": """\
    istio:
      virtualService: chat
      route: chat-default
      primary: {host: chat.llm.svc.cluster.local, subset: v1, port: 8000}
      candidate: {host: chat.llm.svc.cluster.local, subset: v2, port: 8000}""",
    # gateway-api/chat.yaml's HTTPRoute: two Services, chat-v1 and chat-v2.
    "gateway-api": """\
    gatewayAPI:
      httpRoute: chat
      rule: chat-default
      primary: {name: chat-v1, port: 8000}
      candidate: {name: chat-v2, port: 8000}""",
    # kserve/chat.yaml's InferenceService: the rolled-out revision and the latest ready one (the candidate).
    "kserve": """\
    kserve:
      inferenceService: chat
      component: predictor""",
}
"""The policy's spec.target for each `shadowctl demo --target`."""


SHADOW_MODES: dict[str, str] = {"kserve": "    mode: tap\n"}
"""The shadow phase's mirror where the target cannot mirror: KServe's goes through the primary's tap."""


BASELINES: dict[str, str] = {"kserve": "{mode: resend, percent: 30}"}
"""The noise baseline: a second primary replica answers the copies the primary's tap sends it (the default), or,
where the primary's tap routes (KServe), that tap sends 30% of requests once more to its own upstream."""


def policy_yaml(timing: Timing, broker: str, target: str = "istio") -> str:
    return POLICY_TEMPLATE.format(
        shadow_mode=SHADOW_MODES.get(target, ""), baseline=BASELINES.get(target, "{mode: primary-replica}"),
        shadow_min=timing.shadow_min, shadow_max=timing.shadow_max, step_duration=timing.step_duration,
        step_max=timing.step_max, interval=timing.interval, steps=", ".join(str(s) for s in timing.steps),
        broker=broker, target=TARGETS[target],
    )
