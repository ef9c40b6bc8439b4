"""Explanations of a trained model in terms of the features serving receives.

Every attribution is computed through ``model = Sequential(transform, net)``: the fitted
input transforms followed by the network, so inputs are *raw serving rows* and attributions
are per serving feature (a raw column, a pixel, a token position) with no mapping back
needed. Classification attributions explain the predicted class of each row; regression ones
the predicted value.

Global importance (one number per feature, higher = more important):

- ``permutation``: how much the metric worsens (accuracy drop, or MSE increase for
  regression) when one feature's column is shuffled across the rows, averaged over repeats;
  image pixels are shuffled in patches (so neighbouring pixels cannot stand in for each other);
- ``shap``: mean absolute GradientShap value (expected gradients, baselines drawn from the
  training rows), the SHAP-style attribution of differentiable models;
- ``integrated_gradients``: mean absolute Integrated Gradients attribution (baseline: the mean
  training row);
- ``gradcam`` (images only): Grad-CAM on the network's last Conv2d, up-sampled to the image.

Per-sample attributions are Integrated Gradients for tabular and image data. Text models take
token ids, which have no gradient: their attributions are computed on the token embedding
layer (LayerIntegratedGradients / LayerGradientShap, summed over the embedding), the
permutation method becomes token occlusion (replace a token by padding), and global importance
is aggregated per token id (word) instead of per position.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from kubeloop_pipelines.ml.evaluate import compute_metrics, figure_png, new_figure

METHODS = ("none", "shap", "permutation", "integrated_gradients", "gradcam")
MAX_GLOBAL_ROWS = 1000  # rows used for global importance
MAX_SAMPLES = 1000  # rows that get per-sample attributions
TOP_FEATURES = 15
IG_STEPS = 32
SHAP_SAMPLES = 16
PERMUTATION_REPEATS = 5
PAD_ID = 0


@dataclass
class Explanation:
    """What :func:`explain` found: global importance per feature and per-sample attributions."""

    method: str
    features: list[str]  # serving features (or token words for text)
    importance: npt.NDArray[np.float64]  # one per feature, higher = more important
    importance_label: str  # what the numbers are, e.g. "accuracy drop when shuffled"
    sample_attributions: npt.NDArray[np.float64]  # (k, d) per serving feature
    sample_rows: npt.NDArray[np.float32]  # (k, d) the raw rows explained
    sample_labels: list[str]  # the predicted class (or value) of each
    heatmaps: npt.NDArray[np.float64] | None = None  # (k, H, W): images (Grad-CAM or |IG|)
    sample_tokens: list[list[str]] | None = None  # text: the word at each position
    notes: list[str] = field(default_factory=list)
    sample_method: str = "Integrated Gradients"  # what the per-sample attributions are

    def ranking(self) -> list[tuple[str, float]]:
        """Features by decreasing importance."""
        order = np.argsort(-self.importance, kind="stable")
        return [(self.features[i], float(self.importance[i])) for i in order]


def _outputs(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(rows[i : i + 2048]) for i in range(0, len(rows), 2048)])


def _targets(model: nn.Module, rows: torch.Tensor, task: str) -> torch.Tensor | None:
    """The predicted class of each row (None for regression: the single output)."""
    if task != "classification":
        return None
    return _outputs(model, rows).argmax(dim=1)


def _score(task: str, classes: Sequence[str], y: npt.NDArray[Any], out: torch.Tensor) -> float:
    """Higher is better: accuracy, or minus the MSE for regression."""
    if task == "classification":
        return compute_metrics(task, y, torch.softmax(out, 1).numpy(), classes=classes)["accuracy"]
    return -compute_metrics(task, y, out.reshape(-1).numpy())["mse"]


def feature_groups(n_features: int, image_shape: Sequence[int] | None) -> list[list[int]]:
    """Columns shuffled together by permutation importance: one per feature, or square patches
    of about a seventh of the side for images (8x8 digits: single pixels stay 1x1 patches)."""
    if not image_shape or len(image_shape) != 3:
        return [[j] for j in range(n_features)]
    channels, height, width = (int(s) for s in image_shape)
    patch = max(1, min(height, width) // 7) if min(height, width) > 8 else 1
    groups = []
    for top in range(0, height, patch):
        for left in range(0, width, patch):
            groups.append(
                [
                    c * height * width + r * width + col
                    for c in range(channels)
                    for r in range(top, min(top + patch, height))
                    for col in range(left, min(left + patch, width))
                ]
            )
    return groups


def permutation_importance(
    model: nn.Module,
    rows: npt.NDArray[Any],
    y: npt.NDArray[Any],
    *,
    task: str,
    classes: Sequence[str] = (),
    groups: Sequence[Sequence[int]] | None = None,
    repeats: int = PERMUTATION_REPEATS,
    seed: int = 0,
) -> npt.NDArray[np.float64]:
    """Per feature: the mean drop of accuracy (classification) or rise of MSE (regression)
    when its column (or its group's columns, jointly) is shuffled across the rows."""
    x = torch.as_tensor(np.ascontiguousarray(rows), dtype=torch.float32)
    labels = np.asarray(y)
    base = _score(task, classes, labels, _outputs(model, x))
    generator = torch.Generator().manual_seed(seed)
    groups = groups or [[j] for j in range(x.shape[1])]
    importance = np.zeros(x.shape[1], dtype=np.float64)
    for group in groups:
        drops = []
        for _ in range(repeats):
            shuffled = x.clone()
            order = torch.randperm(len(x), generator=generator)
            shuffled[:, group] = x[order][:, group]
            drops.append(base - _score(task, classes, labels, _outputs(model, shuffled)))
        importance[list(group)] = float(np.mean(drops))
    return importance


def integrated_gradients(
    model: nn.Module,
    rows: npt.NDArray[Any],
    *,
    baseline: npt.NDArray[Any],
    target: torch.Tensor | None,
    steps: int = IG_STEPS,
) -> npt.NDArray[np.float64]:
    """Integrated Gradients of each row, from ``baseline`` (one row), shape (n, d)."""
    from captum.attr import IntegratedGradients

    x = torch.as_tensor(np.ascontiguousarray(rows), dtype=torch.float32)
    base = torch.as_tensor(np.asarray(baseline, dtype=np.float32)).reshape(1, -1)
    ig = IntegratedGradients(model)
    attr = ig.attribute(x, baselines=base, target=target, n_steps=steps, internal_batch_size=4096)
    return np.asarray(attr.detach().numpy(), dtype=np.float64)


def gradient_shap(
    model: nn.Module,
    rows: npt.NDArray[Any],
    *,
    background: npt.NDArray[Any],
    target: torch.Tensor | None,
    samples: int = SHAP_SAMPLES,
    seed: int = 0,
) -> npt.NDArray[np.float64]:
    """GradientShap (expected gradients) of each row against ``background`` rows, (n, d)."""
    from captum.attr import GradientShap

    torch.manual_seed(seed)
    x = torch.as_tensor(np.ascontiguousarray(rows), dtype=torch.float32)
    base = torch.as_tensor(np.ascontiguousarray(background), dtype=torch.float32)
    attr = GradientShap(model).attribute(x, baselines=base, target=target, n_samples=samples)
    return np.asarray(attr.detach().numpy(), dtype=np.float64)


def last_conv(net: nn.Module) -> nn.Conv2d | None:
    """The network's last Conv2d (in module order), the layer Grad-CAM explains."""
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def gradcam(
    model: nn.Module,
    layer: nn.Module,
    rows: npt.NDArray[Any],
    *,
    image_shape: Sequence[int],
    target: torch.Tensor | None,
) -> npt.NDArray[np.float64]:
    """Grad-CAM heat maps of ``layer`` (positive evidence only), up-sampled to the image:
    shape (n, H, W), each scaled to a maximum of 1."""
    from captum.attr import LayerAttribution, LayerGradCam

    x = torch.as_tensor(np.ascontiguousarray(rows), dtype=torch.float32)
    cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    height, width = int(image_shape[-2]), int(image_shape[-1])
    maps = LayerAttribution.interpolate(cam.detach(), (height, width), interpolate_mode="bilinear")
    maps = maps.reshape(len(x), height, width).clamp(min=0)
    peak = maps.flatten(1).amax(dim=1).clamp(min=1e-12).reshape(-1, 1, 1)
    return np.asarray((maps / peak).numpy(), dtype=np.float64)


# --- text ---------------------------------------------------------------------------------


def token_embedding(net: nn.Module) -> nn.Embedding | None:
    """The token embedding of a text network (its first nn.Embedding)."""
    return next((m for m in net.modules() if isinstance(m, nn.Embedding)), None)


def text_attributions(
    model: nn.Module,
    embedding: nn.Module,
    rows: npt.NDArray[Any],
    *,
    method: str,
    target: torch.Tensor | None,
) -> npt.NDArray[np.float64]:
    """Per-position attributions of token-id rows (n, L): Integrated Gradients or GradientShap
    on the embedding layer summed over the embedding (baseline: all padding), or occlusion
    (the output drop when the token becomes padding) for ``permutation``. Padding gets 0."""
    x = torch.as_tensor(np.ascontiguousarray(rows), dtype=torch.float32)
    if method == "permutation":

        def chosen_output(inputs: torch.Tensor) -> torch.Tensor:
            out = _outputs(model, inputs)
            return out[:, 0] if target is None else out.gather(1, target.reshape(-1, 1))[:, 0]

        full = chosen_output(x)
        attr = torch.zeros_like(x)
        for pos in range(x.shape[1]):
            occluded = x.clone()
            occluded[:, pos] = PAD_ID
            attr[:, pos] = full - chosen_output(occluded)
    else:
        from captum.attr import LayerGradientShap, LayerIntegratedGradients

        base = torch.full_like(x, PAD_ID)
        if method == "shap":
            attr = LayerGradientShap(model, embedding).attribute(
                x, baselines=base, target=target, n_samples=SHAP_SAMPLES
            )
        else:
            attr = LayerIntegratedGradients(model, embedding).attribute(
                x, baselines=base, target=target, n_steps=IG_STEPS
            )
        attr = attr.detach().sum(dim=-1)
    attr = torch.where(x == PAD_ID, torch.zeros_like(attr), attr)
    return np.asarray(attr.numpy(), dtype=np.float64)


def importance_by_token(
    rows: npt.NDArray[Any], attributions: npt.NDArray[np.float64], vocabulary: Sequence[str]
) -> tuple[list[str], npt.NDArray[np.float64]]:
    """Mean |attribution| of each token id over its occurrences: (words, importance)."""
    ids = np.asarray(rows, dtype=np.int64).reshape(-1)
    values = np.abs(attributions).reshape(-1)
    keep = ids != PAD_ID
    totals = np.bincount(ids[keep], weights=values[keep], minlength=len(vocabulary))
    counts = np.bincount(ids[keep], minlength=len(vocabulary))
    mean = np.where(counts > 0, totals / np.maximum(counts, 1), 0.0)
    words = [vocabulary[i] if i < len(vocabulary) else f"token_{i}" for i in range(len(mean))]
    return words, mean


# --- one call ----------------------------------------------------------------------------


def fill_missing(
    rows: npt.NDArray[np.float32], reference: npt.NDArray[Any]
) -> npt.NDArray[np.float32]:
    """``rows`` with missing values (NaN) replaced by the column medians of ``reference``
    (0 for an all-missing column): gradients cannot pass through a NaN."""
    missing = np.isnan(rows)
    if not missing.any():
        return rows
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column
        medians = np.nan_to_num(np.nanmedian(np.asarray(reference, dtype=np.float64), axis=0))
    filled = rows.copy()
    filled[missing] = np.take(medians, np.nonzero(missing)[1])
    return filled


@dataclass
class _Inputs:
    """What every method needs: the rows, their labels and predictions."""

    model: nn.Module
    method: str
    task: str
    classes: Sequence[str]
    data: npt.NDArray[np.float32]  # rows for global importance
    labels: npt.NDArray[Any]
    chosen: npt.NDArray[np.float32]  # rows for per-sample attributions
    target: torch.Tensor | None  # their predicted classes
    predicted: list[str]
    background: npt.NDArray[np.float32]
    seed: int


def _explain_text(
    inp: _Inputs, embedding: nn.Module | None, vocabulary: Sequence[str]
) -> Explanation:
    if embedding is None:
        raise ValueError("a text model needs its token embedding layer to be explained")
    per_sample = text_attributions(
        inp.model, embedding, inp.chosen, method=inp.method, target=inp.target
    )
    names, importance = importance_by_token(inp.chosen, per_sample, vocabulary)
    label = {
        "permutation": "mean output drop when the token is replaced by padding",
        "shap": "mean |GradientShap| on the token embedding",
    }.get(inp.method, "mean |Integrated Gradients| on the token embedding")
    tokens = [[names[int(t)] if 0 <= int(t) < len(names) else str(int(t)) for t in row]
              for row in inp.chosen]  # fmt: skip
    return Explanation(
        inp.method, names, importance, label, per_sample, inp.chosen, inp.predicted,
        sample_tokens=tokens,
        notes=["text: attributions per token position, aggregated per word"],
    )  # fmt: skip


def _global_importance(
    inp: _Inputs, per_sample: npt.NDArray[np.float64], groups: list[list[int]]
) -> tuple[npt.NDArray[np.float64], str]:
    if inp.method == "permutation":
        importance = permutation_importance(
            inp.model, inp.data, inp.labels, task=inp.task, classes=inp.classes, groups=groups,
            seed=inp.seed,
        )  # fmt: skip
        metric = "accuracy drop" if inp.task == "classification" else "MSE increase"
        return importance, f"{metric} when the feature is shuffled ({PERMUTATION_REPEATS} repeats)"
    if inp.method == "shap":
        rng = np.random.default_rng(inp.seed)
        size = min(len(inp.background), 100)
        background = inp.background[rng.choice(len(inp.background), size=size, replace=False)]
        shap = gradient_shap(
            inp.model, inp.chosen, background=background, target=inp.target, seed=inp.seed
        )
        return np.abs(shap).mean(axis=0), "mean |SHAP| (GradientShap, training rows as background)"
    return (
        np.abs(per_sample).mean(axis=0),
        "mean |Integrated Gradients| (baseline: the mean training row)",
    )


def explain(
    model: nn.Module,
    *,
    method: str,
    task: str,
    features: Sequence[str],
    classes: Sequence[str],
    rows: npt.NDArray[Any],
    y: npt.NDArray[Any],
    background: npt.NDArray[Any],
    samples: int,
    modality: str = "tabular",
    image_shape: Sequence[int] | None = None,
    conv_layer: nn.Module | None = None,
    embedding: nn.Module | None = None,
    vocabulary: Sequence[str] = (),
    seed: int = 0,
) -> Explanation:
    """Explain ``model`` (raw serving rows in → logits/values out) on the test ``rows``.

    ``background`` are training rows (SHAP baselines, the IG baseline is their mean); the first
    ``samples`` rows (at most 1000) get per-sample attributions. Missing values are replaced by
    the training medians first (gradients cannot pass through NaN). Images need
    ``image_shape`` (C, H, W) and, for Grad-CAM, ``conv_layer``; text needs the token
    ``embedding`` layer and the ``vocabulary`` (word of each token id)."""
    model = model.eval()
    bg = np.asarray(background, dtype=np.float32)
    data = fill_missing(np.asarray(rows, dtype=np.float32)[:MAX_GLOBAL_ROWS], bg)
    k = max(1, min(samples, MAX_SAMPLES, len(data)))
    targets = _targets(model, torch.as_tensor(data), task)
    out = _outputs(model, torch.as_tensor(data[:k]))
    inp = _Inputs(
        model=model, method=method, task=task, classes=classes, data=data,
        labels=np.asarray(y)[:MAX_GLOBAL_ROWS], chosen=data[:k],
        target=None if targets is None else targets[:k],
        predicted=[str(classes[int(i)]) for i in out.argmax(1)] if task == "classification"
        else [f"{float(v):.4g}" for v in out.reshape(-1)],
        background=fill_missing(bg, bg), seed=seed,
    )  # fmt: skip
    if modality == "text":
        return _explain_text(inp, embedding, vocabulary)

    image = tuple(int(s) for s in image_shape) if modality == "image" and image_shape else None
    per_sample = integrated_gradients(
        model, inp.chosen, baseline=inp.background.mean(axis=0), target=inp.target
    )
    importance, label = _global_importance(inp, per_sample, feature_groups(data.shape[1], image))
    heatmaps = None
    if image is not None:
        channels, height, width = image
        if method == "gradcam" and conv_layer is not None:
            heatmaps = gradcam(model, conv_layer, inp.chosen, image_shape=image, target=inp.target)
            importance = np.tile(heatmaps.mean(axis=0).reshape(-1), channels)
            label = "mean Grad-CAM activation (last conv layer) per pixel"
        else:
            heatmaps = np.abs(per_sample).reshape(k, channels, height, width).sum(axis=1)
    importance = np.nan_to_num(np.asarray(importance, dtype=np.float64), nan=0.0)
    return Explanation(
        method, list(features), importance, label, per_sample, inp.chosen, inp.predicted,
        heatmaps,
    )  # fmt: skip


# --- plots -------------------------------------------------------------------------------


def plot_importance(explanation: Explanation, top: int = TOP_FEATURES) -> bytes:
    """Horizontal bars of the ``top`` most important features."""
    ranking = explanation.ranking()[:top]
    fig, ax = new_figure(7.0, 0.8 + 0.3 * len(ranking))
    ax.barh([name for name, _ in reversed(ranking)], [v for _, v in reversed(ranking)])
    ax.set_xlabel(explanation.importance_label, fontsize=8)
    ax.set_title(f"Top features ({explanation.method})")
    return figure_png(fig)


def plot_samples(explanation: Explanation, top: int = 10, rows: int = 12) -> bytes:
    """Per-sample attributions: a heatmap of samples x the ``top`` global features."""
    ranking = [explanation.features.index(n) for n, _ in explanation.ranking()[:top]]
    attr = explanation.sample_attributions[:rows][:, ranking]
    fig, ax = new_figure(1.5 + 0.6 * len(ranking), 1.2 + 0.35 * len(attr))
    bound = float(np.abs(attr).max()) or 1.0
    image = ax.imshow(attr, cmap="coolwarm", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(ranking)), [explanation.features[i] for i in ranking], rotation=45,
                  ha="right", fontsize=7)  # fmt: skip
    ax.set_yticks(range(len(attr)), explanation.sample_labels[: len(attr)], fontsize=7)
    ax.set_ylabel("sample (predicted)")
    fig.colorbar(image, ax=ax, label="attribution")
    ax.set_title(f"Per-sample attributions ({explanation.sample_method})")
    return figure_png(fig)


