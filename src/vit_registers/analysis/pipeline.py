"""One-pass analysis of a batch of images: norms, attention maps, PCA, LOST and neighbour similarity.

The CLI and the Space both call [`analyze_batch`] then [`judge_outliers`]; each measurement comes from the
functions of the sibling modules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .attention import AttentionMaps, _group_flow, maps_from_weights
from .lost import FEATURE_KINDS, LostResult, capture_qkv, lost
from .neighbors import input_patch_embeddings, neighbor_similarity, similarity_by_label
from .norms import layer_norms, norm_stats_per_layer
from .outliers import (
    OutlierVerdict,
    first_separating_layer,
    outlier_fraction,
    outlier_verdict,
    rule_thresholds,
    separation_ratios,
)
from .pca import foreground_mask, pca_rgb, whitened_first_component
from .tokens import GROUPS, TokenLayout, base_model, grid_of, resolve_layers


@dataclass
class ImageAnalysis:
    """Every measurement for one image. Maps are on the patch grid `(h, w)`; boxes in input pixels."""

    input_size: tuple[int, int]
    grid: tuple[int, int]
    norm_stats: list[dict]  # per depth and token group, see norms.norm_stats_per_layer
    patch_norms: torch.Tensor  # (L+1, h, w), before the final norm
    attention: list[AttentionMaps]  # batch dimension of size 1
    pca_rgb: torch.Tensor  # (h, w, 3)
    pca_foreground_rgb: torch.Tensor  # (h, w, 3)
    pca_whitened: torch.Tensor  # (h, w)
    lost: LostResult
    neighbor_similarity: torch.Tensor  # (h, w)
    attention_flow: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)  # chosen layers
    last_layer_norms: dict[str, torch.Tensor] = field(default_factory=dict)  # group → (n,) norms, before final norm
    lost_kind: str = "keys"
    lost_layer: int = -1  # non-negative index
    threshold: float | None = None  # None: the rule found no outliers (gap rule without a separate mode)
    outliers: torch.Tensor | None = None  # (h, w) bool, set by label_outliers
    verdict: OutlierVerdict | None = None  # over the images judged together, set by judge_outliers
    thresholds_by_rule: dict[str, float] = field(default_factory=dict)  # set by judge_outliers

    @property
    def patch_norm_map(self) -> torch.Tensor:
        """Last-layer patch norms `(h, w)` (before the final norm)."""
        return self.patch_norms[-1]

    def summary(self, prepared=None, digits: int = 4) -> dict:
        """JSON-ready numbers (the CLI's `stats.json` entry and the Space's table): sizes, norm stats per depth and
        token group, outlier summary (when labelled), attention flow of the chosen layers, LOST box and seed.
        With `prepared` (a [`PreparedImage`]) the LOST box is also given in original-image pixels.

        One layer numbering throughout: layer l is the l-th block (1..L); the norms of depth l are its output and
        depth 0 the patch embeddings; `attention_flow` is keyed and `lost.layer` given by that number."""
        width = self.grid[1]
        lost_info = {
            "box_input": self.lost.box,
            "seed": [self.lost.seed // width, self.lost.seed % width],
            "features": self.lost_kind,
            "layer": self.lost_layer + 1,
            "detected": self.lost.detected,
            "degenerate": self.lost.degenerate,  # why LOST found no object (its box is then no detection), or None
        }
        result = {"input_size": list(self.input_size), "grid": list(self.grid)}
        if prepared is not None:
            result["original_size"] = list(prepared.original_size)
            lost_info = {"box": prepared.box_to_original(self.lost.box), **lost_info}
        result["norms"] = self.norm_stats
        if self.outliers is not None:
            result.update(self.outlier_summary())
        result["attention_flow"] = {str(layer + 1): flow for layer, flow in self.attention_flow.items()}
        result["lost"] = lost_info
        return _round(result, digits)

    def outlier_summary(self) -> dict:
        """Outlier count/fraction, first separating depth and mean neighbour similarity per label (needs labels)."""
        if self.outliers is None:
            raise ValueError("Call label_outliers first.")
        split = similarity_by_label(self.neighbor_similarity, self.outliers)
        ratios = separation_ratios(self.patch_norms.flatten(1), self.outliers.flatten())
        result = {}
        if self.verdict is not None:
            result["outlier_verdict"] = self.verdict.to_dict()
        if self.thresholds_by_rule:
            norms = self.patch_norm_map
            result["outliers_by_rule"] = {
                rule: int((norms > value).sum()) for rule, value in self.thresholds_by_rule.items()
            }
        return {
            **result,
            "threshold": self.threshold,
            "num_outliers": int(self.outliers.sum()),
            "outlier_fraction": outlier_fraction(self.outliers),
            "first_separating_layer": first_separating_layer(self.patch_norms.flatten(1), self.outliers.flatten()),
            "separation_ratio_per_layer": [None if r != r else round(float(r), 4) for r in ratios.tolist()],
            "neighbor_similarity": {
                label: (None if values.numel() == 0 else values.mean().item()) for label, values in split.items()
            },
        }


@torch.no_grad()
def analyze_batch(
    model,
    pixel_values: torch.Tensor,
    layers: int | Sequence[int] | None = None,
    lost_layer: int = -1,
    lost_kind: str = "keys",
    lost_k: int = 100,
    lost_bias: float = 0.0,
) -> list[ImageAnalysis]:
    """Analyse a batch `(B, 3, H, W)` in one forward pass (hidden states, attention of `layers` only, LOST features
    captured by a hook) plus the patch projection for neighbour similarity."""
    model = base_model(model)
    config = model.config
    if lost_kind not in FEATURE_KINDS:
        raise ValueError(f"Unknown LOST feature kind {lost_kind!r}; choose one of {FEATURE_KINDS}.")
    chosen = resolve_layers(layers, config.num_hidden_layers)
    grid = grid_of(pixel_values, config.patch_size)
    size = tuple(pixel_values.shape[-2:])
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(parameter.device, parameter.dtype)

    (lost_index,) = resolve_layers(lost_layer, config.num_hidden_layers)
    if lost_kind == "tokens":  # same definition as lost.lost_features: layer output, final norm after the last one
        outputs = model(pixel_values, output_hidden_states=True, attention_layers=chosen)
        feats = outputs.hidden_states[lost_index + 1]
        if lost_index == config.num_hidden_layers - 1:
            feats = model.layernorm(feats)
    else:
        with capture_qkv(model, lost_index, lost_kind) as captured:
            outputs = model(pixel_values, output_hidden_states=True, attention_layers=chosen)
        feats = captured["features"]
    layout = TokenLayout.from_config(config, feats.shape[1])
    lost_feats = feats.index_select(1, layout.patches.to(feats.device)).float().cpu()

    norms = layer_norms(outputs.hidden_states).cpu()  # (L+1, B, T)
    layout = TokenLayout.from_config(config, norms.shape[-1])
    patch_norms = norms.index_select(-1, layout.patches).reshape(norms.shape[0], norms.shape[1], *grid)
    similarity = neighbor_similarity(input_patch_embeddings(model, pixel_values).cpu())
    patches = outputs.patch_tokens.float().cpu()
    attentions = [maps_from_weights(w.cpu(), config, grid, layer) for layer, w in zip(chosen, outputs.attentions)]
    flows = [
        {layer: _group_flow(w[index : index + 1], config) for layer, w in zip(chosen, outputs.attentions)}
        for index in range(pixel_values.shape[0])
    ]

    results = []
    for index in range(pixel_values.shape[0]):
        features = patches[index]
        results.append(
            ImageAnalysis(
                input_size=size,
                grid=grid,
                norm_stats=norm_stats_per_layer([state[index : index + 1] for state in outputs.hidden_states], config),
                patch_norms=patch_norms[:, index],
                attention=[
                    AttentionMaps(
                        layer=maps.layer,
                        cls=None if maps.cls is None else maps.cls[index : index + 1],
                        registers=maps.registers[index : index + 1],
                        register_labels=maps.register_labels,
                    )
                    for maps in attentions
                ],
                pca_rgb=pca_rgb(features, grid),
                pca_foreground_rgb=pca_rgb(features, grid, foreground=foreground_mask(features, grid)),
                pca_whitened=whitened_first_component(features, grid),
                lost=lost(lost_feats[index], grid, config.patch_size, k=lost_k, bias=lost_bias, image_size=size),
                neighbor_similarity=similarity[index],
                attention_flow=flows[index],
                last_layer_norms={name: norms[-1, index, layout.group(name)] for name in GROUPS},
                lost_kind=lost_kind,
                lost_layer=lost_index,
            )
        )
    return results


def label_outliers(analyses: Sequence[ImageAnalysis], threshold: float | None) -> None:
    """Label every image's last-layer patches above `threshold` as outliers (in place); `None` or `inf`: none."""
    found = threshold is not None and math.isfinite(threshold)
    for analysis in analyses:
        analysis.threshold = float(threshold) if found else None
        analysis.outliers = (
            analysis.patch_norm_map > threshold
            if found
            else torch.zeros_like(analysis.patch_norm_map, dtype=torch.bool)
        )


