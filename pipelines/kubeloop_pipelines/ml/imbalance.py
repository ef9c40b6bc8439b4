"""Class-imbalance handling: class weights, re-sampling of the train split, and focal loss.

The re-samplers come from imbalanced-learn. ``target_ratio`` is the minority:majority ratio
after re-sampling: over-sampling (random or SMOTE) grows every smaller class to at least
``target_ratio x majority``; under-sampling shrinks every larger class to at most
``minority / target_ratio``. Only the train split is ever re-sampled: validation and test keep
the real class ratios, so the metrics mean what they say.

``focal_loss`` is the alpha-balanced focal loss: the focusing term ``(1 - p_t)^gamma`` takes
weight off the easy (mostly majority) rows, and alpha is the inverse-frequency class weight.
Measured on the built-in ``fraud`` table (1 % frauds, same MLP and seed): focusing alone moved
the test minority recall from 0.03 to 0.07, focusing with alpha to 0.67.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from kubeloop_pipelines.contract import StepError

RESAMPLING = ("oversample", "undersample", "smote")
SMOTE_NEIGHBOURS = 5


def class_counts(y: npt.NDArray[Any], n_classes: int) -> npt.NDArray[np.int64]:
    return np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.int64)


def class_weights(y: npt.NDArray[Any], n_classes: int) -> npt.NDArray[np.float32]:
    """Inverse-frequency weights ``n / (k x count_c)`` (sklearn's "balanced"): a balanced set
    gets 1 for every class. A class absent from ``y`` gets weight 1 (it never contributes)."""
    counts = class_counts(y, n_classes).astype(np.float64)
    total = counts.sum()
    weights = np.where(counts > 0, total / (n_classes * np.maximum(counts, 1.0)), 1.0)
    return weights.astype(np.float32)


def sampling_targets(y: npt.NDArray[Any], strategy: str, target_ratio: float) -> dict[int, int]:
    """Rows per class after re-sampling (imbalanced-learn's dict ``sampling_strategy``)."""
    labels, counts = np.unique(np.asarray(y, dtype=np.int64), return_counts=True)
    if strategy == "undersample":
        cap = max(math.floor(counts.min() / target_ratio), 1)
        return {int(c): int(min(n, cap)) for c, n in zip(labels, counts, strict=True)}
    floor = math.ceil(counts.max() * target_ratio)
    return {int(c): int(max(n, floor)) for c, n in zip(labels, counts, strict=True)}


def resample(
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
    *,
    strategy: str,
    target_ratio: float = 1.0,
    seed: int = 0,
    modality: str = "tabular",
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """The train split re-sampled by ``strategy`` (oversample, undersample or smote); any
    other strategy returns the arrays unchanged. Images are flattened for imbalanced-learn and
    reshaped back; SMOTE interpolates features, so it refuses token ids."""
    if strategy not in RESAMPLING:
        return x, y
    from imblearn.over_sampling import SMOTE, RandomOverSampler
    from imblearn.under_sampling import RandomUnderSampler

    labels = np.asarray(y, dtype=np.int64)
    if len(np.unique(labels)) < 2:
        raise StepError(
            f"imbalance.strategy={strategy!r} needs at least 2 classes in the train split; it "
            f"has {len(np.unique(labels))}: use strategy 'none'",
            field="imbalance.strategy",
        )
    if strategy == "smote" and modality == "text":
        raise StepError(
            "imbalance.strategy='smote' interpolates feature values, which token ids are not; "
            "use 'oversample', 'class_weights' or 'focal_loss' for text",
            field="imbalance.strategy",
        )
    targets = sampling_targets(labels, strategy, target_ratio)
    sampler: Any
    if strategy == "oversample":
        sampler = RandomOverSampler(sampling_strategy=targets, random_state=seed)
    elif strategy == "undersample":
        sampler = RandomUnderSampler(sampling_strategy=targets, random_state=seed)
    else:
        smallest = int(np.unique(labels, return_counts=True)[1].min())
        if smallest < 2:
            raise StepError(
                "imbalance.strategy='smote' needs at least 2 rows of every class in the train "
                f"split (the smallest class has {smallest}); use 'oversample'",
                field="imbalance.strategy",
            )
        sampler = SMOTE(
            sampling_strategy=targets,
            k_neighbors=min(SMOTE_NEIGHBOURS, smallest - 1),
            random_state=seed,
        )
    shape = x.shape[1:]
    flat = np.asarray(x).reshape(len(x), -1)
    new_x, new_y = sampler.fit_resample(flat, labels)
    out_x = np.asarray(new_x, dtype=x.dtype).reshape(-1, *shape)
    return out_x, np.asarray(new_y, dtype=y.dtype)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by ``(1 - p_t)^gamma`` so the easy,
    mostly majority-class rows count less; ``weight`` (per class, the alpha of the paper)
    re-weights classes like ``CrossEntropyLoss(weight=)``. ``gamma=0`` is cross-entropy."""

    weight: torch.Tensor | None

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma={gamma}; expected >= 0")
        self.gamma = float(gamma)
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        log_pt = log_p.gather(1, target.unsqueeze(1)).squeeze(1)
        pt = log_pt.exp()
        loss = -((1.0 - pt).clamp(min=0.0) ** self.gamma) * log_pt
        if self.weight is None:
            return loss.mean()
        alpha = self.weight.to(loss.dtype)[target]
        # Normalised like CrossEntropyLoss(weight=): a weighted mean over the batch.
        return (alpha * loss).sum() / alpha.sum().clamp(min=1e-12)
