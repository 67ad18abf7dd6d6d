"""`shadowctl apply|get|status|describe|promote|rollback|pause|resume|retry`: rollouts from a laptop.

These commands talk only to the Kubernetes API (kubectl conventions: ``--kubeconfig``,
``--context``, ``-n``, ``-o``); the controller (`shadowctl run`) does the work.

Why the commands refuse some requests instead of sending them: the controller
takes every command from the ``shadowctl.dev/command`` annotation and records it
as handled even when the state machine ignores it (``promote`` while nothing waits
for approval). A person would then see "carried out" and nothing happen. So each
command first reads the phase and refuses, with the reason and the command that
would work, what the machine would ignore; the check and the write are tied by the
resourceVersion read (a conditional merge patch), so a phase change in between is
re-read and re-checked rather than raced.

Why ``status --watch`` polls once a second instead of holding a watch: the
output is for a person, a one-second delay is invisible, and a poll has no
expiry (410), reconnect or bookmark logic to get wrong; it keeps going through
a short API outage and says so.

Why ``apply`` sends the file's own document rather than the parsed model: the
model fills in defaults; sending them would pin today's defaults into the
cluster and make every later default change look like a user edit.
"""

from __future__ import annotations

import asyncio
import copy
import getpass
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml
from kubernetes.aio.config.config_exception import ConfigException
from kubernetes.aio.config.kube_config import list_kube_config_contexts
from pydantic import ValidationError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from shadowctl.cli.common import (
    ContextOpt,
    KubeconfigOpt,
    NamespaceOpt,
    OutputFormat,
    OutputOpt,
    emit,
    err_console,
)
from shadowctl.controller.clock import iso
from shadowctl.controller.commands import COMMAND_ANNOTATION, command_patch, new_command, pending_command
from shadowctl.errors import ShadowctlError
from shadowctl.kube import (
    EVENT,
    SHADOW_POLICY,
    AlreadyExists,
    BadRequest,
    ConfigError,
    Conflict,
    Forbidden,
    Invalid,
    KubeClient,
    KubeError,
    NotFound,
    ResourceRef,
    RetryPolicy,
    Unauthorized,
    Unavailable,
)
from shadowctl.machine import Command, Phase, Refusal, RolloutState, refusal
from shadowctl.policy import PolicyError, Problem, ShadowPolicy, load_policies, policy_files
from shadowctl.policy.duration import format_duration, parse_duration

JSON = dict[str, Any]
T = TypeVar("T")

#: Seconds between reads while `--wait` or `status --watch` wait for the controller (tests lower it).
POLL_SECONDS = 1.0
#: How often a write that met a 409 is re-read and recomputed.
CONFLICT_ATTEMPTS = 5
#: A CLI should fail fast when the cluster is down: 3 tries within about a second.
CLI_RETRY = RetryPolicy(attempts=3, base_delay=0.2, max_delay=1.0)

KIND_LABEL = "shadowpolicy"


class CliError(ShadowctlError):
    """A failure this module explains itself: printed as one line, exit ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Print one unwrapped error line on stderr (server text is escaped, not read as markup)."""
    text = " ".join(message.split())
    err_console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _note(message: str) -> None:
    err_console.print(escape(message), highlight=False, soft_wrap=True, style="yellow")


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


# --------------------------------------------------------------------------- connection and errors


@dataclass(frozen=True)
class Conn:
    """Where to connect, and the namespace the user asked for (None: the context's)."""

    kubeconfig: str | None
    context: str | None
    namespace: str | None


def context_namespace(kubeconfig: str | None, context: str | None) -> str:
    """The namespace of the kubeconfig context in use (``default`` when it names none, as kubectl)."""
    try:
        contexts, current = list_kube_config_contexts(kubeconfig)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return "default"
    wanted = context or (current or {}).get("name")
    for ctx in contexts or []:
        if isinstance(ctx, dict) and ctx.get("name") == wanted:
            ns = (ctx.get("context") or {}).get("namespace")
            return ns if isinstance(ns, str) and ns else "default"
    return "default"


def explain(exc: KubeError) -> str:
    """One line a person can act on, for an API failure this module did not anticipate."""
    server = exc.message.split(": ", 1)[1] if exc.message.startswith("HTTP ") and ": " in exc.message else exc.message
    if isinstance(exc, ConfigError):
        return f"{exc.message} (pass --kubeconfig or --context, or set KUBECONFIG)"
    if isinstance(exc, Unauthorized):
        return "the cluster refused the credentials (401 Unauthorized): check the user or token in your kubeconfig"
    if isinstance(exc, Forbidden):
        return f"forbidden (403): {server}"
    if isinstance(exc, Unavailable):
        return f"cannot reach the Kubernetes API server: {exc.message}"
    if isinstance(exc, Invalid):
        causes = "; ".join(f"{c.get('field', '')}: {c.get('message', '')}".strip(": ") for c in exc.causes)
        return f"the API server rejected the object (422 Invalid): {causes or server}"
    return f"the API server answered {exc.message}"


