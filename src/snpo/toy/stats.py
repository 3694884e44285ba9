"""Intervals and verdict rules of the toy study: pure numpy, no models.

Every comparison is PAIRED: two methods are scored on the same held-out prompts with the same
sampling seeds in the same world, so the quantity compared is the per-prompt difference
``d[w, p] = mean over seeds of (score_A - score_B)`` in world ``w``. The estimate is the mean
over worlds of each world's mean over prompts (each world weighs the same); its 95% interval
is a percentile bootstrap that resamples prompts with replacement WITHIN each world (the
worlds are fixed: a claim is about these worlds, and with three of them a between-world
resample would be meaningless). Resampling prompts keeps each prompt's seeds together, since
the seeds of one prompt share its difficulty.

Rules, fixed before any run (docs/toy.md):

- **superiority** ("A beats B"): HOLDS when the whole interval is above 0; REVERSED when the
  whole interval is below 0; otherwise NOT SHOWN. "Within noise" is never a success.
- **non-inferiority** ("A is not worse than B", "competitive"): HOLDS when the whole interval
  lies above ``-margin``, the margin stated in advance (``DemoConfig``); otherwise NOT SHOWN.
- a claim about two judges holds when it holds on both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HOLDS, NOT_SHOWN, REVERSED = "holds", "not shown", "reversed"
SUPERIORITY_RULE = "holds when the 95% interval of the difference lies above 0; reversed when below 0"
NONINFERIORITY_RULE = "holds when the 95% interval of the difference lies above -{margin:g} (margin fixed in advance)"


@dataclass(frozen=True)
class Interval:
    """A paired difference: its estimate and percentile-bootstrap interval."""

    estimate: float
    low: float
    high: float
    worlds: int
    units: int  # prompts (or pairs) summed over worlds

    def __str__(self) -> str:
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"

    def as_dict(self) -> dict[str, float | int]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high,
                "worlds": self.worlds, "units": self.units}


def per_unit(scores: np.ndarray) -> np.ndarray:
    """(seeds, prompts) scores -> (prompts,) means over seeds; a 1-D array is returned as is."""
    scores = np.asarray(scores, dtype=np.float64)
    return scores.mean(axis=0) if scores.ndim == 2 else scores


def paired_differences(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per world, the per-prompt differences ``mean_seeds(A) - mean_seeds(B)``."""
    if len(a) != len(b):
        raise ValueError(f"paired_differences: {len(a)} worlds against {len(b)}")
    out = []
    for x, y in zip(a, b):
        dx, dy = per_unit(x), per_unit(y)
        if dx.shape != dy.shape:
            raise ValueError(f"paired_differences: shapes {dx.shape} and {dy.shape} do not pair")
        out.append(dx - dy)
    return out


def pooled_mean(per_world: Sequence[np.ndarray]) -> float:
    """Mean over worlds of each world's mean (every world weighs the same)."""
    return float(np.mean([np.mean(d) for d in per_world]))


def bootstrap_interval(
    per_world: Sequence[np.ndarray], *, level: float = 0.95, resamples: int = 4000, seed: int = 0
) -> Interval:
    """Percentile bootstrap of :func:`pooled_mean`, resampling units within each world."""
    per_world = [np.asarray(d, dtype=np.float64) for d in per_world]
    if not per_world or any(d.size == 0 for d in per_world):
        raise ValueError("bootstrap_interval: every world needs at least one unit")
    if any(not np.all(np.isfinite(d)) for d in per_world):
        raise ValueError("bootstrap_interval: the differences hold NaN or inf")
    rng = np.random.default_rng(seed)
    stats = np.zeros(resamples)
    for d in per_world:
        idx = rng.integers(0, d.size, size=(resamples, d.size))
        stats += d[idx].mean(axis=1)
    stats /= len(per_world)
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return Interval(pooled_mean(per_world), float(low), float(high), len(per_world),
                    int(sum(d.size for d in per_world)))


def superiority(interval: Interval) -> str:
    if interval.low > 0:
        return HOLDS
    if interval.high < 0:
        return REVERSED
    return NOT_SHOWN


def noninferiority(interval: Interval, margin: float) -> str:
    if margin < 0:
        raise ValueError(f"margin: expected a number >= 0, got {margin!r}")
    return HOLDS if interval.low > -margin else NOT_SHOWN


def both(verdicts: Sequence[str]) -> str:
    """A claim on several judges: holds when it holds on each; reversed when reversed on each."""
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    if all(v == REVERSED for v in verdicts):
        return REVERSED
    return NOT_SHOWN


def accuracy_interval(per_world: Sequence[np.ndarray], chance: float = 0.5, **kwargs) -> Interval:
    """Interval of a mean accuracy minus ``chance`` (per-pair accuracies, per world)."""
    return bootstrap_interval([np.asarray(a, dtype=np.float64) - chance for a in per_world], **kwargs)
