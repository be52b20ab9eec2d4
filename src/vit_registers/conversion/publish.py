"""Verify a conversion numerically, write it atomically with a model card, and publish it to the Hub.

    result = convert_and_publish("dinov2", "dinov2_vits14_reg4_pretrain.pth", arch="dinov2_vits14_reg",
                                 output_dir="out/dinov2-small-reg", push_to_hub="org/dinov2-small-reg")

Nothing is written unless every output token of the converted model (CLS, registers, patches) matches the source
library's own implementation with the same weights within `tolerance` (fp32) at two resolutions, one non-square.
Writes go to a hidden temporary directory next to `output_dir` that is renamed into place only when complete, so an
interrupted or failed run leaves no partial output. The push creates the repo if needed and uploads the folder in one
commit; the token comes from the usual places (`HF_TOKEN`, `hf auth login`) or the `token` argument and is never
printed or written.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._quiet import quiet_transformers
from ..configuration_vit_registers import ViTRegistersConfig
from ..modeling_vit_registers import ViTRegistersModel
from . import (
    ConversionError,
    build_reference,
    convert,
    dinov3,
    interpolation_summary,
    model_tokens,
    reference_interpolation,
    reference_tokens,
)

DEFAULT_TOLERANCE = 1e-4
# `pooled`: the attention pool's output (pooling="map"), compared where the model has one (its weights are the pool's)
TOKEN_GROUPS = ("cls", "registers", "patches", "pooled")
GROUP_TITLES = {"cls": "CLS", "registers": "registers", "patches": "patches", "pooled": "attention pool"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TEMPLATE_PATH = Path(__file__).resolve().parents[3] / "model_cards" / "vit_registers.md"
from transformers.image_utils import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN  # noqa: E402
from transformers.image_utils import IMAGENET_DEFAULT_STD as IMAGENET_STD  # noqa: E402

OFFICIAL_BASE_MODELS = {
    "dinov2_vits14": "facebook/dinov2-small",
    "dinov2_vitb14": "facebook/dinov2-base",
    "dinov2_vitl14": "facebook/dinov2-large",
    "dinov2_vitg14": "facebook/dinov2-giant",
    "dinov2_vits14_reg": "facebook/dinov2-with-registers-small",
    "dinov2_vitb14_reg": "facebook/dinov2-with-registers-base",
    "dinov2_vitl14_reg": "facebook/dinov2-with-registers-large",
    "dinov2_vitg14_reg": "facebook/dinov2-with-registers-giant",
}
SOURCE_DESCRIPTIONS = {
    "dinov2": "official DINOv2 checkpoint (facebookresearch/dinov2)",
    "timm": "timm checkpoint",
    "transformers": "transformers Dinov2 / Dinov2WithRegisters / DINOv3ViT checkpoint",
    "dinov3": "official DINOv3 checkpoint (facebookresearch/dinov3)",
}


# What `pooler_output` is, for the model card's usage example (`ViTRegistersConfig.pooling`).
POOLING_TEXT = {
    "cls": "the CLS token",
    "mean": "the mean of the patch tokens (then `fc_norm` where the model has one)",
    "cls_mean": "the CLS token and the mean of the patch tokens, concatenated",
    "map": "the attention pool over the patch tokens (timm's MAP head)",
}


class ParityError(ConversionError):
    """The converted model does not reproduce the reference implementation within the tolerance."""


# ----------------------------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ParityRow:
    """Max abs difference per token group at one input size (`None`: the model has no such token)."""

    height: int
    width: int
    max_abs_diff: dict[str, float | None]
    tolerance: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return all(v <= self.tolerance for v in self.max_abs_diff.values() if v is not None)

    def describe(self) -> str:
        parts = [f"{g} {_fmt(v)}" for g, v in self.max_abs_diff.items() if g != "pooled" or v is not None]
        status = "ok" if self.passed else f"FAIL (> {self.tolerance:g})"
        note = f"  [{self.note}]" if self.note else ""
        return f"{self.height}x{self.width}: " + "  ".join(parts) + f"  {status}{note}"


@dataclass
class ParityReport:
    """What `verify` measured: one row per resolution, the inputs used and the tolerance."""

    rows: list[ParityRow]
    tolerance: float
    batch_size: int
    seed: int
    reference_name: str
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and all(row.passed for row in self.rows)

    def max_abs_diff(self, group: str) -> float | None:
        values = [row.max_abs_diff.get(group) for row in self.rows if row.max_abs_diff.get(group) is not None]
        return max(values) if values else None

    def lines(self) -> list[str]:
        return [row.describe() for row in self.rows] + [f"problem: {p}" for p in self.problems]

    def to_markdown(self) -> str:
        pooled = any(row.max_abs_diff.get("pooled") is not None for row in self.rows)
        groups = [group for group in TOKEN_GROUPS if group != "pooled" or pooled]
        header = (
            f"| input (H×W) | {' | '.join(GROUP_TITLES[g] for g in groups)} | result |\n|{'---|' * (len(groups) + 2)}\n"
        )
        body = ""
        for row in self.rows:
            cells = [_fmt(row.max_abs_diff.get(g)) for g in groups]
            result = ("pass" if row.passed else "FAIL") + (f" ({row.note})" if row.note else "")
            body += f"| {row.height}×{row.width} | " + " | ".join(cells) + f" | {result} |\n"
        return header + body

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "tolerance": self.tolerance,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "reference": self.reference_name,
            "rows": [
                {"height": r.height, "width": r.width, "max_abs_diff": r.max_abs_diff, "note": r.note}
                for r in self.rows
            ],
            "problems": list(self.problems),
        }


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2e}"


def verification_resolutions(config: ViTRegistersConfig) -> list[tuple[int, int]]:
    """The stored grid (no position-embedding resampling) and a non-square grid with ~3/4 of the rows."""
    rows, cols = config.image_grid
    patch = config.patch_size
    other_rows = max(1, rows * 3 // 4)
    if other_rows == rows or other_rows == cols:
        other_rows = rows + 1 if rows + 1 != cols else rows + 2
    return [(rows * patch, cols * patch), (other_rows * patch, cols * patch)]


def fixed_inputs(config: ViTRegistersConfig, size: tuple[int, int], batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    """Reproducible normalised-image-like inputs: standard normal noise from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, config.num_channels, *size, generator=generator)


