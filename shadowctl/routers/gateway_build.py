"""Pure builders for a Gateway API ``gateway.networking.k8s.io/v1`` HTTPRoute: ``new = f(current, target, state)``.

Only one rule of the route is ever changed (by ``name``, or the only rule), and
in it only:

* the ``weight`` of its ``backendRefs``. Weights are proportions of the rule's
  total (absent means 1), not percents: the candidate gets exactly the step's
  share of the total, backends that are neither primary nor candidate keep
  their share, and the primary gives up the difference. Where the total cannot
  express the step exactly (a total of 1 and a step of 10%), every weight of the
  rule is multiplied by the smallest factor that can (1 -> 10: the primary 9,
  the candidate 1), so others' shares stay exact. Only weights that change are
  written;
* the candidate's backendRef, added (after the others) when it first gets
  weight, with the primary's port when the policy names none, and removed at
  finalize when shadowctl added it;
* shadowctl's ``RequestMirror`` filter: one rule-level filter whose
  ``backendRef`` is the candidate, with ``percent`` (a whole percent) or
  ``fraction`` (``numerator`` over ``denominator`` = 100 x 10^k, exact for up to
  seven decimals). It is appended after the rule's other filters, which stay as
  they are, others' mirrors included. A mirror to the candidate that is already
  there counts as shadowctl's (as for Istio).

Matches, other filters, per-backend filters, timeouts, other rules, parentRefs,
hostnames and unknown fields are carried over untouched: the builders edit a
deep copy in place. The ownership record (annotation ``shadowctl.dev/managed``)
keeps, per rule, the weights as they were written before the first change, so
that finalize restores them exactly (when the other backends' shares have not
been changed in between; else their current shares are kept), and the candidate
it was written for (``candidate``).

A backend that is neither primary nor candidate keeps its share, unlike Istio's
third destination, which is refused: others' backends are part of a rule's normal
life. The one exception is the candidate the record was written for, when the
policy names another one now: that backend is shadowctl's (its weight, its mirror,
and the backendRef itself when shadowctl added it), so every builder first undoes
it (as ``finalize`` for that candidate would) and only then routes the candidate
named now. Without that, a write for the new candidate would count the old one's
share as someone else's and keep it for good (bench/faults r-00201). A record from
before ``candidate`` was kept names none, and is read as before.
"""

from __future__ import annotations

import copy
import math
from decimal import Decimal
from fractions import Fraction
from typing import Any

from pydantic import Field

from shadowctl.policy.model import BackendRef, GatewayAPITarget
from shadowctl.routers import shape
from shadowctl.routers.base import (
    DestinationNotFound,
    RouteNotFound,
    RouteState,
    UnmanagedTraffic,
    WouldBeRejected,
)
from shadowctl.routers.record import JSON, Build, load_record, object_name, store_record

MAX_WEIGHT = 1_000_000
"""The CRD's maximum for ``backendRefs[].weight``."""
MAX_INT32 = 2**31 - 1
MAX_FILTERS = 16
MAX_BACKEND_REFS = 16
MIRROR_DECIMALS = 7
"""A fraction's denominator is an int32: 100 x 10^7 is the finest power of ten that fits."""


# --------------------------------------------------------------------------- public builders


class _BackendRef(shape.Shape):
    name: str | None = None
    namespace: str | None = None
    group: str | None = None
    kind: str | None = None
    port: int | None = Field(default=None, ge=0, le=65535)
    weight: int | None = Field(default=None, ge=0, le=1_000_000)


class _Fraction(shape.Shape):
    numerator: int | None = None
    denominator: int | None = None


class _RequestMirror(shape.Shape):
    backendRef: _BackendRef | None = None
    percent: int | None = Field(default=None, ge=0, le=100)
    fraction: _Fraction | None = None


class _Filter(shape.Shape):
    type: str | None = None
    requestMirror: _RequestMirror | None = None


class _Rule(shape.Shape):
    name: str | None = None
    backendRefs: list[_BackendRef] | None = None
    filters: list[_Filter] | None = None


class _Spec(shape.Shape):
    rules: list[_Rule] | None = None


class _HTTPRoute(shape.Shape):
    metadata: shape.Metadata = Field(default_factory=shape.Metadata)
    spec: _Spec = Field(default_factory=_Spec)


def check_shape(obj: Any) -> None:
    """Raise WouldBeRejected naming the first field whose type is not the Gateway API's (see :mod:`.shape`)."""
    shape.check_shape(_HTTPRoute, obj, "HTTPRoute")


