"""Pure builders for an Istio ``networking.istio.io/v1`` VirtualService: ``new = f(current, spec, state)``.

Only one ``http`` route is ever changed, and in it only: the ``weight`` of the
primary and candidate destinations, the candidate destination itself (added
when it first gets weight, removed at finalize when shadowctl added it), and
shadowctl's mirror. Everything else (other routes, matches, retries, headers,
faults, unknown fields) is carried over untouched, because the builders edit a
deep copy in place instead of re-rendering the object.

Choices that keep the result predictable:

* A third destination that carries weight is refused, not rebalanced; one at
  weight 0 is left alone.
* With two destinations both weights are written explicitly; a lone primary
  keeps its ``weight`` as written (absent means 100).
* The mirror is written as ``mirror`` + ``mirrorPercentage: {value: <double>}``
  (absent ``mirrorPercentage`` would mean 100%). The deprecated
  ``mirrorPercent`` is never written. When the route already uses the
  ``mirrors:`` list, shadowctl manages its own entry there and keeps the others.
* A ``mirror`` that points somewhere else is replaced while shadowctl mirrors,
  and put back (from the ownership record) when it stops. A mirror that already
  points at the candidate is treated as shadowctl's own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from shadowctl.policy.model import Destination, IstioTarget, MirrorVirtualService
from shadowctl.routers import shape
from shadowctl.routers.base import (
    DestinationNotFound,
    RouteNotFound,
    RouteState,
    UnmanagedTraffic,
    WouldBeRejected,
)
from shadowctl.routers.record import JSON, Build, load_record, object_name, store_record

_MIRROR_KEYS = ("mirror", "mirrorPercentage", "mirrorPercent", "mirror_percent")
_DEPRECATED_MIRROR_KEYS = ("mirrorPercent", "mirror_percent")


@dataclass(frozen=True)
class IstioRouteSpec:
    """Which route of which VirtualService, which destinations, and whether weights are shadowctl's."""

    virtual_service: str
    route: str | None
    primary: Destination | None
    candidate: Destination
    manage_weights: bool = True

    @classmethod
    def of(cls, target: IstioTarget | MirrorVirtualService | IstioRouteSpec) -> IstioRouteSpec:
        """The spec for a policy's Istio target (weights and mirror) or a Knative target's mirror VS."""
        if isinstance(target, IstioRouteSpec):
            return target
        if isinstance(target, IstioTarget):
            return cls(target.virtual_service, target.route, target.primary, target.candidate, True)
        return cls(target.name, target.route, target.primary, target.candidate, False)


Target = IstioTarget | MirrorVirtualService | IstioRouteSpec


# --------------------------------------------------------------------------- the shape the builders read


class _Port(shape.Shape):
    number: int | None = Field(default=None, ge=0, le=65535)


class _Destination(shape.Shape):
    host: str
    subset: str | None = None
    port: _Port | None = None


class _RouteDestination(shape.Shape):
    destination: _Destination
    weight: int | None = Field(default=None, ge=0)


class _MirrorEntry(shape.Shape):
    destination: _Destination
    percentage: shape.Percent | None = None


class _HttpRoute(shape.Shape):
    name: str | None = None
    route: list[_RouteDestination] | None = None
    mirror: _Destination | None = None
    mirrorPercentage: shape.Percent | None = None
    mirrors: list[_MirrorEntry] | None = None


class _Spec(shape.Shape):
    http: list[_HttpRoute | None] | None = None


class _VirtualService(shape.Shape):
    metadata: shape.Metadata = Field(default_factory=shape.Metadata)
    spec: _Spec = Field(default_factory=_Spec)


def check_shape(obj: Any) -> None:
    """Raise WouldBeRejected naming the first field whose type is not Istio's (see :mod:`.shape`)."""
    shape.check_shape(_VirtualService, obj, "VirtualService")


# --------------------------------------------------------------------------- public builders


def build(current: JSON, target: Target, state: RouteState) -> Build:
    """The VirtualService routing as ``state``; weights are ignored for a mirror-only spec."""
    check_shape(current)
    spec = IstioRouteSpec.of(target)
    obj = copy.deepcopy(current)
    record = load_record(obj)
    _, key, route = _select_route(obj, spec)
    before = copy.deepcopy(route)
    routes_rec: JSON = record.setdefault("routes", {})
    rec: JSON = routes_rec.get(key) or _new_record(route, spec, obj)
    where = _where(obj, key)
    if spec.manage_weights:
        _set_weights(route, spec, state, rec, where)
    elif spec.primary is not None:  # mirror only: the primary must still be where the policy says
        _find(_entries(route, where), spec.primary, "primary", where, required=True)
    _set_mirror(route, spec, state.mirror_percent, rec, where)
    if route != before or key in routes_rec:
        routes_rec[key] = rec
    _check_route(route, where)
    store_record(obj, record)
    return Build(obj, obj != current)


