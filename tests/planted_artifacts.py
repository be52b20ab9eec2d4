"""A tiny model with planted high-norm patch tokens, for tests of the outlier verdict.

The mechanism is the one Jiang et al. (2025) find in DINOv2: one MLP neuron ("register neuron") fires on a few patches
and writes a large vector into their residual stream, which carries it to the last layer. Here the patches are chosen
by position: hidden dimension `FLAG` is zero everywhere except in the position embeddings of `positions`, and no
layer writes to it, so the neuron (unit `UNIT` of layer `layer`, reading `FLAG`) fires on those patches only.
"""

from __future__ import annotations

import torch

from vit_registers import ViTRegistersConfig, ViTRegistersModel

FLAG = 0  # hidden dimension that marks the planted positions
UNIT = 3  # the planted MLP unit


def planted_model(positions=(0, 5, 10), layer: int = 0, strength: float = 20.0, seed: int = 0, **overrides):
    """`ViTRegistersModel` (56 px, patch 14: a 4x4 grid, 3 layers) whose patches at `positions` (raster order) leave
    `layer` with a norm about `strength` times the others'. `strength=0` gives the same model without the plant."""
    torch.manual_seed(seed)
    settings = dict(
        image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_register_tokens=0
    )
    config = ViTRegistersConfig(**{**settings, **overrides})
    model = ViTRegistersModel(config).eval()
    with torch.no_grad():
        embeddings = model.embeddings
        # the typical patch norm at the input, on normalised-image-like pixels
        scale = model(torch.randn(4, 3, 56, 56), output_hidden_states=True).hidden_states[0].norm(dim=-1).median()
        embeddings.patch_embeddings.projection.weight[FLAG] = 0
        embeddings.patch_embeddings.projection.bias[FLAG] = 0
        embeddings.position_embeddings[..., FLAG] = 0
        for token in (embeddings.cls_token, embeddings.register_tokens):
            if token is not None:
                token[..., FLAG] = 0
        for block in model.encoder.layer:  # nothing writes to FLAG, so it reaches `layer` unchanged
            block.attention.proj.weight[FLAG] = 0
            block.attention.proj.bias[FLAG] = 0
            block.mlp.fc2.weight[FLAG] = 0
            block.mlp.fc2.bias[FLAG] = 0
        if strength:
            for position in positions:  # about a third of the token's norm: no outlier at the input
                embeddings.position_embeddings[0, embeddings.num_position_prefix + position, FLAG] = scale / 3
            mlp = model.encoder.layer[layer].mlp
            mlp.fc1.weight[UNIT] = 0
            mlp.fc1.weight[UNIT, FLAG] = 10.0
            mlp.fc1.bias[UNIT] = -5.0  # layer-normed FLAG is about 1.7 on the planted patches, about 0 elsewhere
            direction = torch.randn(config.hidden_size)
            direction[FLAG] = 0
            mlp.fc2.weight[:, UNIT] = direction / direction.norm() * strength * scale / 10
    return model
