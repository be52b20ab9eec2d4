"""Reference weights at a realistic scale, for parity tests that can see a wrong activation or a wrong eps.

At the default init scale (std 0.02 weights, LayerScale 1e-5) the activations of a ViT are tiny: an exact GELU and
its tanh approximation agree to ~1e-7 there, and a residual branch scaled by 1e-5 hides almost anything. The
functions here redraw every parameter of any ViT-like `nn.Module` (timm, transformers, ours, official DINOv2/v3
layouts) so that the pre-activations of every MLP and the hidden states after every block have a std of at least 1,
and LayerScale gammas lie in 0.1–1 (the magnitudes of trained DINOv2 / DINOv3 models), then measure it:

    redraw_realistic_(reference, seed=0)
    stats = activation_stats(reference, pixel_values)
    assert min(stats.block_stds) >= 1 and min(stats.mlp_input_stds) >= 1

Parameters are recognised by their module and name, never by position, so the same seed gives a different draw to
two libraries' models: convert the reference's weights, do not redraw both.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

# Leaf names of LayerScale parameters: timm / official / ours `gamma`, timm Eva `gamma_1` / `gamma_2`, transformers
# `lambda1`.
LAYERSCALE_NAMES = re.compile(r"gamma(_\d)?|lambda1")
# Names of the first MLP projection (its output is the activation's input): ours / timm `fc1`, official SwiGLU `w12`
# or `w1`, transformers `up_proj` / `gate_proj` / `weights_in`, Eva `fc1_g` / `fc1_x`.
MLP_INPUT_NAMES = re.compile(r"fc1(_g)?|w12|w1|gate_proj|up_proj|weights_in")
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()


@torch.no_grad()
def redraw_realistic_(
    module: nn.Module,
    seed: int = 0,
    *,
    gain: float = 1.5,
    layerscale: tuple[float, float] = (0.1, 1.0),
    token_std: float = 1.0,
) -> nn.Module:
    """Redraw every parameter of `module` in place (seeded) at a realistic scale; returns it in eval mode.

    - Linear / convolution weights: normal with std `gain / sqrt(fan_in)` (inputs of std ~1 give outputs of std
      ~`gain`, so attention logits and MLP pre-activations span several units); every bias (Eva's `q_bias` /
      `v_bias` too) normal(0, 0.3).
    - Norm weights uniform in [0.7, 1.6] (trained LayerNorm scales are O(1) and mostly positive), biases
      normal(0, 0.3).
    - LayerScale (`gamma`, `gamma_1`, `lambda1`, any parameter of a `*LayerScale*` module): magnitudes uniform in
      `layerscale` with random signs, as in trained DINOv2 / DINOv3 (not the 1e-5 / 1.0 init).
    - Everything else (CLS / register / mask tokens, position embeddings, attention-pool latents): normal with std
      `token_std`.
    Buffers (RoPE periods, ...) are left alone.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=generator) * std

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator)

    for child in module.modules():
        for name, parameter in child.named_parameters(recurse=False):
            shape = parameter.shape
            if LAYERSCALE_NAMES.fullmatch(name) or "layerscale" in type(child).__name__.lower():
                signs = torch.where(torch.rand(shape, generator=generator) < 0.8, 1.0, -1.0)
                value = uniform(shape, *layerscale) * signs
            elif _is_norm(child):
                value = uniform(shape, 0.7, 1.6) if name == "weight" else normal(shape, 0.3)
            elif name.endswith("bias"):  # also Eva's `q_bias` / `v_bias`
                value = normal(shape, 0.3)
            elif isinstance(child, (nn.Linear, nn.Conv2d, nn.Conv1d)) or (
                name == "weight" and parameter.ndim in (1, 2)
            ):
                if parameter.ndim == 1:
                    value = normal(shape, 0.3)
                else:
                    fan_in = math.prod(shape[1:])
                    value = normal(shape, gain / math.sqrt(fan_in))
            else:
                value = normal(shape, token_std)
            parameter.copy_(value.to(parameter.dtype))
    return module.eval()


@dataclass
class ActivationStats:
    """Per-block standard deviations measured by `activation_stats`."""

    block_stds: list[float]  # hidden states after each block (the residual stream)
    mlp_input_stds: list[float]  # inputs of each block's MLP activation (output of its first MLP projection)

    @property
    def minimum(self) -> float:
        return min(self.block_stds + self.mlp_input_stds)


def find_blocks(module: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the longest `nn.ModuleList` / `nn.Sequential` whose entries all have one type."""
    candidates = [
        child
        for child in module.modules()
        if isinstance(child, (nn.ModuleList, nn.Sequential))
        and len(child)
        and len({type(entry) for entry in child}) == 1
    ]
    if not candidates:
        raise ValueError(f"No list of blocks in {type(module).__name__}")
    return max(candidates, key=len)


@torch.no_grad()
def activation_stats(module: nn.Module, *inputs, **kwargs) -> ActivationStats:
    """Run `module(*inputs, **kwargs)` with forward hooks and return the std of every block's output and of every
    MLP activation's input (in a SwiGLU, the gate's input)."""
    blocks = find_blocks(module)
    block_stds: list[float | None] = [None] * len(blocks)
    mlp_stds: list[float | None] = [None] * len(blocks)
    handles = []

    def first_tensor(output):
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, (tuple, list)):
            return next(item for item in output if isinstance(item, torch.Tensor))
        return output[0]

    def block_hook(index):
        def hook(_module, _inputs, output):
            block_stds[index] = first_tensor(output).float().std().item()

        return hook

    def mlp_hook(index, gated):
        def hook(_module, _inputs, output):
            value = output.float()
            if gated:  # packed [gate, value]: the activation sees the gate half
                value = value.chunk(2, dim=-1)[0]
            if mlp_stds[index] is None:
                mlp_stds[index] = value.std().item()

        return hook

    for index, block in enumerate(blocks):
        handles.append(block.register_forward_hook(block_hook(index)))
        found = {
            name.rsplit(".", 1)[-1]: child
            for name, child in block.named_modules()
            if isinstance(child, nn.Linear) and MLP_INPUT_NAMES.fullmatch(name.rsplit(".", 1)[-1])
        }
        if found:  # a gated MLP's activation reads the gate projection
            leaf = "gate_proj" if "gate_proj" in found else next(iter(found))
            gated = leaf == "w12" or (leaf == "fc1" and _packs_gate(block, found[leaf]))
            handles.append(found[leaf].register_forward_hook(mlp_hook(index, gated)))
    try:
        module.eval()(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, value in enumerate(block_stds) if value is None]
    if missing:
        raise ValueError(f"Blocks {missing} did not run")
    return ActivationStats(
        block_stds=[float(v) for v in block_stds], mlp_input_stds=[float(v) for v in mlp_stds if v is not None]
    )


def _packs_gate(block: nn.Module, fc1: nn.Linear) -> bool:
    """Whether `fc1` packs [gate, value] (a SwiGLU whose second projection reads half of fc1's width)."""
    second = [
        child for name, child in block.named_modules() if isinstance(child, nn.Linear) and name.endswith(("fc2", "w3"))
    ]
    return bool(second) and second[0].in_features * 2 == fc1.out_features
