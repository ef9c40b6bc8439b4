"""The model families: an MLP for tables, a CNN and a small ResNet for images, a Transformer
encoder and recurrent networks (rnn, lstm, gru: ml/recurrent.py) for token sequences.

A model is described by an *arch*: a small JSON-able dict (family, input shape, outputs and the
family's hyperparameters) that :func:`arch_from` derives from the spec's ``model`` section plus
the tuned parameters, and :func:`build_model` turns back into a module. The arch is saved next
to the weights (``arch.json`` + ``state.pt``) so later steps rebuild the eager module exactly.

Every network maps a batch to logits ``(n, classes)`` (classification) or values ``(n, 1)``
(regression) and exports with ``torch.export`` with a dynamic batch dimension: no
data-dependent Python control flow in any ``forward``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from kubeloop.api.training_run import Imbalance, ModelSpec, TreeSpec
from kubeloop_pipelines.contract import StepError
from kubeloop_pipelines.ml.recurrent import RECURRENT_FAMILIES, RecurrentNetwork

FAMILIES = ("mlp", "cnn", "resnet", "transformer", *RECURRENT_FAMILIES)
PAD_ID = 0  # token id 0 pads text sequences (ml/text.py)

# Hyperparameters a search space may name: the camelCase fields of ``model`` (optionally as
# ``model.<name>``) and these of ``imbalance``. earlyStopping is a section, not a value;
# ``trees`` is one too, tuned field by field as ``trees.<name>`` (``model.trees.numLeaves``).
MODEL_PARAMS = tuple(
    info.alias or name
    for name, info in ModelSpec.model_fields.items()
    if name not in {"early_stopping", "trees"}
)
TREE_PARAMS = tuple(f"trees.{info.alias or name}" for name, info in TreeSpec.model_fields.items())
IMBALANCE_PARAMS = ("imbalance.focalGamma", "imbalance.targetRatio")
LIST_PARAMS = ("hiddenLayers", "channels")
TUNABLE_PARAMS = (*MODEL_PARAMS, *TREE_PARAMS, *IMBALANCE_PARAMS)


def param_key(name: str) -> str:
    """The canonical name of a hyperparameter: ``model.dropout`` → ``dropout``."""
    return name.removeprefix("model.")


def parse_param(name: str, value: Any) -> Any:
    """A search-space value as the spec field wants it: categorical values arrive as strings,
    so ``"64,32"`` becomes ``[64, 32]`` for a list field (scalars such as ``"0.1"`` or
    ``"true"`` are converted by the spec model's own validation)."""
    key = param_key(name)
    if key in LIST_PARAMS and isinstance(value, str):
        parts = [p.strip() for p in value.replace(";", ",").split(",") if p.strip()]
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise StepError(
                f"{name}={value!r} is not a list of widths; expected comma-separated integers "
                "such as '64,32'",
                field=f"model.{key}",
            ) from None
    if key in LIST_PARAMS and isinstance(value, int | float):
        return [int(value)]
    return value


def apply_params(
    model: ModelSpec, imbalance: Imbalance, params: Mapping[str, Any]
) -> tuple[ModelSpec, Imbalance]:
    """``model`` and ``imbalance`` with the tuned ``params`` (camelCase names) applied and
    validated by the same rules as the spec; unknown names and bad values raise StepError."""
    model_values: dict[str, Any] = {}
    imbalance_values: dict[str, Any] = {}
    tree_values: dict[str, Any] = {}
    for name, raw in params.items():
        key = param_key(name)
        if key in IMBALANCE_PARAMS:
            imbalance_values[key.removeprefix("imbalance.")] = raw
        elif key in TREE_PARAMS:
            tree_values[key.removeprefix("trees.")] = raw
        elif key == "trees":  # the whole section, as resolved_params writes params.json
            model_values[key] = raw
        elif key in MODEL_PARAMS:
            model_values[key] = parse_param(key, raw)
        else:
            raise StepError(
                f"hyperparameter {name!r} is not tunable; expected one of {list(TUNABLE_PARAMS)}",
                field="tuning.searchSpace",
            )
    try:
        merged = {**model.model_dump(by_alias=True), **model_values}
        if tree_values:
            merged["trees"] = {**(merged.get("trees") or {}), **tree_values}
        new_model = ModelSpec.model_validate(merged)
        new_imbalance = Imbalance.model_validate(
            {**imbalance.model_dump(by_alias=True), **imbalance_values}
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        section = "imbalance" if where in {"focalGamma", "targetRatio"} else "model"
        raise StepError(
            f"hyperparameter {where}={error.get('input')!r} is invalid: {error['msg']}",
            field=f"{section}.{where}",
        ) from None
    return new_model, new_imbalance


def arch_from(
    spec_model: ModelSpec,
    params: Mapping[str, Any],
    *,
    input_shape: Sequence[int],
    n_outputs: int,
    vocab_size: int = 0,
) -> dict[str, Any]:
    """The arch (JSON-able) of ``spec_model`` with ``params`` applied, for inputs of
    ``input_shape`` (without the batch: ``(d,)``, ``(C, H, W)`` or ``(L,)``) and ``n_outputs``
    outputs (classes, or 1 for regression)."""
    model, _ = apply_params(spec_model, Imbalance(), params)
    shape = [int(s) for s in input_shape]
    if n_outputs < 1:
        raise ValueError(f"n_outputs={n_outputs}; expected >= 1")
    arch: dict[str, Any] = {
        "family": model.family,
        "input_shape": shape,
        "n_outputs": int(n_outputs),
        "dropout": float(model.dropout),
        "batch_norm": bool(model.batch_norm),
    }
    if model.family == "mlp":
        if not model.hidden_layers or min(model.hidden_layers) < 1:
            raise StepError(
                f"model.hiddenLayers={model.hidden_layers}: expected at least one width >= 1",
                field="model.hiddenLayers",
            )
        arch["hidden_layers"] = [int(w) for w in model.hidden_layers]
    elif model.family in ("cnn", "resnet"):
        if len(shape) != 3:
            raise StepError(
                f"model.family={model.family!r} needs images (input shape (C, H, W)); the "
                f"prepared data has shape {tuple(shape)}: use family 'mlp' for tables or "
                "'transformer' for text",
                field="model.family",
            )
        if not model.channels or min(model.channels) < 1:
            raise StepError(
                f"model.channels={model.channels}: expected at least one channel count >= 1",
                field="model.channels",
            )
        arch["channels"] = [int(c) for c in model.channels]
    elif model.family == "transformer":
        if len(shape) != 1 or vocab_size < 2:
            raise StepError(
                f"model.family='transformer' needs token sequences (input shape (L,) and a "
                f"vocabulary); the prepared data has shape {tuple(shape)} and vocab_size="
                f"{vocab_size}: use 'mlp' for tables or 'cnn'/'resnet' for images",
                field="model.family",
            )
        if model.embedding_dim % model.heads:
            raise StepError(
                f"model.embeddingDim={model.embedding_dim} is not divisible by model.heads="
                f"{model.heads}; pick heads that divide the width",
                field="model.heads",
            )
        arch.update(
            vocab_size=int(vocab_size),
            embedding_dim=int(model.embedding_dim),
            heads=int(model.heads),
            layers=int(model.layers),
        )
    elif model.family in RECURRENT_FAMILIES:
        # The data layer has no numeric-sequence modality (yet): recurrent families read text.
        if len(shape) != 1 or vocab_size < 2:
            raise StepError(
                f"model.family={model.family!r} needs token sequences (text: input shape (L,) "
                f"and a vocabulary); the prepared data has shape {tuple(shape)} and vocab_size="
                f"{vocab_size}: use 'mlp' for tables or 'cnn'/'resnet' for images",
                field="model.family",
            )
        arch.update(
            vocab_size=int(vocab_size),
            embedding_dim=int(model.embedding_dim),
            hidden_size=int(model.hidden_size),
            layers=int(model.layers),
            bidirectional=bool(model.bidirectional),
        )
    return arch


# --- the networks ------------------------------------------------------------------------


class MLP(nn.Module):
    """Linear → [BatchNorm] → ReLU → Dropout per hidden layer, then a linear head. Inputs of
    any shape are flattened, so an MLP also takes images."""

    def __init__(
        self, n_in: int, hidden: Sequence[int], n_out: int, *, dropout: float, batch_norm: bool
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = n_in
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if batch_norm:
                layers.append(nn.BatchNorm1d(size))
            layers += [nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def _norm2d(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class CNN(nn.Module):
    """Per stage: conv3x3 → [BatchNorm] → ReLU → conv3x3 → [BatchNorm] → ReLU → 2x2 max-pool
    (while the map is at least 4 pixels wide, so 8x8 digits keep 2x2 at the end); then the
    flattened final map → Dropout → linear head."""

    def __init__(
        self, shape: Sequence[int], channels: Sequence[int], n_out: int, *, dropout: float,
        batch_norm: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        in_ch, height, width = shape
        layers: list[nn.Module] = []
        for ch in channels:
            layers += [
                nn.Conv2d(in_ch, ch, 3, padding=1, bias=not batch_norm),
                _norm2d(ch, batch_norm),
                nn.ReLU(),
                nn.Conv2d(ch, ch, 3, padding=1, bias=not batch_norm),
                _norm2d(ch, batch_norm),
                nn.ReLU(),
            ]
            if min(height, width) >= 4:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            in_ch = ch
        # A small final map is flattened (where things are matters for digits); a large one is
        # averaged first so the head stays small.
        pooled = height * width > 16
        if pooled:
            layers.append(nn.AdaptiveAvgPool2d(4))
            height = width = 4
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_ch * height * width, n_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x))
        return out


class ResidualBlock(nn.Module):
    """The ResNet basic block: two conv3x3 with a shortcut (1x1 conv when the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=not batch_norm)
        self.bn1 = _norm2d(out_ch, batch_norm)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=not batch_norm)
        self.bn2 = _norm2d(out_ch, batch_norm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=not batch_norm),
                _norm2d(out_ch, batch_norm),
            )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = self.relu(out + self.shortcut(x))
        return result


class ResNet(nn.Module):
    """A stem conv, one residual block per entry of ``channels`` (stride 2 from the second on,
    while the map is at least 4 pixels wide), global average pooling, Dropout, linear head."""

    def __init__(
        self, shape: Sequence[int], channels: Sequence[int], n_out: int, *, dropout: float,
        batch_norm: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        in_ch, height, width = shape
        first = channels[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_ch, first, 3, padding=1, bias=not batch_norm),
            _norm2d(first, batch_norm),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        ch = first
        for i, out_ch in enumerate(channels):
            stride = 2 if i > 0 and min(height, width) >= 4 else 1
            blocks.append(ResidualBlock(ch, out_ch, stride=stride, batch_norm=batch_norm))
            height, width = (height + 1) // stride, (width + 1) // stride
            ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(ch, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(x)).mean(dim=(2, 3))
        out: torch.Tensor = self.head(features)
        return out


class TextTransformer(nn.Module):
    """Token embedding + learned positions → ``nn.TransformerEncoder`` (pre-norm) → mean over
    the non-pad tokens → Dropout → linear head. Token id 0 is padding. Takes int64 ids or the
    same ids as floats (the serving artifact carries rows of floats)."""

    position_ids: torch.Tensor
    first_token: torch.Tensor

    def __init__(
        self, vocab_size: int, max_len: int, n_out: int, *, dim: int, heads: int, layers: int,
        dropout: float,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        self.positions = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True,
            norm_first=True,
        )  # fmt: skip
        # No nested tensors: they make the encoder's output shape depend on the data.
        self.encoder = nn.TransformerEncoder(
            layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_out))
        self.register_buffer("position_ids", torch.arange(max_len).unsqueeze(0), persistent=False)
        first = torch.zeros(1, max_len, dtype=torch.bool)
        first[0, 0] = True
        self.register_buffer("first_token", first, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.long()
        pad = tokens == PAD_ID
        # A row of padding only would attend to nothing (NaN): let it attend to its first slot.
        pad = pad & ~(pad.all(dim=1, keepdim=True) & self.first_token)
        hidden = self.embed(tokens) + self.positions(self.position_ids)
        hidden = self.encoder(hidden, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        out: torch.Tensor = self.head(pooled)
        return out


class Rescale(nn.Module):
    """Regression output in the target's units: the network learns standardised targets."""

    def __init__(self, network: nn.Module, mean: float, scale: float) -> None:
        super().__init__()
        self.network = network
        self.mean = float(mean)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.network(x) * self.scale + self.mean
        return out


def build_model(arch: Mapping[str, Any]) -> nn.Module:
    """A fresh (randomly initialised) module for ``arch`` (see :func:`arch_from`)."""
    family = arch.get("family")
    shape = [int(s) for s in arch["input_shape"]]
    n_out = int(arch["n_outputs"])
    dropout = float(arch.get("dropout", 0.0))
    batch_norm = bool(arch.get("batch_norm", True))
    network: nn.Module
    if family == "mlp":
        n_in = 1
        for s in shape:
            n_in *= s
        network = MLP(n_in, arch["hidden_layers"], n_out, dropout=dropout, batch_norm=batch_norm)
    elif family == "cnn":
        network = CNN(shape, arch["channels"], n_out, dropout=dropout, batch_norm=batch_norm)
    elif family == "resnet":
        network = ResNet(shape, arch["channels"], n_out, dropout=dropout, batch_norm=batch_norm)
    elif family == "transformer":
        network = TextTransformer(
            int(arch["vocab_size"]), shape[0], n_out, dim=int(arch["embedding_dim"]),
            heads=int(arch["heads"]), layers=int(arch["layers"]), dropout=dropout,
        )  # fmt: skip
    elif family in RECURRENT_FAMILIES:
        network = RecurrentNetwork(
            str(family), int(arch["vocab_size"]), n_out,
            embedding_dim=int(arch["embedding_dim"]), hidden_size=int(arch["hidden_size"]),
            layers=int(arch["layers"]), bidirectional=bool(arch["bidirectional"]),
            dropout=dropout,
        )  # fmt: skip
    else:
        raise StepError(
            f"model.family={family!r} is not supported; expected one of {list(FAMILIES)}",
            field="model.family",
        )
    if "target_mean" in arch or "target_scale" in arch:
        network = Rescale(
            network, float(arch.get("target_mean", 0.0)), float(arch.get("target_scale", 1.0))
        )
    return network
