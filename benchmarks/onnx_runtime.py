"""ONNX Runtime (CPU) running the file `vit-registers export` writes, against this package and transformers on the
same weights and inputs (issue 21).

Per arch and image size the reference model (`vit-registers+no-kernels`, the model file) is exported with
`vit_registers.onnx_export.export_onnx` (dynamic batch, height and width, checked in ONNX Runtime at the case size);
the session gets as many intra-op threads as torch. Rows: `onnxruntime`, this package as its commands run it
(`vit-registers`, oneDNN kernels), the model file alone (`vit-registers+no-kernels`) and `transformers-sdpa`;
every output token is checked against ours before anything is timed, and the ratios are paired like every section's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .common import (
    NO_KERNELS,
    OURS,
    build_models,
    case_cells,
    check_parity,
    markdown_table,
    ratio_against,
    ratio_text,
    time_alternating,
    timing_rows,
)

ONNXRUNTIME = "onnxruntime"
ONNX_IMPLEMENTATIONS = (OURS, NO_KERNELS, ONNXRUNTIME, "transformers-sdpa")


def ort_forward(path: Path, threads: int):
    """`forward(pixel_values) -> last_hidden_state` of an ONNX Runtime CPU session on `path`."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(pixel_values: torch.Tensor) -> torch.Tensor:
        (tokens,) = session.run(["last_hidden_state"], {"pixel_values": pixel_values.numpy()})
        return torch.from_numpy(tokens)

    return forward


def run_case(arch, image_size, batch_sizes, repeats, warmup, seed, max_seconds, folder: Path):
    from vit_registers.onnx_export import export_onnx

    from .common import last_tokens

    models = build_models(arch, image_size, seed, (OURS, NO_KERNELS, "transformers-sdpa"))
    path = folder / f"{arch.replace('/', '-')}-{image_size}.onnx"
    shapes = [(1, 3, image_size, image_size), (2, 3, image_size, image_size)]
    export = export_onnx(models[NO_KERNELS], path, height=image_size, width=image_size, check_shapes=shapes, card=False)
    forwards = {name: last_tokens(name, model) for name, model in models.items()}
    forwards[ONNXRUNTIME] = ort_forward(path, torch.get_num_threads())
    forwards = {name: forwards[name] for name in ONNX_IMPLEMENTATIONS}
    parity = check_parity(forwards, image_size, seed)
    rows = []
    for batch_size in batch_sizes:
        x = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
        times = time_alternating(forwards, x, repeats, warmup, max_seconds=max_seconds)
        case = dict(arch=arch, image_size=image_size, batch_size=batch_size)
        case_rows = timing_rows("onnxruntime", times, batch_size, **case)
        for row in case_rows:
            row["images_per_s"] = row.pop("items_per_s")
        rows += case_rows
    return rows, parity, {"export_s": export.seconds, "export_check_max_abs_diff": export.worst}


def format_table(rows: list[dict]) -> str:
    body = [
        [
            *case_cells(r),
            f"{r['images_per_s']:.1f}",
            ratio_text(r["ratio_ours_over_this"], r.get("ratio_quartiles")),
        ]
        for r in rows
    ]
    return markdown_table(["model", "image", "batch", "implementation", "img/s", "ours / this"], body, "lrrlrr")


def onnxruntime_against_peers(rows: list[dict]) -> list[dict]:
    """Per case, ONNX Runtime's paired ratio against every other row: > 1 means ONNX Runtime is faster."""
    summary = []
    cases: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        cases.setdefault((row["arch"], row["image_size"], row["batch_size"]), {})[row["implementation"]] = row
    for (arch, image_size, batch_size), members in cases.items():
        for name, row in members.items():
            if name != ONNXRUNTIME:
                ratio, spread = ratio_against(row, members[ONNXRUNTIME])
                summary.append(
                    dict(
                        arch=arch,
                        image_size=image_size,
                        batch_size=batch_size,
                        peer=name,
                        ratio=ratio,
                        quartiles=spread,
                    )
                )
    return summary


def run(args, context) -> dict:
    rows, parity, exports = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="vit-registers-onnx-bench-") as folder:
        for arch in args.archs:
            for image_size in args.image_sizes:
                case_rows, parity[f"{arch}@{image_size}"], exports[f"{arch}@{image_size}"] = run_case(
                    arch,
                    image_size,
                    args.batch_sizes,
                    args.repeats,
                    args.warmup,
                    args.seed,
                    args.max_case_seconds,
                    Path(folder),
                )
                rows += case_rows
                context.log_rows(format_table(case_rows))
    note = (
        "ONNX Runtime runs the file `vit-registers export` writes from the model file (float32, dynamic batch, "
        "height and width), with as many intra-op threads as torch; `ours / this` > 1: this package is faster."
    )
    against = onnxruntime_against_peers(rows)
    sentence = "ONNX Runtime against each (peer time / ONNX Runtime time, > 1: ONNX Runtime faster): " + "; ".join(
        f"{s['arch']} {s['image_size']}² b{s['batch_size']} vs {s['peer']}: {ratio_text(s['ratio'], s['quartiles'])}"
        for s in against
    )
    return {
        "rows": rows,
        "parity_max_abs_diff": parity,
        "exports": exports,
        "onnxruntime_against": against,
        "markdown": note + "\n\n" + format_table(rows) + "\n\n" + sentence + ".",
    }
