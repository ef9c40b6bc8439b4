"""Counterfactuals: a small change of a row that flips a classifier's prediction.

The search (:func:`find_counterfactual`) is a greedy coordinate search over a few candidate
features (the most important ones), in standardised units (each feature divided by its
training standard deviation), with the L1 distance to the original row as the cost:

1. each round, every still-unchanged candidate feature is tried at every point of a grid over
   its *training range* [min, max] — one batched ``predict`` call;
2. if some tries flip the predicted class, the cheapest one is kept and bisected towards the
   current value (the flip closest to the row along that feature), and the search ends;
3. otherwise the try that lowers the original class's probability most is kept and the next
   round changes one more feature, up to ``max_changed`` features.

What it does **not** guarantee: the smallest change overall (it is greedy, on a grid, and
changes one feature at a time); that a flip exists within the limits (then ``found`` is
False); that the changed row is plausible (correlations between features, integer or
immutable features are not respected: a counterfactual is a probe of the model, not advice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Predict = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]
GRID_STEPS = 24
MAX_CHANGED = 3
BISECTION_STEPS = 12


@dataclass
class Counterfactual:
    """The outcome of one search; ``changes`` are (feature, original value, new value)."""

    row: int
    original_class: str
    new_class: str | None  # None: no flip within the limits
    cost: float  # L1 distance in training standard deviations
    changes: list[tuple[str, float, float]] = field(default_factory=list)
    changed_row: npt.NDArray[np.float32] | None = None

    @property
    def found(self) -> bool:
        return self.new_class is not None


@dataclass(frozen=True)
class SearchLimits:
    """Where the search may look: per-feature training [low, high] and standard deviation,
    the candidate feature indices and how many of them may change."""

    low: npt.NDArray[np.float64]
    high: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    candidates: tuple[int, ...]
    max_changed: int = MAX_CHANGED
    grid_steps: int = GRID_STEPS

    @classmethod
    def from_training(
        cls, training_rows: npt.ArrayLike, candidates: Sequence[int], max_changed: int = MAX_CHANGED
    ) -> SearchLimits:
        x = np.asarray(training_rows, dtype=np.float64)
        scale = np.nanstd(x, axis=0)
        return cls(
            low=np.nanmin(x, axis=0),
            high=np.nanmax(x, axis=0),
            scale=np.where(np.isfinite(scale) & (scale > 0), scale, 1.0),
            candidates=tuple(int(j) for j in candidates),
            max_changed=max_changed,
        )


def _cost(
    x: npt.NDArray[np.float64], origin: npt.NDArray[np.float64], scale: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    return np.asarray(np.abs((x - origin) / scale).sum(axis=-1), dtype=np.float64)


def _bisect(
    predict: Predict,
    current: npt.NDArray[np.float64],
    feature: int,
    flipped_value: float,
    original_class: int,
) -> npt.NDArray[np.float64]:
    """The row with ``feature`` moved from its current value towards ``flipped_value`` only
    as far as needed to keep the flip (to the bisection's resolution)."""
    inside, outside = float(current[feature]), flipped_value  # not flipped / flipped
    for _ in range(BISECTION_STEPS):
        middle = (inside + outside) / 2
        probe = current.copy()
        probe[feature] = middle
        if int(np.argmax(predict(probe[None].astype(np.float32))[0])) != original_class:
            outside = middle
        else:
            inside = middle
    best = current.copy()
    best[feature] = outside
    return best


def find_counterfactual(
    predict: Predict,
    row: npt.ArrayLike,
    limits: SearchLimits,
    *,
    features: Sequence[str],
    classes: Sequence[str],
    index: int = 0,
) -> Counterfactual:
    """The greedy search described in the module docstring, for one row of a classifier
    whose ``predict`` returns class probabilities (n, classes)."""
    origin = np.asarray(row, dtype=np.float64)
    original = int(np.argmax(predict(origin[None].astype(np.float32))[0]))
    current = origin.copy()
    free = [j for j in limits.candidates if np.isfinite(limits.low[j]) and np.isfinite(origin[j])]
    for _ in range(min(limits.max_changed, len(free))):
        tries, tried = [], []
        for j in free:
            for value in np.linspace(limits.low[j], limits.high[j], limits.grid_steps):
                candidate = current.copy()
                candidate[j] = value
                tries.append(candidate)
                tried.append(j)
        if not tries:
            break
        batch = np.asarray(tries)
        probabilities = np.asarray(predict(batch.astype(np.float32)), dtype=np.float64)
        costs = _cost(batch, origin, limits.scale)
        flips = np.argmax(probabilities, axis=1) != original
        if flips.any():
            pick = int(np.flatnonzero(flips)[np.argmin(costs[flips])])
            j = tried[pick]
            current = _bisect(predict, current, j, float(batch[pick, j]), original)
            return _result(
                predict, origin, current, original=original, features=features,
                classes=classes, index=index, limits=limits,
            )  # fmt: skip
        pick = int(np.argmin(probabilities[:, original] + 1e-6 * costs))  # ties: the cheaper
        current = batch[pick]
        free.remove(tried[pick])
    return Counterfactual(index, classes[original], None, float("nan"))


def _result(
    predict: Predict,
    origin: npt.NDArray[np.float64],
    found: npt.NDArray[np.float64],
    *,
    original: int,
    features: Sequence[str],
    classes: Sequence[str],
    index: int,
    limits: SearchLimits,
) -> Counterfactual:
    new = int(np.argmax(predict(found[None].astype(np.float32))[0]))
    changed = [int(j) for j in np.flatnonzero(found != origin)]
    return Counterfactual(
        row=index,
        original_class=classes[original],
        new_class=classes[new],
        cost=float(_cost(found, origin, limits.scale)),
        changes=[(features[j], float(origin[j]), float(found[j])) for j in changed],
        changed_row=found.astype(np.float32),
    )


def counterfactuals(
    predict: Predict,
    rows: npt.NDArray[np.float32],
    training_rows: npt.NDArray[np.float32],
    *,
    features: Sequence[str],
    classes: Sequence[str],
    candidates: Sequence[int],
    max_changed: int = MAX_CHANGED,
) -> list[Counterfactual]:
    """:func:`find_counterfactual` for each of ``rows``, limits from the training rows."""
    limits = SearchLimits.from_training(training_rows, candidates, max_changed)
    return [
        find_counterfactual(predict, row, limits, features=features, classes=classes, index=i)
        for i, row in enumerate(rows)
    ]
