"""Test-time registers (Jiang et al., "Vision Transformers Don't Need Trained Registers", NeurIPS 2025).

A sparse set of MLP "register neurons" creates the high-norm outlier tokens. Moving their activations into one extra,
untrained token (zeros, no position embedding, appended after the patches) gives a model trained without registers
the clean attention maps of one trained with them. The edit itself lives in the model
(`modeling_vit_registers.apply_test_time_registers`, Algorithm 2) so that `trust_remote_code` reproduces it; this
module finds the neurons (the paper's discovery step) and switches the edit on.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..analysis.tokens import TokenLayout
from ..modeling_vit_registers import ViTRegistersModel

# Discovery settings of Jiang et al. (2025), from their repository (`configs/*.yaml` and the `register_neurons`
# notebook: norms of every token, sparsity filter on); pass as keywords:
# `find_register_neurons(model, batches, **PAPER_SETTINGS["dinov2_vitl14"])`.
PAPER_SETTINGS = {
    "dinov2_vitl14": dict(
        top_k=50, highest_layer=17, detection_layer=-2, threshold=150.0, norm_tokens="all", sparsity_filter=True
    ),
    "dinov2_vitl14_small_k": dict(
        top_k=45, highest_layer=17, detection_layer=-2, threshold=150.0, norm_tokens="all", sparsity_filter=True
    ),
    "openclip_vitb16": dict(
        top_k=10, highest_layer=5, detection_layer=-1, threshold=30.0, norm_tokens="all", sparsity_filter=True
    ),
}
NORM_TOKENS = ("patches", "all")


@dataclass
class RegisterNeurons:
    """Discovery result: the top-k `(layer, unit)` pairs and every unit's score (mean |activation| on outliers)."""

    neurons: dict[int, list[int]]
    scores: torch.Tensor  # (layers, units)
    threshold: float
    images_with_outliers: int
    images_seen: int
    ranking: list[tuple[int, int, float]] = field(default_factory=list)


def _base_model(model) -> ViTRegistersModel:
    return model if isinstance(model, ViTRegistersModel) else model.base_model


