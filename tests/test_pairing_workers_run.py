"""`shadowctl run --pairing-workers 2` as the CLI wires it (run_controller): a policy whose taps publish on 4
partitions is paired in two worker processes, and their summed counts reach the policy's `.status`.

Real parts: the real local API server (the policy, the Istio VirtualService), a real Mosquitto, the
controller's whole wiring with two spawned pairing processes. The metric source is the double at the port
of tests/controller_helpers.py (no Prometheus is needed for what is checked: the output tally).
"""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import structlog
from conftest_kube import KubeEnv, eventually
from conftest_mqtt import free_port
from controller_helpers import FakeMetricSource, load_vs, policy_doc

from shadowctl.cli.run_cmd import RunOptions, run_controller
from shadowctl.compare.events import Endpoint, OutputEvent, Variant
from shadowctl.compare.partitions import partition_topic
from shadowctl.kube import SHADOW_POLICY, VIRTUAL_SERVICE, KubeClient

if TYPE_CHECKING:
    from conftest_mqtt import MosquittoBroker

TOPIC = "shadowctl/outputs/llm/chat"


def _status(kube_env: KubeEnv) -> dict[str, Any]:
    obj = kube_env.get_object(SHADOW_POLICY, "llm", "chat") or {}
    return obj.get("status") or {}


def _pairs(kube_env: KubeEnv) -> int:
    outputs = _status(kube_env).get("outputs") or {}
    return int(((outputs.get("comparators") or {}).get("exact") or {}).get("candidatePairs", 0))


def _workers() -> list[multiprocessing.process.BaseProcess]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("shadowctl-pairing-llm/chat-")]


async def test_two_pairing_processes_count_into_the_status(
        kube_env: KubeEnv, kube_client: KubeClient, mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    await kube_client.create(VIRTUAL_SERVICE, load_vs())
    outputs = {"mqtt": {"broker": mosquitto.url, "topic": f"{TOPIC}/+", "partitions": 4},
               "comparators": [{"name": "exact"}]}
    await kube_client.create(SHADOW_POLICY, policy_doc(analysis={"outputs": outputs}))
    opts = RunOptions(
        kubeconfig=str(kube_env.kubeconfig(tmp_path / "kc")), context=None, namespace="llm", selector=None,
        prometheus=None, events_mqtt=None, listen=f"127.0.0.1:{free_port()}", leader_elect=False, lease_name="x",
        lease_namespace="llm", lease_duration=15, renew_deadline=10, retry_period=2, min_interval=0.0,
        pairing_workers=2)
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(run_controller(opts, stop, metric_source=FakeMetricSource()))
        try:
            assert await eventually(lambda: _status(kube_env).get("phase") == "Shadowing" or task.done(), timeout=60)
            assert not task.done()
            assert await eventually(lambda: len(_workers()) == 2, timeout=60), "two pairing processes"
            # Both have subscribed to their partitions (events published before would be lost: clean sessions).
            assert await eventually(lambda: any(e["event"] == "pairing.workers_connected" for e in logs),
                                    timeout=60)
            async with aiomqtt.Client(mosquitto.host, mosquitto.port) as pub:
                for i in range(100):
                    for v in (Variant.primary, Variant.candidate):
                        e = OutputEvent(request_id=f"w{i}", variant=v, shadow=v is Variant.candidate,
                                        service="llm/chat", endpoint=Endpoint.chat, prompt_hash=f"h{i}",
                                        output="Paris.", status=200, started_at=0.0, e2e_s=0.2)
                        await pub.publish(partition_topic(f"{TOPIC}/{v.value}", e.request_id, 4), e.to_json(),
                                          qos=1)
            assert await eventually(lambda: _pairs(kube_env) == 100, timeout=60, every=0.5), _status(kube_env)
        finally:
            stop.set()
            await task
    assert _workers() == []  # the controller stopped them
