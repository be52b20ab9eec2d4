"""Load official DINOv2, timm and transformers checkpoints into `ViTRegistersModel`.

    model = convert("dinov2", "dinov2_vits14_reg4_pretrain.pth", arch="dinov2_vits14_reg")
    model = convert("timm", timm_model.state_dict(), arch="vit_small_patch14_reg4_dinov2")
    model = convert("transformers", "path/to/dinov2-with-registers-small")

The architecture comes from `arch` (an official hub name or a timm model name) or, when absent, from the tensor shapes
(width, depth, registers, CLS token, LayerScale, SwiGLU, position-embedding layout). Shapes cannot tell the number of
heads: it defaults to `hidden_size // 64`, as in every released ViT; pass `num_attention_heads=` (or any other
`ViTRegistersConfig` field) as a keyword to override.

`build_reference` returns the source library's own model with the same weights, and `reference_tokens` splits its
output into CLS / registers / patches, so that callers can compare every token.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..configuration_vit_registers import ViTRegistersConfig
from ..modeling_vit_registers import ViTRegistersModel
from . import dinov3, timm_families
from .dinov3 import OFFICIAL_DINOV3
from .mappings import IGNORED, PREFIXES, RESHAPED, RULES

SOURCES = tuple(RULES)
INTERPOLATIONS = ("source", "official")


class ConversionError(ValueError):
    """A checkpoint cannot be converted: unreadable, of another architecture, or with missing/unexpected keys."""


# Official DINOv2 hub entry points (hubconf.py): width, depth, heads, MLP kind. `_reg` variants have 4 registers and
# resample position embeddings with antialias and no offset; the others without antialias and offset 0.1.
OFFICIAL_DINOV2 = {
    "dinov2_vits14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "dinov2_vitb14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "dinov2_vitl14": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "dinov2_vitg14": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_type="swiglu"),
}
OFFICIAL_DINOV2.update({f"{name}_reg": dict(spec) for name, spec in list(OFFICIAL_DINOV2.items())})


def official_interpolation(num_register_tokens: int) -> dict[str, Any]:
    """How the official DINOv2 models resample position embeddings (`hubconf.py`): with registers antialiased and
    without offset, without registers not antialiased and with DINO's offset 0.1 (`scale_factor = (n + 0.1) / M`)."""
    registers = num_register_tokens > 0
    return dict(interpolate_antialias=registers, interpolate_offset=0.0 if registers else 0.1)


