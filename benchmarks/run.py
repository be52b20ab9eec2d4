"""Forward-throughput benchmark: `ViTRegistersModel` against transformers and timm on the same weights (issue 3).

    python -m benchmarks --quick                 # CI smoke: ViT-S/14, 224², batch 1, < ~60 s on 2 cores
    python -m benchmarks --json results.json     # ViT-S/14 and ViT-B/14, 224² and 518², batch 1 and 8

One timm `vit_*_patch14_reg4_dinov2` model is built with random weights (seed `--seed`); `vit_registers.conversion
.convert("timm", ...)` turns them into a `ViTRegistersModel`, and the same tensors are written into a transformers
`Dinov2WithRegistersModel` (sdpa and eager) through the conversion tables read backwards. Before timing, every
implementation must produce the same tokens (max abs difference ≤ `PARITY_ATOL`). The implementations then run
alternately in one process (the order rotates every round), after a warm-up, and the table reports median img/s and
the ratio this project / peer (> 1: we are faster). Forward FLOPs are counted analytically (multiply-adds × 2 of the
matrix products, Darcet et al. 2024 Sec. 2: four registers add < 2 % at 224²) and set against a measured fp32 GEMM
peak of this machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

ARCHS = {
    "S/14": "vit_small_patch14_reg4_dinov2",
    "B/14": "vit_base_patch14_reg4_dinov2",
    "tiny": "vit_small_patch14_reg4_dinov2",  # width 64, 2 blocks: for the test suite's smoke run
}
_ARCH_OVERRIDES = {"tiny": dict(embed_dim=64, depth=2, num_heads=1)}
OURS = "vit-registers"
IMPLEMENTATIONS = (OURS, "transformers-sdpa", "transformers-eager", "timm")
PARITY_ATOL = 1e-3


@dataclass
class Case:
    arch: str  # a key of ARCHS
    image_size: int
    batch_size: int


@dataclass
class Row:
    arch: str
    image_size: int
    batch_size: int
    implementation: str
    median_s: float
    images_per_s: float
    gflops: float
    gemm_fraction: float | None
    ratio_ours_over_this: float | None = None
    times_s: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------------
# Models with identical weights
# ----------------------------------------------------------------------------------------------------------------------
def build_timm(arch: str, image_size: int, seed: int) -> torch.nn.Module:
    """timm's model with random weights; LayerScale is drawn from U(0.5, 1.5) so that every block matters."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        ARCHS[arch], pretrained=False, img_size=image_size, num_classes=0, **_ARCH_OVERRIDES.get(arch, {})
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                parameter.uniform_(0.5, 1.5)
    return model.eval()


def to_transformers(ours: torch.nn.Module, attn_implementation: str) -> torch.nn.Module:
    """A transformers `Dinov2WithRegistersModel` holding exactly the weights of `ours` (a `ViTRegistersModel`).

    Every transformers key is matched against the conversion table (`TRANSFORMERS_RULES`) and filled with the matching
    slice of our tensor. transformers always gives the CLS token a position embedding; a model without one (timm's
    `no_embed_class`) is represented exactly by a zero CLS position embedding.
    """
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from vit_registers.conversion.mappings import PREFIXES, RULES

    config = ours.config
    if config.mlp_type != "mlp" or not config.use_cls_token or not config.use_final_norm:
        raise ValueError("to_transformers supports CLS-token, plain-MLP models with a final norm only")
    if config.mlp_hidden_size % config.hidden_size:
        raise ValueError("transformers' Dinov2WithRegistersConfig needs an integer mlp_ratio")
    hf_config = Dinov2WithRegistersConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        mlp_ratio=config.mlp_hidden_size // config.hidden_size,
        image_size=config.image_grid[0] * config.patch_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        num_register_tokens=config.num_register_tokens,
        layerscale_value=1.0 if config.layerscale_value is None else config.layerscale_value,
        layer_norm_eps=config.layer_norm_eps,
        hidden_act=config.hidden_act,
        qkv_bias=config.qkv_bias,
    )
    hf_config._attn_implementation = attn_implementation
    model = Dinov2WithRegistersModel(hf_config).eval()
    ours_state = ours.state_dict()
    state = {}
    for key, target_tensor in model.state_dict().items():
        stripped = key
        for prefix in PREFIXES["transformers"]:
            stripped = stripped.removeprefix(prefix)
        found = next((m for m in (rule.match(stripped) for rule in RULES["transformers"]) if m is not None), None)
        if found is None:
            raise KeyError(f"no conversion rule for transformers key {key}")
        target, part = found
        if target not in ours_state:
            if target == "embeddings.mask_token":  # unused by a plain forward
                state[key] = torch.zeros_like(target_tensor)
                continue
            if target.endswith("layer_scale1.gamma") or target.endswith("layer_scale2.gamma"):
                state[key] = torch.ones_like(target_tensor)
                continue
            raise KeyError(f"{target} (for {key}) is not in the ViTRegistersModel state dict")
        tensor = ours_state[target]
        if part is not None:
            tensor = tensor.chunk(part[1], dim=0)[part[0]]
        if target == "embeddings.position_embeddings" and tensor.shape[1] == target_tensor.shape[1] - 1:
            tensor = torch.cat([torch.zeros_like(tensor[:, :1]), tensor], dim=1)
        state[key] = tensor.reshape(target_tensor.shape).clone()
    model.load_state_dict(state, strict=True)
    return model


