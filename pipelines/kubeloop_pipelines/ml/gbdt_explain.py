"""Explanations of a forest: exact TreeSHAP and the decision path of one prediction.

- **TreeSHAP** from lightgbm itself (``predict(pred_contrib=True)``): per row, one exact
  Shapley value per model-input column plus the expected value, summing to the raw score
  (log-odds for classifiers, the value for regression). Values are summed over the columns a
  serving feature became (a one-hot category's columns), which keeps them exact and additive,
  so they are per raw serving feature like the networks' attributions. Classifiers explain the
  predicted class. Global importance is the mean absolute value over the test rows.
- **Decision path** of the first test row through the trees that moved its score most (the
  largest ``|leaf value|``): each split's feature, threshold, the row's value and the
  direction taken, with thresholds also in raw units where the column is a scaled number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from kubeloop_pipelines.contract import StepError
from kubeloop_pipelines.ml.evaluate import figure_png, new_figure
from kubeloop_pipelines.ml.explain import MAX_GLOBAL_ROWS, MAX_SAMPLES, Explanation
from kubeloop_pipelines.ml.gbdt import predict_booster

TOP_TREES = 3
FloatArray = npt.NDArray[np.float64]


def tree_shap(
    booster: Any, x: npt.ArrayLike, *, task: str, source: Sequence[int], n_serving: int
) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
    """``(contributions (n, n_serving), expected value (n,), explained class (n,))``: exact
    TreeSHAP of the predicted class (classifiers) or the value, per serving feature
    (``source[j]`` is the serving feature of input column ``j``)."""
    rows = np.asarray(x, dtype=np.float32)
    per_class = int(booster.num_model_per_iteration())
    width = rows.shape[1]
    raw = np.asarray(booster.predict(rows, pred_contrib=True), dtype=np.float64)
    raw = raw.reshape(len(rows), per_class, width + 1)
    if task == "classification" and per_class > 1:
        chosen = predict_booster(booster, rows, task).argmax(axis=1).astype(np.int64)
    else:
        chosen = np.zeros(len(rows), dtype=np.int64)
    picked = raw[np.arange(len(rows)), chosen]
    serving = np.zeros((len(rows), n_serving), dtype=np.float64)
    np.add.at(serving.T, np.asarray(source, dtype=np.int64), picked[:, :width].T)
    # binary classifiers and regression have one output: the log-odds of class 1, the value
    return serving, picked[:, width], chosen


def explain_trees(
    booster: Any,
    *,
    task: str,
    features: Sequence[str],
    classes: Sequence[str],
    transform: Mapping[str, Any],
    rows: npt.ArrayLike,
    x: npt.ArrayLike,
    samples: int,
    method: str,
) -> Explanation:
    """TreeSHAP of the test rows: raw serving ``rows`` and their model inputs ``x``."""
    if method == "gradcam":
        raise StepError(
            "explanation.method='gradcam' needs an image model with convolutions; this run "
            "trains model.family='lightgbm' on a table: use shap (exact TreeSHAP for trees)",
            field="explanation.method",
        )
    data = np.asarray(rows, dtype=np.float32)[:MAX_GLOBAL_ROWS]
    inputs = np.asarray(x, dtype=np.float32)[:MAX_GLOBAL_ROWS]
    source = [int(s) for s in transform["columns"]["source"]]
    contributions, _, _ = tree_shap(
        booster, inputs, task=task, source=source, n_serving=len(features)
    )
    k = max(1, min(samples, MAX_SAMPLES, len(data)))
    out = predict_booster(booster, inputs[:k], task)
    labels = (
        [str(classes[int(i)]) for i in out.argmax(axis=1)]
        if task == "classification"
        else [f"{float(v):.4g}" for v in out.reshape(-1)]
    )
    notes = [
        "Exact TreeSHAP (lightgbm pred_contrib): per-row values sum to the raw score"
        + (" (log-odds of class 1)." if task == "classification" else ".")
    ]
    if method != "shap":
        notes.append(
            f"explanation.method={method!r} asks for the networks' method; a forest has no "
            "gradients, so its exact TreeSHAP values are reported instead"
        )
    return Explanation(
        method="tree_shap",
        features=list(features),
        importance=np.abs(contributions).mean(axis=0),
        importance_label="mean |TreeSHAP value| (raw score units)",
        sample_attributions=contributions[:k],
        sample_rows=data[:k],
        sample_labels=labels,
        notes=notes,
        sample_method="TreeSHAP",
    )


def _walk(tree: Mapping[str, Any], values: npt.NDArray[np.float32]) -> tuple[list[Any], Any]:
    """The splits from the root of one dumped tree to the leaf ``values`` reaches."""
    node, path = tree["tree_structure"], []
    while "split_index" in node:
        column, threshold = int(node["split_feature"]), float(node["threshold"])
        value = float(values[column])
        left = bool(node["default_left"]) if math.isnan(value) else value <= threshold
        path.append((column, threshold, value, left))
        node = node["left_child"] if left else node["right_child"]
    return path, node


def decision_path(
    booster: Any,
    x_row: npt.ArrayLike,
    *,
    transform: Mapping[str, Any],
    row: int = 0,
    top: int = TOP_TREES,
) -> dict[str, Any]:
    """The leaf paths of the ``top`` trees that moved this row's raw score most."""
    values = np.asarray(x_row, dtype=np.float32).reshape(-1)
    names = [str(f) for f in transform["input_features"]]
    codes = transform["columns"]["code"]
    center = transform["scaling"]["center"]
    scale = transform["scaling"]["scale"]
    per_class = int(booster.num_model_per_iteration())
    leaves = np.asarray(booster.predict(values[None, :], pred_leaf=True)).reshape(-1)
    raw = np.asarray(booster.predict(values[None, :], raw_score=True)).reshape(-1)
    explained = int(raw.argmax()) if per_class > 1 else 0
    trees: list[dict[str, Any]] = []
    for info in booster.dump_model()["tree_info"]:
        index = int(info["tree_index"])
        if index % per_class != explained:
            continue
        path, leaf = _walk(info, values)
        if int(leaf["leaf_index"]) != int(leaves[index]):  # our walk must be lightgbm's
            raise StepError(f"tree {index}: the walked leaf differs from lightgbm's pred_leaf")
        steps = []
        for column, threshold, value, left in path:
            step: dict[str, Any] = {
                "feature": names[column],
                "threshold": threshold,
                "value": value,
                "direction": "<=" if left else ">",
            }
            if codes[column] is None:  # a scaled number: the same split in raw units
                step["raw_threshold"] = threshold * float(scale[column]) + float(center[column])
                step["raw_value"] = value * float(scale[column]) + float(center[column])
            else:  # a one-hot column: <= 0.5 means "not this category"
                step["means"] = ("is not " if left else "is ") + names[column]
            steps.append(step)
        trees.append(
            {"tree": index, "leaf": int(leaf["leaf_index"]),
             "leaf_value": float(leaf["leaf_value"]), "path": steps}
        )  # fmt: skip
    trees.sort(key=lambda t: -abs(t["leaf_value"]))
    return {
        "row": row,
        "raw_score": float(raw[explained]),
        "explained_output": explained,
        "trees_total": len(trees),
        "trees": trees[:top],
    }


def plot_decision_path(path: Mapping[str, Any]) -> bytes:
    """The most influential tree's path as a ladder of splits, one line a split."""
    empty: dict[str, Any] = {"tree": -1, "path": [], "leaf_value": 0.0}
    tree: Mapping[str, Any] = path["trees"][0] if path["trees"] else empty
    lines = [
        f"{s['feature']} {s['direction']} {s.get('raw_threshold', s['threshold']):.4g}"
        f"   (row: {s.get('raw_value', s['value']):.4g})"
        for s in tree["path"]
    ]
    lines.append(f"leaf {tree.get('leaf', '?')}: {tree['leaf_value']:+.4g} to the raw score")
    fig, ax = new_figure(6.5, 0.9 + 0.35 * len(lines))
    for i, line in enumerate(lines):
        ax.text(0.02 + 0.03 * min(i, 10), 1 - (i + 0.5) / len(lines), line, fontsize=8,
                family="monospace", va="center")  # fmt: skip
    ax.axis("off")
    ax.set_title(
        f"Decision path of test row {path['row']} through tree {tree['tree']} "
        f"(raw score {path['raw_score']:+.4g})",
        fontsize=9,
    )
    return figure_png(fig)
