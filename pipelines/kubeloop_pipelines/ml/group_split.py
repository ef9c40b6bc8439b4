"""Group-aware splitting (``data.groupColumn``): every group's rows land in one split, so a
query is never both trained on and ranked in test (its documents share the query's features
and relevance distribution: splitting rows would leak them)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd

from kubeloop.api.training_run import Split
from kubeloop_pipelines.contract import SPLITS, StepError


def group_parts(
    ids: pd.Series, settings: Split, rng: np.random.Generator, *, column: str
) -> dict[str, list[npt.NDArray[np.int64]]]:
    """Row positions per split with each group's rows kept together: the groups are shuffled
    (seeded) and dealt out in that order, a group going to test while the middle of its rows
    falls within the first ``test`` fraction of all rows, then to validation likewise, the rest
    to train; a split left empty (a few large groups) takes the smallest group of the fullest
    one. Stratification does not apply (a group holds rows of several classes)."""
    if ids.isna().any():
        raise StepError(
            f"data.groupColumn={column!r} is empty in {int(ids.isna().sum())} row(s); "
            "every row needs the id of the query/group it belongs to",
            field="data.groupColumn",
        )
    unique, inverse = np.unique(ids.astype(str).to_numpy(dtype=str), return_inverse=True)
    if len(unique) < len(SPLITS):
        raise StepError(
            f"data.groupColumn={column!r} holds {len(unique)} group(s); a group-aware "
            f"split needs at least {len(SPLITS)} (one per split)",
            field="data.groupColumn",
        )
    order = rng.permutation(len(unique))
    sizes = np.bincount(inverse, minlength=len(unique))[order]
    middles = np.cumsum(sizes) - sizes / 2
    n = len(ids)
    # 0 test, 1 validation, 2 train, per group in dealing order
    dealt = np.where(
        middles < n * settings.test,
        0,
        np.where(middles < n * (settings.test + settings.validation), 1, 2),
    )
    for empty in range(len(SPLITS)):
        if not (dealt == empty).any():
            # large groups can leave a split empty: it takes the smallest group of the split
            # holding the most groups (at least two of the three or more)
            donor = int(np.argmax(np.bincount(dealt, minlength=len(SPLITS))))
            candidates = np.flatnonzero(dealt == donor)
            dealt[candidates[np.argmin(sizes[candidates])]] = empty
    split_of_group = np.empty(len(unique), dtype=np.int64)
    split_of_group[order] = dealt
    positions = np.arange(n)
    return {
        name: [positions[split_of_group[inverse] == i]]
        for i, name in enumerate(("test", "validation", "train"))
    }
