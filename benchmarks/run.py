"""Benchmarks of vit-registers against transformers and timm on the same weights, in one process (issue 3).

    python -m benchmarks --quick                          # CI smoke: every section, ViT-S/14 at 112², 2 repeats
    python -m benchmarks --json results.json --markdown results.md     # the README table
    python -m benchmarks --sections forward,attention --archs S/14    # chosen sections only

Sections (`--sections`, default all):
  forward              img/s (fp32 on the CPU, or --device/--dtype), ours vs transformers sdpa/eager vs timm;
                       % of the GEMM peak measured on the same device in the same dtype
  registers            FLOPs and img/s with 0, 1, 4, 16 registers (Darcet et al. 2024: < 2 % FLOPs for 4)
  memory               peak inference memory, one fresh process per implementation and case
  attention            last-layer attention maps, batch 1 at --attention-sizes
  training             forward + backward + fused AdamW step of the classifier vs transformers
  training-memory      peak memory of that training step, one fresh process per implementation
  test-time-registers  throughput with test-time registers (Jiang et al. 2025) / plain forward, batch = last batch size
  conversion           peak RSS of converting an official DINOv2 .pth (ViT-L by default) as a multiple of its size
  analysis             latency of vit_registers.analysis.pipeline.analyze_batch on one image (no peer)
  embed                `vit-registers embed` img/s on real CIFAR-10 images / the bare forward on decoded tensors
  onnxruntime          img/s of ONNX Runtime (CPU) running the exported file vs ours and transformers sdpa
  dinov3               DINOv3-style models (RoPE, 4 storage tokens; --archs S/14 → S/16): ours vs transformers'
                       DINOv3ViTModel (sdpa) vs timm's EVA, img/s at --image-sizes rounded to multiples of 16

Every ratio is this project / peer oriented so that > 1 means this project is better (faster, or smaller).

`--allocator glibc` (default) leaves glibc's defaults, as in any Python process, under which each forward pass
page-faults its large activations anew; `--allocator tuned` keeps freed tensor memory in the process for every
implementation alike, as the `vit-registers` command and the fine-tuning script do (`vit_registers.cpu_allocator`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python benchmarks/run.py`: run as the package's entry point
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.run import main

    sys.exit(main())

import torch  # noqa: E402

from vit_registers.argtypes import positive_int  # noqa: E402
from vit_registers.cpu_allocator import cpu_allocator_tuned, tune_cpu_allocator  # noqa: E402

from . import analysis, attention, embed, families, forward, interventions, memory, onnx_runtime, training  # noqa: E402
from .common import (  # noqa: E402
    ARCHS,
    DEFAULT_ARCHS,
    IMPLEMENTATIONS,
    OURS,
    PREPACKED,
    ParityError,
    best_peer,
    best_peer_text,
    gemm_peak_flops,
    machine_info,
)

SECTIONS: dict[str, Callable] = {
    "forward": forward.run,
    "registers": forward.run_registers,
    "memory": memory.run,
    "attention": attention.run,
    "training": training.run,
    "training-memory": memory.run_training,
    "test-time-registers": interventions.run,
    "conversion": memory.run_conversion,
    "analysis": analysis.run,
    "onnxruntime": onnx_runtime.run,
    "dinov3": families.run,
    "embed": embed.run,
}
TITLES = {
    "forward": "Forward throughput (fp32)",
    "registers": "Cost of registers",
    "memory": "Peak inference memory (fresh process per row)",
    "attention": "Last-layer attention maps (batch 1)",
    "training": "Training step: forward + backward + fused AdamW",
    "training-memory": "Peak memory of a training step (fresh process per row)",
    "test-time-registers": "Test-time registers vs plain forward",
    "conversion": "Conversion memory (official DINOv2 .pth → ViTRegistersModel)",
    "analysis": "One-image analysis (issue 6)",
    "onnxruntime": "ONNX Runtime (CPU) running the exported file vs PyTorch, fp32",
    "dinov3": "DINOv3-style forward (RoPE, 4 storage tokens), fp32",
    "embed": "vit-registers embed on real CIFAR-10 images vs the bare forward on decoded tensors (issue 22)",
}
DEVICE_SECTIONS = ("forward", "training")  # the sections that take --device and --dtype
DTYPES = ("float32", "bfloat16")  # float16 training would need a GradScaler, which the step does not time
# option: (full run, --quick)
DEFAULTS = {
    "archs": (list(DEFAULT_ARCHS), ["S/14"]),
    "image_sizes": ([224, 518], [112]),
    "batch_sizes": ([1, 8], [1]),
    "repeats": (10, 2),
    "warmup": (2, 1),
    "attention_sizes": ([224, 518], [112]),
    "training_image_size": (224, 112),
    "training_batch_size": (8, 2),
    "memory_repeats": (1, 1),
    "conversion_arch": ("L/14", "S/14"),
    "ttr_neurons": (50, 50),
    "max_case_seconds": (60.0, 60.0),
}


class Context:
    def __init__(self, peak: float | None, verbose: bool = True):
        self.peak = peak
        self.verbose = verbose

    def log(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)

    def log_rows(self, table: str) -> None:
        """Log the rows of a Markdown table without its two header lines (progress while a section runs)."""
        self.log(table.split("\n", 2)[2])


def _csv(kind: Callable):
    def parse(text: str):
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number of seconds, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sections", type=_csv(str), default=list(SECTIONS), help="comma list of " + ", ".join(SECTIONS)
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke: ViT-S/14, 112², batch 1, 2 repeats, conversion of ViT-S (explicit options win)",
    )
    parser.add_argument("--archs", type=_csv(str), help="comma list of " + ", ".join(ARCHS) + " (default S/14,B/14)")
    parser.add_argument("--image-sizes", type=_csv(int), help="forward/memory/test-time-registers (default 224,518)")
    parser.add_argument(
        "--batch-sizes",
        type=_csv(int),
        help="forward/memory (default 1,8); the last one is used by registers and test-time-registers",
    )
    parser.add_argument("--attention-sizes", type=_csv(int), help="attention and analysis (default 224,518)")
    parser.add_argument(
        "--implementations",
        type=_csv(str),
        default=None,
        help="forward/memory: comma list of " + ", ".join(IMPLEMENTATIONS),
    )
    parser.add_argument("--repeats", type=positive_int, help="timed rounds per case (default 10)")
    parser.add_argument("--warmup", type=positive_int, help="untimed rounds per case (default 2)")
    parser.add_argument(
        "--max-case-seconds",
        type=_seconds,
        help="cap the timed rounds of a slow case at about this many seconds, never below 3 (default 60; 0: no cap)",
    )
    parser.add_argument("--training-image-size", type=positive_int, help="default 224")
    parser.add_argument("--training-batch-size", type=positive_int, help="default 8")
    parser.add_argument(
        "--memory-repeats",
        type=positive_int,
        help="memory, training-memory: fresh processes per implementation and case (1)",
    )
    parser.add_argument("--conversion-arch", choices=list(memory.CONVERSION_ARCHS), help="default L/14")
    parser.add_argument("--ttr-neurons", type=positive_int, help="register neurons for test-time registers (50)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="forward: also time torch.compile'd versions")
    parser.add_argument(
        "--device",
        default="cpu",
        help="forward, training: cpu (default) or cuda[:index]; parity is checked there in float32 (other sections "
        "run on the CPU in float32 and refuse other settings)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="forward: the models' dtype; training: autocast to it with float32 weights (default float32)",
    )
    parser.add_argument(
        "--allocator",
        choices=("glibc", "tuned"),
        default="glibc",
        help="glibc: glibc's defaults (default); tuned: freed tensor memory stays in the process for every "
        "implementation (vit_registers.cpu_allocator)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write every number and the machine to PATH")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables to PATH")
    return parser


def parse_args(argv: list[str] | None):
    """Parsed options with the full-run or --quick defaults filled in; raises ValueError naming a bad value."""
    args = build_parser().parse_args(argv)
    chosen_implementations = args.implementations is not None
    if not chosen_implementations:
        args.implementations = list(IMPLEMENTATIONS)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    problems = []
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        problems.append(f"unknown section {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    unknown = [a for a in args.archs if a not in ARCHS]
    if unknown:
        problems.append(f"unknown arch {', '.join(unknown)} (known: {', '.join(ARCHS)})")
    unknown = [i for i in args.implementations if i not in IMPLEMENTATIONS]
    if unknown:
        problems.append(f"unknown implementation {', '.join(unknown)} (known: {', '.join(IMPLEMENTATIONS)})")
    sizes = [*args.image_sizes, *args.attention_sizes, args.training_image_size]
    if any(s <= 0 or s % 14 for s in sizes):
        problems.append(f"image sizes must be positive multiples of 14, got {sorted(set(sizes))}")
    if any(b <= 0 for b in args.batch_sizes):
        problems.append(f"batch sizes must be positive, got {args.batch_sizes}")
    problems += _check_device(args, chosen_implementations)
    if problems:
        raise ValueError("; ".join(problems))
    if OURS not in args.implementations:
        args.implementations = [OURS, *args.implementations]
    return args


def _check_device(args, chosen_implementations: bool = False) -> list[str]:
    """Problems with `--device`/`--dtype`; normalises `args.device` (`cpu:0` → `cpu`) and drops the prepacked
    variant (oneDNN's float32 CPU layout) where it cannot run."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        return [f"unknown device {args.device!r} (cpu or cuda[:index])"]
    if device.type not in ("cpu", "cuda"):
        return [f"device {args.device!r}: the benchmarks time cpu or cuda devices"]
    if device.type == "cpu":
        args.device = "cpu"
    elif not torch.cuda.is_available():
        return [f"device {args.device!r} is not available on this machine (no CUDA device)"]
    elif device.index is not None and device.index >= torch.cuda.device_count():
        return [f"device {args.device!r} is not available on this machine ({torch.cuda.device_count()} CUDA devices)"]
    if args.device == "cpu" and args.dtype == "float32":
        return []
    problems = []
    elsewhere = [s for s in args.sections if s not in DEVICE_SECTIONS]
    if elsewhere:
        problems.append(
            f"--device/--dtype apply to {', '.join(DEVICE_SECTIONS)} only; choose --sections without "
            f"{', '.join(elsewhere)}"
        )
    if PREPACKED in args.implementations and chosen_implementations:
        print(
            f"benchmarks: note: no {PREPACKED} row in {args.dtype} on {args.device} (its packs are oneDNN's float32 "
            "CPU layout)",
            file=sys.stderr,
        )
    args.implementations = [i for i in args.implementations if i != PREPACKED]
    return problems


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse already printed its one-line message
        return int(exit_.code or 0)
    except ValueError as error:
        print(f"benchmarks: error: {error}", file=sys.stderr)
        return 2
    try:
        import timm  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        print(f"benchmarks: error: the benchmarks need timm and transformers ({error})", file=sys.stderr)
        return 2
    if args.allocator == "glibc" and cpu_allocator_tuned():
        print(
            "benchmarks: error: --allocator glibc: glibc's allocator was already tuned in this process "
            "(vit_registers.cpu_allocator), which cannot be undone; run the benchmarks in a fresh process",
            file=sys.stderr,
        )
        return 2
    if args.allocator == "tuned" and not tune_cpu_allocator("tuned"):
        print(
            "benchmarks: warning: --allocator tuned changed nothing (not glibc, or the allocator is set outside); "
            "the report header says which allocator ran",
            file=sys.stderr,
        )
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    started = time.perf_counter()
    try:
        peak = gemm_peak_flops(seconds=0.5 if args.quick else 2.0, device=args.device, dtype=args.dtype)
    except (RuntimeError, ValueError) as error:
        print(f"benchmarks: error: GEMM peak on {args.device} in {args.dtype}: {error}", file=sys.stderr)
        return 1
    print(
        f"{args.dtype} GEMM peak on {args.device}: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} CPU threads)",
        file=sys.stderr,
    )
    context = Context(peak)
    result = {
        "machine": machine_info(args.device),
        "gemm_peak_gflops": peak / 1e9,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
        "sections": {},
    }
    tables: list[str] = []
    for name in args.sections:
        section_start = time.perf_counter()
        try:
            output = SECTIONS[name](args, context)
        except ParityError as error:
            print(f"benchmarks: error: {name}: parity check failed, nothing timed: {error}", file=sys.stderr)
            return 1
        except (RuntimeError, ValueError, OSError) as error:
            print(f"benchmarks: error: {name}: {error}", file=sys.stderr)
            return 1
        output.pop("configs", None)
        table = output.pop("markdown")
        if name in ("forward", "memory", "attention", "training", "training-memory"):
            output["best_peer"] = best_peer(output["rows"])
            table += "\n\n" + best_peer_text(output["best_peer"])
        title = TITLES[name]
        if args.dtype != "float32" or args.device != "cpu":
            if name == "forward":
                title = f"Forward throughput ({args.dtype} on {args.device})"
            elif name == "training":
                title += f" ({args.device}, autocast to {args.dtype}, float32 weights)"
        tables.append(f"### {title}\n\n{table}")
        output["wall_s"] = time.perf_counter() - section_start
        result["sections"][name] = output
        result["wall_s"] = time.perf_counter() - started
        if not write_outputs(args, result, render(result, tables)):  # after every section: a late failure keeps these
            return 1
    print(render(result, tables))
    return 0


def render(result: dict, tables: list[str]) -> str:
    machine = result["machine"]
    header = (
        f"Measured on {machine.get('cpu_model', machine['processor'])} ({machine['cpu_count']} cores, "
        f"{machine['cpu_capability']}; {machine['onednn_path']}), "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"timm {machine['timm']}; {machine['allocator']}; "
    )
    settings = result["settings"]
    device, dtype = settings.get("device", "cpu"), settings.get("dtype", "float32")
    if device != "cpu" or dtype != "float32":
        gpu = machine.get("device_name")
        if gpu:
            header = (
                f"On {gpu} (CUDA {machine.get('cuda')}, compute capability {machine.get('compute_capability')}), "
                "host: " + header[len("Measured on ") :]
            )
        header += f"{dtype} on {device} (training: autocast, float32 weights); {dtype} "
    else:
        header += "fp32 "
    header += (
        f"GEMM peak {result['gemm_peak_gflops']:.0f} GFLOP/s. Ratios: this project / peer, > 1 is better for this "
        "project."
    )
    return header + "\n\n" + "\n\n".join(tables) + "\n"


def write_outputs(args, result: dict, markdown: str) -> bool:
    for path, text in ((args.json, json.dumps(result, indent=2)), (args.markdown, markdown)):
        if path:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(text, encoding="utf-8")
            except OSError as error:
                print(f"benchmarks: error: cannot write {path}: {error}", file=sys.stderr)
                return False
    return True


if __name__ == "__main__":
    sys.exit(main())
