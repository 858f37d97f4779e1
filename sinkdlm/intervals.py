"""How a measured share (k of n right) is reported: the value with its 95% Wilson score interval.

The Wilson interval stays honest where the usual standard error sqrt(p (1 - p) / n) collapses to 0:
0 of 100 right is "0.0 [0.0, 3.7] %", not "0.00 ± 0.00 %".
"""

from __future__ import annotations

import math

Z95 = 1.959964  # two-sided 95% normal quantile
PERCENT = 100.0
INTERVAL_NOTE = "[lo, hi] = 95% Wilson score interval over the n questions"


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) bounds of the Wilson score interval for successes / n, as shares in [0, 1]."""
    if n <= 0:
        raise ValueError(f"a share needs n > 0 trials, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} must lie in 0..n={n}")
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale)


def format_share(share: float, n: int, digits: int = 1) -> str:
    """'32.5 [26.4, 39.3]' (percent) for a share measured on n items (successes = share * n, rounded)."""
    if n == 0:
        return "n/a (no items)"
    lo, hi = wilson_interval(round(share * n), n)
    return f"{PERCENT * share:.{digits}f} [{PERCENT * lo:.{digits}f}, {PERCENT * hi:.{digits}f}]"


# ---- a mean over a few paired measurements (seeds): Student's t interval ---------------------------

T_INTERVAL_NOTE = "[lo, hi] = 95% Student t interval of the mean: mean ± t(0.975, n - 1) x sd / sqrt(n)"
_BISECTIONS = 200  # halvings of the search interval: far below float precision
_T_SEARCH_MAX = 1e7  # t(0.975, 1) = 12.7; t(0.9995, 1) = 637: quantiles of interest lie far below
_FRACTION_TERMS, _FRACTION_TOL = 300, 1e-15  # the continued fraction converges in a few dozen terms


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), by its continued fraction (Numerical Recipes 6.4)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1.0 - _incomplete_beta(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, _FRACTION_TERMS):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1) < _FRACTION_TOL:
            break
    return front * f


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The q quantile of Student's t (0.5 < q < 1), by bisection on the CDF."""
    if not 0.5 < q < 1 or df <= 0:
        raise ValueError(f"t_quantile needs 0.5 < q < 1 and df > 0, got q={q}, df={df}")
    lo, hi = 0.0, _T_SEARCH_MAX
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """(low, high) of the t interval of the mean of `values`; None with fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def t_test_p(values: list[float]) -> float | None:
    """Two-sided p-value of Student's one-sample t test that the mean of `values` is 0 (for paired
    differences: that the two variants do not differ); None with fewer than two values. All-equal
    values give 1 at 0 and 0 elsewhere."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return 2 * (1 - t_cdf(abs(mean) / (sd / math.sqrt(n)), n - 1))


HOLM_NOTE = ("Holm: the k pre-registered p-values sorted ascending, the i-th (from 0) multiplied by k - i, "
             "each kept at least as large as the one before and at most 1; a comparison is resolved at 5% "
             "when its adjusted p is below 0.05 (family-wise error <= 5% over the k)")


def holm(p_values: dict[str, float], family_size: int | None = None) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values of a family of pre-registered tests (name -> p). family_size:
    the tests the plan registered, when some have no p-value yet (a variant that did not run): they
    still count, so a partial study is corrected as strictly as the whole one."""
    ordered = sorted(p_values, key=p_values.get)
    m = max(len(ordered), family_size or 0)
    adjusted, running = {}, 0.0
    for i, name in enumerate(ordered):
        running = max(running, min(1.0, (m - i) * p_values[name]))
        adjusted[name] = running
    return adjusted


def t_test_one_sided_p(values: list[float], null: float = 0.0, greater: bool = True) -> float | None:
    """One-sided p-value of Student's one-sample t test: that the mean of `values` exceeds `null`
    (greater=True) or falls below it (greater=False); None with fewer than two values. All-equal
    values give 0 when they lie on the claimed side of `null`, else 1."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    shift = mean - null if greater else null - mean
    if sd == 0:
        return 0.0 if shift > 0 else 1.0
    return 1 - t_cdf(shift / (sd / math.sqrt(n)), n - 1)


def tost_p(values: list[float], margin: float) -> float | None:
    """Equivalence (TOST) p-value that the mean of `values` lies within ±margin: the larger of the
    two one-sided t tests (mean > -margin, mean < +margin); None with fewer than two values."""
    above = t_test_one_sided_p(values, -margin, greater=True)
    below = t_test_one_sided_p(values, margin, greater=False)
    return None if above is None or below is None else max(above, below)
