"""`shadowctl render`: show what shadowctl would write to a VirtualService, HTTPRoute, Knative Service or KServe
InferenceService, offline.

It runs the routers' pure builders on an object from a file, so a person can
review (or a CI job can diff) the exact change before any cluster is touched.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError

from shadowctl.cli.common import fail
from shadowctl.policy.model import (
    BackendRef,
    Destination,
    GatewayAPITarget,
    IstioTarget,
    KnativeTarget,
    KServeTarget,
)
from shadowctl.routers import gateway_build, istio_build, knative_build, kserve_build
from shadowctl.routers.base import RouterError, RouteState
from shadowctl.routers.record import Build

_HELP = """Print the object shadowctl would write for a traffic split, without a cluster.

FILE holds one VirtualService (networking.istio.io), one HTTPRoute (gateway.networking.k8s.io), one Knative Service (serving.knative.dev) or one KServe InferenceService (serving.kserve.io), e.g. the output of `kubectl get -o yaml`. The object's kind decides what --primary and --candidate mean.

[bold]VirtualService[/]: destinations as HOST, HOST/SUBSET or HOST/SUBSET:PORT, exactly as in the route.

  shadowctl render vs.yaml --primary llm/v1 --candidate llm/v2 --route chat --weight 10

  shadowctl render vs.yaml --primary llm/v1 --candidate llm/v2 --weight 0 --mirror 5 --diff

[bold]HTTPRoute[/]: backendRefs to Services as NAME, NAMESPACE/NAME or NAMESPACE/NAME:PORT; --rule names the rule (needed when the route has several). --weight is the candidate's percent of the rule's total weight; --mirror adds a RequestMirror filter.

  shadowctl render route.yaml --primary chat-v1 --candidate chat-v2:8000 --rule chat-default --weight 10

[bold]Knative Service[/]: revision names (default primary: the revision holding 100%; default candidate: status.latestReadyRevisionName).

  shadowctl render ksvc.yaml --candidate llm-00002 --weight 20 --tag canary

[bold]InferenceService[/]: --weight only. KServe splits the predictor's traffic between its latest ready revision (the candidate) and its latest rolled-out one, as its status names them, by spec.predictor.canaryTrafficPercent. KServe cannot mirror: a policy's shadow phase goes through the tap (shadow.mode: tap).

  shadowctl render isvc.yaml --weight 10