def build(current: JSON, target: GatewayAPITarget, state: RouteState) -> Build:
    """The HTTPRoute with the candidate at ``state.candidate_weight`` percent of the rule and its mirror."""
    check_shape(current)
    obj = _undo_previous_candidate(copy.deepcopy(current), target)
    record = load_record(obj)
    key, rule = _select_rule(obj, target)
    before = copy.deepcopy(rule)
    rules_rec: JSON = record.setdefault("rules", {})
    rec: JSON = rules_rec.get(key) or _new_record(obj, rule, target)
    where = _where(obj, key)
    _set_weights(obj, rule, target, state.candidate_weight, rec, where)
    set_mirror(obj, rule, target, state.mirror_percent, where)
    if rule != before or key in rules_rec:
        rules_rec[key] = rec
    check_rule(rule, where)
    store_record(obj, record)
    return Build(obj, obj != current)


def finalize(current: JSON, target: GatewayAPITarget, keep_candidate: bool = False) -> Build:
    """Undo shadowctl's changes to the rule: the candidate at 0 (removed if shadowctl added it), its mirror gone,
    the weights as they were written before (when the others' shares are unchanged)."""
    check_shape(current)
    current = _undo_previous_candidate(copy.deepcopy(current), target)
    record = load_record(current)
    key, _ = _select_rule(copy.deepcopy(current), target)
    rec = (record.get("rules") or {}).get(key) or {}
    obj, _ = build(current, target, RouteState.primary_only())
    record = load_record(obj)
    _, rule = _select_rule(obj, target)
    where = _where(obj, key)
    ns = _namespace(obj)
    entries = backend_refs(rule, where)
    c = _find(entries, target.candidate, ns, "candidate", where, required=False)
    added = c if rec.get("addedCandidate") else None
    if added is not None and not keep_candidate:
        del entries[added]
        added = None
    _restore_weights(entries, added, rec.get("weights"), ns)
    check_rule(rule, where)
    (record.get("rules") or {}).pop(key, None)
    store_record(obj, record)
    return Build(obj, obj != current)


def promote(current: JSON, target: GatewayAPITarget) -> Build:
    """The candidate takes the primary's weight (the primary stays at 0), others keep theirs; no mirror of ours,
    and the rule's ownership record removed. Idempotent."""
    check_shape(current)
    obj = _undo_previous_candidate(copy.deepcopy(current), target)
    record = load_record(obj)
    key, rule = _select_rule(obj, target)
    where = _where(obj, key)
    ns = _namespace(obj)
    entries = backend_refs(rule, where)
    p = _find(entries, target.primary, ns, "primary", where, required=True)
    c = _find(entries, target.candidate, ns, "candidate", where, required=False)
    assert p is not None
    wp = weight_of(entries[p], where)
    if c is None:
        if wp > 0:
            entries.append(_new_backend(entries, entries[p], target, where, wp))
    elif wp > 0:
        entries[c]["weight"] = weight_of(entries[c], where) + wp
    if wp > 0:
        entries[p]["weight"] = 0
    set_mirror(obj, rule, target, None, where)
    check_rule(rule, where)
    (record.get("rules") or {}).pop(key, None)
    store_record(obj, record)
    return Build(obj, obj != current)


def read_state(obj: JSON, target: GatewayAPITarget) -> RouteState:
    """The candidate's share of the rule's total weight (in percent), and the mirrored share.

    ``primary_weight`` is everything that is not the candidate's (100 minus its share): the
    backends of others are not part of the state. A share that is not a whole percent (only a
    hand edit makes one) is rounded up, so that the candidate never looks smaller than it is.
    """
    check_shape(obj)
    key, rule = _select_rule(obj, target)
    where = _where(obj, key)
    ns = _namespace(obj)
    entries = backend_refs(rule, where)
    p = _find(entries, target.primary, ns, "primary", where, required=True)
    c = _find(entries, target.candidate, ns, "candidate", where, required=False)
    assert p is not None
    weights = [weight_of(e, where) for e in entries]
    total = sum(weights)
    if total == 0:
        raise WouldBeRejected(f"{where}: every backendRef has weight 0, so the rule serves errors only")
    share = math.ceil(Fraction(100 * weights[c], total)) if c is not None else 0
    rec = (load_record(obj).get("rules") or {}).get(key)
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    return RouteState(100 - share, share, read_mirror(obj, rule, target), resource_version=rv, owned=rec)


