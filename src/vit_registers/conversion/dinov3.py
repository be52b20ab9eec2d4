"""DINOv3 ViTs: official checkpoints (facebookresearch/dinov3) and transformers `DINOv3ViTModel` / `DINOv3ViTBackbone`.

    model = convert("dinov3", "dinov3_vits16_pretrain_lvd1689m-08c60483.pth", arch="dinov3_vits16")
    model = convert("transformers", "path/to/dinov3-vits16-pretrain-lvd1689m")

DINOv3 is a pre-norm ViT with 4 "storage" tokens (registers), no position embeddings and axial RoPE on the patch
tokens (`position_encoding="rope"`, `rope_type="dinov3"`), LayerNorm eps 1e-5, a GELU MLP or a SwiGLU (`swiglu`:
width aligned to 8, `swiglu64` for the 7B: 64). What the official checkpoints hold that the converted model does not:

- `blocks.*.attn.qkv.bias_mask`: DINOv3 multiplies the qkv bias by a mask that zeroes its key third. The converted
  model holds `bias * bias_mask` with the key third set to zero: a key bias adds the same value to every logit of a
  query, which softmax ignores, so this is exact whatever the stored key bias is.
- `rope_embed.periods`: a persistent buffer derived from the RoPE settings. It is checked against the periods the
  configuration gives (a mismatch is a `ConversionError`: wrong architecture or RoPE settings), then dropped.
- `local_cls_norm.*` (the 7B and the SAT-493M ViT-L): a norm of the CLS / storage tokens of local crops, used only
  in training; dropped.

The key bias of transformers' `DINOv3ViTModel` is absent (`key_bias=False`): it is added as zeros, for the same
reason. The registry of the seven official hub models is `OFFICIAL_DINOV3`; without `arch`, the head count comes from
the length of the stored periods (head_dim / 4), so the 7B (head_dim 128) converts by its shapes too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..configuration_vit_registers import ViTRegistersConfig

PERIODS_KEY = "rope_embed.periods"  # the renamed official buffer: checked by `check_periods`, then dropped

# Settings shared by every official DINOv3 ViT (dinov3/hub/backbones.py: norm_layer "layernormbf16" = LayerNorm
# eps 1e-5, pos_embed_rope_base 100, normalize_coords "separate", rescale_coords 2 in training, 4 storage tokens).
DINOV3_COMMON = dict(
    patch_size=16,
    image_size=224,
    num_register_tokens=4,
    layer_norm_eps=1e-5,
    hidden_act="gelu",
    layerscale_value=1e-5,
    qkv_bias=True,
    use_mask_token=True,
    cls_token_has_position_embedding=False,
    position_encoding="rope",
    rope_type="dinov3",
    rope_theta=100.0,
    rope_min_period=None,
    rope_max_period=None,
    rope_normalize_coords="separate",
    rope_shift_coords=None,
    rope_jitter_coords=None,
    rope_rescale_coords=2.0,
)

# The official hub entry points (dinov3/hub/backbones.py): width, depth, heads, FFN ratio and kind.
OFFICIAL_DINOV3 = {
    "dinov3_vits16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4.0),
    "dinov3_vits16plus": dict(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=6.0, mlp_type="swiglu", mlp_align_to=8
    ),
    "dinov3_vitb16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4.0),
    "dinov3_vitl16": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4.0),
    "dinov3_vitl16plus": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=6.0, mlp_type="swiglu", mlp_align_to=8
    ),
    "dinov3_vith16plus": dict(
        hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, mlp_ratio=6.0, mlp_type="swiglu", mlp_align_to=8
    ),
    "dinov3_vit7b16": dict(
        hidden_size=4096,
        num_hidden_layers=40,
        num_attention_heads=32,
        mlp_ratio=3.0,
        mlp_type="swiglu",
        mlp_align_to=64,
        qkv_bias=False,
    ),
}
for _spec in OFFICIAL_DINOV3.values():
    for _key, _value in DINOV3_COMMON.items():
        _spec.setdefault(_key, _value)
    _spec.setdefault("mlp_type", "mlp")
    _spec.setdefault("mlp_align_to", 8)

# The Hub repositories of the official weights (LVD-1689M), for the model card's `base_model`.
OFFICIAL_DINOV3_BASE_MODELS = {name: f"facebook/{name.replace('_', '-')}-pretrain-lvd1689m" for name in OFFICIAL_DINOV3}

TRANSFORMERS_MODEL_TYPE = "dinov3_vit"


def _error(message: str):
    from . import ConversionError  # the package imports this module: resolve at call time

    return ConversionError(message)


# ----------------------------------------------------------------------------------------------------------------------
# Which checkpoints are DINOv3's
# ----------------------------------------------------------------------------------------------------------------------
def is_transformers_dinov3(state: Mapping[str, Any]) -> bool:
    """transformers `DINOv3ViTModel` / `DINOv3ViTBackbone` keys: a bare conv patch embedding and `layer_scale*.lambda1`
    under `model.layer.*` (current) or `layer.*` (the names of the first Hub uploads)."""
    return any(key.endswith("embeddings.patch_embeddings.weight") for key in state) and any(
        re.fullmatch(r"(.*\.)?layer\.\d+\.layer_scale1\.lambda1", key) for key in state
    )


def is_dinov3(source: str, checkpoint: Any = None) -> bool:
    """Official DINOv3 weights, or a transformers DINOv3ViT directory / state dict."""
    if source == "dinov3":
        return True
    if source != "transformers" or checkpoint is None:
        return False
    if isinstance(checkpoint, Mapping):
        return is_transformers_dinov3(checkpoint)
    return transformers_model_type(checkpoint) == TRANSFORMERS_MODEL_TYPE


def transformers_model_type(checkpoint: Any) -> str | None:
    path = Path(checkpoint) / "config.json"
    return json.loads(path.read_text()).get("model_type") if path.is_file() else None


# ----------------------------------------------------------------------------------------------------------------------
# Before renaming
# ----------------------------------------------------------------------------------------------------------------------
def prepare_state_dict(source: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv3 keys the mapping tables can take (other checkpoints pass through unchanged).

    Official: `qkv.bias` becomes `bias * bias_mask` with the key third zeroed, `bias_mask` is dropped; an untied
    `cls_norm` (a second final norm for CLS and storage tokens) is refused. transformers: the absent key bias (and
    any bias a `*_bias=False` config left out) is added as zeros; a plain MLP's `up_proj` is `fc1` (in a gated MLP
    `up_proj` is the value half, next to `gate_proj`).
    """
    if source == "dinov3":
        return _prepare_official(state)
    if source == "transformers" and is_transformers_dinov3(state):
        return _prepare_transformers(state)
    return dict(state)


