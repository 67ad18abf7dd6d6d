"""The output source's MQTT password from the policy's Secret (outputs.mqtt.passwordSecret).

A real Mosquitto with a password file (mosquitto_passwd) and authentication required; the Secret
lives in the real local API server and is read by the controller's provider at every connect.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest_kube import KubeEnv
from conftest_mqtt import MosquittoBroker

from shadowctl.aio import cancel_and_wait
from shadowctl.cli.run_cmd import mqtt_password_provider
from shadowctl.kube import SECRET, KubeClient, ResourceRef
from shadowctl.policy.model import ShadowPolicy
from shadowctl.sources.outputs import BrokerRejected, MqttOutputSource

REPO = Path(__file__).resolve().parents[1]
PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


@pytest.fixture
def secured_broker(tmp_path: Path) -> Any:
    if not Path(PASSWD).exists():
        pytest.skip("mosquitto_passwd is not installed")
    passwords = tmp_path / "passwd"
    subprocess.run([PASSWD, "-c", "-b", str(passwords), "shadowctl", "s3cr3t"], check=True, capture_output=True)
    passwords.chmod(0o600)
    broker = MosquittoBroker(tmp_path)
    # Run as root, mosquitto would switch to its own user, which cannot read pytest's private tmp dir.
    as_root = "user root\n" if os.geteuid() == 0 else ""
    broker.config.write_text(
        f"listener {broker.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\npersistence false\n"
        + as_root
    )
    broker.start()
    yield broker
    broker.stop()


def _policy(secret: str) -> ShadowPolicy:
    doc = yaml.safe_load((REPO / "policies" / "chat-istio.yaml").read_text())
    doc["metadata"]["namespace"] = "llm"
    mqtt = doc["spec"]["analysis"]["outputs"]["mqtt"]
    mqtt.update({"username": "shadowctl", "passwordSecret": secret})
    return ShadowPolicy.model_validate(doc)


async def test_password_comes_from_the_policys_secret_at_every_connect(
    secured_broker: MosquittoBroker, kube_env: KubeEnv, tmp_path: Path
) -> None:
    kube = await KubeClient.connect(kubeconfig=kube_env.kubeconfig(tmp_path / "k"))
    try:
        def source_for(secret: str) -> MqttOutputSource:
            pol = _policy(secret)
            src = MqttOutputSource.from_policy(pol, password_provider=mqtt_password_provider(kube, pol))
            src.host, src.port = secured_broker.host, secured_broker.port
            src.backoff_max_s = 0.2
            return src

        # No Secret yet: retried (the Secret may come), with the reason kept for .status.
        src = source_for("mqtt-creds/pw")
        task = asyncio.create_task(src.run())
        for _ in range(100):
            if src.last_error:
                break
            await asyncio.sleep(0.05)
        assert src.last_error is not None and "Secret llm/mqtt-creds" in src.last_error and not task.done()
        await kube.create(SECRET, {"apiVersion": "v1", "kind": "Secret",
                                   "metadata": {"name": "mqtt-creds", "namespace": "llm"},
                                   "data": {"pw": base64.b64encode(b"s3cr3t").decode()}})
        await asyncio.wait_for(src.subscribed.wait(), 10)  # it connected with the Secret's password
        assert src.connected
        await cancel_and_wait(task)

        # A wrong password is refused by the broker and not retried.
        secret = await kube.get(ResourceRef(SECRET, "mqtt-creds", "llm"))
        secret["data"]["pw"] = base64.b64encode(b"wrong").decode()
        await kube.replace(SECRET, secret)
        with pytest.raises(BrokerRejected, match=r"check outputs\.mqtt\.username and the password"):
            await asyncio.wait_for(source_for("mqtt-creds/pw").run(), 10)
    finally:
        await kube.close()
