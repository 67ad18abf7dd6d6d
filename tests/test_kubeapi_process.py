"""The emulator as a standalone process: it writes a kubeconfig that KubeClient can use."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from shadowctl.kube import LEASE, KubeClient, ResourceRef


async def test_standalone_process_serves_its_kubeconfig(tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shadowctl.sim.kubeapi", "--port", "0", "--kubeconfig-out", str(config),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = await proc.stdout.readline()
        assert b"serving http://127.0.0.1:" in line
        async with await KubeClient.connect(kubeconfig=config) as client:
            await client.create(LEASE, {"metadata": {"name": "x", "namespace": "ns1"}, "spec": {}})
            lease = await client.get(ResourceRef(LEASE, "x", "ns1"))
            assert lease["metadata"]["resourceVersion"] == "1"
    finally:
        proc.terminate()
        await proc.wait()
