"""Add register tokens to a trained ViT (Darcet et al. 2024, §2.2: registers are extra learnable input tokens).

Existing registers keep their values; new ones are appended after them. With a CLS token each new register starts
from the CLS token's input embedding (CLS + its position embedding, the global token the network already knows) plus
truncated-normal noise of std `initializer_range` so that the new registers differ; without a CLS token they are
drawn from that truncated normal, the model's own token initialisation.
"""

from __future__ import annotations

import torch
from torch import nn


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "vit_registers", model)
    if not hasattr(base, "embeddings") or not hasattr(base.embeddings, "register_tokens"):
        raise TypeError(f"{type(model).__name__} is not a ViTRegisters model.")
    return base


def add_register_tokens(model: nn.Module, num_register_tokens: int, generator: torch.Generator | None = None) -> int:
    """Give `model` `num_register_tokens` trained registers in total; return how many were added.

    Updates `model.config.num_register_tokens` so that `save_pretrained` / `from_pretrained` round-trip. Asking for
    fewer registers than the model has raises `ValueError` (registers are never dropped silently).
    """
    base = _base_model(model)
    config = model.config
    current = int(config.num_register_tokens)
    if num_register_tokens < 0:
        raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}.")
    if num_register_tokens < current:
        raise ValueError(
            f"the model already has {current} registers; asked for {num_register_tokens} (registers are not removed)."
        )
    added = num_register_tokens - current
    if added == 0:
        return 0
    if getattr(config, "register_tokens_have_position_embedding", False):
        raise ValueError(
            "this model's registers have stored position embeddings (register_tokens_have_position_embedding=True): "
            "adding registers would need new position embeddings, which are not invented here."
        )
    embeddings = base.embeddings
    reference = embeddings.patch_embeddings.projection.weight  # device and dtype of the new tokens
    std = float(config.initializer_range)
    noise = torch.empty(1, added, config.hidden_size, dtype=torch.float32)
    if generator is None:
        nn.init.trunc_normal_(noise, mean=0.0, std=std, a=-2 * std, b=2 * std)
    else:
        noise.normal_(0.0, std, generator=generator).clamp_(-2 * std, 2 * std)
    fresh = noise.to(device=reference.device, dtype=reference.dtype)
    if embeddings.cls_token is not None:
        cls_input = embeddings.cls_token.detach()
        if embeddings.num_position_prefix:
            cls_input = cls_input + embeddings.position_embeddings.detach()[:, :1]
        fresh = fresh + cls_input
    if embeddings.register_tokens is not None:
        fresh = torch.cat([embeddings.register_tokens.detach(), fresh], dim=1)
    embeddings.register_tokens = nn.Parameter(fresh.contiguous())
    config.num_register_tokens = num_register_tokens
    if base.config is not config:  # the wrapper and the encoder normally share one config object
        base.config.num_register_tokens = num_register_tokens
    return added


__all__ = ["add_register_tokens"]
