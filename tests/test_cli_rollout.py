"""`shadowctl apply|get|status|describe|promote|rollback|pause|resume|retry` against a real kube-apiserver.

The CLI runs in a thread (CliRunner is synchronous) and reaches the session's local control plane
(tests/conftest_kube.py) through the fault proxy, with the admin's bearer token. Nothing is mocked:
the kube client, the API server (resourceVersions, 409s from a real second writer, the status
subresource, RBAC's 403s, 401s for a bad token) and, for `--wait`, the real reconciler (with the
metric-source double of tests/controller_helpers.py at its port) are the real parts. The proxy
injects only what a real server does not do on demand: the 409s of the retry-count test and the
404 of a CRD that is not installed (uninstalling it would delete the session's policies).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import Result
from conftest_kube import KubeEnv, eventually
from controller_helpers import POLICY, Harness
from typer.testing import CliRunner

from shadowctl.cli import rollout_cmds, view_cmds
from shadowctl.cli.app import app
from shadowctl.controller.clock import iso
from shadowctl.controller.commands import COMMAND_ANNOTATION
from shadowctl.kube import SHADOW_POLICY, KubeClient, ResourceRef
from shadowctl.policy.status import MetricEvidence, Phase, PolicyStatus

Cli = Callable[..., Awaitable[Result]]
runner = CliRunner()
NOW = 1_800_000_000.0
REF = ResourceRef(SHADOW_POLICY, "chat", "llm")


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollout_cmds, "POLL_SECONDS", 0.02)
    monkeypatch.setattr(view_cmds, "POLL_SECONDS", 0.02)


@pytest.fixture
def kubeconfig(kube_env: KubeEnv, tmp_path: Path) -> Path:
    return kube_env.kubeconfig(tmp_path / "kubeconfig", namespace="team-a")


@pytest.fixture
def cli(kubeconfig: Path) -> Cli:
    async def invoke(*args: str, config: Path | None = None) -> Result:
        argv = [*args, "--kubeconfig", str(config or kubeconfig)]
        result = await asyncio.to_thread(runner.invoke, app, argv, env={"COLUMNS": "250"})
        assert "Traceback" not in result.output, result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    return invoke


def write_policy(path: Path, **changes: Any) -> Path:
    doc: dict[str, Any] = yaml.safe_load(POLICY)
    meta = changes.pop("metadata", None)
    if meta is not None:
        doc["metadata"] = meta
    doc["spec"].update(changes)
    path.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None), encoding="utf-8")
    return path


def metric(name: str, outcome: str, sentence: str, **extra: Any) -> dict[str, Any]:
    """One metric's evidence as `.status` stores it (policy.status.MetricEvidence), written raw as another writer would."""
    return {
        "name": name, "outcome": outcome, "statistic": "p95", "direction": "increase", "margin": "10%",
        "critical": True, "method": "sequential", "samples": {"primary": 1200.0, "candidate": 1180.0},
        "primary": 0.41, "candidate": 0.43, "effect": 1.05, "effectScale": "ratio", "interval": [0.98, 1.12],
        "alpha": 0.05, "beta": 0.05, "crossed": "upper", "threshold": 1.1, "sentence": sentence, **extra,
    }


