"""LOST unsupervised object discovery (Siméoni et al. 2021, §3) as used by Darcet et al. 2024 (§3.3, Table 3).

Patch features F (keys of the last layer by default), A = F Fᵀ (+ b), degree = number of positive entries of each row,
seed = the patch of lowest degree, the k lowest-degree patches that correlate positively with the seed are summed
into a similarity map, and the 4-connected positive component holding the seed gives the box.

Checked against the authors' code (valeoai/LOST, `object_discovery.py`): the degree leaves out each patch's
similarity with itself, as theirs does (it zeroes the diagonal); patches of equal degree are ranked in raster order
(a stable sort), where theirs leaves ties to an unstable `argsort`, so the seed can differ only when degrees tie.
When no patch has a lower degree than the others, or the component covers the whole patch grid, LOST has found no
object: the result says so (`LostResult.degenerate`) instead of passing the box off as a detection. CorLoc counts a
box as correct when LOST's IoU (its `eps`) is at least 0.5, so an IoU of exactly 0.5 counts as wrong, as in LOST.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .tokens import TokenLayout, base_model, grid_of, resolve_layers

FEATURE_KINDS = ("keys", "queries", "values", "tokens")


@contextmanager
def capture_qkv(model, layer: int, kind: str = "keys"):
    """Context manager: during a forward pass, store layer `layer`'s keys/queries/values `(B, T, heads * head_dim)`
    (read from the fused qkv projection, heads concatenated) in the yielded dict under `"features"`."""
    if kind not in ("queries", "keys", "values"):
        raise ValueError(f"capture_qkv reads 'queries', 'keys' or 'values', not {kind!r}.")
    model = base_model(model)
    heads = model.config.num_attention_heads
    which = {"queries": 0, "keys": 1, "values": 2}[kind]
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        batch, tokens, _ = output.shape
        captured["features"] = output.reshape(batch, tokens, 3, heads, -1)[:, :, which].reshape(batch, tokens, -1)

    handle = model.encoder.layer[layer].attention.qkv.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def lost_features(model, pixel_values: torch.Tensor, layer: int = -1, kind: str = "keys") -> torch.Tensor:
    """Patch features `(B, N, D)` for LOST from layer `layer`.

    `kind`: `"keys"`, `"queries"`, `"values"` (heads concatenated, read from the layer's fused qkv projection by a
    forward hook), or `"tokens"` (the layer's output; after the final norm for the last layer).
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"Unknown LOST feature kind {kind!r}; choose one of {FEATURE_KINDS}.")
    model = base_model(model)
    config = model.config
    (index,) = resolve_layers(layer, config.num_hidden_layers)
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(parameter.device, parameter.dtype)
    if kind == "tokens":
        outputs = model(pixel_values, output_hidden_states=True)
        features = outputs.hidden_states[index + 1]
        if index == config.num_hidden_layers - 1:
            features = model.layernorm(features)
    else:
        with capture_qkv(model, index, kind) as captured:
            model(pixel_values)
        features = captured["features"]
    layout = TokenLayout.from_config(config, features.shape[1])
    return features.index_select(1, layout.patches.to(features.device)).float()


@dataclass
class LostResult:
    """LOST output for one image: box `[x0, y0, x1, y1]` in input pixels, seed index, maps on the patch grid.

    `degenerate` is `None` for a detection, else why LOST found no object (every patch has the same degree, so no
    seed stands out; or the mask covers the whole image): the box is then the whole component, not an object.
    """

    box: list[float]
    seed: int
    similarity: torch.Tensor  # (h, w) summed similarity to the chosen patches
    mask: torch.Tensor  # (h, w) bool, the seed's 4-connected positive component
    degree: torch.Tensor  # (h, w) number of positive correlations with the other patches
    degenerate: str | None = None

    @property
    def detected(self) -> bool:
        return self.degenerate is None


def connected_component(mask: torch.Tensor, start: tuple[int, int]) -> torch.Tensor:
    """The 4-connected component of `True` cells of a `(h, w)` mask that contains `start` (empty if `start` is off)."""
    height, width = mask.shape
    grid = mask.bool().tolist()
    component = torch.zeros(height, width, dtype=torch.bool)
    if not grid[start[0]][start[1]]:
        return component
    queue = deque([start])
    seen = {start}
    while queue:
        row, col = queue.popleft()
        component[row, col] = True
        for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
            if 0 <= r < height and 0 <= c < width and grid[r][c] and (r, c) not in seen:
                seen.add((r, c))
                queue.append((r, c))
    return component


