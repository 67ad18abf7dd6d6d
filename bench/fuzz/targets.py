"""The paths where input from outside reaches shadowctl, each as a function of raw bytes (for atheris) and a
hypothesis strategy of structured inputs, with the errors that path is allowed to answer with.

A target returns normally, or raises one of its ``expected`` errors: that is the path refusing bad input
in words. Anything else that escapes is a finding (a traceback a user would see, or a crash of a tick).
Each target drives the real code: the policy loader, `shadowctl render` and `shadowctl judge replay`
through the typer app, the output-event parser and the pairer, the Prometheus source against a local
HTTP server that answers with the input, the controller's reading of objects from the API server, and
the tap's parsing of requests and answers. `render` takes an Istio VirtualService, a Knative Service, a
Gateway API HTTPRoute and a KServe InferenceService (``render-kserve``: its status says which revision is the
candidate, so status fields are mutated too). `promql` puts drawn names (quotes, backslashes, newlines, ``{{``, unicode) into a
policy's variant selectors and has a real Prometheus parse every query shadowctl writes from it (the
``prometheus`` binary must be on PATH or in /usr/bin). The webhook path reads only a status line (shadowctl/webhooks.py)
and has nothing to fuzz.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
CHAT_POLICY = (REPO / "policies" / "chat-istio.yaml").read_text()
CHAT_VS = next(d for d in yaml.safe_load_all((REPO / "istio" / "chat.yaml").read_text()) if d["kind"] == "VirtualService")


@dataclass
class Target:
    """One path: ``run(data)`` feeds raw bytes through it; ``structured`` draws inputs shaped like real ones."""

    name: str
    run: Callable[[bytes], None]
    structured: st.SearchStrategy[bytes]
    expected: tuple[type[BaseException], ...] = ()
    setup: Callable[[], None] = field(default=lambda: None)


# --------------------------------------------------------------------------- shared strategies

_WRONG = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                   st.text(max_size=20), st.lists(st.integers(), max_size=3),
                   st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path] if path else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*path, i))
    return found


def mutated(base: Any, *, max_changes: int = 3) -> st.SearchStrategy[Any]:
    """``base`` with up to ``max_changes`` values replaced by values of other types, or deleted."""
    paths = _paths(base)

    @st.composite
    def draw(data: st.DrawFn) -> Any:
        obj = copy.deepcopy(base)
        for path in data(st.lists(st.sampled_from(paths), min_size=1, max_size=max_changes)):
            node = obj
            try:
                for key in path[:-1]:
                    node = node[key]
                if data(st.booleans()):
                    node[path[-1]] = data(_WRONG)
                else:
                    del node[path[-1]]
            except (KeyError, IndexError, TypeError):
                continue
        return obj

    return draw()


def _json_bytes(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return strategy.map(lambda v: json.dumps(v, default=str).encode())


def _yaml_bytes(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return strategy.map(lambda v: yaml.safe_dump(v).encode())


# --------------------------------------------------------------------------- policy files


def _policy(data: bytes) -> None:
    from shadowctl.policy import parse_policies

    parse_policies(data.decode("utf-8", errors="replace"), "fuzz.yaml")


def _policy_expected() -> tuple[type[BaseException], ...]:
    from shadowctl.policy import PolicyError

    return (PolicyError,)


# --------------------------------------------------------------------------- CLI files (render, replay)


class _Cli:
    """One temporary file and the typer app, run in-process as a person runs the command."""

    def __init__(self) -> None:
        from typer.testing import CliRunner

        from shadowctl.cli.app import app

        self.app = app
        self.runner = CliRunner()
        self.file = Path(tempfile.mkdtemp(prefix="shadowctl-fuzz-")) / "input"

    def __call__(self, data: bytes, command: list[str], options: list[str]) -> None:
        self.file.write_bytes(data)
        result = self.runner.invoke(self.app, [*command, str(self.file), *options])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        if result.exit_code not in (0, 1, 2) or "Traceback" in result.output:
            raise AssertionError(f"exit {result.exit_code}: {result.output[-500:]}")


_CLI: list[_Cli] = []


def _cli() -> _Cli:
    if not _CLI:
        _CLI.append(_Cli())
    return _CLI[0]


def _render(data: bytes) -> None:
    _cli()(data, ["render"], ["--primary", "chat.llm.svc.cluster.local/v1:8000", "--candidate",
                              "chat.llm.svc.cluster.local/v2:8000", "--route", "chat-default", "--weight", "10",
                              "--mirror", "5"])


def _render_knative(data: bytes) -> None:
    _cli()(data, ["render"], ["--candidate", "llm-00002", "--weight", "20", "--tag", "canary"])


KSVC = yaml.safe_load((REPO / "tests" / "fixtures" / "routers" / "ksvc-llm.yaml").read_text())


def _render_gateway(data: bytes) -> None:
    _cli()(data, ["render"], ["--primary", "chat-v1:8000", "--candidate", "chat-v2:8000", "--rule", "chat-default",
                              "--weight", "10", "--mirror", "2.5"])


ROUTE = yaml.safe_load((REPO / "gateway-api" / "chat.yaml").read_text())


def _render_kserve(data: bytes) -> None:
    _cli()(data, ["render"], ["--weight", "20"])


ISVC = yaml.safe_load((REPO / "tests" / "fixtures" / "routers" / "isvc-llm.yaml").read_text())


def _replay(data: bytes) -> None:
    _cli()(data, ["judge", "replay"], ["--statistic", "p50", "--min-samples", "2"])


_LOOK = st.fixed_dictionaries({
    "stream": st.sampled_from(["a", "b", 1]), "t": st.floats(0, 1e4),
    "primary": st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=20),
    "candidate": st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=20),
})
_REPLAY = st.lists(st.one_of(_LOOK, mutated({"stream": "a", "t": 60, "primary": [1.0, 2.0], "candidate": [1.5]}),
                             mutated({"stream": "h", "t": 60, "primary_hist": {"le": [0.1, 1, "+Inf"],
                                                                               "counts": [1, 2, 3]},
                                      "candidate_hist": {"le": [0.1, 1, "+Inf"], "counts": [0, 2, 4]}}),
                             mutated({"stream": "p", "t": 60, "paired": [[1.0, 1.1], [2.0, 2.5]]})),
                   max_size=6).map(lambda looks: "\n".join(json.dumps(x) for x in looks).encode())


# --------------------------------------------------------------------------- output events


def _event(data: bytes) -> None:
    from shadowctl.compare.comparators import json_structure, rouge_l, token_f1, tool_calls
    from shadowctl.compare.events import MalformedEvent, Variant, parse_event
    from shadowctl.compare.pairing import Pairer

    try:
        event = parse_event(data)
    except MalformedEvent:
        return
    pairer = Pairer(ttl=60.0)
    twin = event.model_copy(update={"variant": Variant.primary if event.variant is not Variant.primary
                                    else Variant.candidate, "shadow": event.variant is Variant.primary})
    for pair in [*pairer.add(event, 0.0), *pairer.add(twin, 0.1)]:
        a, b = pair.primary, pair.other
        token_f1(a.output, b.output)
        rouge_l(a.output[:2000], b.output[:2000])
        json_structure(a.output, b.output)
        tool_calls(a.tool_calls, b.tool_calls)


_EVENT_BASE = {
    "schema": "shadowctl.dev/output-event/v1", "request_id": "r1", "variant": "candidate", "shadow": True,
    "service": "llm/chat", "endpoint": "chat", "model": "m", "stream": True, "prompt_hash": "ab" * 32,
    "prompt": "hi", "output": '{"a": [1, {"b": 2}]}', "truncated": False,
    "tool_calls": [{"name": "f", "arguments": '{"x": 1}'}], "finish_reason": "stop",
    "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}, "output_tokens": 5,
    "status": 200, "error": None, "started_at": 1.7e9, "ttft_s": 0.1, "e2e_s": 0.5,
}


# --------------------------------------------------------------------------- Prometheus answers


class _Prometheus:
    """A local HTTP server that answers every query with the current input, and the real source."""

    def __init__(self) -> None:
        from shadowctl.policy import parse_policies
        from shadowctl.sources.prometheus import PrometheusMetricSource

        self.body = b"{}"
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

            do_GET = do_POST

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.loop = asyncio.new_event_loop()
        self.source = PrometheusMetricSource(f"http://127.0.0.1:{self.server.server_address[1]}", timeout=2.0, retries=0)
        policy = parse_policies(CHAT_POLICY)[0]
        end = datetime(2026, 12, 6, tzinfo=UTC)
        planned = self.source.plan(policy, start=end - timedelta(minutes=5), end=end)
        self.requests = [r for _, r in planned if not isinstance(r, Exception)]

    def __call__(self, data: bytes) -> None:
        from shadowctl.sources.base import NoData, SourceUnavailable, VariantPair

        self.body = data
        results = self.loop.run_until_complete(self.source.fetch_many(self.requests))
        for result in results.values():
            if not isinstance(result, VariantPair | NoData | SourceUnavailable):
                raise AssertionError(f"fetch_many returned {type(result).__name__}")


_PROM: list[_Prometheus] = []


def _prometheus(data: bytes) -> None:
    if not _PROM:
        _PROM.append(_Prometheus())
    _PROM[0](data)


def _vector(tag: str, value: Any) -> dict[str, Any]:
    return {"metric": {"shadowctl_tag": tag, "le": "0.5"}, "value": [1.7e9, value]}


_PROM_BASE = {"status": "success", "data": {"resultType": "vector", "result": [
    _vector("0/p/count", "10"), _vector("0/c/count", "12"), _vector("0/p/bucket", "4"),
    _vector("1/c/sum", "NaN"), _vector("2/p/x", "+Inf")]}}


# --------------------------------------------------------------------------- objects in the API server


def _api_object(data: bytes) -> None:
    from pydantic import ValidationError

    from shadowctl.controller.commands import pending_command
    from shadowctl.controller.status import parse_policy, read_state
    from shadowctl.policy.model import Destination, IstioTarget
    from shadowctl.policy.status import PolicyStatus
    from shadowctl.routers import istio_build
    from shadowctl.routers.base import RouterError

    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return
    if not isinstance(obj, dict):
        return
    PolicyStatus.of(obj)  # lenient by design: never raises
    read_state(obj)
    pending_command(obj)
    with contextlib.suppress(ValidationError):  # the reconciler reports an invalid spec on the object
        parse_policy(obj)
    target = IstioTarget(virtual_service="chat", route="chat-default",
                         primary=Destination(host="chat.llm.svc.cluster.local", subset="v1", port=8000),
                         candidate=Destination(host="chat.llm.svc.cluster.local", subset="v2", port=8000))
    with contextlib.suppress(RouterError):
        istio_build.read_state(obj, target)


_POLICY_OBJECT = {**yaml.safe_load(CHAT_POLICY), "status": {
    "phase": "Progressing", "rollout": {"phase": "Progressing", "step": 1, "weight": 20, "candidate": "v2"},
    "lastCommand": {"id": "x", "command": "pause"}}}


# --------------------------------------------------------------------------- the tap


def _tap(data: bytes) -> None:
    from shadowctl.compare.events import Endpoint
    from shadowctl.tap.extract import ResponseAccumulator, parse_request
    from shadowctl.tap.proxy import MirrorConfig, rewrite_body

    for endpoint in Endpoint:
        parse_request(endpoint, data)
    rewrite_body(data, MirrorConfig(url="http://x", percent=100.0, model="m2", temperature=0.5, seed=1))
    half = len(data) // 2
    for stream in (True, False):
        acc = ResponseAccumulator(Endpoint.chat, event_stream=stream, content_encoding=None, max_chars=4096)
        acc.feed(data[:half])
        acc.feed(data[half:])
        acc.finish()


_CHAT_REQUEST = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                 "tools": [{"type": "function", "function": {"name": "f"}}], "stream": True}
_SSE = st.lists(_json_bytes(mutated({"choices": [{"index": 0, "delta": {"content": "hi", "tool_calls": [
    {"index": 0, "function": {"name": "f", "arguments": "{"}}]}, "finish_reason": None}],
    "usage": {"completion_tokens": 3}})), max_size=5).map(
    lambda chunks: b"".join(b"data: " + c + b"\n\n" for c in chunks) + b"data: [DONE]\n\n")


# --------------------------------------------------------------------------- names into PromQL


class _RealPrometheus:
    """A real Prometheus (Debian package ``prometheus``) on a free port, its parser the judge of each query:
    ``/api/v1/format_query`` parses and prints a query back, ``/api/v1/query`` evaluates one."""

    def __init__(self) -> None:
        import atexit
        import shutil
        import socket
        import subprocess
        import time
        import urllib.request

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.root = Path(tempfile.mkdtemp(prefix="shadowctl-fuzz-prometheus-"))
        (self.root / "p.yml").write_text("global: {scrape_interval: 1m}\n")
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [shutil.which("prometheus") or "/usr/bin/prometheus", f"--config.file={self.root / 'p.yml'}",
             f"--storage.tsdb.path={self.root / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        atexit.register(self.close)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        import httpx

        self.http = httpx.Client(base_url=self.url, timeout=10.0, trust_env=False)

    def close(self) -> None:
        import shutil

        if hasattr(self, "http"):
            self.http.close()
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def call(self, path: str, query: str) -> Any:
        answer = self.http.post(path, data={"query": query}).json()
        if answer.get("status") != "success":
            raise AssertionError(f"Prometheus refused the query: {answer.get('error')}: {query[:300]!r}")
        return answer["data"]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the fuzzing process dies (killed, or crashed past atexit)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_REAL_PROMETHEUS: list[_RealPrometheus] = []
_PLAIN: list[dict[str, str]] = []
_PLAIN_SHAPES: dict[tuple[str, ...], str] = {}
_STRING = __import__("re").compile(r'"(?:[^"\\]|\\.)*"')
_PROMQL_METRICS = ("vllm-ttft", "vllm-errors", "istio-errors", "istio-latency", "dcgm-gpu-util",
                   "gpu-cost-per-1k-tokens", "custom")
_CUSTOM = ('sum(rate(x_total{w="{{ workload }}", r="{{ revision }}", s="{{ subset }}", p=~"{{ pod }}", '
           'ns="{{ namespace }}", h="{{ host }}", svc="{{ service }}", v="{{ variant }}"}[{{ window }}]))')


def _names_policy(values: list[str]) -> Any:
    from shadowctl.policy.model import ShadowPolicy

    workload, revision, subset, pod = values
    metrics: list[dict[str, Any]] = []
    for name in _PROMQL_METRICS:
        if name == "custom":
            metrics.append({"name": "custom", "query": _CUSTOM, "kind": "counter", "statistic": "rate"})
        else:
            from shadowctl.policy.model import PRESET_KINDS

            kind = PRESET_KINDS[name].value
            metric: dict[str, Any] = {"name": name, "preset": name, "kind": kind}
            if kind == "ratio":
                metric["statistic"] = "rate"
            elif kind == "gauge":
                metric["statistic"] = "mean"
            metrics.append(metric)
    doc = yaml.safe_load(CHAT_POLICY)
    doc["spec"]["analysis"]["metrics"] = metrics
    doc["spec"]["analysis"]["gpuPricePerHour"] = 2.0
    doc["spec"]["analysis"]["variants"] = {
        "primary": {"workload": workload, "revision": revision, "subset": subset, "pod": pod},
        "candidate": {"workload": workload + "-c", "revision": revision + "-c", "subset": subset + "-c",
                      "pod": pod + "-c"}}
    doc["spec"]["analysis"].pop("outputs", None)
    doc["spec"]["analysis"].pop("method", None)
    return ShadowPolicy.model_validate(doc)


def _queries_of(values: list[str]) -> dict[str, str]:
    """Every query shadowctl writes for the policy with these names, by metric and form: both variants and a
    ratio's failures as one batch (``batch``), and a preset's grouped form for a batch (``grouped``)."""
    from shadowctl.sources.base import SourceConfigError
    from shadowctl.sources.prometheus.promql import build_request
    from shadowctl.sources.prometheus.source import _grouped_part, batch_expression

    policy = _names_policy(values)
    end = datetime(2026, 12, 6, tzinfo=UTC)
    out: dict[str, str] = {}
    for metric in policy.spec.analysis.metrics:
        try:
            req = build_request(policy, metric, start=end - timedelta(minutes=5), end=end)
        except SourceConfigError:
            continue
        out[f"{metric.name}/batch"] = batch_expression([req])
        if req.grouped is not None:
            out[f"{metric.name}/grouped"] = _grouped_part(0, [req], req.end - req.start)
    return out


def _shape(prom: _RealPrometheus, queries: dict[str, str], keys: list[str]) -> str:
    """The parsed form of the queries ``keys`` joined with ``or``, without string literals and whitespace."""
    query = " or ".join(f"({queries[k]})" for k in keys)
    return "".join(_STRING.sub('""', prom.call("/api/v1/format_query", query)).split())


def _promql(data: bytes) -> None:
    """Names from a policy reach PromQL only as data: the query with them parses, has the same structure as
    with plain names (every string literal aside), and each name reads back exactly, as a label value and
    as the regex shadowctl writes for it."""
    from pydantic import ValidationError

    from shadowctl.sources.prometheus.promql import escape_regex, quote

    if not _REAL_PROMETHEUS:
        _REAL_PROMETHEUS.append(_RealPrometheus())
    prom = _REAL_PROMETHEUS[0]
    text = data.decode("utf-8", errors="replace")
    raw = [*text.split("\x1f"), "w", "r", "s", "p"][:4]
    values = [*raw[:3], escape_regex(raw[3]) + ".*"]  # variants.X.pod is a regex by contract: a valid one
    try:
        queries = _queries_of(values)
    except ValidationError:
        return  # refused at load, in words (an empty name, a lone surrogate)
    if not _PLAIN:
        _PLAIN.append(_queries_of(["w", "r", "s", "p.*"]))
    plain = _PLAIN[0]
    keys = [k for k in plain if k in queries]  # a pod pattern Python cannot read has no grouped form
    if len(keys) < len(plain) - 2:
        raise AssertionError(f"only {sorted(keys)} of {sorted(plain)} were written")
    expected = _PLAIN_SHAPES.get(tuple(keys))
    if expected is None:
        expected = _PLAIN_SHAPES[tuple(keys)] = _shape(prom, plain, keys)
    if _shape(prom, queries, keys) != expected:
        raise AssertionError(f"a name changed a query's structure: {values!r}")
    names = sorted({v.strip() for v in raw[:3] if v.strip()})  # the model strips surrounding whitespace
    # One probe per name, tagged i: label_replace's replacement expands $1 and $name, so a literal $ is
    # written $$ there (the probe's own need; shadowctl writes no name into a replacement).
    probe = " or ".join(
        f'label_replace(label_replace(label_replace(vector(1), "i", "{i}", "", ""), '
        f'"v", {quote(value.replace("$", "$$"))}, "", ""), "m", "exact", "v", {quote(escape_regex(value))})'
        for i, value in enumerate(names))
    if names:
        result = sorted((r["metric"] for r in prom.call("/api/v1/query", probe)["result"]), key=lambda m: m["i"])
        wanted = [{"i": str(i), "v": value, "m": "exact"} for i, value in enumerate(names)]
        if result != wanted:
            raise AssertionError(f"{names!r} read back as {result!r}")


_NAME = st.text(st.characters(codec="utf-8"), max_size=30) | st.sampled_from(
    ['a"b', "a\\", '\\"}) or vector(1) #', "x\ny", "{{ namespace }}", "}}{{", "é🙂", "a`b'c", "\x00\x7f\u2028",
     'v1", destination_workload=~".*'])
_NAMES = st.lists(_NAME, min_size=4, max_size=4).map(lambda v: "\x1f".join(v).encode("utf-8", "surrogatepass"))


def targets() -> dict[str, Target]:
    """Every fuzzed path by name."""
    from shadowctl.cli.judge_cmd import ReplayInputError

    return {t.name: t for t in (
        Target("policy", _policy, _yaml_bytes(mutated(yaml.safe_load(CHAT_POLICY))), _policy_expected()),
        Target("render", _render, _yaml_bytes(mutated(CHAT_VS))),
        Target("render-knative", _render_knative, _yaml_bytes(mutated(KSVC))),
        Target("render-gateway", _render_gateway, _yaml_bytes(mutated(ROUTE))),
        Target("render-kserve", _render_kserve, _yaml_bytes(mutated(ISVC))),
        Target("replay", _replay, _REPLAY, (ReplayInputError,)),
        Target("event", _event, _json_bytes(mutated(_EVENT_BASE))),
        Target("prometheus", _prometheus, _json_bytes(mutated(_PROM_BASE, max_changes=4))),
        Target("api-object", _api_object, _json_bytes(mutated(_POLICY_OBJECT))),
        Target("tap", _tap, st.one_of(_json_bytes(mutated(_CHAT_REQUEST)), _SSE)),
        Target("promql", _promql, _NAMES),
    )}