def progressing_status(**overrides: Any) -> dict[str, Any]:
    """A `.status` as the controller writes it: canary step 1 of 2, with a verdict and history."""
    history = [
        {"at": NOW - 600, "from": "Pending", "to": "Shadowing", "reason": "rollout of chat-v2 started"},
        {"at": NOW - 300, "from": "Shadowing", "to": "Progressing",
         "reason": "shadow analysis passed: every metric within its margin"},
    ]
    status: dict[str, Any] = {
        "observedGeneration": 1, "phase": "Progressing", "canaryWeight": 10, "step": 1,
        "message": "shadow analysis passed: every metric within its margin",
        "rollout": {"phase": "Progressing", "step": 0, "canaryWeight": 10, "candidate": "chat-v2",
                    "rolloutGeneration": 1, "history": history},
        "lastTick": "2027-01-15T08:00:00Z",
        "lastVerdict": {
            "outcome": "continue", "method": "sequential", "reason": "not enough evidence yet",
            "at": "2027-01-15T08:00:00Z",
            "metrics": [
                metric("ttft-p95", "continue", "candidate p95 TTFT is 5% higher, within the 10% margin so far"),
                metric("errors", "pass", "candidate error rate is at most +0.2pp worse (margin 1pp)",
                       effect=0.001, effectScale="difference", interval=[-0.002, 0.002], primary=0.01,
                       candidate=0.011),
            ],
        },
        "routes": {"primaryWeight": 90, "candidateWeight": 10, "mirrorPercent": None},
        "outputs": {"comparators": {"token-f1": {"candidatePairs": 200, "candidateAgree": 170,
                                                 "baselinePairs": 180, "baselineAgree": 171}},
                    "skippedPrimaryFailed": 3,
                    "disagreements": [{"requestId": "req-41", "comparators": ["token-f1"],
                                       "traceId": "4bf92f3577b34da6a3ce929d0e0e4736"},
                                      {"requestId": "req-42", "comparators": ["token-f1"]}]},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Reconciled",
                        "message": "the controller can act", "lastTransitionTime": "2027-01-15T07:50:00Z"}],
        "lastCommand": {"id": "abc123def456", "command": "resume", "at": "2027-01-15T07:55:00Z", "by": "ana",
                        "handledAt": "2027-01-15T07:55:10Z", "result": "Progressing"},
        "pairedLatency": {"phaseStartedAt": NOW - 600,
                          "ttft": {"pairs": 4, "sum": 0.4, "sumSq": 0.1, "sumLogPrimary": -2.0,
                                   "sumLogCandidate": -1.6, "errored": 2, "le": [-0.005, 0.0], "counts": [1, 1]}},
    }
    status.update(overrides)
    return status


async def put_policy(kube: KubeClient, status: dict[str, Any] | None = None, name: str = "chat") -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(POLICY)
    doc["metadata"]["name"] = name
    obj = await kube.create(SHADOW_POLICY, doc)
    if status is not None:
        obj = await kube.patch_status(ResourceRef(SHADOW_POLICY, name, "llm"), {"status": status})
    return obj


def annotation(env: KubeEnv, name: str = "chat") -> dict[str, Any] | None:
    obj = env.get_object(SHADOW_POLICY, "llm", name)
    assert obj is not None
    raw = (obj["metadata"].get("annotations") or {}).get(COMMAND_ANNOTATION)
    return json.loads(raw) if raw else None


# --------------------------------------------------------------------------- apply


async def test_apply_creates_then_unchanged_then_configured_keeping_status_and_annotations(
    cli: Cli, kube_env: KubeEnv, kube_client: KubeClient, tmp_path: Path
) -> None:
    file = write_policy(tmp_path / "chat.yaml")
    first = await cli("apply", "-f", str(file))
    assert first.exit_code == 0, first.output
    assert first.stdout == "shadowpolicy llm/chat created\n"
    created = kube_env.get_object(SHADOW_POLICY, "llm", "chat")
    assert created is not None and created["spec"]["canary"]["steps"] == [10, 50]

    again = await cli("apply", "-f", str(file))
    assert again.stdout == "shadowpolicy llm/chat unchanged\n"
    assert kube_env.get_object(SHADOW_POLICY, "llm", "chat") == created  # no write at all

    await kube_client.patch_status(REF, {"status": progressing_status()})
    await kube_client.patch_merge(REF, {"metadata": {"annotations": {"team.example/owner": "ml-infra"}}})
    write_policy(file, canary={"steps": [10, 30, 50], "stepDuration": "20s", "maxStepDuration": "300s"})
    changed = await cli("apply", "-f", str(file))
    assert changed.stdout == "shadowpolicy llm/chat configured\n"
    obj = kube_env.get_object(SHADOW_POLICY, "llm", "chat")
    assert obj is not None
    assert obj["spec"]["canary"]["steps"] == [10, 30, 50]
    assert obj["metadata"]["generation"] == 2
    assert obj["metadata"]["uid"] == created["metadata"]["uid"]
    assert obj["metadata"]["annotations"]["team.example/owner"] == "ml-infra"
    assert PolicyStatus.of(obj).phase is Phase.progressing