@contextmanager
def capture_mlp_activations(model: ViTRegistersModel, layers: Iterable[int]):
    """Record the MLP hidden activations (after the activation; for SwiGLU the gated product) of `layers`.

    Yields a dict `layer -> (batch, tokens, units)` filled by each forward pass (the input of `fc2`).
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for index in layers:
        fc2 = model.encoder.layer[index].mlp.fc2

        def hook(module, args, index=index):
            captured[index] = args[0].detach()

        handles.append(fc2.register_forward_pre_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def find_register_neurons(
    model,
    batches: Iterable[torch.Tensor],
    top_k: int = 50,
    highest_layer: int | None = None,
    detection_layer: int | None = None,
    threshold: float | None = None,
    percentile: float | None = None,
    norm_tokens: str = "patches",
    sparsity_filter: bool = False,
    sparsity_fraction: float = 0.5,
    sparsity_activation: float = 0.5,
) -> RegisterNeurons:
    """Discovery (Jiang et al. 2025, §3; their `shared/algorithms.py::find_register_neurons`).

    Outliers: tokens whose output norm at `detection_layer` (default the second-to-last) exceeds a `threshold`
    (paper: 150 for DINOv2-L) or a `percentile` of those norms over the images. `norm_tokens`: `"patches"` (patch
    tokens only) or `"all"` (every token, CLS and registers included, as the authors do). For every MLP unit of layers
    `0..highest_layer`, score = mean |activation| over an image's outliers, averaged over the images that have
    outliers; the `top_k` units over those layers are the register neurons. `sparsity_filter` (the authors' notebook
    turns it on): per image, a unit scores 0 unless at least `sparsity_fraction` of the tokens (of `norm_tokens`)
    have an activation below `sparsity_activation`. Units of equal score are ranked by layer, then unit.
    """
    base = _base_model(model).eval()
    config = base.config
    depth = config.num_hidden_layers
    detection_layer = depth - 2 if detection_layer is None else detection_layer % depth
    highest_layer = detection_layer if highest_layer is None else highest_layer % depth
    if (threshold is None) == (percentile is None):
        raise ValueError("Give exactly one of threshold (absolute norm) or percentile (of dataset token norms).")
    if norm_tokens not in NORM_TOKENS:
        raise ValueError(f"norm_tokens must be one of {NORM_TOKENS}, got {norm_tokens!r}.")
    batches = list(batches)
    if not batches:
        raise ValueError("find_register_neurons needs at least one batch of images.")

    def token_norms(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Norms `(batch, n)` of the tokens `norm_tokens` names at the detection layer, and their positions."""
        hidden = base(pixels, output_hidden_states=True).hidden_states[detection_layer + 1]
        if norm_tokens == "all":
            positions = torch.arange(hidden.shape[1], device=hidden.device)
        else:
            positions = TokenLayout.from_config(config, hidden.shape[1]).patches.to(hidden.device)
        return hidden.index_select(1, positions).norm(dim=-1), positions

    if percentile is not None:
        pooled = torch.cat([token_norms(pixels)[0].flatten() for pixels in batches])
        threshold = float(torch.quantile(pooled.float(), percentile / 100.0))
    layers = list(range(highest_layer + 1))
    totals = torch.zeros(len(layers), config.mlp_hidden_size, dtype=torch.float64)
    images_with_outliers = images_seen = 0
    with capture_mlp_activations(base, layers) as activations:
        for pixels in batches:
            norms, token_positions = token_norms(pixels)  # also fills `activations`
            outliers = norms > threshold
            images_seen += pixels.shape[0]
            for image in torch.nonzero(outliers.any(dim=1)).flatten().tolist():
                images_with_outliers += 1
                positions = token_positions[torch.nonzero(outliers[image]).flatten()]
                for row, layer in enumerate(layers):
                    values = activations[layer][image, positions].abs().mean(dim=0)
                    if sparsity_filter:
                        tokens = activations[layer][image, token_positions]
                        quiet = (tokens < sparsity_activation).sum(dim=0)
                        values = values * (quiet >= sparsity_fraction * tokens.shape[0])
                    totals[row] += values.double()
    scores = (totals / max(images_with_outliers, 1)).float()
    if images_with_outliers == 0:
        raise ValueError(
            f"No {'token' if norm_tokens == 'all' else 'patch'} exceeds the norm threshold {threshold:.3g} at layer "
            f"{detection_layer}: nothing to move into "
            "test-time registers (lower the threshold or use a percentile)."
        )
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices[:top_k].tolist()
    neurons: dict[int, list[int]] = {}
    ranking = []
    for flat in order:
        layer, unit = layers[flat // scores.shape[1]], flat % scores.shape[1]
        neurons.setdefault(layer, []).append(unit)
        ranking.append((layer, unit, float(scores.flatten()[flat])))
    neurons = {layer: sorted(units) for layer, units in sorted(neurons.items())}
    return RegisterNeurons(neurons, scores, threshold, images_with_outliers, images_seen, ranking)


def enable_test_time_registers(model, neurons: dict[int, list[int]] | RegisterNeurons, num_tokens: int = 1, **settings):
    """Switch test-time registers on (stored in the config); returns the model. `settings`: `mode` (`"reference"`,
    the default, or `"per_neuron"`), `normal_values`, `scale`, see `ViTRegistersModel.set_test_time_registers`."""
    if isinstance(neurons, RegisterNeurons):
        neurons = neurons.neurons
    _base_model(model).set_test_time_registers(neurons, num_tokens, **settings)
    return model


def disable_test_time_registers(model):
    _base_model(model).set_test_time_registers(None)
    return model


__all__ = [
    "NORM_TOKENS",
    "PAPER_SETTINGS",
    "RegisterNeurons",
    "capture_mlp_activations",
    "find_register_neurons",
    "enable_test_time_registers",
    "disable_test_time_registers",
]
