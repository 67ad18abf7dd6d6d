"""CRD loading, OpenAPI v3 structural-schema validation and pruning, as kube-apiserver does them.

Why not the ``jsonschema`` package: a CRD schema is not JSON Schema. It has
``nullable``, ``x-kubernetes-int-or-string`` and
``x-kubernetes-preserve-unknown-fields``, formats with integer bounds
(int32/int64), and the server *prunes* unknown fields (they disappear, or fail
only under ``fieldValidation=Strict``) instead of rejecting them. The subset the
upstream Istio, Knative and shadowctl CRDs use is small, so it is implemented
here. CEL rules (``x-kubernetes-validations``) and defaulting are not evaluated.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
_ROOT_META = ("apiVersion", "kind", "metadata")


@dataclass(frozen=True)
class Cause:
    """One validation failure: a field path (``spec.http[0].route``), a reason and a message."""

    field: str
    reason: str
    message: str

    def to_status(self) -> dict[str, str]:
        return {"field": self.field, "reason": self.reason, "message": self.message}


@dataclass
class CRDVersion:
    """One served version of a CustomResourceDefinition."""

    group: str
    version: str
    plural: str
    kind: str
    singular: str
    namespaced: bool
    status_subresource: bool
    schema: dict[str, Any] | None
    short_names: list[str] = field(default_factory=list)


_LOADED: dict[tuple[str, float], list[CRDVersion]] = {}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_crd_file(path: Path) -> list[CRDVersion]:
    """The served versions of every CRD in a YAML file (other documents are skipped).

    Parsed once per file version: the upstream CRDs are large (15k lines) and
    every test starts an emulator. The schemas are shared and never mutated.
    """
    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _LOADED:
        out: list[CRDVersion] = []
        with path.open(encoding="utf-8") as fh:
            for doc in yaml.load_all(fh, Loader=_Loader):
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                    out.extend(crd_versions(doc))
        _LOADED[key] = out
    return list(_LOADED[key])


def crd_versions(crd: dict[str, Any]) -> list[CRDVersion]:
    """The served versions of one CRD object."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    out = []
    for ver in spec.get("versions") or []:
        if not ver.get("served", True):
            continue
        schema = (ver.get("schema") or {}).get("openAPIV3Schema")
        out.append(
            CRDVersion(
                group=spec["group"],
                version=ver["name"],
                plural=names["plural"],
                kind=names["kind"],
                singular=names.get("singular") or names["kind"].lower(),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                status_subresource="status" in (ver.get("subresources") or {}),
                schema=schema,
                short_names=list(names.get("shortNames") or []),
            )
        )
    return out