def lost(
    features: torch.Tensor,
    grid: tuple[int, int],
    patch_size: int | tuple[int, int],
    k: int = 100,
    bias: float = 0.0,
    image_size: tuple[int, int] | None = None,
) -> LostResult:
    """LOST on one image's patch features `(N, D)` laid out on `grid` `(h, w)` in raster order.

    `bias` b is added to every entry of A = F Fᵀ (Darcet et al. add one for models with registers). The box is in
    input pixels, `[x0, y0, x1, y1]` with exclusive ends, clipped to `image_size` `(H, W)` when given.
    """
    height, width = grid
    if features.ndim != 2 or features.shape[0] != height * width:
        raise ValueError(
            f"features must be ({height * width}, dim) for a {height}x{width} grid, got {tuple(features.shape)}."
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    features = features.double()
    affinity = features @ features.T + bias
    degree = (affinity > 0).sum(-1) - (affinity.diagonal() > 0).long()  # without each patch's self-similarity
    order = torch.argsort(degree, stable=True)  # ties: raster order
    seed = int(order[0])
    potentials = order[:k]
    similar = potentials[affinity[seed, potentials] > 0]
    if similar.numel() == 0:  # possible only with a negative bias: fall back to the seed itself
        similar = order[:1]
    similarity = affinity[similar].sum(0).reshape(height, width)
    start = (seed // width, seed % width)
    component = connected_component(similarity > 0, start)
    if not component.any():
        component[start] = True
    rows = torch.nonzero(component.any(1)).flatten()
    cols = torch.nonzero(component.any(0)).flatten()
    step_y, step_x = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    box = [
        float(cols.min() * step_x),
        float(rows.min() * step_y),
        float((cols.max() + 1) * step_x),
        float((rows.max() + 1) * step_y),
    ]
    if image_size is not None:
        box[2], box[3] = min(box[2], float(image_size[1])), min(box[3], float(image_size[0]))
    degenerate = None
    if degree.numel() > 1 and bool((degree == degree[seed]).all()):
        degenerate = (
            f"no seed: all {degree.numel()} patches have the same degree ({int(degree[seed])} positive similarities "
            "with the other patches), so none stands out as an object"
        )
    elif bool(component.all()):
        degenerate = "the mask covers the whole image: no object is separated from the background"
    return LostResult(
        box=box,
        seed=seed,
        similarity=similarity.float(),
        mask=component,
        degree=degree.reshape(height, width),
        degenerate=degenerate,
    )


def lost_boxes(
    model,
    pixel_values: torch.Tensor,
    layer: int = -1,
    kind: str = "keys",
    k: int = 100,
    bias: float = 0.0,
) -> list[LostResult]:
    """LOST for every image of a batch `(B, 3, H, W)`; boxes are in input pixels."""
    config = base_model(model).config
    features = lost_features(model, pixel_values, layer, kind).cpu()
    grid = grid_of(pixel_values, config.patch_size)
    size = tuple(pixel_values.shape[-2:])
    return [lost(f, grid, config.patch_size, k=k, bias=bias, image_size=size) for f in features]


LOST_IOU_EPS = 1e-7  # the `eps` of LOST's `bbox_iou` (from YOLOv5): added to each box height and to the union


def box_iou(box: list[float], other: list[float], eps: float = 0.0) -> float:
    """Intersection over union of two `[x0, y0, x1, y1]` boxes (continuous coordinates). With `eps`, LOST's formula:
    `eps` is added to both heights and to the union, so the result lies just below the exact IoU."""
    width = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
    height = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
    inter = width * height
    area = max(0.0, box[2] - box[0]) * (max(0.0, box[3] - box[1]) + eps)
    area_other = max(0.0, other[2] - other[0]) * (max(0.0, other[3] - other[1]) + eps)
    union = area + area_other - inter + eps
    return inter / union if union > 0 else 0.0


def is_correct_localization(box: list[float], ground_truth: list[list[float]], iou_threshold: float = 0.5) -> bool:
    """CorLoc criterion as LOST evaluates it: LOST's IoU (`eps` = `LOST_IOU_EPS`) ≥ `iou_threshold` with at least one
    ground-truth box, so a box whose exact IoU is 0.5 counts as wrong."""
    return any(box_iou(box, gt, eps=LOST_IOU_EPS) >= iou_threshold for gt in ground_truth)


def corloc(predictions: list[list[float]], ground_truths: list[list[list[float]]], iou_threshold: float = 0.5) -> float:
    """Correct localisation: share of images whose predicted box overlaps one of its ground-truth boxes by more than
    0.5 IoU (`is_correct_localization`)."""
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truths)} images.")
    if not predictions:
        raise ValueError("CorLoc of an empty set of images is undefined.")
    hits = sum(is_correct_localization(p, g, iou_threshold) for p, g in zip(predictions, ground_truths))
    return hits / len(predictions)
