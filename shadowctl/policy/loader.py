"""Load ShadowPolicy YAML and report every problem at once, as FILE:LINE:COL: path: message.

Why compose the YAML ourselves: pydantic reports a location as a path of keys
(``spec.canary.steps[2]``), but a person fixes a file by line and column. We
keep the composed node tree next to the plain data and map each error's path
back to the node that caused it (the key node for an unknown field, the value
node otherwise, the nearest existing parent for a missing field).
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from shadowctl.errors import ShadowctlError
from shadowctl.policy.model import ShadowPolicy
from shadowctl.policy.yaml_bounds import YamlLimits, YamlTooLarge, check_yaml_bounds

PathT = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy file, pointing at its line and column (1-based)."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PolicyError(ShadowctlError):
    """A policy file could not be loaded; `problems` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def format_path(path: Iterable[str | int]) -> str:
    """`("spec", "steps", 2)` -> `spec.steps[2]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


# --------------------------------------------------------------------------- YAML with positions


class _DuplicateKey(Exception):
    def __init__(self, key: str, node: yaml.Node) -> None:
        self.key = key
        self.node = node


def _index(node: yaml.Node, path: PathT, marks: dict[PathT, tuple[yaml.Node, yaml.Node | None]]) -> None:
    """Record, for every path, its value node and (for mapping entries) its key node."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                raise _DuplicateKey(key, key_node)
            seen.add(key)
            child = (*path, key)
            marks[child] = (value_node, key_node)
            _index(value_node, child, marks)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = (*path, i)
            marks[child] = (item, None)
            _index(item, child, marks)


@dataclass
class _Document:
    data: Any
    root: yaml.Node
    marks: dict[PathT, tuple[yaml.Node, yaml.Node | None]]


def _documents(text: str, file: str, limits: YamlLimits) -> Iterator[_Document | Problem]:
    try:
        check_yaml_bounds(text, limits)
    except YamlTooLarge as exc:
        yield Problem(file, exc.line, exc.column, "", exc.message)
        return
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:
        yield Problem(file, 1, 1, "", f"invalid YAML: {exc}")
        return
    try:
        while loader.check_node():
            root = loader.get_node()
            if root is None:  # pragma: no cover - check_node guarantees a node
                break
            marks: dict[PathT, tuple[yaml.Node, yaml.Node | None]] = {(): (root, None)}
            try:
                _index(root, (), marks)
            except _DuplicateKey as dup:
                m = dup.node.start_mark
                yield Problem(file, m.line + 1, m.column + 1, "", f"duplicate key {dup.key!r}")
                continue
            data = loader.construct_document(root)
            yield _Document(data, root, marks)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        yield Problem(file, line, col, "", f"invalid YAML: {exc.problem or exc.context}")
    except yaml.YAMLError as exc:
        yield Problem(file, 1, 1, "", f"invalid YAML: {exc}")
    except (ValueError, OverflowError) as exc:  # PyYAML's scanner on an escape such as "\U99999999"
        mark = loader.get_mark()
        yield Problem(file, mark.line + 1, mark.column + 1, "", f"invalid YAML: an escape out of range ({exc})")
    finally:
        loader.dispose()


# --------------------------------------------------------------------------- model navigation for did-you-mean


