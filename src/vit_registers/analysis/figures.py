"""Matplotlib figures shared by the CLI and the Space: norm map + histogram, attention grid, PCA, LOST box.

Figures are built with `matplotlib.figure.Figure` (no pyplot state, safe in servers and threads).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib import colormaps, ticker
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

CMAP = "viridis"
MIN_PATCH_PIXELS = 6  # attention mosaics: pixels per patch side at least ...
MIN_TILE_PIXELS = 130  # ... and pixels per tile side at least


def _array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().float().numpy()
    return np.asarray(image)


def _hide_axes(ax) -> None:
    ax.set_axis_off()  # no ticks at all: making and measuring unused ticks was a large part of a figure's time


def _show_map(ax, values, extent_image=None, **kwargs):
    values = _array(values)
    if extent_image is not None:
        height, width = _array(extent_image).shape[:2]
        return ax.imshow(values, extent=(0, width, height, 0), interpolation="nearest", **kwargs)
    return ax.imshow(values, interpolation="nearest", **kwargs)


def _axes(fig: Figure, left: float, bottom: float, width: float, height: float):
    """Axes at a fixed place given in inches: no layout engine, whose text measuring cost most of a figure's time."""
    fig_width, fig_height = fig.get_size_inches()
    return fig.add_axes((left / fig_width, bottom / fig_height, width / fig_width, height / fig_height))


def _headings(fig: Figure, title: str, subtitle: str = "", color: str = "black") -> float:
    """Figure title and an optional second line at the top; returns the inches they take."""
    height = fig.get_size_inches()[1]
    used = 0.05
    if title:
        fig.text(0.5, 1 - (used + 0.05) / height, title, ha="center", va="top", fontsize=11)
        used += 0.3
    if subtitle:
        fig.text(0.5, 1 - (used + 0.05) / height, subtitle, ha="center", va="top", fontsize=10, color=color)
        used += 0.28
    return used


