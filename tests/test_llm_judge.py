"""The llm-judge comparator (#18 item 4): a judge model scores candidate pairs, both orders, at a capped rate.

The judge is a real local HTTP server, the simulated model server in judge mode (shadowctl.sim.judge), and
the output events travel through a real Mosquitto; nothing is mocked. The verdicts' quality signal is the
sim's: token F1 against the reference answer of the user's request.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import itertools
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import pytest
import yaml
from aiohttp import web
from conftest_kube import KubeEnv
from tap_helpers import eventually, free_port
from typer.testing import CliRunner

from shadowctl.aio import cancel_and_wait
from shadowctl.cli.app import app
from shadowctl.compare.comparators import AgreementTally, PairResult, TallyBuilder, build_comparators, judge_inputs
from shadowctl.compare.events import Endpoint, OutputEvent, Variant
from shadowctl.compare.llmjudge import (
    DEFAULT_JUDGE_PROMPT,
    Choice,
    Outcome,
    TemplateError,
    check_template,
    combine,
    parse_choice,
    render,
)
from shadowctl.compare.pairing import Pair
from shadowctl.controller.analysis import Analyzer, agreement_input
from shadowctl.controller.outputs import OutputHub
from shadowctl.judge import Outcome as Verdict
from shadowctl.judge import judge_metric
from shadowctl.kube import CONFIG_MAP, KubeClient
from shadowctl.machine import RolloutState
from shadowctl.policy.model import Comparator, ComparatorName, LlmJudge, Outputs, ShadowPolicy
from shadowctl.policy.status import Phase
from shadowctl.sim.cluster import find_binaries
from shadowctl.sim.judge import SimJudge
from shadowctl.sim.modelserver import ModelKnobs, SimModelServer
from shadowctl.sim.prompts import drifted_answer, reference_answer
from shadowctl.sources.llmjudge import JudgeCallFailed, OpenAIJudge, PairJudge, inline_template, judge_for_policy
from shadowctl.sources.outputs import MqttOutputSource

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

QUESTIONS = [f"Summarize ticket {i}: the export to CSV fails for accounts with {i} projects." for i in range(40)]


def judge_spec(url: str, **changes: object) -> LlmJudge:
    data: dict[str, object] = {"url": url, "model": "judge", "prompt": {"text": DEFAULT_JUDGE_PROMPT},
                               "rate": {"requestsPerSecond": 1000, "maxPairsPerInterval": 10_000},
                               "timeout": "5s", "concurrency": 4}
    data.update(changes)
    return LlmJudge.model_validate(data)


def event(rid: str, variant: Variant, question: str, output: str, status: int = 200) -> OutputEvent:
    return OutputEvent(request_id=rid, variant=variant, shadow=variant is not Variant.primary, service="ns/chat",
                       endpoint=Endpoint.chat, prompt_hash="h", prompt=f"user: {question}", output=output,
                       status=status, started_at=0.0, e2e_s=0.1)


def pair(i: int, primary: str, candidate: str, status: int = 200) -> Pair:
    q = QUESTIONS[i % len(QUESTIONS)]
    return Pair(event(f"r{i}", Variant.primary, q, primary), event(f"r{i}", Variant.candidate, q, candidate, status))


def good(i: int) -> str:
    return reference_answer(QUESTIONS[i % len(QUESTIONS)])


def bad(i: int) -> str:
    import random
    return drifted_answer(QUESTIONS[i % len(QUESTIONS)], random.Random(i))


@contextlib.asynccontextmanager
async def judge_server(judge: SimJudge | None = None, **knobs: object) -> AsyncIterator[SimModelServer]:
    server = SimModelServer("judge", judge=judge or SimJudge(),
                            knobs=ModelKnobs(time_scale=0.01, **knobs))  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running(judge: PairJudge) -> AsyncIterator[PairJudge]:
    task = asyncio.create_task(judge.run())
    try:
        yield judge
    finally:
        await cancel_and_wait(task)


def make_judge(spec: LlmJudge, interval_s: float = 30.0) -> PairJudge:
    model = OpenAIJudge(spec.url, spec.model, timeout_s=spec.timeout.total_seconds())
    return PairJudge(spec, model, inline_template(DEFAULT_JUDGE_PROMPT), interval_s=interval_s)


# --------------------------------------------------------------------------- pure parts


def test_the_template_fills_placeholders_once_and_cuts_long_texts() -> None:
    text = render("Q={question} A={answer_a} B={answer_b}", "q", "{answer_b}", "x" * 50, max_chars=10)
    assert text == "Q=q A={answer_b} B=xxxxxxxxxx [...]"
    with pytest.raises(TemplateError, match=r"\{answer_b\}"):
        check_template("{question} {answer_a}")


def test_the_verdict_is_the_last_mark_and_none_without_one() -> None:
    assert parse_choice("A is fine but [[B]] is better.\n[[ A ]]") is Choice.a
    assert parse_choice("both equal [[C]]") is Choice.tie
    assert parse_choice("I prefer A.") is None


def test_both_orders_must_agree_for_a_win_or_a_loss() -> None:
    """The first reply had the candidate as A, the second as B."""
    assert combine(Choice.a, Choice.b) is Outcome.win
    assert combine(Choice.b, Choice.a) is Outcome.loss
    assert combine(Choice.a, Choice.a) is Outcome.tie  # position bias: A both times
    assert combine(Choice.b, Choice.b) is Outcome.tie
    assert combine(Choice.a, Choice.tie) is Outcome.tie
    assert combine(Choice.tie, Choice.tie) is Outcome.tie


def test_the_policy_ties_the_judge_to_its_comparator() -> None:
    with pytest.raises(ValueError, match="needs 'judge'"):
        Comparator(name=ComparatorName.llm_judge)
    with pytest.raises(ValueError, match="belongs to comparator 'llm-judge'"):
        Comparator.model_validate({"name": "exact", "judge": judge_spec("http://j:1/v1").model_dump(by_alias=True)})
    with pytest.raises(ValueError, match="exactly one"):
        LlmJudge.model_validate({"url": "http://j/v1", "model": "m", "prompt": {}})
    with pytest.raises(ValueError, match=r"less than 0\.5"):
        judge_spec("http://j/v1", minWinOrTie=0.6)
    with pytest.raises(ValueError, match="not an allowed judge URL: credentials in the URL"):
        judge_spec("http://user:pw@j/v1")
    with pytest.raises(ValueError, match="link-local"):  # the same outbound rules as webhooks and tap URLs
        judge_spec("http://169.254.169.254/v1")
    assert build_comparators([Comparator(name=ComparatorName.llm_judge, judge=judge_spec("http://j/v1"))]) == []


def _verdict(tally: AgreementTally, min_pairs: int = 20) -> Verdict:
    outputs = Outputs.model_validate({
        "mqtt": {"broker": "mqtt://b:1883"},
        "comparators": [{"name": "llm-judge", "judge": judge_spec("http://j/v1").model_dump(by_alias=True)}]})
    [item] = judge_inputs(tally, outputs)
    mi = agreement_input(item, min_pairs)
    return judge_metric(mi.spec, mi.primary, mi.candidate, alpha=0.05, beta=0.05).outcome


def _failed(judge: PairJudge, n: int) -> bool:
    return judge.stats.failed == n


def _tally(wins: int, ties: int, losses: int) -> AgreementTally:
    builder = TallyBuilder()
    name = ComparatorName.llm_judge
    for i, score in enumerate([1.0] * wins + [0.5] * ties + [0.0] * losses):
        builder.add(PairResult(f"r{i}", Variant.candidate, {name: score}, {name: score >= 0.5}))
    return builder.tally()


def test_judged_as_a_proportion_against_an_even_match() -> None:
    """The judge's existing proportion test: pass above minWinOrTie (0.45), fail below 0.5, no pairs: nodata."""
    assert _verdict(_tally(40, 100, 60)) is Verdict.passed  # 70% win or tie
    assert _verdict(_tally(10, 30, 160)) is Verdict.failed  # 20%
    assert _verdict(AgreementTally()) is Verdict.nodata
    assert _verdict(_tally(0, 10, 0)) is Verdict.nodata  # fewer than minPairs