def statuses(env: KubeEnv, verb: str) -> list[int]:
    """The statuses the proxy answered for ``verb`` since the last reset_counts()."""
    return [r.status for r in list(env.request_log) if r.verb == verb]


async def answered(env: KubeEnv, verb: str, path_part: str) -> None:
    """Wait until the proxy has answered a ``verb`` request whose path contains ``path_part``."""

    def seen() -> bool:
        try:
            records = list(env.request_log)
        except RuntimeError:  # the proxy's thread appended meanwhile
            return False
        return any(r.verb == verb and path_part in r.path for r in records)

    await eventually(seen, every=0.005)


async def test_apply_retries_a_conflict(cli: Cli, kube_env: KubeEnv, tmp_path: Path) -> None:
    """The retry count: two 409s injected by the proxy, then the real write (the next test gets a real 409)."""
    file = write_policy(tmp_path / "chat.yaml")
    assert (await cli("apply", "-f", str(file))).exit_code == 0
    write_policy(file, progressDeadline="2h")
    kube_env.fail_next(2, status=409, verb="update")
    kube_env.reset_counts()
    result = await cli("apply", "-f", str(file))
    assert result.exit_code == 0, result.output
    assert result.stdout == "shadowpolicy llm/chat configured\n"
    assert kube_env.verb_counts["update"] == 3
    obj = kube_env.get_object(SHADOW_POLICY, "llm", "chat")
    assert obj is not None and obj["spec"]["progressDeadline"] == "2h"


async def test_apply_recomputes_after_a_real_second_writer(cli: Cli, kube_env: KubeEnv, tmp_path: Path) -> None:
    """Someone labels the policy between apply's read and its write: the API server refuses the stale
    resourceVersion (409), apply reads again and writes the file's spec with the other writer's label kept."""
    file = write_policy(tmp_path / "chat.yaml")
    assert (await cli("apply", "-f", str(file))).exit_code == 0
    write_policy(file, progressDeadline="2h")
    kube_env.reset_counts()
    kube_env.set_latency(2.0, verb="update")  # apply's PUT waits in the proxy: the second writer goes first
    invocation = asyncio.create_task(cli("apply", "-f", str(file)))
    await answered(kube_env, "get", "/shadowpolicies/chat")
    kube_env.patch(SHADOW_POLICY, "llm", "chat", {"metadata": {"labels": {"team.example/owner": "ml-infra"}}})
    result = await invocation
    assert result.exit_code == 0, result.output
    assert result.stdout == "shadowpolicy llm/chat configured\n"
    assert statuses(kube_env, "update") == [409, 200]
    obj = kube_env.get_object(SHADOW_POLICY, "llm", "chat")
    assert obj is not None and obj["spec"]["progressDeadline"] == "2h"
    assert obj["metadata"]["labels"] == {"team.example/owner": "ml-infra"}
    assert obj["metadata"]["generation"] == 2


async def test_apply_invalid_file_applies_nothing(cli: Cli, kube_env: KubeEnv, tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    write_policy(folder / "a-good.yaml", metadata={"name": "good", "namespace": "llm"})
    bad = write_policy(folder / "b-bad.yaml", canary={"steps": [50, 10]})
    result = await cli("apply", "-f", str(folder))
    assert result.exit_code == 1
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if "steps:" in text)
    assert f"{bad}:{line}:" in result.stderr
    assert "spec.canary.steps" in result.stderr
    assert "nothing was applied" in result.stderr
    assert kube_env.list_objects(SHADOW_POLICY) == []


