"""Statistics over a row's seeds: mean and standard deviation, the t interval of the mean, Welch's
t-test of a row against the reference row (difference, interval, p-value) and Holm's correction
of a grid's p-values. The t distribution is scipy's."""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from scipy.stats import t as student_t

LEVEL = 0.95  # of every interval


def mean_std(values: Sequence[float]):
    """Mean and sample std (ddof=1); std is None for a single value, both None for none. Equal
    values have std exactly 0 (no rounding residue)."""
    if not values:
        return None, None
    if min(values) == max(values):
        return values[0], (0.0 if len(values) > 1 else None)
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def t_interval(values: Sequence[float], level: float = LEVEL) -> Optional[Tuple[float, float]]:
    """Interval of the mean: mean -+ t((1 + level) / 2, n - 1) * s / sqrt(n); None under 2 values."""
    mean, std = mean_std(values)
    if std is None:
        return None
    half = float(student_t.ppf((1 + level) / 2, len(values) - 1)) * std / math.sqrt(len(values))
    return mean - half, mean + half


@dataclass(frozen=True)
class Welch:
    """mean(a) - mean(b) with its interval, Welch's t, degrees of freedom and two-sided p-value.
    With both samples constant the difference is exact: interval [diff, diff], t and df None, and
    p 0 for a nonzero difference, None (undefined) for none."""
    diff: float
    low: float
    high: float
    t: Optional[float]
    df: Optional[float]
    p: Optional[float]


def welch(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Optional[Welch]:
    """Welch's unequal-variance t-test of mean(a) - mean(b), Welch-Satterthwaite degrees of
    freedom; None when a sample has fewer than 2 values."""
    mean_a, sd_a = mean_std(a)
    mean_b, sd_b = mean_std(b)
    if sd_a is None or sd_b is None:
        return None
    diff = mean_a - mean_b
    se2_a, se2_b = sd_a ** 2 / len(a), sd_b ** 2 / len(b)  # squared standard errors of the means
    se2 = se2_a + se2_b
    if se2 == 0:
        return Welch(diff, diff, diff, None, None, 0.0 if diff else None)
    df = se2 ** 2 / (se2_a ** 2 / (len(a) - 1) + se2_b ** 2 / (len(b) - 1))
    se = math.sqrt(se2)
    half = float(student_t.ppf((1 + level) / 2, df)) * se
    p = 2 * float(student_t.sf(abs(diff) / se, df))
    return Welch(diff, diff - half, diff + half, diff / se, df, p)


def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjustment of the given p-values (None ones are left out of the family and
    stay None): the i-th smallest of m becomes max over j <= i of min(1, (m - j + 1) * p_(j))."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    adjusted: List[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted
