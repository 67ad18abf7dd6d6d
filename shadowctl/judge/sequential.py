"""The anytime-valid decision rule: one-sided mixture confidence sequences on the effect.

Why this method
---------------
shadowctl looks at the data every interval, for as long as the phase runs. A fixed-horizon test
(Kayenta's repeated Mann-Whitney) applied at every look inflates its false alarm rate with the number
of looks. We use *confidence sequences*: intervals that contain the true effect at all sample sizes
simultaneously with probability >= 1 - alpha, so stopping at the first look where the interval
excludes 0 keeps the false-fail probability below alpha no matter how often or how long one looks.

Construction. Let ``theta`` be the effect (log of candidate/primary for relative margins, the
difference for absolute ones) and ``theta_hat`` its plug-in estimate from the cumulative data of
both arms, with estimated variance ``V`` and "information" ``I = 1/V``. By the central limit theorem
``I*(theta_hat - theta)`` behaves like a Brownian motion in information time. Robbins' normal-mixture
martingale, mixed over a half-normal prior of scale ``tau`` on the drift (a one-sided mixture SPRT)::

    M(u, r) = 2 / sqrt(1 + r) * exp(u^2 r / (2 (1 + r))) * Phi(u * sqrt(r / (1 + r))),  r = I tau^2,

with ``u = sqrt(I) (theta_hat - theta)``, is a nonnegative martingale of mean 1, so by Ville's
inequality it exceeds ``1/a`` with probability at most ``a`` *ever*. The lower confidence sequence at
level ``a`` is ``theta_hat - u*(r, a)/sqrt(I)`` where ``M(u*, r) = 1/a``; the upper one is symmetric.
We set ``tau`` to the margin (in effect units), which makes the boundary tightest around the sample
size at which an effect of the size of the margin becomes detectable.

Decision: ``fail`` when the lower bound at level alpha exceeds 0 (H0 "not worse" rejected with error
<= alpha); ``pass`` when the upper bound at level beta is below the margin (H1 "worse by the margin"
rejected with error <= beta). ``pass`` is checked first: an effect shown to lie inside (0, margin)
is tolerated by definition. For ``either`` both tails are tested at alpha/2 each.

Because the boundary depends only on ``I`` (computed from the cumulative data) and not on how many
looks came before, a decision is a pure function of the cumulative data since the phase started: a
restarted controller that re-queries ``increase(...[since phase start])`` gets the same answer, and
no per-look state has to be stored. Looking at a subset of times (every 30 s, batched arrivals) only
makes a time-uniform bound more conservative.

The variance is estimated, which makes the guarantee asymptotic (it holds as the information grows),
the setting of time-uniform CLT confidence sequences; ``min_samples`` and the quantile tail-count
rule keep the judge away from the smallest samples where the plug-in variance is unreliable. The
benchmark in ``bench/judge`` measures the false-fail rate over 100 looks in every cell.

References
----------
- H. Robbins (1970), "Statistical methods related to the law of the iterated logarithm", Ann. Math. Stat.
- R. Johari, P. Koomen, L. Pekelis, D. Walsh (2017, 2022), "Peeking at A/B tests" / "Always valid
  inference: continuous monitoring of A/B tests", KDD / Operations Research (mixture SPRT).
- S. R. Howard, A. Ramdas, J. McAuliffe, J. Sekhon (2021), "Time-uniform, nonparametric, nonasymptotic
  confidence sequences", Annals of Statistics.
- I. Waudby-Smith, D. Arbour, R. Sinha, E. H. Kennedy, A. Ramdas (2024), "Time-uniform central limit
  theory and asymptotic confidence sequences", Annals of Statistics.
- M. Lindon, C. Sanden, V. Shirikian (2022), "Rapid regression detection in software deployments
  through sequential testing", KDD (the canary use case).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import special

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

# Outcome codes of the vectorized kernel.
CONTINUE, PASS, FAIL = 0, 1, 2


def _log_mixture(u: FloatArray, r: FloatArray) -> FloatArray:
    """log M(u, r) of the one-sided (half-normal) normal mixture."""
    out: FloatArray = (
        np.log(2.0) - 0.5 * np.log1p(r) + u * u * r / (2.0 * (1.0 + r)) + special.log_ndtr(u * np.sqrt(r / (1.0 + r)))
    )
    return out


def boundary_u(r: FloatArray, level: float, iterations: int = 8) -> FloatArray:
    """u*(r, level): standardized one-sided boundary, solving M(u*, r) = 1/level (vectorized).

    log M is increasing and convex in u (the quadratic term's curvature r/(1+r) outweighs the
    log-concave Phi term's, which is at least -r/(1+r)), so Newton's method started from an upper
    bracket descends monotonically onto the root. The upper bracket is the two-sided mixture boundary
    at ``level`` (M_one_sided >= M_two_sided for u > 0).
    """
    r = np.maximum(np.asarray(r, dtype=np.float64), 1e-12)
    target = -np.log(level)
    u = np.sqrt(2.0 * (1.0 + r) / r * (0.5 * np.log1p(r) + np.log(1.0 / level)))
    s = np.sqrt(r / (1.0 + r))
    for _ in range(iterations):
        f = _log_mixture(u, r) - target
        x = u * s
        slope = u * s * s + s * np.exp(-0.5 * x * x - 0.5 * np.log(2.0 * np.pi) - special.log_ndtr(x))
        u = u - f / slope
    result: FloatArray = u
    return result


@dataclass(frozen=True)
class Bounds:
    """Kernel output for S streams (effect units: log-ratio or difference)."""

    theta: FloatArray
    lower_fail: FloatArray  # lower bound used for 'fail' of an increase (level alpha, or alpha/2)
    upper_fail: FloatArray  # upper bound used for 'fail' of a decrease
    lower_pass: FloatArray  # lower bound at level beta (pass of a decrease)
    upper_pass: FloatArray  # upper bound at level beta (pass of an increase)
    code: IntArray


def decide(
    theta: FloatArray,
    var: FloatArray,
    *,
    direction: str,
    margin_up: float,
    margin_down: float,
    tau: float,
    alpha: float,
    beta: float,
    open_up: BoolArray | None = None,
    open_down: BoolArray | None = None,
    slack_up: FloatArray | None = None,
    slack_down: FloatArray | None = None,
) -> Bounds:
    """Vectorized decision for S streams.

    ``theta``/``var``: effect estimates and their variances. ``margin_up`` (> 0) is the worst
    tolerated increase, ``margin_down`` (< 0) the worst tolerated decrease, ``tau`` the mixture scale.
    ``open_up``: the true effect may be larger than estimated (no finite upper bound);
    ``open_down``: it may be smaller (no finite lower bound). ``slack_up``/``slack_down`` (>= 0)
    widen the bounds used for *pass* by what the data cannot resolve (bucket width).
    """
    theta = np.asarray(theta, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    valid = np.isfinite(theta) & np.isfinite(var) & (var > 0)
    safe_var = np.where(valid, var, 1.0)
    info = 1.0 / safe_var
    r = info * tau * tau
    sd = np.sqrt(safe_var)
    a_fail = alpha / 2.0 if direction == "either" else alpha
    u_fail = boundary_u(r, a_fail) * sd
    u_pass = boundary_u(r, beta) * sd
    lower_fail = np.where(valid, theta - u_fail, -np.inf)
    upper_fail = np.where(valid, theta + u_fail, np.inf)
    lower_pass = np.where(valid, theta - u_pass, -np.inf)
    upper_pass = np.where(valid, theta + u_pass, np.inf)
    if slack_up is not None:
        upper_pass = upper_pass + np.where(np.isnan(slack_up), np.inf, slack_up)
    if slack_down is not None:
        lower_pass = lower_pass - np.where(np.isnan(slack_down), np.inf, slack_down)
    if open_up is not None:
        upper_fail = np.where(open_up, np.inf, upper_fail)
        upper_pass = np.where(open_up, np.inf, upper_pass)
    if open_down is not None:
        lower_fail = np.where(open_down, -np.inf, lower_fail)
        lower_pass = np.where(open_down, -np.inf, lower_pass)

    return classify(theta, lower_fail, upper_fail, lower_pass, upper_pass, direction=direction,
                    margin_up=margin_up, margin_down=margin_down)


def classify(
    theta: FloatArray,
    lower_fail: FloatArray,
    upper_fail: FloatArray,
    lower_pass: FloatArray,
    upper_pass: FloatArray,
    *,
    direction: str,
    margin_up: float,
    margin_down: float,
) -> Bounds:
    """The decision from anytime-valid bounds on the effect (however they were built): ``fail`` when the
    bound at alpha excludes 0 on the worse side, ``pass`` when the bound at beta is inside the margin
    (pass wins), else continue. The fail bounds are at alpha/2 per side for ``either``."""
    if direction == "increase":
        fail = lower_fail > 0
        ok = upper_pass < margin_up
    elif direction == "decrease":
        fail = upper_fail < 0
        ok = lower_pass > margin_down
    elif direction == "either":
        fail = (lower_fail > 0) | (upper_fail < 0)
        ok = (upper_pass < margin_up) & (lower_pass > margin_down)
    else:  # pragma: no cover - guarded by Direction
        raise ValueError(f"unknown direction {direction!r}")
    code = np.where(ok, PASS, np.where(fail, FAIL, CONTINUE)).astype(np.int64)
    return Bounds(theta, lower_fail, upper_fail, lower_pass, upper_pass, code)