def judge_outliers(
    analyses: Sequence[ImageAnalysis],
    rule: str = "gap",
    threshold: float | None = None,
    percentile: float = 98.0,
    k: float = 3.0,
) -> OutlierVerdict:
    """The outlier verdict over `analyses` together (last-layer patch norms pooled, per-layer norms for where the mode
    grows), every rule's threshold on the same norms, and the patches of the chosen `rule` labelled (in place).

    `rule`: `"gap"` (default: the patches above the gap of a separate high-norm mode, none without one),
    `"percentile"`, `"sigma"` or `"absolute"` (needs `threshold`). See [`outliers.outlier_verdict`].
    """
    if not analyses:
        raise ValueError("No analysed image to judge.")
    if rule == "absolute" and threshold is None:
        raise ValueError("rule='absolute' needs a threshold value.")
    norms = [analysis.patch_norm_map for analysis in analyses]
    per_layer = torch.cat([analysis.patch_norms.flatten(1) for analysis in analyses], dim=1)
    verdict = outlier_verdict(norms, per_layer)
    thresholds = rule_thresholds(norms, verdict, threshold=threshold, percentile=percentile, k=k)
    if rule not in thresholds:
        raise ValueError(f"Unknown outlier rule {rule!r}; choose one of {tuple(thresholds)}.")
    label_outliers(analyses, thresholds[rule])
    for analysis in analyses:
        analysis.verdict = verdict
        analysis.thresholds_by_rule = thresholds
    return verdict


