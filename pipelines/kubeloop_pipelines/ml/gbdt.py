"""Gradient-boosted trees (``model.family: lightgbm``) on the prepared tabular features.

:func:`train_gbdt` boosts on the already-transformed train split (the same arrays the networks
see), re-sampled by ``imbalance`` (oversample/undersample/SMOTE) or weighted (class_weights: per-row
inverse-frequency weights, train and validation rows alike), with early
stopping on the validation loss (``model.earlyStopping.patience`` rounds). Every round becomes
one :class:`~kubeloop_pipelines.ml.train.EpochStats` (train/validation loss, the validation
metric), so the learning-curve plot, the verdict, progress reports and tuning's pruners read a
forest like a network. The kept model is cut to the best round.

:func:`save_gbdt` writes the model directory: ``booster.txt`` (lightgbm's text model: the
explanations read it), ``arch.json`` (family lightgbm), ``history.json``, ``params.json`` and
the ``onnx`` serving artifact (``kubeloop.serving.onnx_model``), after checking that
onnxruntime predicts what lightgbm predicts on held-out rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from kubeloop.api.training_run import Imbalance, ModelSpec, TrainingRunSpec, TreeSpec
from kubeloop.contract.reference import reference_from_data
from kubeloop.serving.onnx_model import onnx_session, save_onnx_model
from kubeloop_pipelines.contract import (
    ARCH_FILE,
    HISTORY_FILE,
    PARAMS_FILE,
    StepError,
    read_json,
    write_json,
)
from kubeloop_pipelines.ml.imbalance import class_weights, resample
from kubeloop_pipelines.ml.train import (
    EpochCallback,
    EpochStats,
    FitResult,
    Task,
    reference_summary,
    score,
)

if TYPE_CHECKING:
    import lightgbm as lgb

    from kubeloop_pipelines.ml.preprocess import Prepared

GBDT_FAMILY = "lightgbm"
BOOSTER_FILE = "booster.txt"
ONNX_INPUT = "input"
# onnxruntime's TreeEnsemble sums in float32: probabilities agree to ~1e-7, regression values
# to ~1e-6 of their magnitude. A row further apart than this (times max(1, |value|) for
# regression) means the export is wrong, e.g. a split sent the other way.
PARITY_TOLERANCE = 1e-4
PARITY_RELATIVE_TOLERANCE = 1e-5
PARITY_ROWS = 4096


@dataclass
class GbdtFit(FitResult):
    """A trained forest. ``module`` is a placeholder (trees have no torch network): the train
    step, tuning and the curves read one result type, :func:`save_gbdt` the booster."""

    booster: Any = None
    n_classes: int = 0


def is_tree_model(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds a forest written by :func:`save_gbdt`."""
    arch = Path(model_dir) / ARCH_FILE
    return arch.is_file() and read_json(arch).get("family") == GBDT_FAMILY


def tree_settings(model: ModelSpec) -> TreeSpec:
    return model.trees or TreeSpec()


def booster_params(
    trees: TreeSpec, *, task: str, n_classes: int, seed: int, threads: int
) -> dict[str, Any]:
    """lightgbm's parameters for ``trees`` (deterministic for a seed and a thread count)."""
    if task == "regression":
        objective: dict[str, Any] = {"objective": "regression", "metric": "l2"}
    elif n_classes == 2:
        objective = {"objective": "binary", "metric": "binary_logloss"}
    else:
        objective = {"objective": "multiclass", "num_class": n_classes, "metric": "multi_logloss"}
    bagging = (
        {"bagging_fraction": trees.subsample, "bagging_freq": 1} if trees.subsample < 1 else {}
    )
    return {
        **objective,
        **bagging,
        "num_leaves": trees.num_leaves,
        "max_depth": trees.max_depth,
        "learning_rate": trees.learning_rate,
        "min_data_in_leaf": trees.min_child_samples,
        "feature_fraction": trees.colsample_bytree,
        "lambda_l2": trees.reg_lambda,
        "seed": seed,
        "deterministic": True,
        "force_col_wise": True,
        "num_threads": threads,
        "verbosity": -1,
    }


