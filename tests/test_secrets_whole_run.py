"""A whole rollout with secrets everywhere, and a look for the secret values in everything the controller says.

`shadowctl run` runs as a process, as the ServiceAccount of deploy/rbac.yaml plus only the Role that
`shadowctl rbac secrets` prints for the policy (resourceNames), against the real local API server with
RBAC. The policy names a Prometheus bearer token Secret (the real Prometheus behind
shadowctl.sim.authproxy.BearerProxy: TLS, 401 without the token), a CA Secret, and an MQTT password
Secret for its outputs (a real Mosquitto with TLS, a password file and the ACL of
shadowctl.sim.mosquitto); the controller publishes its rollout events on that broker as its own user,
with the password from a file (--events-mqtt-password-file). Mid-run the Prometheus token is rotated:
the server refuses the old one, and the controller reads the Secret again.

Nothing is mocked. Without traffic Prometheus has no series for the candidate, so the rollout holds on
"no data" until its progress deadline and rolls back: a whole rollout, start to terminal phase. Then
every log line (stdout and stderr), /metrics, the policy object with its status, the Kubernetes
Events and the MQTT events are searched for the secret values, also base64-encoded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
import structlog
import yaml
from conftest_kube import KubeEnv, eventually
from conftest_mqtt import MOSQUITTO, MosquittoBroker, free_port
from conftest_prometheus import PrometheusFactory
from controller_helpers import REF, FakeMetricSource, load_vs, policy_doc
from typer.testing import CliRunner

from shadowctl.aio import cancel_and_wait
from shadowctl.cli.app import app
from shadowctl.cli.run_cmd import EventsMqttAuth, RunOptions, run_controller
from shadowctl.kube import SECRET, SHADOW_POLICY, VIRTUAL_SERVICE, KubeClient
from shadowctl.sim.authproxy import BearerProxy
from shadowctl.sim.mosquitto import MOSQUITTO_PASSWD, AclRule, BrokerFiles, controller_rules, write_broker_config
from shadowctl.sim.pki import LocalCA

pytestmark = pytest.mark.skipif(not (Path(MOSQUITTO).exists() and Path(MOSQUITTO_PASSWD).exists()),
                                reason="needs mosquitto and mosquitto_passwd (Debian package mosquitto)")

KUBECTL = str(Path(sys.executable).parent / "kubectl")
TOKEN_OLD, TOKEN_NEW = "prom-token-before-f3a9c1d7e2", "prom-token-after-8b6d0e4a5f"
MQTT_PASSWORD = "mqtt-password-7c2e9a41b5"
READER_PASSWORD = "reader-password-1d8f3b"
SECRETS = (TOKEN_OLD, TOKEN_NEW, MQTT_PASSWORD)
SA = "system:serviceaccount:shadowctl:shadowctl"


def _policy(prometheus_url: str, broker_url: str) -> str:
    return f"""\
apiVersion: shadowctl.dev/v1alpha1
kind: ShadowPolicy
metadata: {{name: chat, namespace: llm}}
spec:
  target:
    istio:
      virtualService: chat
      route: chat-default
      primary: {{host: chat.llm.svc.cluster.local, subset: v1, port: 8000}}
      candidate: {{host: chat.llm.svc.cluster.local, subset: v2, port: 8000}}
  shadow: {{mirrorPercent: 20, minDuration: 2s, maxDuration: 60s, minPairs: 0}}
  canary: {{steps: [50], stepDuration: 2s}}
  analysis:
    interval: 1s
    variants:
      primary: {{workload: chat-v1, subset: v1}}
      candidate: {{workload: chat-v2, subset: v2}}
    metrics:
      - {{name: ttft-p95, preset: vllm-ttft, statistic: p95, margin: 10%, critical: true, minSamples: 50}}
    prometheus:
      url: {prometheus_url}
      bearerTokenSecret: prom-token
      tls: {{caSecret: ca}}
    outputs:
      mqtt: {{broker: "{broker_url}", username: shadowctl, passwordSecret: mqtt-password, tls: {{caSecret: ca}}}}
      comparators: [{{name: exact}}]
  notifications:
    mqtt: {{}}
  progressDeadline: 12s
