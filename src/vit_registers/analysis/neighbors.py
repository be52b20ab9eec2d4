"""Local redundancy of outlier patches (Darcet et al. 2024, §2.2, Fig. 5a).

Outliers appear where a patch is similar to its 4 neighbours: cosine similarity of patch embeddings taken right
after the patch projection, before position embeddings are added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tokens import base_model, grid_of


@torch.no_grad()
def input_patch_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch projections `(B, h, w, D)`: `model.embeddings.patch_embeddings(pixel_values)`, no position embedding."""
    model = base_model(model)
    parameter = next(model.parameters())
    embeddings = model.embeddings.patch_embeddings(pixel_values.to(parameter.device, parameter.dtype))
    height, width = grid_of(pixel_values, model.config.patch_size)
    return embeddings.reshape(pixel_values.shape[0], height, width, -1)


def neighbor_similarity(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each patch with its (up to) 4 grid neighbours: `(B, h, w, D)` → `(B, h, w)`.

    Border patches average over the neighbours they have.
    """
    if embeddings.ndim != 4:
        raise ValueError(f"embeddings must be (batch, h, w, dim), got {tuple(embeddings.shape)}.")
    unit = F.normalize(embeddings.float(), dim=-1)
    total = torch.zeros(unit.shape[:3])
    count = torch.zeros(unit.shape[:3])
    vertical = (unit[:, 1:] * unit[:, :-1]).sum(-1)  # pairs (i, i+1) along height
    horizontal = (unit[:, :, 1:] * unit[:, :, :-1]).sum(-1)
    total[:, 1:] += vertical
    total[:, :-1] += vertical
    count[:, 1:] += 1
    count[:, :-1] += 1
    total[:, :, 1:] += horizontal
    total[:, :, :-1] += horizontal
    count[:, :, 1:] += 1
    count[:, :, :-1] += 1
    return total / count.clamp_min(1)


def similarity_by_label(similarity: torch.Tensor, outlier_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split neighbour similarities by the patch's outlier label: `{"outlier": (n,), "normal": (m,)}`."""
    mask = outlier_mask.reshape(similarity.shape).bool()
    return {"outlier": similarity[mask], "normal": similarity[~mask]}
