"""The demo's prompt rollouts (``shadowctl demo --scenario prompt-good | prompt-bad``, issue 18).

The candidate is a new version of the system prompt, not a new deployment: one simulated model server
(``chat-v1``) answers both versions, and the primary's tap is the only router (``spec.target.tap`` with
``rewrite.prompt``, ``apply: replaceSystem``). The two prompt versions and the llm-judge's prompt are
ConfigMaps, applied with kubectl as a team's kustomization would; the controller reads them as
deploy/rbac.yaml's ServiceAccount plus only the Role ``shadowctl rbac configmaps`` prints for the policy
(``get`` on those ConfigMaps by name), so the demo also shows that Role is enough.

Why the answers differ: the simulated server's ``prompt_quality`` table gives each prompt version a
quality (the share of an answer's words it gets right, :func:`shadowctl.sim.prompts.degraded_answer`), and
the simulated judge (a second simulated server with :class:`shadowctl.sim.judge.SimJudge`) prefers the
answer closer to the reference answer, so a better prompt wins and a worse one loses, deterministically.
The noise baseline is the tap's own (``baseline.mode: resend``): no second replica.

Topology::

    load generator ──▶ tap(primary, routed) ──▶ chat-v1 (both prompt versions)
                           │ shadow: mirror x% with v2's system prompt, resend y% unchanged (baseline)
                           │ canary: the step's share of users with v2's system prompt
    tap ── output events ──▶ Mosquitto ──▶ controller's output source ──▶ judge-sim (llm-judge)
    controller ── route setting (the prompt texts it read from the ConfigMaps) ──▶ Mosquitto ──▶ tap
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shadowctl.aio import cancel_and_wait
from shadowctl.compare.llmjudge import DEFAULT_JUDGE_PROMPT
from shadowctl.demo.env import (
    BASE_KNOBS,
    CONTROLLER_SA,
    DEMO_NAMESPACE,
    MANIFESTS,
    MODEL,
    RBAC_WAIT_S,
    Environment,
    _address,
)
from shadowctl.demo.scenarios import Scenario, Timing
from shadowctl.kube import CONFIG_MAP, SHADOW_POLICY, Forbidden, KubeClient, NotFound, ResourceRef
from shadowctl.policy.status import Phase
from shadowctl.sim.errors import SimError
from shadowctl.sim.judge import SimJudge
from shadowctl.sim.modelserver import SimModelServer
from shadowctl.sim.prompts import PromptMix
from shadowctl.sim.services import MosquittoProcess, PrometheusProcess, ScrapeTarget, free_port

PRIMARY_PROMPT = "You are an assistant for platform engineers. Answer the question."
"""The system prompt the application sends today (the primary's version, ConfigMap chat-prompt-v1)."""
PRIMARY_QUALITY = 0.8
"""The share of an answer's words the primary's prompt gets right (the simulated server's table)."""
JUDGE_MODEL = "judge-sim"
CONFIG_MAPS = {"primary": "chat-prompt-v1", "candidate": "chat-prompt-v2", "judge": "chat-judge-prompt"}
"""The ConfigMaps the policy names (kustomize would add a hash of the content to each name)."""
PROMPT_KEY = "system.txt"
JUDGE_KEY = "judge.txt"
TAP_POD = "chat-v1-5c7d9f-x8k2p"


@dataclass(frozen=True)
class PromptScenario(Scenario):
    """A prompt rollout: the candidate's system prompt and the quality the simulated server gives it."""

    prompt: str = ""
    quality: float = 1.0


PROMPT_SCENARIOS: dict[str, PromptScenario] = {
    s.name: s
    for s in (
        PromptScenario(
            "prompt-good", "A new system prompt whose answers are better (the judge prefers them; they agree with "
            "the primary's): shadowed through the primary's tap, then promoted.", Phase.succeeded,
            prompt="You are an assistant for platform engineers. Answer the question precisely, with the facts "
                   "it asks for.", quality=0.95),
        PromptScenario(
            "prompt-bad", "A new system prompt whose answers get worse: rolled back during shadow on the "
            "llm-judge (it loses most pairs) or on output agreement, whichever bound is crossed first.",
            Phase.rolled_back, expect_failed=("agreement/llm-judge", "agreement/token-f1"),
            prompt="You are an assistant. Be playful and vary your wording freely.", quality=0.4),
    )
}


def prompt_mix() -> PromptMix:
    """The load: chat requests only (a system prompt needs messages), each with the primary's system prompt;
    no long-context prompts (the judge's maxAnswerChars would cut the question it scores against)."""
    return PromptMix(stream_share=0.3, max_tokens_choices=(16, 32, 64), completions_share=0.0, long=0.0,
                     system_prompt=PRIMARY_PROMPT)


POLICY_TEMPLATE = """\
apiVersion: shadowctl.dev/v1alpha1
kind: ShadowPolicy
metadata:
  name: chat
  namespace: llm
spec:
  target:
    tap:
      service: chat
      rewrite:
        prompt:
          apply: replaceSystem
          primary: {{configMapRef: {{name: {primary_cm}, key: {prompt_key}}}}}
          candidate: {{configMapRef: {{name: {candidate_cm}, key: {prompt_key}}}}}
  trigger: manual
  shadow:
    mode: tap
    mirrorPercent: 50
    minDuration: {shadow_min}
    maxDuration: {shadow_max}
    minPairs: 100
  canary:
    steps: [{steps}]
    stepDuration: {step_duration}
    maxStepDuration: {step_max}
  analysis:
    interval: {interval}
    alpha: 0.05
    beta: 0.05
    variants:
      primary: {{workload: chat}}
      candidate: {{workload: chat}}
    metrics:
      # One server answers both prompt versions: the tap's own series tell them apart (variant: who answered).
      - name: errors
        kind: ratio
        statistic: rate
        query: sum(increase(shadowctl_tap_requests_total{{namespace="{{{{ namespace }}}}", variant="{{{{ variant }}}}"}}[{{{{ window }}}}]))
        errorQuery: sum(increase(shadowctl_tap_requests_total{{namespace="{{{{ namespace }}}}", variant="{{{{ variant }}}}", code=~"5.."}}[{{{{ window }}}}]))
        margin: 2pp
        minSamples: 200
    outputs:
      mqtt:
        broker: {broker}
        topic: shadowctl/outputs/llm/chat/+
      comparators:
        - {{name: token-f1, threshold: 0.6}}
        - name: llm-judge
          judge:
            url: {judge_url}/v1
            model: {judge_model}
            prompt: {{configMapRef: {{name: {judge_cm}, key: {judge_key}}}}}
            minWinOrTie: 0.45
            rate: {{requestsPerSecond: 20, maxPairsPerInterval: 40}}
            timeout: 10s
            concurrency: 8
      baseline: {{mode: resend, percent: 30}}
      minRelativeAgreement: 0.85
      pairTTL: 30s
      minPairs: 100
  onInconclusive: rollback
  progressDeadline: 10m
  promotion: auto
"""


def policy_yaml(timing: Timing, broker: str, judge_url: str) -> str:
    """The prompt rollout's ShadowPolicy (timings from `timing`, its canary steps)."""
    return POLICY_TEMPLATE.format(
        primary_cm=CONFIG_MAPS["primary"], candidate_cm=CONFIG_MAPS["candidate"], prompt_key=PROMPT_KEY,
        judge_cm=CONFIG_MAPS["judge"], judge_key=JUDGE_KEY, judge_url=judge_url, judge_model=JUDGE_MODEL,
        shadow_min=timing.shadow_min, shadow_max=timing.shadow_max, step_duration=timing.step_duration,
        step_max=timing.step_max, interval=timing.interval, steps=", ".join(str(s) for s in timing.steps),
        broker=broker)


def config_maps(scenario: PromptScenario) -> list[dict[str, Any]]:
    """The ConfigMaps the policy names: both prompt versions and the judge's prompt."""
    texts = {"primary": (PROMPT_KEY, PRIMARY_PROMPT), "candidate": (PROMPT_KEY, scenario.prompt),
             "judge": (JUDGE_KEY, DEFAULT_JUDGE_PROMPT)}
    return [{"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": CONFIG_MAPS[which], "namespace": DEMO_NAMESPACE,
                          "labels": {"app.kubernetes.io/part-of": "chat-prompts"}},
             "data": {key: text}} for which, (key, text) in texts.items()]


