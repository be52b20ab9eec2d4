"""Test-time registers (Jiang et al. 2025, Algorithm 2): forward throughput with the intervention on, as a ratio to the
plain forward of the same model (issue 7).

The register neurons are `--ttr-neurons` units (paper: 45–50 for DINOv2-L) drawn at random, spread evenly over the
first three quarters of the layers (the paper's `highest_layer` 17 of 24); one test-time register token. Throughput
does not depend on which units are chosen, only on how many and in how many layers.
"""

from __future__ import annotations

import copy

import torch

from .common import (
    OURS,
    build_models,
    case_cells,
    markdown_table,
    time_alternating,
    timing_rows,
)

WITH_TTR = f"{OURS}+test-time-registers"


def spread_neurons(config, count: int, seed: int) -> dict[int, list[int]]:
    """`count` distinct random MLP units spread round-robin over layers 0 .. ¾·depth."""
    layers = list(range(max(1, (3 * config.num_hidden_layers) // 4)))
    generator = torch.Generator().manual_seed(seed)
    per_layer = {layer: torch.randperm(config.mlp_hidden_size, generator=generator).tolist() for layer in layers}
    neurons: dict[int, list[int]] = {layer: [] for layer in layers}
    for index in range(count):
        layer = layers[index % len(layers)]
        neurons[layer].append(per_layer[layer][len(neurons[layer])])
    return {layer: sorted(units) for layer, units in neurons.items() if units}


def run(args, context) -> dict:
    from vit_registers.interventions import enable_test_time_registers

    rows, checks = [], {}
    batch_size = args.batch_sizes[-1]
    for arch in args.archs:
        for image_size in args.image_sizes:
            plain = build_models(arch, image_size, args.seed, (OURS,))[OURS]
            neurons = spread_neurons(plain.config, args.ttr_neurons, args.seed)
            edited = enable_test_time_registers(copy.deepcopy(plain), neurons)
            x = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(args.seed))
            with torch.inference_mode():
                tokens_plain = plain(pixel_values=x).last_hidden_state
                tokens_ttr = edited(pixel_values=x).last_hidden_state
            if tokens_ttr.shape[1] != tokens_plain.shape[1] + 1:
                raise RuntimeError("test-time registers did not add one token: the intervention is not active")
            checks[f"{arch}@{image_size}"] = {
                "extra_tokens": 1,
                "neurons": sum(len(u) for u in neurons.values()),
                "layers": len(neurons),
            }
            forwards = {
                OURS: lambda x, m=plain: m(pixel_values=x).last_hidden_state,
                WITH_TTR: lambda x, m=edited: m(pixel_values=x).last_hidden_state,
            }
            times = time_alternating(forwards, x, args.repeats, args.warmup, max_seconds=args.max_case_seconds)
            case_rows = timing_rows(
                "test_time_registers", times, batch_size, arch=arch, image_size=image_size, batch_size=batch_size
            )
            for row in case_rows:  # > 1 would mean faster with the intervention
                row["throughput_vs_plain"] = 1.0 / row.pop("ratio_ours_over_this")
            rows += case_rows
            context.log_rows(format_table(case_rows))
    return {"rows": rows, "setup": checks, "markdown": format_table(rows)}


def format_table(rows: list[dict]) -> str:
    body = [
        [
            *case_cells(r),
            f"{r['items_per_s']:.2f}",
            f"{r['throughput_vs_plain']:.3f}",
        ]
        for r in rows
    ]
    return markdown_table(["model", "image", "batch", "forward", "img/s", "throughput vs plain"], body, "lrrlrr")
