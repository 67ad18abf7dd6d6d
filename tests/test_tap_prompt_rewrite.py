"""Prompt and parameter rewrites (#18 item 1): route settings v2 through real taps and a real Mosquitto.

As tests/test_tap_rewrite.py: nothing is mocked. The controller's side is :class:`TapRouter` publishing and
confirming settings; the taps are the real proxy following them (two replicas of the primary's tap in this
process); the upstream is the OpenAI stub (it records every request's bytes) or the simulated vLLM server (its
answers depend on the whole prompt, system message included); the output events come back over the broker.
The prompts' ConfigMaps are read on the real API server in tests/test_prompt_configmaps.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from openai_stub import OpenAIStub
from tap_helpers import eventually
from test_tap_rewrite import POLICY, events, router, two_taps

from shadowctl.compare.events import Variant
from shadowctl.compare.prompts import prompt_digest
from shadowctl.compare.routing import Parameters, PromptRewrite, Rewrite, parse_setting
from shadowctl.policy.prompts import PromptApply
from shadowctl.routers.base import RouteState
from shadowctl.routers.tap import CandidateShape, setting_for
from shadowctl.sim.modelserver import ModelKnobs, SimModelServer

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

SYSTEM_V1 = "You are a concise assistant. Answer in English."
SYSTEM_V2 = "You are a careful assistant.\nAnswer in English; cite \"sources\" — briefly."
TEMPLATE_V1 = "Summarize the following text:\n\n{{input}}"
TEMPLATE_V2 = "Summarize in one sentence ({{input}} is the text):\n<<<{{input}}>>>"


def prompt(apply: PromptApply, primary: str, candidate: str) -> PromptRewrite:
    return PromptRewrite(apply=apply, primary=primary, candidate=candidate,
                         digest=prompt_digest(apply, primary, candidate))


def compact(data: Any) -> bytes:
    """What the tap sends: one compact serialization, non-ASCII kept."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def chat(system: str | None, user: str, **extra: Any) -> bytes:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}]
    return json.dumps({"model": "base", "messages": messages, **extra}).encode()  # the client's spacing


async def post(url: str, body: bytes, request_id: str, path: str = "/v1/chat/completions") -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        return await client.post(url + path, content=body,
                                 headers={"content-type": "application/json", "x-request-id": request_id})


async def test_replace_system_rewrites_only_requests_that_carry_the_primary_prompt(mosquitto: MosquittoBroker,
                                                                                  stub: OpenAIStub) -> None:
    """replaceSystem, mirror 100%: a request carrying the primary's system prompt is copied with that message
    replaced by the candidate's (byte-checked: parsed once, compact, only messages changed); the user's request
    and answer are untouched; the copy's event is variant candidate with the user's prompt hash (so it pairs).
    A request with another system prompt, or none, is not copied (not_rewritable): it is not this rollout's.
    A primary text "" matches requests without a system prompt, and the candidate's is inserted first."""
    shape = CandidateShape(Rewrite(prompt=prompt(PromptApply.replace_system, SYSTEM_V1, SYSTEM_V2)), sticky=True)
    async with two_taps(stub.url, mosquitto) as (a, _), events(mosquitto) as seen:
        await router(mosquitto, shape).apply(RouteState(100, 0, 100.0))
        sent = chat(SYSTEM_V1, "Why is the sky blue? \u00e9\U0001f600", temperature=0.7)
        answer = await post(a.url, sent, "req-1")
        assert answer.status_code == 200 and "Paris" in answer.text
        await eventually(lambda: len(stub.seen) == 2, what="the copy reached the upstream")
        user = next(s for s in stub.seen if "x-shadowctl-shadow" not in s.headers)
        copy = next(s for s in stub.seen if s.headers.get("x-shadowctl-shadow") == "1")
        assert user.body == sent
        expected = json.loads(sent)
        expected["messages"][0] = {"role": "system", "content": SYSTEM_V2}
        assert copy.body == compact(expected)
        assert int(copy.headers["content-length"]) == len(copy.body)
        await eventually(lambda: len(seen) == 2, what="both events")
        by_variant = {e.variant: e for e in seen}
        assert by_variant[Variant.candidate].shadow and by_variant[Variant.candidate].request_id == "req-1"
        assert by_variant[Variant.candidate].prompt_hash == by_variant[Variant.primary].prompt_hash
        assert by_variant[Variant.candidate].model == "base"  # a prompt-only rewrite keeps the user's model

        stub.seen.clear()
        for i, other in enumerate([chat("You are a pirate.", "Hi"), chat(None, "Hi")]):
            assert (await post(a.url, other, f"other-{i}")).status_code == 200
        await eventually(lambda: len(stub.seen) == 2, what="the users' requests")
        assert all("x-shadowctl-shadow" not in s.headers for s in stub.seen)
        async with httpx.AsyncClient(trust_env=False) as client:
            page = (await client.get(a.url + "/metrics")).text
        assert 'shadowctl_tap_mirror_requests_total{outcome="not_rewritable"} 2.0' in page

        # "" as the primary: requests without a system prompt get the candidate's inserted.
        stub.seen.clear()
        await router(mosquitto, CandidateShape(Rewrite(prompt=prompt(PromptApply.replace_system, "", SYSTEM_V2)),
                                               sticky=True)).apply(RouteState(100, 0, 100.0))
        bare = chat(None, "Hi")
        assert (await post(a.url, bare, "bare-1")).status_code == 200
        await eventually(lambda: len(stub.seen) == 2, what="the copy")
        copy = next(s for s in stub.seen if s.headers.get("x-shadowctl-shadow") == "1")
        inserted = json.loads(bare)
        inserted["messages"].insert(0, {"role": "system", "content": SYSTEM_V2})
        assert copy.body == compact(inserted)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "streamed"])
