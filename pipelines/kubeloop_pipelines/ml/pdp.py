"""Partial dependence and ICE curves, swept over any ``predict`` (the serving model's).

For one feature and a grid of its values, every explained row is copied once per grid value
with that feature replaced: the model's output along the grid is the row's ICE (individual
conditional expectation) curve, and their mean is the partial dependence. The grid is the
feature's training quantiles, so the sweep stays where the model saw data. sklearn's
``partial_dependence`` needs an sklearn estimator; the serving model is not one, and the sweep
is a few lines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from kubeloop_pipelines.ml.evaluate import figure_png, new_figure

Predict = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]
GRID_POINTS = 20
MAX_ROWS = 200  # rows swept per feature (ICE curves)
ICE_LINES_SHOWN = 50


@dataclass
class DependenceCurve:
    """The ICE curves of ``rows`` for one feature, and their mean (the partial dependence)."""

    feature: str
    grid: npt.NDArray[np.float64]  # (g,) the feature's values swept
    ice: npt.NDArray[np.float64]  # (n, g) each row's output along the grid
    output: str  # what the curves are, e.g. "P(malignant)" or "prediction"

    @property
    def average(self) -> npt.NDArray[np.float64]:
        """The partial dependence: the mean ICE curve."""
        return np.asarray(self.ice.mean(axis=0), dtype=np.float64)


def feature_grid(values: npt.ArrayLike, points: int = GRID_POINTS) -> npt.NDArray[np.float64]:
    """Up to ``points`` distinct training quantiles of one feature (its finite values)."""
    column = np.asarray(values, dtype=np.float64)
    column = column[np.isfinite(column)]
    if column.size == 0:
        return np.zeros(1)
    return np.unique(np.quantile(column, np.linspace(0.0, 1.0, points)))


def output_column(task: str, n_classes: int, probabilities: npt.NDArray[np.float32]) -> int | None:
    """The output the curves follow: the positive class (1) of a binary task, the class most
    often predicted on the rows for more classes, None (the value) for regression."""
    if task != "classification":
        return None
    if n_classes == 2:
        return 1
    return int(np.bincount(np.argmax(probabilities, axis=1), minlength=n_classes).argmax())


def ice_curves(
    predict: Predict,
    rows: npt.NDArray[np.float32],
    feature: int,
    grid: npt.NDArray[np.float64],
    column: int | None,
) -> npt.NDArray[np.float64]:
    """(n, g): the output (``column`` of the probabilities, or the value) of each row with
    ``feature`` set to each grid value; one ``predict`` call for the whole sweep."""
    n, d = rows.shape
    swept = np.repeat(rows[None, :, :], len(grid), axis=0)  # (g, n, d)
    swept[:, :, feature] = grid.astype(np.float32)[:, None]
    out = np.asarray(predict(swept.reshape(-1, d)), dtype=np.float64)
    values = out.reshape(-1) if column is None else out[:, column]
    return np.asarray(values.reshape(len(grid), n).T, dtype=np.float64)


def dependence_curves(
    predict: Predict,
    rows: npt.NDArray[np.float32],
    training_rows: npt.NDArray[np.float32],
    *,
    features: Sequence[str],
    chosen: Sequence[int],
    task: str,
    classes: Sequence[str],
    points: int = GRID_POINTS,
) -> list[DependenceCurve]:
    """The ICE curves and partial dependence of each ``chosen`` feature index over ``rows``
    (at most :data:`MAX_ROWS`), on the feature's training-quantile grid."""
    sample = np.asarray(rows[:MAX_ROWS], dtype=np.float32)
    column = output_column(task, len(classes), np.asarray(predict(sample)))
    label = "prediction" if column is None else f"P({classes[column]})"
    return [
        DependenceCurve(
            feature=features[j],
            grid=(grid := feature_grid(training_rows[:, j], points)),
            ice=ice_curves(predict, sample, j, grid, column),
            output=label,
        )
        for j in chosen
    ]


def plot_dependence(curves: Sequence[DependenceCurve]) -> bytes:
    """One panel per feature: thin ICE lines (at most 50) and the thick partial dependence."""
    fig, axes = new_figure(3.2 * max(1, len(curves)), 3.2, ncols=max(1, len(curves)))
    for ax, curve in zip(np.atleast_1d(axes), curves, strict=False):
        for line in curve.ice[:ICE_LINES_SHOWN]:
            ax.plot(curve.grid, line, color="tab:blue", alpha=0.15, linewidth=0.8)
        ax.plot(curve.grid, curve.average, color="tab:red", linewidth=2.2, label="partial dep.")
        ax.set_xlabel(curve.feature, fontsize=8)
        ax.set_ylabel(curve.output, fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("Partial dependence (red) and ICE curves (blue)", fontsize=9)
    return figure_png(fig)