def finalize(current: JSON, target: Target, keep_candidate: bool = False) -> Build:
    """Undo shadowctl's changes to the route: 100% primary, its mirror gone, its candidate destination gone."""
    check_shape(current)
    spec = IstioRouteSpec.of(target)
    record = load_record(current)
    _, key, _ = _select_route(copy.deepcopy(current), spec)
    rec = (record.get("routes") or {}).get(key) or {}
    obj, _ = build(current, spec, RouteState.primary_only())
    record = load_record(obj)
    _, _, route = _select_route(obj, spec)
    if spec.manage_weights and spec.primary is not None:
        entries: list[JSON] = route["route"]
        if rec.get("addedCandidate") and not keep_candidate:
            c = _find(entries, spec.candidate, "candidate", _where(obj, key), required=False)
            if c is not None:
                del entries[c]
        if len(entries) == 1 and rec:
            raw = rec.get("primaryWeight")
            if raw is None:
                entries[0].pop("weight", None)
            elif raw == 100:
                entries[0]["weight"] = 100
    (record.get("routes") or {}).pop(key, None)
    store_record(obj, record)
    return Build(obj, obj != current)


def promote(current: JSON, target: Target) -> Build:
    """Candidate weight 100, no mirror of ours, and the ownership record for the route removed."""
    check_shape(current)
    spec = IstioRouteSpec.of(target)
    obj, _ = build(current, spec, RouteState(0, 100, None))
    record = load_record(obj)
    _, key, _ = _select_route(obj, spec)
    (record.get("routes") or {}).pop(key, None)
    store_record(obj, record)
    return Build(obj, obj != current)


def read_state(obj: JSON, target: Target) -> RouteState:
    """The route's current weights and shadowctl's mirror (a mirror-only spec reports 100/0 and its mirror)."""
    check_shape(obj)
    spec = IstioRouteSpec.of(target)
    _, key, route = _select_route(obj, spec)
    where = _where(obj, key)
    rec = (load_record(obj).get("routes") or {}).get(key)
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    mirror = read_mirror(route, spec)
    if not spec.manage_weights:
        return RouteState(100, 0, mirror, resource_version=rv, owned=rec)
    entries = _entries(route, where)
    assert spec.primary is not None
    p = _find(entries, spec.primary, "primary", where, required=True)
    c = _find(entries, spec.candidate, "candidate", where, required=False)
    _refuse_others(entries, {p, c}, where)
    assert p is not None
    pw = _weight(entries[p], len(entries))
    cw = _weight(entries[c], len(entries)) if c is not None else 0
    if pw + cw != 100:
        raise WouldBeRejected(f"{where}: destination weights sum to {pw + cw}, not 100")
    return RouteState(pw, cw, mirror, resource_version=rv, owned=rec)


def read_mirror(route: JSON, target: Target) -> float | None:
    """The percentage mirrored to the candidate by this route (None: not mirrored there)."""
    spec = IstioRouteSpec.of(target)
    mirrors = route.get("mirrors")
    if isinstance(mirrors, list):
        for entry in mirrors:
            if isinstance(entry, dict) and _matches(entry.get("destination") or {}, spec.candidate):
                return _percentage(entry.get("percentage"), None)
        return None
    mirror = route.get("mirror")
    if isinstance(mirror, dict) and _matches(mirror, spec.candidate):
        return _percentage(route.get("mirrorPercentage"), route.get("mirrorPercent"))
    return None


def destination_object(dest: Destination) -> JSON:
    """The Istio ``Destination`` object for a policy destination."""
    out: JSON = {"host": dest.host}
    if dest.subset:
        out["subset"] = dest.subset
    if dest.port:
        out["port"] = {"number": dest.port}
    return out


def candidate_object(route: JSON, spec: IstioRouteSpec) -> JSON:
    """The Istio ``Destination`` written for the candidate in ``route``.

    A candidate on the primary's host named without a port takes the port of the primary's destination
    in this route: the same Service, so the same port. Written without one, Istio picks the Service's
    only port, or rejects the route when the Service has several, while the primary's share goes to the
    port the route names (a candidate on another host is written as given).
    """
    out = destination_object(spec.candidate)
    if spec.candidate.port is not None or spec.primary is None or spec.candidate.host != spec.primary.host:
        return out
    entries = route.get("route")
    for entry in entries if isinstance(entries, list) else []:
        dest = entry.get("destination") if isinstance(entry, dict) else None
        if isinstance(dest, dict) and _matches(dest, spec.primary):
            port = dest.get("port")
            if isinstance(port, dict) and isinstance(port.get("number"), int):
                out["port"] = {"number": port["number"]}
            break
    return out