@dataclass
class TapEnvironment(Environment):
    """The local environment of a prompt rollout (see the module docstring); `close()` as Environment's."""

    scenario: PromptScenario | None = None
    judge_url: str | None = None
    route_log: list[dict[str, Any]] = field(default_factory=list)
    """Each change of what the primary's tap routes by: {at, generation, primary, candidate, mirror}."""
    _watch: asyncio.Task[None] | None = None

    @classmethod
    async def start_prompt(cls, scenario: PromptScenario, policy_text_for: Any, *, workdir: Path | None = None,
                           seed: int = 7) -> TapEnvironment:
        """Start everything; `policy_text_for(broker_url, judge_url)` gives the ShadowPolicy YAML to apply."""
        env = cls(workdir or Path(tempfile.mkdtemp(prefix="shadowctl-demo-")), keep_workdir=workdir is not None,
                  target="tap", scenario=scenario)
        try:
            await env._start_prompt(policy_text_for, seed)
        except BaseException:
            await env.close()
            raise
        return env

    @property
    def entry_url(self) -> str:
        """Where the load goes: the primary's tap (no mesh: the tap is the only router)."""
        return self.taps["primary"].url

    async def _start_prompt(self, policy_text_for: Any, seed: int) -> None:
        assert self.scenario is not None
        self.cluster, self.kube = await self._start_cluster(kserve=False)
        await self._kubectl("apply", *(arg for path in MANIFESTS for arg in ("-f", str(path))))
        await self._controller_credentials()
        # The prompt versions and the judge's prompt, as a kustomization's configMapGenerator would apply them.
        cms = self.workdir / "configmaps.yaml"
        cms.write_text(yaml.safe_dump_all(config_maps(self.scenario), sort_keys=False))
        await self._kubectl("apply", "-f", str(cms))

        self.mosquitto = MosquittoProcess(self.workdir / "mosquitto")
        await self.mosquitto.start()

        # One model server answers both prompt versions (the candidate is a rewrite, not a deployment); the
        # judge is a second simulated server.
        primary = SimModelServer(MODEL, variant="primary", knobs=BASE_KNOBS, seed=seed, pod=TAP_POD,
                                 namespace=DEMO_NAMESPACE, fine_buckets=True,
                                 prompt_quality={PRIMARY_PROMPT: PRIMARY_QUALITY,
                                                 self.scenario.prompt: self.scenario.quality})
        await primary.start()
        self.servers["primary"] = primary
        judge = SimModelServer(JUDGE_MODEL, variant="judge", knobs=BASE_KNOBS, seed=seed + 1,
                               pod="judge-sim-0", namespace=DEMO_NAMESPACE,
                               judge=SimJudge(median_words=BASE_KNOBS.output_words_median,
                                              sigma=BASE_KNOBS.output_words_sigma, skip_system=True))
        await judge.start()
        self.servers["judge"] = judge
        self.judge_url = judge.url
        await self._start_tap("primary", None, routed=True)
        self._watch = asyncio.create_task(self._watch_routes())

        controller_port = free_port()
        self.controller_metrics_url = f"http://127.0.0.1:{controller_port}"
        targets = [
            ScrapeTarget("vllm", _address(primary.url), {"namespace": DEMO_NAMESPACE, "pod": TAP_POD,
                                                         "container": "vllm", "endpoint": "http"}),
            ScrapeTarget("tap", _address(self.taps["primary"].url), {"namespace": DEMO_NAMESPACE, "pod": TAP_POD,
                                                                     "container": "tap", "endpoint": "tap-metrics"}),
            ScrapeTarget("shadowctl", f"127.0.0.1:{controller_port}", {
                "namespace": CONTROLLER_SA[0], "pod": "shadowctl-6d4f8b9c7-h2x9q", "container": "controller",
                "endpoint": "http-metrics"}),
        ]
        self.prometheus = PrometheusProcess(self.workdir / "prometheus", targets)
        await self.prometheus.start()

        # The policy; then the Role `shadowctl rbac configmaps` prints for it, applied with kubectl as a person
        # would (the controller may read exactly the ConfigMaps the policy names); then the controller.
        text = policy_text_for(self.mosquitto.url, self.judge_url)
        policy_file = self.workdir / "policy.yaml"
        policy_file.write_text(text)
        await self._configmap_role(policy_file)
        await self.kube.create(SHADOW_POLICY, yaml.safe_load(text))
        self._start_controller(controller_port)

    async def _configmap_role(self, policy_file: Path) -> None:
        """Apply what ``shadowctl rbac configmaps POLICY`` prints; wait until the controller can read them."""
        argv = [sys.executable, "-m", "shadowctl", "rbac", "configmaps", str(policy_file)]
        done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=120,
                                       check=False)
        if done.returncode != 0 or not done.stdout.strip():
            raise SimError(f"shadowctl rbac configmaps failed ({done.returncode}): {done.stderr.strip()}")
        role = self.workdir / "configmaps-role.yaml"
        role.write_text(done.stdout)
        await self._kubectl("apply", "-f", str(role))
        assert self.controller_kubeconfig is not None
        probe = await KubeClient.connect(kubeconfig=self.controller_kubeconfig)
        try:
            deadline = asyncio.get_running_loop().time() + RBAC_WAIT_S
            for name in CONFIG_MAPS.values():
                while True:
                    try:
                        await probe.get(ResourceRef(CONFIG_MAP, name, DEMO_NAMESPACE))
                        break
                    except (Forbidden, NotFound) as exc:
                        if asyncio.get_running_loop().time() > deadline:
                            raise SimError(f"the Role of shadowctl rbac configmaps is applied, but the controller "
                                           f"still cannot get ConfigMap {name} after {RBAC_WAIT_S:g} s: "
                                           f"{exc}") from exc
                        await asyncio.sleep(0.1)
        finally:
            await probe.close()

    def _start_controller(self, port: int) -> None:
        """The real `shadowctl run`, as a child process, as deploy/rbac.yaml's ServiceAccount."""
        self.controller_log = self.workdir / "controller.log"
        log = self.controller_log.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        assert self.prometheus is not None and self.mosquitto is not None
        self.controller = subprocess.Popen(
            [sys.executable, "-m", "shadowctl", "run", "--kubeconfig", str(self.controller_kubeconfig),
             "--prometheus", self.prometheus.url, "--events-mqtt", self.mosquitto.url, "--no-leader-elect",
             "--status-refresh", "0",  # the report charts every look's evidence, not one per 30 s (controller/writes.py)
             "--listen", f"127.0.0.1:{port}", "--log-format", "json"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
        )
        log.close()

    def _routes_now(self) -> tuple[int | None, int, int, float | None]:
        routes = self.taps["primary"].proxy.routes
        assert routes is not None
        cur = routes.current
        return cur.generation, 100 - cur.candidate_percent, cur.candidate_percent, cur.mirror_percent

    async def _watch_routes(self) -> None:
        """Record each change of what the primary's tap routes by (every 50 ms)."""
        last = None
        while True:
            now = self._routes_now()
            if now[1:] != last:
                last = now[1:]
                self.route_log.append({"at": time.time(), "generation": now[0], "primary": now[1],
                                       "candidate": now[2], "mirror": now[3]})
            await asyncio.sleep(0.05)

    async def route_weights(self) -> tuple[int, int, float | None]:
        """(primary, candidate, mirror %) as the primary's tap routes now."""
        _, primary, candidate, mirror = self._routes_now()
        return primary, candidate, mirror

    def route_changes(self, started: float) -> list[dict[str, Any]]:
        """The route changes in the report's form (the setting's generation as the version)."""
        return [{"t": round(c["at"] - started, 2), "at": c["at"],
                 "resource_version": c["generation"] if c["generation"] is not None else "none",
                 "primary": c["primary"], "candidate": c["candidate"], "mirror": c["mirror"]}
                for c in self.route_log]

    async def close(self) -> None:
        if self._watch is not None:
            await cancel_and_wait(self._watch)
            self._watch = None
        await super().close()
