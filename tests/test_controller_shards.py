"""Sharded controllers (`shadowctl run --shard I/N`): the shard function, and two shards of two replicas each
on the real control plane.

The end-to-end test runs four real `shadowctl run` processes (two for shard 0/2, two for 1/2), each with its
own service account, against a real kube-apiserver that keeps an audit log; no Prometheus is reachable (the
policies stay in their shadow phase, which is all this test needs: every tick writes the policy's status).
Who wrote each status is read from the audit log (the user of each landed status write), never from the
controllers' own word. Then the leader of shard 0 is SIGKILLed (it cannot release its Lease), every policy's
spec is edited, and the audit log must show shard 0's policies recorded by its standby, shard 1's by its
unchanged leader, and no policy ever written by the other shard.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from controller_helpers import load_vs, policy_doc

from shadowctl.controller.shard import ALL, BUCKETS, Shard, bucket_of, bucket_table, policy_key, shard_of
from shadowctl.sim.cluster import ControlPlaneError, LocalCluster

REPO = Path(__file__).resolve().parent.parent
NS = "shards"
SA_NS = "shadowctl"
LEASE = "shadowctl-controller"
LEASE_DURATION = 3.0
RETRY_PERIOD = 0.5
REPLICAS = {"s0-a": "0/2", "s0-b": "0/2", "s1-a": "1/2", "s1-b": "1/2"}
PER_SHARD = 3


# --------------------------------------------------------------------------- the function


def test_the_shard_function_is_stable_uniform_and_moves_few_policies_when_n_grows() -> None:
    # Stable across processes (not Python's salted hash()): the values are fixed by the documented function.
    assert policy_key("llm", "chat") == int.from_bytes(
        __import__("hashlib").blake2b(b"llm/chat", digest_size=8).digest(), "big")
    assert bucket_of("llm", "chat") == policy_key("llm", "chat") % 1024 and BUCKETS == 1024
    script = "from shadowctl.controller.shard import shard_of; print([shard_of('ns', f'p{i}', 7) for i in range(50)])"
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert other.stdout.strip() == str([shard_of("ns", f"p{i}", 7) for i in range(50)])
    # The buckets are dealt evenly: every shard holds 1024/N of them to within one.
    for n in (*range(1, 33), 100, 1024):
        held = Counter(bucket_table(n))
        assert set(held) == set(range(n)) and max(held.values()) - min(held.values()) <= 1, n
    assert bucket_table(2) == (0,) * 512 + (1,) * 512  # the lowest-numbered buckets stay
    names = [(f"team-{i % 13}", f"policy-{i:05d}") for i in range(6000)]
    for n in (2, 3, 5):
        counts = Counter(shard_of(ns, name, n) for ns, name in names)
        assert set(counts) == set(range(n))
        # What is left is the names' own spread: within 6 standard deviations of a binomial share.
        sd = math.sqrt(len(names) * (1 / n) * (1 - 1 / n))
        assert max(counts.values()) - min(counts.values()) < 6 * sd, counts
    # From N to N+1 shards, a policy either stays or moves to the new shard N; about 1/(N+1) move.
    for n in (2, 3, 4, 9):
        moved = [(ns, name) for ns, name in names if shard_of(ns, name, n) != shard_of(ns, name, n + 1)]
        assert all(shard_of(ns, name, n + 1) == n for ns, name in moved)
        assert abs(len(moved) / len(names) - 1 / (n + 1)) < 0.03, (n, len(moved))
        tables = bucket_table(n), bucket_table(n + 1)
        assert all(new in (old, n) for old, new in zip(*tables, strict=True))
        assert abs(sum(new == n for new in tables[1]) - BUCKETS / (n + 1)) <= 1


def test_shard_parse_and_lease_names() -> None:
    assert Shard.parse("1/3") == Shard(1, 3)
    assert Shard.parse(" 0/2 ").lease_name(LEASE) == "shadowctl-controller-0-of-2"
    assert ALL.lease_name(LEASE) == LEASE and ALL.owns("any", "name")
    for bad in ("2/2", "1", "a/b", "-1/2", "0/0", "1/2/3"):
        with pytest.raises(ValueError, match=r"I/N|index counts from 0"):
            Shard.parse(bad)


def test_run_rejects_a_bad_shard_with_a_clear_message() -> None:
    answer = subprocess.run([sys.executable, "-m", "shadowctl", "run", "--shard", "2/2"], capture_output=True,
                            text=True, timeout=60)
    assert answer.returncode == 2
    assert "--shard" in answer.stderr and "below the count" in answer.stderr and "Traceback" not in answer.stderr


# --------------------------------------------------------------------------- two shards, two replicas each


@dataclass
class Plane:
    cluster: LocalCluster
    audit_log: Path
    kubeconfigs: dict[str, Path]
    admin: httpx.Client
    workdir: Path


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    workdir = tmp_path_factory.mktemp("shards")
    cluster = LocalCluster(knative=False, audit_log=workdir / "audit.log")
    try:
        cluster.start()
    except ControlPlaneError as exc:
        pytest.fail(f"the local control plane cannot start: {exc}", pytrace=False)
    admin = cluster.plane.admin_client()
    try:
        for ns in (NS, SA_NS):
            answer = admin.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace",
                                                             "metadata": {"name": ns}})
            assert answer.status_code in (201, 409), answer.text
        kubeconfigs = {
            name: cluster.plane.write_kubeconfig(
                workdir / f"{name}.kubeconfig", namespace=NS,
                token=cluster.service_account_token(admin, SA_NS, name, cluster_role="cluster-admin"))
            for name in REPLICAS
        }
        yield Plane(cluster, workdir / "audit.log", kubeconfigs, admin, workdir)
    finally:
        admin.close()
        cluster.stop()


def _names() -> dict[int, list[str]]:
    """PER_SHARD policy names for each of the two shards (the first names the function sends there)."""
    out: dict[int, list[str]] = {0: [], 1: []}
    for i in range(100):
        name = f"chat-{i:02d}"
        bucket = out[shard_of(NS, name, 2)]
        if len(bucket) < PER_SHARD:
            bucket.append(name)
    return out


def _create(admin: httpx.Client, name: str) -> None:
    vs = load_vs()
    vs["metadata"] = {"name": name, "namespace": NS}
    answer = admin.post(f"/apis/networking.istio.io/v1/namespaces/{NS}/virtualservices", json=vs)
    assert answer.status_code == 201, answer.text
    doc = policy_doc(analysis={"interval": "2s"})
    doc["metadata"] = {"name": name, "namespace": NS}
    doc["spec"]["target"]["istio"]["virtualService"] = name
    answer = admin.post(f"/apis/shadowctl.dev/v1alpha1/namespaces/{NS}/shadowpolicies", json=doc)
    assert answer.status_code == 201, answer.text


def _policy(admin: httpx.Client, name: str) -> dict[str, Any]:
    answer = admin.get(f"/apis/shadowctl.dev/v1alpha1/namespaces/{NS}/shadowpolicies/{name}")
    answer.raise_for_status()
    return dict(answer.json())


def _holder(admin: httpx.Client, shard: str) -> str | None:
    lease = Shard.parse(shard).lease_name(LEASE)
    answer = admin.get(f"/apis/coordination.k8s.io/v1/namespaces/{SA_NS}/leases/{lease}")
    if answer.status_code == 404:
        return None
    return str((answer.json().get("spec") or {}).get("holderIdentity") or "") or None


def _wait(what: str, check: Any, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not reached within {timeout} s: {what}")


def _identity(log: Path) -> str | None:
    """The Lease identity a `shadowctl run` process logged at its start."""
    if not log.exists():
        return None
    for line in log.read_text().splitlines():
        if '"controller.start"' in line:
            return str(json.loads(line)["identity"])
    return None


def _status_writes(audit_log: Path) -> list[tuple[float, str, str]]:
    """(time, policy, user) of every landed write to a ShadowPolicy's status, in the audit log's order."""
    out = []
    for line in audit_log.read_text().splitlines():
        event = json.loads(line)
        ref = event.get("objectRef") or {}
        if (ref.get("resource") != "shadowpolicies" or ref.get("subresource") != "status"
                or event.get("verb") not in ("update", "patch")
                or int((event.get("responseStatus") or {}).get("code") or 0) >= 300):
            continue
        at = datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
        user = str((event.get("user") or {}).get("username")).rpartition(":")[2]
        out.append((at, str(ref.get("name")), user))
    return out


def test_two_shards_of_two_replicas_split_the_policies_and_a_standby_takes_over(plane: Plane) -> None:
    names = _names()
    for name in names[0] + names[1]:
        _create(plane.admin, name)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: plane.workdir / f"{name}.log" for name in REPLICAS}
    try:
        for replica, shard in REPLICAS.items():
            with logs[replica].open("wb") as out:
                procs[replica] = subprocess.Popen(
                    [sys.executable, "-m", "shadowctl", "run", "--kubeconfig", str(plane.kubeconfigs[replica]),
                     "--shard", shard, "-n", NS, "--lease-namespace", SA_NS, "--lease-duration", str(LEASE_DURATION),
                     "--renew-deadline", "2", "--retry-period", str(RETRY_PERIOD), "--listen", "127.0.0.1:0"],
                    stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        everyone = names[0] + names[1]
        _wait("every policy in its shadow phase",
              lambda: all((_policy(plane.admin, n).get("status") or {}).get("phase") == "Shadowing" for n in everyone))
        _wait("every replica logged its identity", lambda: all(_identity(log) for log in logs.values()))
        identities = {replica: _identity(log) for replica, log in logs.items()}
        by_identity = {v: k for k, v in identities.items()}
        leaders = {shard: by_identity[str(_holder(plane.admin, shard))] for shard in ("0/2", "1/2")}
        assert {REPLICAS[leaders["0/2"]], REPLICAS[leaders["1/2"]]} == {"0/2", "1/2"}
        standby = next(r for r, s in REPLICAS.items() if s == "0/2" and r != leaders["0/2"])

        started = time.monotonic()
        procs[leaders["0/2"]].send_signal(signal.SIGKILL)  # no clean stop: its Lease must expire
        procs[leaders["0/2"]].wait(timeout=10)
        _wait("shard 0's standby holds its Lease", lambda: _holder(plane.admin, "0/2") == identities[standby],
              timeout=4 * LEASE_DURATION + 10)
        handover = time.monotonic() - started
        handed_at = time.time()
        # The standby takes an expired Lease at its first try after lease_duration (its own clock, from the
        # last change it saw): the protocol's bound is lease + one retry period; 2 s of slack for a busy machine.
        assert handover < LEASE_DURATION + RETRY_PERIOD + 2.0, handover
        assert _holder(plane.admin, "1/2") == identities[leaders["1/2"]]  # the other shard never noticed

        for name in everyone:  # a person edits every policy: each one's new generation must be recorded
            answer = plane.admin.patch(f"/apis/shadowctl.dev/v1alpha1/namespaces/{NS}/shadowpolicies/{name}",
                                       json={"spec": {"shadow": {"maxDuration": "301s"}}},
                                       headers={"Content-Type": "application/merge-patch+json"})
            answer.raise_for_status()

        def recorded() -> bool:
            for n in everyone:
                obj = _policy(plane.admin, n)
                if (obj.get("status") or {}).get("observedGeneration") != obj["metadata"]["generation"]:
                    return False
            return True

        _wait("every policy's new generation recorded", recorded)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    time.sleep(1.0)  # the audit log's last events reach the file a moment after their answers

    writers: dict[str, set[str]] = defaultdict(set)
    after_handover: dict[str, set[str]] = defaultdict(set)
    for at, name, user in _status_writes(plane.audit_log):
        writers[name].add(user)
        if at > handed_at:  # (a write the dead leader had in flight when killed lands before this)
            after_handover[name].add(user)
    summary = {"writers": {k: sorted(v) for k, v in writers.items()}, "handover_s": round(handover, 2)}
    for index, shard_names in names.items():
        replicas = {r for r, s in REPLICAS.items() if s == f"{index}/2"}
        for name in shard_names:
            assert writers[name] and writers[name] <= replicas, summary  # exactly one shard wrote it
    for name in names[0]:
        assert after_handover[name] == {standby}, summary
        assert leaders["0/2"] in writers[name], summary  # written by the leader before it died
    for name in names[1]:
        assert after_handover[name] == {leaders["1/2"]}, summary
