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
