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

# Discovery settings reported by Jiang et al. (2025) for their checkpoints; pass as keywords:
# `find_register_neurons(model, batches, **PAPER_SETTINGS["dinov2_vitl14"])`. The detection layer is the
# second-to-last (the function's default).
PAPER_SETTINGS = {
    "dinov2_vitl14": dict(top_k=50, highest_layer=17, threshold=150.0),
    "dinov2_vitl14_small_k": dict(top_k=45, highest_layer=17, threshold=150.0),
    "openclip_vitb16": dict(top_k=10, highest_layer=5, percentile=98.0),
}


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
) -> RegisterNeurons:
    """Discovery (Jiang et al. 2025, §3): outlier patches at `detection_layer` (output of that block; default the
    second-to-last) by a norm `threshold` (paper: 150 for DINOv2-L) or a dataset `percentile` of patch norms; then for
    every MLP unit of layers `0..highest_layer`, score = mean |activation| over the outlier patches of an image,
    averaged over the images that have outliers. The `top_k` units over all those layers are the register neurons.
    """
    base = _base_model(model).eval()
    config = base.config
    depth = config.num_hidden_layers
    detection_layer = depth - 2 if detection_layer is None else detection_layer % depth
    highest_layer = detection_layer if highest_layer is None else highest_layer % depth
    if (threshold is None) == (percentile is None):
        raise ValueError("Give exactly one of threshold (absolute norm) or percentile (of dataset patch norms).")
    batches = list(batches)
    if not batches:
        raise ValueError("find_register_neurons needs at least one batch of images.")

    def patch_norms(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Norms of the patch tokens `(batch, patches)` and their sequence positions."""
        hidden = base(pixels, output_hidden_states=True).hidden_states[detection_layer + 1]
        positions = TokenLayout.from_config(config, hidden.shape[1]).patches.to(hidden.device)
        return hidden.index_select(1, positions).norm(dim=-1), positions

    if percentile is not None:
        pooled = torch.cat([patch_norms(pixels)[0].flatten() for pixels in batches])
        threshold = float(torch.quantile(pooled.float(), percentile / 100.0))
    layers = list(range(highest_layer + 1))
    totals = torch.zeros(len(layers), config.mlp_hidden_size, dtype=torch.float64)
    images_with_outliers = images_seen = 0
    with capture_mlp_activations(base, layers) as activations:
        for pixels in batches:
            norms, patch_positions = patch_norms(pixels)  # also fills `activations`
            outliers = norms > threshold
            images_seen += pixels.shape[0]
            for image in torch.nonzero(outliers.any(dim=1)).flatten().tolist():
                images_with_outliers += 1
                positions = patch_positions[torch.nonzero(outliers[image]).flatten()]
                for row, layer in enumerate(layers):
                    values = activations[layer][image, positions].abs().mean(dim=0)
                    totals[row] += values.double()
    scores = (totals / max(images_with_outliers, 1)).float()
    if images_with_outliers == 0:
        raise ValueError(
            f"No patch exceeds the norm threshold {threshold:.3g} at layer {detection_layer}: nothing to move into "
            "test-time registers (lower the threshold or use a percentile)."
        )
    top = torch.topk(scores.flatten(), k=min(top_k, scores.numel()))
    neurons: dict[int, list[int]] = {}
    ranking = []
    for flat, score in zip(top.indices.tolist(), top.values.tolist()):
        layer, unit = layers[flat // scores.shape[1]], flat % scores.shape[1]
        neurons.setdefault(layer, []).append(unit)
        ranking.append((layer, unit, score))
    neurons = {layer: sorted(units) for layer, units in sorted(neurons.items())}
    return RegisterNeurons(neurons, scores, threshold, images_with_outliers, images_seen, ranking)


def enable_test_time_registers(model, neurons: dict[int, list[int]] | RegisterNeurons, num_tokens: int = 1):
    """Switch test-time registers on (stored in the config); returns the model."""
    if isinstance(neurons, RegisterNeurons):
        neurons = neurons.neurons
    _base_model(model).set_test_time_registers(neurons, num_tokens)
    return model


def disable_test_time_registers(model):
    _base_model(model).set_test_time_registers(None)
    return model


__all__ = [
    "PAPER_SETTINGS",
    "RegisterNeurons",
    "capture_mlp_activations",
    "find_register_neurons",
    "enable_test_time_registers",
    "disable_test_time_registers",
]
