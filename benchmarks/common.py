"""Shared pieces of the benchmarks (issue 3): identical-weight models, parity checks, alternating timing, reports.

Every section builds one timm `vit_*_patch14_reg4_dinov2` model with random weights (seed `--seed`), turns it into a
`ViTRegistersModel` with `vit_registers.conversion.convert("timm", ...)`, and writes the same tensors into transformers'
`Dinov2WithRegistersModel` through the conversion tables read backwards. Before anything is timed the implementations
must agree (max abs difference ≤ `PARITY_ATOL`); they then run alternately in one process, the order rotating every
round, and the medians are reported with the ratio this project / peer (> 1: this project is faster or smaller).
"""

from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

ARCHS = {
    "S/14": "vit_small_patch14_reg4_dinov2",
    "B/14": "vit_base_patch14_reg4_dinov2",
    "L/14": "vit_large_patch14_reg4_dinov2",
    "tiny": "vit_small_patch14_reg4_dinov2",  # width 64, 2 blocks: for the test suite's smoke run
}
ARCH_OVERRIDES = {"tiny": dict(embed_dim=64, depth=2, num_heads=1)}
DEFAULT_ARCHS = ("S/14", "B/14")
OURS = "vit-registers"  # the model as the package's commands run it: CPU kernels applied (`onednn.kernelize`)
NO_KERNELS = f"{OURS}+no-kernels"  # the reference model file alone (what `trust_remote_code` users run)
PREPACKED = f"{OURS}+prepacked"  # kernelized, after `onednn.prepack_weights()` (opt-in: a second copy of the weights)
IMPLEMENTATIONS = (OURS, NO_KERNELS, PREPACKED, "transformers-sdpa", "transformers-eager", "timm")


def is_ours(name: str) -> bool:
    """Whether an implementation name is this project (plain, prepacked or compiled), not a peer."""
    return name == OURS or name.startswith(OURS + "+")


PARITY_ATOL = 1e-3


class ParityError(RuntimeError):
    """Two implementations that should hold the same weights give different outputs: nothing is timed."""


# ----------------------------------------------------------------------------------------------------------------------
# Models with identical weights
# ----------------------------------------------------------------------------------------------------------------------
def build_timm(arch: str, image_size: int, seed: int, timm_name: str | None = None, **kwargs) -> torch.nn.Module:
    """timm's model with random weights; LayerScale is drawn from U(0.5, 1.5) so that every block matters."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        timm_name or ARCHS[arch],
        pretrained=False,
        img_size=image_size,
        **{"num_classes": 0, **kwargs},
        **ARCH_OVERRIDES.get(arch, {}),
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                parameter.uniform_(0.5, 1.5)
    return model.eval()


def transformers_config(config, attn_implementation: str, cls=None, **extra):
    """transformers' `Dinov2WithRegistersConfig` for our `ViTRegistersConfig` (plain MLP, CLS token, final norm)."""
    from transformers import Dinov2WithRegistersConfig

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
        **extra,
    )
    hf_config._attn_implementation = attn_implementation
    return hf_config


