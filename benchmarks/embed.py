"""`vit-registers embed` throughput as a fraction of the bare model forward on the same images (issue 22).

The images are real CIFAR-10 test images (`../shared/data/cifar10/test.parquet`), `8 × batch` of them (fixed by
`--seed`). The bare forward runs the model, loaded as the command loads it (CPU kernels applied), on the pixel tensors
of those images, already decoded and preprocessed, in batches of the last `--batch-sizes` value. The embed side is the
whole command in this process: decoding and preprocessing in one DataLoader worker, the model, feature extraction,
float16 conversion and Parquet shards written to disk; its time is the command's own embedding loop (from starting the
workers to the last shard renamed), without loading the model and the dataset index. The two alternate round by round
(the order rotating), and the ratio is taken per round: embed img/s / bare img/s, 1.0 = loading fully hidden.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import torch

from .common import arch_label, build_models, markdown_table, quartiles, round_order

CIFAR_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "test.parquet"
BARE = "bare forward (decoded tensors)"
EMBED = "vit-registers embed"


def _write_model(directory: Path, arch: str, image_size: int, seed: int) -> None:
    from transformers import BitImageProcessor

    from vit_registers import ViTRegistersModel

    built = build_models(arch, image_size, seed, ("vit-registers",))["vit-registers"]
    model = ViTRegistersModel(built.config)  # plain module with the same weights (no kernels in what is saved)
    model.load_state_dict(built.state_dict())
    from vit_registers._quiet import quiet_transformers

    with quiet_transformers():  # no "Writing model shards" bar in the benchmark's output
        model.save_pretrained(directory)
    BitImageProcessor(
        size={"shortest_edge": round(image_size * 8 / 7)},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(directory)


def _write_images(path: Path, count: int, seed: int) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    if not CIFAR_TEST.exists():
        raise OSError(f"the embed section reads real images from {CIFAR_TEST}, which is missing")
    table = pq.read_table(CIFAR_TEST)
    rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=count, replace=False))
    pq.write_table(table.take(rows), path)


def run(args, context) -> dict:
    import statistics

    rows = []
    batch = args.batch_sizes[-1]
    count = 8 * batch
    for arch in args.archs:
        for image_size in args.image_sizes:
            times = _time_case(arch, image_size, batch, count, args)
            ratios = [b / e for b, e in zip(times[BARE], times[EMBED], strict=True)]
            for name in (BARE, EMBED):
                median = statistics.median(times[name])
                rows.append(
                    dict(
                        section="embed",
                        arch=arch,
                        image_size=image_size,
                        batch_size=batch,
                        images=count,
                        implementation=name,
                        median_s=median,
                        items_per_s=count / median,
                        throughput_vs_bare=1.0 if name == BARE else statistics.median(ratios),
                        ratio_quartiles=(1.0, 1.0) if name == BARE else quartiles(ratios),
                        times_s=times[name],
                    )
                )
            context.log_rows(format_table(rows[-2:]))
    return {"rows": rows, "markdown": format_table(rows)}


def _time_case(arch: str, image_size: int, batch: int, count: int, args) -> dict[str, list[float]]:
    """Seconds per pass over the `count` images, bare forward and embed alternating (order rotating per round)."""
    import datasets

    from vit_registers.cli import build_parser, load_model_from_args
    from vit_registers.features import embed
    from vit_registers.features.store import read_manifest

    with tempfile.TemporaryDirectory(prefix="bench-embed-") as scratch:
        scratch = Path(scratch)
        _write_model(scratch / "model", arch, image_size, args.seed)
        _write_images(scratch / "test.parquet", count, args.seed)
        model, processor = load_model_from_args(argparse.Namespace(model=str(scratch / "model"), device="cpu"))
        images = datasets.load_dataset(
            "parquet", data_files=str(scratch / "test.parquet"), split="train", cache_dir=str(scratch / "c")
        )["image"]
        pixels = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
        outputs = iter(range(10**6))

        def bare() -> float:
            started = time.perf_counter()
            with torch.inference_mode():
                for start in range(0, count, batch):
                    model(pixel_values=pixels[start : start + batch])
            return time.perf_counter() - started

        def embed_once() -> float:
            out = scratch / f"out-{next(outputs)}"
            argv = ["embed", "--model", str(scratch / "model"), "--dataset", str(scratch / "test.parquet")]
            argv += ["--output", str(out), "--batch-size", str(batch), "--num-workers", "1", "--quiet"]
            with contextlib.redirect_stdout(io.StringIO()):
                embed.run(build_parser(commands=["embed"]).parse_args(argv))
            return read_manifest(out)["wall_s_this_run"]  # the command's own loop: workers started → last shard

        functions = {BARE: bare, EMBED: embed_once}
        times: dict[str, list[float]] = {BARE: [], EMBED: []}
        for _ in range(args.warmup):
            for function in functions.values():
                function()
        for round_index in range(args.repeats):
            for name in round_order(list(functions), round_index):
                times[name].append(functions[name]())
    return times


def format_table(rows: list[dict]) -> str:
    body = [
        [
            arch_label(r["arch"]),
            f"{r['image_size']}²",
            r["batch_size"],
            r["images"],
            r["implementation"],
            f"{r['items_per_s']:.2f}",
            f"{r['throughput_vs_bare']:.3f}"
            + (
                "" if r["implementation"] == BARE else f" ({r['ratio_quartiles'][0]:.3f}–{r['ratio_quartiles'][1]:.3f})"
            ),
        ]
        for r in rows
    ]
    return markdown_table(
        ["model", "image", "batch", "images", "path", "img/s", "throughput vs bare (paired, quartiles)"],
        body,
        "lrrrlrr",
    )
