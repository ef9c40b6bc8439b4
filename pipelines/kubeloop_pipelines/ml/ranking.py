"""Ranking metrics of a scoring model: MAP@k and NDCG@k over the rows of each query group
(``data.groupColumn``), on the test split.

The model is not a learning-to-rank model: it scores each row on its own (a regression value,
or the probability of the relevant class) and the rows of one group are ranked by that score.

Conventions
-----------
- **Relevance** comes from the target: regression → the value itself (a graded relevance,
  >= 0); binary classification → 1 for the last class (the positive one, as everywhere in
  evaluation) and 0 otherwise; more classes → the class labels read as numeric grades
  (``0``…``3``), the score being the expected grade under the predicted probabilities. A row is
  *relevant* when its relevance is > 0 (what MAP counts).
- **Order**: by score, highest first. Tied scores are broken *pessimistically* (the less
  relevant row first), so a model that scores every row alike gets the worst order of its ties
  rather than whatever order the rows came in, and cannot pass a gate by luck.
- **NDCG@k** of a group: ``DCG@k / IDCG@k`` with ``DCG@k = sum_{i=1..k} (2^rel_i - 1) /
  log2(i + 1)`` over the ranked rows and ``IDCG@k`` the same over the rows sorted by relevance.
- **AP@k** of a group: ``(1 / min(k, R)) * sum_{i=1..k} P@i * [row i relevant]`` with ``R`` the
  group's relevant rows and ``P@i`` the fraction of relevant rows among the first ``i``. The
  ``min(k, R)`` normaliser makes a perfect top-k score 1 even when a group has more than ``k``
  relevant rows. MAP@k is the mean of AP@k over the groups.
- A group shorter than ``k`` counts all its rows (``k`` is a cut-off, not a length).
- **Groups without a relevant row** (``R = 0``, so ``IDCG = 0``) have neither metric defined and
  are left out of both means (as trec_eval leaves out queries without relevant documents);
  their number is reported. With no group left the metrics are NaN, and a gate on them fails
  as "not measurable".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from kubeloop_pipelines.contract import StepError

DEFAULT_K = 10  # evaluation.ranking.k when the spec has a groupColumn but no ranking section

FloatArray = npt.NDArray[np.float64]


def ranked_relevance(relevance: npt.ArrayLike, scores: npt.ArrayLike) -> FloatArray:
    """The relevances of one group's rows in ranked order: score descending, ties broken with
    the less relevant row first (see the module docstring)."""
    rel = np.asarray(relevance, dtype=np.float64)
    score = np.asarray(scores, dtype=np.float64)
    # lexsort sorts by the last key first: -score (descending score), then relevance ascending
    return rel[np.lexsort((rel, -score))]


def dcg(ranked: FloatArray, k: int) -> float:
    """``sum_{i=1..k} (2^rel_i - 1) / log2(i + 1)`` over the first ``k`` ranked relevances."""
    top = ranked[:k]
    discounts = np.log2(np.arange(2, len(top) + 2, dtype=np.float64))
    return float(np.sum((2.0**top - 1.0) / discounts))


def group_ndcg(relevance: npt.ArrayLike, scores: npt.ArrayLike, k: int) -> float:
    """NDCG@k of one group; NaN when it has no relevant row (the ideal DCG is 0)."""
    rel = np.asarray(relevance, dtype=np.float64)
    ideal = dcg(np.sort(rel)[::-1], k)
    if ideal == 0:
        return float("nan")
    return dcg(ranked_relevance(rel, scores), k) / ideal


def group_average_precision(relevance: npt.ArrayLike, scores: npt.ArrayLike, k: int) -> float:
    """AP@k of one group, normalised by ``min(k, #relevant)``; NaN when it has no relevant
    row."""
    relevant = np.asarray(relevance, dtype=np.float64) > 0
    n_relevant = int(relevant.sum())
    if n_relevant == 0:
        return float("nan")
    hits = (ranked_relevance(relevant.astype(np.float64), scores)[:k] > 0).astype(np.float64)
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(np.sum(precision_at * hits) / min(k, n_relevant))


def _per_group(
    score_group: Any, relevance: FloatArray, scores: FloatArray, groups: npt.ArrayLike, k: int
) -> FloatArray:
    """``score_group(relevance, scores, k)`` of every group, in sorted group-id order."""
    unique, inverse = np.unique(np.asarray(groups), return_inverse=True)
    return np.array(
        [score_group(relevance[inverse == g], scores[inverse == g], k) for g in range(len(unique))],
        dtype=np.float64,
    )


def _mean_defined(values: FloatArray) -> float:
    defined = values[np.isfinite(values)]
    return float(defined.mean()) if len(defined) else float("nan")


def ndcg_at_k(
    relevance: npt.ArrayLike, scores: npt.ArrayLike, groups: npt.ArrayLike, k: int
) -> float:
    """Mean NDCG@k over the groups with a relevant row (NaN if there is none)."""
    rel, score = np.asarray(relevance, np.float64), np.asarray(scores, np.float64)
    return _mean_defined(_per_group(group_ndcg, rel, score, groups, k))


def map_at_k(
    relevance: npt.ArrayLike, scores: npt.ArrayLike, groups: npt.ArrayLike, k: int
) -> float:
    """Mean AP@k over the groups with a relevant row (NaN if there is none)."""
    rel, score = np.asarray(relevance, np.float64), np.asarray(scores, np.float64)
    return _mean_defined(_per_group(group_average_precision, rel, score, groups, k))


def relevance_and_scores(
    task: str, y_true: npt.ArrayLike, outputs: npt.ArrayLike, classes: list[str]
) -> tuple[FloatArray, FloatArray]:
    """``(relevance, score)`` per row from the target and the model's outputs (see the module
    docstring); a target that cannot be a relevance raises StepError naming ``data.target``."""
    out = np.asarray(outputs, dtype=np.float64)
    if task == "regression":
        relevance = np.asarray(y_true, dtype=np.float64).reshape(-1)
        scores = out.reshape(len(relevance), -1)[:, 0]
    else:
        y = np.asarray(y_true, dtype=np.int64)
        proba = out if out.ndim == 2 else np.eye(len(classes))[out.astype(np.int64)]
        if len(classes) == 2:
            # binary: the last class is the relevant one; its probability ranks the rows
            return (y == 1).astype(np.float64), proba[:, 1]
        try:
            grades = np.array([float(c) for c in classes], dtype=np.float64)
        except ValueError:
            raise StepError(
                f"data.target has classes {classes[:5]}: ranking metrics need binary labels or "
                "numeric relevance grades (e.g. 0, 1, 2, 3)",
                field="data.target",
            ) from None
        relevance, scores = grades[y], proba @ grades
    if len(relevance) and float(relevance.min()) < 0:
        raise StepError(
            f"data.target holds relevance {float(relevance.min()):.4g} < 0; ranking gains "
            "(2^rel - 1) need grades >= 0",
            field="data.target",
        )
    return relevance, scores


def ranking_metrics(
    task: str,
    y_true: npt.ArrayLike,
    outputs: npt.ArrayLike,
    groups: npt.ArrayLike,
    *,
    classes: list[str],
    k: int,
) -> tuple[dict[str, float], dict[str, Any]]:
    """``({map_at_k, ndcg_at_k}, details)`` of the test rows ranked within ``groups``; an
    undefined metric (no group with a relevant row) is left out of the first mapping, as
    ``compute_metrics`` leaves out what it cannot measure. ``details`` goes into
    ``evaluation.json``: k and how many groups counted."""
    relevance, scores = relevance_and_scores(task, y_true, outputs, classes)
    ndcg = _per_group(group_ndcg, relevance, scores, groups, k)
    defined = int(np.isfinite(ndcg).sum())
    values = {
        "map_at_k": map_at_k(relevance, scores, groups, k),
        "ndcg_at_k": _mean_defined(ndcg),
    }
    details = {"k": k, "groups": len(ndcg), "groupsWithoutRelevant": len(ndcg) - defined}
    return {name: v for name, v in values.items() if np.isfinite(v)}, details
