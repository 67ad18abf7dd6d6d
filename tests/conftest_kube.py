"""Pytest fixtures for the emulated Kubernetes API and a connected KubeClient (a plugin module).

Enable with ``pytest_plugins = ["conftest_kube"]`` in ``tests/conftest.py``;
test modules may also list it themselves. Fixtures:

* ``crds_dir``: ``../shared/crds`` (skips the test with a reason when absent);
* ``kube_emulator``: a started :class:`KubeAPIEmulator`, CRDs loaded when present;
* ``kube_client``: a :class:`KubeClient` built from the emulator's kubeconfig,
  with no-wait retries whose sleeps are recorded in ``kube_sleeps``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from shadowctl.kube import KubeClient, RetryPolicy
from shadowctl.sim.kubeapi import KubeAPIEmulator, default_crds_dir


@pytest.fixture
def crds_dir() -> Path:
    folder = default_crds_dir()
    if not folder.is_dir():
        pytest.skip(f"needs the upstream CRDs in {folder} (../shared/crds is absent here)")
    return folder


@pytest_asyncio.fixture
async def kube_emulator() -> AsyncIterator[KubeAPIEmulator]:
    emu = KubeAPIEmulator(token="test-token")
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


@pytest.fixture
def kube_sleeps() -> list[float]:
    return []


@pytest_asyncio.fixture
async def kube_client(
    kube_emulator: KubeAPIEmulator, tmp_path: Path, kube_sleeps: list[float]
) -> AsyncIterator[KubeClient]:
    async def record_sleep(seconds: float) -> None:
        kube_sleeps.append(seconds)

    config = kube_emulator.kubeconfig(tmp_path / "kubeconfig")
    client = await KubeClient.connect(
        kubeconfig=config,
        timeout=5.0,
        retry=RetryPolicy(attempts=4, base_delay=0.1, max_delay=1.0),
        sleep=record_sleep,
        rand=lambda: 0.5,
    )
    try:
        yield client
    finally:
        await client.close()
