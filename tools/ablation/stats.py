"""Statistics over a row's seeds."""
import math
from typing import List


def mean_std(values: List[float]):
    """Mean and sample std (ddof=1); std is None for a single value, both None for none."""
    if not values:
        return None, None
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)