async def test_template_and_parameters_in_the_canary_share(mosquitto: MosquittoBroker, stub: OpenAIStub,
                                                           stream: bool) -> None:
    """template + parameters, candidate 100% of live requests: the user's input is taken out of the primary's
    template and rendered into the candidate's (every placeholder), temperature/top_p/max_tokens set (or
    max_completion_tokens where the request uses it), byte-checked; the completions endpoint's prompt alike.
    A user message that is not the primary's template rendered stays with the primary, untouched."""
    rewrite = Rewrite(prompt=prompt(PromptApply.template, TEMPLATE_V1, TEMPLATE_V2),
                      parameters=Parameters(temperature=0.2, top_p=0.9, max_tokens=64))
    text = "The quarterly report says revenue grew {{not a placeholder}} by 4% — \"mostly\" abroad."
    async with two_taps(stub.url, mosquitto) as (a, b):
        await router(mosquitto, CandidateShape(rewrite, sticky=True)).apply(RouteState(0, 100, None))
        sent = chat("sys", TEMPLATE_V1.replace("{{input}}", text), temperature=1.0, stream=stream,
                    max_completion_tokens=500)
        assert (await post(a.url, sent, "t-1")).status_code == 200
        expected = json.loads(sent)
        expected["messages"][1]["content"] = TEMPLATE_V2.replace("{{input}}", text)
        expected |= {"temperature": 0.2, "top_p": 0.9, "max_completion_tokens": 64}
        assert stub.seen[-1].body == compact(expected)
        assert int(stub.seen[-1].headers["content-length"]) == len(stub.seen[-1].body)

        completion = json.dumps({"model": "base", "prompt": TEMPLATE_V1.replace("{{input}}", text)}).encode()
        assert (await post(b.url, completion, "t-2", "/v1/completions")).status_code == 200
        assert stub.seen[-1].body == compact({"model": "base", "prompt": TEMPLATE_V2.replace("{{input}}", text),
                                              "temperature": 0.2, "top_p": 0.9, "max_tokens": 64})

        plain = chat(None, "Summarize this: no template here")
        assert (await post(a.url, plain, "t-3")).status_code == 200
        assert stub.seen[-1].body == plain  # not rewritable: the primary answers it as it was sent


