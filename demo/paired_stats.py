"""Paired comparison over seeds: mean difference, a two-sided t-interval, and the sentence it allows.

Each seed trains a USP-initialised and a scratch model on the same batches and noise (and probes a USP and a
random encoder with the same batches), so the per-seed differences d_1..d_n are paired measurements. Their
mean gets the classical t-interval mean(d) +- t_{1-a/2, n-1} * sd(d) / sqrt(n) (sd with n - 1 in the
denominator): it treats the seeds as independent draws of the whole training run, and says nothing
with fewer than 2 seeds. With 3 seeds, t_{0.975, 2} = 4.303, so the interval is wide on purpose.
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence

from scipy import stats

NO_DIFFERENCE = "no measurable difference at this scale"


@dataclass(frozen=True)
class PairedInterval:
    mean: float
    low: Optional[float]      # None with fewer than 2 seeds
    high: Optional[float]
    n: int
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> PairedInterval:
    """t-interval of the mean of `differences` (one per seed)."""
    values = [float(d) for d in differences]
    n = len(values)
    if n == 0:
        raise ValueError("paired_interval needs at least one difference.")
    mean = sum(values) / n
    if n < 2:
        return PairedInterval(mean, None, None, n, confidence)
    sd = math.sqrt(sum((d - mean) ** 2 for d in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return PairedInterval(mean, mean - half, mean + half, n, confidence)


def direction(interval: PairedInterval) -> str:
    """'ahead' / 'behind' only when the interval excludes zero (positive = USP better), else NO_DIFFERENCE."""
    if not interval.excludes_zero:
        return NO_DIFFERENCE
    return "ahead" if interval.low > 0 else "behind"


def format_interval(interval: PairedInterval, unit: str, digits: int = 1) -> str:
    """'+1.2% (95% t-interval over 3 seeds: +0.3% to +2.1%)'."""
    text = f"{interval.mean:+.{digits}f}{unit}"
    if interval.low is None:
        return text + " (1 seed: no interval; run with --seeds 2 or more)"
    return (text + f" ({100 * interval.confidence:.0f}% t-interval over {interval.n} seeds: "
            f"{interval.low:+.{digits}f}{unit} to {interval.high:+.{digits}f}{unit})")


def short_interval(interval: PairedInterval, unit: str, digits: int = 1) -> str:
    """'+1.2% [+0.3%, +2.1%]' for a table cell."""
    text = f"{interval.mean:+.{digits}f}{unit}"
    if interval.low is None:
        return text + " [1 seed]"
    return text + f" [{interval.low:+.{digits}f}{unit}, {interval.high:+.{digits}f}{unit}]"