def norm_figure(
    image, norm_map, norms=None, threshold: float | None = None, title: str = "", verdict=None, rule: str = ""
) -> Figure:
    """Image | patch norm map (last layer, before the final norm) | histogram of patch norms with the threshold.

    `verdict` (an [`outliers.OutlierVerdict`]) is written under the title, and its widest gap and max/median over
    the histogram; when it finds no separate high-norm mode the patches above `threshold` are not circled (the
    histogram still shows what the `rule` flags). A `threshold` of None or `inf` flags nothing.
    """
    norm_map = _array(norm_map)
    values = norm_map.flatten() if norms is None else _array(norms).flatten()
    if threshold is not None and not np.isfinite(threshold):
        threshold = None
    headline = "" if verdict is None else verdict.headline
    fig = Figure(figsize=(12, 3.8 + (0.28 if headline else 0.0)))
    top = fig.get_size_inches()[1] - _headings(
        fig, title, headline, "firebrick" if verdict and verdict.found else "darkgreen"
    )
    panel = top - 0.45  # room for the panel titles
    axes = [_axes(fig, 0.1, 0.1, 3.5, panel), _axes(fig, 3.9, 0.1, 3.5, panel)]
    colorbar = _axes(fig, 7.5, 0.1 + panel * 0.1, 0.12, panel * 0.8)
    hist = _axes(fig, 8.8, 0.55, 3.05, panel - 0.45)
    axes[0].imshow(_array(image))
    axes[0].set_title("input", fontsize=10)
    im = _show_map(axes[1], norm_map, image, cmap=CMAP)
    axes[1].set_title("patch norms", fontsize=10)
    fig.colorbar(im, cax=colorbar)
    if threshold is not None and (verdict is None or verdict.found):
        outliers = norm_map > threshold
        rows, cols = np.nonzero(outliers)
        height, width = _array(image).shape[:2]
        sy, sx = height / norm_map.shape[0], width / norm_map.shape[1]
        axes[1].scatter((cols + 0.5) * sx, (rows + 0.5) * sy, s=12, facecolors="none", edgecolors="red", linewidths=1)
    for ax in axes:
        _hide_axes(ax)
    # one filled outline rather than a rectangle per bin; plain "10", "100" labels: no mathtext to typeset
    hist.hist(values, bins=min(100, max(10, values.size // 4)), color="tab:blue", log=True, histtype="stepfilled")
    hist.yaxis.set_major_formatter(ticker.LogFormatter())
    hist.yaxis.set_minor_locator(ticker.NullLocator())
    if threshold is not None:
        share = float((values > threshold).mean()) * 100
        name = f"{rule} threshold" if rule else "threshold"
        hist.axvline(threshold, color="red", linestyle="--", label=f"{name} {threshold:.3g} ({share:.1f}% above)")
        hist.legend(loc="upper right", fontsize=8)
    if verdict is not None:
        hist.set_title(f"widest gap {verdict.gap:.2f}x, max / median {verdict.max_over_median:.2f}", fontsize=9)
    hist.set_xlabel("token norm", fontsize=9)
    hist.set_ylabel("patches", fontsize=9)
    hist.tick_params(labelsize=8)
    return fig


def _patch_pixels(grid: tuple[int, int]) -> int:
    """Pixels per patch in a mosaic tile: at least `MIN_PATCH_PIXELS`, and tiles at least `MIN_TILE_PIXELS` wide."""
    return max(MIN_PATCH_PIXELS, -(-MIN_TILE_PIXELS // max(grid)))


def _tile(values: np.ndarray, scale: int) -> np.ndarray:
    """A map min–max scaled, coloured with the colormap, each patch a `scale`×`scale` block: `(h·scale, w·scale, 3)`."""
    values = values.astype(np.float64)
    low, high = values.min(), values.max()
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.repeat(np.repeat(colormaps[CMAP](scaled)[..., :3], scale, axis=0), scale, axis=1)


def _resized(image, size: tuple[int, int]) -> np.ndarray:
    """The image as float RGB in [0, 1], resized (antialiased) to `size` `(H, W)`."""
    if not isinstance(image, Image.Image):
        array = _array(image)
        array = array * 255.0 if array.dtype.kind == "f" and array.max() <= 1.0 else array
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    resized = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(resized, dtype=np.float64) / 255.0


def attention_figure(
    image, maps: Mapping[str, torch.Tensor], title: str = "", max_heads: int = 16, dpi: int = 100
) -> Figure:
    """Grid: one row per token (CLS, each register); columns = input, head mean, then each head (≤ `max_heads`).

    Each map is min–max scaled on its own (viridis) with every patch a block of at least 6×6 pixels (tiles at least
    130 px wide), so 16×16 to 37×37 grids stay readable; the mosaic is drawn pixel for pixel when saved at `dpi`.
    """
    if not maps:
        raise ValueError("No attention maps to draw (the model has neither CLS nor registers).")
    first = _array(next(iter(maps.values())))
    grid = first.shape[-2:]
    heads = min(max_heads, first.shape[0])
    columns = ["input", "mean"] + [f"head {h}" for h in range(heads)]
    scale = _patch_pixels(grid)
    height, width = grid[0] * scale, grid[1] * scale
    gap = max(2, width // 40)
    picture = _resized(image, (height, width))
    mosaic = np.ones((len(maps) * (height + gap) - gap, len(columns) * (width + gap) - gap, 3))
    for row, per_head in enumerate(maps.values()):
        per_head = _array(per_head)
        tiles = [picture, _tile(per_head.mean(0), scale)] + [_tile(per_head[h], scale) for h in range(heads)]
        for col, tile in enumerate(tiles):
            top, left = row * (height + gap), col * (width + gap)
            mosaic[top : top + height, left : left + width] = tile
    label_width = max(len(name) for name in maps) * 0.075 + 0.25  # inches for the row names
    top_margin = 0.3 + (0.3 if title else 0.0)
    fig_width, fig_height = mosaic.shape[1] / dpi + label_width + 0.1, mosaic.shape[0] / dpi + top_margin + 0.1
    fig = Figure(figsize=(fig_width, fig_height), dpi=dpi)
    ax = fig.add_axes(
        (
            label_width / fig_width,
            0.1 / fig_height,
            mosaic.shape[1] / dpi / fig_width,
            mosaic.shape[0] / dpi / fig_height,
        )
    )
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([c * (width + gap) + width / 2 for c in range(len(columns))], columns, fontsize=9)
    ax.xaxis.tick_top()
    ax.set_yticks([r * (height + gap) + height / 2 for r in range(len(maps))], list(maps), fontsize=9)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.08 / fig_height, va="top")
    return fig


def pca_figure(image, rgb, whitened=None, foreground_rgb=None, title: str = "") -> Figure:
    """Image | first three PCA components as RGB | (foreground PCA) | (whitened first component, ±3σ)."""
    panels = [("input", _array(image), {}), ("PCA (3 components)", _array(rgb), {})]
    if foreground_rgb is not None:
        panels.append(("PCA of foreground", _array(foreground_rgb), {}))
    if whitened is not None:
        panels.append(("1st component, whitened", _array(whitened), {"cmap": "coolwarm", "vmin": -3, "vmax": 3}))
    fig = Figure(figsize=(3.3 * len(panels), 3.5))
    panel = fig.get_size_inches()[1] - _headings(fig, title) - 0.45
    for index, (name, values, kwargs) in enumerate(panels):
        ax = _axes(fig, 0.1 + 3.3 * index, 0.1, 3.1, panel)
        if name == "input":
            ax.imshow(values)
        else:
            _show_map(ax, values, image, **kwargs)
        ax.set_title(name, fontsize=10)
        _hide_axes(ax)
    return fig


def lost_figure(
    image,
    box,
    similarity=None,
    ground_truth: Sequence[Sequence[float]] = (),
    title: str = "",
    degenerate: str | None = None,
) -> Figure:
    """Image with the LOST box (red) and ground-truth boxes (green) | (summed similarity map). With `degenerate`
    (`LostResult.degenerate`: LOST found no object) no box is drawn and the reason is written instead."""
    panels = 2 if similarity is not None else 1
    fig = Figure(figsize=(4 * panels, 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, panels))
    axes[0].imshow(_array(image))
    for gt in ground_truth:
        axes[0].add_patch(Rectangle((gt[0], gt[1]), gt[2] - gt[0], gt[3] - gt[1], fill=False, color="lime", lw=2))
    if degenerate is None:
        x0, y0, x1, y1 = box
        axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", lw=2))
        axes[0].set_title("LOST box")
    else:
        axes[0].set_title("LOST: no object found", color="red")
        note = dict(ha="center", va="bottom", fontsize=7, wrap=True, bbox=dict(facecolor="white", edgecolor="none"))
        axes[0].text(0.5, 0.02, degenerate, transform=axes[0].transAxes, **note)
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
    fig.savefig(path, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})  # zlib level 6 took ~1/4 of the time
    return path