for _name, _spec in OFFICIAL_DINOV2.items():
    _registers = 4 if _name.endswith("_reg") else 0
    _spec.update(
        patch_size=14,
        image_size=518,
        layerscale_value=1e-5,
        num_register_tokens=_registers,
        **official_interpolation(_registers),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ----------------------------------------------------------------------------------------------------------------------
def load_state_dict(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict from a mapping, a `.pth`/`.pt`/`.bin` (read with `weights_only=True`), a `.safetensors` file, or a
    transformers model directory (single or sharded safetensors / bin)."""
    if isinstance(checkpoint, Mapping):
        state = dict(checkpoint)
    else:
        path = Path(checkpoint)
        if not path.exists():
            raise ConversionError(f"Checkpoint not found: {path}")
        if path.is_dir():
            return _load_directory(path)
        state = _load_file(path)
    for key in ("model", "state_dict", "teacher"):  # training checkpoints wrap the weights
        if key in state and isinstance(state[key], Mapping) and not isinstance(state[key], torch.Tensor):
            state = dict(state[key])
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ConversionError(f"Checkpoint entries that are not tensors: {bad[:5]}")
    return state


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every reader failure means the same thing to the user
        raise ConversionError(
            f"Could not read checkpoint {path}: it is corrupt or not a tensor file ({error})."
        ) from None


def _load_directory(path: Path) -> dict[str, torch.Tensor]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_file = path / index_name
        if index_file.exists():
            shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_load_file(path / shard))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return _load_file(path / name)
    raise ConversionError(f"No model.safetensors or pytorch_model.bin in {path}")


# ----------------------------------------------------------------------------------------------------------------------
# Renaming
# ----------------------------------------------------------------------------------------------------------------------
def rename_state_dict(source: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the source family's mapping table (`mappings.py`); raise on keys it does not know."""
    _check_source(source)
    if source == "timm":  # families that stay out are named; Eva's absent key bias is added as zeros
        state = timm_families.prepare_state_dict({_strip(source, key): value for key, value in state.items()})
    state = dinov3.prepare_state_dict(source, state)  # DINOv3: masked qkv bias, absent key bias; others unchanged
    parts: dict[str, dict[int, tuple[int, torch.Tensor]]] = {}
    unexpected = []
    for key, tensor in state.items():
        key = _strip(source, key)
        if any(re.fullmatch(pattern, key) for pattern in IGNORED[source]):
            continue
        for rule in RULES[source]:
            found = rule.match(key)
            if found is not None:
                target, part = found
                index, count = part or (0, 1)
                slots = parts.setdefault(target, {})
                if index in slots:
                    raise ConversionError(f"Two checkpoint keys map to {target} (second: {key}).")
                slots[index] = (count, tensor)
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise ConversionError(
            f"{len(unexpected)} key(s) are not part of a {source} ViT checkpoint (is it another architecture or "
            f"another --source?): {', '.join(sorted(unexpected)[:8])}"
        )
    renamed = {}
    for target, slots in parts.items():
        count = next(iter(slots.values()))[0]
        if sorted(slots) != list(range(count)):
            raise ConversionError(f"{target} needs {count} parts in the checkpoint, found {len(slots)}.")
        tensors = [slots[i][1] for i in range(count)]
        renamed[target] = tensors[0] if count == 1 else torch.cat(tensors, dim=0)
    for target in RESHAPED:
        if target in renamed and renamed[target].ndim == 2:
            renamed[target] = renamed[target].unsqueeze(0)
    return renamed


def _strip(source: str, key: str) -> str:
    for prefix in PREFIXES[source]:
        key = key.removeprefix(prefix)
    return key


# ----------------------------------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------------------------------
def infer_config(source: str, renamed: Mapping[str, torch.Tensor], arch: str | None = None, **overrides: Any):
    """`ViTRegistersConfig` for renamed weights: the official table for DINOv2 hub names, the shapes otherwise."""
    _check_source(source)
    if "embeddings.patch_embeddings.projection.weight" not in renamed:
        raise ConversionError("The checkpoint has no patch embedding: it is not a ViT checkpoint.")
    projection = renamed["embeddings.patch_embeddings.projection.weight"]
    hidden, channels, patch = projection.shape[0], projection.shape[1], projection.shape[-1]
    layers = sorted({int(k.split(".")[2]) for k in renamed if k.startswith("encoder.layer.")})
    if not layers or layers != list(range(len(layers))):
        raise ConversionError(f"The checkpoint's transformer blocks are not numbered 0..L-1: {layers[:10]}")
    has_cls = "embeddings.cls_token" in renamed
    registers = renamed["embeddings.register_tokens"].shape[1] if "embeddings.register_tokens" in renamed else 0
    fc1 = renamed["encoder.layer.0.mlp.fc1.weight"].shape[0]
    fc2_in = renamed["encoder.layer.0.mlp.fc2.weight"].shape[1]
    swiglu = fc1 == 2 * fc2_in
    spec: dict[str, Any] = dict(
        hidden_size=hidden,
        num_channels=channels,
        patch_size=patch,
        num_hidden_layers=len(layers),
        num_attention_heads=max(1, hidden // 64),
        **_position_layout(renamed, has_cls, registers, patch),
        mlp_type="swiglu" if swiglu else "mlp",
        intermediate_size=fc2_in,
        qkv_bias="encoder.layer.0.attention.qkv.bias" in renamed,
        layerscale_value=1.0 if "encoder.layer.0.layer_scale1.gamma" in renamed else None,
        num_register_tokens=registers,
        use_cls_token=has_cls,
        use_mask_token="embeddings.mask_token" in renamed,
        use_final_norm="layernorm.weight" in renamed,
        use_fc_norm="fc_norm.weight" in renamed,
        pooling="map" if "pooler.latent" in renamed else "cls" if has_cls else "mean",
        layer_norm_eps=1e-6,
        interpolate_antialias=True,
        interpolate_offset=0.0,
    )
    if source == "dinov2":
        if arch is not None:
            if arch not in OFFICIAL_DINOV2:
                raise ConversionError(f"Unknown DINOv2 architecture {arch!r}; known: {', '.join(OFFICIAL_DINOV2)}")
            spec.update(OFFICIAL_DINOV2[arch])
        else:  # the official no-register models resample without antialias and with DINO's 0.1 offset
            spec.update(official_interpolation(registers))
    elif source == "timm" and arch is not None:
        spec.update(_timm_registry_hints(arch, hidden))
        registry_model = _timm_registry_model(arch)
        if registry_model is not None:  # what the weights cannot show: RoPE, eps, activation, pooling
            spec.update(timm_families.registry_hints(arch, registry_model))
    if source == "dinov3" or (source == "transformers" and spec.get("position_encoding") == "rope"):
        spec.update(dinov3.spec_hints(source, renamed, arch, spec))
    spec.update(overrides)
    config = ViTRegistersConfig(**spec)
    if source == "timm":
        timm_families.check_weights(renamed, config)
    return config


def _position_layout(renamed: Mapping[str, torch.Tensor], has_cls: bool, registers: int, patch: int) -> dict:
    """Config fields for the stored position embeddings: which prefix tokens they cover (none, the CLS token, or CLS
    and registers, as timm's `no_embed_class=False` with registers) and the square grid they leave for the patches.
    Without position embeddings the model is a RoPE one (the rotary settings come from the architecture)."""
    if "embeddings.position_embeddings" not in renamed:
        return dict(position_encoding="rope", cls_token_has_position_embedding=False)
    num_positions = renamed["embeddings.position_embeddings"].shape[1]
    layouts = [(1, True, False)] if has_cls else []  # (covered prefix tokens, CLS covered, registers covered)
    layouts += [(0, False, False)] + ([(int(has_cls) + registers, has_cls, True)] if registers else [])
    for covered, cls_position, register_positions in layouts:
        if _is_square(num_positions - covered):
            return dict(
                position_encoding="learned",
                image_size=math.isqrt(num_positions - covered) * patch,
                cls_token_has_position_embedding=cls_position,
                register_tokens_have_position_embedding=register_positions,
            )
    raise ConversionError(
        f"{num_positions} position embeddings fit no square patch grid, with or without the "
        f"{int(has_cls)} CLS and {registers} register token(s)."
    )


def _timm_registry_hints(arch: str, hidden: int) -> dict[str, Any]:
    """The head count of timm's `arch` when the checkpoint has that architecture's width (shapes cannot tell heads).

    The network is built on the meta device, so nothing is allocated. Without timm, the shapes alone decide.
    """
    registry_model = _timm_registry_model(arch)
    blocks = getattr(registry_model, "blocks", None)
    if getattr(registry_model, "embed_dim", None) != hidden or not blocks:
        return {}
    return {"num_attention_heads": blocks[0].attn.num_heads}


@functools.lru_cache(maxsize=8)
def _timm_registry_model(arch: str) -> torch.nn.Module | None:
    """timm's `arch` on the meta device (nothing allocated); `None` without timm. Refuses the families that stay
    out (`timm_families.check_arch`) and names that timm does not know."""
    try:
        import timm
    except ImportError:
        return None
    timm_families.check_arch(arch)
    if not timm.is_model(arch):
        raise ConversionError(f"Unknown timm architecture {arch!r} (not in timm {timm.__version__}'s registry).")
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False)


def _is_square(value: int) -> bool:
    return value > 0 and math.isqrt(value) ** 2 == value


def _check_source(source: str) -> None:
    if source not in RULES:
        raise ConversionError(f"Unknown source {source!r}; choose one of {', '.join(SOURCES)}.")


def _transformers_config_hints(path: Path) -> dict[str, Any]:
    """Config fields from a transformers Dinov2 / Dinov2WithRegisters `config.json`."""
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type == dinov3.TRANSFORMERS_MODEL_TYPE:
        return dinov3.transformers_config_hints(config)
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise ConversionError(
            f"{path} holds a {model_type!r} model; only dinov2 / dinov2_with_registers / dinov3_vit convert."
        )
    hints = dict(
        num_attention_heads=config["num_attention_heads"],
        hidden_act=config.get("hidden_act", "gelu"),
        layer_norm_eps=config.get("layer_norm_eps", 1e-6),
        # transformers' Dinov2Model resamples without antialias; Dinov2WithRegisters with it; neither uses an offset
        interpolate_antialias=model_type == "dinov2_with_registers",
        interpolate_offset=0.0,
    )
    if "layerscale_value" in config:
        hints["layerscale_value"] = config["layerscale_value"]
    return hints


# ----------------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------------
def convert(
    source: str,
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    arch: str | None = None,
    interpolation: str = "source",
    **config_overrides: Any,
) -> ViTRegistersModel:
    """A `ViTRegistersModel` holding the weights of `checkpoint` (see the module docstring).

    `interpolation` chooses how position embeddings are resampled away from the stored grid: ``"source"`` as the
    source library's model does (what verification compares at every size), ``"official"`` with the official DINOv2
    formula (`official_interpolation`; DINOv2 weights only). They differ for transformers' `Dinov2Model` (offset 0,
    not 0.1) and timm's DINOv2 models without registers (antialias, offset 0); `interpolation_summary` says which.
    """
    _check_source(source)
    if interpolation not in INTERPOLATIONS:
        raise ConversionError(f"Unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}.")
    if interpolation == "official":
        if not is_dinov2(source, checkpoint, arch):
            raise ConversionError(
                "interpolation 'official' is the official DINOv2 formula: it applies to DINOv2 weights only "
                f"(source {source!r}, arch {arch!r})."
            )
        if {"interpolate_antialias", "interpolate_offset"} & set(config_overrides):
            raise ConversionError("Give interpolation='official' or interpolate_* overrides, not both.")
    if source == "transformers" and not isinstance(checkpoint, Mapping) and Path(checkpoint).is_dir():
        if (Path(checkpoint) / "config.json").exists():
            config_overrides = {**_transformers_config_hints(Path(checkpoint)), **config_overrides}
    if source == "timm" and arch is not None:
        timm_families.check_arch(arch)  # a family that stays out is named before its weights are read
    state = load_state_dict(checkpoint)
    if source == "timm" and arch is None:  # Eva's rotary variant is not in its weights
        timm_families.require_arch(state)
    renamed = rename_state_dict(source, state)
    config = infer_config(source, renamed, arch, **config_overrides)
    dinov3.check_periods(renamed, config)  # official DINOv3's stored RoPE periods: checked, then dropped
    if interpolation == "official":
        for key, value in official_interpolation(config.num_register_tokens).items():
            setattr(config, key, value)
    if config.layerscale_value is not None and "encoder.layer.0.layer_scale1.gamma" not in renamed:
        raise ConversionError("The configuration asks for LayerScale but the checkpoint has none.")
    with torch.device("meta"):  # no random init: the checkpoint's tensors become the parameters (peak ≈ 1× weights)
        model = ViTRegistersModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(renamed))
    if missing:
        raise ConversionError(f"{len(missing)} weight(s) missing from the checkpoint: {', '.join(missing[:8])}")
    for key, tensor in renamed.items():
        if key not in expected:
            raise ConversionError(f"Unexpected weight {key} for this configuration.")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ConversionError(
                f"Shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[key].shape)}."
            )
    caller_owned = isinstance(checkpoint, Mapping)  # never share storage with the caller's tensors
    weights = {k: v.to(expected[k].dtype, copy=caller_owned).contiguous() for k, v in renamed.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def timm_create_kwargs(config: ViTRegistersConfig) -> dict[str, Any]:
    """Keyword arguments that make `timm.create_model(arch, **kwargs)` build the same-sized network."""
    fc1 = config.mlp_hidden_size * (2 if config.mlp_type == "swiglu" else 1)
    return dict(
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        patch_size=config.patch_size,
        img_size=config.image_grid[0] * config.patch_size,
        mlp_ratio=fc1 / config.hidden_size + 1e-9,
        num_classes=0,
        dynamic_img_size=True,
    )


def build_reference(
    source: str,
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    arch: str | None = None,
    **config_overrides: Any,
) -> torch.nn.Module:
    """The source library's own model with the checkpoint's weights, in eval mode.

    timm and official DINOv2 checkpoints → a timm `VisionTransformer` with `dynamic_img_size=True` (official weights go
    through timm's own `checkpoint_filter_fn`); transformers → `AutoModel.from_pretrained` of the directory.
    timm resamples position embeddings with antialias and no offset: for the official models *without* registers
    (offset 0.1, no antialias) the reference agrees at the stored grid only; see `reference_interpolation`.
    """
    _check_source(source)
    if source == "transformers":
        from transformers import AutoModel

        if isinstance(checkpoint, Mapping) or not Path(checkpoint).is_dir():
            raise ConversionError("A transformers reference needs a model directory (config.json + weights).")
        return AutoModel.from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    if source == "dinov3":  # timm's DINOv3 port, loaded through timm's own checkpoint filter
        state = load_state_dict(checkpoint)
        return dinov3.build_official_reference(state, convert(source, state, arch, **config_overrides).config)
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = load_state_dict(checkpoint)
    config = convert(source, state, arch, **config_overrides).config
    if source == "dinov2":
        timm_arch = "vit_giant_patch14_dinov2" if config.mlp_type == "swiglu" else "vit_small_patch14_dinov2"
        if config.num_register_tokens:
            timm_arch = timm_arch.replace("_dinov2", "_reg4_dinov2")
        extra = dict(reg_tokens=config.num_register_tokens, no_embed_class=config.num_register_tokens > 0)
    else:
        timm_arch = arch
        if timm_arch is None:
            raise ConversionError("A timm reference needs --arch (the timm model name).")
        extra = {}
    if source == "timm":  # Eva: its own MLP ratio and the rotary settings used
        extra = timm_families.reference_kwargs(config, state)
        state = timm_families.reference_state(state)
    kwargs = {**timm_create_kwargs(config), **extra}
    if config.layerscale_value is not None:
        kwargs["init_values"] = 1.0
    reference = timm.create_model(timm_arch, pretrained=False, **kwargs)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_drop."))}
    if source == "dinov2":
        state = checkpoint_filter_fn(state, reference)
    reference.load_state_dict(state, strict=True)
    return reference.eval()


def is_dinov2(source: str, checkpoint: Any = None, arch: str | None = None) -> bool:
    """Whether the weights are DINOv2's, so that the official DINOv2 resampling applies: official checkpoints,
    transformers Dinov2 / Dinov2WithRegisters directories, timm `*_dinov2` models."""
    if source == "transformers":
        return not dinov3.is_dinov3(source, checkpoint)
    if source == "dinov2":
        return True
    return source == "timm" and arch is not None and "dinov2" in arch


def _transformers_model_type(checkpoint: Any) -> str | None:
    if isinstance(checkpoint, Mapping) or checkpoint is None:
        return None
    path = Path(checkpoint) / "config.json"
    return json.loads(path.read_text()).get("model_type") if path.is_file() else None


def source_interpolation(source: str, config: ViTRegistersConfig, checkpoint: Any = None) -> dict[str, Any]:
    """How the source library's own model resamples position embeddings (`interpolation="source"`); empty for a RoPE
    model (DINOv3): it stores no position embeddings to resample."""
    if config.position_encoding == "rope":
        return {}
    if source == "dinov2":
        return official_interpolation(config.num_register_tokens)
    if source == "transformers":  # Dinov2Model without antialias, Dinov2WithRegistersModel with; neither an offset
        model_type = _transformers_model_type(checkpoint)
        registers = model_type == "dinov2_with_registers" if model_type else config.num_register_tokens > 0
        return dict(interpolate_antialias=registers, interpolate_offset=0.0)
    return dict(interpolate_antialias=True, interpolate_offset=0.0)  # timm's resample_abs_pos_embed


def _source_model_name(source: str, config: ViTRegistersConfig, checkpoint: Any = None) -> str:
    if source == "dinov2":
        return "the official DINOv2 model"
    if dinov3.is_dinov3(source, checkpoint):
        return dinov3.model_name(source)
    if source == "transformers":
        model_type = _transformers_model_type(checkpoint)
        with_registers = model_type == "dinov2_with_registers" if model_type else config.num_register_tokens > 0
        return f"transformers' `{'Dinov2WithRegistersModel' if with_registers else 'Dinov2Model'}`"
    return "timm"


def _settings_text(settings: Mapping[str, Any]) -> str:
    antialias = "antialias" if settings["interpolate_antialias"] else "no antialias"
    return f"bicubic, {antialias}, offset {settings['interpolate_offset']:g}"


def interpolation_summary(
    source: str, config: ViTRegistersConfig, checkpoint: Any = None, arch: str | None = None
) -> str:
    """One sentence for the converter's output and the model card: how the converted model resamples position
    embeddings away from its stored grid, whose formula that is, and how to get the other one."""
    if config.position_encoding == "rope":
        return timm_families.rope_summary(config, _source_model_name(source, config, checkpoint))
    ours = {key: getattr(config, key) for key in ("interpolate_antialias", "interpolate_offset")}
    theirs = source_interpolation(source, config, checkpoint)
    name = _source_model_name(source, config, checkpoint)
    rows, columns = config.image_grid
    text = f"resampled away from the stored {rows}×{columns} patch grid with {_settings_text(ours)}"
    if not is_dinov2(source, checkpoint, arch):
        same = "as" if ours == theirs else "unlike"
        return f"{text}, {same} {name} resamples them"
    kind = "with" if config.num_register_tokens else "without"
    official = official_interpolation(config.num_register_tokens)
    if ours == official == theirs:
        also = "" if source == "dinov2" else f", which {name} uses too"
        return f"{text}: the official DINOv2 formula for models {kind} registers{also}"
    if ours == official:
        return (
            f"{text}: the official DINOv2 formula for models {kind} registers, not {name}'s "
            f"({_settings_text(theirs)}; `--interpolation source` converts with that one)"
        )
    if ours == theirs:
        return (
            f"{text}, as {name} does, not with the official DINOv2 formula for models {kind} registers "
            f"({_settings_text(official)}; `--interpolation official` converts with that one)"
        )
    return f"{text}, set by hand (`interpolate_antialias`, `interpolate_offset` in config.json)"


def reference_interpolation(
    source: str, config: ViTRegistersConfig, reference: torch.nn.Module | None = None
) -> dict[str, Any]:
    """Interpolation settings under which `build_reference`'s model resamples like ours (empty when it already does).

    The official DINOv2 models without registers need it (timm, their reference, has no 0.1 offset), and so does a
    model converted with `interpolation="official"` whose source resamples otherwise. Verification then checks the
    weights at other sizes with these settings; the official formula itself is tested against the official code.
    A RoPE model (DINOv3) stores no position embeddings: nothing to set.
    """
    if config.position_encoding == "rope":
        return {}
    if source == "transformers":
        model_type = getattr(getattr(reference, "config", None), "model_type", None)
        antialias = model_type == "dinov2_with_registers" if model_type else config.num_register_tokens > 0
        settings = dict(interpolate_antialias=antialias, interpolate_offset=0.0)
    else:  # timm, also the reference of official checkpoints
        settings = dict(interpolate_antialias=True, interpolate_offset=0.0)
    if all(getattr(config, key) == value for key, value in settings.items()):
        return {}
    return settings


@torch.no_grad()
def reference_tokens(reference: torch.nn.Module, pixel_values: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Output tokens of a timm or transformers reference split into `cls`, `registers` and `patches`; `pooled`: a timm
    attention pool's output (`forward_head(pre_logits=True)`), `None` for references without one."""
    if hasattr(reference, "forward_features"):  # timm
        tokens = reference.forward_features(pixel_values)
        prefix = reference.num_prefix_tokens
        has_cls = reference.cls_token is not None
        attention_pool = getattr(reference, "attn_pool", None) is not None  # pooled: timm's pre-logits
        return dict(
            cls=tokens[:, 0] if has_cls else None,
            registers=tokens[:, int(has_cls) : prefix],
            patches=tokens[:, prefix:],
            pooled=reference.forward_head(tokens, pre_logits=True) if attention_pool else None,
        )
    tokens = reference(pixel_values).last_hidden_state
    registers = getattr(reference.config, "num_register_tokens", 0)
    return dict(cls=tokens[:, 0], registers=tokens[:, 1 : 1 + registers], patches=tokens[:, 1 + registers :])


@torch.no_grad()
def model_tokens(model: ViTRegistersModel, pixel_values: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """`ViTRegistersModel` output tokens in the same `cls` / `registers` / `patches` layout as `reference_tokens`, and
    `pooled`: the attention pool's output (`pooling="map"`, the only pooler with weights; `None` otherwise)."""
    output = model(pixel_values)
    cls_token, registers, patches = model.split_tokens(output.last_hidden_state)
    pooled = output.pooler_output if model.config.pooling == "map" else None
    return dict(cls=cls_token, registers=registers, patches=patches, pooled=pooled)


__all__ = [
    "SOURCES",
    "INTERPOLATIONS",
    "OFFICIAL_DINOV2",
    "OFFICIAL_DINOV3",
    "official_interpolation",
    "source_interpolation",
    "interpolation_summary",
    "is_dinov2",
    "ConversionError",
    "convert",
    "build_reference",
    "reference_tokens",
    "reference_interpolation",
    "model_tokens",
    "load_state_dict",
    "rename_state_dict",
    "infer_config",
    "timm_create_kwargs",
]
