"""Where CLS, registers and patches sit in a vit_registers sequence, and running the model for analysis."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..modeling_vit_registers import resolve_layer_indices

GROUPS = ("cls", "registers", "patches")


@dataclass(frozen=True)
class TokenLayout:
    """Index tensors of each token group in a sequence of `num_tokens` (`[CLS] + registers + patches + ttr`)."""

    cls: torch.Tensor
    registers: torch.Tensor
    patches: torch.Tensor

    @classmethod
    def from_config(cls, config, num_tokens: int) -> TokenLayout:
        groups = config.token_slices(num_tokens)  # the model's own layout (ViTRegistersConfig.token_slices)
        if groups["patches"][0].stop <= groups["patches"][0].start:
            raise ValueError(f"A sequence of {num_tokens} tokens has no patch tokens under this model's layout.")
        positions = torch.arange(num_tokens)
        return cls(**{name: torch.cat([positions[group] for group in groups[name]]) for name in GROUPS})

    def group(self, name: str) -> torch.Tensor:
        return getattr(self, name)

    def nonempty(self) -> list[str]:
        return [name for name in GROUPS if len(self.group(name))]


def grid_of(pixel_values: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """Patch grid `(h, w)` of a `(B, C, H, W)` input."""
    return pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size


def base_model(model):
    """The bare `ViTRegistersModel` inside a classification model or backbone (or the model itself)."""
    return getattr(model, "vit_registers", model)


def resolve_layers(layers: int | Sequence[int] | None, depth: int) -> list[int]:
    """Non-negative, sorted, unique layer indices (negative ones count from the end); `None` → last layer."""
    return list(resolve_layer_indices([-1] if layers is None else layers, depth))


@torch.no_grad()
def run_model(model, pixel_values: torch.Tensor, attention_layers: Sequence[int] | None = None):
    """One forward pass returning pre-norm hidden states (L+1) and, for `attention_layers` only, attention weights."""
    model = base_model(model)
    device = next(model.parameters()).device
    kwargs = {"output_hidden_states": True}
    if attention_layers:
        kwargs["attention_layers"] = list(attention_layers)
    return model(pixel_values.to(device=device, dtype=next(model.parameters()).dtype), **kwargs)
