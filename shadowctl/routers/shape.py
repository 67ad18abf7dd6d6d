"""Typed gates for the objects the pure builders read, so that a mangled object is refused in words.

Why a gate and not checks where each field is read: the builders walk nested dicts from files and
from the API server, written by people and by other controllers; a string where a mapping belongs
would otherwise surface as an AttributeError from deep inside a builder, as a traceback in `render`
or a failed tick. Each builder declares the fields it reads with their upstream types (strict: no
coercion of "10" into 10, as the API server's schema would refuse it) and calls :func:`check_shape`
at its public entry points; fields it does not read pass unread (``extra="allow"``), so unknown
fields still survive a round trip.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from shadowctl.routers.base import WouldBeRejected


class Shape(BaseModel):
    """The base of a builder's shape: strict types for what it reads, anything else passes."""

    model_config = ConfigDict(extra="allow", strict=True)


class Metadata(Shape):
    """``metadata`` as the builders read it."""

    name: str | None = None
    namespace: str | None = None
    resourceVersion: str | None = None
    generation: int | None = None
    annotations: dict[str, str] | None = None
    labels: dict[str, str] | None = None


class Percent(Shape):
    """A ``{value: <double>}`` percentage (Istio's ``mirrorPercentage``)."""

    value: float | None = None


_EXPECTED = {
    "model_type": "expected a mapping", "dict_type": "expected a mapping", "list_type": "expected a list",
    "int_type": "expected an integer", "string_type": "expected a string", "float_type": "expected a number",
    "bool_type": "expected true or false", "missing": "required",
}
"""Pydantic's error types in the words of a Kubernetes schema (its messages name our private models)."""

_TYPE_TAGS = frozenset({"int", "float", "str", "bool", "none"})


def check_shape(model: type[Shape], obj: Any, kind: str) -> None:
    """Raise WouldBeRejected naming the first field of ``obj`` whose type is not ``model``'s, e.g.
    ``VirtualService llm/chat: spec.http[1].route[0].weight: expected an integer, got 'ten'``."""
    try:
        model.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]
                        if not (isinstance(p, str) and p in _TYPE_TAGS)).lstrip(".")
        got = err.get("input")
        shown = repr(got) if not isinstance(got, dict | list) else f"a {type(got).__name__}"
        what = _EXPECTED.get(err["type"], str(err["msg"]).lower())
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        named = kind
        if isinstance(meta, dict):
            named = f"{kind} {meta.get('namespace', '?')}/{meta.get('name', '?')}"
        raise WouldBeRejected(f"{named}: {where or 'the object'}: {what}, got {shown}") from exc