def route_names(obj: JSON) -> list[str]:
    """The http routes' names (``#<index>`` for unnamed ones), for messages and the CLI."""
    check_shape(obj)
    http = (obj.get("spec") or {}).get("http") or []
    return [_route_key(r, i) for i, r in enumerate(http) if isinstance(r, dict)]


# --------------------------------------------------------------------------- route selection


def _route_key(route: Any, index: int) -> str:
    name = route.get("name") if isinstance(route, dict) else None
    return name if isinstance(name, str) and name else f"#{index}"


def _where(obj: JSON, key: str) -> str:
    return f"{object_name(obj)} http route {key!r}"


def _select_route(obj: JSON, spec: IstioRouteSpec) -> tuple[int, str, JSON]:
    spec_obj = obj.get("spec")
    http = spec_obj.get("http") if isinstance(spec_obj, dict) else None
    name = object_name(obj)
    if not isinstance(http, list) or not http:
        raise RouteNotFound(f"{name} has no http routes (spec.http is empty); shadowctl manages http routes only")
    keys = [_route_key(r, i) for i, r in enumerate(http)]
    if spec.route is None:
        if len(http) != 1:
            raise RouteNotFound(
                f"{name} has {len(http)} http routes ({', '.join(keys)}); name the one to manage "
                "(target.istio.route)"
            )
        index = 0
    else:
        found = [i for i, r in enumerate(http) if isinstance(r, dict) and r.get("name") == spec.route]
        if not found:
            raise RouteNotFound(f"{name} has no http route named {spec.route!r}; its routes: {', '.join(keys)}")
        if len(found) > 1:
            raise RouteNotFound(f"{name} has {len(found)} http routes named {spec.route!r}; names must be unique")
        index = found[0]
    route = http[index]
    if not isinstance(route, dict):
        raise WouldBeRejected(f"{name}: spec.http[{index}] is not an object")
    return index, keys[index], route


def _entries(route: JSON, where: str) -> list[JSON]:
    entries = route.get("route")
    if not isinstance(entries, list) or not entries:
        kind = "redirect" if "redirect" in route else "directResponse" if "directResponse" in route else "no route"
        raise DestinationNotFound(f"{where} does not forward to destinations ({kind}); it cannot carry a canary")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("destination"), dict):
            raise WouldBeRejected(f"{where}: route[{i}] has no destination")
    return entries


def _label(dest: JSON) -> str:
    text = str(dest.get("host", "?")) + (f"/{dest['subset']}" if dest.get("subset") else "")
    port = dest.get("port")
    if isinstance(port, dict) and port.get("number") is not None:
        text += f":{port['number']}"
    return text


def _matches(dest: JSON, want: Destination) -> bool:
    if dest.get("host") != want.host or (dest.get("subset") or None) != want.subset:
        return False
    if want.port is None:
        return True
    port = dest.get("port")
    return isinstance(port, dict) and port.get("number") == want.port


def _find(entries: list[JSON], want: Destination, role: str, where: str, *, required: bool) -> int | None:
    found = [i for i, e in enumerate(entries) if _matches(e["destination"], want)]
    if len(found) > 1:
        raise DestinationNotFound(
            f"{where}: the {role} {want.label()} matches {len(found)} destinations "
            f"({', '.join(_label(entries[i]['destination']) for i in found)}); give its port to tell them apart"
        )
    if not found:
        if required:
            present = ", ".join(_label(e["destination"]) for e in entries)
            raise DestinationNotFound(f"{where} has no {role} destination {want.label()}; it has: {present}")
        return None
    return found[0]


def _weight(entry: JSON, count: int) -> int:
    raw = entry.get("weight")
    if raw is None:
        return 100 if count == 1 else 0
    return int(raw)


def _refuse_others(entries: list[JSON], mine: set[int | None], where: str) -> None:
    carrying = [
        f"{_label(e['destination'])} (weight {_weight(e, len(entries))})"
        for i, e in enumerate(entries)
        if i not in mine and _weight(e, len(entries)) > 0
    ]
    if carrying:
        raise UnmanagedTraffic(
            f"{where} also sends traffic to {', '.join(carrying)}, which is neither primary nor candidate; "
            "shadowctl will not guess how to rebalance it: move that traffic first"
        )


def _new_record(route: JSON, spec: IstioRouteSpec, obj: JSON) -> JSON:
    rec: JSON = {"weights": spec.manage_weights, "addedCandidate": False, "replacedMirror": None}
    if spec.manage_weights and spec.primary is not None:
        entries = route.get("route")
        if isinstance(entries, list):
            for entry in entries:
                if isinstance(entry, dict) and _matches(entry.get("destination") or {}, spec.primary):
                    rec["primaryWeight"] = entry.get("weight")
                    break
    return rec


