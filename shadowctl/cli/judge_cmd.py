"""`shadowctl judge replay`: run the judge over recorded looks of many independent streams.

Each input line is one look of one stream, holding the data that arrived since that stream's previous
look::

    {"stream": "a", "t": 30, "primary": [0.8, 1.2], "candidate": [0.9, 1.4]}
    {"stream": "a", "t": 60, "primary_hist": {"le": [0.5, 1, "+Inf"], "counts": [3, 9, 10]}, ...}
    {"stream": "b", "t": 30, "primary_counts": [2, 1000], "candidate_counts": [5, 1000]}
    {"stream": "c", "t": 30, "paired": [[0.81, 0.85], [2.4, 2.3], [1.1, null]]}

A ``paired`` look holds the primary's and the candidate's value for the same requests, one
``[primary, candidate]`` per request; it is judged with ``--statistic median`` or ``mean`` (the
paired judge: per-pair log ratios). A pair with a side that is null, not a number or not positive is
dropped and counted in the evidence.

Streams are judged in lockstep, look by look, with all streams of the same data layout in one
vectorized call, so a file with thousands of streams replays in seconds. The output is one JSON
line per stream: ``{"stream", "decision", "t", "look", "evidence"}`` at its first pass/fail, or at its
last look (``inconclusive``/``nodata``) when it never decided.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, cast

import numpy as np
import typer

from shadowctl.cli.common import fail
from shadowctl.errors import ShadowctlError
from shadowctl.judge import (
    Direction,
    FixedConfig,
    Histogram,
    JudgeInputError,
    Margin,
    MetricInput,
    MetricSpec,
    PairedSketch,
    Samples,
    judge_fixed,
)
from shadowctl.judge import estimators as est
from shadowctl.judge.core import Batch, batch_binned, batch_counts, result_of
from shadowctl.judge.model import MAX_MAGNITUDE, FloatArray, Outcome
from shadowctl.judge.paired import PairedBatch, batch_paired
from shadowctl.judge.sequential import FAIL, PASS

judge_app = typer.Typer(
    name="judge",
    help="Run the statistical judge offline.",
    no_args_is_help=True,
)

_KINDS = {
    "samples": ("primary", "candidate"),
    "hist": ("primary_hist", "candidate_hist"),
    "counts": ("primary_counts", "candidate_counts"),
}
_PAIRED = "paired"


class ReplayInputError(ShadowctlError):
    """A line of the replay file is malformed; the message names the line."""


@dataclass
class _Look:
    line: int
    t: float
    primary: Any
    candidate: Any


@dataclass
class _Stream:
    sid: Any
    kind: str
    looks: list[_Look] = field(default_factory=list)
    layout: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def _number_list(value: Any, where: str) -> list[float]:
    if not isinstance(value, list):
        raise ReplayInputError(f"{where}: expected a list of numbers, got {type(value).__name__}")
    if all(type(v) is float or type(v) is int for v in value):  # the common case, fast
        return value
    out: list[float] = []
    for i, v in enumerate(value):
        if isinstance(v, str) and v.strip().lower() in ("+inf", "inf"):
            out.append(math.inf)
        elif isinstance(v, str) and v.strip().lower() == "nan":
            out.append(math.nan)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out.append(float(v))
        elif v is None:
            out.append(math.nan)
        else:
            raise ReplayInputError(f"{where}[{i}]: {v!r} is not a number")
    return out


_SIDE = frozenset({float, int, type(None)})


def _parse_pairs(value: Any, where: str) -> FloatArray:
    """``[[primary, candidate], ...]`` as an (n, 2) array; a side that is null becomes NaN (dropped later)."""
    if not isinstance(value, list):
        raise ReplayInputError(f"{where}: expected a list of [primary, candidate] pairs, got {type(value).__name__}")
    side = _SIDE
    for i, pair in enumerate(value):
        if type(pair) is not list or len(pair) != 2 or type(pair[0]) not in side or type(pair[1]) not in side:
            raise ReplayInputError(f"{where}[{i}]: expected [primary, candidate] (seconds, or null), got {pair!r}")
    return np.asarray(value, dtype=np.float64).reshape(len(value), 2)


def _parse_arm(kind: str, value: Any, where: str) -> Any:
    if kind == "samples":
        arr = np.asarray(_number_list(value, where), dtype=np.float64)
        beyond = np.abs(arr) > MAX_MAGNITUDE
        if beyond.any():
            i = int(np.argmax(beyond))
            raise ReplayInputError(f"{where}[{i}]: {arr[i]:g} is beyond the judge's range (±{MAX_MAGNITUDE:g})")
        return arr
    if kind == "counts":
        nums = _number_list(value, where)
        if len(nums) != 2:
            raise ReplayInputError(f"{where}: expected [failures, total]")
        f, n = nums
        if not (math.isnan(f) or math.isnan(n)) and not 0 <= f <= n:
            raise ReplayInputError(f"{where}: need 0 <= failures <= total, got {f:g} of {n:g}")
        return (f, n)
    if not isinstance(value, dict) or set(value) != {"le", "counts"}:
        raise ReplayInputError(f'{where}: expected {{"le": [...], "counts": [...]}}')
    le = _number_list(value["le"], f"{where}.le")
    counts = _number_list(value["counts"], f"{where}.counts")
    try:  # the judge's own rules for a histogram (layout, cumulative counts), not a copy of them
        histogram = Histogram(le, counts)
    except JudgeInputError as exc:
        raise ReplayInputError(f"{where}: {exc}") from exc
    return (tuple(le), histogram.counts)


def parse_replay(lines: list[str]) -> list[_Stream]:
    """Parse and validate every line; raise :class:`ReplayInputError` naming the first bad line."""
    streams: dict[Any, _Stream] = {}
    for lineno, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        where = f"line {lineno}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReplayInputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        except RecursionError as exc:  # the decoder recurses per nesting level; a look is 3 levels deep
            raise ReplayInputError(f"{where}: JSON nested too deeply to be a look") from exc
        if not isinstance(obj, dict):
            raise ReplayInputError(f"{where}: expected a JSON object")
        if "stream" not in obj or not isinstance(obj["stream"], str | int) or isinstance(obj["stream"], bool):
            raise ReplayInputError(f"{where}: 'stream' (a string or integer id) is missing")
        t = obj.get("t")
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise ReplayInputError(f"{where}: 't' (seconds, a number) is missing or not a number")
        kinds = [k for k, keys in _KINDS.items() if any(key in obj for key in keys)]
        if _PAIRED in obj:
            kinds.append(_PAIRED)
        if len(kinds) != 1:
            raise ReplayInputError(
                f"{where}: give one pair of primary/candidate, primary_hist/candidate_hist or "
                "primary_counts/candidate_counts, or paired"
            )
        kind = kinds[0]
        if kind == _PAIRED:
            unknown = set(obj) - {"stream", "t", _PAIRED}
            if unknown:
                raise ReplayInputError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
            p, c = _parse_pairs(obj[_PAIRED], f"{where}: paired"), cast(Any, None)
        else:
            pk, ck = _KINDS[kind]
            for key in (pk, ck):
                if key not in obj:
                    raise ReplayInputError(f"{where}: '{key}' is missing")
            unknown = set(obj) - {"stream", "t", pk, ck}
            if unknown:
                raise ReplayInputError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
            p = _parse_arm(kind, obj[pk], f"{where}: {pk}")
            c = _parse_arm(kind, obj[ck], f"{where}: {ck}")
        sid = obj["stream"]
        st = streams.get(sid)
        if st is None:
            st = streams[sid] = _Stream(sid, kind)
        elif st.kind != kind:
            raise ReplayInputError(f"{where}: stream {sid!r} switched from {st.kind} to {kind} data")
        if st.looks and t < st.looks[-1].t:
            raise ReplayInputError(f"{where}: stream {sid!r} goes back in time (t={t:g} after {st.looks[-1].t:g})")
        if kind == "hist":
            layout = (p[0], c[0])
            if st.layout is None:
                st.layout = layout
            elif st.layout != layout:
                raise ReplayInputError(f"{where}: stream {sid!r} changed its bucket layout")
        st.looks.append(_Look(lineno, float(t), p, c))
    return list(streams.values())


@dataclass
class _Acc:
    """Cumulative data of one stream (per bucket counts for samples; cumulative-le for histograms)."""

    p: FloatArray
    c: FloatArray
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # sum_p, sum_c, sq_p, sq_c
    nan: bool = False
    raw_p: list[FloatArray] = field(default_factory=list)
    raw_c: list[FloatArray] = field(default_factory=list)
    pairs: PairedSketch | None = None


def _new_acc(st: _Stream) -> _Acc:
    if st.kind == _PAIRED:
        return _Acc(np.zeros(0), np.zeros(0), pairs=PairedSketch())
    if st.kind == "samples":
        z = np.zeros(est.SKETCH_LE.size)
        return _Acc(z, z.copy())
    if st.kind == "hist":
        assert st.layout is not None
        return _Acc(np.zeros(len(st.layout[0])), np.zeros(len(st.layout[1])))
    return _Acc(np.zeros(2), np.zeros(2))


def _add(st: _Stream, acc: _Acc, look: _Look, keep_raw: bool) -> None:
    if acc.pairs is not None:
        acc.pairs.add_many(look.primary[:, 0], look.primary[:, 1])
        return
    if st.kind == "samples":
        for arm, values, k in (("p", look.primary, 0), ("c", look.candidate, 1)):
            if np.isnan(values).any():
                acc.nan = True
            v = values[~np.isnan(values)]
            idx = np.searchsorted(est.SKETCH_LE, v, side="left")
            getattr(acc, arm)[:] += np.bincount(idx, minlength=est.SKETCH_LE.size)
            acc.sums[k] += float(v.sum())
            acc.sums[k + 2] += float((v * v).sum())
        if keep_raw:
            acc.raw_p.append(look.primary)
            acc.raw_c.append(look.candidate)
        return
    if st.kind == "hist":
        p, c = look.primary[1], look.candidate[1]
    else:
        p, c = np.asarray(look.primary, dtype=np.float64), np.asarray(look.candidate, dtype=np.float64)
    if np.isnan(p).any() or np.isnan(c).any():
        acc.nan = True
    acc.p += np.nan_to_num(p)
    acc.c += np.nan_to_num(c)


def _evaluate(
    spec: MetricSpec, group: list[tuple[_Stream, _Acc]], *, alpha: float, beta: float
) -> Batch | PairedBatch:
    kind = group[0][0].kind
    if kind == _PAIRED:
        return batch_paired(spec, [a.pairs.snapshot() for _, a in group if a.pairs is not None], alpha=alpha,
                            beta=beta)
    if kind == "counts":
        p = np.array([a.p for _, a in group])
        c = np.array([a.c for _, a in group])
        return batch_counts(spec, p[:, 0], p[:, 1], c[:, 0], c[:, 1], alpha=alpha, beta=beta)
    if kind == "samples":
        cp = np.cumsum(np.array([a.p for _, a in group]), axis=1)
        cc = np.cumsum(np.array([a.c for _, a in group]), axis=1)
        sums = np.array([a.sums for _, a in group])
        return batch_binned(
            spec, cp, cc, est.SKETCH_LE, alpha=alpha, beta=beta,
            sums=(sums[:, 0], sums[:, 1]), sums_sq=(sums[:, 2], sums[:, 3]),
        )
    layout = group[0][0].layout
    assert layout is not None
    le_p, le_c = np.array(layout[0]), np.array(layout[1])
    common = np.intersect1d(le_p, le_c)
    cp = np.array([a.p for _, a in group])[:, np.searchsorted(le_p, common)]
    cc = np.array([a.c for _, a in group])[:, np.searchsorted(le_c, common)]
    return batch_binned(spec, cp, cc, common, alpha=alpha, beta=beta)


def replay(
    streams: list[_Stream],
    spec: MetricSpec,
    *,
    alpha: float,
    beta: float,
    method: str,
    max_looks: int | None,
    fixed: FixedConfig | None = None,
) -> list[dict[str, Any]]:
    """Judge every stream look by look; return one output record per stream, in input order.

    ``fixed``: the fixed method's configuration (default: NetflixACAJudge's)."""
    if spec.statistic == "mean" and streams and all(st.kind == _PAIRED for st in streams):
        spec = dataclasses.replace(spec, statistic="paired-mean")  # the mean of paired data is the paired mean
    counts_stat = spec.statistic in ("rate", "agreement")
    for st in streams:
        if (st.kind == _PAIRED) != spec.paired:
            needs = ("paired looks ('paired': [[primary, candidate], ...])" if spec.paired
                     else "two arms; paired looks need --statistic median or mean")
            raise ReplayInputError(
                f"line {st.looks[0].line}: stream {st.sid!r} has {st.kind} data, but statistic "
                f"{spec.statistic!r} needs {needs}"
            )
        if (st.kind == "counts") != counts_stat:
            needs = "counts (primary_counts/candidate_counts)" if counts_stat else "samples or histograms"
            raise ReplayInputError(
                f"line {st.looks[0].line}: stream {st.sid!r} has {st.kind} data, but statistic "
                f"{spec.statistic!r} needs {needs}"
            )
    out: dict[int, dict[str, Any]] = {}
    accs = [_new_acc(st) for st in streams]
    n_looks = [min(len(st.looks), max_looks) if max_looks else len(st.looks) for st in streams]
    k = 0
    while True:
        active = [i for i, st in enumerate(streams) if i not in out and k < n_looks[i]]
        if not active:
            break
        for i in active:
            _add(streams[i], accs[i], streams[i].looks[k], keep_raw=method == "fixed")
        if method == "fixed":
            for i in active:
                _fixed_look(streams[i], accs[i], spec, k, k == n_looks[i] - 1, fixed or FixedConfig(), out, i)
            k += 1
            continue
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i in active:
            st = streams[i]
            if accs[i].nan:
                _emit_nodata(out, i, st, k, spec, alpha, beta, "data contain NaN")
                continue
            key = (st.kind, st.layout)
            groups.setdefault(key, []).append(i)
        for idx in groups.values():
            try:
                batch = _evaluate(spec, [(streams[i], accs[i]) for i in idx], alpha=alpha, beta=beta)
            except JudgeInputError as exc:
                raise ReplayInputError(f"line {streams[idx[0]].looks[k].line}: {exc}") from exc
            for j, i in enumerate(idx):
                code = int(batch.code[j])
                final = k == n_looks[i] - 1
                if code in (PASS, FAIL) or final:
                    res = result_of(spec, batch, j, alpha=alpha, beta=beta, final=final)
                    _record(out, i, streams[i], k, res.outcome, res.to_record().to_json())
        k += 1
    return [out[i] for i in range(len(streams))]


def _record(out: dict[int, dict[str, Any]], i: int, st: _Stream, k: int, outcome: Outcome, ev: Any) -> None:
    out[i] = {"stream": st.sid, "decision": outcome.value, "t": st.looks[k].t, "look": k + 1, "evidence": ev}


def _emit_nodata(
    out: dict[int, dict[str, Any]], i: int, st: _Stream, k: int, spec: MetricSpec, alpha: float, beta: float, why: str
) -> None:
    from shadowctl.judge import nodata_result

    _record(out, i, st, k, Outcome.nodata, nodata_result(spec, why, alpha=alpha, beta=beta).to_record().to_json())


def _fixed_look(
    st: _Stream, acc: _Acc, spec: MetricSpec, k: int, final: bool, config: FixedConfig,
    out: dict[int, dict[str, Any]], i: int,
) -> None:
    if st.kind != "samples":
        raise ReplayInputError(
            f"line {st.looks[k].line}: the fixed method needs raw samples ('primary'/'candidate'), not {st.kind}"
        )
    p = np.concatenate(acc.raw_p) if acc.raw_p else np.zeros(0)
    c = np.concatenate(acc.raw_c) if acc.raw_c else np.zeros(0)
    v = judge_fixed([MetricInput(spec, Samples(p), Samples(c))], config)
    if v.outcome is Outcome.failed or final:
        _record(out, i, st, k, v.outcome, v.to_record().to_json())


def _spec_from_policy(policy_file: Path, metric: str) -> tuple[MetricSpec, float, float, str, FixedConfig]:
    from shadowctl.cli.policy_files import load_policy
    from shadowctl.judge.fixed import config_from_policy
    from shadowctl.policy import PolicyError

    try:
        policy = load_policy(policy_file)
    except PolicyError as exc:
        raise fail(str(exc)) from exc
    analysis = policy.spec.analysis
    names = [m.name for m in analysis.metrics]
    for m in analysis.metrics:
        if m.name == metric:
            stat = m.statistic.value
            if m.kind.value == "paired-latency":
                stat = f"paired-{stat}"
            spec = MetricSpec(
                name=m.name, statistic=stat, direction=Direction(m.direction.value),
                margin=Margin(m.margin.value, relative=m.margin.relative), critical=m.critical,
                min_samples=m.min_samples,
            )
            return spec, analysis.alpha, analysis.beta, analysis.method.value, config_from_policy(analysis)
    raise fail(f"{policy_file}: no metric named {metric!r} (metrics: {', '.join(names) or 'none'})")


_FIXED_FLAGS = ("confidence", "tolerance", "effect_size", "allowed_increase", "allowed_decrease", "critical_increase",
                "critical_decrease", "nan_strategy", "outliers", "outlier_factor", "must_have_data", "critical",
                "pass_score", "marginal_score")
"""The flags of the fixed method (Kayenta's single-metric options and score thresholds)."""


def _fixed_config(base: FixedConfig, name: str, flags: dict[str, Any]) -> FixedConfig:
    """``base`` with the fixed-method flags that were given applied to it and to metric ``name``.

    Only the weights of the metric's own groups are kept: the replay scores this one metric, and in
    Kayenta's scorer the weight of a group without results would be lost from the score."""
    opts = base.options(name)
    changes = {
        "effect_measure": flags["effect_size"], "allowed_increase": flags["allowed_increase"],
        "allowed_decrease": flags["allowed_decrease"], "critical_increase": flags["critical_increase"],
        "critical_decrease": flags["critical_decrease"], "nan_strategy": flags["nan_strategy"],
        "outliers": flags["outliers"], "outlier_factor": flags["outlier_factor"],
        "must_have_data": flags["must_have_data"],
    }
    opts = dataclasses.replace(opts, **{k: v for k, v in changes.items() if v is not None})
    top = {k: flags[k] for k in ("confidence", "tolerance", "pass_score", "marginal_score") if flags[k] is not None}
    weights = {g: w for g, w in base.group_weights.items() if g in opts.groups}
    return dataclasses.replace(base, metrics={**base.metrics, name: opts}, group_weights=weights, **top)


@judge_app.command("replay")
def replay_cmd(
    file: Annotated[Path, typer.Argument(help="JSON Lines: one look of one stream per line.", show_default=False)],
    statistic: Annotated[str, typer.Option(
        help="p50, p90, p95, p99 (any pNN), mean, rate or agreement; paired looks: median or mean.")] = "p95",
    direction: Annotated[Direction, typer.Option(help="Which change is a regression.")] = Direction.increase,
    margin: Annotated[str, typer.Option(help="'10%' (relative), '0.5pp' or '+0.005' (absolute).")] = "10%",
    alpha: Annotated[float | None, typer.Option(help="False-fail probability (default: 0.05).")] = None,
    beta: Annotated[float | None, typer.Option(help="False-pass probability at the margin (default: 0.05).")] = None,
    method: Annotated[str | None, typer.Option(help="sequential or fixed (default: sequential).")] = None,
    max_looks: Annotated[int | None, typer.Option(min=1, help="The maximum duration, in looks.")] = None,
    min_samples: Annotated[int, typer.Option(min=1, help="Samples needed per arm before deciding.")] = 50,
    policy: Annotated[Path | None, typer.Option(help="Take the metric from this ShadowPolicy file.")] = None,
    metric: Annotated[str | None, typer.Option(help="With --policy: the metric's name.")] = None,
    confidence: Annotated[float | None, typer.Option(
        min=0.5, max=0.9999, help="Fixed: confidence of the Mann-Whitney interval (default: 0.98).")] = None,
    tolerance: Annotated[float | None, typer.Option(
        min=0, help="Fixed: High/Low need the interval beyond tolerance x |shift| (default: 0.25).")] = None,
    effect_size: Annotated[str | None, typer.Option(
        help="Fixed: effect-size measure, meanRatio or cles (default: meanRatio).")] = None,
    allowed_increase: Annotated[float | None, typer.Option(min=0, help="Fixed: effect size High needs.")] = None,
    allowed_decrease: Annotated[float | None, typer.Option(min=0, help="Fixed: effect size Low needs.")] = None,
    critical_increase: Annotated[float | None, typer.Option(
        min=0, help="Fixed: effect size a critical High needs to fail the canary.")] = None,
    critical_decrease: Annotated[float | None, typer.Option(
        min=0, help="Fixed: effect size a critical Low needs to fail the canary.")] = None,
    nan_strategy: Annotated[str | None, typer.Option(help="Fixed: remove or replace (with 0) (default: remove).")] = None,
    outliers: Annotated[str | None, typer.Option(help="Fixed: keep or remove (default: keep).")] = None,
    outlier_factor: Annotated[float | None, typer.Option(min=0, help="Fixed: IQR factor (default: 3).")] = None,
    must_have_data: Annotated[bool | None, typer.Option(
        "--must-have-data/--may-lack-data", help="Fixed: no data scores as a failing metric.", show_default=False,
    )] = None,
    critical: Annotated[bool | None, typer.Option(
        "--critical/--not-critical", help="Fixed: a critical metric that is not Pass fails the canary.",
        show_default=False,
    )] = None,
    pass_score: Annotated[float | None, typer.Option(min=0, max=100, help="Fixed: score to pass (default: 95).")] = None,
    marginal_score: Annotated[float | None, typer.Option(
        min=0, max=100, help="Fixed: score below which it fails (default: 75).")] = None,
) -> None:
    """Replay recorded looks of many streams through the judge; print one JSON line per stream.

    Each line of FILE is one look of one stream with the data since its previous look:
    {"stream": ID, "t": SECONDS, "primary": [...], "candidate": [...]}, or "paired" as a list
    of two-number lists, primary then candidate, one per request (--statistic median or mean), or "primary_hist" /
    "candidate_hist" as {"le": [..., "+Inf"], "counts": [...]} (cumulative along le), or
    "primary_counts" / "candidate_counts" as a list of two numbers: failures, total.

    The fixed method (Kayenta's NetflixACAJudge) takes its options from the flags marked "Fixed",
    and from --policy (spec.analysis.fixed and the metric's own fixed block; groups and weights
    only from there); the flags win.

    Example: shadowctl judge replay looks.jsonl --statistic p99 --margin 10%
    """
    flags = {name: value for name, value in locals().items() if name in _FIXED_FLAGS}
    if (policy is None) != (metric is None):
        raise fail("--policy and --metric go together", code=2)
    fixed = FixedConfig()
    try:
        if policy is not None and metric is not None:
            spec, p_alpha, p_beta, p_method, fixed = _spec_from_policy(policy, metric)
        else:
            stat = "paired-median" if statistic.strip().lower() == "median" else statistic
            spec = MetricSpec("replay", stat, direction, Margin.parse(margin), min_samples=min_samples)
            p_alpha, p_beta, p_method = 0.05, 0.05, "sequential"
    except JudgeInputError as exc:
        raise fail(str(exc), code=2) from exc
    a = p_alpha if alpha is None else alpha
    b = p_beta if beta is None else beta
    meth = p_method if method is None else method
    if not (0 < a < 1 and 0 < b < 1):
        raise fail(f"--alpha and --beta must be between 0 and 1 (got {a:g}, {b:g})", code=2)
    if meth not in ("sequential", "fixed"):
        raise fail(f"--method must be 'sequential' or 'fixed', not {meth!r}", code=2)
    given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
    if meth != "fixed" and given:
        raise fail(f"{', '.join(given)}: options of the fixed method; add --method fixed", code=2)
    if meth == "fixed" and alpha is not None:
        raise fail("--alpha is the sequential method's; the fixed method takes --confidence", code=2)
    if critical is not None:
        spec = dataclasses.replace(spec, critical=critical)
    try:
        fixed = _fixed_config(fixed, spec.name, flags)
    except JudgeInputError as exc:
        raise fail(str(exc), code=2) from exc
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise fail(f"{file}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise fail(f"{file}: not UTF-8 text ({exc.reason})") from exc
    try:
        streams = parse_replay(lines)
        records = replay(streams, spec, alpha=a, beta=b, method=meth, max_looks=max_looks, fixed=fixed)
    except ReplayInputError as exc:
        raise fail(f"{file}: {exc}") from exc
    write = sys.stdout.write
    for rec in records:
        write(json.dumps(rec, allow_nan=False) + "\n")


def register(app: typer.Typer) -> None:
    """Add the `judge` command group to the root app."""
    app.add_typer(judge_app, name="judge")
