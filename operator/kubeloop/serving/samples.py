"""Sample models for the demo, the tests and the benchmarks: a real torch MLP trained on
scikit-learn's bundled breast-cancer data (30 features, 2 classes, seconds on a CPU), and two
bad canaries: an artifact that loads but fails at inference (the error-rate check rolls it
back) and one that answers every request but with shifted predictions (only the
prediction-shift check can tell)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from sklearn.datasets import load_breast_cancer

from kubeloop.contract.artifact import METADATA_FILE
from kubeloop.contract.reference import reference_from_data
from kubeloop.serving.artifact import save_model

CLASSES = ["malignant", "benign"]


@cache
def breast_cancer() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], list[str]]:
    data = load_breast_cancer()
    names = [str(n).replace(" ", "_") for n in data.feature_names]
    return data.data.astype(np.float32), data.target.astype(np.int64), names


def breast_cancer_rows(n: int, *, offset: int = 0) -> list[list[float]]:
    """``n`` raw (unscaled) rows of the data set, as a client would send them."""
    x, _, _ = breast_cancer()
    return [[float(v) for v in x[(offset + i) % len(x)]] for i in range(n)]


def mlp(n_in: int, n_out: int, hidden: int = 32) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, n_out),
    )


class Standardise(torch.nn.Module):
    """The fitted standard scaling in front of a network (raw rows in), as a served artifact
    applies it."""

    def __init__(self, mean: np.ndarray[Any, Any], scale: np.ndarray[Any, Any]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.get_buffer("mean")) / self.get_buffer("scale")


def train_tabular_model(
    directory: str | Path, *, seed: int = 0, epochs: int = 20, skewed: bool = False
) -> Path:
    """Train a real MLP (standard scaling, Adam, mini-batches) and save it as an artifact.

    ``skewed``: save it without its scaling, the classic training/serving skew (a preprocessing
    step lost on the way to production): it loads, answers every request with status 200 and
    plausible latency, and its predictions are shifted (see :func:`write_skewed_model`)."""
    torch.manual_seed(seed)
    x, y, names = breast_cancer()
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    xs = torch.from_numpy((x - mean) / scale)
    ys = torch.from_numpy(y)
    model = mlp(x.shape[1], len(CLASSES))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            optimiser.zero_grad()
            loss_fn(model(xs[idx]), ys[idx]).backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(xs), dim=1).numpy()
    reference = reference_from_data(x, names, probs, task="classification")
    return save_model(
        directory,
        model,
        task="classification",
        features=names,
        classes=CLASSES,
        mean=[0.0] * len(names) if skewed else mean.tolist(),
        scale=[1.0] * len(names) if skewed else scale.tolist(),
        reference=reference,
        check_rows=x,
    )


def write_skewed_model(directory: str | Path, *, seed: int = 0) -> Path:
    """A bad canary that no error or latency check catches: the breast-cancer MLP served
    without the standard scaling it was trained with, so raw values of hundreds reach a network
    that expects z-scores and its scores pile up at the extremes. Its ``model.json`` still
    carries the correct training reference, as a real skewed deployment would."""
    return train_tabular_model(directory, seed=seed, skewed=True)


def write_broken_model(directory: str | Path) -> Path:
    """An artifact that loads but fails every prediction: model.json declares the 30
    breast-cancer features, the exported program takes rows of 12 — it raises inside the model."""
    x, _, names = breast_cancer()
    narrow = [f"f{i}" for i in range(12)]
    out = save_model(
        directory,
        mlp(12, 2, hidden=8),
        task="classification",
        features=narrow,
        classes=CLASSES,
        mean=[0.0] * 12,
        scale=[1.0] * 12,
        reference={},
    )
    meta_path = out / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["features"] = names
    meta["preprocess"] = {"mean": x.mean(axis=0).tolist(), "scale": x.std(axis=0).tolist()}
    meta["reference"] = reference_from_data(x, names, np.full(len(x), 0.5), task="classification")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return out
