"""Token norms per layer and token group (Darcet et al. 2024, §2.1 and Fig. 3–4).

The paper measures norms on the residual stream *before* the final LayerNorm: `hidden_states` of a vit_registers
model with `output_hidden_states=True` (embedding output + the L layer outputs). Normalised features hide outliers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tokens import GROUPS, TokenLayout


def token_norms(hidden_state: torch.Tensor) -> torch.Tensor:
    """L2 norm of every token: `(B, T, D)` → `(B, T)` (computed in float32)."""
    return hidden_state.float().norm(dim=-1)


def layer_norms(hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Norms of every token at every depth: L+1 states of `(B, T, D)` → `(L+1, B, T)`."""
    return torch.stack([token_norms(state) for state in hidden_states])


def _summary(values: torch.Tensor) -> dict[str, float] | None:
    if values.numel() == 0:
        return None
    values = values.float().flatten()
    return {
        "mean": values.mean().item(),
        "std": values.std(unbiased=False).item(),
        "min": values.min().item(),
        "median": values.median().item(),
        "max": values.max().item(),
    }


def group_norms(norms: torch.Tensor, config) -> dict[str, torch.Tensor]:
    """Split norms `(..., T)` into `{"cls", "registers", "patches"}` → `(..., n_group)`."""
    layout = TokenLayout.from_config(config, norms.shape[-1])
    return {name: norms.index_select(-1, layout.group(name).to(norms.device)) for name in GROUPS}


def norm_stats_per_layer(hidden_states: Sequence[torch.Tensor], config) -> list[dict]:
    """Per depth (0 = embeddings, l = output of layer l): mean/std/min/median/max norm of each token group.

    Groups absent from the model (no CLS, no registers) are `None`.
    """
    stats = []
    for depth, state in enumerate(hidden_states):
        groups = group_norms(token_norms(state), config)
        stats.append({"layer": depth, **{name: _summary(values) for name, values in groups.items()}})
    return stats


def patch_norm_map(hidden_state: torch.Tensor, config, grid: tuple[int, int]) -> torch.Tensor:
    """Norms of the patch tokens of one hidden state `(B, T, D)` laid out on the patch grid: `(B, h, w)`."""
    patches = group_norms(token_norms(hidden_state), config)["patches"]
    height, width = grid
    if patches.shape[-1] != height * width:
        raise ValueError(f"{patches.shape[-1]} patch tokens do not fill a {height}x{width} grid.")
    return patches.reshape(-1, height, width)