def build_implementations(arch: str, image_size: int, seed: int, names=IMPLEMENTATIONS):
    """`({name: forward(pixel_values) -> last-layer tokens (B, 1 + R + N, D)}, our config)`, all on the same weights."""
    from vit_registers.conversion import convert

    timm_model = build_timm(arch, image_size, seed)
    ours = convert("timm", timm_model.state_dict(), arch=ARCHS[arch]).eval()
    forwards: dict[str, Callable] = {}
    for name in names:
        if name == OURS:
            forwards[name] = lambda x, m=ours: m(pixel_values=x).last_hidden_state
        elif name == "timm":
            forwards[name] = timm_model.forward_features
        elif name.startswith("transformers-"):
            hf = to_transformers(ours, name.split("-", 1)[1])
            forwards[name] = lambda x, m=hf: m(pixel_values=x).last_hidden_state
        else:
            raise ValueError(f"unknown implementation {name!r}; known: {', '.join(IMPLEMENTATIONS)}")
    return forwards, ours.config


@torch.inference_mode()
def check_parity(forwards: dict[str, Callable], image_size: int, seed: int) -> dict[str, float]:
    """Max abs difference of every implementation's tokens from ours; raise if any exceeds `PARITY_ATOL`."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, image_size, image_size, generator=generator)
    reference = forwards[OURS](x)
    differences = {}
    for name, forward in forwards.items():
        if name == OURS:
            continue
        other = forward(x)
        if other.shape != reference.shape:
            raise RuntimeError(f"{name} returns tokens of shape {tuple(other.shape)}, ours {tuple(reference.shape)}")
        differences[name] = float((other - reference).abs().max())
        if differences[name] > PARITY_ATOL:
            raise RuntimeError(
                f"{name} differs from {OURS} by {differences[name]:.2e} > {PARITY_ATOL}: not the same weights"
            )
    return differences


# ----------------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------------
def forward_flops(config, batch_size: int, image_size: int, num_register_tokens: int | None = None) -> float:
    """FLOPs of one forward pass: 2 × multiply-adds of the patch embedding, attention and MLP matrix products."""
    registers = config.num_register_tokens if num_register_tokens is None else num_register_tokens
    patches = (image_size // config.patch_size) ** 2
    tokens = int(config.use_cls_token) + registers + patches
    d, h = config.hidden_size, config.mlp_hidden_size
    fc1 = 2 * h if config.mlp_type == "swiglu" else h
    embed = 2 * patches * config.num_channels * config.patch_size**2 * d
    per_layer = 2 * tokens * (3 * d * d + d * d + d * fc1 + h * d) + 2 * 2 * tokens * tokens * d
    return float(batch_size * (embed + config.num_hidden_layers * per_layer))


@torch.inference_mode()
def gemm_peak_flops(size: int = 1024, seconds: float = 1.0) -> float:
    """Best fp32 `torch.mm` FLOP/s over repeated (size × size) products for about `seconds`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best, start = math.inf, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


