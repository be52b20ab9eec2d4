"""timm's register ViT families: which convert, what each needs, and a clear refusal for the others.

timm builds its register ViTs from two classes. `VisionTransformer` (`reg_token`, learned `pos_embed`, `ls1` /
`ls2`, an optional attention pool `attn_pool`) holds the DINOv2, TIPSv2, SBB `*_reg*_gap_*` and SO150M models; the
SO150M ones store a position embedding for every register too (`no_embed_class=False`). `Eva` (`gamma_1` /
`gamma_2`, `q_bias` / `v_bias` without a key bias, SwiGLU as `fc1_g` / `fc1_x`, no `pos_embed`) holds the SBB RoPE
models (`RotaryEmbeddingCat`) and timm's DINOv3 port (`RotaryEmbeddingDinoV3`).

The weights tell the two classes apart; the timm model name (`--arch`) tells what the weights cannot: the rotary
variant and its settings, the norm epsilon, the activation, the pooling and the head count. The named model is built
on the meta device (nothing allocated) and read; any part of it that `ViTRegistersModel` cannot express stops the
conversion with a `ConversionError` naming it and the families that do convert.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ..configuration_vit_registers import ViTRegistersConfig

# Families that convert, as they are named in error messages and docs/conversion.md.
SUPPORTED_FAMILIES = (
    "DINOv2 (vit_*_patch14_reg4_dinov2, vit_*_patch14_dinov2)",
    "TIPSv2 (vit_*_patch14_reg1_tipsv2)",
    "SBB ViTs (vit_{wee,little,medium,mediumd,betwixt,base}_patch16_reg{1,4}_gap_*)",
    "SO150M (vit_so150m_patch16_reg4_{gap,map}_*, vit_so150m2_patch16_reg1_gap_*)",
    "SBB RoPE ViTs (vit_*_patch16_rope_reg{1,4}_gap_256)",
    "DINOv3 (vit_*_patch16_dinov3, vit_*_patch16_dinov3_qkvb)",
    "DeiT-III and plain timm ViTs (deit3_*, vit_*)",
)

# Register families that stay out: (model-name pattern, what it is, why it cannot convert).
UNSUPPORTED_ARCHS = (
    (
        r"vit_d(p)?(wee|little)_.*",
        "differential attention (vit_dwee_*, vit_dlittle_*, vit_dpwee_*)",
        "two softmax maps subtracted with learned lambdas and a sub-norm per head",
    ),
    (
        r"vit_p(wee|little)_.*",
        "parallel blocks (vit_pwee_*)",
        "attention and MLP computed in parallel from one fused input projection",
    ),
    (r"naflexvit_.*", "NaFlex ViTs (naflexvit_*)", "variable-resolution patch sequences with their own embedding"),
)

# Checkpoint keys of the families that stay out, for checkpoints converted without --arch.
UNSUPPORTED_KEYS = (
    (r"blocks\.\d+\.(attn\.)?(lambda_[qk]\d|sub_norm\..*)", UNSUPPORTED_ARCHS[0][1:]),
    (r"blocks\.\d+\.(in_proj|in_norm|attn_out_proj|mlp_out_proj|out_proj)\..*", UNSUPPORTED_ARCHS[1][1:]),
    (r"embeds\..*", UNSUPPORTED_ARCHS[2][1:]),
    (
        r"blocks\.\d+\.mlp\.norm\..*",
        ("an inner MLP norm (Eva scale_mlp, `mlp.norm`)", "a LayerNorm inside the MLP, after the activation"),
    ),
    (
        r"blocks\.\d+\.attn\.(norm|q_norm|k_norm|gate)\..*",
        ("an attention-inner norm or gate (Eva scale_attn_inner / qk_norm / gated)", "extra layers in the attention"),
    ),
)


def supported_text() -> str:
    return "supported timm families: " + "; ".join(SUPPORTED_FAMILIES)


def _refusal(what: str, why: str) -> str:
    return f"{what}: not supported ({why}); {supported_text()}."


def _error(message: str):
    from . import ConversionError  # the package imports this module: resolve at call time

    return ConversionError(message)


def check_arch(arch: str) -> None:
    """Refuse, before anything is read, a timm model name of a family that stays out."""
    for pattern, what, why in UNSUPPORTED_ARCHS:
        if re.fullmatch(pattern, arch):
            raise _error(f"{arch}: {_refusal(what, why)}")


def refuse_keys(keys) -> None:
    """Refuse a checkpoint whose keys belong to a family that stays out (named, with the ones that convert)."""
    for pattern, (what, why) in UNSUPPORTED_KEYS:
        found = next((key for key in keys if re.fullmatch(pattern, key)), None)
        if found is not None:
            raise _error(f"{_refusal(what, why)} (checkpoint key {found})")


def is_eva(state: Mapping[str, torch.Tensor]) -> bool:
    """timm `Eva` weights (LayerScale as `gamma_1`, query / value biases as `q_bias` / `v_bias`, or no `pos_embed`)."""
    return any(re.fullmatch(r"blocks\.\d+\.(gamma_1|attn\.q_bias)", key) for key in state) or (
        "patch_embed.proj.weight" in state and "pos_embed" not in state
    )


def require_arch(state: Mapping[str, torch.Tensor]) -> None:
    """Refuse Eva weights without the timm model name: the rotary variant and its settings (type, temperature,
    reference grid, eps) are not in them, and guessing would give a model that runs but computes something else."""
    refuse_keys(state)  # a family that stays out is named first
    if is_eva(state):
        raise _error(
            "timm Eva weights (gamma_1 / q_bias keys, or no pos_embed) need --arch, the timm model name (e.g. "
            "vit_betwixt_patch16_rope_reg4_gap_256, vit_small_patch16_dinov3): the rotary position encoding and its "
            "settings are not stored in the weights."
        )


def prepare_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm keys the mapping table can take: an Eva block's key bias (a non-persistent zero buffer, absent from its
    state dict) is added as zeros, so that `q_bias`, `k_bias`, `v_bias` fill the fused qkv bias. Exact: a key bias
    adds the same value to every logit of a query, which softmax ignores."""
    refuse_keys(state)
    prepared = dict(state)
    for key, tensor in state.items():
        found = re.fullmatch(r"(.*blocks\.\d+\.attn\.)q_bias", key)
        if found and f"{found[1]}k_bias" not in state:
            prepared[f"{found[1]}k_bias"] = torch.zeros_like(tensor)
    return prepared


