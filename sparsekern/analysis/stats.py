"""Paired comparisons over seeds, for the studies' verdicts (no scipy needed).

Each study compares two settings run with the same seeds (same data order, same mask or init seed), so
per seed there is one difference d_i = a_i - b_i (or log a_i - log b_i for positive quantities such as
gradient norms, so the effect reads as a ratio). ``paired_comparison`` reports:

- the mean difference and its 95 % confidence interval from Student's t with n - 1 degrees of freedom
  (the paired t-test); the verdict is read from this interval;
- the exact sign-flip permutation test: under "no effect" each d_i is as likely as -d_i, so the 2^n sign
  patterns are equally likely and the p-value is the fraction whose |mean| reaches the observed one (exact,
  no distributional assumption; with n = 5 seeds it cannot go below 2/32 = 0.0625 two-sided);
- the standardized effect size d_z = mean / sd of the differences.

The t distribution's CDF uses the regularized incomplete beta function (Lentz's continued fraction, as in
Numerical Recipes' ``betacf``); its quantile is found by bisection on the CDF.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

__all__ = ["CLAIMS", "t_cdf", "t_ppf", "sign_flip_p", "PairedComparison", "paired_comparison"]

CLAIMS = ("greater", "less", "not_greater")


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast here; else use the symmetry
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _check_df(where: str, df) -> float:
    if isinstance(df, bool) or not isinstance(df, (int, float)) or not df > 0:
        raise ValueError(f"{where}: df must be a number > 0, got {df!r}")
    return float(df)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    df = _check_df("t_cdf", df)
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_ppf(p: float, df: float) -> float:
    """The quantile t with P(T <= t) = p, by bisection on ``t_cdf`` (to 1e-12 relative)."""
    df = _check_df("t_ppf", df)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
        raise ValueError(f"t_ppf: p must lie in (0, 1), got {p!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def sign_flip_p(diffs: Sequence[float], alternative: str = "two-sided") -> float:
    """Exact sign-flip permutation p-value of the mean of paired differences (all 2^n sign patterns;
    n <= 20). ``alternative``: ``two-sided`` (|mean| as large), ``greater`` (mean as large), ``less``."""
    d = [float(v) for v in diffs]
    if not 1 <= len(d) <= 20:
        raise ValueError(f"sign_flip_p: diffs must hold 1 to 20 values, got {len(d)}")
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"sign_flip_p: alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    observed = sum(d)
    tol = 1e-12 * max(1.0, sum(abs(v) for v in d))  # ties of the observed sum count as reaching it
    hits = 0
    for signs in itertools.product((1.0, -1.0), repeat=len(d)):
        s = sum(sign * v for sign, v in zip(signs, d))
        if alternative == "two-sided":
            hits += abs(s) >= abs(observed) - tol
        elif alternative == "greater":
            hits += s >= observed - tol
        else:
            hits += s <= observed + tol
    return hits / 2 ** len(d)


@dataclass
class PairedComparison:
    """A paired comparison of a against b over n seeds (on the log scale if ``log``: then ``ratio`` and
    its interval are exp of the mean and interval). ``verdict``: ``supported`` / ``contradicted`` /
    ``inconclusive`` for ``claim`` at ``level`` (see ``paired_comparison``)."""
    claim: str
    n: int
    log: bool
    mean_a: float
    mean_b: float
    mean_diff: float
    sd_diff: float
    ci_low: float
    ci_high: float
    level: float
    t: Optional[float]
    p_t: Optional[float]
    p_sign_flip: float
    effect_size: Optional[float]
    margin: float
    verdict: str
    test: str = "paired t-test (t interval); exact sign-flip permutation test"

    @property
    def ratio(self) -> Optional[float]:
        return math.exp(self.mean_diff) if self.log else None

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.log:
            out.update(ratio=math.exp(self.mean_diff), ratio_ci=[math.exp(self.ci_low), math.exp(self.ci_high)])
        return out

    def describe(self, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
        """One line: the effect with its interval, the tests, the verdict."""
        if self.log:
            effect = (f"ratio x{math.exp(self.mean_diff):.{digits}g} "
                      f"[{math.exp(self.ci_low):.{digits}g}, {math.exp(self.ci_high):.{digits}g}]")
        else:
            effect = (f"difference {self.mean_diff * scale:+.{digits}g}{unit} "
                      f"[{self.ci_low * scale:+.{digits}g}, {self.ci_high * scale:+.{digits}g}]{unit}")
        p_t = "n/a" if self.p_t is None else f"{self.p_t:.3g}"
        d_z = "n/a" if self.effect_size is None else f"{self.effect_size:+.2f}"
        return (f"{effect} ({100 * self.level:.0f} % CI, n = {self.n}); paired t-test p = {p_t}, exact sign-flip "
                f"p = {self.p_sign_flip:.3g}; d_z = {d_z} -> **{self.verdict}**")


def paired_comparison(a: Sequence[float], b: Sequence[float], claim: str = "greater", log: bool = False,
                      margin: float = 0.0, level: float = 0.95) -> PairedComparison:
    """Compare paired samples ``a`` and ``b`` (one value per seed, the same seeds in the same order).

    ``claim`` is what the paper predicts for d = a - b (d = log a - log b with ``log``):
    ``greater`` (a > b): supported if the ``level`` confidence interval of the mean of d lies above 0,
    contradicted if it lies below 0; ``less``: the mirror; ``not_greater`` (a exceeds b by at most
    ``margin``, e.g. log 1.1 for "at most 10 % larger"): supported if the interval lies below ``margin``,
    contradicted if it lies above it. Otherwise inconclusive. The p-values are two-sided.
    """
    if claim not in CLAIMS:
        raise ValueError(f"paired_comparison: claim must be one of {CLAIMS}, got {claim!r}")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ValueError(f"paired_comparison: level must lie in (0, 1), got {level!r}")
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_comparison: a and b must hold the same number (>= 2) of paired values, "
                         f"got {len(a)} and {len(b)}")
    if log and min(a + b) <= 0.0:
        raise ValueError(f"paired_comparison: log=True needs positive values, got minimum {min(a + b)}")
    if any(math.isnan(v) for v in a + b):
        raise ValueError("paired_comparison: a and b must not hold NaN")
    f = math.log if log else (lambda v: v)
    d = [f(x) - f(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    q = t_ppf(0.5 + level / 2.0, n - 1)
    if sd > 0.0:
        se = sd / math.sqrt(n)
        t = mean / se
        p_t = 2.0 * (1.0 - t_cdf(abs(t), n - 1))
        ci = (mean - q * se, mean + q * se)
        effect = mean / sd
    else:  # identical differences: the interval is the point
        t, p_t, effect, ci = None, None, None, (mean, mean)
    if claim == "greater":
        verdict = "supported" if ci[0] > 0 else "contradicted" if ci[1] < 0 else "inconclusive"
    elif claim == "less":
        verdict = "supported" if ci[1] < 0 else "contradicted" if ci[0] > 0 else "inconclusive"
    else:
        verdict = "supported" if ci[1] <= margin else "contradicted" if ci[0] > margin else "inconclusive"
    return PairedComparison(claim, n, log, sum(a) / n, sum(b) / n, mean, sd, ci[0], ci[1], float(level), t, p_t,
                            sign_flip_p(d) if n <= 20 else float("nan"), effect, float(margin), verdict)