Exit code 0 on success; 1 when the object lacks the named route, rule, destination, backend or revision (the message lists those it has); 2 on usage errors.
"""


def _destination(text: str, option: str) -> Destination:
    host, _, rest = text.partition("/")
    subset, port = rest, None
    if ":" in (rest or host):
        if rest:
            subset, _, port_text = rest.partition(":")
        else:
            host, _, port_text = host.partition(":")
        if not port_text.isdigit():
            raise fail(f"{option} {text!r}: the port after ':' must be a number", 2)
        port = int(port_text)
    try:
        return Destination(host=host, subset=subset or None, port=port)
    except ValidationError as exc:
        raise fail(f"{option} {text!r}: {exc.errors()[0]['msg']}", 2) from None


def _backend(text: str, option: str) -> BackendRef:
    namespace, _, rest = text.rpartition("/")
    name, _, port_text = rest.partition(":")
    if port_text and not port_text.isdigit():
        raise fail(f"{option} {text!r}: the port after ':' must be a number", 2)
    try:
        return BackendRef(name=name, namespace=namespace or None, port=int(port_text) if port_text else None)
    except ValidationError as exc:
        raise fail(f"{option} {text!r}: {exc.errors()[0]['msg']}", 2) from None


def _load(file: Path) -> dict[str, Any]:
    from shadowctl.policy.yaml_bounds import YamlLimits, YamlTooLarge, check_yaml_bounds

    limits = YamlLimits()
    try:
        if file.stat().st_size > limits.max_bytes:
            raise fail(f"{file}: larger than {limits.max_bytes} bytes")
        text = file.read_text(encoding="utf-8")
        check_yaml_bounds(text, limits)
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except OSError as exc:
        raise fail(f"{file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise fail(f"{file}: not UTF-8 text: {exc.reason}") from None
    except YamlTooLarge as exc:
        raise fail(f"{file}:{exc.line}:{exc.column}: {exc.message}") from None
    except yaml.YAMLError as exc:
        raise fail(f"{file}: not valid YAML: {exc}") from None
    except (ValueError, OverflowError) as exc:  # PyYAML's scanner on an escape such as "\U99999999"
        raise fail(f"{file}: not valid YAML: an escape out of range ({exc})") from None
    # A file may hold a DestinationRule (or anything else) beside the object: take the routing object.
    routing = [d for d in docs if isinstance(d, dict)
               and d.get("kind") in ("VirtualService", "HTTPRoute", "Service", "InferenceService")]
    if len(routing) == 1:
        return routing[0]
    if len(docs) == 1 and isinstance(docs[0], dict):
        return docs[0]
    kinds = ", ".join(str(d.get("kind")) if isinstance(d, dict) else type(d).__name__ for d in docs) or "none"
    raise fail(f"{file}: expected one VirtualService, HTTPRoute, Knative Service or InferenceService, found {len(routing)} among "
               f"{len(docs)} documents ({kinds}); put the one to render in a file of its own")


def _revisions_in(obj: dict[str, Any]) -> set[str] | None:
    """Revisions the file shows to exist (its status and pinned traffic); None without a status."""
    status = obj.get("status")
    if not isinstance(status, dict):
        return None
    names = {status.get("latestReadyRevisionName"), status.get("latestCreatedRevisionName")}
    for block in (status.get("traffic"), (obj.get("spec") or {}).get("traffic")):
        names.update(t.get("revisionName") for t in block or [] if isinstance(t, dict))
    return {str(n) for n in names if n}


def _dump(obj: dict[str, Any]) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)


def render(
    file: Annotated[Path, typer.Argument(help="A VirtualService, HTTPRoute, Knative Service or InferenceService as YAML.",
                                         show_default=False)],
    weight: Annotated[int, typer.Option("--weight", min=0, max=100,
                                        help="Percent of live traffic for the candidate (0-100).")],
    primary: Annotated[str | None, typer.Option(
        "--primary", help="VirtualService: HOST\\[/SUBSET]\\[:PORT] serving today (required). HTTPRoute: "
        "\\[NAMESPACE/]NAME\\[:PORT] (required). Knative: a revision.",
        show_default=False)] = None,
    candidate: Annotated[str | None, typer.Option(
        "--candidate", help="VirtualService: HOST\\[/SUBSET]\\[:PORT] to roll out (required). HTTPRoute: "
        "\\[NAMESPACE/]NAME\\[:PORT] (required). Knative: a revision.",
        show_default=False)] = None,
    route: Annotated[str | None, typer.Option(
        "--route", help="VirtualService: the http route's name (needed when it has several).",
        show_default=False)] = None,
    rule: Annotated[str | None, typer.Option(
        "--rule", help="HTTPRoute: the rule's name (needed when it has several).", show_default=False)] = None,
    mirror: Annotated[float | None, typer.Option(
        "--mirror", min=0, max=100, help="VirtualService, HTTPRoute: percent of requests mirrored to the candidate "
        "(not Knative nor KServe, which cannot mirror).",
        show_default=False)] = None,
    tag: Annotated[str, typer.Option("--tag", help="Knative: the candidate's tag.")] = "candidate",
    diff: Annotated[bool, typer.Option("--diff", help="Print a unified diff instead of the whole object.")] = False,
) -> None:
    obj = _load(file)
    kind, api = obj.get("kind"), str(obj.get("apiVersion", ""))
    state = RouteState(100 - weight, weight, mirror or None)
    meta = obj.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise fail(f"{file}: metadata: expected a mapping, got {type(meta).__name__}")
    name = str((meta or {}).get("name") or "unnamed")
    try:
        result: Build
        if kind == "VirtualService" and api.startswith("networking.istio.io/"):
            if primary is None or candidate is None:
                raise fail("a VirtualService needs --primary and --candidate (HOST[/SUBSET][:PORT])", 2)
            if rule:
                raise fail("--rule is for HTTPRoutes; name a VirtualService's http route with --route", 2)
            try:
                target = IstioTarget(virtual_service=name, route=route, primary=_destination(primary, "--primary"),
                                     candidate=_destination(candidate, "--candidate"))
            except ValidationError as exc:
                raise fail(exc.errors()[0]["msg"], 2) from None
            result = istio_build.build(obj, target, state)
        elif kind == "HTTPRoute" and api.startswith("gateway.networking.k8s.io/"):
            if primary is None or candidate is None:
                raise fail("an HTTPRoute needs --primary and --candidate ([NAMESPACE/]NAME[:PORT])", 2)
            if route:
                raise fail("--route is for VirtualServices; name an HTTPRoute's rule with --rule", 2)
            try:
                gtarget = GatewayAPITarget(http_route=name, rule=rule, primary=_backend(primary, "--primary"),
                                           candidate=_backend(candidate, "--candidate"))
            except ValidationError as exc:
                raise fail(exc.errors()[0]["msg"], 2) from None
            result = gateway_build.build(obj, gtarget, state)
        elif kind == "Service" and api.startswith("serving.knative.dev/"):
            if mirror:
                raise fail("a Knative Service cannot mirror; --mirror needs an Istio VirtualService or an HTTPRoute", 2)
            if route or rule:
                raise fail(f"{'--route' if route else '--rule'} is for VirtualServices and HTTPRoutes; a Knative "
                           "Service has no named routes", 2)
            try:
                ktarget = KnativeTarget(service=name, primary_revision=primary, candidate_revision=candidate,
                                        candidate_tag=tag)
            except ValidationError as exc:
                raise fail(f"--tag {tag!r}: {exc.errors()[0]['msg']}", 2) from None
            knative_build.check_shape(obj)  # before _revisions_in reads its status
            result = knative_build.build(obj, ktarget, state, _revisions_in(obj))
        elif kind == "InferenceService" and api.startswith("serving.kserve.io/"):
            if mirror:
                raise fail("a KServe InferenceService cannot mirror (KServe has no mirroring); its shadow phase goes "
                           "through the tap: set shadow.mode: tap in the policy, and render --weight only", 2)
            given = [o for o, v in (("--primary", primary), ("--candidate", candidate), ("--route", route),
                                    ("--rule", rule), ("--tag", None if tag == "candidate" else tag)) if v]
            if given:
                raise fail(f"{', '.join(given)}: not for an InferenceService: KServe splits between the revisions its "
                           "status names (latest ready and latest rolled-out); give --weight only", 2)
            try:
                starget = KServeTarget(inference_service=name)
            except ValidationError as exc:
                raise fail(f"{file}: metadata.name: {exc.errors()[0]['msg']}", 2) from None
            result = kserve_build.build(obj, starget, state)
        else:
            raise fail(f"{file}: kind {kind!r} ({api or 'no apiVersion'}) is not an Istio VirtualService, a "
                       "Gateway API HTTPRoute, a Knative Service or a KServe InferenceService")
    except RouterError as exc:
        raise fail(f"{file}: {exc}") from None
    if not diff:
        sys.stdout.write(_dump(result.obj))
        return
    lines = difflib.unified_diff(_dump(obj).splitlines(keepends=True), _dump(result.obj).splitlines(keepends=True),
                                 fromfile=f"{file} (current)", tofile=f"{file} (shadowctl)")
    sys.stdout.writelines(lines)


render.__doc__ = _HELP


def register(app: typer.Typer) -> None:
    """Add `shadowctl render`."""
    app.command("render")(render)
