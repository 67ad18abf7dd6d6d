"""PromQL query templates: `{{ placeholder }}` names and the check run at load time.

Placeholders are filled by the metric source with escaped label values; here we
only check that a template names placeholders that exist, so a typo fails when
the policy loads, not at 3 a.m. in the middle of a rollout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PLACEHOLDERS: dict[str, str] = {
    "namespace": "the policy's namespace",
    "service": "the target's service or VirtualService host",
    "workload": "the variant's Deployment (or other workload) name",
    "revision": "the variant's Knative revision",
    "pod": "a regular expression matching the variant's pods",
    "subset": "the variant's Istio destination subset",
    "host": "the variant's destination host",
    "variant": "primary or candidate",
    "window": "the range of the look, such as 30s",
    "selector": "the label matchers that select the variant, such as namespace=\"llm\",pod=~\"chat-v2-.*\"",
    "exported_selector": "the same matchers on exported_namespace and exported_pod (the DCGM exporter's pod labels"
                         " as the dcgm-exporter chart's honorLabels: false leaves them)",
    "pod_name_selector": "the same matchers on pod_namespace and pod_name (DCGM exporter's --use-old-namespace)",
}

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")

QUOTED = frozenset({"namespace", "service", "workload", "revision", "pod", "subset", "host"})
"""Placeholders whose values are names from the policy or the cluster: the metric source escapes them for a
double-quoted PromQL string, so a template must put them inside one (``version="{{ subset }}"``); anywhere
else a value could end the expression and append its own. ``variant`` (primary or candidate), ``window`` (a
duration) and the selectors (label matchers the source writes, values escaped) go anywhere."""


def placement(template: str) -> list[tuple[str, str | None]]:
    """Each placeholder of a template, in order, with the PromQL string it sits in: ``'"'``, ``"'"`` or
    ``"`"`` (the quote that opened it), or None outside strings (a ``#`` comment counts as outside)."""
    out: list[tuple[str, str | None]] = []
    quote: str | None = None
    i, n = 0, len(template)
    while i < n:
        match = _PLACEHOLDER.match(template, i)
        if match is not None:
            out.append((match.group(1), quote))
            i = match.end()
            continue
        ch = template[i]
        if quote is None:
            if ch in "\"'`":
                quote = ch
        elif ch == "\\" and quote != "`":  # an escape: the next character cannot close the string
            i += 1
        elif ch == quote:
            quote = None
        i += 1
    return out


def placeholders(template: str) -> list[str]:
    """The placeholder names a template uses, in order of appearance."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(template)]


def check_template(template: str) -> None:
    """Raise ValueError naming unknown placeholders (with the known ones)."""
    if not template.strip():
        raise ValueError("the query is empty")
    unknown = sorted({p for p in placeholders(template) if p not in PLACEHOLDERS})
    if unknown:
        raise ValueError(
            "unknown placeholder" + ("s " if len(unknown) > 1 else " ") + ", ".join("{{ " + u + " }}" for u in unknown)
            + "; known: " + ", ".join(sorted(PLACEHOLDERS))
        )
    rest = _PLACEHOLDER.sub("", template)
    if "{{" in rest or "}}" in rest:
        raise ValueError("a '{{' or '}}' in the query does not form a placeholder such as {{ namespace }}")
    for name, context in placement(template):
        if name in QUOTED and context != '"':
            where = "outside a string" if context is None else f"inside a {context}-quoted string"
            raise ValueError(
                f"{{{{ {name} }}}} stands {where}: a name is text, so write it inside double quotes, "
                f'e.g. version="{{{{ {name} }}}}" (its value is escaped for a double-quoted PromQL string)')


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill every placeholder with `values[name]`, inserted verbatim.

    The caller escapes the values (the metric source does, for the PromQL context
    each placeholder sits in); a placeholder without a value raises KeyError naming it,
    so that an unset variant field never becomes an empty matcher.
    """
    missing = sorted({p for p in placeholders(template) if p not in values})
    if missing:
        raise KeyError(", ".join(missing))
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