@contextlib.contextmanager
def _config_overrides(config: ViTRegistersConfig, overrides: Mapping[str, Any]):
    saved = {key: getattr(config, key) for key in overrides}
    try:
        for key, value in overrides.items():
            setattr(config, key, value)
        yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


def _reference_name(reference: torch.nn.Module) -> str:
    module = type(reference).__module__.split(".")[0]
    try:
        version = __import__(module).__version__
    except (ImportError, AttributeError):
        version = "?"
    return f"{module} {version} `{type(reference).__name__}`"


@torch.no_grad()
def verify(
    model: ViTRegistersModel,
    reference: torch.nn.Module,
    *,
    source: str | None = None,
    resolutions: Sequence[tuple[int, int]] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    batch_size: int = 2,
    seed: int = 0,
    progress: bool = False,
) -> ParityReport:
    """Compare every output token of `model` with `reference` (same weights) in float32.

    At the stored grid both models run with their own settings. At the other sizes, the official DINOv2 models without
    registers resample position embeddings with an offset that timm lacks, so there the converted model runs with
    `reference_interpolation`'s settings (the weights are what is being checked; the offset has its own test).
    """
    from tqdm.auto import tqdm

    config = model.config
    model, reference = model.float().eval(), reference.float().eval()
    resolutions = [tuple(int(v) for v in size) for size in (resolutions or verification_resolutions(config))]
    native = (config.image_grid[0] * config.patch_size, config.image_grid[1] * config.patch_size)
    rows, problems = [], []
    for height, width in tqdm(resolutions, desc="verifying", unit="size", disable=not progress):
        overrides = reference_interpolation(source, config, reference) if source and (height, width) != native else {}
        note = ", ".join(f"{k}={v}" for k, v in overrides.items())
        pixel_values = fixed_inputs(config, (height, width), batch_size, seed)
        with _config_overrides(config, overrides):
            ours = model_tokens(model, pixel_values)
        theirs = reference_tokens(reference, pixel_values)
        diffs: dict[str, float | None] = {}
        for group in TOKEN_GROUPS:
            a, b = ours.get(group), theirs.get(group)
            if a is None and b is None:
                diffs[group] = None
            elif a is None or b is None or tuple(a.shape) != tuple(b.shape):
                shape_a = None if a is None else tuple(a.shape)
                shape_b = None if b is None else tuple(b.shape)
                problems.append(f"{height}x{width} {group}: converted {shape_a} vs reference {shape_b}")
                diffs[group] = math.inf
            elif a.numel() == 0:
                diffs[group] = None
            else:
                diff = (a.float() - b.float()).abs().max().item()
                diffs[group] = diff if math.isfinite(diff) else math.inf
        rows.append(ParityRow(height, width, diffs, tolerance, note))
    return ParityReport(rows, tolerance, batch_size, seed, _reference_name(reference), problems)


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing and model card
# ----------------------------------------------------------------------------------------------------------------------
def make_image_processor(source: str, reference: torch.nn.Module | None = None, checkpoint: Any = None):
    """`(image_processor, description)` reproducing the source's evaluation preprocessing.

    DINOv2: resize the short side to 256, center crop 224, bicubic, ImageNet mean/std. timm: the model's data config
    (`timm.data.resolve_data_config`: input size, crop_pct, interpolation, mean/std). transformers: the directory's
    own `preprocessor_config.json` when it has one, else the DINOv2 settings.
    """
    from transformers import AutoImageProcessor, BitImageProcessor

    if source == "transformers" and checkpoint is not None and not isinstance(checkpoint, Mapping):
        path = Path(checkpoint)
        if path.is_dir() and (path / "preprocessor_config.json").exists():
            processor = AutoImageProcessor.from_pretrained(str(path))
            return processor, f"`{type(processor).__name__}` copied from the source directory"
    if source == "dinov3":
        return dinov3.image_processor()
    if source == "timm" and reference is not None and hasattr(reference, "pretrained_cfg"):
        from timm.data import resolve_data_config

        data = resolve_data_config({}, model=reference)
        _, height, width = data["input_size"]
        crop_pct = data.get("crop_pct") or 1.0
        resample = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}.get(data.get("interpolation"), 3)
        if height == width:
            size = {"shortest_edge": int(math.floor(height / crop_pct))}
        else:
            size = {"height": int(math.floor(height / crop_pct)), "width": int(math.floor(width / crop_pct))}
        processor = BitImageProcessor(
            do_resize=True,
            size=size,
            resample=resample,
            do_center_crop=True,
            crop_size={"height": height, "width": width},
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=list(data["mean"]),
            image_std=list(data["std"]),
            do_convert_rgb=True,
        )
        description = (
            f"timm data config — resize {size}, center crop {height}×{width} (crop_pct {crop_pct}), "
            f"{data.get('interpolation')}, mean {tuple(round(m, 4) for m in data['mean'])}, "
            f"std {tuple(round(s, 4) for s in data['std'])}"
        )
        return processor, description
    processor = BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=3,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )
    return (
        processor,
        "DINOv2 evaluation transform — resize 256 (short side), center crop 224, bicubic, ImageNet mean/std",
    )


