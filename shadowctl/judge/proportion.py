"""Anytime-valid bounds for agreement: a confidence sequence per proportion, combined into a ratio.

The same bounds judge error rates with a relative margin (the proportion is then the failures', the
ratio the candidate's rate over the primary's): a primary with 0 errors in 100,000 requests against a
candidate failing every request got (1.4e-5, inf) from the normal mixture, for the reason below, and
was never failed. The sampled-baseline case applies (uniform prior, half the level per arm); 0 errors
on both arms leave the ratio unbounded above, so they never pass a relative margin.

Why not the judge's normal mixture
----------------------------------
Every other count statistic goes through :func:`shadowctl.judge.sequential.decide`: an effect
``log(candidate/baseline)`` with a delta-method variance ``(1-p)/(n p)`` per arm. For agreement that
breaks where it matters most. A candidate whose answers never agree has ``p_hat`` about ``1/n``, so the
variance of ``log p_hat`` stays about 1 however many pairs arrive: the information never grows, the
mixture boundary stays some 20 standard errors wide, and a candidate agreeing on 0 of 1,000 pairs (or
of a million) got the interval [0, 7.9e6] for the ratio and was never failed (the rollout only ended
inconclusive at maxDuration). One agreeing pair in 1,000 gave [2e-8, 191]. The normal approximation
of a proportion is wrong at the edges (0 and n agreeing pairs); the answer is an interval that is
exact there.

Method
------
Each arm's agreement ``p`` gets Robbins' beta-binomial mixture confidence sequence. With ``k``
agreeing pairs of ``n`` and a prior ``Beta(a, b)`` over the alternatives ``p'``, the likelihood ratio
against ``p`` mixed over the prior::

    M_n(p) = B(k + a, n - k + b) / B(a, b) / (p^k (1 - p)^(n - k))

is a nonnegative martingale of mean 1 under ``p`` (each pair's factor has conditional mean 1), so by
Ville's inequality it ever reaches ``1/level`` with probability at most ``level``, at any number of
looks. The confidence sequence ``{p : M_n(p) < 1/level}`` is an interval (``log M_n`` is convex in
``p``), always holds ``k/n``, is exact and non-asymptotic, and is right at the edges: ``k = 0`` gives
``[0, U]`` with ``U = 1 - (level/(n+1))^(1/n)`` under the uniform prior (0.0099 at n = 1,000 and level
0.05), ``k = n`` gives ``[L, 1]``. It depends on the counts only, not on the order of the pairs, so a
restarted controller that reads the tally back from ``.status`` gets the same interval.

The ratio ``rho = p_candidate / p_baseline`` (or the difference, for an absolute margin):

* fixed baseline (``baseline.mode: fixed``, a model judge's even match; :attr:`Counts.exact`): ``p_b``
  is a known constant, so this is a one-sample test of the candidate's proportion against
  ``p_b`` (fail) and ``(1 - m) p_b`` (pass): ``[L_c / p_b, U_c / p_b]``, each end at the full level.
* sampled baseline (``primary-replica``, ``resend``): ``[L_c / U_b, U_c / L_b]`` with each arm's
  sequence at half the level (Bonferroni, the judge's rule for splitting an error budget; the metric's
  level is already the judge's alpha/k). Both sequences are time-uniform, so the union bound holds
  at every look: P(ever a wrong fail) <= alpha/2 + alpha/2.

Fail when the upper end at alpha is below 1 (the difference below 0); pass when the lower end at beta is
above ``1 - m`` (``-m``); as in the rest of the judge, pass wins. The upper end is finite whenever the
baseline has agreeing pairs (``L_b > 0`` for ``k_b >= 1``).

The prior. A fixed baseline is known before any pair arrives, so the prior may sit where the decision
is made, as the normal mixture's scale sits at the margin: mean half-way between the fail line ``p_b``
and the pass line ``(1 - m) p_b``, standard deviation the margin in proportion units (``m p_b``, or
``m`` for an absolute margin). With a sampled baseline nothing is known beforehand, so the prior is
uniform. The cost against the old (asymptotic, and wrong at the edges) rule: a candidate as good as a
fixed 0.95 baseline (margin 10%) passes after ~90 pairs instead of ~50; against a replica baseline
after ~290 pairs per arm instead of ~90 (two sequences at half the level each). A candidate at 0.80 of
0.95 fails after ~40 pairs (~70 before); one that never agrees after ``minPairs``.

References
----------
- H. Robbins (1970), "Statistical methods related to the law of the iterated logarithm", Ann. Math. Stat.
  (the beta-binomial mixture and its confidence sequence).
- T. L. Lai (1976), "On confidence sequences", Ann. Stat.
- S. R. Howard, A. Ramdas, J. McAuliffe, J. Sekhon (2021), "Time-uniform, nonparametric, nonasymptotic
  confidence sequences", Ann. Stat. (conjugate mixtures; Bonferroni over two sequences).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import special

FloatArray = npt.NDArray[np.float64]

UNIFORM_PRIOR = (1.0, 1.0)
"""The mixture's prior for a proportion nothing is known about beforehand (a sampled baseline)."""