async def test_apply_namespace_from_file_flag_or_context(
    cli: Cli, kube_env: KubeEnv, tmp_path: Path
) -> None:
    unnamespaced = write_policy(tmp_path / "plain.yaml", metadata={"name": "plain"})
    assert (await cli("apply", "-f", str(unnamespaced))).stdout == "shadowpolicy team-a/plain created\n"
    assert (await cli("apply", "-f", str(unnamespaced), "-n", "team-b")).stdout == \
        "shadowpolicy team-b/plain created\n"
    pinned = write_policy(tmp_path / "pinned.yaml")  # metadata.namespace: llm
    clash = await cli("apply", "-f", str(pinned), "-n", "team-b")
    assert clash.exit_code == 1
    line = next(i for i, text in enumerate(pinned.read_text().splitlines(), 1) if "namespace: llm" in text)
    assert f"{pinned}:{line}:" in clash.stderr
    assert "does not match the namespace given with -n ('team-b')" in clash.stderr
    assert kube_env.get_object(SHADOW_POLICY, "llm", "chat") is None
    assert kube_env.get_object(SHADOW_POLICY, "team-b", "chat") is None


def test_apply_parses_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Validation, the document sent and the position of a clashing namespace come from one parse.

    Spied, not mocked: every YAML parser PyYAML builds in Python starts with Reader.__init__, which is
    wrapped to record the text it is given and then runs as it is.
    """
    from shadowctl.cli import apply_cmd

    first = write_policy(tmp_path / "a.yaml", metadata={"name": "a", "namespace": "llm"})
    second = write_policy(tmp_path / "b.yaml", metadata={"name": "b"})
    parsed: list[Any] = []
    reader_init = yaml.reader.Reader.__init__

    def recording(self: yaml.reader.Reader, stream: Any) -> None:
        parsed.append(stream)
        reader_init(self, stream)

    monkeypatch.setattr(yaml.reader.Reader, "__init__", recording)
    items = apply_cmd.collect([tmp_path], None)
    assert [(i.name, i.namespace, i.doc["metadata"]) for i in items] == [
        ("a", "llm", {"name": "a", "namespace": "llm"}), ("b", "", {"name": "b"})]
    assert sorted(parsed) == sorted([first.read_text(), second.read_text()])

    parsed.clear()
    with pytest.raises(apply_cmd.CliError, match="nothing was applied"):
        apply_cmd.collect([first], "team-b")
    assert parsed == [first.read_text()]
    line = next(i for i, text in enumerate(first.read_text().splitlines(), 1) if "namespace: llm" in text)
    assert f"{first}:{line}:" in capsys.readouterr().err


def test_apply_refuses_what_the_loader_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A duplicate key is kept silently by plain YAML; apply refuses it with the loader's words, as validate does."""
    from shadowctl.cli import apply_cmd
    from shadowctl.cli.policy_files import load_policies
    from shadowctl.policy import PolicyError

    text = write_policy(tmp_path / "ok.yaml").read_text()
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text(text.replace("spec:\n", "spec:\n  trigger: manual\n  trigger: auto\n", 1), encoding="utf-8")
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- a\n- b\n", encoding="utf-8")
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    for file, says in ((duplicate, "duplicate key 'trigger'"), (not_a_mapping, "expected a mapping"),
                       (empty, "no ShadowPolicy document")):
        with pytest.raises(PolicyError) as loader:
            load_policies(file)
        with pytest.raises(apply_cmd.CliError, match=r"1 file\(s\) invalid; nothing was applied"):
            apply_cmd.collect([file], None)
        printed = capsys.readouterr().err.splitlines()
        assert printed == [str(p) for p in loader.value.problems] and says in printed[0]


# --------------------------------------------------------------------------- get, status, describe