# --------------------------------------------------------------------------- a real judge server


async def test_a_real_judge_scores_wins_ties_and_losses() -> None:
    """Against the simulated judge over HTTP: the reference answer beats a drifted one in both orders."""
    async with judge_server() as server:
        judge = make_judge(judge_spec(f"{server.url}/v1"))
        assert await judge.judge(pair(0, bad(0), good(0))) is Outcome.win
        assert await judge.judge(pair(1, good(1), bad(1))) is Outcome.loss
        assert await judge.judge(pair(2, good(2), good(2))) is Outcome.tie
        await judge.model.aclose()
        assert server.stats.requests == 6  # two per pair


async def test_asking_in_swapped_order_cancels_position_bias() -> None:
    """A judge that names answer A whenever the answers are close: one order alone would make every equal
    candidate win (or lose); both orders make it a tie. Clear differences still decide."""
    async with judge_server(SimJudge(position_bias=True)) as server:
        judge = make_judge(judge_spec(f"{server.url}/v1"))
        first = await judge._ask(render(DEFAULT_JUDGE_PROMPT, f"user: {QUESTIONS[3]}", good(3), good(3),
                                        max_chars=4000))
        assert first is Choice.a  # the bias, seen in one order
        assert await judge.judge(pair(3, good(3), good(3))) is Outcome.tie
        assert await judge.judge(pair(4, bad(4), good(4))) is Outcome.win
        await judge.model.aclose()


