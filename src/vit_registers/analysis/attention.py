"""Attention maps of CLS and of each register over the patches (Darcet et al. 2024, Fig. 1, 9, 16) and the attention
mass flowing between token groups.

Weights come from the model's "chosen layers" path (`attention_layers=[...]`): only those layers compute softmax
weights eagerly, the others keep the fast attention backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tokens import GROUPS, TokenLayout, base_model, grid_of, resolve_layers, run_model


@dataclass
class AttentionMaps:
    """Attention from CLS / each register to the patches of one layer, on the patch grid.

    cls: `(B, heads, h, w)` or None (model without CLS); registers: `(B, R, heads, h, w)` (R may be 0), the trained
    registers first, then the test-time registers (Jiang et al. 2025), as `register_labels` names them.
    """

    layer: int
    cls: torch.Tensor | None
    registers: torch.Tensor
    register_labels: tuple[str, ...] | None = None  # default: "reg 0", "reg 1", ...

    @property
    def cls_mean(self) -> torch.Tensor | None:
        """Head-averaged CLS map `(B, h, w)`."""
        return None if self.cls is None else self.cls.mean(1)

    @property
    def registers_mean(self) -> torch.Tensor:
        """Head-averaged register maps `(B, R, h, w)`."""
        return self.registers.mean(2)

    def named_maps(self, index: int = 0) -> dict[str, torch.Tensor]:
        """`{"CLS": (heads, h, w), "reg 0": ..., "test-time reg 0": ...}` for image `index` of the batch."""
        maps = {} if self.cls is None else {"CLS": self.cls[index]}
        labels = self.register_labels or [f"reg {register}" for register in range(self.registers.shape[1])]
        for register, label in enumerate(labels):
            maps[label] = self.registers[index, register]
        return maps


def register_labels(config, num_registers: int) -> tuple[str, ...]:
    """Names of the register maps: `"reg i"` for the trained registers, then `"test-time reg j"`."""
    trained = min(int(config.num_register_tokens), num_registers)
    return tuple(f"reg {i}" for i in range(trained)) + tuple(
        f"test-time reg {j}" for j in range(num_registers - trained)
    )


def maps_from_weights(weights: torch.Tensor, config, grid: tuple[int, int], layer: int = -1) -> AttentionMaps:
    """Cut `(B, heads, T, T)` softmax weights into CLS→patches and register→patches maps on the `grid`."""
    layout = TokenLayout.from_config(config, weights.shape[-1])
    patches = layout.patches.to(weights.device)
    batch, heads = weights.shape[:2]
    height, width = grid
    to_patches = weights.float().index_select(-1, patches)  # (B, heads, T, N)
    cls = None
    if len(layout.cls):
        cls = to_patches[:, :, layout.cls[0]].reshape(batch, heads, height, width)
    registers = to_patches.index_select(2, layout.registers.to(weights.device))  # (B, heads, R, N)
    registers = registers.permute(0, 2, 1, 3).reshape(batch, -1, heads, height, width)
    labels = register_labels(config, registers.shape[1])
    return AttentionMaps(layer=layer, cls=cls, registers=registers, register_labels=labels)


@torch.no_grad()
def attention_maps(model, pixel_values: torch.Tensor, layers: int | Sequence[int] | None = None) -> list[AttentionMaps]:
    """CLS→patches and register→patches attention of the chosen `layers` (default: last), per head.

    Runs the model once with `attention_layers=layers`; returns one [`AttentionMaps`] per layer in ascending order.
    """
    model = base_model(model)
    chosen = resolve_layers(layers, model.config.num_hidden_layers)
    outputs = run_model(model, pixel_values, attention_layers=chosen)
    grid = grid_of(pixel_values, model.config.patch_size)
    return [maps_from_weights(w, model.config, grid, layer) for layer, w in zip(chosen, outputs.attentions)]


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """Resize `(..., h, w)` maps to the image `size` (nearest keeps patch boundaries; "bilinear" smooths)."""
    shape = maps.shape
    flat = maps.float().reshape(-1, 1, *shape[-2:])
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    out = F.interpolate(flat, size=tuple(size), mode=mode, **kwargs)
    return out.reshape(*shape[:-2], *size)


def top_mass_mask(maps: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """DINO's visualisation (Caron et al. 2021): keep the highest-attention patches holding `mass` of the total.

    `(..., h, w)` → boolean mask of the same shape; the patches are those whose descending cumulative share stays
    within the top `mass` (DINO: sort ascending, keep where cumulative share > 1 − mass).
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must lie in (0, 1], got {mass}.")
    shape = maps.shape
    flat = maps.float().reshape(-1, shape[-2] * shape[-1])
    values, order = torch.sort(flat, dim=-1)
    share = values / values.sum(-1, keepdim=True).clamp_min(1e-12)
    keep_sorted = share.cumsum(-1) > 1.0 - mass
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(shape)