def run_async(make: Callable[[], Coroutine[Any, Any, T]], *, interrupt_code: int = 130) -> T:
    """Run a command's coroutine; every expected failure becomes one line on stderr and exit 1."""
    try:
        return asyncio.run(make())
    except CliError as exc:
        raise _fail(exc.message, exc.code) from None
    except KubeError as exc:
        raise _fail(explain(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(interrupt_code) from None


def _check_kubeconfig(kubeconfig: str | None) -> None:
    """A missing kubeconfig file is named plainly (the library would log and then report a missing key)."""
    value = kubeconfig or str(Path("~/.kube/config").expanduser())
    paths = [p for p in value.split(os.pathsep) if p]
    if not any(Path(p).expanduser().is_file() for p in paths):
        raise CliError(f"kubeconfig {value}: no such file (pass --kubeconfig, or set KUBECONFIG)")


SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _in_pod_without_kubeconfig(conn: Conn) -> bool:
    default = Path("~/.kube/config").expanduser()
    return conn.kubeconfig is None and not default.is_file() and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _pod_namespace() -> str:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip() or "default"
    except OSError:
        return "default"


async def connect(conn: Conn) -> tuple[KubeClient, str]:
    """A client for the kubeconfig context, and the namespace to use (``-n``, else the context's).

    In a pod with no kubeconfig at all, the pod's service account is used, as kubectl does.
    """
    if _in_pod_without_kubeconfig(conn):
        client = await KubeClient.connect(in_cluster=True, retry=CLI_RETRY)
        return client, conn.namespace or _pod_namespace()
    _check_kubeconfig(conn.kubeconfig)
    client = await KubeClient.connect(kubeconfig=conn.kubeconfig, context=conn.context, in_cluster=False,
                                      retry=CLI_RETRY)
    return client, conn.namespace or context_namespace(conn.kubeconfig, conn.context)


async def _with_client(conn: Conn, body: Callable[[KubeClient, str], Awaitable[T]]) -> T:
    client, namespace = await connect(conn)
    try:
        return await body(client, namespace)
    finally:
        await client.close()


async def read_policy(client: KubeClient, namespace: str, name: str) -> JSON:
    """GET one ShadowPolicy; a missing one is a CliError naming it."""
    try:
        return await client.get(ResourceRef(SHADOW_POLICY, name, namespace))
    except NotFound as exc:
        raise CliError(f"{KIND_LABEL} {namespace}/{name} not found") from exc


async def list_policies(client: KubeClient, namespace: str | None) -> list[JSON]:
    """List ShadowPolicies (``namespace=None``: all); a missing CRD is explained."""
    try:
        items = (await client.list(SHADOW_POLICY, namespace)).items
    except NotFound as exc:
        raise CliError("the ShadowPolicy resource is not served by this cluster: install the CRD "
                       "(kubectl apply -f deploy/crd.yaml)") from exc
    return sorted(items, key=lambda o: (_meta(o).get("namespace") or "", _meta(o).get("name") or ""))


# --------------------------------------------------------------------------- formatting helpers


def _dict(value: Any) -> JSON:
    return value if isinstance(value, dict) else {}


def _meta(obj: JSON) -> JSON:
    return _dict(obj.get("metadata"))


def _status(obj: JSON) -> JSON:
    return _dict(obj.get("status"))


def key_of(obj: JSON) -> str:
    meta = _meta(obj)
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def parse_time(text: Any) -> float | None:
    """Epoch seconds of an RFC 3339 time as Kubernetes writes it; None when absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def human_age(seconds: float) -> str:
    """kubectl's compact age: 45s, 5m30s, 3h12m, 4d5h, 400d."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 3600:
        return f"{s // 60}m"
    if s < 8 * 3600:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m}m" if m else f"{h}h"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    if s < 8 * 86400:
        d, h = divmod(s // 3600, 24)
        return f"{d}d{h}h" if h else f"{d}d"
    return f"{s // 86400}d"


def ago(ts: float | None, now: float) -> str:
    """`5m ago` (or `in 5s` for a clock ahead of ours; `unknown` without a time)."""
    if ts is None:
        return "unknown"
    delta = now - ts
    return f"in {human_age(-delta)}" if delta < -1 else f"{human_age(delta)} ago"


def stamp(ts: float | None) -> str:
    return iso(ts) if ts is not None else "-"


def pct(value: Any) -> str:
    """`25%`, `12.5%`, `-` for no value."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    return f"{value:g}%"


def num(value: Any) -> str:
    """A measured number in 4 significant digits; `-` when absent."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "-"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 1000:
        return f"{value:.1f}"
    if abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}"


def _effect_one(value: Any, scale: str) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return "?"
    if scale == "ratio":
        return f"{(value - 1) * 100:+.1f}%"
    return f"{value:+.4g}"


def effect_text(metric: JSON) -> str:
    """The observed effect and its interval on the user's scale: `+12.0% [+3.1%, +20.4%]`."""
    scale = str(metric.get("effectScale") or "difference")
    effect = metric.get("effect")
    interval = metric.get("interval")
    text = _effect_one(effect, scale) if effect is not None else "-"
    if isinstance(interval, list) and len(interval) == 2 and any(v is not None for v in interval):
        lo, hi = interval
        text += f" [{'-inf' if lo is None else _effect_one(lo, scale)}, {'+inf' if hi is None else _effect_one(hi, scale)}]"
    return text


def samples_text(metric: JSON) -> str:
    samples = metric.get("samples") or {}
    return f"{num(samples.get('primary'))} / {num(samples.get('candidate'))}"


def steps_of(obj: JSON) -> list[int]:
    canary = ((obj.get("spec") or {}).get("canary") or {})
    steps = canary.get("steps") if isinstance(canary, dict) else None
    return [int(s) for s in steps if isinstance(s, int | float)] if isinstance(steps, list) else []


def phase_of(obj: JSON) -> str:
    return str(_status(obj).get("phase") or Phase.pending.value)


def step_text(obj: JSON) -> str:
    """`2/4` during the canary, `shadow` while mirroring, `-` otherwise."""
    status = _status(obj)
    step = status.get("step")
    total = len(steps_of(obj))
    if isinstance(step, int) and total:
        return f"{step}/{total}"
    if status.get("phase") == Phase.shadowing.value:
        return "shadow"
    return "-"


def weights_text(obj: JSON) -> str:
    """`primary 75% / candidate 25%` as read back from the routes, else as the rollout intends."""
    status = _status(obj)
    routes = status.get("routes")
    if isinstance(routes, dict) and routes.get("candidateWeight") is not None:
        return f"primary {pct(routes.get('primaryWeight'))} / candidate {pct(routes.get('candidateWeight'))}"
    weight = status.get("canaryWeight")
    if isinstance(weight, int | float) and not isinstance(weight, bool):
        return f"primary {pct(100 - weight)} / candidate {pct(weight)}"
    return "primary 100% / candidate 0%"


def mirror_text(obj: JSON) -> str:
    status = _status(obj)
    routes = status.get("routes")
    value = routes.get("mirrorPercent") if isinstance(routes, dict) and "mirrorPercent" in routes else None
    if value is None:
        value = status.get("mirrorPercent")
    return pct(value) if value is not None else "off"


def history_of(obj: JSON) -> list[JSON]:
    rollout = _status(obj).get("rollout")
    hist = rollout.get("history") if isinstance(rollout, dict) else None
    return [h for h in hist if isinstance(h, dict)] if isinstance(hist, list) else []


def decision_text(obj: JSON, now: float) -> str:
    """The last decision in a sentence: the status message and when its transition happened."""
    status = _status(obj)
    message = str(status.get("message") or "")
    hist = history_of(obj)
    if hist:
        last = hist[-1]
        when = last.get("at")
        text = message or str(last.get("reason") or "")
        return f"{last.get('from')} -> {last.get('to')} {ago(when if isinstance(when, int | float) else None, now)}: {text}"
    return message or "no decision yet"


# --------------------------------------------------------------------------- apply


@dataclass
class _Item:
    file: Path
    doc: JSON
    name: str
    namespace: str


def _raw_documents(file: Path) -> list[JSON]:
    """The file's documents as written (already validated, so this parse succeeds)."""
    return [d for d in yaml.safe_load_all(file.read_text(encoding="utf-8")) if isinstance(d, dict)]


def collect(paths: Sequence[Path], namespace_flag: str | None) -> list[_Item]:
    """Validate every file; raise CliError after printing every problem, before anything is sent."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise CliError("; ".join(f"{p}: no such file or directory" for p in missing), 1)
    files = policy_files(paths)
    if not files:
        raise CliError("no *.yaml or *.yml files found in " + ", ".join(str(p) for p in paths))
    problems: list[Problem] = []
    items: list[_Item] = []
    for file in files:
        try:
            policies = load_policies(file)
        except PolicyError as exc:
            problems.extend(exc.problems)
            continue
        docs = _raw_documents(file)
        if len(docs) != len(policies):  # pragma: no cover - the loader and safe_load agree on documents
            problems.append(Problem(str(file), 1, 1, "", "could not match the documents to the validated policies"))
            continue
        for index, (policy, doc) in enumerate(zip(policies, docs, strict=True)):
            items.append(_resolve(file, index, doc, policy, namespace_flag, problems))
    if problems:
        for problem in problems:
            err_console.print(escape(str(problem)), highlight=False, soft_wrap=True)
        bad = len({p.file for p in problems})
        raise CliError(f"{bad} file(s) invalid; nothing was applied")
    seen: dict[tuple[str, str], Path] = {}
    for item in items:
        if item.namespace and (item.namespace, item.name) in seen:
            raise CliError(f"{KIND_LABEL} {item.namespace}/{item.name} is defined twice: in "
                           f"{seen[(item.namespace, item.name)]} and in {item.file}; nothing was applied")
        seen[(item.namespace, item.name)] = item.file
    return items


def _namespace_mark(file: Path, index: int) -> tuple[int, int]:
    """Line and column (1-based) of ``metadata.namespace`` in the file's ``index``-th mapping document."""
    try:
        nodes = [n for n in yaml.compose_all(file.read_text(encoding="utf-8")) if isinstance(n, yaml.MappingNode)]
        for key, value in nodes[index].value:
            if key.value == "metadata" and isinstance(value, yaml.MappingNode):
                for k, v in value.value:
                    if k.value == "namespace":
                        return v.start_mark.line + 1, v.start_mark.column + 1
    except (yaml.YAMLError, OSError, IndexError):
        pass
    return 1, 1


def _resolve(file: Path, index: int, doc: JSON, policy: ShadowPolicy, flag: str | None,
             problems: list[Problem]) -> _Item:
    meta = doc.get("metadata") or {}
    written = meta.get("namespace") if isinstance(meta.get("namespace"), str) else None
    if written and flag and written != flag:
        problems.append(Problem(
            str(file), *_namespace_mark(file, index), "metadata.namespace",
            f"the namespace in the file ({written!r}) does not match the namespace given with -n ({flag!r}); "
            f"pass -n {written} or remove metadata.namespace from the file"))
    # An empty namespace is decided after connecting (the context's namespace).
    return _Item(file, doc, policy.metadata.name, written or flag or "")


def desired_object(item: _Item, existing: JSON | None) -> JSON:
    """What to send: the file's document; for an update, merged onto the live object's metadata and status.

    Labels and annotations from the file win; others already on the object (the pending command,
    other tools' annotations) are kept. ``shadowctl.dev/command`` is never taken from a file.
    """
    body = copy.deepcopy(item.doc)
    meta = dict(body.get("metadata") or {})
    meta["namespace"] = item.namespace
    labels = dict(meta.get("labels") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != COMMAND_ANNOTATION}
    if existing is None:
        if labels:
            meta["labels"] = labels
        meta.pop("annotations", None)
        if annotations:
            meta["annotations"] = annotations
        body["metadata"] = meta
        return body
    live = copy.deepcopy(_meta(existing))
    live.pop("managedFields", None)
    merged_labels = {**(live.get("labels") or {}), **labels}
    merged_annotations = {**(live.get("annotations") or {}), **annotations}
    live.pop("labels", None)
    live.pop("annotations", None)
    if merged_labels:
        live["labels"] = merged_labels
    if merged_annotations:
        live["annotations"] = merged_annotations
    body["metadata"] = live
    if "status" in existing:
        body["status"] = existing["status"]
    return body


def _same(existing: JSON, body: JSON) -> bool:
    a, b = _meta(existing), _meta(body)
    return (
        existing.get("spec") == body.get("spec")
        and (a.get("labels") or {}) == (b.get("labels") or {})
        and (a.get("annotations") or {}) == (b.get("annotations") or {})
    )


async def apply_one(client: KubeClient, item: _Item) -> str:
    """Create or update one policy; returns created, configured or unchanged. Retries on 409."""
    ref = ResourceRef(SHADOW_POLICY, item.name, item.namespace)
    for _ in range(CONFLICT_ATTEMPTS):
        try:
            existing = await client.get(ref)
        except NotFound:
            try:
                await client.create(SHADOW_POLICY, desired_object(item, None), item.namespace)
            except AlreadyExists:
                continue  # created by someone else meanwhile: update it instead
            return "created"
        body = desired_object(item, existing)
        if _same(existing, body):
            return "unchanged"
        try:
            stored = await client.replace(SHADOW_POLICY, body)
        except Conflict:
            continue  # changed meanwhile: re-read and recompute
        before = _meta(existing).get("resourceVersion")
        return "unchanged" if _meta(stored).get("resourceVersion") == before else "configured"
    raise CliError(f"{KIND_LABEL} {item.namespace}/{item.name}: it kept changing while being applied "
                   f"({CONFLICT_ATTEMPTS} conflicts); try again")


FileOpt = Annotated[
    list[Path],
    typer.Option("-f", "--filename", help="Policy file or directory (searched for *.yaml, *.yml); repeatable.",
                 show_default=False),
]


def apply(
    filename: FileOpt,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Create or update ShadowPolicies from files, like kubectl apply.

    Every file is validated first; if any is invalid, each problem is printed as FILE:LINE:COL and
    nothing is applied. The namespace is the file's metadata.namespace, else -n, else the context's.
    An update keeps the object's status and the annotations others put on it.

    Example: shadowctl apply -f policies/chat-istio.yaml
    """
    conn = Conn(kubeconfig, context, namespace)
    try:
        items = collect(filename, namespace)
    except CliError as exc:
        raise _fail(exc.message, exc.code) from None

    async def body(client: KubeClient, default_ns: str) -> int:
        failures = 0
        for item in items:
            item.namespace = item.namespace or default_ns
            try:
                result = await apply_one(client, item)
            except (Invalid, BadRequest) as exc:
                failures += 1
                err_console.print(escape(f"error: {KIND_LABEL} {item.namespace}/{item.name} ({item.file}): "
                                         f"{explain(exc)}"), highlight=False, soft_wrap=True)
                continue
            _out(f"{KIND_LABEL} {item.namespace}/{item.name} {result}")
        return failures

    if run_async(lambda: _with_client(conn, body)):
        raise typer.Exit(1)


# --------------------------------------------------------------------------- get


def table_rows(items: Iterable[JSON], now: float, all_namespaces: bool) -> list[list[str]]:
    head = ["NAME", "PHASE", "STEP", "WEIGHT", "MIRROR", "VERDICT", "AGE"]
    rows = [(["NAMESPACE"] if all_namespaces else []) + head]
    for obj in items:
        meta, status = _meta(obj), _status(obj)
        verdict = (status.get("lastVerdict") or {}).get("outcome") if isinstance(status.get("lastVerdict"), dict) \
            else None
        created = parse_time(meta.get("creationTimestamp"))
        row = [
            str(meta.get("name")),
            phase_of(obj),
            step_text(obj),
            pct(status.get("canaryWeight")) if "canaryWeight" in status else "-",
            mirror_text(obj) if status else "-",
            str(verdict or "-"),
            human_age(now - created) if created is not None else "-",
        ]
        rows.append(([str(meta.get("namespace") or "")] if all_namespaces else []) + row)
    return rows


def columns(rows: list[list[str]]) -> str:
    """Left-aligned columns three spaces apart, as kubectl prints them."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


AllNamespacesOpt = Annotated[
    bool, typer.Option("-A", "--all-namespaces", help="List the policies of every namespace.")
]


def _no_policies(namespace: str | None) -> None:
    where = "any namespace" if namespace is None else f"namespace {namespace}"
    err_console.print(f"No ShadowPolicies found in {escape(where)}.", highlight=False, soft_wrap=True)


def get(
    name: Annotated[str | None, typer.Argument(help="One policy's name; without it, list them.",
                                               show_default=False)] = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    all_namespaces: AllNamespacesOpt = False,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """List ShadowPolicies, or show one, with their phase, step, weight, mirror and last verdict.

    -o json or -o yaml prints the whole objects (a List when there are several).

    Example: shadowctl get -n llm
    """
    if name and all_namespaces:
        raise _fail("a policy cannot be looked up by name across all namespaces; give -n instead of -A", 2)
    conn = Conn(kubeconfig, context, namespace)

    async def body(client: KubeClient, ns: str) -> tuple[list[JSON], bool, str | None]:
        if name:
            return [await read_policy(client, ns, name)], True, ns
        scope = None if all_namespaces else ns
        return await list_policies(client, scope), False, scope

    items, single, scope = run_async(lambda: _with_client(conn, body))
    if output is OutputFormat.table:
        if not items:
            _no_policies(scope)
            return
        _out(columns(table_rows(items, time.time(), all_namespaces)))
    elif single:
        emit(items[0], output)
    else:
        emit({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items}, output)


# --------------------------------------------------------------------------- status


_OUTCOME_STYLE = {"pass": "green", "fail": "bold red", "inconclusive": "yellow", "nodata": "magenta",
                  "continue": "cyan"}


def render_status(obj: JSON, now: float) -> RenderableType:
    """One policy as a person wants to see it now: where it is, what was decided, and the evidence."""
    status = _status(obj)
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    phase = phase_of(obj)
    steps = steps_of(obj)
    facts.add_row("Phase", phase + (f" (step {step_text(obj)})" if "/" in step_text(obj) else ""))
    if steps:
        facts.add_row("Steps", ", ".join(f"{s}%" for s in steps))
    facts.add_row("Weights", weights_text(obj))
    facts.add_row("Mirror", mirror_text(obj))
    facts.add_row("Decision", Text(decision_text(obj, now)))
    verdict = status.get("lastVerdict") if isinstance(status.get("lastVerdict"), dict) else None
    if verdict:
        outcome = str(verdict.get("outcome") or "-")
        line = Text(outcome, style=_OUTCOME_STYLE.get(outcome, ""))
        line.append(f" ({ago(parse_time(verdict.get('at')), now)}): {verdict.get('reason') or ''}", style="")
        facts.add_row("Verdict", line)
    pending = pending_command(obj)
    if pending is not None:
        facts.add_row("Pending", f"{pending.command.value} (id {pending.id}), waiting for the controller")
    for err in status.get("sourceErrors") or []:
        facts.add_row("Source error", Text(str(err), style="yellow"))
    parts: list[RenderableType] = [Text(f"{KIND_LABEL} {key_of(obj)}", style="bold underline"), facts]
    metrics = [m for m in (verdict or {}).get("metrics") or [] if isinstance(m, dict)]
    if metrics:
        table = Table(show_edge=False, pad_edge=False, header_style="bold")
        for col in ("METRIC", "OUTCOME", "PRIMARY", "CANDIDATE", "EFFECT [INTERVAL]", "SAMPLES P/C"):
            table.add_column(col, no_wrap=True)
        for m in metrics:
            outcome = str(m.get("outcome") or "-")
            table.add_row(str(m.get("name")), Text(outcome, style=_OUTCOME_STYLE.get(outcome, "")),
                          num(m.get("primary")), num(m.get("candidate")), effect_text(m), samples_text(m))
        parts.append(table)
        sentences = Table.grid(padding=(0, 1))
        sentences.add_column(no_wrap=True)
        sentences.add_column()
        for m in metrics:
            if m.get("sentence"):
                sentences.add_row(f"  {m.get('name')}:", Text(str(m.get("sentence"))))
        parts.append(sentences)
    elif not status:
        parts.append(Text("no status yet: is the controller (shadowctl run) running?", style="yellow"))
    return Group(*parts, Text(""))


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


async def fetch_for_status(client: KubeClient, namespace: str | None, name: str | None) -> list[JSON]:
    if name:
        assert namespace is not None
        return [await read_policy(client, namespace, name)]
    return await list_policies(client, namespace)


def _signature(items: list[JSON]) -> tuple[tuple[str, str], ...]:
    return tuple((key_of(o), str(_meta(o).get("resourceVersion"))) for o in items)


async def watch_status(
    client: KubeClient,
    namespace: str | None,
    name: str | None,
    show: Callable[[list[JSON]], None],
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    warn: Callable[[str], None] = _note,
) -> None:
    """Poll every POLL_SECONDS and call ``show`` whenever something changed; runs until cancelled.

    Returns when the named policy is deleted. An unreachable API server is reported once per
    outage and polling goes on.
    """
    last: tuple[tuple[str, str], ...] | None = None
    outage = False
    while True:
        try:
            items = await fetch_for_status(client, namespace, name)
        except CliError:
            if name and last is not None:
                warn(f"{KIND_LABEL} {namespace}/{name} was deleted")
                return
            raise
        except Unavailable as exc:
            if last is None:
                raise
            if not outage:
                warn(f"lost the API server, still trying: {exc.message}")
            outage = True
            await sleep(POLL_SECONDS)
            continue
        if outage:
            warn("the API server answers again")
            outage = False
        sig = _signature(items)
        if sig != last:
            show(items)
            last = sig
        await sleep(POLL_SECONDS)


def status(
    name: Annotated[str | None, typer.Argument(help="One policy's name; without it, every policy in the namespace.",
                                               show_default=False)] = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    all_namespaces: AllNamespacesOpt = False,
    watch: Annotated[bool, typer.Option("-w", "--watch", help="Keep showing the status as it changes (Ctrl-C ends).")]
    = False,
) -> None:
    """Show where rollouts stand: phase, step, weights, mirror, the last decision and each metric's evidence.

    For every metric: its outcome, the primary and candidate values, the observed effect with its
    interval (ratio metrics as a percentage change), and the samples behind it.

    Example: shadowctl status chat -n llm --watch
    """
    if name and all_namespaces:
        raise _fail("a policy cannot be looked up by name across all namespaces; give -n instead of -A", 2)
    conn = Conn(kubeconfig, context, namespace)
    console = _console()

    def show(items: list[JSON]) -> RenderableType:
        if not items:
            return Text("No ShadowPolicies found.")
        now = time.time()
        return Group(*(render_status(o, now) for o in items))

    if not watch:
        async def once(client: KubeClient, ns: str) -> list[JSON]:
            return await fetch_for_status(client, None if all_namespaces else ns, name)

        items = run_async(lambda: _with_client(conn, once))
        if not items:
            _no_policies(None if all_namespaces else namespace)
            return
        console.print(show(items))
        return

    async def follow(client: KubeClient, ns: str) -> None:
        scope = None if all_namespaces else ns
        if console.is_terminal:
            with Live(console=console, auto_refresh=False, transient=False) as live:
                await watch_status(client, scope, name, lambda items: live.update(show(items), refresh=True))
        else:
            def printed(items: list[JSON]) -> None:
                console.print(Text(f"--- {iso(time.time())}", style="dim"))
                console.print(show(items))
            await watch_status(client, scope, name, printed)

    run_async(lambda: _with_client(conn, follow), interrupt_code=0)


# --------------------------------------------------------------------------- describe


def _spec_lines(obj: JSON) -> list[str]:
    """A summary of the spec, from the validated model (raw keys when the spec no longer validates)."""
    spec = obj.get("spec") or {}
    try:
        policy = ShadowPolicy.model_validate({
            "apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "spec": spec,
            "metadata": {"name": _meta(obj).get("name"), "namespace": _meta(obj).get("namespace") or "default"},
        })
    except ValidationError as exc:
        return [f"(the spec does not validate: {exc.error_count()} problem(s); run shadowctl validate)",
                f"keys: {', '.join(sorted(spec))}"]
    s = policy.spec
    lines: list[str] = []
    if s.target.istio is not None:
        t = s.target.istio
        lines.append(f"Target:       Istio VirtualService {t.virtual_service}"
                     + (f" route {t.route}" if t.route else "")
                     + f": primary {t.primary.label()}, candidate {t.candidate.label()}")
    elif s.target.knative is not None:
        k = s.target.knative
        lines.append(f"Target:       Knative Service {k.service}: primary {k.primary_revision or '(latest ready)'}, "
                     f"candidate {k.candidate_revision or '(latest created)'} tagged {k.candidate_tag}")
    if s.shadow is not None:
        lines.append(f"Shadow:       mirror {s.shadow.mirror_percent:g}% for {_dur(s.shadow.min_duration)} to "
                     f"{_dur(s.shadow.max_duration)}, at least {s.shadow.min_pairs} pairs ({s.shadow.mode.value})")
    if s.canary is not None:
        lines.append(f"Canary:       steps {', '.join(f'{w}%' for w in s.canary.steps)}, each "
                     f"{_dur(s.canary.step_duration)} (at most {_dur(s.canary.step_limit)})")
    a = s.analysis
    lines.append(f"Analysis:     {a.method.value}, every {_dur(a.interval)}, alpha {a.alpha:g}, beta {a.beta:g}")
    for m in a.metrics:
        lines.append(f"  metric      {m.name}: {m.statistic.value} {m.kind.value}, {m.direction.value} at most "
                     f"{m.margin}{' (critical)' if m.critical else ''}, min {m.min_samples} samples")
    if a.outputs is not None:
        comps = ", ".join(f"{c.name.value}>={c.threshold:g}" for c in a.outputs.comparators)
        lines.append(f"  outputs     {comps}; agreement at least {a.outputs.min_relative_agreement:g} of the "
                     f"{a.outputs.baseline.mode.value} baseline, min {a.outputs.min_pairs} pairs")
    lines.append(f"Rules:        trigger {s.trigger.value}, promotion {s.promotion.value}, on inconclusive "
                 f"{s.on_inconclusive.value}, on drift {s.on_drift.value}, deadline {_dur(s.progress_deadline)}")
    return lines


def _dur(value: timedelta) -> str:
    return format_duration(value)


def _outputs_lines(status: JSON) -> list[str]:
    outputs = status.get("outputs")
    if not isinstance(outputs, dict):
        return []
    lines = []
    for name, row in sorted((outputs.get("comparators") or {}).items()):
        if not isinstance(row, dict):
            continue
        cp, ca = row.get("candidatePairs") or 0, row.get("candidateAgree") or 0
        bp, ba = row.get("baselinePairs") or 0, row.get("baselineAgree") or 0
        cand = f"{ca}/{cp} agree ({ca / cp:.1%})" if cp else "no pairs yet"
        base = f"{ba}/{bp} ({ba / bp:.1%})" if bp else "no baseline pairs yet"
        relative = f", relative {(ca / cp) / (ba / bp):.2f}" if cp and bp and ba else ""
        lines.append(f"  {name}: candidate {cand}; baseline {base}{relative}")
    skipped = outputs.get("skippedPrimaryFailed")
    if skipped:
        lines.append(f"  skipped (the primary failed): {skipped}")
    return lines


def describe_text(obj: JSON, events: list[JSON], now: float) -> str:
    """Everything about why a policy is where it is, as plain text (kubectl describe style)."""
    meta, status = _meta(obj), _status(obj)
    created = parse_time(meta.get("creationTimestamp"))
    out = [
        f"Name:         {meta.get('name')}",
        f"Namespace:    {meta.get('namespace')}",
        f"Created:      {stamp(created)} ({ago(created, now)})",
        f"Generation:   {meta.get('generation', '-')} (observed by the controller: "
        f"{status.get('observedGeneration', '-')})",
        "Spec:",
        *("  " + line for line in _spec_lines(obj)),
        "Status:",
        f"  Phase:      {phase_of(obj)}" + (f", step {step_text(obj)}" if "/" in step_text(obj) else ""),
        f"  Weights:    {weights_text(obj)}",
        f"  Mirror:     {mirror_text(obj)}",
        f"  Message:    {status.get('message') or '-'}",
        f"  Last tick:  {status.get('lastTick') or '-'}",
    ]
    rollout = _dict(status.get("rollout"))
    if rollout.get("candidate"):
        out.append(f"  Candidate:  {rollout.get('candidate')}")
    for err in status.get("sourceErrors") or []:
        out.append(f"  Source error: {err}")
    verdict = status.get("lastVerdict") if isinstance(status.get("lastVerdict"), dict) else None
    if verdict:
        out.append(f"Last verdict: {verdict.get('outcome')} ({verdict.get('method', '-')}, "
                   f"{ago(parse_time(verdict.get('at')), now)})")
        out.append(f"  {verdict.get('reason') or ''}")
        for m in verdict.get("metrics") or []:
            if not isinstance(m, dict):
                continue
            out.append(f"  {m.get('name')} [{m.get('outcome')}]: primary {num(m.get('primary'))}, candidate "
                       f"{num(m.get('candidate'))}, effect {effect_text(m)}, threshold {num(m.get('threshold'))}, "
                       f"samples {samples_text(m)}")
            if m.get("sentence"):
                out.append(f"    {m.get('sentence')}")
    else:
        out.append("Last verdict: none yet")
    outputs = _outputs_lines(status)
    out.append("Output agreement:" if outputs else "Output agreement: none recorded")
    out.extend(outputs)
    hist = history_of(obj)
    out.append("History:" if hist else "History: none")
    for h in hist:
        at = h.get("at") if isinstance(h.get("at"), int | float) else None
        out.append(f"  {stamp(at)} ({ago(at, now)})  {h.get('from')} -> {h.get('to')}: {h.get('reason') or ''}")
    conds = [c for c in status.get("conditions") or [] if isinstance(c, dict)]
    out.append("Conditions:" if conds else "Conditions: none")
    if conds:
        rows = [["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"]]
        for c in conds:
            since = parse_time(c.get("lastTransitionTime"))
            rows.append([str(c.get("type")), str(c.get("status")), str(c.get("reason") or ""),
                         ago(since, now) if since is not None else "-", str(c.get("message") or "")])
        out.extend("  " + line for line in columns(rows).splitlines())
    last = status.get("lastCommand") if isinstance(status.get("lastCommand"), dict) else None
    if last:
        out.append(f"Last command: {last.get('command')} (id {last.get('id')}) by {last.get('by') or '?'} at "
                   f"{last.get('at') or '?'}, handled {last.get('handledAt') or '?'}, result {last.get('result')}")
    else:
        out.append("Last command: none")
    pending = pending_command(obj)
    if pending is not None:
        out.append(f"Pending command: {pending.command.value} (id {pending.id}) by {pending.by or '?'} at "
                   f"{pending.at or '?'}, not carried out yet")
    out.append("Events:" if events else "Events: none")
    if events:
        rows = [["TYPE", "REASON", "AGE", "FROM", "MESSAGE"]]
        for e in events:
            when = _event_time(e)
            count = e.get("count")
            age = ago(when, now) if when is not None else "-"
            if isinstance(count, int) and count > 1:
                age += f" (x{count})"
            source = (e.get("source") or {}).get("component") or e.get("reportingComponent") or ""
            rows.append([str(e.get("type") or ""), str(e.get("reason") or ""), age, str(source),
                         " ".join(str(e.get("message") or "").split())])
        out.extend("  " + line for line in columns(rows).splitlines())
    return "\n".join(out)


def _event_time(event: JSON) -> float | None:
    for key in ("lastTimestamp", "eventTime", "firstTimestamp"):
        ts = parse_time(event.get(key))
        if ts is not None:
            return ts
    return parse_time(_meta(event).get("creationTimestamp"))


EVENT_LIMIT = 20


def _rv_number(obj: JSON) -> int:
    """The resourceVersion as a number where it is one: orders events created within one second."""
    rv = str(_meta(obj).get("resourceVersion") or "")
    return int(rv) if rv.isdigit() else 0


async def events_for(client: KubeClient, obj: JSON) -> list[JSON]:
    """The object's recent core/v1 Events (oldest first, at most EVENT_LIMIT).

    Asks the server to filter by involvedObject; a server that cannot (400) gets a plain list of the
    namespace, filtered here. Both are filtered by kind and name here as well.
    """
    meta = _meta(obj)
    ns, name = str(meta.get("namespace") or "default"), str(meta.get("name"))
    selector = f"involvedObject.name={name},involvedObject.kind={SHADOW_POLICY.kind}"
    try:
        items = (await client.list(EVENT, ns, field_selector=selector)).items
    except BadRequest:
        items = (await client.list(EVENT, ns)).items
    mine = [e for e in items
            if (e.get("involvedObject") or {}).get("name") == name
            and (e.get("involvedObject") or {}).get("kind") in (None, SHADOW_POLICY.kind)]
    mine.sort(key=lambda e: (_event_time(e) or 0.0, _rv_number(e)))
    return mine[-EVENT_LIMIT:]


def describe(
    name: Annotated[str, typer.Argument(help="The policy's name.", show_default=False)],
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Explain why a rollout is where it is: spec, verdict numbers, history, events.

    Shows the spec in short, every metric's numbers and sentence behind the last verdict, output
    agreement counts, the history of transitions with times, conditions, the last command and the
    policy's recent Kubernetes Events.

    Example: shadowctl describe chat -n llm
    """
    conn = Conn(kubeconfig, context, namespace)

    async def body(client: KubeClient, ns: str) -> tuple[JSON, list[JSON]]:
        obj = await read_policy(client, ns, name)
        try:
            events = await events_for(client, obj)
        except Forbidden:
            _note("note: not allowed to list events in this namespace; events are left out")
            events = []
        return obj, events

    obj, events = run_async(lambda: _with_client(conn, body))
    _out(describe_text(obj, events, time.time()))


# --------------------------------------------------------------------------- commands


def refusal_text(command: Command, obj: JSON) -> str | None:
    """What a person is told when the object's phase refuses ``command`` (None: the controller would act).

    Which commands a phase accepts is :func:`shadowctl.machine.refusal`, the rule ``step`` itself
    applies; this only words it for the command line, with what would work instead.
    """
    phase_name = phase_of(obj)
    try:
        phase = Phase(phase_name)
    except ValueError:
        return None  # a phase this CLI does not know: let the controller decide
    # `.status.phase` is what `get` and `status` show; the rollout block adds where a pause came from.
    state = replace(RolloutState.from_dict(_dict(_status(obj).get("rollout"))), phase=phase)
    why = refusal(command, state)
    if why is None:
        return None
    name = _meta(obj).get("name")
    text = f"{key_of(obj)} is {phase_name}: {why}"
    if why is Refusal.nothing_to_approve:
        text += (f". `shadowctl promote {name} --full` skips the remaining analysis and sends 100% of live "
                 "traffic to the candidate")
    elif why is Refusal.already_paused:
        text += f"; `shadowctl resume {name}` continues it"
    return text


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


@dataclass(frozen=True)
class Sent:
    id: str
    phase: str
    replaced: str | None  # a pending command of someone else that this one replaced


async def send_command(client: KubeClient, namespace: str, name: str, command: Command) -> Sent:
    """Check the phase, then write the command annotation conditionally on what was read (409: again)."""
    ref = ResourceRef(SHADOW_POLICY, name, namespace)
    for _ in range(CONFLICT_ATTEMPTS):
        obj = await read_policy(client, namespace, name)
        why = refusal_text(command, obj)
        if why is not None:
            raise CliError(why)
        previous = pending_command(obj)
        cmd = new_command(command, iso(time.time()), _who())
        try:
            await client.patch_merge(ref, command_patch(cmd), resource_version=_meta(obj).get("resourceVersion"))
        except Conflict:
            continue
        except NotFound as exc:
            raise CliError(f"{KIND_LABEL} {namespace}/{name} not found") from exc
        replaced = f"{previous.command.value} (id {previous.id})" if previous is not None else None
        return Sent(cmd.id, phase_of(obj), replaced)
    raise CliError(f"{KIND_LABEL} {namespace}/{name} kept changing; try again")


async def wait_for(client: KubeClient, namespace: str, name: str, sent_id: str, seconds: float,
                   sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> JSON:
    """Poll until ``status.lastCommand.id`` is ``sent_id`` or ``seconds`` passed; returns that lastCommand."""
    deadline = time.monotonic() + seconds
    while True:
        obj = await read_policy(client, namespace, name)
        last = _status(obj).get("lastCommand")
        if isinstance(last, dict) and last.get("id") == sent_id:
            return last
        pending = pending_command(obj)
        if pending is not None and pending.id != sent_id:
            raise CliError(f"another command, {pending.command.value} (id {pending.id}), replaced this one "
                           "before the controller acted on it")
        if time.monotonic() >= deadline:
            raise CliError(f"the controller did not carry out the command (id {sent_id}) within {seconds:g}s; "
                           f"is `shadowctl run` running and watching namespace {namespace}?")
        await sleep(POLL_SECONDS)


def _timeout_seconds(text: str) -> float:
    try:
        return parse_duration(text).total_seconds()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


WaitOpt = Annotated[bool, typer.Option("--wait", help="Wait until the controller has carried out the command.")]
TimeoutOpt = Annotated[str, typer.Option("--timeout", help="How long --wait waits, e.g. 30s or 5m.")]
NameArg = Annotated[str, typer.Argument(help="The policy's name.", show_default=False)]


def _command(command: Command, conn: Conn, name: str, wait: bool, timeout: str) -> None:
    seconds = _timeout_seconds(timeout)
    verb = "promote --full" if command is Command.promote_full else command.value

    async def body(client: KubeClient, ns: str) -> tuple[str, JSON | None]:
        sent = await send_command(client, ns, name, command)
        if sent.replaced:
            _note(f"note: this replaces {sent.replaced}, which the controller had not carried out yet")
        _out(f"{verb} requested for {ns}/{name} (phase {sent.phase}); the controller acts at its next tick")
        if not wait:
            return ns, None
        sys.stdout.flush()
        return ns, await wait_for(client, ns, name, sent.id, seconds)

    ns, done = run_async(lambda: _with_client(conn, body))
    if done is not None:
        _out(f"{verb} carried out for {ns}/{name}: phase {done.get('result') or '?'}")


def promote(
    name: NameArg,
    full: Annotated[bool, typer.Option("--full", help="Skip the remaining analysis: send 100% to the candidate "
                                                     "now, from any running phase.")] = False,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = "2m",
) -> None:
    """Approve a promotion that waits for a person (phase WaitingPromotion), or with --full promote now.

    Example: shadowctl promote chat -n llm --wait
    """
    _command(Command.promote_full if full else Command.promote, Conn(kubeconfig, context, namespace), name, wait,
             timeout)


def rollback(
    name: NameArg,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = "2m",
) -> None:
    """Roll back: 100% of live traffic to the primary and the mirror removed (also after a promotion).

    Example: shadowctl rollback chat -n llm
    """
    _command(Command.rollback, Conn(kubeconfig, context, namespace), name, wait, timeout)


def pause(
    name: NameArg,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = "2m",
) -> None:
    """Pause a rollout in analysis: traffic stays where it is and no step is taken until resume.

    The progress deadline still runs while paused.

    Example: shadowctl pause chat -n llm
    """
    _command(Command.pause, Conn(kubeconfig, context, namespace), name, wait, timeout)


def resume(
    name: NameArg,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = "2m",
) -> None:
    """Resume a paused rollout; the analysis of the phase it was paused in starts again.

    Example: shadowctl resume chat -n llm
    """
    _command(Command.resume, Conn(kubeconfig, context, namespace), name, wait, timeout)


def retry(
    name: NameArg,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = "2m",
) -> None:
    """Start a finished (Succeeded, RolledBack, Failed) or paused rollout again from its first phase.

    Example: shadowctl retry chat -n llm
    """
    _command(Command.retry, Conn(kubeconfig, context, namespace), name, wait, timeout)


def register(app: typer.Typer) -> None:
    app.command("apply")(apply)
    app.command("get")(get)
    app.command("status")(status)
    app.command("describe")(describe)
    app.command("promote")(promote)
    app.command("rollback")(rollback)
    app.command("pause")(pause)
    app.command("resume")(resume)
    app.command("retry")(retry)