async def test_a_broken_judge_endpoint_gives_no_data_never_a_pass() -> None:
    """HTTP 500s, a closed port, a judge slower than the timeout, and replies without a verdict: no pair
    reaches the tally, every one is counted failed, and the comparator's verdict is nodata."""
    async def no_verdict(_: web.Request) -> web.Response:
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": "A is nicer."}}]})

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/nov/chat/completions", no_verdict)
    app.router.add_post("/slow/chat/completions", slow)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with judge_server(error_rate=1.0) as failing:
            urls = {"500": f"{failing.url}/v1", "closed": f"http://127.0.0.1:{free_port()}/v1",
                    "timeout": f"http://127.0.0.1:{port}/slow", "no verdict": f"http://127.0.0.1:{port}/nov"}
            for what, url in urls.items():
                judge = make_judge(judge_spec(url, timeout="1s"))
                builder = TallyBuilder()
                async with running(judge):
                    for i in range(3):
                        judge.offer(pair(i, bad(i), good(i)), builder.add)
                    await eventually(functools.partial(_failed, judge, 3), limit=15, what=f"{what}: 3 failures")
                assert judge.stats.judged == 0, what
                assert builder.tally().counts == {}, what
                assert judge.last_error is not None and "judge" in judge.last_error, what
                assert _verdict(builder.tally(), min_pairs=1) is Verdict.nodata, what
    finally:
        await runner.cleanup()