def plot_heatmaps(explanation: Explanation, image_shape: Sequence[int], count: int = 8) -> bytes:
    """Images with their heat maps overlaid (Grad-CAM or |IG|), ``count`` at most."""
    assert explanation.heatmaps is not None
    maps = explanation.heatmaps[:count]
    channels, height, width = (int(s) for s in image_shape)
    cols = len(maps)
    fig, axes = new_figure(1.6 * cols, 2.0, ncols=cols)
    axes = np.atleast_1d(axes)
    for i, ax in enumerate(axes):
        image = explanation.sample_rows[i].reshape(channels, height, width).mean(axis=0)
        ax.imshow(image, cmap="gray")
        ax.imshow(maps[i], cmap="jet", alpha=0.5)
        ax.set_title(explanation.sample_labels[i], fontsize=8)
        ax.axis("off")
    return figure_png(fig)


def top_contributions(explanation: Explanation, count: int = 3) -> list[list[str]]:
    """For each sample: its prediction and the ``count`` features that pushed it most."""
    table = []
    for i, attr in enumerate(explanation.sample_attributions[:20]):
        names = (
            explanation.sample_tokens[i]
            if explanation.sample_tokens is not None
            else explanation.features
        )
        order = np.argsort(-np.abs(attr))[:count]
        parts = [f"{names[j]} ({attr[j]:+.3g})" for j in order if math.isfinite(attr[j])]
        table.append([str(i), explanation.sample_labels[i], ", ".join(parts)])
    return table
