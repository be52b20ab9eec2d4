"""Last-layer attention maps (Darcet et al. 2024 Fig. 1, 9): time to get the softmax weights of the last layer.

- this project: `model(x, attention_layers=[-1])` computes weights for the last layer only, the others stay on SDPA;
- transformers: eager attention with `output_attentions=True` (its only way to return weights; every layer's);
- timm: `forward_features` with a forward pre-hook on the last block's attention that recomputes
  softmax(q kᵀ / √d) from its input (timm has no attention output; the cheapest equivalent).
Every implementation must return the same (B, heads, T, T) weights before anything is timed.
"""

from __future__ import annotations

import torch

from .common import (
    OURS,
    build_models,
    case_cells,
    check_parity,
    markdown_table,
    ratio_text,
    time_alternating,
    timing_rows,
)

IMPLEMENTATIONS = (OURS, "transformers-eager", "timm")


def timm_last_attention(model: torch.nn.Module):
    """`forward(pixel_values) -> (B, heads, T, T)` softmax weights of timm's last block, recomputed by a hook."""
    attention = model.blocks[-1].attn
    captured = {}

    def hook(module, args):
        x = args[0]
        batch, tokens, _ = x.shape
        qkv = module.qkv(x).reshape(batch, tokens, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        q, k = module.q_norm(qkv[0]), module.k_norm(qkv[1])
        captured["weights"] = ((q * module.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    attention.register_forward_pre_hook(hook)

    def forward(x):
        model.forward_features(x)
        return captured.pop("weights")

    return forward


def attention_forwards(models: dict[str, torch.nn.Module]):
    forwards = {}
    for name, model in models.items():
        if name == OURS:
            forwards[name] = lambda x, m=model: m(pixel_values=x, attention_layers=[-1]).attentions[-1]
        elif name == "timm":
            forwards[name] = timm_last_attention(model)
        else:
            forwards[name] = lambda x, m=model: m(pixel_values=x, output_attentions=True).attentions[-1]
    return forwards


def run(args, context) -> dict:
    """Batch 1 (maps are looked at one image at a time): eager weights for every layer of a large batch at 518² would
    not fit in memory anyway."""
    rows, parity = [], {}
    names = [n for n in IMPLEMENTATIONS if n in args.implementations or n == "transformers-eager"]
    for arch in args.archs:
        for image_size in args.attention_sizes:
            models = build_models(arch, image_size, args.seed, names)
            forwards = attention_forwards(models)
            parity[f"{arch}@{image_size}"] = check_parity(forwards, image_size, args.seed, atol=1e-5)
            x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(args.seed))
            times = time_alternating(forwards, x, args.repeats, args.warmup, max_seconds=args.max_case_seconds)
            case_rows = timing_rows("attention", times, 1, arch=arch, image_size=image_size, batch_size=1)
            rows += case_rows
            context.log_rows(format_table(case_rows))
    return {"rows": rows, "parity_max_abs_diff": parity, "markdown": format_table(rows)}


def format_table(rows: list[dict]) -> str:
    body = [
        [
            *case_cells(r, batch=False),
            f"{r['items_per_s']:.2f}",
            f"{1000 * r['median_s']:.1f}",
            ratio_text(r["ratio_ours_over_this"], r.get("ratio_quartiles")),
        ]
        for r in rows
    ]
    return markdown_table(["model", "image", "implementation", "maps/s", "ms", "ours / this"], body, "lrlrrr")