def _unwrap(annotation: Any) -> Any:
    """Strip Optional/Annotated/list to the model class inside, if any."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                return _unwrap(arg)
    if origin in (list, tuple, set, dict):
        args = typing.get_args(annotation)
        return _unwrap(args[-1]) if args else None
    return annotation


def _model_at(path: PathT) -> type[BaseModel] | None:
    model: type[BaseModel] | None = ShadowPolicy
    for part in path:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = next(
            (f for name, f in model.model_fields.items() if part in (f.alias, name)),
            None,
        )
        if field is None:
            return None
        inner = _unwrap(field.annotation)
        model = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
    return model


def _suggest(path: PathT) -> str:
    if not path:
        return ""
    model = _model_at(path[:-1])
    if model is None or not isinstance(path[-1], str):
        return ""
    names = [f.alias or name for name, f in model.model_fields.items()]
    close = difflib.get_close_matches(path[-1], names, n=1, cutoff=0.6)
    if close:
        return f", did you mean {close[0]!r}?"
    return "; known fields: " + ", ".join(sorted(names))


# --------------------------------------------------------------------------- errors -> problems


def _message(err: Any, path: PathT) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown field" + _suggest(path)
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"must be {err['ctx']['expected']}, got {err.get('input')!r}"
    msg = str(err["msg"])
    if kind == "enum":
        msg += f", got {err.get('input')!r}"
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


def _problem(file: str, doc: _Document, path: PathT, message: str) -> Problem:
    key = path
    while key not in doc.marks and key:
        key = key[:-1]
    value_node, key_node = doc.marks[key]
    # Point at the key for unknown or missing fields, at the value otherwise.
    node = key_node if (key_node is not None and (key != path or message.startswith("unknown field"))) else value_node
    if key != path:  # missing: the parent mapping exists, the field does not
        node = value_node
    mark = node.start_mark
    return Problem(file, mark.line + 1, mark.column + 1, format_path(path), message)


def _clean_loc(loc: tuple[Any, ...], data: Any) -> PathT:
    """The path of keys and indices in ``data`` that pydantic's ``loc`` names. Pydantic also puts its
    validator and union tags into ``loc`` (``function-after[...]``, ``list[str]``); those are dropped unless
    the data hold such a key: a key may contain "[" too."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if (isinstance(node, dict) and part in node) or (isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            node = node[part]
        elif isinstance(part, str) and (part.startswith("function-") or "[" in part):
            continue
        else:
            node = None  # a missing field: its name is the path's end
        out.append(part)
    return tuple(out)


@dataclass(frozen=True)
class ParsedPolicy:
    """One validated policy document: the model, the data as written, and its YAML node (for positions)."""

    policy: ShadowPolicy
    data: dict[str, Any]
    node: yaml.MappingNode


def parse_documents(text: str, file: str = "<string>", limits: YamlLimits = YamlLimits()) -> list[ParsedPolicy]:
    """Parse every ShadowPolicy document in `text`, keeping each one's data and node; raise
    PolicyError listing all problems. A text past `limits` is one problem, found before it is composed."""
    parsed: list[ParsedPolicy] = []
    problems: list[Problem] = []
    count = 0
    for item in _documents(text, file, limits):
        if isinstance(item, Problem):
            problems.append(item)
            continue
        count += 1
        doc = item
        if doc.data is None:
            continue
        if not isinstance(doc.data, dict) or not isinstance(doc.root, yaml.MappingNode):
            m = doc.root.start_mark
            problems.append(Problem(file, m.line + 1, m.column + 1, "", "expected a mapping (a ShadowPolicy object)"))
            continue
        try:
            parsed.append(ParsedPolicy(ShadowPolicy.model_validate(doc.data), doc.data, doc.root))
        except ValidationError as exc:
            found: dict[tuple[PathT, str], None] = {}
            for err in exc.errors():
                path = _clean_loc(err["loc"], doc.data)
                found[(path, _message(err, path))] = None
            # A misspelt key also shows up as its correct name "missing": say it once.
            suggested = {
                (*path[:-1], message.split("'")[1])
                for path, message in found
                if message.startswith("unknown field, did you mean")
            }
            for path, message in found:
                if message == "required field is missing" and path in suggested:
                    continue
                problems.append(_problem(file, doc, path, message))
    if problems:
        raise PolicyError(sorted(problems, key=lambda p: (p.line, p.column)))
    if not parsed and not count:
        raise PolicyError([Problem(file, 1, 1, "", "no ShadowPolicy document in the file")])
    return parsed


def parse_policies(text: str, file: str = "<string>", limits: YamlLimits = YamlLimits()) -> list[ShadowPolicy]:
    """Parse every ShadowPolicy document in `text`; raise PolicyError listing all problems."""
    return [p.policy for p in parse_documents(text, file, limits)]