async def test_the_rate_cap_and_the_pairs_per_interval_hold() -> None:
    """requestsPerSecond spaces the judge's requests (each pair takes two); maxPairsPerInterval leaves the
    rest unjudged; offer never waits (it is not a coroutine) and the queue is bounded."""
    async with judge_server() as server:
        spec = judge_spec(f"{server.url}/v1", rate={"requestsPerSecond": 20, "maxPairsPerInterval": 6},
                          concurrency=4)
        judge = make_judge(spec, interval_s=3600)
        builder = TallyBuilder()
        async with running(judge):
            for i in range(30):
                judge.offer(pair(i, good(i), good(i)), builder.add)  # returns at once: it is not a coroutine
            await eventually(lambda: judge.stats.judged == 6, limit=20, what="6 judged pairs")
        assert judge.stats.capped == 24
        assert judge.stats.requests == 12 and server.stats.requests == 12
        # The cap: reserved start times 1/rate apart, and no request started before its reserved time.
        reserved = sorted(r for r, _ in judge.stats.started_at)
        assert min(b - a for a, b in itertools.pairwise(reserved)) >= 1 / 20 - 1e-9
        assert all(actual >= r for r, actual in judge.stats.started_at)
        assert builder.tally().counts["llm-judge"].candidate_pairs == 6

        # A judge that takes longer than the traffic: the queue holds 4 x concurrency, the rest is capped.
        slow = make_judge(judge_spec(f"{server.url}/v1", rate={"requestsPerSecond": 0.01}, concurrency=1))
        for i in range(100):
            slow.offer(pair(i, good(i), good(i)), builder.add)  # no worker runs: nothing is taken off the queue
        assert slow.stats.capped == 96
        await slow.model.aclose()


async def test_a_failed_candidate_answer_is_a_loss_without_asking() -> None:
    async with judge_server() as server:
        judge = make_judge(judge_spec(f"{server.url}/v1"))
        got: list[PairResult] = []
        judge.offer(pair(0, good(0), "", status=500), got.append)
        assert [r.agrees for r in got] == [{ComparatorName.llm_judge: False}]
        assert server.stats.requests == 0
        await judge.model.aclose()


async def test_through_mosquitto_the_output_source_tallies_the_judge(mosquitto: MosquittoBroker) -> None:
    """Events through a real broker: the source pairs them, the judge scores the candidate's pairs in the
    background next to the lexical comparators, and the verdict fails a candidate that loses most pairs."""
    async with judge_server() as server:
        spec = judge_spec(f"{server.url}/v1")
        comparators = build_comparators([Comparator(name=ComparatorName.token_f1, threshold=0.6)])
        source = MqttOutputSource(mosquitto.url, "shadowctl/outputs/ns/chat/+", comparators, pair_ttl_s=30,
                                  expect_baseline=False, model_judge=make_judge(spec))
        task = asyncio.create_task(source.run())
        try:
            await asyncio.wait_for(source.subscribed.wait(), 10)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
                for i in range(80):
                    p = pair(i, good(i), bad(i) if i % 5 else good(i))  # 64 worse answers, 16 as good
                    await pub.publish("shadowctl/outputs/ns/chat/primary", p.primary.to_json(), qos=1)
                    await pub.publish("shadowctl/outputs/ns/chat/candidate", p.other.to_json(), qos=1)
            await eventually(lambda: source.snapshot().judge["judged"] == 80, limit=60,  # type: ignore[index]
                             what="80 judged pairs")
        finally:
            await cancel_and_wait(task)
        counts = source.snapshot().tally.counts
        assert counts["llm-judge"].candidate_pairs == 80
        sim = SimJudge()
        expected = sum(1 for i in range(80) if i % 5 == 0 or abs(
            sim.quality(QUESTIONS[i % 40], bad(i)) - sim.quality(QUESTIONS[i % 40], good(i))) < sim.tie_margin)
        assert 16 <= expected <= 20  # a drifted answer may come close to the reference
        assert counts["llm-judge"].candidate_agree == expected
        assert counts["token-f1"].candidate_pairs == 80
        assert _verdict(source.snapshot().tally) is Verdict.failed