@dataclass
class AverageAttention:
    """Head-averaged maps averaged over a dataset: `cls (h, w)` or None and `registers (R, h, w)` (paper Fig. 16)."""

    layer: int
    cls: torch.Tensor | None
    registers: torch.Tensor
    count: int = 0


@torch.no_grad()
def dataset_average_maps(
    model, batches: Iterable[torch.Tensor], layers: int | Sequence[int] | None = None
) -> list[AverageAttention]:
    """Average the head-averaged CLS and register maps of the chosen `layers` over every image of `batches`.

    All batches must share one input size (the positional focus of each register is compared across images).
    """
    model = base_model(model)
    sums: dict[int, list] = {}
    count = 0
    size = None
    for pixel_values in batches:
        if size is None:
            size = tuple(pixel_values.shape[-2:])
        elif tuple(pixel_values.shape[-2:]) != size:
            raise ValueError(
                f"All images must share one input size to average maps: got {size} and "
                f"{tuple(pixel_values.shape[-2:])}."
            )
        for maps in attention_maps(model, pixel_values, layers):
            cls = None if maps.cls is None else maps.cls_mean.sum(0).cpu()
            registers = maps.registers_mean.sum(0).cpu()
            if maps.layer not in sums:
                sums[maps.layer] = [cls, registers]
            else:
                if cls is not None:
                    sums[maps.layer][0] += cls
                sums[maps.layer][1] += registers
        count += pixel_values.shape[0]
    if count == 0:
        raise ValueError("No images given: cannot average attention maps.")
    return [
        AverageAttention(layer, None if cls is None else cls / count, registers / count, count)
        for layer, (cls, registers) in sorted(sums.items())
    ]


@torch.no_grad()
def attention_flow(
    model, pixel_values: torch.Tensor, layers: int | Sequence[int] | None = "all"
) -> dict[int, dict[str, dict[str, float]]]:
    """Attention mass flowing between token groups per layer: `flow[layer][query_group][key_group]` is the share of
    attention that a token of `query_group` gives to all tokens of `key_group`, averaged over heads, tokens and
    images (each row sums to 1 over the groups the model has).

    Each chosen layer's weights are reduced as soon as they are computed (forward hooks), so all layers fit in memory.
    """
    model = base_model(model)
    depth = model.config.num_hidden_layers
    chosen = list(range(depth)) if layers == "all" else resolve_layers(layers, depth)
    flows: dict[int, dict[str, dict[str, float]]] = {}

    def make_hook(layer: int):
        def hook(module, args, output):
            attended, weights = output
            if weights is not None:
                flows[layer] = _group_flow(weights, model.config)
            return attended, None

        return hook

    handles = [model.encoder.layer[i].attention.register_forward_hook(make_hook(i)) for i in chosen]
    try:
        run_model(model, pixel_values, attention_layers=chosen)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: flows[layer] for layer in chosen}


def _group_flow(weights: torch.Tensor, config) -> dict[str, dict[str, float]]:
    layout = TokenLayout.from_config(config, weights.shape[-1])
    weights = weights.float()
    flow = {}
    for query in layout.nonempty():
        rows = weights.index_select(2, layout.group(query).to(weights.device))  # (B, heads, nq, T)
        flow[query] = {
            key: rows.index_select(3, layout.group(key).to(weights.device)).sum(-1).mean().item()
            for key in layout.nonempty()
        }
    return flow


__all__ = [
    "AttentionMaps",
    "AverageAttention",
    "attention_flow",
    "attention_maps",
    "dataset_average_maps",
    "maps_from_weights",
    "top_mass_mask",
    "upsample",
    "GROUPS",
]
