"""PCA views of patch features (Darcet et al. 2024, Fig. 20; DINOv2 Oquab et al. 2023, Fig. 1).

First three components → RGB; optional foreground by thresholding the first component, then a second PCA on the
foreground only; whitened first component clipped to ±3σ.
"""

from __future__ import annotations

import torch


def pca(features: torch.Tensor, n_components: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Principal components of `(N, D)` features (eigendecomposition of the smaller of the D x D covariance and the
    N x N Gram matrix of the centred data, in float64).

    Returns `(projections (N, k), components (k, D), explained_variance (k,))`. Signs are fixed so that each
    projection has positive skew (its heavy tail is positive), which makes maps comparable across runs.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (num_patches, dim), got {tuple(features.shape)}.")
    count, dim = features.shape
    if count < 2:
        raise ValueError("PCA needs at least 2 patches.")
    data = features.detach().double().cpu()
    centred = data - data.mean(0, keepdim=True)
    k = min(n_components, dim, count)
    if dim <= count:
        eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred)
        order = torch.argsort(eigenvalues, descending=True)[:k]
        components = eigenvectors[:, order].T
    else:
        eigenvalues, eigenvectors = torch.linalg.eigh(centred @ centred.T)
        order = torch.argsort(eigenvalues, descending=True)[:k]
        components = centred.T @ eigenvectors[:, order]
        components = (components / components.norm(dim=0).clamp_min(1e-300)).T
    projections = centred @ components.T
    skew = (projections**3).mean(0)
    sign = torch.where(skew < 0, -1.0, 1.0).to(projections.dtype)
    projections, components = projections * sign, components * sign[:, None]
    if k < n_components:  # fewer patches/dims than components asked: pad with zeros
        projections = torch.cat([projections, projections.new_zeros(count, n_components - k)], 1)
    variance = eigenvalues[order].clamp_min(0) / (count - 1)
    return projections.float(), components.float(), variance.float()


def _minmax(values: torch.Tensor) -> torch.Tensor:
    low, high = values.min(0).values, values.max(0).values
    return (values - low) / (high - low).clamp_min(1e-12)


def _grid(features: torch.Tensor, grid: tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int]]:
    if features.ndim == 3:
        grid = tuple(features.shape[:2])
        features = features.reshape(-1, features.shape[-1])
    if grid is None or grid[0] * grid[1] != features.shape[0]:
        raise ValueError(f"{features.shape[0]} patches do not fill the grid {grid}.")
    return features, grid


def foreground_mask(
    features: torch.Tensor, grid: tuple[int, int] | None = None, threshold: float = 0.0
) -> torch.Tensor:
    """Foreground patches `(h, w)`: first component (standardised) above `threshold` on one side.

    The side kept is the one covering fewer border patches (backgrounds touch the image border).
    """
    features, grid = _grid(features, grid)
    first = pca(features, 1)[0][:, 0]
    first = (first / first.std().clamp_min(1e-12)).reshape(grid)
    above = first > threshold
    border = torch.zeros(grid, dtype=torch.bool)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    above_share = above[border].float().mean()
    return above if above_share <= 0.5 else ~above


def pca_rgb(
    features: torch.Tensor,
    grid: tuple[int, int] | None = None,
    foreground: bool | torch.Tensor = False,
    threshold: float = 0.0,
) -> torch.Tensor:
    """First three PCA components of patch features as an RGB image `(h, w, 3)` in [0, 1] (min–max per channel).

    `features`: `(N, D)` with `grid`, or `(h, w, D)`. With `foreground=True` the foreground is found by
    [`foreground_mask`] (or pass a boolean `(h, w)` mask); a second PCA runs on the foreground patches only and the
    background is black.
    """
    features, grid = _grid(features, grid)
    if foreground is False or foreground is None:
        return _minmax(pca(features, 3)[0]).reshape(*grid, 3)
    mask = foreground_mask(features, grid, threshold) if foreground is True else foreground.reshape(grid).bool()
    rgb = torch.zeros(grid[0] * grid[1], 3)
    flat = mask.flatten()
    if int(flat.sum()) >= 2:
        rgb[flat] = _minmax(pca(features[flat], 3)[0])
    elif int(flat.sum()) == 1:
        rgb[flat] = 1.0
    return rgb.reshape(*grid, 3)


def whitened_first_component(
    features: torch.Tensor, grid: tuple[int, int] | None = None, clip: float = 3.0
) -> torch.Tensor:
    """First PCA component divided by its standard deviation, clipped to ±`clip` σ: `(h, w)` (paper Fig. 20)."""
    features, grid = _grid(features, grid)
    first = pca(features, 1)[0][:, 0]
    whitened = (first - first.mean()) / first.std().clamp_min(1e-12)
    return whitened.clamp(-clip, clip).reshape(grid)
