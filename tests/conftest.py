"""Shared fixtures. Real Prometheus / Mosquitto / emulated Kubernetes API fixtures live in plugin modules."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_CRDS = REPO.parent / "shared" / "crds"


@pytest.fixture
def repo() -> Path:
    return REPO

pytest_plugins = ["conftest_kube", "conftest_mqtt", "conftest_prometheus"]