async def test_get_table_json_and_all_namespaces(cli: Cli, kube_client: KubeClient) -> None:
    await put_policy(kube_client, progressing_status())
    await put_policy(kube_client, None, name="embed")
    table = await cli("get", "-n", "llm")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "STEP", "WEIGHT", "MIRROR", "VERDICT", "AGE"]
    chat = next(line.split() for line in lines if line.startswith("chat"))
    assert chat[:6] == ["chat", "Progressing", "1/2", "10%", "off", "continue"]
    embed = next(line.split() for line in lines if line.startswith("embed"))
    assert embed[:3] == ["embed", "Pending", "-"]

    one = json.loads((await cli("get", "chat", "-n", "llm", "-o", "json")).stdout)
    assert one["metadata"]["name"] == "chat" and one["status"]["lastVerdict"]["outcome"] == "continue"
    many = yaml.safe_load((await cli("get", "-n", "llm", "-o", "yaml")).stdout)
    assert many["kind"] == "List" and [i["metadata"]["name"] for i in many["items"]] == ["chat", "embed"]

    everywhere = await cli("get", "-A")
    assert everywhere.stdout.splitlines()[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert (await cli("get", "-n", "nowhere")).stderr.strip() == "No ShadowPolicies found in namespace nowhere."


async def test_status_shows_weights_and_every_metric_sentence(cli: Cli, kube_client: KubeClient) -> None:
    await put_policy(kube_client, progressing_status())
    result = await cli("status", "chat", "-n", "llm")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Progressing (step 1/2)" in out
    assert "primary 90% / candidate 10%" in out
    assert "Shadowing -> Progressing" in out and "shadow analysis passed" in out
    assert "candidate p95 TTFT is 5% higher, within the 10% margin so far" in out
    assert "candidate error rate is at most +0.2pp worse (margin 1pp)" in out
    ttft = next(line for line in out.splitlines() if line.lstrip().startswith("ttft-p95") and "continue" in line)
    assert "0.41" in ttft and "0.43" in ttft and "+5.0% [-2.0%, +12.0%]" in ttft and "1200 / 1180" in ttft
    errors = next(line for line in out.splitlines() if line.lstrip().startswith("errors") and "pass" in line)
    assert "+0.001 [-0.002, +0.002]" in errors


async def test_describe_shows_history_outputs_command_and_own_events(cli: Cli, kube_client: KubeClient) -> None:
    obj = await put_policy(kube_client, progressing_status())
    await kube_client.create_event(obj, reason="Progressing", message="Progressing step 1: shadow analysis passed")
    other = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
             "metadata": {"name": "chat", "namespace": "llm"}}
    await kube_client.create_event(other, reason="Unrelated", message="not about the policy")
    result = await cli("describe", "chat", "-n", "llm")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Canary:       steps 10%, 50%, each 20s" in out
    assert "Pending -> Shadowing: rollout of chat-v2 started" in out
    assert f"{iso(NOW - 300)}" in out  # transition time, absolute and relative
    assert "candidate p95 TTFT is 5% higher, within the 10% margin so far" in out
    assert "token-f1: candidate 170/200 agree (85.0%); baseline 171/180 (95.0%), relative 0.89" in out
    assert "skipped (the primary failed): 3" in out
    assert "request req-41: token-f1; trace 4bf92f3577b34da6a3ce929d0e0e4736" in out  # to the user's trace
    assert "request req-42: token-f1; no trace (the request had no traceparent)" in out
    assert f"Paired latency (shadow phase from {iso(NOW - 600)}):" in out
    assert ("ttft: 4 pairs, geometric-mean ratio candidate/primary 1.105 (geometric means 0.6703 vs 0.6065), "
            "3 slower on the candidate; left out: 2 with a failed side") in out
    assert "Last command: resume (id abc123def456) by ana" in out
    assert "Progressing step 1: shadow analysis passed" in out
    assert "Unrelated" not in out


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize(
    ("args", "phase", "sent"),
    [
        (["promote"], "WaitingPromotion", "promote"),
        (["promote", "--full"], "Progressing", "promote-full"),
        (["rollback"], "Progressing", "rollback"),
        (["rollback"], "Succeeded", "rollback"),
        (["pause"], "Shadowing", "pause"),
        (["resume"], "Paused", "resume"),
        (["retry"], "RolledBack", "retry"),
    ],
)
async def test_command_writes_annotation_with_fresh_id(
    cli: Cli, kube_env: KubeEnv, kube_client: KubeClient, args: list[str], phase: str, sent: str
) -> None:
    await put_policy(kube_client, progressing_status(phase=phase))
    first = await cli(*args, "chat", "-n", "llm")
    assert first.exit_code == 0, first.output
    verb = " ".join(args)
    assert first.stdout == f"{verb} requested for llm/chat (phase {phase}); the controller acts at its next tick\n"
    written = annotation(kube_env)
    assert written is not None and written["command"] == sent and len(written["id"]) == 12
    second = await cli(*args, "chat", "-n", "llm")
    assert second.exit_code == 0
    rewritten = annotation(kube_env)
    assert rewritten is not None and rewritten["id"] != written["id"]
    assert "replaces" in second.stderr and written["id"] in second.stderr
    obj = kube_env.get_object(SHADOW_POLICY, "llm", "chat")
    assert obj is not None and obj["metadata"]["generation"] == 1  # a command does not restart the analysis