# ----------------------------------------------------------------------------------------------------------------------
# What the timm model name says
# ----------------------------------------------------------------------------------------------------------------------
def _activation_name(act: torch.nn.Module, arch: str) -> str:
    if isinstance(act, torch.nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    if isinstance(act, torch.nn.SiLU):
        return "silu"
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    raise _error(f"{arch}: MLP activation {type(act).__name__} is not supported; {supported_text()}.")


def _rope_hints(arch: str, rope: torch.nn.Module) -> dict[str, Any]:
    """Config fields of timm's rotary embedding `rope`; refuses the variants the model does not have."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingDinoV3

    if getattr(rope, "grid_offset", 0.0) or getattr(rope, "grid_indexing", "ij") != "ij":
        raise _error(f"{arch}: a RoPE grid offset or 'xy' indexing is not supported; {supported_text()}.")
    if getattr(rope, "aug_active", False):
        raise _error(f"{arch}: RoPE coordinate augmentation in timm's eval path is not supported.")
    if type(rope) is RotaryEmbeddingCat:
        if rope.in_pixels or rope.linear_bands or rope.rotate_half or rope.grid_type != "index":
            raise _error(
                f"{arch}: RotaryEmbeddingCat with pixel / linear bands or half rotation is not supported; "
                f"{supported_text()}."
            )
        reference = list(rope.ref_feat_shape) if rope.ref_feat_shape is not None else None
        return dict(rope_type="eva", rope_theta=float(rope.temperature), rope_reference_grid=reference)
    if type(rope) is RotaryEmbeddingDinoV3:
        if not rope.rotate_half:
            raise _error(f"{arch}: DINOv3 RoPE with interleaved rotation is not supported; {supported_text()}.")
        return dict(
            rope_type="dinov3",
            rope_theta=float(rope.temperature) if rope.temperature is not None else 100.0,
            rope_min_period=rope.min_period,
            rope_max_period=rope.max_period,
            rope_normalize_coords=rope.normalize_coords,
        )
    raise _error(f"{arch}: rotary embedding {type(rope).__name__} is not supported; {supported_text()}.")


def _check_structure(arch: str, model: torch.nn.Module) -> None:
    """Refuse what the layout of the weights cannot show but `ViTRegistersModel` cannot do."""
    from timm.layers import AttentionPoolLatent

    block = model.blocks[0]
    attention = block.attn
    if type(block).__name__ not in ("Block", "EvaBlock"):
        raise _error(f"{arch}: block type {type(block).__name__} is not supported; {supported_text()}.")
    if type(attention).__name__ not in ("Attention", "EvaAttention"):
        raise _error(f"{arch}: attention type {type(attention).__name__} is not supported; {supported_text()}.")
    extras = [
        name
        for name in ("q_norm", "k_norm", "norm")
        if not isinstance(getattr(attention, name, torch.nn.Identity()), torch.nn.Identity)
    ]
    extras += ["gated attention"] if getattr(attention, "gate", None) is not None else []
    if not isinstance(getattr(block.mlp, "norm", torch.nn.Identity()), torch.nn.Identity):
        extras.append("mlp.norm (scale_mlp)")
    extras += ["norm_pre"] if not isinstance(getattr(model, "norm_pre", torch.nn.Identity()), torch.nn.Identity) else []
    if getattr(block, "gamma_1", None) is not None and getattr(block, "gamma_2", None) is None:
        extras.append("LayerScale on the attention only")
    if getattr(model, "rope", None) is not None and getattr(model, "pos_embed", None) is not None:
        extras.append("RoPE together with learned position embeddings")
    if getattr(model, "rope_mixed", False):
        extras.append("mixed (learned per-layer) RoPE")
    pool = getattr(model, "attn_pool", None)
    if pool is not None:
        if not isinstance(pool, AttentionPoolLatent) or pool.latent_len != 1 or pool.pos_embed is not None:
            extras.append(f"attention pool {type(pool).__name__} other than one latent without position embedding")
        elif not isinstance(pool.q_norm, torch.nn.Identity) or getattr(model, "pool_include_prefix", False):
            extras.append("attention pool with q/k norm or over the prefix tokens")
    if extras:
        raise _error(f"{arch}: {', '.join(extras)}: not supported; {supported_text()}.")


def registry_hints(arch: str, model: torch.nn.Module) -> dict[str, Any]:
    """Config fields of timm's `arch` (built on the meta device as `model`) that the weights cannot show; the head
    count is `_timm_registry_hints`'s (only when the widths agree)."""
    if not getattr(model, "blocks", None):
        raise _error(f"{arch}: not a ViT with transformer blocks; {supported_text()}.")
    _check_structure(arch, model)
    block = model.blocks[0]
    hints: dict[str, Any] = {"layer_norm_eps": float(block.norm1.eps)}
    act = getattr(block.mlp, "act", None)
    if act is not None and not type(block.mlp).__name__.startswith(("SwiGLU", "GluMlp")):
        hints["hidden_act"] = _activation_name(act, arch)
    pool = {"token": "cls", "avg": "mean", "map": "map"}.get(getattr(model, "global_pool", None))
    if pool is not None:
        hints["pooling"] = pool
    if getattr(model, "attn_pool", None) is not None:
        pool_act = _activation_name(model.attn_pool.mlp.act, arch)
        if pool_act != hints.get("hidden_act", "gelu"):
            raise _error(f"{arch}: the attention pool's MLP uses {pool_act}, the blocks another; not supported.")
    if getattr(model, "rope", None) is not None:
        hints.update(position_encoding="rope", **_rope_hints(arch, model.rope))
        image_size = getattr(model.patch_embed, "img_size", None)
        if image_size is not None:
            hints["image_size"] = list(image_size)
    return hints


def check_weights(renamed: Mapping[str, torch.Tensor], config: ViTRegistersConfig) -> None:
    """Refuse what the weights show that the configuration cannot hold (the attention pool's MLP width)."""
    if "pooler.mlp.fc1.weight" in renamed and renamed["pooler.mlp.fc1.weight"].shape[0] != config.mlp_hidden_size:
        raise _error(
            f"The attention pool's MLP is {renamed['pooler.mlp.fc1.weight'].shape[0]} wide, the blocks' "
            f"{config.mlp_hidden_size}: not supported (the pool's MLP has the blocks' width here)."
        )


# ----------------------------------------------------------------------------------------------------------------------
# The reference: timm's own model
# ----------------------------------------------------------------------------------------------------------------------
def reference_kwargs(config: ViTRegistersConfig, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """`timm.create_model` keywords on top of `timm_create_kwargs` for an Eva checkpoint: Eva's `mlp_ratio` is the
    gated width for SwiGLU (not fc1's), and the rotary settings the conversion used (`ref_feat_shape`,
    `rope_temperature`) so that the reference rotates as the converted model does."""
    if not is_eva(state):
        return {}
    kwargs: dict[str, Any] = dict(mlp_ratio=config.mlp_hidden_size / config.hidden_size + 1e-9)
    if config.position_encoding == "rope":
        kwargs["rope_temperature"] = config.rope_theta
        if config.rope_type == "eva" and config.rope_reference_grid is not None:
            kwargs["ref_feat_shape"] = tuple(int(side) for side in config.rope_reference_grid)
    return kwargs


def reference_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint as timm's model loads it: without the derived RoPE buffers older timm versions saved."""
    return {key: value for key, value in state.items() if not key.startswith("rope.")}


def rope_summary(config: ViTRegistersConfig, name: str = "timm") -> str:
    """The converter's / model card's sentence for a model without position embeddings (see `interpolation_summary`)."""
    if config.rope_type == "eva":
        grid = config.rope_reference_grid
        detail = f"EVA RoPE, θ {config.rope_theta:g}" + (
            f", patch indices scaled to the {grid[0]}×{grid[1]} reference grid" if grid else ", unscaled patch indices"
        )
    else:
        detail = f"DINOv3 RoPE, θ {config.rope_theta:g}, coordinates normalised to [-1, 1]"
    return (
        f"not stored: the model uses rotary position encoding ({detail}) computed for each patch grid as {name} "
        "does, so nothing is resampled"
    )


__all__ = [
    "SUPPORTED_FAMILIES",
    "UNSUPPORTED_ARCHS",
    "check_arch",
    "refuse_keys",
    "is_eva",
    "require_arch",
    "prepare_state_dict",
    "registry_hints",
    "check_weights",
    "reference_kwargs",
    "reference_state",
    "rope_summary",
    "supported_text",
]