# --------------------------------------------------------------------------- weights and mirror


def _set_weights(route: JSON, spec: IstioRouteSpec, state: RouteState, rec: JSON, where: str) -> None:
    assert spec.primary is not None
    entries = _entries(route, where)
    p = _find(entries, spec.primary, "primary", where, required=True)
    c = _find(entries, spec.candidate, "candidate", where, required=False)
    _refuse_others(entries, {p, c}, where)
    assert p is not None
    if c is None and state.candidate_weight > 0:
        entries.append({"destination": candidate_object(route, spec), "weight": state.candidate_weight})
        rec["addedCandidate"] = True
        c = len(entries) - 1
    if len(entries) == 1:
        if _weight(entries[p], 1) != state.primary_weight:  # pragma: no cover - a lone primary is 100 by now
            entries[p]["weight"] = state.primary_weight
        return
    entries[p]["weight"] = state.primary_weight
    if c is not None:
        entries[c]["weight"] = state.candidate_weight


def _set_mirror(route: JSON, spec: IstioRouteSpec, percent: float | None, rec: JSON, where: str) -> None:
    mirrors = route.get("mirrors")
    if mirrors is not None:
        _set_mirror_list(route, mirrors, spec, percent, where)
        return
    current = route.get("mirror")
    # Ours: to this candidate, or the one the record says shadowctl wrote (for a candidate the policy named
    # before, in a start whose status never landed): never taken for another's mirror to put back later.
    ours = isinstance(current, dict) and (_matches(current, spec.candidate) or current == rec.get("wroteMirror"))
    if percent is not None:
        if current is not None and not ours and not rec.get("replacedMirror"):
            rec["replacedMirror"] = {k: route[k] for k in _MIRROR_KEYS if k in route}
        for k in _DEPRECATED_MIRROR_KEYS:
            route.pop(k, None)
        if not (isinstance(current, dict) and _matches(current, spec.candidate)):
            route["mirror"] = candidate_object(route, spec)
        route["mirrorPercentage"] = {"value": float(percent)}
        rec["wroteMirror"] = copy.deepcopy(route["mirror"])
        return
    if ours:
        for k in _MIRROR_KEYS:
            route.pop(k, None)
    replaced = rec.get("replacedMirror")
    if replaced and (ours or current is None):
        route.update(copy.deepcopy(replaced))
    rec["replacedMirror"] = None
    rec.pop("wroteMirror", None)


def _set_mirror_list(
    route: JSON, mirrors: Any, spec: IstioRouteSpec, percent: float | None, where: str
) -> None:
    if not isinstance(mirrors, list):
        raise WouldBeRejected(f"{where}: mirrors is not a list")
    if route.get("mirror") is not None:
        raise WouldBeRejected(f"{where} sets both mirror and mirrors; Istio rejects that, fix the route first")
    ours = [i for i, m in enumerate(mirrors) if isinstance(m, dict) and _matches(m.get("destination") or {},
                                                                                spec.candidate)]
    if len(ours) > 1:
        raise WouldBeRejected(f"{where}: mirrors lists the candidate {spec.candidate.label()} {len(ours)} times")
    if percent is None:
        for i in reversed(ours):
            del mirrors[i]
        return
    if ours:
        mirrors[ours[0]]["percentage"] = {"value": float(percent)}
    else:
        mirrors.append({"destination": candidate_object(route, spec), "percentage": {"value": float(percent)}})


def _percentage(value: Any, deprecated: Any) -> float:
    if isinstance(value, dict) and isinstance(value.get("value"), int | float):
        return float(value["value"])
    if isinstance(deprecated, int | float) and not isinstance(deprecated, bool):
        return float(deprecated)
    return 100.0


def _check_route(route: JSON, where: str) -> None:
    """Refuse what Istio's validation would reject in the route shadowctl wrote."""
    entries = route.get("route")
    if isinstance(entries, list) and len(entries) > 1:
        weights = [_weight(e, len(entries)) for e in entries if isinstance(e, dict)]
        if any(w < 0 for w in weights) or sum(weights) != 100:
            raise WouldBeRejected(f"{where}: destination weights would sum to {sum(weights)}, not 100")
    pct = route.get("mirrorPercentage")
    values = [pct] + [m.get("percentage") for m in route.get("mirrors") or [] if isinstance(m, dict)]
    for v in values:
        if isinstance(v, dict) and isinstance(v.get("value"), int | float) and not 0 <= v["value"] <= 100:
            raise WouldBeRejected(f"{where}: a mirror percentage of {v['value']} is outside 0..100")
