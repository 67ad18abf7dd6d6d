"""Every query of deploy/grafana/shadowctl.json, and running them against a real Prometheus as Grafana would.

Grafana substitutes the template variables and asks Prometheus for a range (query_range over the
dashboard's time range); a variable ``label_values(SELECTOR, LABEL)`` asks for the label's values among
the selected series. These helpers do the same with httpx: ``$policy`` and ``$namespace`` from the
variables' own queries, a repeated row once per value of its variable, ``$__rate_interval`` as Grafana
computes it for a data source with the default 15 s scrape interval (1m).
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "shadowctl.json"
BUILDER = REPO / "deploy" / "grafana" / "build.py"
RATE_INTERVAL = "1m"
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>[a-zA-Z_]\w*)\)$")


def builder() -> ModuleType:
    """deploy/grafana/build.py as a module (it is a script beside the JSON, not part of the package)."""
    spec = importlib.util.spec_from_file_location("shadowctl_dashboard_build", BUILDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Query:
    where: str  # "panel 'Phase' A", "annotation 'Decisions'"
    expr: str
    repeat: str | None = None  # the variable this query's row repeats over


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def queries(model: dict[str, Any]) -> list[Query]:
    """Each panel target's and each annotation's PromQL, with the variable its row repeats over."""
    out: list[Query] = []
    repeat: str | None = None

    def panel_queries(panel: dict[str, Any], repeat: str | None) -> None:
        for target in panel.get("targets") or []:
            out.append(Query(f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"], repeat))

    for panel in model.get("panels", []):
        if panel.get("type") == "row":
            repeat = panel.get("repeat") or None
            for inner in panel.get("panels") or []:  # a collapsed row holds its panels
                panel_queries(inner, repeat)
            continue
        panel_queries(panel, panel.get("repeat") or repeat)
    for annotation in model.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            out.append(Query(f"annotation {annotation['name']!r}", annotation["expr"]))
    return out


def variables(model: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in model.get("templating", {}).get("list", []) if v.get("type") == "query"]


def substitute(expr: str, values: dict[str, str]) -> str:
    out = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name in sorted(values, key=len, reverse=True):  # $metric before $m...
        out = out.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return out


class Checker:
    """Runs a dashboard's queries against one Prometheus over [start, end]; collects what is wrong."""

    def __init__(self, client: httpx.AsyncClient, prometheus: str, start: float, end: float, step: float = 5.0):
        self.client, self.prometheus, self.start, self.end, self.step = client, prometheus, start, end, step
        self.problems: list[str] = []
        self.ran = 0

    async def range(self, expr: str) -> list[dict[str, Any]] | None:
        """The series of `expr` over the range (None and a problem when Prometheus refuses it)."""
        self.ran += 1
        response = await self.client.get(f"{self.prometheus}/api/v1/query_range", params={
            "query": expr, "start": self.start, "end": self.end, "step": self.step}, timeout=30.0)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            self.problems.append(f"invalid: {expr}: {body.get('errorType')}: {body.get('error')}")
            return None
        return list(body["data"]["result"])

    async def label_values(self, query: str, values: dict[str, str]) -> list[str]:
        m = _LABEL_VALUES.match(substitute(query, values))
        if m is None:
            self.problems.append(f"not a label_values(SELECTOR, LABEL) query: {query}")
            return []
        label = m["label"]
        series = await self.range(f"group by ({label}) ({m['selector']})")
        return sorted({s["metric"][label] for s in series or [] if label in s["metric"]})

    async def resolve(self, model: dict[str, Any]) -> dict[str, list[str]]:
        """Each query variable's values, in dashboard order (a variable may use the ones before it)."""
        resolved: dict[str, list[str]] = {}
        for var in variables(model):
            current = {k: v[0] for k, v in resolved.items() if v}
            found = await self.label_values(str(var["query"]), current)
            if var.get("regex"):  # Grafana's form: /PATTERN/flags, the first group is the value
                regex = str(var["regex"])
                pattern = re.compile(regex[1:regex.rindex("/")] if regex.startswith("/") else regex)
                found = sorted({m.group(1) for v in found if (m := pattern.match(v))})
            if not found:
                self.problems.append(f"variable {var['name']!r}: no values for {var['query']}")
            resolved[var["name"]] = found
        return resolved

    async def check(self, model: dict[str, Any], fixed: dict[str, str]) -> None:
        """Run every query; `fixed` pins variables (the policy to look at), the others come from their queries."""
        resolved = await self.resolve(model)
        for name, value in fixed.items():
            if value not in resolved.get(name, [value]):
                self.problems.append(f"variable {name!r}: {value!r} is not among {resolved.get(name)}")
        base = {name: vals[0] for name, vals in resolved.items() if vals} | fixed
        for query in queries(model):
            repeated = resolved.get(query.repeat or "") or ([fixed[query.repeat]] if query.repeat in fixed else [])
            runs = [base] if query.repeat is None else [base | {query.repeat: v} for v in repeated]
            if not runs:
                self.problems.append(f"{query.where}: its row repeats over ${query.repeat}, which has no values")
            for values in runs:
                expr = substitute(query.expr, values)
                if "$" in expr:
                    self.problems.append(f"{query.where}: a variable is left in {expr}")
                    continue
                series = await self.range(expr)
                if series is not None and not any(s.get("values") for s in series):
                    self.problems.append(f"{query.where}: no series: {expr}")
