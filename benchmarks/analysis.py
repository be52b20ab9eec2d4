"""Latency of the one-image analysis of issue 6 (`vit_registers.analysis.pipeline.analyze_batch`: norms of every layer,
last-layer attention maps, PCA, LOST, neighbour similarity). It has no peer, so only the time is reported, with the
plain forward of the same model for scale.
"""

from __future__ import annotations

import torch

from .common import OURS, build_models, case_cells, markdown_table, time_alternating, timing_rows

ANALYSIS = "analyze_batch"


def run(args, context) -> dict:
    from vit_registers.analysis.pipeline import analyze_batch

    rows = []
    arch = args.archs[0]
    for image_size in args.attention_sizes:
        model = build_models(arch, image_size, args.seed, (OURS,))[OURS]
        x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(args.seed))
        (result,) = analyze_batch(model, x)
        if tuple(result.grid) != (image_size // 14, image_size // 14):
            raise RuntimeError(f"analyze_batch returned grid {result.grid} for {image_size}²")
        functions = {
            "forward": lambda x, m=model: m(pixel_values=x).last_hidden_state,
            ANALYSIS: lambda x, m=model: analyze_batch(m, x),
        }
        times = time_alternating(functions, x, args.repeats, args.warmup, max_seconds=args.max_case_seconds)
        case_rows = timing_rows(
            "analysis", times, 1, reference="forward", arch=arch, image_size=image_size, batch_size=1
        )
        for row in case_rows:
            row["times_forward"] = row.pop("ratio_ours_over_this")
        rows += case_rows
        context.log_rows(format_table(case_rows))
    return {"rows": rows, "markdown": format_table(rows)}


def format_table(rows: list[dict]) -> str:
    body = [
        [
            *case_cells(r, batch=False),
            f"{1000 * r['median_s']:.0f}",
            f"{r['times_forward']:.2f}×",
        ]
        for r in rows
    ]
    return markdown_table(["model", "image", "call (1 image)", "ms", "× plain forward"], body, "lrlrr")
