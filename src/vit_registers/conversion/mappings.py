"""Key-mapping tables from foreign checkpoints to `ViTRegistersModel` — data, not code.

Each rule is `(source regex, target template, part)`: a key matching the regex (after the family's prefixes are
stripped) becomes the target key; `part=(i, n)` marks it as the i-th of n tensors concatenated along dim 0 into the
target (separate q/k/v → fused qkv; separate gate/up → packed SwiGLU fc1). Keys listed in `IGNORED` are dropped
(classification heads of the source). Anything else is an unexpected key and conversion stops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LAYER = r"(?P<layer>\d+)"


@dataclass(frozen=True)
class KeyRule:
    source: str
    target: str
    part: tuple[int, int] | None = None

    def match(self, key: str) -> tuple[str, tuple[int, int] | None] | None:
        found = re.fullmatch(self.source, key)
        if found is None:
            return None
        return self.target.format(**found.groupdict()), self.part


def _block_rules(block: str, table: list[tuple[str, str, tuple[int, int] | None]]) -> list[KeyRule]:
    """Rules for per-layer keys: `block` is the source prefix of layer `i` (a regex with a `layer` group)."""
    return [
        KeyRule(rf"{block}\.{source}\.(?P<kind>weight|bias|gamma|lambda1)", f"encoder.layer.{{layer}}.{target}", part)
        for source, target, part in table
    ]


# Block keys shared by official DINOv2 and timm (they differ only in the SwiGLU MLP names and chunked blocks).
VIT_BLOCK = [
    (r"norm1", "norm1.{kind}", None),
    (r"norm2", "norm2.{kind}", None),
    (r"attn\.qkv", "attention.qkv.{kind}", None),
    (r"attn\.proj", "attention.proj.{kind}", None),
    (r"ls1", "layer_scale1.gamma", None),
    (r"ls2", "layer_scale2.gamma", None),
]

# Official DINOv2 (facebookresearch/dinov2 hub checkpoints). `blocks.{chunk}.{i}` appears in chunked FSDP exports.
DINOV2_RULES = [
    KeyRule(r"cls_token", "embeddings.cls_token"),
    KeyRule(r"register_tokens", "embeddings.register_tokens"),
    KeyRule(r"mask_token", "embeddings.mask_token"),
    KeyRule(r"pos_embed", "embeddings.position_embeddings"),
    KeyRule(r"patch_embed\.proj\.(?P<kind>weight|bias)", "embeddings.patch_embeddings.projection.{kind}"),
    KeyRule(r"norm\.(?P<kind>weight|bias)", "layernorm.{kind}"),
    *_block_rules(
        rf"blocks\.(?:\d+\.)?{LAYER}",
        [*VIT_BLOCK, (r"mlp\.(?:fc1|w12)", "mlp.fc1.{kind}", None), (r"mlp\.(?:fc2|w3)", "mlp.fc2.{kind}", None)],
    ),
]

# timm VisionTransformer (`vit_*_reg4_dinov2`, `deit3_*`, `vit_*_reg{1,4}_gap_*`, `vit_so150m*`, ...) and Eva
# (`vit_*_rope_reg*_gap_256`, `vit_*_dinov3*`: LayerScale `gamma_1` / `gamma_2`, qkv bias as `q_bias` / `v_bias` plus
# the zero `k_bias` that `timm_families.prepare_state_dict` adds, SwiGLU as `fc1_g` / `fc1_x`), with timm's attention
# pool (`attn_pool`, global_pool="map").
TIMM_RULES = [
    KeyRule(r"cls_token", "embeddings.cls_token"),
    KeyRule(r"reg_token", "embeddings.register_tokens"),
    KeyRule(r"pos_embed", "embeddings.position_embeddings"),
    KeyRule(r"patch_embed\.proj\.(?P<kind>weight|bias)", "embeddings.patch_embeddings.projection.{kind}"),
    KeyRule(r"norm\.(?P<kind>weight|bias)", "layernorm.{kind}"),
    KeyRule(r"fc_norm\.(?P<kind>weight|bias)", "fc_norm.{kind}"),
    *_block_rules(
        rf"blocks\.{LAYER}",
        [
            *VIT_BLOCK,
            (r"mlp\.fc1", "mlp.fc1.{kind}", None),
            (r"mlp\.fc1_g", "mlp.fc1.{kind}", (0, 2)),
            (r"mlp\.fc1_x", "mlp.fc1.{kind}", (1, 2)),
            (r"mlp\.fc2", "mlp.fc2.{kind}", None),
        ],
    ),
    KeyRule(rf"blocks\.{LAYER}\.gamma_1", "encoder.layer.{layer}.layer_scale1.gamma"),
    KeyRule(rf"blocks\.{LAYER}\.gamma_2", "encoder.layer.{layer}.layer_scale2.gamma"),
    KeyRule(rf"blocks\.{LAYER}\.attn\.q_bias", "encoder.layer.{layer}.attention.qkv.bias", (0, 3)),
    KeyRule(rf"blocks\.{LAYER}\.attn\.k_bias", "encoder.layer.{layer}.attention.qkv.bias", (1, 3)),
    KeyRule(rf"blocks\.{LAYER}\.attn\.v_bias", "encoder.layer.{layer}.attention.qkv.bias", (2, 3)),
    KeyRule(r"attn_pool\.latent", "pooler.latent"),
    KeyRule(r"attn_pool\.(?P<name>q|kv|proj|norm|mlp\.fc1|mlp\.fc2)\.(?P<kind>weight|bias)", "pooler.{name}.{kind}"),
]

# transformers' block keys (Dinov2, Dinov2WithRegisters, DINOv3ViT): current names (q_proj, gate_proj, ...) and
# legacy ones (attention.attention.query, mlp.weights_in, ...), which transformers itself renames on load.
TRANSFORMERS_BLOCK = [
    (r"norm1", "norm1.{kind}", None),
    (r"norm2", "norm2.{kind}", None),
    (r"attention\.(?:q_proj|attention\.query)", "attention.qkv.{kind}", (0, 3)),
    (r"attention\.(?:k_proj|attention\.key)", "attention.qkv.{kind}", (1, 3)),
    (r"attention\.(?:v_proj|attention\.value)", "attention.qkv.{kind}", (2, 3)),
    (r"attention\.(?:o_proj|output\.dense)", "attention.proj.{kind}", None),
    (r"layer_scale1", "layer_scale1.gamma", None),
    (r"layer_scale2", "layer_scale2.gamma", None),
    (r"mlp\.(?:fc1|weights_in)", "mlp.fc1.{kind}", None),
    (r"mlp\.gate_proj", "mlp.fc1.{kind}", (0, 2)),
    (r"mlp\.up_proj", "mlp.fc1.{kind}", (1, 2)),
    (r"mlp\.(?:fc2|weights_out|down_proj)", "mlp.fc2.{kind}", None),
]

# transformers Dinov2 / Dinov2WithRegisters.
TRANSFORMERS_RULES = [
    KeyRule(r"embeddings\.cls_token", "embeddings.cls_token"),
    KeyRule(r"embeddings\.register_tokens", "embeddings.register_tokens"),
    KeyRule(r"embeddings\.mask_token", "embeddings.mask_token"),
    KeyRule(r"embeddings\.position_embeddings", "embeddings.position_embeddings"),
    KeyRule(
        r"embeddings\.patch_embeddings\.projection\.(?P<kind>weight|bias)",
        "embeddings.patch_embeddings.projection.{kind}",
    ),
    KeyRule(r"layernorm\.(?P<kind>weight|bias)", "layernorm.{kind}"),
    *_block_rules(rf"encoder\.layer\.{LAYER}", TRANSFORMERS_BLOCK),
]

# Official DINOv3 (facebookresearch/dinov3 hub checkpoints): storage tokens are the registers; SwiGLU as `w1` (gate),
# `w2` (value), `w3`. `rope_embed.periods` keeps a name of its own: `dinov3.check_periods` checks it against the
# config and drops it; `qkv.bias_mask` is applied and dropped before renaming (`dinov3.prepare_state_dict`).
DINOV3_RULES = [
    KeyRule(r"cls_token", "embeddings.cls_token"),
    KeyRule(r"storage_tokens", "embeddings.register_tokens"),
    KeyRule(r"mask_token", "embeddings.mask_token"),
    KeyRule(r"patch_embed\.proj\.(?P<kind>weight|bias)", "embeddings.patch_embeddings.projection.{kind}"),
    KeyRule(r"norm\.(?P<kind>weight|bias)", "layernorm.{kind}"),
    KeyRule(r"rope_embed\.periods", "rope_embed.periods"),
    *_block_rules(
        rf"blocks\.{LAYER}",
        [
            *VIT_BLOCK,
            (r"mlp\.fc1", "mlp.fc1.{kind}", None),
            (r"mlp\.w1", "mlp.fc1.{kind}", (0, 2)),
            (r"mlp\.w2", "mlp.fc1.{kind}", (1, 2)),
            (r"mlp\.(?:fc2|w3)", "mlp.fc2.{kind}", None),
        ],
    ),
]

# transformers DINOv3ViTModel / DINOv3ViTBackbone: blocks under `model.layer.*` (current) or `layer.*` (first Hub
# uploads), a bare conv patch embedding, final `norm`. A plain MLP's `up_proj` arrives as `mlp.fc1` and the absent
# key bias as zeros (`dinov3.prepare_state_dict`); a gated MLP is `gate_proj` / `up_proj` / `down_proj`.
DINOV3_TRANSFORMERS_RULES = [
    KeyRule(r"embeddings\.patch_embeddings\.(?P<kind>weight|bias)", "embeddings.patch_embeddings.projection.{kind}"),
    KeyRule(r"norm\.(?P<kind>weight|bias)", "layernorm.{kind}"),
    *_block_rules(rf"(?:model\.)?layer\.{LAYER}", TRANSFORMERS_BLOCK),
]

RULES = {
    "dinov2": DINOV2_RULES,
    "timm": TIMM_RULES,
    "transformers": TRANSFORMERS_RULES + DINOV3_TRANSFORMERS_RULES,
    "dinov3": DINOV3_RULES,
}

# Prefixes of task-model checkpoints, stripped before matching.
PREFIXES = {
    "dinov2": ("backbone.", "module."),
    "timm": ("module.",),
    "transformers": ("dinov2_with_registers.", "dinov2.", "vit_registers."),
    "dinov3": ("backbone.", "module."),
}

# Keys that are dropped on purpose: classification heads (`convert` returns the bare encoder).
IGNORED = {
    "dinov2": (r"head\..*",),
    "timm": (r"head\..*", r"head_drop\..*", r"rope\..*"),  # rope.*: derived RoPE buffers (older timm saved them)
    "transformers": (r"classifier\..*",),
    "dinov3": (r"head\..*", r"local_cls_norm\..*"),  # local_cls_norm: local crops in training only (7B, SAT ViT-L)
}

# Tensors stored with another shape than ours, reshaped explicitly (official mask token is (1, D), ours (1, 1, D)).
RESHAPED = ("embeddings.mask_token",)
