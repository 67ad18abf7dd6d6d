"""Helpers shared by the router tests: fixture loading and CRD schema validation."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import yaml

from shadowctl.sim.kube_schema import load_crd_file, validate
from shadowctl.sim.kubeapi import default_crds_dir

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "routers"


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((FIXTURES / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@functools.cache
def _schema(file: str, version: str) -> dict[str, Any] | None:
    path = default_crds_dir() / file
    if not path.is_file():
        return None
    for v in load_crd_file(path):
        if v.version == version:
            return v.schema
    raise AssertionError(f"{file} has no version {version}")


def assert_valid(obj: dict[str, Any]) -> None:
    """Validate a VirtualService or Knative Service against the upstream CRD (skips where ../shared is absent)."""
    file = {"VirtualService": "istio-virtualservice.yaml", "Service": "knative-service.yaml"}[obj["kind"]]
    schema = _schema(file, "v1")
    if schema is None:
        pytest.skip(f"needs the upstream CRDs in {default_crds_dir()} (../shared/crds is absent here)")
    causes = validate(obj, schema)
    assert not causes, [c.message for c in causes]