def test_the_judge_s_secret_is_named_for_rbac_secrets() -> None:
    """`shadowctl rbac secrets` covers the judge's API key Secret (its field named)."""
    from shadowctl.policy.model import ShadowPolicy
    from shadowctl.policy.secret_refs import secret_refs
    from shadowctl.sources.llmjudge import judge_for_policy

    doc = {
        "apiVersion": "shadowctl.dev/v1alpha1", "kind": "ShadowPolicy", "metadata": {"name": "chat", "namespace": "llm"},
        "spec": {"target": {"tap": {"service": "chat", "rewrite": {"model": "chat-lora"}}},
                 "shadow": {"mode": "tap", "mirrorPercent": 20},
                 "analysis": {"metrics": [], "outputs": {
                     "mqtt": {"broker": "mqtt://mosquitto:1883"},
                     "comparators": [{"name": "token-f1"}, {"name": "llm-judge", "judge": {
                         "url": "http://judge:8000/v1", "model": "judge", "apiKeySecret": "judge-key/token",
                         "prompt": {"configMapRef": {"name": "judge-prompt-5fk2", "key": "judge.txt"}}}}]}}}}
    policy = ShadowPolicy.model_validate(doc)
    assert ("judge-key", "spec.analysis.outputs.comparators[1].judge.apiKeySecret") in secret_refs(policy)
    judge = judge_for_policy(policy, None)
    assert judge is not None and judge.spec.min_win_or_tie == 0.45


