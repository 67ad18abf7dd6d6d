"""Generate the ShadowPolicy CustomResourceDefinition from the pydantic model.

Why a converter: Kubernetes wants a *structural* OpenAPI v3 schema, which is a
subset of JSON Schema: no `$ref`, no `const`, no `title`, nullable instead of a
`null` branch in `anyOf`, `additionalProperties` never beside `properties`, `exclusiveMinimum` a flag
beside `minimum` (OpenAPI v3.0) where JSON Schema 2020-12 gives the bound itself.
Generating the CRD from the same model that validates files keeps the two from
drifting; a test fails when the committed `deploy/crd.yaml` differs.
"""

from __future__ import annotations

import copy
import re
from datetime import timedelta
from typing import Any

from shadowctl.policy.duration import DURATION_PATTERN, format_duration
from shadowctl.policy.model import GROUP, KIND, PLURAL, VERSION, ShadowPolicy
from shadowctl.policy.status import PolicyStatus

_DROP = {"title", "examples", "discriminator"}
_ISO = re.compile(r"^P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?$")


def _iso_to_text(value: str) -> str:
    """Pydantic writes timedelta defaults as ISO 8601 (`PT5M`); policies write `5m`."""
    m = _ISO.match(value)
    if not m:
        return value
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
    total = days * 86400 + hours * 3600 + minutes * 60 + seconds
    return format_duration(timedelta(seconds=total))


def _structural(node: Any, defs: dict[str, Any], keep_defaults: bool = False) -> Any:
    if isinstance(node, list):
        return [_structural(x, defs, keep_defaults) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        target.update(extra)
        return _structural(target, defs, keep_defaults)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            # JSON Schema 2020-12 (pydantic) gives the bound; OpenAPI v3.0 (Kubernetes) a flag beside it.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
            continue
        out[key] = _structural(value, defs, keep_defaults)
    branches = out.get("anyOf")
    if isinstance(branches, list):
        non_null = [b for b in branches if b.get("type") != "null"]
        if len(non_null) < len(branches):
            out["nullable"] = True
        if len(non_null) == 1:
            del out["anyOf"]
            merged = dict(non_null[0])
            merged.update({k: v for k, v in out.items() if k not in merged})
            out = merged
        elif all(b.get("type") in ("string", "number", "integer") for b in non_null):
            # A scalar that may be written several ways (a margin as '10%' or 0.005):
            # structural schemas cannot say "string or number", so accept any value
            # here and let the controller's model validate it.
            del out["anyOf"]
            out["x-kubernetes-preserve-unknown-fields"] = True
        else:
            out["anyOf"] = non_null
    if out.get("type") == "object" and "properties" in out:
        out.pop("additionalProperties", None)
    if "default" in out and (out["default"] is None or not keep_defaults):
        del out["default"]
    elif isinstance(out.get("default"), str) and out.get("pattern") == DURATION_PATTERN:
        out["default"] = _iso_to_text(out["default"])
    if out.get("type") == "object" and out.get("additionalProperties") is True:
        out.pop("additionalProperties")
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def status_openapi_schema() -> dict[str, Any]:
    """The structural schema of `.status`, from the model the controller writes it with."""
    raw = PolicyStatus.model_json_schema(by_alias=True, mode="serialization")
    schema: dict[str, Any] = _structural(raw, raw.get("$defs", {}))
    schema.pop("required", None)  # the status subresource starts empty; the controller fills it
    return schema


def policy_openapi_schema() -> dict[str, Any]:
    """The structural openAPIV3Schema of a ShadowPolicy (spec and status, each from its model)."""
    raw = ShadowPolicy.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    schema = _structural(raw, defs)
    props = schema["properties"]
    props["metadata"] = {"type": "object"}
    props["status"] = status_openapi_schema()
    schema.pop("description", None)
    schema["required"] = ["spec"]
    return dict(schema)


def json_schema() -> dict[str, Any]:
    """JSON Schema of a policy file, for editors (yaml-language-server)."""
    raw = ShadowPolicy.model_json_schema(by_alias=True, mode="validation")
    schema: dict[str, Any] = _fix_defaults(raw)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ShadowPolicy"
    return schema


def _fix_defaults(node: Any) -> Any:
    if isinstance(node, list):
        return [_fix_defaults(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _fix_defaults(v) for k, v in node.items()}
    if isinstance(out.get("default"), str) and out.get("pattern") == DURATION_PATTERN:
        out["default"] = _iso_to_text(out["default"])
    return out


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["shp"],
                "categories": ["all"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Weight", "type": "integer", "jsonPath": ".status.canaryWeight"},
                        {"name": "Mirror", "type": "number", "jsonPath": ".status.mirrorPercent"},
                        {"name": "Verdict", "type": "string", "jsonPath": ".status.lastVerdict.outcome"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": policy_openapi_schema()},
                }
            ],
        },
    }