def read_mirror(obj: JSON, rule: JSON, target: GatewayAPITarget) -> float | None:
    """The percentage of the rule's requests mirrored to the candidate (None: not mirrored there)."""
    ns = _namespace(obj)
    for f in rule.get("filters") or []:
        if _is_candidate_mirror(f, target.candidate, ns):
            return mirror_percent_of(f["requestMirror"])
    return None


def mirror_percent_of(mirror: JSON) -> float:
    """A RequestMirror's share in percent: ``percent``, else ``fraction`` (denominator default 100), else 100."""
    pct = mirror.get("percent")
    if isinstance(pct, int) and not isinstance(pct, bool):
        return float(pct)
    frac = mirror.get("fraction")
    if isinstance(frac, dict):
        num, den = frac.get("numerator"), frac.get("denominator", 100)
        if isinstance(num, int) and isinstance(den, int) and den > 0:
            return num * 100 / den
    return 100.0


def mirror_share(percent: float) -> JSON:
    """``{"percent": n}`` for a whole percent, else ``{"fraction": {numerator, denominator}}`` with a
    power-of-ten denominator that gives back exactly ``percent``. WouldBeRejected beyond seven decimals."""
    if percent == int(percent):
        return {"percent": int(percent)}
    exact = Decimal(repr(percent))
    decimals = max(0, -int(exact.as_tuple().exponent))
    if decimals > MIRROR_DECIMALS:
        raise WouldBeRejected(
            f"a mirror of {percent!r}% cannot be written as a Gateway API fraction (an int32 denominator "
            f"holds at most {MIRROR_DECIMALS} decimals of a percent); round it"
        )
    return {"fraction": {"numerator": int(exact.scaleb(decimals)), "denominator": 100 * 10**decimals}}


def rule_names(obj: JSON) -> list[str]:
    """The rules' names (``#<index>`` for unnamed ones), for messages and the CLI."""
    check_shape(obj)
    rules = (obj.get("spec") or {}).get("rules") or []
    return [_rule_key(r, i) for i, r in enumerate(rules)]


def backend_label(ref: Any, namespace: str | None = None) -> str:
    """``namespace/name:port`` of a backendRef object (the namespace only when it is not the route's)."""
    if not isinstance(ref, dict):
        return "?"
    kind = ref.get("kind") or "Service"
    group = ref.get("group") or ""
    text = "" if (kind, group) == ("Service", "") else f"{kind}.{group or 'core'} "
    ns = ref.get("namespace")
    text += (f"{ns}/" if ns and ns != namespace else "") + str(ref.get("name", "?"))
    return text + (f":{ref['port']}" if ref.get("port") is not None else "")


def weight_of(entry: JSON, where: str = "") -> int:
    """A backendRef's weight: absent means 1 (the CRD's default)."""
    raw = entry.get("weight", 1)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= MAX_WEIGHT:
        raise WouldBeRejected(f"{where}: backendRef {backend_label(entry)} has weight {raw!r}, "
                              f"not an integer from 0 to {MAX_WEIGHT}")
    return raw


def backend_refs(rule: JSON, where: str) -> list[JSON]:
    """The rule's backendRefs; DestinationNotFound when it forwards nowhere (a redirect, or none)."""
    entries = rule.get("backendRefs")
    if not isinstance(entries, list) or not entries:
        kinds = {str(f.get("type")) for f in rule.get("filters") or [] if isinstance(f, dict)}
        what = "it redirects" if "RequestRedirect" in kinds else "it has no backendRefs"
        raise DestinationNotFound(f"{where} does not forward to backends ({what}); it cannot carry a canary")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("name"):
            raise WouldBeRejected(f"{where}: backendRefs[{i}] has no name")
    return entries


# --------------------------------------------------------------------------- rule selection


def _namespace(obj: JSON) -> str | None:
    ns = (obj.get("metadata") or {}).get("namespace")
    return ns if isinstance(ns, str) and ns else None


def _rule_key(rule: Any, index: int) -> str:
    name = rule.get("name") if isinstance(rule, dict) else None
    return name if isinstance(name, str) and name else f"#{index}"


def _where(obj: JSON, key: str) -> str:
    return f"{object_name(obj)} rule {key!r}"