@pytest.mark.parametrize(
    ("args", "phase", "says"),
    [
        (["promote"], "Progressing", "--full"),
        (["resume"], "Progressing", "not Paused"),
        (["retry"], "Shadowing", "still running"),
        (["pause"], "Succeeded", "can be paused"),
        (["rollback"], "RolledBack", "nothing to roll back"),
        (["promote", "--full"], "Succeeded", "already serves all traffic"),
    ],
)
async def test_command_refused_in_a_phase_where_it_cannot_work(
    cli: Cli, kube_env: KubeEnv, kube_client: KubeClient, args: list[str], phase: str, says: str
) -> None:
    await put_policy(kube_client, progressing_status(phase=phase))
    result = await cli(*args, "chat", "-n", "llm")
    assert result.exit_code == 1
    assert says in result.stderr and f"llm/chat is {phase}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert annotation(kube_env) is None


async def test_command_checks_the_phase_again_after_a_real_conflict(
    cli: Cli, kube_env: KubeEnv, kube_client: KubeClient
) -> None:
    """The rollout ends between pause's read and its conditional patch: the API server refuses the stale
    resourceVersion (409); pause reads again, sees Succeeded and refuses instead of writing."""
    await put_policy(kube_client, progressing_status(phase="Shadowing"))
    kube_env.reset_counts()
    kube_env.set_latency(2.0, verb="patch")  # the command's patch waits in the proxy: the controller goes first
    invocation = asyncio.create_task(cli("pause", "chat", "-n", "llm"))
    await answered(kube_env, "get", "/shadowpolicies/chat")
    kube_env.patch_status(SHADOW_POLICY, "llm", "chat", {"status": {"phase": "Succeeded"}})
    result = await invocation
    assert result.exit_code == 1
    assert "llm/chat is Succeeded" in result.stderr and "can be paused" in result.stderr
    assert statuses(kube_env, "patch") == [409]
    assert statuses(kube_env, "get") == [200, 200]
    assert annotation(kube_env) is None