def default_base_model(source: str, arch: str | None, reference: torch.nn.Module | None = None) -> str | None:
    """The Hub repo the weights come from, when it can be known: official names map to `facebook/…`, timm models
    name their own `hf_hub_id`."""
    if source == "dinov2" and arch in OFFICIAL_BASE_MODELS:
        return OFFICIAL_BASE_MODELS[arch]
    if source == "dinov3" and arch in dinov3.OFFICIAL_DINOV3_BASE_MODELS:
        return dinov3.OFFICIAL_DINOV3_BASE_MODELS[arch]
    if source == "timm" and reference is not None:
        hub_id = (getattr(reference, "pretrained_cfg", None) or {}).get("hf_hub_id")
        return hub_id or None
    return None


def build_model_card(
    model: ViTRegistersModel,
    report: ParityReport,
    *,
    source: str,
    arch: str | None,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    dtype: str = "float32",
    preprocessing: str = "",
    interpolation: str = "",
    template_path: str | os.PathLike = TEMPLATE_PATH,
):
    """A `huggingface_hub.ModelCard` from `model_cards/vit_registers.md`, with the parity table `report` measured."""
    import transformers
    from huggingface_hub import ModelCard, ModelCardData

    from .. import __version__

    if not Path(template_path).is_file():
        raise ConversionError(f"Model card template not found: {template_path}")
    config = model.config
    registers = config.num_register_tokens
    tags = ["vit-registers", "vision", "vit", "custom_code", f"registers-{registers}", source]
    if arch and "dinov2" in arch and "dinov2" not in tags:
        tags.append("dinov2")
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        tags=tags,
        base_model=base_model,
    )
    name = repo_id.split("/")[-1] if repo_id else (arch or "vit-registers model")
    architecture = (
        f"{config.num_hidden_layers} layers, width {config.hidden_size}, {config.num_attention_heads} heads, "
        f"patch {config.patch_size}, {'SwiGLU' if config.mlp_type == 'swiglu' else 'GELU'} MLP, "
        f"{'CLS token' if config.use_cls_token else 'no CLS token'}"
    )
    summary = (
        f"A Vision Transformer with {registers} register token{'s' if registers != 1 else ''} (Darcet et al., 2024), "
        f"converted from `{arch or source}` with every output token checked against the original implementation."
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=name,
        summary=summary,
        source=source,
        source_description=SOURCE_DESCRIPTIONS.get(source, source),
        arch=arch or source,
        repo_id=repo_id or f"<namespace>/{name}",
        base_model=base_model,
        num_register_tokens=registers,
        hidden_size=config.hidden_size,
        pooled_size=config.hidden_size * (2 if config.pooling == "cls_mean" else 1),
        pooling=POOLING_TEXT[config.pooling],
        position_encoding=config.position_encoding,
        architecture=architecture,
        preprocessing=preprocessing or "see preprocessor_config.json",
        interpolation=interpolation or interpolation_summary(source, config, arch=arch),
        package_version=__version__,
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        dtype=dtype,
        reference_name=report.reference_name,
        batch_size=report.batch_size,
        seed=report.seed,
        tolerance=f"{report.tolerance:g}",
        parity_table=report.to_markdown(),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Writing and pushing
# ----------------------------------------------------------------------------------------------------------------------
def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Refuse an output path that is a file or a non-empty directory (nothing is ever overwritten)."""
    path = Path(output_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConversionError(f"Output directory {path} already exists and is not empty; choose a new --output-dir.")
    return path


def write_output(
    output_dir: str | os.PathLike,
    model: ViTRegistersModel,
    image_processor=None,
    model_card=None,
    *,
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """`save_pretrained` (safetensors, sharded above `max_shard_size`, code files + `auto_map`), the image processor
    config and `README.md`, written into a temporary sibling directory that is renamed to `output_dir` at the end."""
    if dtype not in DTYPES:
        raise ConversionError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    target = check_output_dir(output_dir).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        model.to(DTYPES[dtype]).save_pretrained(staging, max_shard_size=max_shard_size)
        if image_processor is not None:
            image_processor.save_pretrained(staging)
        if model_card is not None:
            model_card.save(staging / "README.md")
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        _apply_umask(staging)  # mkdtemp creates 0700
        check_output_dir(target)  # still free?
        if target.exists():
            target.rmdir()
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _apply_umask(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
):
    """Create `repo_id` if needed and upload `folder` in one commit. Returns huggingface_hub's `CommitInfo`."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        commit_message=commit_message or "Upload vit_registers conversion (verified)",
    )