def outputs(raw: npt.NDArray[Any], task: str, n_classes: int) -> npt.NDArray[np.float32]:
    """Raw scores → class probabilities ``(n, k)`` or values ``(n,)``."""
    raw = np.asarray(raw, dtype=np.float64)
    if task == "regression":
        return raw.reshape(-1).astype(np.float32)
    if n_classes == 2:
        p = 1.0 / (1.0 + np.exp(-raw.reshape(-1)))
        return np.stack([1.0 - p, p], axis=1).astype(np.float32)
    shifted: npt.NDArray[np.float64] = np.exp(raw - raw.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True), dtype=np.float32)


def predict_booster(booster: Any, x: npt.ArrayLike, task: str) -> npt.NDArray[np.float32]:
    """lightgbm's own predictions, in the shape serving answers."""
    n_classes = int(booster.num_model_per_iteration())
    k = 2 if task == "classification" and n_classes == 1 else n_classes
    raw = np.asarray(booster.predict(np.asarray(x, dtype=np.float32), raw_score=True))
    return outputs(raw, task, k)


class _RoundRecorder:
    """A lightgbm callback: one EpochStats per round, the validation metric from the running
    raw score (each round adds its trees' output), and the caller's callback."""

    def __init__(
        self,
        *,
        x_val: npt.NDArray[Any],
        y_val: npt.NDArray[Any],
        task: str,
        n_classes: int,
        metric: str,
        rounds: int,
        learning_rate: float,
        loss_scale: float,
        callback: EpochCallback | None,
    ) -> None:
        self.x_val, self.y_val = x_val, y_val
        self.task, self.n_classes, self.metric = task, n_classes, metric
        self.rounds, self.learning_rate, self.loss_scale = rounds, learning_rate, loss_scale
        self.callback = callback
        self.raw: npt.NDArray[np.float64] | None = None
        self.history: list[EpochStats] = []
        self.last = time.perf_counter()

    def __call__(self, env: Any) -> None:
        losses = {r[0]: float(r[2]) for r in env.evaluation_result_list}
        val_metric = math.nan
        if len(self.x_val):
            step = env.model.predict(
                self.x_val, start_iteration=env.iteration, num_iteration=1, raw_score=True
            )
            self.raw = step if self.raw is None else self.raw + step
            out = outputs(self.raw, self.task, self.n_classes)
            val_metric = score(self.metric, self.task, self.y_val, out)
        now = time.perf_counter()
        stats = EpochStats(
            epoch=env.iteration + 1,
            epochs=self.rounds,
            train_loss=losses.get("train", math.nan) / self.loss_scale,
            val_loss=losses.get("validation", math.nan) / self.loss_scale,
            val_metric=val_metric,
            lr=self.learning_rate,
            seconds=now - self.last,
        )
        self.last = now
        self.history.append(stats)
        if self.callback is not None:
            self.callback(stats)


