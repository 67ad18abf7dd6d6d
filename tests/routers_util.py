"""Helpers shared by the router tests: fixture loading and CRD schema validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import conftest_kube
import yaml

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "routers"


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((FIXTURES / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def assert_valid(obj: dict[str, Any]) -> None:
    """The real API server accepts ``obj`` (a server-side dry run with strict field validation).

    The test must request the ``local_cluster`` fixture (``kserve`` for an InferenceService). For a Knative Service the
    Revisions its traffic names are created first (the webhook checks they exist)
    and removed after.
    """
    cluster = conftest_kube.SESSION.get("cluster")
    assert cluster is not None, "assert_valid needs the local_cluster fixture"
    group, _, version = obj["apiVersion"].rpartition("/")
    plural = {"VirtualService": "virtualservices", "Service": "services", "HTTPRoute": "httproutes",
              "InferenceService": "inferenceservices"}[obj["kind"]]
    ns = obj["metadata"].get("namespace") or "default"
    body = {**obj, "metadata": {k: v for k, v in obj["metadata"].items()
                                 if k not in ("resourceVersion", "uid", "creationTimestamp", "generation")}}
    created: list[str] = []
    with cluster.plane.admin_client() as client:
        try:
            if obj["kind"] == "Service":
                for target in (obj.get("spec") or {}).get("traffic") or []:
                    name = target.get("revisionName")
                    if name:
                        rev = {"apiVersion": "serving.knative.dev/v1", "kind": "Revision",
                               "metadata": {"name": name, "namespace": ns}, "spec": {"containers": [{"image": "x"}]}}
                        answer = client.post(f"/apis/serving.knative.dev/v1/namespaces/{ns}/revisions", json=rev)
                        if answer.status_code == 201:
                            created.append(name)
            answer = client.post(f"/apis/{group}/{version}/namespaces/{ns}/{plural}",
                                 params={"dryRun": "All", "fieldValidation": "Strict"}, json=body)
        finally:
            for name in created:
                client.delete(f"/apis/serving.knative.dev/v1/namespaces/{ns}/revisions/{name}")
    assert answer.status_code == 201, answer.text