def transformers_state_dict(ours: torch.nn.Module, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of `ours` (a `ViTRegistersModel`) under the transformers keys of `target` (a backbone state dict).

    Every transformers key is matched against the conversion table (`TRANSFORMERS_RULES`) and filled with the matching
    slice of our tensor. transformers always gives the CLS token a position embedding; a model without one (timm's
    `no_embed_class`) is represented exactly by a zero CLS position embedding.
    """
    from vit_registers.conversion.mappings import PREFIXES, RULES

    ours_state = ours.state_dict()
    state = {}
    for key, target_tensor in target.items():
        stripped = key
        for prefix in PREFIXES["transformers"]:
            stripped = stripped.removeprefix(prefix)
        found = next((m for m in (rule.match(stripped) for rule in RULES["transformers"]) if m is not None), None)
        if found is None:
            raise KeyError(f"no conversion rule for transformers key {key}")
        name, part = found
        if name not in ours_state:
            if name == "embeddings.mask_token":  # unused by a plain forward
                state[key] = torch.zeros(target_tensor.shape, dtype=target_tensor.dtype)
                continue
            if name.endswith("layer_scale1.gamma") or name.endswith("layer_scale2.gamma"):
                state[key] = torch.ones(target_tensor.shape, dtype=target_tensor.dtype)
                continue
            raise KeyError(f"{name} (for {key}) is not in the ViTRegistersModel state dict")
        tensor = ours_state[name]
        if part is not None:
            tensor = tensor.chunk(part[1], dim=0)[part[0]]
        if name == "embeddings.position_embeddings" and tensor.shape[1] == target_tensor.shape[1] - 1:
            tensor = torch.cat([torch.zeros_like(tensor[:, :1]), tensor], dim=1)
        state[key] = tensor.reshape(target_tensor.shape).clone()
    return state


def build_on_meta(cls, config, state_for: Callable[[dict], dict]) -> torch.nn.Module:
    """`cls(config)` built on the meta device (no wasted random init) and filled with `state_for(meta state dict)`."""
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(state_for(model.state_dict()), strict=True, assign=True)
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"{cls.__name__}: tensors not filled from the state dict: {left[:5]}")
    return model


def to_transformers(ours: torch.nn.Module, attn_implementation: str) -> torch.nn.Module:
    """A transformers `Dinov2WithRegistersModel` holding exactly the weights of `ours` (a `ViTRegistersModel`)."""
    from transformers import Dinov2WithRegistersModel

    config = transformers_config(ours.config, attn_implementation)
    return build_on_meta(Dinov2WithRegistersModel, config, lambda target: transformers_state_dict(ours, target)).eval()


def build_models(arch: str, image_size: int, seed: int, names=IMPLEMENTATIONS) -> dict[str, torch.nn.Module]:
    """`{name: model}` on the same random weights, float32 on the CPU: ours (`ViTRegistersModel`: kernelized as the
    package's commands run it, the reference without kernels, kernelized with prepacked weights), timm,
    transformers-{sdpa,eager}."""
    from vit_registers import onednn
    from vit_registers.conversion import convert

    timm_model = build_timm(arch, image_size, seed)
    reference = convert("timm", timm_model.state_dict(), arch=ARCHS[arch]).eval()
    ours = copy.deepcopy(reference)
    onednn.kernelize(ours)
    models: dict[str, torch.nn.Module] = {}
    for name in names:
        if name == OURS:
            models[name] = ours
        elif name == NO_KERNELS:
            models[name] = reference
        elif name == PREPACKED:
            models[name] = copy.deepcopy(ours)  # the packs belong to this copy only
            onednn.prepack_weights(models[name])
        elif name == "timm":
            models[name] = timm_model
        elif name.startswith("transformers-"):
            models[name] = to_transformers(ours, name.split("-", 1)[1])
        else:
            raise ValueError(f"unknown implementation {name!r}; known: {', '.join(IMPLEMENTATIONS)}")
    models.setdefault(OURS, ours)
    return models


def last_tokens(name: str, model: torch.nn.Module) -> Callable:
    """`forward(pixel_values) -> (B, 1 + R + N, D)` last-layer tokens (after the final norm) of one implementation."""
    if name == "timm":
        return model.forward_features
    return lambda x: model(pixel_values=x).last_hidden_state


def build_implementations(arch: str, image_size: int, seed: int, names=IMPLEMENTATIONS):
    """`({name: forward(pixel_values) -> last-layer tokens}, our config)`, all on the same weights."""
    models = build_models(arch, image_size, seed, names)
    forwards = {name: last_tokens(name, models[name]) for name in names}
    return forwards, models[OURS].config


def build_placed_implementations(
    arch: str, image_size: int, seed: int, names=IMPLEMENTATIONS, device: str = "cpu", dtype: str = "float32"
):
    """`({name: forward}, our config, parity differences)`: the models are built in float32 on the CPU, moved to
    `device`, checked for parity there in float32 (so the check is about the weights, not about rounding), then cast
    to `dtype` for timing. The prepacked variant (oneDNN's float32 CPU layout) only runs on the CPU in float32."""
    if device != "cpu" or dtype != "float32":
        names = tuple(name for name in names if name != PREPACKED)
    models = build_models(arch, image_size, seed, names)
    for model in models.values():
        model.to(device)
    forwards = {name: last_tokens(name, models[name]) for name in names}
    parity = check_parity(forwards, image_size, seed, device=device)
    if dtype != "float32":
        for model in models.values():
            model.to(getattr(torch, dtype))
    return forwards, models[OURS].config, parity


def place(tensor: torch.Tensor, device: str = "cpu", dtype: str = "float32") -> torch.Tensor:
    """`tensor` on `device` in `dtype` (a name such as "bfloat16")."""
    return tensor.to(device=device, dtype=getattr(torch, dtype))


def synchronizer(device: str = "cpu") -> Callable[[], None]:
    """A function that waits for the work queued on `device` (a no-op on the CPU, whose calls return when done)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return lambda: None
    if kind == "cuda":
        return lambda: torch.cuda.synchronize(device)
    raise ValueError(f"cannot time device {device!r}: the benchmarks time cpu or cuda devices")


@torch.inference_mode()
def check_parity(
    forwards: dict[str, Callable],
    image_size: int,
    seed: int,
    reference: str = OURS,
    atol: float = PARITY_ATOL,
    device: str = "cpu",
) -> dict[str, float]:
    """Max abs difference of every implementation's output from `reference`'s; raise `ParityError` above `atol`."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, image_size, image_size, generator=generator).to(device)
    expected = forwards[reference](x)
    differences = {}
    for name, forward in forwards.items():
        if name == reference:
            continue
        other = forward(x)
        if other.shape != expected.shape:
            raise ParityError(f"{name} returns shape {tuple(other.shape)}, {reference} {tuple(expected.shape)}")
        differences[name] = float((other - expected).abs().max())
        if not differences[name] <= atol:
            raise ParityError(
                f"{name} differs from {reference} by {differences[name]:.2e} > {atol}: not the same weights"
            )
    return differences


# ----------------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------------
def forward_flops(
    config, batch_size: int, image_size: int, num_register_tokens: int | None = None, extra_tokens: int = 0
) -> float:
    """FLOPs of one forward pass: 2 × multiply-adds of the patch embedding, attention and MLP matrix products."""
    registers = config.num_register_tokens if num_register_tokens is None else num_register_tokens
    patches = (image_size // config.patch_size) ** 2
    tokens = int(config.use_cls_token) + registers + patches + extra_tokens
    d, h = config.hidden_size, config.mlp_hidden_size
    fc1 = 2 * h if config.mlp_type == "swiglu" else h
    embed = 2 * patches * config.num_channels * config.patch_size**2 * d
    per_layer = 2 * tokens * (3 * d * d + d * d + d * fc1 + h * d) + 2 * 2 * tokens * tokens * d
    return float(batch_size * (embed + config.num_hidden_layers * per_layer))


@torch.inference_mode()
def gemm_peak_flops(size: int = 1024, seconds: float = 1.0, device: str = "cpu", dtype: str = "float32") -> float:
    """Best FLOP/s of repeated (size × size) products in `dtype` on `device` for about `seconds`, over the GEMMs torch
    offers there: `torch.mm` (MKL / OpenBLAS on the CPU, cuBLAS on a GPU) and, on the CPU in float32, oneDNN's
    `mkldnn._linear_pointwise`, which this project's CPU path uses (the peak is the best any of them reaches, so no
    implementation is measured against a low bar). A GPU gets 4096² products (1024² would not fill it)."""
    if torch.device(device).type != "cpu":
        return _device_gemm_peak(device, dtype, seconds)
    a, b = (place(torch.randn(size, size), device, dtype) for _ in range(2))
    products = [lambda: torch.mm(a, b)]
    onednn = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if dtype == "float32" and onednn is not None and torch.backends.mkldnn.is_available():
        products.append(lambda: onednn(a, b, None, "none", [], ""))
    best = math.inf
    for product in products:
        product()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds / len(products):
            t0 = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


def _device_gemm_peak(device: str, dtype: str, seconds: float, batch: int = 20) -> float:
    """A GPU's best FLOP/s over 4096² and 8192² products, `batch` back to back between synchronizations (one
    product is too short to time against the launch and the synchronization)."""
    sync = synchronizer(device)
    best = 0.0
    for size in (4096, 8192):
        a, b = (place(torch.randn(size, size), device, dtype) for _ in range(2))
        torch.mm(a, b)
        sync()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            t0 = time.perf_counter()
            for _ in range(batch):
                torch.mm(a, b)
            sync()
            best = max(best, batch * 2.0 * size**3 / (time.perf_counter() - t0))
    return best


def time_alternating(
    functions: dict[str, Callable],
    x,
    repeats: int,
    warmup: int,
    grad: bool = False,
    max_seconds: float | None = None,
    min_repeats: int = 3,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds per call of each function; they alternate, the order rotating every round. Without `grad` the calls
    run under `torch.inference_mode()`. `sync` waits for queued device work (`synchronizer`) after each call.

    With `max_seconds` (> 0), slow cases are cut short: the rounds are capped at `max_seconds` / (duration of the first
    warm-up round), but never below `min_repeats`; warm-up stops after one round if that round took > max_seconds / 4.
    """
    names = list(functions)
    rounds = repeats
    with torch.inference_mode(not grad):
        for index in range(warmup):
            t0 = time.perf_counter()
            for name in names:
                functions[name](x)
                sync()
            if index == 0 and max_seconds:
                round_seconds = time.perf_counter() - t0
                rounds = max(min(min_repeats, repeats), min(repeats, int(max_seconds / max(round_seconds, 1e-9))))
                if round_seconds > max_seconds / 4:
                    break
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(rounds):
            for name in round_order(names, round_index):
                t0 = time.perf_counter()
                functions[name](x)
                sync()
                times[name].append(time.perf_counter() - t0)
    return times


def round_order(names: list[str], round_index: int) -> list[str]:
    """The order in which alternating implementations run in round `round_index`: `names` rotated by one place per
    round, so that none always runs first (after a cold cache) or right after the same neighbour."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def paired_ratios(samples: list[float], reference: list[float]) -> list[float]:
    """`samples[i] / reference[i]` per round: both ran in the same round, next to each other, so slow drifts of the
    machine (other tenants, page-fault storms) cancel, which a ratio of two medians does not do."""
    return [a / b for a, b in zip(samples, reference, strict=True)]


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def timing_rows(section: str, times: dict[str, list[float]], items: int, reference: str = OURS, **case) -> list[dict]:
    """One row per implementation: median seconds, items/s and `ratio_ours_over_this`, the median over rounds of
    its time / `reference`'s time in the same round (> 1: `reference` is faster), with the quartiles of those ratios
    (`ratio_quartiles`) and the plain ratio of medians (`ratio_of_medians`)."""
    reference_median = statistics.median(times[reference])
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        ratios = paired_ratios(samples, times[reference])
        rows.append(
            dict(
                section=section,
                **case,
                implementation=name,
                median_s=median,
                items_per_s=items / median,
                ratio_ours_over_this=statistics.median(ratios),
                ratio_quartiles=quartiles(ratios),
                ratio_of_medians=median / reference_median,
                times_s=samples,
            )
        )
    return rows


def rss_now_bytes() -> int | None:
    """Resident set size of this process (Linux `/proc/self/statm`)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process: `echo 5 > /proc/self/clear_refs` (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since start or the last `reset_peak_rss()`: VmHWM, else `ru_maxrss`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def allocator_text() -> str:
    """How CPU tensor memory is allocated in this process, for the report header."""
    from vit_registers.cpu_allocator import cpu_allocator_settings, cpu_allocator_tuned, policy_set_elsewhere

    if cpu_allocator_tuned():
        settings = cpu_allocator_settings()
        kept = ", ".join(f"{name.replace('_', ' ')} {size >> 20} MiB" for name, size in settings.items())
        return f"glibc malloc keeping freed memory ({kept}; vit_registers.cpu_allocator)"
    elsewhere = policy_set_elsewhere()
    return f"malloc as set outside ({elsewhere})" if elsewhere else "glibc malloc defaults"


def onednn_text() -> str:
    """The parts of this project's oneDNN CPU kernels used on this CPU (`onednn_policy`), for the report header."""
    from vit_registers.onednn import onednn_policy

    policy = onednn_policy()
    if not torch.backends.mkldnn.enabled or not policy.inference:
        parts = "off"
    else:
        activation = "activation fused" if policy.fused_activation else "activation after the product"
        training = "training too" if policy.training else "plain products in training"
        products = "inference products"
        if policy.min_inference_work:
            products += f" (plain below {policy.min_inference_work} block input elements unless prepacked)"
        parts = f"{products}, {activation}, {training}"
    return f"oneDNN path: {parts}"


def machine_info(device: str = "cpu") -> dict:
    import timm
    import transformers

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "allocator": allocator_text(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_path": onednn_text(),
    }
    if torch.device(device).type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------------
def markdown_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A Markdown table; `align` is one character per column, `l` or `r` (default: first column left, others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio_against(peer: dict, reference: dict) -> tuple[float | None, tuple[float, float] | None]:
    """`(ratio, quartiles)` of `peer` over `reference` (> 1: `reference` is better): the median of per-round time ratios
    where both rows carry their rounds (`times_s`); `(None, None)` for other rows (memory: a variant's cost is in its
    peak RSS, which the table shows against the plain model)."""
    if peer.get("times_s") and reference.get("times_s"):
        ratios = paired_ratios(peer["times_s"], reference["times_s"])
        return statistics.median(ratios), quartiles(ratios)
    return None, None


def best_peer(rows: list[dict]) -> list[dict]:
    """Per case (arch, image size, batch, compiled or not) and per implementation of this project in it (plain, with
    prepacked weights): the peer closest to it and the ratio against it, i.e. the smallest ratio (issue 3's goals are
    stated against the best peer). The plain model's ratios are the rows' `ratio_ours_over_this`."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("ratio_ours_over_this") is None:
            continue
        suffix = "+compile" if row["implementation"].endswith("+compile") else ""
        groups.setdefault((row.get("arch"), row.get("image_size"), row.get("batch_size"), suffix), []).append(row)
    summary = []
    for (arch, image_size, batch_size, suffix), members in groups.items():
        peers = [row for row in members if not is_ours(row["implementation"])]
        primary = OURS + suffix
        references = sorted(
            (row for row in members if is_ours(row["implementation"])), key=lambda row: row["implementation"] != primary
        )
        for reference in references if peers else ():
            if reference["implementation"] == primary:
                ratios = [(row["ratio_ours_over_this"], row.get("ratio_quartiles"), row) for row in peers]
            else:
                ratios = [(*ratio_against(row, reference), row) for row in peers]
                ratios = [entry for entry in ratios if entry[0] is not None]
            if not ratios:
                continue
            ratio, spread, best = min(ratios, key=lambda entry: entry[0])
            summary.append(
                dict(
                    arch=arch,
                    image_size=image_size,
                    batch_size=batch_size,
                    compiled=bool(suffix),
                    implementation=reference["implementation"],
                    best_peer=best["implementation"],
                    ratio=ratio,
                    quartiles=spread,
                )
            )
    return summary


def best_peer_text(summary: list[dict]) -> str:
    """One sentence per implementation of this project: its ratio against the best peer in every case."""
    sentences = []
    for name in dict.fromkeys(s["implementation"].removesuffix("+compile") for s in summary):
        cases = [
            f"{s['arch']} {s['image_size']}² b{s['batch_size']}{' compiled' if s['compiled'] else ''}: "
            f"{ratio_text(s['ratio'], s.get('quartiles'))} ({s['best_peer']})"
            for s in summary
            if s["implementation"].removesuffix("+compile") == name
        ]
        lead = "Against the best peer" if name == OURS else f"{name} against the best peer"
        sentences.append(f"{lead}: " + "; ".join(cases) + ".")
    return "\n\n".join(sentences)


def ratio_text(value: float | None, quartiles: tuple[float, float] | None = None) -> str:
    """`1.07×`, or with the quartiles of the per-round ratios `1.07× (1.03–1.10)`."""
    if value is None:
        return "—"
    if quartiles is None or quartiles[0] == quartiles[1] == value:
        return f"{value:.2f}×"
    return f"{value:.2f}× ({quartiles[0]:.2f}–{quartiles[1]:.2f})"


def arch_label(arch: str, registers: int | None = 4) -> str:
    return f"ViT-{arch}" + ("" if registers is None else f" reg{registers}")


def case_cells(row: dict, batch: bool = True) -> list:
    """The first cells of a results table's row: model, image size, batch size (unless `batch=False`),
    implementation."""
    cells = [arch_label(row["arch"]), f"{row['image_size']}²"]
    return cells + ([row["batch_size"]] if batch else []) + [row["implementation"]]
