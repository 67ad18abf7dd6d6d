"""Bounds on a YAML text before it is composed: size, nesting depth, and nodes with aliases expanded.

Why a pass of its own: PyYAML composes recursively (5,000 nested brackets end in a RecursionError)
and shares an aliased node wherever it is used, so a few hundred bytes of anchors, each used nine
times by the next, stand for 9**10 nodes: walking them (to map errors to lines) or validating them
never ends. This pass reads the parser's event stream, which is flat and needs no recursion, keeps
for each anchor the number of nodes it stands for, and stops at the first event past a limit, with
the line and column where it happened. Nothing is composed or constructed before it passes, so the
time and memory a hostile file can take are bounded by the limits, not by the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from shadowctl.errors import ShadowctlError

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class YamlLimits:
    """How much YAML one file may hold; the defaults are far above any real policy or manifest."""

    max_bytes: int = 4 * 1024 * 1024
    """Size of the text, in bytes of UTF-8 (etcd stores objects up to 1.5 MiB)."""
    max_depth: int = 64
    """Collections nested in each other (a ShadowPolicy needs about 8)."""
    max_nodes: int = 200_000
    """Scalars and collections, every alias counted as the nodes it stands for."""


class YamlTooLarge(ShadowctlError):
    """A YAML text exceeds a :class:`YamlLimits` bound; ``line`` and ``column`` (1-based) say where."""

    def __init__(self, message: str, line: int = 1, column: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


def _at(message: str, event: yaml.Event) -> YamlTooLarge:
    mark = event.start_mark
    return YamlTooLarge(message, mark.line + 1, mark.column + 1) if mark else YamlTooLarge(message)


def check_yaml_bounds(text: str, limits: YamlLimits = YamlLimits()) -> None:
    """Raise :class:`YamlTooLarge` if ``text`` exceeds ``limits``; return None otherwise.

    YAML syntax errors are not reported here (the parser that composes the text reports them with
    its own words): the check stops at the first one and lets the text through.
    """
    size = len(text.encode("utf-8", errors="replace"))
    if size > limits.max_bytes:
        raise YamlTooLarge(f"the file is {size} bytes, more than the limit of {limits.max_bytes}")
    loader = _Loader(text)
    anchors: dict[str, int] = {}  # anchor -> the nodes it stands for, its own aliases expanded
    frames: list[tuple[str | None, int]] = []  # each open collection: its anchor, `seen` before it began
    seen = 0  # nodes so far, aliases expanded
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.CollectionStartEvent):
                if len(frames) >= limits.max_depth:
                    raise _at(f"YAML nested more than {limits.max_depth} levels deep", event)
                frames.append((event.anchor, seen))
                seen += 1
            elif isinstance(event, yaml.CollectionEndEvent):
                anchor, before = frames.pop()
                if anchor is not None:
                    anchors[anchor] = seen - before
            elif isinstance(event, yaml.ScalarEvent):
                seen += 1
                if event.anchor is not None:
                    anchors[event.anchor] = 1
            elif isinstance(event, yaml.AliasEvent):
                seen += anchors.get(str(event.anchor), 1)  # an unknown alias: the composer says so
            if seen > limits.max_nodes:
                raise _at(f"YAML stands for more than {limits.max_nodes} nodes (aliases expanded)", event)
    except yaml.MarkedYAMLError as exc:
        if "nesting depth" in str(exc.problem):  # libyaml's own limit (1,000), met before ours could be
            mark = exc.problem_mark
            line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            raise YamlTooLarge(f"YAML nested more than {limits.max_depth} levels deep", line, column) from exc
        return
    except yaml.YAMLError:
        return
    finally:
        loader.dispose()