def _round(value, digits: int):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: _round(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(item, digits) for item in value]
    return value


@dataclass
class LayerOutliers:
    """Patch norms of one layer's output over a set of images: the verdict, and whether the patches above a threshold
    stand apart from the others at some depth before it (Darcet et al. Fig. 4a; 0 = patch embeddings, l = output of
    layer l; None: never)."""

    verdict: OutlierVerdict
    threshold: float | None
    num_flagged: int
    first_separating_layer: int | None
    separation_ratios: list[float | None]  # per depth; None where a group is empty

    def to_dict(self) -> dict:
        return {
            "outlier_verdict": self.verdict.to_dict(),
            "threshold": self.threshold,
            "num_flagged": self.num_flagged,
            "first_separating_layer": self.first_separating_layer,
            "separation_ratio_per_layer": self.separation_ratios,
        }


@torch.no_grad()
def layer_outliers(model, batches: Iterable[torch.Tensor], layer: int = -1, threshold: float | None = None):
    """[`LayerOutliers`] of the output of `layer` (a block index; negative counts from the end) over `batches` of
    pixel values: the verdict of its patch norms, and where the patches above `threshold` (default: the verdict's
    gap) separate from the others. One forward pass per batch; `find-register-neurons` checks its outliers with it."""
    model = base_model(model)
    config = model.config
    (index,) = resolve_layers(layer, config.num_hidden_layers)
    parameter = next(model.parameters())
    per_depth = []
    for pixels in batches:
        hidden = model(pixels.to(parameter.device, parameter.dtype), output_hidden_states=True).hidden_states
        norms = layer_norms(hidden[: index + 2]).cpu()  # (depths, B, T)
        patches = TokenLayout.from_config(config, norms.shape[-1]).patches
        per_depth.append(norms.index_select(-1, patches).flatten(1))
    if not per_depth:
        raise ValueError("No images to measure.")
    per_depth = torch.cat(per_depth, dim=1)  # (depths, all patches)
    verdict = outlier_verdict(per_depth[-1], per_depth)
    if threshold is None:
        threshold = verdict.threshold if verdict.found else None
    flagged = per_depth[-1] > threshold if threshold is not None else torch.zeros(per_depth.shape[1], dtype=torch.bool)
    ratios = separation_ratios(per_depth, flagged).tolist()
    return LayerOutliers(
        verdict=verdict,
        threshold=threshold,
        num_flagged=int(flagged.sum()),
        first_separating_layer=first_separating_layer(per_depth, flagged),
        separation_ratios=[None if r != r else round(r, 4) for r in ratios],
    )
