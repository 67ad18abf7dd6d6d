"""`shadowctl apply`: create or update ShadowPolicies from files, as kubectl apply does.

Each file is read and parsed once, by the policy loader (:func:`read_file`): it keeps each document's
data as written and its YAML node, which points at the line of a ``metadata.namespace`` that clashes
with ``-n``. What a valid file is, and how its problems are worded (FILE:LINE:COL, did-you-mean),
is the loader's alone.

Why ``apply`` sends the file's own document rather than the parsed model: the model fills in
defaults; sending them would pin today's defaults into the cluster and make every later default
change look like a user edit.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from rich.markup import escape

from shadowctl.cli.common import (
    YAML_LIMITS,
    ContextOpt,
    KubeconfigOpt,
    MaxBytesOpt,
    MaxDepthOpt,
    MaxNodesOpt,
    NamespaceOpt,
    err_console,
    fail,
    out,
    yaml_limits,
)
from shadowctl.cli.connect import CliError, Conn, explain, one_line, run_async, with_client
from shadowctl.cli.objects import CONFLICT_ATTEMPTS, JSON, KIND_LABEL, meta_of

if TYPE_CHECKING:
    from shadowctl.kube import KubeClient
    from shadowctl.policy import Problem
    from shadowctl.policy.yaml_bounds import YamlLimits


@dataclass
class _Item:
    """One policy document to apply: as written, its node (for positions), its name and where it goes."""

    file: Path
    doc: JSON
    node: yaml.MappingNode
    name: str
    namespace: str  # the file's metadata.namespace; "" until decided (-n, else the context's)


def read_file(file: Path, limits: YamlLimits) -> list[_Item]:
    """The file's policies, parsed once and validated by the policy loader; raises PolicyError with every problem."""
    from shadowctl.cli.policy_files import load_documents

    items = []
    for parsed in load_documents(file, limits):
        meta = parsed.data.get("metadata") or {}
        written = meta.get("namespace") if isinstance(meta.get("namespace"), str) else None
        items.append(_Item(file, parsed.data, parsed.node, parsed.policy.metadata.name, written or ""))
    return items


def _namespace_mark(node: yaml.MappingNode) -> tuple[int, int]:
    """Line and column (1-based) of ``metadata.namespace`` in a document's node."""
    for key, value in node.value:
        if key.value == "metadata" and isinstance(value, yaml.MappingNode):
            for k, v in value.value:
                if k.value == "namespace":
                    return v.start_mark.line + 1, v.start_mark.column + 1
    return 1, 1


def _namespace_problem(item: _Item, flag: str | None) -> Problem | None:
    """A metadata.namespace that differs from ``-n`` is an error, as in kubectl."""
    from shadowctl.policy import Problem

    if not (item.namespace and flag and item.namespace != flag):
        return None
    return Problem(
        str(item.file), *_namespace_mark(item.node), "metadata.namespace",
        f"the namespace in the file ({item.namespace!r}) does not match the namespace given with -n ({flag!r}); "
        f"pass -n {item.namespace} or remove metadata.namespace from the file")


def collect(paths: Sequence[Path], namespace_flag: str | None, limits: YamlLimits = YAML_LIMITS) -> list[_Item]:
    """Validate every file; raise CliError after printing every problem, before anything is sent."""
    from shadowctl.cli.policy_files import policy_files
    from shadowctl.policy import PolicyError

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
            found = read_file(file, limits)
        except PolicyError as exc:
            problems.extend(exc.problems)
            continue
        for item in found:
            clash = _namespace_problem(item, namespace_flag)
            if clash is not None:
                problems.append(clash)
            # An empty namespace is decided after connecting (the context's namespace).
            item.namespace = item.namespace or namespace_flag or ""
            items.append(item)
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


def desired_object(item: _Item, existing: JSON | None) -> JSON:
    """What to send: the file's document; for an update, merged onto the live object's metadata and status.

    Labels and annotations from the file win; others already on the object (the pending command,
    other tools' annotations) are kept. ``shadowctl.dev/command`` is never taken from a file.
    """
    from shadowctl.controller.commands import COMMAND_ANNOTATION

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
    live = copy.deepcopy(meta_of(existing))
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
    a, b = meta_of(existing), meta_of(body)
    return (
        existing.get("spec") == body.get("spec")
        and (a.get("labels") or {}) == (b.get("labels") or {})
        and (a.get("annotations") or {}) == (b.get("annotations") or {})
    )


async def apply_one(client: KubeClient, item: _Item) -> str:
    """Create or update one policy; returns created, configured or unchanged. Retries on 409."""
    from shadowctl.kube import SHADOW_POLICY, AlreadyExists, Conflict, NotFound, ResourceRef

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
        before = meta_of(existing).get("resourceVersion")
        return "unchanged" if meta_of(stored).get("resourceVersion") == before else "configured"
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
    max_bytes: MaxBytesOpt = YAML_LIMITS.max_bytes,
    max_depth: MaxDepthOpt = YAML_LIMITS.max_depth,
    max_nodes: MaxNodesOpt = YAML_LIMITS.max_nodes,
) -> None:
    """Create or update ShadowPolicies from files, like kubectl apply.

    Every file is validated first; if any is invalid, each problem is printed as FILE:LINE:COL and
    nothing is applied. The namespace is the file's metadata.namespace, else -n, else the context's.
    An update keeps the object's status and the annotations others put on it.

    Example: shadowctl apply -f policies/chat-istio.yaml
    """
    conn = Conn(kubeconfig, context, namespace)
    try:
        items = collect(filename, namespace, yaml_limits(max_bytes, max_depth, max_nodes))
    except CliError as exc:
        raise fail(one_line(exc.message), exc.code) from None

    async def body(client: KubeClient, default_ns: str) -> int:
        from shadowctl.kube import BadRequest, Invalid

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
            out(f"{KIND_LABEL} {item.namespace}/{item.name} {result}")
        return failures

    if run_async(lambda: with_client(conn, body)):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("apply")(apply)