def _example(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((Path(__file__).resolve().parents[1] / "policies" / name).read_text())
    return loaded


async def test_a_judge_that_keeps_failing_is_named_in_the_verdict(mosquitto: MosquittoBroker) -> None:
    """Through the Analyzer, the controller's OutputHub and the real MQTT output source built from a policy whose
    judge listens nowhere (a closed port): the llm-judge's evidence says the judge gave no verdict on any of the
    pairs it was asked about, with its last error, instead of "no paired candidate answers yet"."""
    doc = _example("chat-paired-latency.yaml")
    doc["spec"]["analysis"]["metrics"] = []
    outputs = doc["spec"]["analysis"]["outputs"]
    outputs["mqtt"] = {"broker": mosquitto.url, "topic": "shadowctl/outputs/llm/chat/+"}
    outputs["minPairs"] = 5
    dead = f"http://127.0.0.1:{free_port()}/v1"
    outputs["comparators"] = [{"name": "llm-judge", "judge": {
        "url": dead, "model": "judge", "prompt": {"text": DEFAULT_JUDGE_PROMPT}, "timeout": "2s",
        "rate": {"requestsPerSecond": 100}}}]
    policy = ShadowPolicy.model_validate(doc)
    hub = OutputHub(lambda p: MqttOutputSource.from_policy(p, model_judge=judge_for_policy(p, None)))
    analyzer = Analyzer(None, hub)
    since = 1_000.0
    state = RolloutState(phase=Phase.shadowing, phase_started_at=since, rollout_started_at=since, candidate="v2")
    try:
        first = await analyzer.look(policy, state, since + 30)  # starts the source
        [before] = [r.to_record() for r in first.verdict.results if r.name == "agreement/llm-judge"]
        assert "no paired candidate answers yet" in before.model_dump_json()  # nothing offered yet: nothing failed
        source = hub._entries[policy.key].source
        assert isinstance(source, MqttOutputSource)
        await eventually(lambda: source.subscribed.is_set(), what="the source subscribed")
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
            for i in range(5):
                p = pair(i, good(i), bad(i))
                for e in (p.primary, p.other):
                    e = e.model_copy(update={"service": "llm/chat"})
                    await pub.publish(f"shadowctl/outputs/llm/chat/{e.variant.value}", e.to_json(), qos=1)
        await eventually(lambda: (source.snapshot().judge or {}).get("failed") == 5, limit=30,
                         what="5 pairs the judge failed")
        verdict = (await analyzer.look(policy, state, since + 60)).verdict
    finally:
        await hub.close()
    assert verdict.outcome is Verdict.nodata
    [record] = [r.to_record() for r in verdict.results if r.name == "agreement/llm-judge"]
    text = record.model_dump_json()
    assert "the judge model gave no verdict on any of the 5 pair(s) it was asked about" in text, text
    assert f"judge {dead}/chat/completions" in text, text  # the last error names the endpoint
    assert "no paired candidate answers yet" not in text


async def test_the_controller_reads_the_judge_prompt_with_the_generated_role(kube_env: KubeEnv,
                                                                              tmp_path: Path) -> None:
    """On the real API server with RBAC: `shadowctl rbac configmaps` names the judge's prompt ConfigMap (the one
    generator for prompt versions and judge prompts); before its Role is applied the controller's
    ServiceAccount is refused (no verdict: no data), after it the judge's template is the ConfigMap's text;
    another ConfigMap stays refused."""
    doc = _example("chat-paired-latency.yaml")
    outputs = doc["spec"]["analysis"]["outputs"]
    outputs["comparators"] = [{"name": "llm-judge", "judge": {
        "url": "http://judge.llm:8000/v1", "model": "judge",
        "prompt": {"configMapRef": {"name": "judge-prompt-7h2k9", "key": "judge.txt"}}}}]
    policy_file = tmp_path / "policy.yaml"
    await asyncio.to_thread(policy_file.write_text, yaml.safe_dump(doc))
    policy = ShadowPolicy.model_validate(doc)
    namespace = policy.metadata.namespace
    text = DEFAULT_JUDGE_PROMPT.replace("serves the user better", "answers the ticket better")
    for name, body in (("judge-prompt-7h2k9", text), ("judge-prompt-old", DEFAULT_JUDGE_PROMPT)):
        kube_env.put_object(CONFIG_MAP, {"apiVersion": "v1", "kind": "ConfigMap",
                                         "metadata": {"name": name, "namespace": namespace},
                                         "data": {"judge.txt": body}})

    printed = CliRunner().invoke(app, ["rbac", "configmaps", str(policy_file)])
    assert printed.exit_code == 0, printed.output
    roles = list(yaml.safe_load_all(printed.stdout))
    assert roles[0]["metadata"]["namespace"] == namespace
    assert roles[0]["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"],
                                  "resourceNames": ["judge-prompt-7h2k9"]}]

    kube = await KubeClient.connect(kubeconfig=kube_env.service_account_kubeconfig(
        tmp_path / "sa", "shadowctl", "shadowctl"))
    try:
        refused = judge_for_policy(policy, kube)
        assert refused is not None
        with pytest.raises(JudgeCallFailed, match=rf"cannot read ConfigMap {namespace}/judge-prompt-7h2k9"):
            await refused.template()
        await refused.model.aclose()

        admin = kube_env.direct_kubeconfig(tmp_path / "admin")
        applied = await asyncio.to_thread(subprocess.run, [str(find_binaries().kubectl), "--kubeconfig", str(admin),
                                                          "apply", "-f", "-"], input=printed.stdout,
                                          capture_output=True, text=True, timeout=60, check=False)
        assert applied.returncode == 0, applied.stderr

        async def reads() -> str | None:
            judge = judge_for_policy(policy, kube)  # a fresh template cache each try
            assert judge is not None
            try:
                return await judge.template()
            except JudgeCallFailed:
                return None  # RBAC reaches the authorizer a moment after it is stored
            finally:
                await judge.model.aclose()

        got = None
        for _ in range(100):
            got = await reads()
            if got is not None:
                break
            await asyncio.sleep(0.1)
        assert got == text

        other = judge_for_policy(ShadowPolicy.model_validate(_with_judge_map(doc, "judge-prompt-old")), kube)
        assert other is not None
        with pytest.raises(JudgeCallFailed, match="cannot read ConfigMap"):
            await other.template()
        await other.model.aclose()
    finally:
        await kube.close()


def _with_judge_map(doc: dict[str, Any], name: str) -> dict[str, Any]:
    changed = copy.deepcopy(doc)
    changed["spec"]["analysis"]["outputs"]["comparators"][0]["judge"]["prompt"]["configMapRef"]["name"] = name
    return changed
