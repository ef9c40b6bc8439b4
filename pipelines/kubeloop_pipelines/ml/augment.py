"""Training-time augmentation of network inputs (after the fitted transforms), per modality.

- images (n, C, H, W): a random rotation within ±``rotationDegrees``, a horizontal flip with
  probability 0.5 when ``flip``, a zoom by a factor within 1 ± ``scale`` (one affine warp via
  ``affine_grid``/``grid_sample``, borders replicated), then Gaussian noise of std
  ``imageNoise``;
- text (n, L) token ids: each token that has synonyms is swapped for a random one with
  probability ``synonymSwap`` (``transform.json["synonyms"]``, ids → ids);
- tabular (n, d): Gaussian noise of std ``tabularNoise`` (the inputs are already scaled).

All randomness comes from the caller's ``generator`` (reproducible runs); with every setting at
zero the input tensor itself is returned. Evaluation and serving never augment.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch.nn import functional

from kubeloop.api.training_run import Augmentation


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def _geometric(
    x: torch.Tensor, augmentation: Augmentation, generator: torch.Generator
) -> torch.Tensor:
    n = x.shape[0]
    limit = math.radians(augmentation.rotation_degrees)
    angle = _uniform(n, -limit, limit, generator)
    zoom = _uniform(n, 1 - augmentation.scale, 1 + augmentation.scale, generator)
    mirror = torch.ones(n, device=generator.device)
    if augmentation.flip:
        flipped = torch.rand(n, generator=generator, device=generator.device) < 0.5
        mirror = torch.where(flipped, -mirror, mirror)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # theta maps output coordinates to input ones: dividing by the zoom enlarges the content
    theta = torch.stack(
        [
            torch.stack([cos * mirror, -sin, torch.zeros_like(cos)], dim=1),
            torch.stack([sin * mirror, cos, torch.zeros_like(cos)], dim=1),
        ],
        dim=1,
    ).to(device=x.device, dtype=x.dtype)
    grid = functional.affine_grid(theta, list(x.shape), align_corners=False)
    return functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def _noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator, device=generator.device)
    return x + std * noise.to(device=x.device, dtype=x.dtype)


def _synonym_table(
    synonyms: Mapping[int, Sequence[int]], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(size, widest) table of synonym ids (padded with the id itself) and the count per id."""
    widest = max((len(v) for v in synonyms.values()), default=0)
    table = torch.arange(size).unsqueeze(1).repeat(1, max(widest, 1))
    counts = torch.zeros(size, dtype=torch.int64)
    for token, others in synonyms.items():
        if 0 <= token < size and others:
            table[token, : len(others)] = torch.tensor(list(others))
            counts[token] = len(others)
    return table, counts


def _swap_synonyms(
    x: torch.Tensor,
    probability: float,
    synonyms: Mapping[int, Sequence[int]],
    generator: torch.Generator,
) -> torch.Tensor:
    size = max(int(x.max().item()) + 1 if x.numel() else 0, max(synonyms, default=-1) + 1)
    table, counts = _synonym_table(synonyms, size)
    ids = x.to("cpu", torch.int64)
    available = counts[ids]
    coin = torch.rand(ids.shape, generator=generator, device=generator.device).cpu()
    pick = torch.rand(ids.shape, generator=generator, device=generator.device).cpu()
    choice = torch.clamp((pick * available).long(), max=table.shape[1] - 1)
    swapped = table[ids, choice]
    out = torch.where((available > 0) & (coin < probability), swapped, ids)
    return out.to(device=x.device, dtype=x.dtype)


def augment_batch(
    x: torch.Tensor,
    *,
    modality: str,
    augmentation: Augmentation,
    generator: torch.Generator,
    synonyms: Mapping[int, Sequence[int]] | None = None,
) -> torch.Tensor:
    """An augmented copy of the batch ``x`` (network inputs of ``modality``: image, text or
    tabular); ``x`` itself when nothing applies. ``synonyms`` maps token ids to synonym ids."""
    out = x
    if modality == "image":
        if augmentation.rotation_degrees > 0 or augmentation.flip or augmentation.scale > 0:
            out = _geometric(out, augmentation, generator)
        if augmentation.image_noise > 0:
            out = _noise(out, augmentation.image_noise, generator)
    elif modality == "text":
        if augmentation.synonym_swap > 0 and synonyms:
            out = _swap_synonyms(out, augmentation.synonym_swap, synonyms, generator)
    elif modality == "tabular":
        if augmentation.tabular_noise > 0:
            out = _noise(out, augmentation.tabular_noise, generator)
    else:
        raise ValueError(f"modality={modality!r}; expected 'image', 'text' or 'tabular'")
    return out