def _fmt(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_ok(value: Any, schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    match kind:
        case None:
            return True
        case "object":
            return isinstance(value, dict)
        case "array":
            return isinstance(value, list)
        case "string":
            return isinstance(value, str)
        case "boolean":
            return isinstance(value, bool)
        case "integer":
            if isinstance(value, float) and value.is_integer():
                return True
            return isinstance(value, int) and not isinstance(value, bool)
        case "number":
            return isinstance(value, int | float) and not isinstance(value, bool)
    return True


def _json_type(value: Any) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "boolean"
        case int():
            return "integer"
        case float():
            return "number"
        case str():
            return "string"
        case list():
            return "array"
        case dict():
            return "object"
    return type(value).__name__


def validate(value: Any, schema: dict[str, Any], path: str = "") -> list[Cause]:
    """Validate ``value`` against a structural schema; returns the failures (empty when valid)."""
    return list(_validate(value, schema, path))


def _validate(value: Any, schema: dict[str, Any], path: str) -> Iterator[Cause]:
    where = path or "<root>"
    if value is None:
        if schema.get("nullable") or not schema.get("type"):
            return
        yield Cause(where, "FieldValueTypeInvalid", f"{where}: Invalid value: null: must be of type {schema['type']}")
        return
    if not _type_ok(value, schema):
        want = "integer or string" if schema.get("x-kubernetes-int-or-string") else schema.get("type")
        yield Cause(
            where,
            "FieldValueTypeInvalid",
            f"{where}: Invalid value: {_json_type(value)!r}: {where} in body must be of type {want}",
        )
        return
    yield from _validate_scalar(value, schema, where)
    if isinstance(value, dict):
        yield from _validate_object(value, schema, path)
    elif isinstance(value, list):
        yield from _validate_array(value, schema, path)
    for key in ("allOf",):
        for sub in schema.get(key) or []:
            yield from _validate(value, sub, path)
    if "anyOf" in schema and not any(not validate(value, sub, path) for sub in schema["anyOf"]):
        yield Cause(where, "FieldValueInvalid", f"{where}: Invalid value: must validate at least one schema (anyOf)")
    if "oneOf" in schema:
        matching = sum(1 for sub in schema["oneOf"] if not validate(value, sub, path))
        if matching != 1:
            yield Cause(
                where,
                "FieldValueInvalid",
                f"{where}: Invalid value: must validate one and only one schema (oneOf); {matching} matched",
            )
    if "not" in schema and not validate(value, schema["not"], path):
        yield Cause(where, "FieldValueInvalid", f"{where}: Invalid value: must not validate the schema (not)")


def _validate_scalar(value: Any, schema: dict[str, Any], where: str) -> Iterator[Cause]:
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(repr(e) for e in schema["enum"])
        yield Cause(
            where, "FieldValueNotSupported", f"{where}: Unsupported value: {value!r}: supported values: {allowed}"
        )
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if is_number and schema.get("type") in ("integer", "number"):
        fmt = schema.get("format")
        bounds = INT32 if fmt == "int32" else INT64 if fmt == "int64" else None
        if bounds and not bounds[0] <= value <= bounds[1]:
            yield Cause(where, "FieldValueInvalid", f"{where}: Invalid value: {value}: out of range for {fmt}")
        if "minimum" in schema:
            low = schema["minimum"]
            if value < low or (schema.get("exclusiveMinimum") and value == low):
                op = ">" if schema.get("exclusiveMinimum") else ">="
                yield Cause(where, "FieldValueInvalid", f"{where}: Invalid value: {value}: should be {op} {low}")
        if "maximum" in schema:
            high = schema["maximum"]
            if value > high or (schema.get("exclusiveMaximum") and value == high):
                op = "<" if schema.get("exclusiveMaximum") else "<="
                yield Cause(where, "FieldValueInvalid", f"{where}: Invalid value: {value}: should be {op} {high}")
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            yield Cause(where, "FieldValueTooLong", f"{where}: Too long: may not be longer than {schema['maxLength']}")
        if "minLength" in schema and len(value) < schema["minLength"]:
            yield Cause(where, "FieldValueInvalid", f"{where}: Invalid value: shorter than {schema['minLength']}")
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            yield Cause(
                where, "FieldValueInvalid", f"{where}: Invalid value: {value!r}: should match {schema['pattern']!r}"
            )


def _validate_object(value: dict[str, Any], schema: dict[str, Any], path: str) -> Iterator[Cause]:
    where = path or "<root>"
    for name in schema.get("required") or []:
        if name not in value:
            field_path = _fmt(path, name)
            yield Cause(field_path, "FieldValueRequired", f"{field_path}: Required value")
    props = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    for key, sub in value.items():
        if not path and key in _ROOT_META:
            continue
        if key in props:
            yield from _validate(sub, props[key], _fmt(path, key))
        elif isinstance(extra, dict):
            yield from _validate(sub, extra, _fmt(path, key))
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        yield Cause(where, "FieldValueTooMany", f"{where}: Too many: must have at most {schema['maxProperties']} items")
    if "minProperties" in schema and len(value) < schema["minProperties"]:
        yield Cause(where, "FieldValueInvalid", f"{where}: must have at least {schema['minProperties']} properties")


def _validate_array(value: list[Any], schema: dict[str, Any], path: str) -> Iterator[Cause]:
    where = path or "<root>"
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        yield Cause(
            where, "FieldValueTooMany", f"{where}: Too many: {len(value)}: must have at most {schema['maxItems']} items"
        )
    if "minItems" in schema and len(value) < schema["minItems"]:
        yield Cause(where, "FieldValueInvalid", f"{where}: must have at least {schema['minItems']} items")
    items = schema.get("items")
    if isinstance(items, dict):
        for i, item in enumerate(value):
            yield from _validate(item, items, _fmt(path, i))
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "set":
        seen: list[Any] = []
        for i, item in enumerate(value):
            if item in seen:
                yield Cause(_fmt(path, i), "FieldValueDuplicate", f"{_fmt(path, i)}: Duplicate value: {item!r}")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        seen_keys: set[tuple[Any, ...]] = set()
        for i, item in enumerate(value):
            if isinstance(item, dict):
                key = tuple(repr(item.get(k)) for k in keys)
                if key in seen_keys:
                    yield Cause(_fmt(path, i), "FieldValueDuplicate", f"{_fmt(path, i)}: Duplicate value: {key}")
                seen_keys.add(key)


def prune(value: Any, schema: dict[str, Any] | None, path: str = "", dropped: list[str] | None = None) -> Any:
    """Drop fields the schema does not declare (and nulls it does not allow), as the API server does.

    Returns the pruned copy; the paths of dropped fields are appended to ``dropped``.
    """
    if dropped is None:
        dropped = []
    if schema is None or (schema.get("x-kubernetes-preserve-unknown-fields") and not schema.get("properties")):
        return value
    if isinstance(value, dict) and (schema.get("type") == "object" or "properties" in schema):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        keep_unknown = bool(schema.get("x-kubernetes-preserve-unknown-fields")) or extra is True
        out: dict[str, Any] = {}
        for key, sub in value.items():
            sub_path = _fmt(path, key)
            if not path and key in _ROOT_META:
                out[key] = sub
            elif key in props:
                if sub is None and not props[key].get("nullable") and props[key].get("type"):
                    continue  # a null for a non-nullable field is pruned, not rejected
                out[key] = prune(sub, props[key], sub_path, dropped)
            elif isinstance(extra, dict):
                out[key] = prune(sub, extra, sub_path, dropped)
            elif keep_unknown:
                out[key] = sub
            else:
                dropped.append(sub_path)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"], _fmt(path, i), dropped) for i, item in enumerate(value)]
    return value