def _select_rule(obj: JSON, target: GatewayAPITarget) -> tuple[str, JSON]:
    name = object_name(obj)
    if obj.get("kind") not in (None, "HTTPRoute") or not str(
        obj.get("apiVersion", "gateway.networking.k8s.io/")
    ).startswith("gateway.networking.k8s.io/"):
        raise RouteNotFound(f"{name} is not a Gateway API HTTPRoute (gateway.networking.k8s.io/v1)")
    spec = obj.get("spec")
    rules = spec.get("rules") if isinstance(spec, dict) else None
    if not isinstance(rules, list) or not rules:
        raise RouteNotFound(f"{name} has no rules (spec.rules is empty)")
    keys = [_rule_key(r, i) for i, r in enumerate(rules)]
    if target.rule is None:
        if len(rules) != 1:
            raise RouteNotFound(f"{name} has {len(rules)} rules ({', '.join(keys)}); name the one to manage "
                                "(target.gatewayAPI.rule, the rule's name)")
        index = 0
    else:
        found = [i for i, r in enumerate(rules) if isinstance(r, dict) and r.get("name") == target.rule]
        if not found:
            raise RouteNotFound(f"{name} has no rule named {target.rule!r}; its rules: {', '.join(keys)}")
        if len(found) > 1:
            raise RouteNotFound(f"{name} has {len(found)} rules named {target.rule!r}; names must be unique")
        index = found[0]
    rule = rules[index]
    if not isinstance(rule, dict):
        raise WouldBeRejected(f"{name}: spec.rules[{index}] is not an object")
    return keys[index], rule


def _matches(ref: Any, want: BackendRef, namespace: str | None) -> bool:
    if not isinstance(ref, dict):
        return False
    if (ref.get("group") or "") != "" or (ref.get("kind") or "Service") != "Service":
        return False
    if ref.get("name") != want.name or (ref.get("namespace") or namespace) != (want.namespace or namespace):
        return False
    return want.port is None or ref.get("port") == want.port


def _find(entries: list[JSON], want: BackendRef, namespace: str | None, role: str, where: str, *,
          required: bool) -> int | None:
    found = [i for i, e in enumerate(entries) if _matches(e, want, namespace)]
    if len(found) > 1:
        raise DestinationNotFound(
            f"{where}: the {role} {want.label()} matches {len(found)} backendRefs "
            f"({', '.join(backend_label(entries[i], namespace) for i in found)}); give its port to tell them apart"
        )
    if not found:
        if required:
            present = ", ".join(backend_label(e, namespace) for e in entries)
            raise DestinationNotFound(f"{where} has no {role} backendRef {want.label()}; it has: {present}")
        return None
    return found[0]


def _ref_object(want: BackendRef, port: Any, where: str, role: str) -> JSON:
    port = want.port if want.port is not None else port
    if not isinstance(port, int):
        raise WouldBeRejected(
            f"{where}: a backendRef to a Service needs a port, and neither the policy's {role} {want.label()} "
            "nor the primary's backendRef gives one"
        )
    out: JSON = {"name": want.name}
    if want.namespace:
        out["namespace"] = want.namespace
    out["port"] = port
    return out


def _new_backend(entries: list[JSON], primary: JSON, target: GatewayAPITarget, where: str, weight: int) -> JSON:
    if len(entries) >= MAX_BACKEND_REFS:
        raise WouldBeRejected(f"{where} has {MAX_BACKEND_REFS} backendRefs already; the candidate cannot be added")
    return {**_ref_object(target.candidate, primary.get("port"), where, "candidate"), "weight": weight}


def _new_record(obj: JSON, rule: JSON, target: GatewayAPITarget) -> JSON:
    """What the rule's weights were before shadowctl changed anything (``[[label, weight or None], ...]``), and
    the candidate the changes are for (as the policy names it)."""
    ns = _namespace(obj)
    entries = rule.get("backendRefs")
    weights = []
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict):
            weights.append([backend_label(entry, ns), entry.get("weight")])
    return {"addedCandidate": False, "weights": weights,
            "candidate": target.candidate.model_dump(mode="json", exclude_none=True)}


def _same_backend(a: BackendRef, b: BackendRef, namespace: str | None) -> bool:
    return (a.name, a.namespace or namespace, a.port) == (b.name, b.namespace or namespace, b.port)