def fit_gbdt(
    x_train: npt.NDArray[Any],
    y_train: npt.NDArray[Any],
    x_val: npt.NDArray[Any],
    y_val: npt.NDArray[Any],
    *,
    task: Task,
    model: ModelSpec,
    n_classes: int = 0,
    imbalance: Imbalance | None = None,
    metric: str,
    seed: int = 0,
    callback: EpochCallback | None = None,
) -> GbdtFit:
    """Boost a forest with ``model.trees`` on transformed features; see the module docstring.
    ``n_classes`` (classification) is the number of labels of the prepared data."""
    import lightgbm as lgb

    imbalance = imbalance or Imbalance()
    trees = tree_settings(model)
    weights: npt.NDArray[np.float32] | None = None
    val_weights: npt.NDArray[np.float32] | None = None
    params = booster_params(
        trees, task=task, n_classes=n_classes, seed=seed, threads=torch.get_num_threads()
    )
    loss_scale = 1.0
    if task == "classification":
        if imbalance.strategy == "focal_loss":
            raise StepError(
                "imbalance.strategy='focal_loss' is a loss of the networks; with model.family "
                "lightgbm use class_weights, oversample, undersample or smote",
                field="imbalance.strategy",
            )
        x_train, y_train = resample(
            x_train, y_train, strategy=imbalance.strategy, target_ratio=imbalance.target_ratio,
            seed=seed,
        )  # fmt: skip
        if imbalance.strategy == "class_weights":
            # Per-row inverse-frequency weights (for two classes the same as scale_pos_weight
            # up to a factor), on the validation rows too: early stopping then judges the
            # weighted loss being minimised, as the networks' weighted cross-entropy does.
            # scale_pos_weight alone would start from the unweighted prior and stop at once.
            balanced = class_weights(y_train, n_classes)
            weights = balanced[np.asarray(y_train, dtype=np.int64)]
            val_weights = balanced[np.asarray(y_val, dtype=np.int64)]
    else:
        # The losses of standardised targets, as the networks report them (verdict baseline 1).
        loss_scale = float(np.var(np.asarray(y_train, dtype=np.float64))) or 1.0

    train_set = lgb.Dataset(np.asarray(x_train, np.float32), y_train, weight=weights)
    valid_sets, names = [train_set], ["train"]
    if len(x_val):
        valid_sets.append(
            lgb.Dataset(
                np.asarray(x_val, np.float32), y_val, weight=val_weights, reference=train_set
            )
        )
        names.append("validation")
    recorder = _RoundRecorder(
        x_val=np.asarray(x_val, np.float32), y_val=np.asarray(y_val), task=task,
        n_classes=n_classes, metric=metric, rounds=trees.n_estimators,
        learning_rate=trees.learning_rate, loss_scale=loss_scale, callback=callback,
    )  # fmt: skip
    callbacks: list[Any] = [recorder]
    stopping = model.early_stopping
    if stopping is not None and len(x_val):
        callbacks.append(
            lgb.early_stopping(
                stopping.patience, first_metric_only=True, verbose=False,
                min_delta=stopping.min_delta,
            )
        )  # fmt: skip
    started = time.perf_counter()
    booster = lgb.train(
        params, train_set, num_boost_round=trees.n_estimators, valid_sets=valid_sets,
        valid_names=names, callbacks=callbacks,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    rounds = len(recorder.history)
    best = int(booster.best_iteration or 0) if stopping is not None else 0
    best = best if 1 <= best <= rounds else rounds
    # Cut to the best round: ONNX, TreeSHAP and the leaf paths then all see the kept forest.
    kept = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
    arch = {
        "family": GBDT_FAMILY,
        "input_shape": [int(np.asarray(x_train).shape[1])],
        "n_outputs": n_classes if task == "classification" else 1,
        "task": task,
        "objective": params["objective"],
        "trees": trees.model_dump(by_alias=True),
        "rounds": best,
    }
    return GbdtFit(
        module=nn.Identity(),
        arch=arch,
        metric=metric,
        history=recorder.history,
        best_epoch=best,
        stopped_early=rounds < trees.n_estimators,
        train_samples=len(x_train),
        train_samples_per_s=len(x_train) * rounds / seconds if seconds > 0 else 0.0,
        device="cpu",
        booster=kept,
        n_classes=n_classes,
    )


def train_gbdt(
    spec: TrainingRunSpec,
    prepared: Prepared,
    model: ModelSpec,
    imbalance: Imbalance,
    *,
    metric: str,
    callback: EpochCallback | None = None,
) -> GbdtFit:
    """:func:`fit_gbdt` on a prepared dataset (tabular only), seeded with ``data.split.seed``."""
    if prepared.modality != "tabular":
        raise StepError(
            f"model.family='lightgbm' trains on tables; this run's data is {prepared.modality}: "
            "use cnn/resnet for images or transformer for text",
            field="model.family",
        )
    task: Task = "classification" if prepared.task == "classification" else "regression"
    return fit_gbdt(
        prepared.x_train, prepared.y_train, prepared.x_validation, prepared.y_validation,
        task=task, model=model, n_classes=prepared.n_classes if task == "classification" else 0,
        imbalance=imbalance, metric=metric, seed=spec.data.split.seed, callback=callback,
    )  # fmt: skip


# --- export and the model directory --------------------------------------------------------


def export_onnx(booster: Any, width: int) -> tuple[bytes, str]:
    """The forest as ONNX bytes and the name of the output serving reads (probabilities as a
    tensor, not a list of maps, for classifiers)."""
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    graph = convert_lightgbm(
        booster, initial_types=[(ONNX_INPUT, FloatTensorType([None, width]))], zipmap=False
    )
    return graph.SerializeToString(), graph.graph.output[-1].name


def onnx_parity(
    onnx_bytes: bytes, output_name: str, booster: Any, x: npt.NDArray[Any], task: str
) -> dict[str, Any]:
    """onnxruntime's outputs against lightgbm's on the (transformed) rows ``x``; StepError
    when any row differs by more than :data:`PARITY_TOLERANCE`."""
    rows = np.ascontiguousarray(np.asarray(x, dtype=np.float32)[:PARITY_ROWS])
    if not len(rows):
        return {"rows": 0, "max_abs_diff": 0.0}
    (onnx_out,) = onnx_session(onnx_bytes).run([output_name], {ONNX_INPUT: rows})
    expected = predict_booster(booster, rows, task)
    got = np.asarray(onnx_out, dtype=np.float64).reshape(expected.shape)
    diff = float(np.abs(got - expected).max())
    tolerance = PARITY_TOLERANCE
    if task == "regression":
        tolerance = PARITY_RELATIVE_TOLERANCE * max(1.0, float(np.abs(expected).max()))
    if not diff <= tolerance:
        raise StepError(
            f"the ONNX export of the trees disagrees with lightgbm on held-out rows (largest "
            f"difference {diff:.3g} > {tolerance:.3g}); not saving a model that serves "
            "other predictions than the ones evaluated",
            permanent=True,
        )
    return {"rows": len(rows), "max_abs_diff": diff, "tolerance": tolerance}


def save_gbdt(
    model_dir: str | Path, result: GbdtFit, *, prepared: Prepared, params: Mapping[str, Any]
) -> Path:
    """Write the model directory of a forest (see the module docstring)."""
    from kubeloop_pipelines.ml.transforms import transform_module

    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    booster = result.booster
    booster.save_model(str(out / BOOSTER_FILE))
    write_json(out / ARCH_FILE, result.arch)
    write_json(out / HISTORY_FILE, result.history_json())
    write_json(out / PARAMS_FILE, dict(params))

    task = str(prepared.task)
    onnx_bytes, output_name = export_onnx(booster, int(result.arch["input_shape"][0]))
    held_out = np.concatenate([prepared.x_test, prepared.x_validation])
    parity = onnx_parity(onnx_bytes, output_name, booster, held_out, task)
    validation = np.asarray(prepared.serving_rows("validation"), dtype=np.float32)
    train_rows = np.asarray(prepared.serving_rows("train"), dtype=np.float32)
    scored = prepared.x_validation if len(validation) else prepared.x_train
    features = [str(f) for f in prepared.serving_features]
    reference = reference_from_data(
        train_rows, features, predict_booster(booster, scored, task), task=task,
        summary=reference_summary(prepared),
    )  # fmt: skip
    save_onnx_model(
        out, onnx_bytes, transform_module(prepared.transform),
        task="classification" if task == "classification" else "regression",
        features=features,
        classes=[str(c) for c in prepared.classes] if task == "classification" else (),
        reference=reference, input_name=ONNX_INPUT, output_name=output_name, parity=parity,
        modality=prepared.modality,
    )  # fmt: skip
    return out


def load_booster(model_dir: str | Path) -> lgb.Booster:
    """The forest of a model directory written by :func:`save_gbdt`."""
    import lightgbm as lgb

    path = Path(model_dir) / BOOSTER_FILE
    if not path.is_file():
        raise StepError(
            f"{path} is missing: {model_dir} is not a lightgbm model directory written by the "
            "train step",
            permanent=True,
        )
    return lgb.Booster(model_file=str(path))