def check_hub_access(repo_id: str, token: str | None = None) -> str:
    """Fail before converting when pushing cannot work: a malformed repo id or no valid token. Returns the user."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConversionError(f"--push-to-hub expects ORG/NAME, got {repo_id!r}.")
    try:
        user = HfApi(token=token).whoami()
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        raise ConversionError(
            f"Cannot push: the Hub rejected the token (HTTP {status}). Log in or set HF_TOKEN."
        ) from None
    except Exception as error:  # noqa: BLE001 - e.g. no token at all (LocalTokenNotFoundError), no connection
        raise ConversionError(f"Cannot push: {type(error).__name__}: {str(error).splitlines()[0]}") from None
    return user.get("name", "?")


# ----------------------------------------------------------------------------------------------------------------------
# The whole pipeline
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class PublishResult:
    output_dir: Path
    report: ParityReport
    commit_url: str | None = None


def convert_and_publish(
    source: str,
    checkpoint: Any,
    *,
    output_dir: str | os.PathLike,
    arch: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    dtype: str = "float32",
    interpolation: str = "source",
    tolerance: float = DEFAULT_TOLERANCE,
    resolutions: Sequence[tuple[int, int]] | None = None,
    max_shard_size: str | int = "5GB",
    token: str | None = None,
    license: str = "apache-2.0",
    base_model: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PublishResult:
    """Convert → verify against the reference → write atomically → push. Raises `ConversionError` (or `ParityError`)
    before writing anything when any step fails. `interpolation` ("source" or "official") is `convert`'s: which
    resampling of the position embeddings the converted model follows; the log and the card say which."""
    from tqdm.auto import tqdm

    if dtype not in DTYPES:
        raise ConversionError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    check_output_dir(output_dir)
    if push_to_hub:
        check_hub_access(push_to_hub, token)
    steps = tqdm(total=3, desc="converting", unit="step", disable=not progress)
    with steps:
        steps.set_description("loading")
        model = convert(source, checkpoint, arch=arch, interpolation=interpolation)
        steps.update()
        steps.set_description("building reference")
        with quiet_transformers():  # a local directory: no "Loading weights" bar inside this one
            reference = build_reference(source, checkpoint, arch=arch)
        steps.update()
        steps.set_description("verifying")
        report = verify(
            model, reference, source=source, resolutions=resolutions, tolerance=tolerance, progress=progress
        )
        steps.update()
    resampling = interpolation_summary(source, model.config, checkpoint, arch)
    log(f"position embeddings {resampling}.")
    log(f"parity vs {report.reference_name} (max abs diff, tolerance {tolerance:g}):")
    for line in report.lines():
        log("  " + line)
    if not report.passed:
        worst = max((v for row in report.rows for v in row.max_abs_diff.values() if v is not None), default=math.inf)
        detail = f"; {report.problems[0]}" if report.problems else ""
        raise ParityError(
            f"Parity check failed: max abs diff {worst:.3g} > {tolerance:g}{detail}. Nothing written or pushed."
        )
    processor, preprocessing = make_image_processor(source, reference, checkpoint)
    card = build_model_card(
        model,
        report,
        source=source,
        arch=arch,
        repo_id=push_to_hub,
        base_model=base_model or default_base_model(source, arch, reference),
        license=license,
        dtype=dtype,
        preprocessing=preprocessing,
        interpolation=resampling,
    )
    del reference
    with quiet_transformers():  # no "Writing model shards" bar
        target = write_output(output_dir, model, processor, card, dtype=dtype, max_shard_size=max_shard_size)
    log(f"wrote {target}")
    commit_url = None
    if push_to_hub:
        info = push_folder(target, push_to_hub, private=private, token=token)
        commit_url = info.commit_url
        log(f"pushed to {push_to_hub}: {commit_url}")
    return PublishResult(target, report, commit_url)


__all__ = [
    "DEFAULT_TOLERANCE",
    "ParityError",
    "ParityReport",
    "ParityRow",
    "verify",
    "verification_resolutions",
    "fixed_inputs",
    "make_image_processor",
    "default_base_model",
    "build_model_card",
    "check_output_dir",
    "write_output",
    "push_folder",
    "check_hub_access",
    "convert_and_publish",
    "PublishResult",
]
