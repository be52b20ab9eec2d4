"""Peak memory of inference, of a training step and of checkpoint conversion, each measured in a fresh process
(issues 3, 4 and 5).

Method (Linux): every measurement runs in its own fresh process, forked from a multiprocessing "forkserver" that has
imported torch, timm, transformers and vit_registers but computed nothing (so no worker pays the imports or inherits an
earlier measurement's state). The server starts with `MALLOC_MMAP_THRESHOLD_=65536`, so glibc serves every
tensor-sized allocation with mmap and returns it on free (RSS then follows live memory instead of what freed
allocations left in the heap). The worker builds the model, drops everything else,
runs one warm-up forward pass (one-time initialisation is not inference memory), records its RSS (`baseline`), resets
the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`), runs one more forward pass under
`torch.inference_mode()` and reads the peak (VmHWM). `inference` = peak − baseline is the memory the forward pass
itself needs (activations, attention matrices, workspaces); `peak` adds the weights and the libraries, which are the
same for every implementation. A training step is measured the same way: the warm-up step creates the optimizer's
state and the gradients (part of the baseline), the measured step's peak adds the activations kept for backward and
the backward's own temporaries. Where clear_refs is unavailable the peak falls back to `ru_maxrss` over the whole
process (noted as `method` in the JSON).

Conversion: a random-weight checkpoint in the official DINOv2 format (timm's `vit_*_patch14_dinov2` keys plus
`mask_token`) is written with `torch.save` to a temporary `.pth`; the worker resets the peak after its imports and
runs `vit_registers.conversion.convert("dinov2", path, arch=...)`. Reported: (peak − baseline) and peak, each as a
multiple of the file size (issue 4's goal: ≤ 2.5×), plus the RSS after each conversion stage to show where it goes.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from .common import IMPLEMENTATIONS, OURS, case_cells, markdown_table, ratio_text, round_order

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20

# name → (timm model with official DINOv2 keys, official hub arch or None, convert() overrides)
CONVERSION_ARCHS = {
    "tiny": ("vit_small_patch14_dinov2", None, dict(num_attention_heads=1)),
    "S/14": ("vit_small_patch14_dinov2", "dinov2_vits14", {}),
    "B/14": ("vit_base_patch14_dinov2", "dinov2_vitb14", {}),
    "L/14": ("vit_large_patch14_dinov2", "dinov2_vitl14", {}),
}


# ----------------------------------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------------------------------
_SERVER_STARTED = False
PRELOAD = ["torch", "timm", "transformers", "vit_registers", "vit_registers.conversion", "benchmarks.common"]


def _context():
    """A multiprocessing "forkserver" context whose server has imported torch, timm, transformers and vit_registers
    (but run nothing), started with `MALLOC_MMAP_THRESHOLD_=65536`: each worker is a fresh fork of it, so it pays
    neither the imports nor any state left by an earlier measurement."""
    global _SERVER_STARTED
    import multiprocessing
    import multiprocessing.forkserver

    context = multiprocessing.get_context("forkserver")
    if not _SERVER_STARTED:
        context.set_forkserver_preload(PRELOAD)
        saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if saved is None:
                os.environ.pop("MALLOC_MMAP_THRESHOLD_")
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
        _SERVER_STARTED = True
    return context


def _child(spec: dict, connection) -> None:
    try:
        connection.send(("ok", _worker(spec)))
    except BaseException as error:  # noqa: BLE001 - reported to the parent as one line
        connection.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        connection.close()


def measure(spec: dict, timeout: float = 900) -> dict:
    """Run one measurement in a fresh worker process and return its result; raise RuntimeError if it fails."""
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(spec, sender), daemon=True)
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            process.kill()
            raise RuntimeError(f"memory worker {spec} timed out after {timeout:.0f} s")
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "error", "the worker died without a result (killed for memory?)"
    finally:
        process.join(30)
        receiver.close()
    if status != "ok":
        raise RuntimeError(f"memory worker {spec} failed: {payload}")
    return payload


def measure_alternating(implementations, repeats: int, **spec) -> dict[str, list[dict]]:
    """`{implementation: [result of each fresh worker]}` for one case `spec`; the implementations alternate, the
    order rotating every round."""
    names = list(implementations)
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in round_order(names, round_index):
            samples[name].append(measure(dict(spec, implementation=name)))
    return samples


def run(args, context) -> dict:
    """Inference memory for every forward case and implementation; the implementations alternate per round and the
    median over `--memory-repeats` fresh processes is kept."""
    import torch

    rows = []
    threads = args.threads or torch.get_num_threads()
    for arch in args.archs:
        for image_size in args.image_sizes:
            for batch_size in args.batch_sizes:
                samples = measure_alternating(
                    args.implementations,
                    args.memory_repeats,
                    kind="inference",
                    arch=arch,
                    image_size=image_size,
                    batch_size=batch_size,
                    seed=args.seed,
                    threads=threads,
                )
                case_rows = case_memory_rows(
                    "memory", samples, "inference_mb", arch=arch, image_size=image_size, batch_size=batch_size
                )
                rows += case_rows
                context.log_rows(format_table(case_rows))
    return {"rows": rows, "markdown": format_table(rows)}


def run_training(args, context) -> dict:
    """Memory of a training step (forward + backward + fused AdamW step of the classifier, as in the training section)
    for every arch and training implementation, one fresh process each; the median over `--memory-repeats` is kept."""
    import torch

    from .training import IMPLEMENTATIONS as TRAINING_IMPLEMENTATIONS

    rows = []
    threads = args.threads or torch.get_num_threads()
    image_size, batch_size = args.training_image_size, args.training_batch_size
    for arch in args.archs:
        samples = measure_alternating(
            TRAINING_IMPLEMENTATIONS,
            args.memory_repeats,
            kind="training",
            arch=arch,
            image_size=image_size,
            batch_size=batch_size,
            seed=args.seed,
            threads=threads,
        )
        case_rows = case_memory_rows(
            "training-memory", samples, "step_mb", arch=arch, image_size=image_size, batch_size=batch_size
        )
        rows += case_rows
        context.log_rows(format_table(case_rows, "step_mb"))
    return {"rows": rows, "markdown": format_table(rows, "step_mb")}


def case_memory_rows(section: str, samples: dict[str, list[dict]], key: str, **case) -> list[dict]:
    """One row per implementation of a case from its workers' results (medians): peak − baseline as `key`
    (`inference_mb`, `step_mb`), with the ratios to ours: > 1 means ours needs less; None when ours needed nothing
    measurable."""
    rows = []
    for name, results in samples.items():
        rows.append(
            dict(
                section=section,
                **case,
                implementation=name,
                **{key: statistics.median(r["delta_bytes"] for r in results) / MB},
                peak_mb=statistics.median(r["peak_bytes"] for r in results) / MB,
                baseline_mb=statistics.median(r["baseline_bytes"] for r in results) / MB,
                method=results[0]["method"],
                samples=results,
            )
        )
    ours = next(r for r in rows if r["implementation"] == OURS)
    for row in rows:
        row["ratio_ours_over_this"] = row[key] / ours[key] if ours[key] > 0 else None
        row["peak_ratio_ours_over_this"] = row["peak_mb"] / ours["peak_mb"]
    return rows


def format_table(rows: list[dict], key: str = "inference_mb") -> str:
    measured = {"inference_mb": "inference MiB", "step_mb": "step MiB"}[key]
    body = [
        [
            *case_cells(r),
            f"{r[key]:.0f}",
            ratio_text(r["ratio_ours_over_this"]),
            f"{r['peak_mb']:.0f}",
            ratio_text(r["peak_ratio_ours_over_this"]),
        ]
        for r in rows
    ]
    return markdown_table(
        ["model", "image", "batch", "implementation", measured, "this / ours", "peak RSS MiB", "this / ours"],
        body,
        "lrrlrrrr",
    )


def write_official_checkpoint(arch: str, directory: Path, seed: int) -> Path:
    """A random-weight checkpoint in the official DINOv2 `.pth` format (timm's keys + `mask_token`)."""
    import torch

    from .common import build_timm

    timm_name, _, _ = CONVERSION_ARCHS[arch]
    model = build_timm(arch, 518, seed, timm_name=timm_name)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    del model
    state["mask_token"] = torch.randn(1, state["cls_token"].shape[-1])
    path = directory / f"official_{arch.replace('/', '')}.pth"
    torch.save(state, path)
    return path


def run_conversion(args, context) -> dict:
    arch = args.conversion_arch
    with tempfile.TemporaryDirectory(prefix="vit-registers-bench-") as tmp:
        path = write_official_checkpoint(arch, Path(tmp), args.seed)
        gc.collect()
        size = path.stat().st_size
        _, official, overrides = CONVERSION_ARCHS[arch]
        spec = dict(kind="conversion", path=str(path), arch=official, overrides=overrides)
        result = measure(spec)
        stages = measure({**spec, "kind": "conversion-stages"})["stages"]
    row = dict(
        section="conversion",
        arch=arch,
        checkpoint_mb=size / MB,
        baseline_mb=result["baseline_bytes"] / MB,
        peak_mb=result["peak_bytes"] / MB,
        conversion_mb=result["delta_bytes"] / MB,
        conversion_over_file=result["delta_bytes"] / size,
        peak_over_file=result["peak_bytes"] / size,
        seconds=result["seconds"],
        method=result["method"],
        goal_over_file=2.5,
        stages_mb={name: value / MB for name, value in stages.items()},
    )
    context.log(format_conversion_table([row]))
    return {"rows": [row], "markdown": format_conversion_table([row])}


def format_conversion_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        stages = ", ".join(f"{name} {value:.0f}" for name, value in r["stages_mb"].items())
        body.append(
            [
                f"ViT-{r['arch']} (official .pth)",
                f"{r['checkpoint_mb']:.0f}",
                f"{r['conversion_mb']:.0f}",
                f"{r['conversion_over_file']:.2f}×",
                f"{r['peak_mb']:.0f}",
                f"{r['peak_over_file']:.2f}×",
                f"{r['seconds']:.1f}",
                stages,
            ]
        )
    return markdown_table(
        [
            "checkpoint",
            "file MiB",
            "convert MiB (peak − imports)",
            "× file",
            "peak RSS MiB",
            "× file",
            "s",
            "RSS after each stage (MiB)",
        ],
        body,
        "lrrrrrrl",
    )


# ----------------------------------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------------------------------
def start_measurement() -> tuple[int | None, str, float]:
    """`(baseline RSS, peak method, start time)` right before the measured work: garbage collected, the kernel's
    peak-RSS counter reset where it can be."""
    import time

    from .common import reset_peak_rss, rss_now_bytes

    gc.collect()
    baseline = rss_now_bytes()
    method = "VmHWM after clear_refs" if reset_peak_rss() else "ru_maxrss (whole process)"
    return baseline, method, time.perf_counter()


def _worker(spec: dict) -> dict:
    import time

    import timm  # noqa: F401 - every worker carries the same libraries
    import torch
    import transformers  # noqa: F401

    import vit_registers  # noqa: F401

    from .common import build_models, last_tokens, peak_rss_bytes, rss_now_bytes

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    kind = spec["kind"]
    if kind == "inference":
        name = spec["implementation"]
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"unknown implementation {name!r}")
        models = build_models(spec["arch"], spec["image_size"], spec["seed"], (name,))
        forward = last_tokens(name, models[name])
        models = {name: models[name]}
        gc.collect()
        size = spec["image_size"]
        x = torch.randn(spec["batch_size"], 3, size, size, generator=torch.Generator().manual_seed(spec["seed"]))
        with torch.inference_mode():
            forward(x)  # warm-up: one-time initialisation (kernel selection, thread pools) is not inference memory
        baseline, method, start = start_measurement()
        with torch.inference_mode():
            forward(x)  # the output is part of the peak, then freed
    elif kind == "training":
        from .training import build_classifiers, training_batch, training_steps

        name = spec["implementation"]
        model = build_classifiers(spec["arch"], spec["image_size"], spec["seed"], (name,))[name]
        x, labels = training_batch(spec["batch_size"], spec["image_size"], spec["seed"])
        step = training_steps({name: model}, labels)[name]
        step(x)  # warm-up: the optimizer's state and the gradients exist from here on, as in any later step
        baseline, method, start = start_measurement()
        step(x)
    elif kind == "conversion":
        from vit_registers.conversion import convert

        baseline, method, start = start_measurement()
        model = convert("dinov2", spec["path"], arch=spec["arch"], **spec["overrides"])
        del model
    elif kind == "conversion-stages":  # RSS after each step that `convert` calls (wrapped where convert looks them up)
        import vit_registers.conversion as conversion

        stages = {"imports": rss_now_bytes()}

        def traced(function, label):
            def wrapper(*args, **kwargs):
                result = function(*args, **kwargs)
                stages[label] = rss_now_bytes()
                return result

            return wrapper

        steps = {"load_state_dict": "torch.load", "rename_state_dict": "rename", "ViTRegistersModel": "model init"}
        for name, label in steps.items():
            setattr(conversion, name, traced(getattr(conversion, name), label))
        model = conversion.convert("dinov2", spec["path"], arch=spec["arch"], **spec["overrides"])
        gc.collect()
        stages["converted"] = rss_now_bytes()
        del model
        return {"stages": stages}
    else:
        raise ValueError(f"unknown memory measurement {kind!r}")
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "delta_bytes": max(0, peak - baseline),
        "method": method,
        "seconds": seconds,
    }


if __name__ == "__main__":  # one measurement by hand: python -m benchmarks.memory '{"kind": "inference", ...}'
    print(json.dumps(_worker(json.loads(sys.argv[1]))), flush=True)