async def test_the_simulated_server_answers_by_the_system_prompt(mosquitto: MosquittoBroker) -> None:
    """The simulated vLLM server's answer depends on the system prompt: through the tap the user gets the answer
    to the primary's prompt, the candidate's event holds the answer to the candidate's, and they differ; a
    replica of the primary asked with the primary's prompt answers alike (deterministic without noise)."""
    server = SimModelServer("chat", knobs=ModelKnobs(time_scale=0.01, ttft_median_s=0.1, tpot_median_s=0.01,
                                                     output_words_median=20))
    url = await server.start()
    try:
        shape = CandidateShape(Rewrite(prompt=prompt(PromptApply.replace_system, SYSTEM_V1, SYSTEM_V2)),
                               sticky=True)
        async with two_taps(url, mosquitto) as (a, _), events(mosquitto) as seen:
            await router(mosquitto, shape).apply(RouteState(100, 0, 100.0))
            answer = await post(a.url, chat(SYSTEM_V1, "Explain photosynthesis.", model="chat"), "sim-1")
            assert answer.status_code == 200
            direct = await post(url, chat(SYSTEM_V2, "Explain photosynthesis.", model="chat"), "sim-2")
            await eventually(lambda: len(seen) == 2, what="both events")
        candidate = next(e for e in seen if e.variant is Variant.candidate)
        user_text = answer.json()["choices"][0]["message"]["content"]
        assert candidate.output == direct.json()["choices"][0]["message"]["content"] != user_text
    finally:
        await server.stop()


def release_parser(tmp_path: Path, commit: str) -> types.ModuleType:
    """shadowctl/compare/routing.py as of `commit`: a tap of that release."""
    source = subprocess.run(["git", "show", f"{commit}:shadowctl/compare/routing.py"], capture_output=True,
                            check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    module = types.ModuleType("release_routing")
    sys.modules["release_routing"] = module
    try:
        exec(compile(source, str(tmp_path / "release_routing.py"), "exec"), module.__dict__)
    finally:
        del sys.modules["release_routing"]
    return module


def test_a_tap_of_the_first_v2_release_refuses_a_prompt_rewrite_but_reads_a_model_rewrite(tmp_path: Path) -> None:
    """A tap that knows v2 as first released (2f486c8: rewrite.model only) refuses a setting with a prompt,
    parameters, a baseline share or a budget (it falls back: never half-applied), and still reads a model-only
    rewrite (the new fields are left out where unset); the current parser reads every one back equal."""
    old = release_parser(tmp_path, "2f486c8")
    base = {"policy": POLICY, "generation": 2, "candidate_url": None, "issued_at": 1e9, "interval_seconds": 10}
    model_only = setting_for(RouteState(100, 0, 10.0), shape=CandidateShape(Rewrite(model="lora"), sticky=True),
                             **base)  # type: ignore[arg-type]
    assert old.parse_setting(model_only.to_json()).rewrite.model == "lora"
    for rewrite in (Rewrite(prompt=prompt(PromptApply.template, TEMPLATE_V1, TEMPLATE_V2)),
                    Rewrite(model="lora", parameters=Parameters(temperature=0.0))):
        new = setting_for(RouteState(100, 0, 10.0), shape=CandidateShape(rewrite), **base)  # type: ignore[arg-type]
        assert parse_setting(new.to_json()) == new
        with pytest.raises(old.MalformedRouteMessage):
            old.parse_setting(new.to_json())


def test_a_setting_whose_prompt_digest_does_not_match_its_texts_is_refused() -> None:
    """The digest travels with the texts: a setting whose texts were altered on the way is not understood."""
    good = setting_for(RouteState(100, 0, 10.0), policy=POLICY, generation=1, candidate_url=None, issued_at=1e9,
                       interval_seconds=10,
                       shape=CandidateShape(Rewrite(prompt=prompt(PromptApply.replace_system, "a", "b"))))
    data = json.loads(good.to_json())
    data["rewrite"]["prompt"]["candidate"] = "c"
    with pytest.raises(Exception, match="digest"):
        parse_setting(json.dumps(data))
    data["rewrite"]["prompt"] |= {"apply": "template", "primary": "no placeholder", "candidate": "{{input}}",
                                  "digest": prompt_digest(PromptApply.template, "no placeholder", "{{input}}")}
    with pytest.raises(Exception, match="exactly once"):
        parse_setting(json.dumps(data))
