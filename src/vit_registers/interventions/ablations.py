"""Token ablations: replace the CLS or register tokens at chosen layers, without touching the weights.

Parodi & Segado (2026) show registers are load-bearing: zeroing them collapses global and dense tasks, while
replacing them by their dataset mean does not. Four replacements are offered, applied to the *input* of each chosen
layer through forward pre-hooks that are removed when the context exits:

- `"zero"`: zeros;
- `"mean"`: the per-layer, per-token dataset mean (from `calibrate_token_statistics`);
- `"noise"`: Gaussian noise with the per-dimension mean and variance of that token at that layer;
- `"shuffle"`: the same token taken from another image of the batch (a fixed derangement when the batch allows).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..modeling_vit_registers import ViTRegistersModel

MODES = ("zero", "mean", "noise", "shuffle")


def _base_model(model) -> ViTRegistersModel:
    return model if isinstance(model, ViTRegistersModel) else model.base_model


def token_positions(model, tokens: str | Sequence[int]) -> list[int]:
    """Sequence positions of `"cls"`, `"registers"` (all trained registers) or register indices `[0, 2, ...]`."""
    config = _base_model(model).config
    # CLS and trained registers come before the patches (`config.token_slices`), so their slices are the same in a
    # sequence of any length: those of the prefix alone.
    groups, prefix = config.token_slices(config.num_prefix_tokens), range(config.num_prefix_tokens)
    cls_positions, register_positions = list(prefix[groups["cls"][0]]), list(prefix[groups["registers"][0]])
    if tokens == "cls":
        if not cls_positions:
            raise ValueError("This model has no CLS token to ablate.")
        return cls_positions
    if tokens == "registers":
        if not register_positions:
            raise ValueError("This model has no register tokens to ablate.")
        return register_positions
    if isinstance(tokens, str):
        raise ValueError(f"tokens must be 'cls', 'registers' or a list of register indices, got {tokens!r}.")
    positions = []
    for index in tokens:
        if not 0 <= int(index) < len(register_positions):
            raise ValueError(f"Register {index} does not exist (the model has {len(register_positions)}).")
        positions.append(register_positions[int(index)])
    return positions


@dataclass
class TokenStatistics:
    """Per-layer mean and variance of the prefix tokens at the input of each layer: `(layers, prefix, hidden)`."""

    mean: torch.Tensor
    variance: torch.Tensor
    count: int

    def save(self, path: str | Path) -> None:
        save_file(
            {"mean": self.mean.contiguous(), "variance": self.variance.contiguous()},
            str(path),
            metadata={"count": str(self.count)},
        )

    @classmethod
    def load(cls, path: str | Path) -> TokenStatistics:
        from safetensors import safe_open

        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            count = int(handle.metadata()["count"])
        return cls(tensors["mean"], tensors["variance"], count)


@torch.no_grad()
def calibrate_token_statistics(model, batches: Iterable[torch.Tensor]) -> TokenStatistics:
    """Dataset mean and variance of the CLS and register tokens at the input of every layer."""
    base = _base_model(model).eval()
    prefix = base.config.num_prefix_tokens
    total = total_sq = None
    count = 0
    for pixels in batches:
        hidden = torch.stack(base(pixels, output_hidden_states=True).hidden_states[:-1], dim=0)[:, :, :prefix]
        hidden = hidden.double()
        total = hidden.sum(1) if total is None else total + hidden.sum(1)
        total_sq = (hidden**2).sum(1) if total_sq is None else total_sq + (hidden**2).sum(1)
        count += pixels.shape[0]
    if count == 0:
        raise ValueError("calibrate_token_statistics needs at least one batch.")
    mean = total / count
    variance = (total_sq / count - mean**2).clamp_min(0)
    return TokenStatistics(mean.float(), variance.float(), count)


def _derangement(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    if batch_size < 2:
        return torch.arange(batch_size)
    return (torch.arange(batch_size) + 1 + torch.randint(batch_size - 1, (1,), generator=generator)) % batch_size


@contextmanager
def ablate_tokens(
    model,
    tokens: str | Sequence[int] = "registers",
    layers: int | Sequence[int] | None = None,
    mode: str = "zero",
    statistics: TokenStatistics | None = None,
    seed: int = 0,
):
    """Within the `with` block, replace `tokens` at the input of `layers` (default: every layer) by `mode`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if mode in ("mean", "noise") and statistics is None:
        raise ValueError(f"mode={mode!r} needs statistics from calibrate_token_statistics().")
    base = _base_model(model)
    depth = base.config.num_hidden_layers
    chosen = range(depth) if layers is None else [layers] if isinstance(layers, int) else layers
    chosen = sorted({int(layer) % depth for layer in chosen})
    positions = token_positions(base, tokens)
    generator = torch.Generator().manual_seed(seed)

    def make_hook(layer: int):
        def hook(module, args):
            hidden = args[0].clone()
            index = torch.tensor(positions, device=hidden.device)
            if mode == "zero":
                hidden[:, index] = 0
            elif mode == "shuffle":
                order = _derangement(hidden.shape[0], generator).to(hidden.device)
                hidden[:, index] = args[0][order][:, index]
            else:
                mean = statistics.mean[layer, positions].to(hidden)
                if mode == "mean":
                    hidden[:, index] = mean
                else:
                    std = statistics.variance[layer, positions].sqrt().to(hidden)
                    noise = torch.randn((hidden.shape[0], *mean.shape), generator=generator).to(hidden)
                    hidden[:, index] = mean + std * noise
            return (hidden, *args[1:])

        return hook

    handles = [base.encoder.layer[layer].register_forward_pre_hook(make_hook(layer)) for layer in chosen]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["MODES", "TokenStatistics", "ablate_tokens", "calibrate_token_statistics", "token_positions"]