def _undo_previous_candidate(obj: JSON, target: GatewayAPITarget) -> JSON:
    """``obj`` (a copy the caller owns) with the changes undone that the rule's record says were made for a
    candidate other than ``target``'s: its weight back to the primary, its mirror removed, its backendRef
    removed when shadowctl added it, the others' weights as recorded (``finalize`` for that candidate).
    Unchanged when the record names no candidate, this one, or the primary (then it is no longer ours)."""
    try:
        key, _ = _select_rule(obj, target)
    except RouteNotFound:
        return obj  # the builder itself says why
    rec = (load_record(obj).get("rules") or {}).get(key)
    raw = rec.get("candidate") if isinstance(rec, dict) else None
    if not isinstance(raw, dict):
        return obj
    try:
        previous = BackendRef.model_validate(raw)
    except ValueError:
        raise WouldBeRejected(f"{_where(obj, key)}: the ownership record's candidate {raw!r} is not a backendRef; "
                              f"fix or remove the annotation by hand") from None
    ns = _namespace(obj)
    if _same_backend(previous, target.candidate, ns) or _same_backend(previous, target.primary, ns):
        return obj
    _, rule = _select_rule(obj, target)
    entries = rule.get("backendRefs")
    if isinstance(entries, list):  # the entry the record's candidate names is also one the policy names now
        now = [i for i, e in enumerate(entries) if _matches(e, target.primary, ns) or _matches(e, target.candidate, ns)]
        if any(_matches(entries[i], previous, ns) for i in now):
            return obj
    undone, _ = finalize(obj, target.model_copy(update={"candidate": previous}))
    return undone


# --------------------------------------------------------------------------- weights


def split(weights: list[int], p: int, c: int, candidate_percent: int, where: str) -> list[int]:
    """New weights giving ``c`` exactly ``candidate_percent`` of the total, others their shares, ``p`` the rest.

    The total is kept when it can express the step; else every weight is multiplied by the
    smallest factor that can (a divisor of 100). Raises UnmanagedTraffic when the others hold
    more than ``100 - candidate_percent`` percent.
    """
    total = sum(weights)
    if total == 0:
        raise WouldBeRejected(f"{where}: every backendRef has weight 0, so the rule serves errors only")
    others = total - weights[p] - weights[c]
    if 100 * others + candidate_percent * total > 100 * total:
        held = Fraction(100 * others, total)
        raise UnmanagedTraffic(
            f"{where}: backends that are neither primary nor candidate hold {float(held):g}% of the rule's "
            f"weight, so the candidate cannot get {candidate_percent}%; shadowctl will not take traffic from them"
        )
    factor = 100 // math.gcd(total * candidate_percent, 100)
    new = [w * factor for w in weights]
    new[c] = total * factor * candidate_percent // 100
    new[p] = total * factor - others * factor - new[c]
    if max(new) > MAX_WEIGHT:  # the same shares in the smallest integers
        divisor = math.gcd(*new)
        new = [w // divisor for w in new]
        if max(new) > MAX_WEIGHT:
            raise WouldBeRejected(
                f"{where}: giving the candidate exactly {candidate_percent}% would need a weight above "
                f"{MAX_WEIGHT} (the CRD's maximum); use smaller weights for the other backends"
            )
    return new


def _set_weights(obj: JSON, rule: JSON, target: GatewayAPITarget, candidate_percent: int, rec: JSON,
                 where: str) -> None:
    ns = _namespace(obj)
    entries = backend_refs(rule, where)
    p = _find(entries, target.primary, ns, "primary", where, required=True)
    c = _find(entries, target.candidate, ns, "candidate", where, required=False)
    assert p is not None
    weights = [weight_of(e, where) for e in entries]
    if c is None:
        if candidate_percent == 0:
            return  # nothing to give: the candidate needs no backendRef while it is only mirrored to
        entries.append(_new_backend(entries, entries[p], target, where, 0))
        rec["addedCandidate"] = True
        c = len(entries) - 1
        weights.append(0)
    new = split(weights, p, c, candidate_percent, where)
    for i, (old, w) in enumerate(zip(weights, new, strict=True)):
        if w != old or (i == c and "weight" not in entries[i]):
            entries[i]["weight"] = w


def _restore_weights(entries: list[JSON], added: int | None, recorded: Any, namespace: str | None) -> None:
    """Put back the weights as written before the first change, when every backend's share is as it was then.

    ``added``: the index of a candidate backendRef shadowctl added and keeps (at 0), left out of the comparison.
    """
    if not isinstance(recorded, list) or not all(isinstance(r, list) and len(r) == 2 for r in recorded):
        return
    rest = [e for i, e in enumerate(entries) if i != added]
    if [backend_label(e, namespace) for e in rest] != [r[0] for r in recorded]:
        return
    before = [1 if r[1] is None else r[1] for r in recorded]
    if not all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w <= MAX_WEIGHT for w in before):
        return
    now = [weight_of(e) for e in rest]
    if sum(before) == 0 or sum(now) == 0:
        return
    if [Fraction(w, sum(before)) for w in before] != [Fraction(w, sum(now)) for w in now]:
        return
    for entry, (_, raw) in zip(rest, recorded, strict=True):
        if raw is None:
            entry.pop("weight", None)
        else:
            entry["weight"] = raw


