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