async def test_promote_wait_with_the_real_controller(
    cli: Cli, kube_env: KubeEnv, kube_client: KubeClient
) -> None:
    h = Harness(kube_env, kube_client)
    await h.setup(promotion="manual")
    assert await h.run_until({"WaitingPromotion", "RolledBack"}) == "WaitingPromotion"

    shown = await cli("status", "chat", "-n", "llm")
    verdict = (await h.status()).last_verdict
    assert "WaitingPromotion (step 2/2)" in shown.stdout and "primary 50% / candidate 50%" in shown.stdout
    for m in verdict.metrics:
        assert m.sentence in shown.stdout

    invocation = asyncio.create_task(cli("promote", "chat", "-n", "llm", "--wait", "--timeout", "30s"))
    while not invocation.done():
        await h.tick()
        await asyncio.sleep(0.02)
    result = invocation.result()
    assert result.exit_code == 0, result.output
    # The reconciler logs on this thread while CliRunner captures stdout: keep the CLI's own lines.
    mine = [line for line in result.stdout.splitlines() if line.startswith("promote ")]
    assert mine == [
        "promote requested for llm/chat (phase WaitingPromotion); the controller acts at its next tick",
        "promote carried out for llm/chat: phase Promoting",
    ]
    assert (await h.status()).last_command.command == "promote"


async def test_wait_times_out_without_a_controller(cli: Cli, kube_client: KubeClient) -> None:
    await put_policy(kube_client, progressing_status())
    result = await cli("pause", "chat", "-n", "llm", "--wait", "--timeout", "100ms")
    assert result.exit_code == 1
    assert "did not carry out the command" in result.stderr and "shadowctl run" in result.stderr


# --------------------------------------------------------------------------- errors


async def test_not_found_forbidden_unauthorized_and_missing_crd_are_one_line(
    cli: Cli, kube_env: KubeEnv, tmp_path: Path
) -> None:
    for args in (["get", "nope"], ["describe", "nope"], ["status", "nope"], ["rollback", "nope"]):
        result = await cli(*args, "-n", "llm")
        assert result.exit_code == 1
        assert result.stderr == "error: shadowpolicy llm/nope not found\n", args

    # A ServiceAccount no role is bound to: the real RBAC authorizer refuses, in its own words.
    nobody = kube_env.service_account_kubeconfig(tmp_path / "nobody", "llm", "nobody")
    forbidden = await cli("get", "-n", "llm", config=nobody)
    assert forbidden.exit_code == 1
    assert forbidden.stderr.startswith("error: forbidden (403): shadowpolicies.shadowctl.dev is forbidden: "
                                       'User "system:serviceaccount:llm:nobody" cannot list resource '
                                       '"shadowpolicies" in API group "shadowctl.dev" in the namespace "llm"')
    assert forbidden.stderr.count("\n") == 1
    refused = await cli("pause", "chat", "-n", "llm", config=nobody)
    assert refused.exit_code == 1 and 'cannot get resource "shadowpolicies"' in refused.stderr

    # A token the API server did not issue: 401 from its authenticator.
    stranger = kube_env.kubeconfig(tmp_path / "stranger", token="not-a-token-the-server-issued")
    unauthorized = await cli("get", "-n", "llm", config=stranger)
    assert unauthorized.exit_code == 1
    assert unauthorized.stderr == ("error: the cluster refused the credentials (401 Unauthorized): check the user "
                                   "or token in your kubeconfig\n")

    # Injected: removing the session's CRD would delete every policy of the tests that run after this one.
    kube_env.fail_next(1, status=404, verb="list", path="/shadowpolicies$")
    missing = await cli("get", "-n", "llm")
    assert missing.exit_code == 1
    assert missing.stderr == ("error: the ShadowPolicy resource is not served by this cluster: install the CRD "
                              "(kubectl apply -f deploy/crd.yaml)\n")


