"""Which trainer a model family uses, for the steps that train (tune, train): the networks'
loop (:mod:`kubeloop_pipelines.ml.train`) or gradient-boosted trees
(:mod:`kubeloop_pipelines.ml.gbdt`). Both trainers return a ``FitResult`` with a per-round
history, so tuning, progress and the learning curves read one type; each writes its own model
directory (``model.pt2`` or the ``onnx`` artifact)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kubeloop.api.training_run import TrainingRunSpec
from kubeloop_pipelines.ml.gbdt import GbdtFit, save_gbdt, train_gbdt
from kubeloop_pipelines.ml.models import apply_params
from kubeloop_pipelines.ml.preprocess import Prepared
from kubeloop_pipelines.ml.train import (
    EpochCallback,
    FitResult,
    history_metric,
    save_network,
    train_network,
)


def train_prepared(
    spec: TrainingRunSpec,
    prepared: Prepared,
    params: Mapping[str, Any],
    *,
    callback: EpochCallback | None = None,
    device: str | torch.device | None = None,
) -> FitResult:
    """Train the spec's model family on a prepared dataset with ``params`` (tuned
    hyperparameters, camelCase) applied."""
    model, imbalance = apply_params(spec.model, spec.imbalance, params)
    if model.family == "lightgbm":
        task = "classification" if prepared.task == "classification" else "regression"
        metric = history_metric(spec, task)
        return train_gbdt(spec, prepared, model, imbalance, metric=metric, callback=callback)
    return train_network(spec, prepared, params, callback=callback, device=device)


def save_trained(
    model_dir: str | Path,
    result: FitResult,
    *,
    prepared: Prepared,
    params: Mapping[str, Any],
) -> Path:
    """Write the model directory of ``result``, whichever trainer made it."""
    if isinstance(result, GbdtFit):
        return save_gbdt(model_dir, result, prepared=prepared, params=params)
    return save_network(model_dir, result, prepared=prepared, params=params)
