"""CRD structural-schema validation and pruning: unit level, and through the API with the upstream CRDs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shadowctl.kube import DESTINATION_RULE, VIRTUAL_SERVICE, Invalid, KubeClient, ResourceRef
from shadowctl.sim.kube_schema import prune, validate

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "properties": {
                "weight": {"type": "integer", "format": "int32", "minimum": 0, "maximum": 100},
                "mode": {"type": "string", "enum": ["a", "b"]},
                "port": {"x-kubernetes-int-or-string": True},
                "note": {"type": "string", "nullable": True},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "items": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
                },
                "body": {
                    "type": "object",
                    "properties": {"s": {"type": "string"}, "b": {"type": "string"}},
                    "oneOf": [
                        {"not": {"anyOf": [{"required": ["s"]}, {"required": ["b"]}]}},
                        {"required": ["s"]},
                        {"required": ["b"]},
                    ],
                },
                "big": {"type": "integer", "format": "int64"},
            },
        }
    },
}


def fields(obj: Any) -> list[str]:
    return [c.field for c in validate(obj, SCHEMA)]


def test_valid_object_has_no_causes() -> None:
    obj = {
        "spec": {
            "weight": 5,
            "mode": "a",
            "port": "http",
            "note": None,
            "labels": {"x": "y"},
            "items": [{"n": 1}],
            "body": {"s": "x"},
            "big": 2**40,
        }
    }
    assert validate(obj, SCHEMA) == []


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"weight": "5"}, "spec.weight"),
        ({"weight": 101}, "spec.weight"),
        ({"weight": 2**31}, "spec.weight"),
        ({"weight": True}, "spec.weight"),
        ({"mode": "c"}, "spec.mode"),
        ({"port": 1.5}, "spec.port"),
        ({"labels": {"x": 1}}, "spec.labels.x"),
        ({"items": [{"n": 1}, {}]}, "spec.items[1].n"),
        ({"body": {"s": "x", "b": "y"}}, "spec.body"),
        ({"big": 2**64}, "spec.big"),
    ],
)
def test_each_rule_reports_its_field(spec: dict[str, Any], field: str) -> None:
    assert field in fields({"spec": spec})


def test_required_root_field() -> None:
    assert fields({}) == ["spec"]


def test_prune_drops_undeclared_fields_but_keeps_preserved_ones() -> None:
    dropped: list[str] = []
    out = prune(
        {
            "apiVersion": "x",
            "spec": {
                "weight": 1,
                "bogus": 2,
                "free": {"any": {"thing": 1}},
                "items": [{"n": 1, "extra": 0}],
                "weight2": None,
            },
        },
        SCHEMA,
        "",
        dropped,
    )
    assert out == {"apiVersion": "x", "spec": {"weight": 1, "free": {"any": {"thing": 1}}, "items": [{"n": 1}]}}
    assert sorted(dropped) == ["spec.bogus", "spec.items[0].extra", "spec.weight2"]


def vs(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "r", "namespace": "default"},
        "spec": spec,
    }


@pytest.mark.crds
async def test_virtualservice_schema_rejects_bad_weight(crds_dir: Path, kube_client: KubeClient) -> None:
    bad = vs(hosts=["r"], http=[{"route": [{"destination": {"host": "r"}, "weight": "ten"}]}])
    with pytest.raises(Invalid) as info:
        await kube_client.create(VIRTUAL_SERVICE, bad)
    assert info.value.status == 422
    assert [c["field"] for c in info.value.causes] == ["spec.http[0].route[0].weight"]


@pytest.mark.crds
async def test_virtualservice_mirror_percentage_and_unknown_fields(crds_dir: Path, kube_client: KubeClient) -> None:
    obj = vs(
        hosts=["r"],
        http=[
            {
                "route": [{"destination": {"host": "r"}}],
                "mirror": {"host": "c"},
                "mirrorPercentage": {"value": 12.5},
                "madeUp": 1,
            }
        ],
    )
    created = await kube_client.create(VIRTUAL_SERVICE, obj)
    assert created["spec"]["http"][0]["mirrorPercentage"] == {"value": 12.5}
    assert "madeUp" not in created["spec"]["http"][0]  # pruned, as the API server does
    with pytest.raises(Invalid):
        await kube_client.patch_merge(
            ResourceRef(VIRTUAL_SERVICE, "r", "default"), {"spec": {"http": [{"route": [{"destination": {}}]}]}}
        )  # host required


@pytest.mark.crds
async def test_destinationrule_oneof_is_enforced(crds_dir: Path, kube_client: KubeClient) -> None:
    dr = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "r", "namespace": "default"},
        "spec": {
            "host": "r",
            "subsets": [{"name": "primary", "labels": {"v": "1"}}],
            "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN", "consistentHash": {"httpHeaderName": "x"}}},
        },
    }
    with pytest.raises(Invalid) as info:
        await kube_client.create(DESTINATION_RULE, dr)
    assert any("oneOf" in c["message"] for c in info.value.causes)
    del dr["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]
    created = await kube_client.create(DESTINATION_RULE, dr)
    assert created["spec"]["subsets"][0]["name"] == "primary"