"""


def _secret(name: str, data: dict[str, bytes]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "llm"},
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}


def _kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), *args], input=stdin, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, BrokerFiles, LocalCA]]:
    ca = LocalCA(tmp_path / "pki")
    mosquitto = MosquittoBroker(tmp_path)
    rules: dict[str, list[AclRule]] = {"shadowctl": controller_rules(),
                                       "events-reader": [AclRule("read", "shadowctl/events/#")]}
    files = write_broker_config(tmp_path / "broker", mosquitto.port, ca,
                                {"shadowctl": MQTT_PASSWORD, "events-reader": READER_PASSWORD}, rules)
    mosquitto.config = files.config
    mosquitto.start()
    yield mosquitto, files, ca
    mosquitto.stop()


@contextlib.asynccontextmanager
async def _events_reader(files: BrokerFiles, ca: LocalCA) -> AsyncIterator[list[bytes]]:
    got: list[bytes] = []
    ready = asyncio.Event()

    async def read() -> None:
        async with aiomqtt.Client(files.host, files.port, username="events-reader", password=READER_PASSWORD,
                                  tls_context=ssl.create_default_context(cafile=str(ca.cert_file))) as client:
            await client.subscribe("shadowctl/events/#", qos=1)
            ready.set()
            async for message in client.messages:
                got.append(bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b"")

    task = asyncio.create_task(read())
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield got
    finally:
        await cancel_and_wait(task)


def _start(command: list[str], out_file: Path, err_file: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with out_file.open("w") as out, err_file.open("w") as err:
        return subprocess.Popen(command, stdout=out, stderr=err, env=env)


def _apply_rbac(kube_env: KubeEnv, tmp_path: Path, policy_file: Path) -> Path:
    """deploy/rbac.yaml and the Role `shadowctl rbac secrets` prints; a kubeconfig as the ServiceAccount."""
    admin = kube_env.direct_kubeconfig(tmp_path / "admin")
    done = _kubectl(admin, "apply", "-f", str(Path(__file__).resolve().parent.parent / "deploy" / "rbac.yaml"))
    assert done.returncode == 0, done.stderr
    printed = CliRunner().invoke(app, ["rbac", "secrets", str(policy_file)])
    assert printed.exit_code == 0, printed.output
    role = next(d for d in yaml.safe_load_all(printed.stdout) if d["kind"] == "Role")
    assert role["rules"][0]["resourceNames"] == ["ca", "mqtt-password", "prom-token"]
    done = _kubectl(admin, "apply", "-f", "-", stdin=printed.stdout)
    assert done.returncode == 0, done.stderr
    return admin


async def test_a_whole_rollout_never_shows_a_secret(
    kube_env: KubeEnv, tmp_path: Path, prometheus_factory: PrometheusFactory,
    broker: tuple[MosquittoBroker, BrokerFiles, LocalCA],
) -> None:
    mosquitto, files, ca = broker
    proxy = BearerProxy(prometheus_factory().url, ca.issue("proxy", "127.0.0.1", hosts=("127.0.0.1",)), {TOKEN_OLD})
    await proxy.start()
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(_policy(proxy.url, files.url))
    admin = _apply_rbac(kube_env, tmp_path, policy_file)
    for secret in (_secret("prom-token", {"token": TOKEN_OLD.encode() + b"\n"}), _secret("ca", {"ca.crt": ca.pem}),
                   _secret("mqtt-password", {"password": MQTT_PASSWORD.encode()})):
        kube_env.put_object(SECRET, secret)
    kube_env.put_object(VIRTUAL_SERVICE, load_vs())

    def can_i(verb: str, what: str) -> str:
        return _kubectl(admin, "--as", SA, "-n", "llm", "auth", "can-i", verb, what).stdout.strip()

    # The authorizer learns of new RBAC objects from its informers, a moment after they are stored.
    await eventually(lambda: can_i("get", "secret/prom-token") == "yes" and can_i("create", "events") == "yes")
    assert can_i("get", "secrets") == "no" and can_i("list", "secrets") == "no"  # names only, nothing else

    password_file = tmp_path / "events-password"
    password_file.write_text(MQTT_PASSWORD + "\n")
    port = free_port()
    out_file, err_file = tmp_path / "controller.out", tmp_path / "controller.err"
    command = [sys.executable, "-m", "shadowctl", "run", "--kubeconfig",
               str(kube_env.service_account_kubeconfig(tmp_path / "sa", "shadowctl", "shadowctl")),
               "-n", "llm", "--no-leader-elect", "--listen", f"127.0.0.1:{port}", "--log-format", "json",
               "--events-mqtt", files.url, "--events-mqtt-username", "shadowctl",
               "--events-mqtt-password-file", str(password_file), "--events-mqtt-ca", str(ca.cert_file)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWCTL_")}
    async with _events_reader(files, ca) as events:
        kube_env.put_object(SHADOW_POLICY, yaml.safe_load(policy_file.read_text()))
        proc = _start(command, out_file, err_file, env)
        try:
            await eventually(lambda: proxy.forwarded >= 1 or proc.poll() is not None, timeout=30)
            assert proc.poll() is None, err_file.read_text()[-3000:]
            # Rotation: the server takes only the new token, and the Secret holds it.
            proxy.tokens = {TOKEN_NEW}
            kube_env.put_object(SECRET, _secret("prom-token", {"token": TOKEN_NEW.encode()}))
            forwarded = proxy.forwarded
            await eventually(lambda: proxy.refused >= 1 and proxy.forwarded > forwarded, timeout=30)

            def phase() -> str | None:
                obj = kube_env.get_object(SHADOW_POLICY, "llm", "chat") or {}
                return (obj.get("status") or {}).get("phase")

            await eventually(lambda: phase() in ("RolledBack", "Succeeded", "Failed"), timeout=60, every=0.3)
            assert phase() == "RolledBack"
            await eventually(lambda: any(b'"RolledBack"' in e or b"RolledBack" in e for e in events), timeout=15)
            async with httpx.AsyncClient() as client:
                metrics = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            await proxy.stop()
    logs = out_file.read_text() + err_file.read_text()
    policy = kube_env.get_object(SHADOW_POLICY, REF.namespace, REF.name)
    kube_events = kube_env.admin.get("/api/v1/namespaces/llm/events").json()
    assert kube_events["items"], "no Kubernetes Events"
    assert "controller.start" in logs and "controller.stopped" in logs and "Traceback" not in logs, logs[-3000:]

    # The controller published its events as its own user over TLS, with the password from the file.
    payloads = [json.loads(e) for e in events]
    assert payloads and {p["policy"] for p in payloads} == {"llm/chat"}
    assert payloads[-1]["phase"] == "RolledBack"
    # Both of its MQTT clients (outputs, from the Secret; events, from the file) logged in as 'shadowctl'.
    broker_log = mosquitto.log.read_text()
    assert broker_log.count("u'shadowctl'") >= 2, broker_log[-2000:]
    assert "not authorised" not in broker_log.lower()

    everything = {"logs": logs, "metrics": metrics, "policy": json.dumps(policy), "events": json.dumps(kube_events),
                  "mqtt events": "\n".join(e.decode() for e in events)}
    for value in SECRETS:
        for form in (value, base64.b64encode(value.encode()).decode()):
            for where, text in everything.items():
                assert form not in text, f"a secret value appears in the controller's {where}"


async def test_a_wrong_events_password_is_refused_and_the_rollout_goes_on(
    kube_env: KubeEnv, kube_client: KubeClient, tmp_path: Path, broker: tuple[MosquittoBroker, BrokerFiles, LocalCA],
) -> None:
    """The controller as `shadowctl run` wires it (run_controller; the metric source is the double at the port of
    tests/controller_helpers.py), --events-mqtt with a password file holding the wrong password: the broker
    refuses, the controller says so once, naming the broker and the user (never the password), publishes
    nothing, and carries on with the rollout."""
    _, files, ca = broker
    password_file = tmp_path / "events-password"
    password_file.write_text("not-the-password-4e1b\n")
    await kube_client.create(VIRTUAL_SERVICE, load_vs())
    await kube_client.create(SHADOW_POLICY, policy_doc(notifications={"mqtt": {}}))
    opts = RunOptions(
        kubeconfig=str(kube_env.kubeconfig(tmp_path / "kc")), context=None, namespace="llm", selector=None,
        prometheus=None, events_mqtt=files.url, listen=f"127.0.0.1:{free_port()}", leader_elect=False,
        lease_name="x", lease_namespace="llm", lease_duration=15, renew_deadline=10, retry_period=2, min_interval=0.0,
        events_mqtt_auth=EventsMqttAuth(username="shadowctl", password_file=str(password_file),
                                        ca_file=str(ca.cert_file)))
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        async with _events_reader(files, ca) as events:
            task = asyncio.create_task(run_controller(opts, stop, metric_source=FakeMetricSource()))
            try:
                await eventually(lambda: task.done() or any("refused the credentials" in e["event"] for e in logs))
                status = await eventually(lambda: _phase(kube_env) == "Shadowing" or task.done())
                assert status and not task.done()
            finally:
                stop.set()
                await task
            assert events == []
    refusals = [e for e in logs if "refused the credentials" in e["event"]]
    assert len(refusals) == 1 and refusals[0]["log_level"] == "error", refusals
    assert refusals[0]["error"].startswith(f"mqtt broker {files.host}:{files.port} refused the credentials of user "
                                           "'shadowctl'"), refusals[0]
    assert "not-the-password-4e1b" not in repr(logs)


def _phase(kube_env: KubeEnv) -> str | None:
    obj = kube_env.get_object(SHADOW_POLICY, "llm", "chat") or {}
    return (obj.get("status") or {}).get("phase")


@pytest.fixture
def structlog_restored() -> Iterator[None]:
    """The CLI sets logging up for the whole process (warnings only): put back what the other tests expect."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.usefixtures("structlog_restored")
def test_the_events_broker_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    for args, message in (
        (["--events-mqtt-username", "u"], "need --events-mqtt"),
        (["--events-mqtt", "mqtt://127.0.0.1:1883", "--events-mqtt-ca", "ca.pem"], "need an mqtts:// broker"),
        (["--events-mqtt", "mqtts://127.0.0.1:8883", "--events-mqtt-cert", "c.pem"], "go together"),
        (["--events-mqtt", "mqtts://127.0.0.1:8883", "--events-mqtt-password-file", str(tmp_path / "none")],
         "cannot be read"),
        (["--events-mqtt", "http://127.0.0.1:8883"], "is not a broker URL"),
    ):
        answer = CliRunner().invoke(app, ["run", *args])
        assert answer.exit_code == 2 and message in answer.output, (args, answer.output)