@torch.inference_mode()
def time_alternating(
    forwards: dict[str, Callable], x: torch.Tensor, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each implementation; the implementations alternate, the order rotating every round."""
    names = list(forwards)
    for _ in range(warmup):
        for name in names:
            forwards[name](x)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            forwards[name](x)
            times[name].append(time.perf_counter() - t0)
    return times


def run_case(case: Case, repeats: int, warmup: int, seed: int, peak: float | None, names=IMPLEMENTATIONS,
             compile: bool = False):
    """Time one case; returns (rows, parity differences, our config)."""
    forwards, config = build_implementations(case.arch, case.image_size, seed, names)
    parity = check_parity(forwards, case.image_size, seed)
    if compile:
        forwards = {**forwards, **{f"{n}+compile": torch.compile(f) for n, f in forwards.items()}}
    x = torch.randn(case.batch_size, 3, case.image_size, case.image_size, generator=torch.Generator().manual_seed(seed))
    times = time_alternating(forwards, x, repeats, warmup)
    flops = forward_flops(config, case.batch_size, case.image_size)
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append(
            Row(
                case.arch, case.image_size, case.batch_size, name, median, case.batch_size / median, flops / 1e9,
                None if peak is None else flops / median / peak, times_s=samples,
            )
        )
    ours = {row.implementation.replace(OURS, ""): row for row in rows if row.implementation.startswith(OURS)}
    for row in rows:
        suffix = "+compile" if row.implementation.endswith("+compile") else ""
        if suffix in ours:
            row.ratio_ours_over_this = row.median_s / ours[suffix].median_s
    return rows, parity, config


@torch.inference_mode()
def register_cost(base, image_size: int, batch_size: int, counts=(0, 1, 4, 16), repeats: int = 0,
                  warmup: int = 1, seed: int = 0) -> list[dict]:
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
        times = time_alternating(forwards, x, repeats, warmup)
        for row in rows:
            row["images_per_s"] = batch_size / statistics.median(times[row["registers"]])
        for row in rows:
            zero = rows[0] if rows[0]["registers"] == 0 else None
            row["throughput_vs_0"] = None if zero is None else row["images_per_s"] / zero["images_per_s"]
    return rows


def machine_info() -> dict:
    import timm
    import transformers

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------
def format_table(rows: list[Row]) -> str:
    lines = [
        "| model | image | batch | implementation | img/s | ours / this | GFLOPs | % GEMM peak |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "—" if r.ratio_ours_over_this is None else f"{r.ratio_ours_over_this:.2f}×"
        peak = "—" if r.gemm_fraction is None else f"{100 * r.gemm_fraction:.0f} %"
        lines.append(
            f"| ViT-{r.arch} reg4 | {r.image_size}² | {r.batch_size} | {r.implementation} | {r.images_per_s:.1f} "
            f"| {ratio} | {r.gflops:.1f} | {peak} |"
        )
    return "\n".join(lines)


def format_register_table(rows: list[dict]) -> str:
    lines = ["| registers | GFLOPs | FLOPs vs 0 | img/s | throughput vs 0 |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        ips = f"{r['images_per_s']:.1f}" if "images_per_s" in r else "—"
        rel = f"{r['throughput_vs_0']:.3f}" if r.get("throughput_vs_0") is not None else "—"
        lines.append(f"| {r['registers']} | {r['gflops']:.2f} | {r['flops_vs_0']:.4f} | {ips} | {rel} |")
    return "\n".join(lines)


def _csv(kind: Callable):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: S/14, 224², batch 1, 3 repeats")
    parser.add_argument("--archs", type=_csv(str), default=list(ARCHS), help="comma list of " + ", ".join(ARCHS))
    parser.add_argument("--image-sizes", type=_csv(int), default=[224, 518])
    parser.add_argument("--batch-sizes", type=_csv(int), default=[1, 8])
    parser.add_argument(
        "--implementations", type=_csv(str), default=list(IMPLEMENTATIONS),
        help="comma list of " + ", ".join(IMPLEMENTATIONS),
    )
    parser.add_argument("--repeats", type=_positive, default=10)
    parser.add_argument("--warmup", type=_positive, default=2)
    parser.add_argument("--threads", type=_positive, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd versions")
    parser.add_argument("--no-registers", action="store_true", help="skip the cost-of-registers section")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.archs, args.image_sizes, args.batch_sizes = ["S/14"], [224], [1]
        args.repeats, args.warmup = min(args.repeats, 3), 1
    unknown = [a for a in args.archs if a not in ARCHS]
    unknown += [i for i in args.implementations if i not in IMPLEMENTATIONS]
    if unknown:
        print(f"benchmarks: error: unknown arch/implementation {', '.join(unknown)}", file=sys.stderr)
        return 2
    if OURS not in args.implementations:
        args.implementations = [OURS, *args.implementations]
    bad_sizes = [s for s in args.image_sizes if s <= 0 or s % 14]
    if bad_sizes or any(b <= 0 for b in args.batch_sizes):
        print("benchmarks: error: image sizes must be positive multiples of 14, batch sizes positive", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        import timm  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        print(f"benchmarks: error: the benchmarks need timm and transformers ({error})", file=sys.stderr)
        return 2
    started = time.perf_counter()
    peak = gemm_peak_flops(seconds=0.5 if args.quick else 2.0)
    print(f"fp32 GEMM peak (1024³ torch.mm): {peak / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    rows, parity, configs = [], {}, {}
    for arch in args.archs:
        for image_size in args.image_sizes:
            for batch_size in args.batch_sizes:
                case = Case(arch, image_size, batch_size)
                case_rows, case_parity, configs[arch] = run_case(
                    case, args.repeats, args.warmup, args.seed, peak, args.implementations, args.compile
                )
                rows += case_rows
                parity[f"{arch}@{image_size}"] = case_parity
                print(format_table(case_rows).split("\n", 2)[2], file=sys.stderr, flush=True)
    registers = []
    if not args.no_registers:
        registers = register_cost(
            configs[args.archs[0]], args.image_sizes[0], args.batch_sizes[-1],
            repeats=0 if args.quick else args.repeats, seed=args.seed,
        )
    print(format_table(rows))
    if registers:
        print()
        print(f"Cost of registers (ViT-{args.archs[0]}, {args.image_sizes[0]}², batch {args.batch_sizes[-1]}):")
        print(format_register_table(registers))
    result = {
        "machine": machine_info(),
        "gemm_peak_gflops": peak / 1e9,
        "parity_max_abs_diff": parity,
        "forward": [asdict(r) for r in rows],
        "registers": registers,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "wall_s": time.perf_counter() - started,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
