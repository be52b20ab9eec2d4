"""High-norm outlier tokens (Darcet et al. 2024, §2.1, Fig. 3–4).

Three rules give a norm threshold: a fixed value (the paper uses 150 for DINOv2-g), a percentile of patch norms
pooled over a dataset (the reproducibility study uses the 98th), or mean + k·σ. A patch is an outlier when its norm
is strictly above the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RULES = ("absolute", "percentile", "sigma")


def percentile_threshold(norms: torch.Tensor | Sequence[torch.Tensor], percentile: float = 98.0) -> float:
    """The `percentile`-th percentile of all given norms pooled together (e.g. every patch of a dataset)."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must lie in [0, 100], got {percentile}.")
    pooled = _pool(norms)
    return torch.quantile(pooled, percentile / 100.0).item()


def sigma_threshold(norms: torch.Tensor | Sequence[torch.Tensor], k: float = 3.0) -> float:
    """mean + k·σ of all given norms pooled together."""
    pooled = _pool(norms)
    return (pooled.mean() + k * pooled.std(unbiased=False)).item()


def _pool(norms) -> torch.Tensor:
    if isinstance(norms, torch.Tensor):
        pooled = norms.detach().float().flatten()
    else:
        pooled = torch.cat([torch.as_tensor(n).detach().float().flatten() for n in norms]) if len(norms) else None
    if pooled is None or pooled.numel() == 0:
        raise ValueError("No norms given: cannot compute an outlier threshold from an empty set.")
    if pooled.numel() > 16_000_000:  # torch.quantile's input limit; a fixed-stride subsample keeps it exact enough
        pooled = pooled[:: pooled.numel() // 16_000_000 + 1]
    return pooled


def outlier_threshold(
    norms: torch.Tensor | Sequence[torch.Tensor] | None = None,
    rule: str = "percentile",
    threshold: float | None = None,
    percentile: float = 98.0,
    k: float = 3.0,
) -> float:
    """The norm threshold under `rule`: `"absolute"` (returns `threshold`), `"percentile"` or `"sigma"` of `norms`."""
    if rule == "absolute":
        if threshold is None:
            raise ValueError("rule='absolute' needs a threshold value.")
        return float(threshold)
    if rule == "percentile":
        return percentile_threshold(norms, percentile)
    if rule == "sigma":
        return sigma_threshold(norms, k)
    raise ValueError(f"Unknown outlier rule {rule!r}; choose one of {RULES}.")


def outlier_mask(norms: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask of tokens whose norm is above `threshold` (same shape as `norms`)."""
    return norms > threshold


def outlier_fraction(mask: torch.Tensor) -> float:
    """Share of outlier tokens in a mask (≈2% of patches for DINOv2 in the paper)."""
    if mask.numel() == 0:
        raise ValueError("Empty mask: no tokens to count.")
    return mask.float().mean().item()


def separation_ratios(patch_norms_per_layer: torch.Tensor, final_mask: torch.Tensor) -> torch.Tensor:
    """Per depth, mean norm of the final-layer outliers divided by the mean norm of the other patches.

    `patch_norms_per_layer`: `(L+1, ..., N)` patch norms; `final_mask`: `(..., N)` outlier labels from the last layer.
    Returns `(L+1,)`; NaN where either group is empty.
    """
    mask = final_mask.bool()
    ratios = []
    for norms in patch_norms_per_layer:
        outliers, normal = norms[mask], norms[~mask]
        if outliers.numel() == 0 or normal.numel() == 0:
            ratios.append(float("nan"))
        else:
            ratios.append((outliers.float().mean() / normal.float().mean().clamp_min(1e-12)).item())
    return torch.tensor(ratios)


def first_separating_layer(
    patch_norms_per_layer: torch.Tensor, final_mask: torch.Tensor, min_ratio: float = 2.0
) -> int | None:
    """The first depth (0 = embeddings, l = output of layer l) from which the patches that are outliers at the last
    layer keep a mean norm at least `min_ratio` times that of the other patches (paper Fig. 4a: outliers appear
    around the middle of the network). `None` when they never separate or there are no outliers.
    """
    ratios = separation_ratios(patch_norms_per_layer, final_mask)
    separated = ratios >= min_ratio  # NaN compares False
    if not bool(separated[-1]):
        return None
    depth = len(ratios) - 1
    while depth > 0 and bool(separated[depth - 1]):
        depth -= 1
    return depth