async def test_unreachable_cluster_and_bad_kubeconfig(cli: Cli, tmp_path: Path, kube_env: KubeEnv) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        config = kube_env.kubeconfig_dict()
        config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{port}"
        closed = tmp_path / "closed"
        closed.write_text(yaml.safe_dump(config), encoding="utf-8")
        result = await cli("get", "-n", "llm", config=closed)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach the Kubernetes API server:")
    assert result.stderr.count("\n") == 1

    broken = tmp_path / "broken"
    broken.write_text("apiVersion: v1\nkind: Config\ncontexts: []\n", encoding="utf-8")
    result = await cli("promote", "chat", "-n", "llm", config=broken)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot load kubeconfig") and result.stderr.count("\n") == 1
    missing = await cli("get", config=tmp_path / "does-not-exist")
    assert missing.exit_code == 1
    assert missing.stderr == f"error: kubeconfig {tmp_path / 'does-not-exist'}: no such file (pass --kubeconfig, or set KUBECONFIG)\n"


# --------------------------------------------------------------------------- the watch loop


async def test_watch_shows_each_change_and_ends_when_deleted(
    kube_env: KubeEnv, kube_client: KubeClient
) -> None:
    """The loop behind `status --watch`, driven by its injected sleep instead of time."""
    await put_policy(kube_client, progressing_status())
    shown: list[str] = []
    warnings: list[str] = []
    sleeps = 0

    async def sleep(_: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if sleeps == 2:
            await kube_client.patch_status(REF, {"status": {"phase": "Paused"}})
        if sleeps == 4:
            await kube_client.delete(REF)

    await view_cmds.watch_status(kube_client, "llm", "chat", lambda items: shown.append(PolicyStatus.of(items[0]).phase.value),
                                 sleep=sleep, warn=warnings.append)
    assert shown == ["Progressing", "Paused"]  # a poll that saw no change printed nothing
    assert sleeps == 4
    assert warnings == ["shadowpolicy llm/chat was deleted"]


def test_ages_and_effects_read_like_kubectl() -> None:
    assert [view_cmds.human_age(s) for s in (5, 90, 600, 7200 + 180, 3 * 86400 + 3600, 30 * 86400)] == [
        "5s", "1m30s", "10m", "2h3m", "3d1h", "30d"]
    evidence = MetricEvidence.model_validate({"effect": 0.9, "effectScale": "ratio", "interval": [None, 1.02]})
    assert view_cmds.effect_text(evidence) == "-10.0% [-inf, +2.0%]"


def test_an_unreadable_command_annotation_is_ignored() -> None:
    """Anyone who may patch the policy may write the annotation: what is not a command is no command
    (before: 100,000 nested brackets raised RecursionError out of the controller's tick and the CLI)."""
    from shadowctl.controller.commands import pending_command

    for raw in ("not json", "[" * 100_000 + "]" * 100_000, '{"command": "explode", "id": "1"}', "[]", '{"id": 1}'):
        obj = {"metadata": {"annotations": {COMMAND_ANNOTATION: raw}}}
        assert pending_command(obj) is None, raw
    for meta in (["x"], "text", {"annotations": ["x"]}, {"annotations": {COMMAND_ANNOTATION: 7}}):
        assert pending_command({"metadata": meta}) is None, meta  # other shapes (found by bench/fuzz)
    good = {"metadata": {"annotations": {COMMAND_ANNOTATION: '{"command": "pause", "id": "a1"}'}}}
    found = pending_command(good)
    assert found is not None and found.command.value == "pause"


def test_a_policy_object_of_another_shape_is_a_validation_error() -> None:
    """What the controller reads from the API server goes through the model: a metadata that is not a
    mapping, or a generation that is not a number, is the model's ValidationError (the reconciler reports
    it on the object), not an AttributeError or ValueError from the cache key (found by bench/fuzz)."""
    from pydantic import ValidationError

    from shadowctl.controller.status import parse_policy

    doc = next(d for d in yaml.safe_load_all((Path(__file__).resolve().parent.parent / "policies" /
                                              "chat-istio.yaml").read_text()) if d)
    for meta in (["x"], "text", {"name": "p", "generation": "x", "uid": "u"}):
        if isinstance(meta, dict):
            assert parse_policy({**doc, "metadata": meta}).metadata.name == "p"
        else:
            with pytest.raises(ValidationError):
                parse_policy({**doc, "metadata": meta})
