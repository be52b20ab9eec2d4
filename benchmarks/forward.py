"""Forward throughput (img/s; fp32 on the CPU by default, `--device`/`--dtype` for a GPU in bf16) against
transformers (sdpa, eager) and timm, and the cost of registers.

FLOPs are counted analytically (2 × multiply-adds of the matrix products; Darcet et al. 2024 Sec. 2: four registers add
< 2 % at 224²) and set against the GEMM peak measured on the same device in the same dtype (`% GEMM peak`).
"""

from __future__ import annotations

import statistics

import torch

from .common import (
    OURS,
    PREPACKED,
    arch_label,
    build_placed_implementations,
    case_cells,
    forward_flops,
    markdown_table,
    place,
    ratio_text,
    synchronizer,
    time_alternating,
    timing_rows,
)


def run_case(
    arch: str,
    image_size: int,
    batch_size: int,
    repeats: int,
    warmup: int,
    seed: int,
    peak: float | None,
    names,
    compile: bool = False,
    max_seconds: float | None = None,
    device: str = "cpu",
    dtype: str = "float32",
):
    """Time one case on `device` in `dtype`; returns (rows, parity differences, our config)."""
    forwards, config, parity = build_placed_implementations(arch, image_size, seed, names, device, dtype)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    x = place(x, device, dtype)
    if compile:
        # every case compiles anew (its own models): without a reset, Dynamo's recompile limit (8 per code object,
        # and the implementations share `last_tokens`' lambda) would silently leave later cases uncompiled
        torch._dynamo.reset()
        # the packs serve eager products only (torch.compile uses the plain weights): no compiled prepacked row
        compiled = {f"{n}+compile": torch.compile(f) for n, f in forwards.items() if n != PREPACKED}
        sync = synchronizer(device)
        with torch.inference_mode():
            for function in compiled.values():  # compilation happens here, outside the timed and warm-up rounds
                function(x)
                sync()
        forwards = {**forwards, **compiled}
    times = time_alternating(forwards, x, repeats, warmup, max_seconds=max_seconds, sync=synchronizer(device))
    flops = forward_flops(config, batch_size, image_size)
    case = dict(arch=arch, image_size=image_size, batch_size=batch_size)
    plain = {name: t for name, t in times.items() if not name.endswith("+compile")}
    compiled_times = {name: t for name, t in times.items() if name.endswith("+compile")}
    rows = timing_rows("forward", plain, batch_size, **case)
    if compiled_times:  # compiled peers against our compiled model
        rows += timing_rows("forward", compiled_times, batch_size, reference=f"{OURS}+compile", **case)
    for row in rows:
        row["images_per_s"] = row.pop("items_per_s")
        row["gflops"] = flops / 1e9
        row["gemm_fraction"] = None if peak is None else flops / row["median_s"] / peak
    return rows, parity, config


@torch.inference_mode()
def register_cost(
    base,
    image_size: int,
    batch_size: int,
    counts=(0, 1, 4, 16),
    repeats: int = 0,
    warmup: int = 1,
    seed: int = 0,
    max_seconds: float | None = None,
) -> list[dict]:
    """FLOPs (and, with `repeats > 0`, throughput) of our model (config `base`) with 0, 1, 4, 16 registers."""
    from vit_registers import ViTRegistersModel

    flops0 = forward_flops(base, batch_size, image_size, 0)
    forwards, rows = {}, []
    for count in counts:
        rows.append({"registers": count, "gflops": forward_flops(base, batch_size, image_size, count) / 1e9})
        rows[-1]["flops_vs_0"] = rows[-1]["gflops"] * 1e9 / flops0
        if repeats:
            config = base.__class__.from_dict({**base.to_dict(), "num_register_tokens": count})
            torch.manual_seed(seed)
            model = ViTRegistersModel(config).eval()
            forwards[count] = lambda x, m=model: m(pixel_values=x).last_hidden_state
    if repeats:
        x = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
        times = time_alternating(forwards, x, repeats, warmup, max_seconds=max_seconds)
        for row in rows:
            row["images_per_s"] = batch_size / statistics.median(times[row["registers"]])
        zero = rows[0] if rows[0]["registers"] == 0 else None
        for row in rows:
            row["throughput_vs_0"] = None if zero is None else row["images_per_s"] / zero["images_per_s"]
    return rows


def format_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        peak = "—" if r["gemm_fraction"] is None else f"{100 * r['gemm_fraction']:.0f} %"
        body.append(
            [
                *case_cells(r),
                f"{r['images_per_s']:.1f}",
                ratio_text(r["ratio_ours_over_this"], r.get("ratio_quartiles")),
                f"{r['gflops']:.1f}",
                peak,
            ]
        )
    return markdown_table(
        ["model", "image", "batch", "implementation", "img/s", "ours / this", "GFLOPs", "% GEMM peak"], body, "lrrlrrrr"
    )


def format_register_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        ips = f"{r['images_per_s']:.1f}" if "images_per_s" in r else "—"
        rel = f"{r['throughput_vs_0']:.3f}" if r.get("throughput_vs_0") is not None else "—"
        body.append([r["registers"], f"{r['gflops']:.2f}", f"{r['flops_vs_0']:.4f}", ips, rel])
    return markdown_table(["registers", "GFLOPs", "FLOPs vs 0", "img/s", "throughput vs 0"], body)


def run(args, context) -> dict:
    rows, parity, configs = [], {}, {}
    for arch in args.archs:
        for image_size in args.image_sizes:
            for batch_size in args.batch_sizes:
                case_rows, case_parity, configs[arch] = run_case(
                    arch,
                    image_size,
                    batch_size,
                    args.repeats,
                    args.warmup,
                    args.seed,
                    context.peak,
                    args.implementations,
                    args.compile,
                    args.max_case_seconds,
                    args.device,
                    args.dtype,
                )
                rows += case_rows
                parity[f"{arch}@{image_size}"] = case_parity
                context.log_rows(format_table(case_rows))
    return {"rows": rows, "parity_max_abs_diff": parity, "markdown": format_table(rows), "configs": configs}


def run_registers(args, context) -> dict:
    """Cost of 0, 1, 4, 16 registers on the first arch, first image size, last batch size."""
    from vit_registers.conversion import convert

    from .common import ARCHS, build_timm

    arch, image_size, batch_size = args.archs[0], args.image_sizes[0], args.batch_sizes[-1]
    config = convert("timm", build_timm(arch, image_size, args.seed).state_dict(), arch=ARCHS[arch]).config
    rows = register_cost(
        config,
        image_size,
        batch_size,
        repeats=0 if args.quick else args.repeats,
        seed=args.seed,
        max_seconds=args.max_case_seconds,
    )
    for row in rows:
        row.update(arch=arch, image_size=image_size, batch_size=batch_size)
    title = f"{arch_label(arch, None)}, {image_size}², batch {batch_size}; FLOPs counted analytically:"
    return {"rows": rows, "markdown": title + "\n\n" + format_register_table(rows)}
