"""Optimiser and schedule for fine-tuning ViTs with registers.

AdamW parameter groups follow the DINOv2 / BEiT recipes: no weight decay on the learned tokens (CLS, registers,
position embeddings, mask token), on norms, biases and LayerScale; layer-wise learning-rate decay (the embeddings,
CLS and registers count as layer 0, block `i` as layer `i + 1`, everything after the encoder as layer `L + 1`).
Registers are learned input tokens (Darcet et al. 2024, §2.2): like the CLS token they must not be pulled to zero.
"""

from __future__ import annotations

import re

import torch
from torch import nn

NO_DECAY_TOKENS = ("cls_token", "register_tokens", "position_embeddings", "mask_token")
_LAYER_PATTERN = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


def _num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_hidden_layers", None):
        return int(config.num_hidden_layers)
    indices = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _LAYER_PATTERN.search(n))]
    return max(indices) + 1 if indices else 0


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise LR decay: 0 for embeddings/tokens, i + 1 for block i, L + 1 after."""
    match = _LAYER_PATTERN.search(name)
    if match:
        return int(match.group(1)) + 1
    if ".embeddings." in f".{name}" or any(token in name for token in NO_DECAY_TOKENS):
        return 0
    return num_layers + 1


def uses_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """False for CLS/register/position/mask tokens, norms, biases and LayerScale (all 0-d/1-d tensors)."""
    if parameter.ndim <= 1 or name.endswith(".bias"):
        return False
    leaf = name.rsplit(".", 1)[-1]
    return leaf not in NO_DECAY_TOKENS and "norm" not in name.lower() and "layer_scale" not in name


def parameter_groups(
    model: nn.Module, learning_rate: float, weight_decay: float = 0.05, layer_decay: float = 1.0
) -> list[dict]:
    """AdamW groups for the trainable parameters of `model`, with per-group ``lr`` and ``weight_decay``.

    Each group also records ``layer_id`` and ``lr_scale`` (= ``layer_decay ** (L + 1 - layer_id)``), so schedules
    that rescale ``lr`` keep the decay. The groups run from the output to the input: the first one holds the peak
    learning rate, which is what `Trainer` (``get_last_lr()[0]``) and other loggers of the first group report.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    num_layers = _num_layers(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        depth = layer_id(name, num_layers)
        decay = uses_weight_decay(name, parameter)
        key = (depth, decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - depth)
            groups[key] = {
                "params": [],
                "names": [],
                "lr": learning_rate * scale,
                "weight_decay": weight_decay if decay else 0.0,
                "layer_id": depth,
                "lr_scale": scale,
            }
        groups[key]["params"].append(parameter)
        groups[key]["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters.")
    return [groups[key] for key in sorted(groups, key=lambda key: (-key[0], key[1]))]


def peak_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The largest learning rate of `optimizer`'s groups: the head's under layer-wise decay."""
    return max(float(group["lr"]) for group in optimizer.param_groups)


def create_optimizer(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float = 0.05,
    layer_decay: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` (group ``names`` are kept for inspection; AdamW ignores them).

    ``fused=None`` takes torch's fused AdamW where it supports every parameter (floating point, on the CPU, CUDA or
    another device with fused kernels; the default of transformers' `Trainer`, ``adamw_torch_fused``) and the
    foreach implementation otherwise; ``True`` insists on the fused one, ``False`` never takes it. The two give the
    same updates up to rounding; the fused step is several times faster on a CPU (README, benchmarks).
    """
    groups = parameter_groups(model, learning_rate, weight_decay, layer_decay)
    options = dict(lr=learning_rate, betas=betas, eps=eps)
    if fused is None:  # torch checks this only at the first step, so ask before
        devices = _fused_adamw_devices()
        parameters = [p for group in groups for p in group["params"]]
        fused = all(torch.is_floating_point(p) and p.device.type in devices for p in parameters)
    return torch.optim.AdamW(groups, **options, fused=fused)


# DINOv2's linear evaluation sweeps the base rate over 1e-5 ... 0.1; one default has to be chosen. 0.1, the top of that
# grid, was the best of it on frozen real DINOv2 ViT-S/14 features (600 CIFAR-10 images, batch 32, 3 / 10 / 30
# epochs: 47 / 56 / 56 % on 300 test images), where DINO's `eval_linear.py` default 1e-3 reached 13 / 29 / 39 % and
# the former AdamW 1e-4 12 / 25 / 38 % (docs/training.md).
LINEAR_PROBE_BASE_LR = 0.1
LINEAR_PROBE_REFERENCE_BATCH = 256


def linear_probe_learning_rate(global_batch_size: int, base_learning_rate: float = LINEAR_PROBE_BASE_LR) -> float:
    """The linear-evaluation learning rate of DINO and DINOv2: `base_learning_rate` × global batch / 256 (Caron et al.
    2021, `eval_linear.py`; Oquab et al. 2024, `eval/linear.py`, which sweeps the base over 1e-5 ... 0.1)."""
    return base_learning_rate * global_batch_size / LINEAR_PROBE_REFERENCE_BATCH


def create_linear_probe_optimizer(
    model: nn.Module, learning_rate: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.SGD:
    """SGD with momentum 0.9 and no weight decay over the trainable parameters, as DINO's and DINOv2's linear
    evaluation train their linear classifiers (cosine schedule: `create_scheduler`). Same groups as
    :func:`parameter_groups` without layer decay."""
    groups = parameter_groups(model, learning_rate, weight_decay, layer_decay=1.0)
    return torch.optim.SGD(groups, lr=learning_rate, momentum=momentum)


def _fused_adamw_devices() -> set[str]:
    """Device types with torch's fused AdamW kernels."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without the private helper: the devices every recent torch supports
        return {"cpu", "cuda"}
    return set(_get_fused_kernels_supported_devices())


def create_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up then cosine decay to 0 (`transformers.get_cosine_schedule_with_warmup`), per group."""
    from transformers import get_cosine_schedule_with_warmup

    if total_steps <= 0:
        raise ValueError(f"the schedule needs at least one training step, got {total_steps}.")
    return get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=min(warmup_steps, total_steps), num_training_steps=total_steps
    )


__all__ = [
    "LINEAR_PROBE_BASE_LR",
    "NO_DECAY_TOKENS",
    "create_linear_probe_optimizer",
    "create_optimizer",
    "create_scheduler",
    "layer_id",
    "linear_probe_learning_rate",
    "parameter_groups",
    "peak_learning_rate",
    "uses_weight_decay",
]
