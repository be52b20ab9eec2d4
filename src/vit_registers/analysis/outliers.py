"""High-norm outlier tokens (Darcet et al. 2024, §2.1, Fig. 3–4).

The paper's outliers form a *separate* mode: about 2 % of the patches, with norms several times those of the bulk
and a gap between the two in the histogram (Fig. 3), grown inside the network (Fig. 4a). [`outlier_verdict`] says
whether such a mode exists and where its gap lies; the default rule, `"gap"`, flags the patches above that gap and
none when there is no mode.

Three more rules give a norm threshold however the norms are distributed: a fixed value (the paper uses 150 for
DINOv2-g), a percentile of patch norms pooled over a dataset (the reproducibility study uses the 98th; it always
flags 2 %), or mean + k·σ. A patch is an outlier when its norm is strictly above the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

RULES = ("gap", "absolute", "percentile", "sigma")

# The stated bounds of a separate high-norm mode (see `outlier_verdict`). The paper's outliers sit about 10x above
# the bulk (DINOv2-g: norms > 150 against a bulk below 100 on a log histogram); a trained network without artifacts
# has its largest patch norm within 1.4x of the median (the real DINOv2-S of ../shared: 1.02-1.39).
MIN_RATIO_TO_MEDIAN = 2.0  # the mode's lowest norm is at least this multiple of the median patch norm
MIN_GAP = 1.5  # the norms on either side of the gap differ by at least this factor
MAX_MODE_FRACTION = 0.2  # the mode holds at most this share of the patches
GAP_STRAGGLERS = 0.001  # share of the patches that may lie inside the gap


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


@dataclass(frozen=True)
class OutlierVerdict:
    """Whether the patch norms have a separate high-norm mode (the paper's artifacts), with the numbers behind it.

    `gap` is the widest ratio between the norms on either side of a gap below the top patches (`gap_bounds`: the
    bulk's highest and the mode's lowest norm); `threshold` is the gap's geometric middle when there is a mode, else
    None. `first_separating_layer` (when per-layer norms were given) is the depth from which the mode's patches stay
    2x above the others; 0 means they are high already in the patch embeddings, i.e. they come from the pixels.
    """

    found: bool
    reason: str
    num_patches: int
    num_outliers: int
    median: float
    max_over_median: float
    gap: float
    gap_bounds: tuple[float, float] | None
    threshold: float | None
    first_separating_layer: int | None = None
    bounds: dict | None = None

    def to_dict(self) -> dict:
        """JSON-ready (the `outlier_verdict` entry of `stats.json` and of the Space)."""
        result = asdict(self)
        result["gap_bounds"] = None if self.gap_bounds is None else list(self.gap_bounds)
        return result

    @property
    def headline(self) -> str:
        """One line for figures and tables: "no high-norm outliers (...)" or "12 high-norm outliers (...)"."""
        if not self.found:
            return f"no high-norm outliers ({self.reason})"
        return f"{self.num_outliers} high-norm outlier{'s' if self.num_outliers != 1 else ''} ({self.reason})"


def outlier_verdict(
    norms: torch.Tensor | Sequence[torch.Tensor],
    per_layer: torch.Tensor | None = None,
    min_ratio: float = MIN_RATIO_TO_MEDIAN,
    min_gap: float = MIN_GAP,
    max_fraction: float = MAX_MODE_FRACTION,
    stragglers: float = GAP_STRAGGLERS,
) -> OutlierVerdict:
    """Is there a separate high-norm mode among `norms` (last-layer patch norms, pooled over images)?

    For every top group of at most `max_fraction` of the patches, the gap is the ratio of the group's lowest norm to
    the norm just below, allowing `stragglers` of the patches inside the gap (a group holds more patches than the gap
    may: a few extreme values of one heavy tail are not a mode). A mode exists when some group lies at
    least `min_ratio` x the median and above a gap of at least `min_gap` (the widest such gap is kept). With
    `per_layer` (`(L+1, N)` norms of the same patches at every depth), a mode that is already separate in the patch
    embeddings (depth 0) is not counted: the paper's artifacts grow inside the network (Fig. 4a).
    """
    pooled = _pool(norms).double()
    values = torch.sort(pooled, descending=True).values
    count = values.numel()
    median = float(pooled.median())
    top = float(values[0])
    max_over_median = top / median if median > 0 else math.inf
    bounds = {"min_ratio": min_ratio, "min_gap": min_gap, "max_fraction": max_fraction, "stragglers": stragglers}
    skip = 1 + int(stragglers * count)  # rank distance between the mode's lowest patch and the bulk's highest
    largest = min(max(skip, int(max_fraction * count)), count - skip)  # the mode holds skip..largest patches
    gap, gap_bounds, threshold = 1.0, None, None
    if largest >= skip:
        lower = values[skip - 1 : largest]  # the lowest norm of the top-k group, k = skip..largest
        upper = values[2 * skip - 1 : largest + skip]  # the highest norm below the gap
        gaps = lower / upper.clamp_min(1e-12)
        qualifies = (lower >= min_ratio * median) & (gaps >= min_gap)
        index = int(torch.where(qualifies, gaps, torch.zeros_like(gaps)).argmax()) if qualifies.any() else None
        best = int(gaps.argmax()) if index is None else index
        gap, gap_bounds = float(gaps[best]), (float(upper[best]), float(lower[best]))
        if index is not None:
            threshold = math.sqrt(gap_bounds[0] * gap_bounds[1])
    first = None
    if threshold is None:
        found = False
        if max_over_median < min_ratio:
            reason = f"max/median {max_over_median:.2f} < {min_ratio:g}: no patch stands out"
        else:
            reason = f"max/median {max_over_median:.2f}, widest gap {gap:.2f}x < {min_gap:g}x: no separate mode"
    else:
        mask = pooled > threshold
        found = True
        reason = f"{gap:.1f}x gap above the bulk, {float(gap_bounds[1]) / median:.1f}x the median"
        if per_layer is not None:
            first = first_separating_layer(per_layer.reshape(per_layer.shape[0], -1), mask)
            if first == 0:
                found = False
                reason = "the high-norm patches are already high in the patch embeddings (from the pixels)"
    num_outliers = int((pooled > threshold).sum()) if found else 0
    return OutlierVerdict(
        found=found,
        reason=reason,
        num_patches=count,
        num_outliers=num_outliers,
        median=median,
        max_over_median=max_over_median,
        gap=gap,
        gap_bounds=gap_bounds,
        threshold=threshold,
        first_separating_layer=first,
        bounds=bounds,
    )


def rule_thresholds(
    norms: torch.Tensor | Sequence[torch.Tensor],
    verdict: OutlierVerdict | None = None,
    threshold: float | None = None,
    percentile: float = 98.0,
    k: float = 3.0,
) -> dict[str, float]:
    """The threshold of every rule on the same `norms`, so that each rule's count can be read next to the verdict:
    `{"gap": ..., "percentile": ..., "sigma": ...}` and `"absolute"` when a `threshold` is given. `gap` is `inf` when
    the verdict finds no separate mode."""
    pooled = _pool(norms)
    verdict = outlier_verdict(pooled) if verdict is None else verdict
    result = {
        "gap": verdict.threshold if verdict.found else math.inf,
        "percentile": percentile_threshold(pooled, percentile),
        "sigma": sigma_threshold(pooled, k),
    }
    if threshold is not None:
        result["absolute"] = float(threshold)
    return result


def outlier_threshold(
    norms: torch.Tensor | Sequence[torch.Tensor] | None = None,
    rule: str = "gap",
    threshold: float | None = None,
    percentile: float = 98.0,
    k: float = 3.0,
    per_layer: torch.Tensor | None = None,
) -> float:
    """The norm threshold under `rule`: `"gap"` (of [`outlier_verdict`]; `inf` when there is no separate mode),
    `"absolute"` (returns `threshold`), `"percentile"` or `"sigma"` of `norms`."""
    if rule == "gap":
        verdict = outlier_verdict(norms, per_layer)
        return verdict.threshold if verdict.found else math.inf
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