def _zero_key_third(bias: torch.Tensor) -> torch.Tensor:
    bias = bias.clone()
    third = bias.shape[0] // 3
    bias[third : 2 * third] = 0
    return bias


def _prepare_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prepared = {}
    for key, tensor in state.items():
        if key.endswith("qkv.bias_mask"):
            continue
        if re.fullmatch(r"(.*\.)?cls_norm\.(weight|bias)", key) and not key.split(".")[-2].startswith("local"):
            raise _error(
                f"The checkpoint has an untied CLS norm ({key}: untie_cls_and_patch_norms=True), which normalises the "
                "CLS and storage tokens with other weights than the patches; not supported (no official DINOv3 hub "
                "model has one)."
            )
        if key.endswith("qkv.bias"):
            mask = state.get(key + "_mask")
            if mask is not None:
                if mask.shape != tensor.shape or not torch.isfinite(mask).all():
                    raise _error(f"{key}_mask is not a finite mask of the bias's shape {tuple(tensor.shape)}.")
                tensor = tensor * mask.to(tensor.dtype)
            tensor = _zero_key_third(tensor)
        prepared[key] = tensor
    return prepared


def _prepare_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prepared = dict(state)
    gated = any(".mlp.gate_proj." in key for key in state)
    blocks = sorted({found[1] for key in state if (found := re.fullmatch(r"(.*layer\.\d+\.).*", key))})
    for block in blocks:
        width = state[f"{block}attention.q_proj.weight"].shape[0] if f"{block}attention.q_proj.weight" in state else 0
        has_qkv_bias = any(f"{block}attention.{name}_proj.bias" in state for name in "qkv")
        for name in ("q", "k", "v", "o") if has_qkv_bias else ("o",):
            key = f"{block}attention.{name}_proj.bias"
            if key not in state and width:
                prepared[key] = torch.zeros(width, dtype=state[f"{block}attention.q_proj.weight"].dtype)
        for name in ("gate_proj", "up_proj", "down_proj"):
            weight = state.get(f"{block}mlp.{name}.weight")
            if weight is not None and f"{block}mlp.{name}.bias" not in state:  # mlp_bias=False
                prepared[f"{block}mlp.{name}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
        if not gated:
            for kind in ("weight", "bias"):
                if f"{block}mlp.up_proj.{kind}" in prepared:
                    prepared[f"{block}mlp.fc1.{kind}"] = prepared.pop(f"{block}mlp.up_proj.{kind}")
    return prepared


# ----------------------------------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------------------------------
def spec_hints(
    source: str, renamed: Mapping[str, torch.Tensor], arch: str | None, spec: Mapping[str, Any]
) -> dict[str, Any]:
    """Config fields for DINOv3 weights on top of what `infer_config` read from the shapes (`spec`): the official
    table for a hub name (after checking that the weights are that architecture), DINOv3's settings otherwise, with
    the head count from the stored RoPE periods when there are some."""
    if arch is not None and source != "dinov3":
        raise _error(f"--arch names an official DINOv3 model; with --source {source} leave it out (got {arch!r}).")
    if arch is None:
        hints = {key: value for key, value in DINOV3_COMMON.items() if key not in ("patch_size", "image_size")}
        hints["num_register_tokens"] = spec["num_register_tokens"]
        hints["qkv_bias"] = spec["qkv_bias"]
        periods = renamed.get(PERIODS_KEY)
        if periods is not None and periods.numel() and spec["hidden_size"] % (4 * periods.numel()) == 0:
            hints["num_attention_heads"] = spec["hidden_size"] // (4 * periods.numel())
        return hints
    if arch not in OFFICIAL_DINOV3:
        raise _error(f"Unknown DINOv3 architecture {arch!r}; known: {', '.join(OFFICIAL_DINOV3)}")
    table = dict(OFFICIAL_DINOV3[arch])
    expected = ViTRegistersConfig(**{**table, "num_hidden_layers": 1})
    found = dict(
        hidden_size=spec["hidden_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        mlp_type=spec["mlp_type"],
        mlp_width=spec["intermediate_size"],
        qkv_bias=spec["qkv_bias"],
        num_register_tokens=spec["num_register_tokens"],
        patch_size=spec["patch_size"],
    )
    wanted = dict(
        hidden_size=table["hidden_size"],
        num_hidden_layers=table["num_hidden_layers"],
        mlp_type=table["mlp_type"],
        mlp_width=expected.mlp_hidden_size,
        qkv_bias=table["qkv_bias"],
        num_register_tokens=table["num_register_tokens"],
        patch_size=table["patch_size"],
    )
    differences = [f"{name} {found[name]} (expected {wanted[name]})" for name in wanted if found[name] != wanted[name]]
    if differences:
        raise _error(f"The checkpoint is not {arch}: {', '.join(differences)}.")
    return table


def transformers_config_hints(config: Mapping[str, Any]) -> dict[str, Any]:
    """Config fields from a transformers `DINOv3ViTConfig` (`config.json`): heads, eps, activation, LayerScale,
    RoPE θ and its train-time augmentation (`pos_embed_shift` / `_jitter` / `_rescale`), the stored image size."""
    gated = bool(config.get("use_gated_mlp", False))
    act = config.get("hidden_act", "gelu")
    if gated and act != "silu":
        raise _error(
            f"A gated DINOv3 MLP with hidden_act={act!r}: only SiLU-gated (SwiGLU) MLPs convert "
            "(ViTRegistersModel's SwiGLU gates with SiLU)."
        )
    size = config.get("image_size", 224)
    hints = dict(
        num_attention_heads=config["num_attention_heads"],
        layer_norm_eps=config.get("layer_norm_eps", 1e-5),
        rope_theta=float(config.get("rope_theta", 100.0)),
        rope_min_period=None,
        rope_max_period=None,
        rope_normalize_coords="separate",
        rope_shift_coords=config.get("pos_embed_shift"),
        rope_jitter_coords=config.get("pos_embed_jitter"),
        rope_rescale_coords=config.get("pos_embed_rescale"),
        position_encoding="rope",
        rope_type="dinov3",
        image_size=list(size) if isinstance(size, (list, tuple)) else size,
    )
    if not gated:
        hints["hidden_act"] = act
    if "layerscale_value" in config:
        hints["layerscale_value"] = config["layerscale_value"]
    return hints


def expected_periods(config: ViTRegistersConfig) -> torch.Tensor:
    """The RoPE periods DINOv3's `RopePositionEmbedding._init_weights` computes for `config` (float32)."""
    bands = config.hidden_size // config.num_attention_heads // 4
    if config.rope_min_period is not None:
        ratio = config.rope_max_period / config.rope_min_period
        periods = ratio ** torch.linspace(0, 1, bands, dtype=torch.float32)
        return periods / ratio * config.rope_max_period
    return config.rope_theta ** (2 * torch.arange(bands, dtype=torch.float32) / (2 * bands))


def check_periods(renamed: dict[str, torch.Tensor], config: ViTRegistersConfig) -> None:
    """Pop the stored `rope_embed.periods` from `renamed` after checking that they are the configuration's."""
    periods = renamed.pop(PERIODS_KEY, None)
    if periods is None:
        return
    # training checkpoints of DinoVisionTransformer's default pos_embed_rope_dtype="bf16" store rounded periods
    expected = expected_periods(config).to(periods.dtype).float()
    periods = periods.detach().float().reshape(-1)
    if periods.shape != expected.shape or not torch.allclose(periods, expected, rtol=1e-5, atol=0):
        settings = (
            f"min/max period {config.rope_min_period:g}/{config.rope_max_period:g}"
            if config.rope_min_period is not None
            else f"rope_theta {config.rope_theta:g}"
        )
        raise _error(
            f"The checkpoint's rope_embed.periods ({periods.numel()} values, {_short(periods)}) are not those of the "
            f"configuration ({config.num_attention_heads} heads, head size "
            f"{config.hidden_size // config.num_attention_heads}, {settings}: {expected.numel()} values, "
            f"{_short(expected)}): another architecture, head count or RoPE setting (pass num_attention_heads=, "
            "rope_theta= or rope_min_period= / rope_max_period=)."
        )


def _short(values: torch.Tensor) -> str:
    shown = ", ".join(f"{v:.4g}" for v in values[:4].tolist())
    return f"[{shown}{', …' if values.numel() > 4 else ''}]"


# ----------------------------------------------------------------------------------------------------------------------
# Reference and preprocessing
# ----------------------------------------------------------------------------------------------------------------------
def build_official_reference(state: Mapping[str, torch.Tensor], config: ViTRegistersConfig) -> torch.nn.Module:
    """timm's DINOv3 port (`Eva`, `vit_*_patch16_dinov3`) sized as `config`, loaded with the official-format `state`
    through timm's own `checkpoint_filter_fn` (which drops `bias_mask`, `periods`, `mask_token`, `local_cls_norm` and
    takes the query and value thirds of `qkv.bias`)."""
    from functools import partial

    import timm
    from timm.layers import LayerNorm
    from timm.models.eva import checkpoint_filter_fn

    if config.rope_min_period is not None:
        raise _error("timm's DINOv3 reference has no min/max-period RoPE: this checkpoint cannot be verified.")
    swiglu = config.mlp_type == "swiglu"
    kwargs: dict[str, Any] = dict(
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        img_size=[side * config.patch_size for side in config.image_grid],
        patch_size=config.patch_size,
        num_classes=0,
        qkv_bias=config.qkv_bias,
        mlp_ratio=config.mlp_hidden_size / config.hidden_size + 1e-9,  # Eva: the gated width for SwiGLU
        num_reg_tokens=config.num_register_tokens,
        rope_temperature=config.rope_theta,
        norm_layer=partial(LayerNorm, eps=config.layer_norm_eps),
        init_values=1.0 if config.layerscale_value is not None else None,
    )
    if swiglu:
        kwargs["swiglu_align_to"] = config.mlp_align_to
    arch = "vit_small_plus_patch16_dinov3" if swiglu else "vit_small_patch16_dinov3"
    reference = timm.create_model(arch, pretrained=False, **kwargs)
    state = {key: value for key, value in state.items() if not key.startswith("head.")}
    reference.load_state_dict(checkpoint_filter_fn(state, reference), strict=True)
    return reference.eval()


def image_processor():
    """`(processor, description)`: DINOv3's evaluation transform (its README's `make_transform`): resize to 256×256
    (bilinear, antialiased), no crop, ImageNet mean / std."""
    from transformers import BitImageProcessor
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    processor = BitImageProcessor(
        do_resize=True,
        size={"height": 256, "width": 256},
        resample=2,
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
        do_convert_rgb=True,
    )
    return processor, "DINOv3 evaluation transform — resize to 256×256 (bilinear), no crop, ImageNet mean/std"


def model_name(source: str) -> str:
    return "the official DINOv3 model" if source == "dinov3" else "transformers' `DINOv3ViTModel`"


__all__ = [
    "OFFICIAL_DINOV3",
    "OFFICIAL_DINOV3_BASE_MODELS",
    "DINOV3_COMMON",
    "is_dinov3",
    "is_transformers_dinov3",
    "prepare_state_dict",
    "spec_hints",
    "transformers_config_hints",
    "expected_periods",
    "check_periods",
    "build_official_reference",
    "image_processor",
    "model_name",
]
