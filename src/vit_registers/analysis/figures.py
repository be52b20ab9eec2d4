"""Matplotlib figures shared by the CLI and the Space: norm map + histogram, attention grid, PCA, LOST box.

Figures are built with `matplotlib.figure.Figure` (no pyplot state, safe in servers and threads).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

CMAP = "viridis"


def _array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().float().numpy()
    return np.asarray(image)


def _hide_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _show_map(ax, values, extent_image=None, **kwargs):
    values = _array(values)
    if extent_image is not None:
        height, width = _array(extent_image).shape[:2]
        return ax.imshow(values, extent=(0, width, height, 0), interpolation="nearest", **kwargs)
    return ax.imshow(values, interpolation="nearest", **kwargs)


def norm_figure(image, norm_map, norms=None, threshold: float | None = None, title: str = "") -> Figure:
    """Image | patch norm map (last layer, before the final norm) | histogram of patch norms with the threshold."""
    norm_map = _array(norm_map)
    values = norm_map.flatten() if norms is None else _array(norms).flatten()
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(_array(image))
    axes[0].set_title("input")
    im = _show_map(axes[1], norm_map, image, cmap=CMAP)
    axes[1].set_title("patch norms")
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    if threshold is not None:
        outliers = norm_map > threshold
        rows, cols = np.nonzero(outliers)
        height, width = _array(image).shape[:2]
        sy, sx = height / norm_map.shape[0], width / norm_map.shape[1]
        axes[1].scatter((cols + 0.5) * sx, (rows + 0.5) * sy, s=12, facecolors="none", edgecolors="red", linewidths=1)
    for ax in axes[:2]:
        _hide_axes(ax)
    axes[2].hist(values, bins=min(100, max(10, values.size // 4)), color="tab:blue", log=True)
    if threshold is not None:
        share = float((values > threshold).mean()) * 100
        axes[2].axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:.3g} ({share:.1f}% above)")
        axes[2].legend(loc="upper right", fontsize=8)
    axes[2].set_xlabel("token norm")
    axes[2].set_ylabel("patches")
    if title:
        fig.suptitle(title)
    return fig


def _tile(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A map min–max scaled, coloured with the colormap and upsampled (nearest) to `size` `(H, W)`: `(H, W, 3)`."""
    values = values.astype(np.float64)
    low, high = values.min(), values.max()
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    rows = (np.arange(size[0]) * values.shape[0]) // size[0]
    cols = (np.arange(size[1]) * values.shape[1]) // size[1]
    return colormaps[CMAP](scaled[rows][:, cols])[..., :3]


def attention_figure(image, maps: Mapping[str, torch.Tensor], title: str = "", max_heads: int = 16) -> Figure:
    """Grid: one row per token (CLS, each register); columns = input, head mean, then each head (≤ `max_heads`).

    Each map is min–max scaled on its own (viridis) and shown at the image's size; drawn as one mosaic (fast).
    """
    if not maps:
        raise ValueError("No attention maps to draw (the model has neither CLS nor registers).")
    picture = _array(image).astype(np.float64)
    picture = picture / 255.0 if picture.max() > 1.0 else picture
    height, width = picture.shape[:2]
    heads = min(max_heads, next(iter(maps.values())).shape[0])
    columns = ["input", "mean"] + [f"head {h}" for h in range(heads)]
    gap = max(2, width // 28)
    mosaic = np.ones((len(maps) * (height + gap) - gap, len(columns) * (width + gap) - gap, 3))
    for row, per_head in enumerate(maps.values()):
        per_head = _array(per_head)
        tiles = [picture[..., :3], _tile(per_head.mean(0), (height, width))]
        tiles += [_tile(per_head[h], (height, width)) for h in range(heads)]
        for col, tile in enumerate(tiles):
            top, left = row * (height + gap), col * (width + gap)
            mosaic[top : top + height, left : left + width] = tile
    scale = 1.3 / max(height, width)
    fig = Figure(figsize=(max(4.0, len(columns) * width * scale + 0.8), len(maps) * height * scale + 0.7))
    ax = fig.add_axes((0.06, 0.02, 0.93, 0.98 - 0.45 / fig.get_figheight()))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([c * (width + gap) + width / 2 for c in range(len(columns))], columns, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([r * (height + gap) + height / 2 for r in range(len(maps))], list(maps), fontsize=9)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def pca_figure(image, rgb, whitened=None, foreground_rgb=None, title: str = "") -> Figure:
    """Image | first three PCA components as RGB | (foreground PCA) | (whitened first component, ±3σ)."""
    panels = [("input", _array(image), {}), ("PCA (3 components)", _array(rgb), {})]
    if foreground_rgb is not None:
        panels.append(("PCA of foreground", _array(foreground_rgb), {}))
    if whitened is not None:
        panels.append(("1st component, whitened", _array(whitened), {"cmap": "coolwarm", "vmin": -3, "vmax": 3}))
    fig = Figure(figsize=(3.3 * len(panels), 3.5), layout="constrained")
    axes = fig.subplots(1, len(panels))
    for ax, (name, values, kwargs) in zip(axes, panels):
        if name == "input":
            ax.imshow(values)
        else:
            _show_map(ax, values, image, **kwargs)
        ax.set_title(name)
        _hide_axes(ax)
    if title:
        fig.suptitle(title)
    return fig


def lost_figure(image, box, similarity=None, ground_truth: Sequence[Sequence[float]] = (), title: str = "") -> Figure:
    """Image with the LOST box (red) and ground-truth boxes (green) | (summed similarity map)."""
    panels = 2 if similarity is not None else 1
    fig = Figure(figsize=(4 * panels, 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, panels))
    axes[0].imshow(_array(image))
    for gt in ground_truth:
        axes[0].add_patch(Rectangle((gt[0], gt[1]), gt[2] - gt[0], gt[3] - gt[1], fill=False, color="lime", lw=2))
    x0, y0, x1, y1 = box
    axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", lw=2))
    axes[0].set_title("LOST box")
    if similarity is not None:
        _show_map(axes[1], similarity, image, cmap=CMAP)
        axes[1].set_title("similarity to seed set")
    for ax in axes:
        _hide_axes(ax)
    if title:
        fig.suptitle(title)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> str:
    """Write a figure as PNG and return the path."""
    path = os.fspath(path)
    fig.savefig(path, format="png", dpi=dpi)
    return path
