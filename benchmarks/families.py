"""DINOv3-style forward throughput (axial RoPE, 4 storage tokens): this package against transformers'
`DINOv3ViTModel` (SDPA) and timm's EVA `vit_*_patch16_dinov3_qkvb`, on the same weights, in one process.

The weights are drawn in timm's model (LayerScale from U(0.5, 1.5) so that every block matters), converted into a
`ViTRegistersModel` with the package's converter, and copied into transformers' model from ours; every output
token of every implementation is checked against ours before anything is timed.
"""

from __future__ import annotations

import copy

import torch

from .common import (
    NO_KERNELS,
    OURS,
    case_cells,
    check_parity,
    markdown_table,
    ratio_text,
    time_alternating,
    timing_rows,
)

# label: (timm name, create_model overrides)
DINOV3_ARCHS = {
    "S/16": ("vit_small_patch16_dinov3_qkvb", {}),
    "B/16": ("vit_base_patch16_dinov3_qkvb", {}),
    "tiny": (
        "vit_small_patch16_dinov3_qkvb",
        dict(embed_dim=64, depth=2, num_heads=1),
    ),  # heads: as the converter infers
}
# the DINOv2 archs of `--archs` and their DINOv3 counterparts (patch 16)
FROM_DINOV2_ARCH = {"S/14": "S/16", "B/14": "B/16", "tiny": "tiny"}
DINOV3_IMPLEMENTATIONS = (OURS, NO_KERNELS, "transformers-sdpa", "timm")


def build_timm_dinov3(arch: str, image_size: int, seed: int) -> torch.nn.Module:
    import timm

    name, overrides = DINOV3_ARCHS[arch]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size, **overrides)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if key.endswith(("gamma_1", "gamma_2")):
                parameter.uniform_(0.5, 1.5)
    return model.eval()


def transformers_dinov3_state(ours: torch.nn.Module, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under the keys of a transformers `DINOv3ViTModel` state dict `target` (the key bias is zero)."""
    state = ours.state_dict()
    out = {
        "embeddings.cls_token": state["embeddings.cls_token"],
        "embeddings.register_tokens": state["embeddings.register_tokens"],
        # unused by a forward without `bool_masked_pos`; timm's models have none
        "embeddings.mask_token": state.get("embeddings.mask_token", torch.zeros(1, 1, ours.config.hidden_size)),
        "embeddings.patch_embeddings.weight": state["embeddings.patch_embeddings.projection.weight"],
        "embeddings.patch_embeddings.bias": state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state["layernorm.weight"],
        "norm.bias": state["layernorm.bias"],
    }
    for index in range(ours.config.num_hidden_layers):
        source, prefix = f"encoder.layer.{index}.", f"model.layer.{index}."
        for name in ("norm1", "norm2"):
            for kind in ("weight", "bias"):
                out[f"{prefix}{name}.{kind}"] = state[f"{source}{name}.{kind}"]
        for kind in ("weight", "bias"):
            for letter, part in zip("qkv", state[f"{source}attention.qkv.{kind}"].chunk(3)):
                out[f"{prefix}attention.{letter}_proj.{kind}"] = part
            out[f"{prefix}attention.o_proj.{kind}"] = state[f"{source}attention.proj.{kind}"]
            out[f"{prefix}mlp.up_proj.{kind}"] = state[f"{source}mlp.fc1.{kind}"]
            out[f"{prefix}mlp.down_proj.{kind}"] = state[f"{source}mlp.fc2.{kind}"]
        for number in (1, 2):
            out[f"{prefix}layer_scale{number}.lambda1"] = state[f"{source}layer_scale{number}.gamma"]
    missing = sorted(set(target) - set(out))
    if missing:
        raise KeyError(f"no tensor of ours for transformers keys {missing[:5]}")
    return {key: out[key].reshape(target[key].shape).clone() for key in target}


def to_transformers_dinov3(ours: torch.nn.Module) -> torch.nn.Module:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = ours.config
    hf_config = DINOv3ViTConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.mlp_hidden_size,
        patch_size=config.patch_size,
        image_size=config.image_grid[0] * config.patch_size,
        num_register_tokens=config.num_register_tokens,
        layer_norm_eps=config.layer_norm_eps,
        rope_theta=config.rope_theta,
        query_bias=True,
        key_bias=True,
        value_bias=True,
    )
    hf_config._attn_implementation = "sdpa"
    model = DINOv3ViTModel(hf_config)  # not on the meta device: its rotary frequencies are a non-persistent buffer
    model.load_state_dict(transformers_dinov3_state(ours, model.state_dict()), strict=True)
    return model.eval()


def build_dinov3_implementations(arch: str, image_size: int, seed: int, names=DINOV3_IMPLEMENTATIONS):
    """`({name: forward(pixel_values) -> last-layer tokens}, our config, parity differences)` on one set of weights."""
    from vit_registers import onednn
    from vit_registers.conversion import convert

    timm_model = build_timm_dinov3(arch, image_size, seed)
    reference = convert("timm", timm_model.state_dict(), arch=DINOV3_ARCHS[arch][0]).eval()
    ours = copy.deepcopy(reference)
    onednn.kernelize(ours)
    models = {OURS: ours, NO_KERNELS: reference, "timm": timm_model}
    if "transformers-sdpa" in names:
        models["transformers-sdpa"] = to_transformers_dinov3(reference)
    forwards = {}
    for name in names:
        if name not in models:
            raise ValueError(f"unknown implementation {name!r}; known: {', '.join(DINOV3_IMPLEMENTATIONS)}")
        model = models[name]
        forwards[name] = model.forward_features if name == "timm" else (lambda x, m=model: m(x).last_hidden_state)
    forwards.setdefault(OURS, lambda x: ours(x).last_hidden_state)
    return forwards, reference.config, check_parity(forwards, image_size, seed)


def format_table(rows: list[dict]) -> str:
    body = [
        [
            *case_cells(row),
            f"{row['images_per_s']:.1f}",
            ratio_text(row["ratio_ours_over_this"], row["ratio_quartiles"]),
        ]
        for row in rows
    ]
    headers = ["model (DINOv3 style)", "image", "batch", "implementation", "img/s", "ours / this (paired, IQR)"]
    return markdown_table(headers, body, align="lrrlrr")


def run(args, context) -> dict:
    rows, parity = [], {}
    archs = dict.fromkeys(FROM_DINOV2_ARCH.get(arch, arch) for arch in args.archs)  # S/14 → S/16, ...
    for arch in archs:
        if arch not in DINOV3_ARCHS:
            raise ValueError(f"no DINOv3 counterpart of --archs {arch!r}; known: {', '.join(FROM_DINOV2_ARCH)}")
        for image_size in args.image_sizes:
            image_size = image_size // 16 * 16  # a multiple of the patch
            forwards, _, parity[f"{arch}@{image_size}"] = build_dinov3_implementations(arch, image_size, args.seed)
            for batch_size in args.batch_sizes:
                generator = torch.Generator().manual_seed(args.seed)
                x = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
                times = time_alternating(forwards, x, args.repeats, args.warmup, max_seconds=args.max_case_seconds)
                case = dict(arch=arch, image_size=image_size, batch_size=batch_size)
                case_rows = timing_rows("dinov3", times, batch_size, **case)
                for row in case_rows:
                    row["images_per_s"] = row.pop("items_per_s")
                rows += case_rows
                context.log_rows(format_table(case_rows))
    return {"rows": rows, "parity_max_abs_diff": parity, "markdown": format_table(rows)}