_BISECTIONS = 60
"""Halvings of [0, 1]: the ends are found to 1e-18, far below any margin."""


def prior_near(center: FloatArray | float, sd: FloatArray | float) -> tuple[FloatArray, FloatArray]:
    """Beta(a, b) with mean ``center`` and standard deviation ``sd`` (vectorized; never flatter than uniform)."""
    mu = np.clip(np.asarray(center, dtype=np.float64), 1e-3, 1.0 - 1e-3)
    spread = np.maximum(np.asarray(sd, dtype=np.float64), 1e-6)
    strength = np.maximum(mu * (1.0 - mu) / spread**2 - 1.0, 2.0)
    return mu * strength, (1.0 - mu) * strength


def confidence_sequence(
    agree: FloatArray, pairs: FloatArray, level: float,
    prior: tuple[FloatArray | float, FloatArray | float] = UNIFORM_PRIOR,
) -> tuple[FloatArray, FloatArray]:
    """The beta-binomial mixture confidence sequence ``(lower, upper)`` for S proportions (vectorized).

    ``{p : M_n(p) < 1/level}``: holds the true proportion at every ``n`` at once with probability at
    least ``1 - level``. ``agree`` of ``pairs`` (0 pairs: ``[0, 1]``); ``prior``: Beta(a, b), numbers or
    one per row. ``lower`` is 0 exactly for 0
    agreeing pairs and ``upper`` 1 exactly for all of them.
    """
    k = np.asarray(agree, dtype=np.float64)
    n = np.asarray(pairs, dtype=np.float64)
    a, b = prior
    some = n > 0
    n_safe = np.where(some, n, 1.0)
    k_safe = np.where(some, k, 0.0)
    # M_n(p) < 1/level  <=>  g(p) > c, with g(p) = k log p + (n - k) log(1 - p), concave, largest at k/n.
    c = special.betaln(k_safe + a, n_safe - k_safe + b) - special.betaln(a, b) + np.log(level)

    def inside(p: FloatArray) -> npt.NDArray[np.bool_]:
        with np.errstate(divide="ignore", invalid="ignore"):
            g = special.xlogy(k_safe, p) + special.xlog1py(n_safe - k_safe, -p)
        result: npt.NDArray[np.bool_] = g > c
        return result

    center = k_safe / n_safe
    out_lo, in_lo = np.zeros_like(center), center.copy()  # lower end: between an outside and an inside point
    in_hi, out_hi = center.copy(), np.ones_like(center)
    for _ in range(_BISECTIONS):
        mid = 0.5 * (out_lo + in_lo)
        ok = inside(mid)
        in_lo = np.where(ok, mid, in_lo)
        out_lo = np.where(ok, out_lo, mid)
        mid = 0.5 * (in_hi + out_hi)
        ok = inside(mid)
        in_hi = np.where(ok, mid, in_hi)
        out_hi = np.where(ok, out_hi, mid)
    # Report the outer points of each bracket: the interval then holds the whole sequence's set (0 exactly
    # when no pair agreed, 1 when all did: the bisection never leaves those ends).
    return np.where(some, out_lo, 0.0), np.where(some, out_hi, 1.0)