# --------------------------------------------------------------------------- mirror


def _is_candidate_mirror(f: Any, candidate: BackendRef, namespace: str | None) -> bool:
    return (isinstance(f, dict) and f.get("type") == "RequestMirror" and isinstance(f.get("requestMirror"), dict)
            and _matches(f["requestMirror"].get("backendRef"), candidate, namespace))


def set_mirror(obj: JSON, rule: JSON, target: GatewayAPITarget, percent: float | None, where: str) -> None:
    """Set (or with None remove) shadowctl's RequestMirror filter to the candidate; other filters stay."""
    ns = _namespace(obj)
    filters = rule.get("filters")
    if filters is not None and not isinstance(filters, list):
        raise WouldBeRejected(f"{where}: filters is not a list")
    ours = [i for i, f in enumerate(filters or []) if _is_candidate_mirror(f, target.candidate, ns)]
    if len(ours) > 1:
        raise WouldBeRejected(f"{where}: {len(ours)} RequestMirror filters mirror to the candidate "
                              f"{target.candidate.label()}; leave one")
    if percent is None:
        if ours:
            assert filters is not None
            del filters[ours[0]]
            if not filters:
                del rule["filters"]
        return
    share = mirror_share(percent)
    if ours:
        assert filters is not None
        mirror = filters[ours[0]]["requestMirror"]
        if mirror_percent_of(mirror) != percent or not all(mirror.get(k) == v for k, v in share.items()):
            mirror.pop("percent", None)
            mirror.pop("fraction", None)
            mirror.update(share)
        return
    entries = rule.get("backendRefs") or []
    p = _find(entries, target.primary, ns, "primary", where, required=False) if entries else None
    port = entries[p].get("port") if p is not None else None
    if filters is None:
        filters = rule["filters"] = []
    if len(filters) >= MAX_FILTERS:
        raise WouldBeRejected(f"{where} has {MAX_FILTERS} filters already; the mirror cannot be added")
    filters.append({"type": "RequestMirror",
                    "requestMirror": {"backendRef": _ref_object(target.candidate, port, where, "candidate"),
                                      **share}})


def check_rule(rule: JSON, where: str) -> None:
    """Refuse what the CRD's schema and CEL rules would reject in what shadowctl writes."""
    entries = rule.get("backendRefs")
    if isinstance(entries, list):
        if len(entries) > MAX_BACKEND_REFS:
            raise WouldBeRejected(f"{where}: {len(entries)} backendRefs, more than {MAX_BACKEND_REFS}")
        for e in entries:
            if isinstance(e, dict):
                weight_of(e, where)
    filters = rule.get("filters")
    if isinstance(filters, list):
        if len(filters) > MAX_FILTERS:
            raise WouldBeRejected(f"{where}: {len(filters)} filters, more than {MAX_FILTERS}")
        for f in filters:
            mirror = f.get("requestMirror") if isinstance(f, dict) else None
            if not isinstance(mirror, dict):
                continue
            if "percent" in mirror and "fraction" in mirror:
                raise WouldBeRejected(f"{where}: a RequestMirror sets both percent and fraction")
            pct = mirror.get("percent")
            if pct is not None and (not isinstance(pct, int) or not 0 <= pct <= 100):
                raise WouldBeRejected(f"{where}: a mirror percent of {pct!r} is not an integer from 0 to 100")
            frac = mirror.get("fraction")
            if isinstance(frac, dict):
                num, den = frac.get("numerator"), frac.get("denominator", 100)
                if (not isinstance(num, int) or not isinstance(den, int) or not 0 <= num <= den or den < 1
                        or den > MAX_INT32):
                    raise WouldBeRejected(f"{where}: a mirror fraction {num!r}/{den!r} is not 0 <= n <= d, d >= 1")
