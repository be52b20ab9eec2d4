"""Accelerate training loop for image classification with ViTRegisters models.

One code path for one CPU process, several processes (gloo), multi-GPU DDP, FSDP or DeepSpeed: the launch
configuration decides (see ``scripts/accelerate_configs/``). Properties the tests check:

* Same global batch ⇒ same updates whatever the number of processes: the shuffling sampler is seeded
  (`use_seedable_sampler`), and each sample's random augmentation depends only on (seed, epoch, sample index).
* Fault tolerance: ``accelerator.save_state`` every `checkpointing_steps` optimizer steps, written to a temporary
  folder and renamed when complete; resuming (``latest`` or a path) restores model, optimizer, scheduler, sampler and
  RNG states and skips the batches already seen in the interrupted epoch (``skip_first_batches``), so the resumed run
  ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._quiet import quiet_transformers
from .data import (
    ClassificationData,
    DataError,
    TransformedDataset,
    build_transforms,
    collate,
    load_classification_data,
    processor_geometry,
)
from .metrics import Accuracy
from .optim import (
    create_linear_probe_optimizer,
    create_optimizer,
    create_scheduler,
    linear_probe_learning_rate,
    peak_learning_rate,
)
from .registers import add_register_tokens

CHECKPOINT_DIR = "checkpoints"
DEFAULT_LEARNING_RATE = 1e-4  # fine-tuning with AdamW; a linear probe follows DINO's protocol (optim.py)
DEFAULT_WEIGHT_DECAY = 0.05
_STEP_DIR = re.compile(r"^step_(\d+)$")

TINY_CONFIG = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_register_tokens=4,
)


class SetupError(ValueError):
    """Bad command-line input found before training starts (model, options, checkpoint)."""


@dataclass
class FinetuneConfig:
    """Everything `scripts/finetune.py` accepts (flag `--foo-bar` ↔ field `foo_bar`)."""

    output_dir: str
    model: str | None = None
    model_config: str | None = None
    train_dir: str | None = None
    validation_dir: str | None = None
    dataset: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    num_train_epochs: int | None = None
    max_steps: int | None = None
    per_device_batch_size: int = 32
    learning_rate: float | None = None
    layer_decay: float | None = None
    weight_decay: float | None = None
    warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    linear_probe: bool = False
    num_register_tokens: int | None = None
    checkpointing_steps: int | None = None
    resume_from_checkpoint: str | None = None
    seed: int = 0
    push_to_hub: str | None = None
    crop_scale_min: float = 0.08
    image_size: int | None = None
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if not self.model and not self.model_config:
            raise SetupError(
                "give --model (a vit_registers checkpoint, 'config:tiny' or a config .json) or --model-config."
            )
        if self.model and self.model_config:
            raise SetupError("give either --model or --model-config, not both.")
        if self.num_train_epochs is not None and self.max_steps is not None:
            raise SetupError("give either --num-train-epochs or --max-steps, not both.")
        for name in ("num_train_epochs", "max_steps", "checkpointing_steps", "num_register_tokens"):
            value = getattr(self, name)
            minimum = 0 if name == "num_register_tokens" else 1
            if value is not None and value < minimum:
                raise SetupError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}.")
        for name in ("per_device_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise SetupError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise SetupError(f"--learning-rate must be > 0, got {self.learning_rate}.")
        if self.image_size is not None and self.image_size < 1:
            raise SetupError(f"--image-size must be >= 1, got {self.image_size}.")
        if not 0 < self.crop_scale_min <= 1:
            raise SetupError(f"--crop-scale-min must be in (0, 1], got {self.crop_scale_min}.")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise SetupError(f"--layer-decay must be in (0, 1], got {self.layer_decay}.")
        if (self.weight_decay is not None and self.weight_decay < 0) or self.warmup_steps < 0:
            raise SetupError("--weight-decay and --warmup-steps must be >= 0.")
        if self.linear_probe and self.layer_decay not in (None, 1.0):
            raise SetupError("--layer-decay does not apply to --linear-probe (only the classifier trains).")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise SetupError(f"--mixed-precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")


# --------------------------------------------------------------------------------------------------------------------
# Model


def default_image_processor(config):
    """A BiT-style processor for a model trained from scratch: resize to 8/7 of the input size, center crop."""
    from transformers import BitImageProcessor

    height, width = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    return BitImageProcessor(
        size={"shortest_edge": int(round(min(height, width) * 8 / 7))},
        crop_size={"height": height, "width": width},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )


def processor_at_size(image_processor, image_size: int):
    """A copy of `image_processor` that gives the model `image_size` × `image_size` inputs. A processor that resizes
    then center-crops keeps its ratio of the two (256 / 224 for DINOv2's evaluation transform)."""
    resize, (crop_height, crop_width) = processor_geometry(image_processor)
    values = image_processor.to_dict()
    if getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None):
        values["crop_size"] = {"height": image_size, "width": image_size}
        if isinstance(resize, int):
            values["size"] = {"shortest_edge": int(round(resize * image_size / min(crop_height, crop_width)))}
        else:
            ratio = image_size / min(crop_height, crop_width)
            values["size"] = {"height": int(round(resize[0] * ratio)), "width": int(round(resize[1] * ratio))}
    elif isinstance(resize, int):
        values["size"] = {"shortest_edge": image_size}
    else:
        values["size"] = {"height": image_size, "width": image_size}
    return type(image_processor).from_dict(values)


def _config_from_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except FileNotFoundError:
        raise SetupError(f"model config {path!r} does not exist.") from None
    except (OSError, json.JSONDecodeError) as error:
        raise SetupError(f"model config {path!r} is not readable JSON: {error}") from None
    if not isinstance(values, dict):
        raise SetupError(f"model config {path!r} must hold a JSON object of ViTRegistersConfig arguments.")
    return values


CONVERTIBLE_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


def convert_transformers_checkpoint(source: str, destination: str) -> str:
    """Convert a transformers Dinov2 / Dinov2WithRegisters directory into a vit_registers one (weights, config and
    image processor) at `destination`, for fine-tuning; returns `destination`.

    The processor is the one `scripts/convert.py` writes: the directory's own, else DINOv2's evaluation transform
    (224 px), not the 518 px grid the position embeddings are stored at."""
    from ..conversion import ConversionError, convert
    from ..conversion.publish import make_image_processor

    try:
        model = convert("transformers", source)
    except ConversionError as error:
        raise SetupError(f"--model {source!r} could not be converted: {error}") from None
    with quiet_transformers():
        model.save_pretrained(destination)
    make_image_processor("transformers", checkpoint=source)[0].save_pretrained(destination)
    return destination


def resolve_model_source(config: FinetuneConfig) -> dict | str:
    """Check `--model` / `--model-config` without loading weights.

    Returns the `ViTRegistersConfig` arguments of a model to build from scratch (`--model-config JSON`,
    `--model config:tiny`, `--model X.json`), or the path / Hub id of a `vit_registers` checkpoint (a transformers
    Dinov2 / Dinov2WithRegisters directory is converted first). Anything else raises :class:`SetupError`.
    """
    from transformers import AutoConfig

    from ..configuration_vit_registers import ViTRegistersConfig

    source = config.model_config or config.model
    scratch = None
    if config.model_config:
        scratch = _config_from_json(config.model_config)
    elif source == "config:tiny":
        scratch = dict(TINY_CONFIG)
    elif source.startswith("config:"):
        raise SetupError(f"unknown built-in config {source!r}; available: config:tiny.")
    elif source.endswith(".json") and not os.path.isdir(source):
        scratch = _config_from_json(source)
    if scratch is not None:
        scratch = {k: v for k, v in scratch.items() if k not in ("num_labels", "id2label", "label2id", "model_type")}
        if config.num_register_tokens is not None:
            scratch["num_register_tokens"] = config.num_register_tokens
        try:
            ViTRegistersConfig(**scratch).check_consistency()  # what building the model will check
        except (TypeError, ValueError) as error:
            raise SetupError(f"invalid model config {source!r}: {error}") from None
        return scratch

    if os.path.exists(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise SetupError(f"--model {source!r} is not a model directory (no config.json).")
    try:
        found = AutoConfig.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - unreachable hub id, bad JSON, unknown model type...
        raise SetupError(
            f"--model {source!r} is neither a local vit_registers model directory nor a loadable checkpoint "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})."
        ) from None
    if found.model_type in CONVERTIBLE_MODEL_TYPES and os.path.isdir(source):
        return convert_transformers_checkpoint(source, os.path.join(config.output_dir, "converted-model"))
    if found.model_type != ViTRegistersConfig.model_type:
        raise SetupError(
            f"--model {source!r} is a {found.model_type!r} checkpoint, not {ViTRegistersConfig.model_type!r}: "
            "convert it to a vit_registers checkpoint first."
        )
    return source


def build_model(config: FinetuneConfig, data: ClassificationData, source: dict | str | None = None):
    """The classification model, its image processor and whether it is new, labels set from `data`.

    `source` is :func:`resolve_model_source`'s answer (computed when not given). A checkpoint's classifier is
    replaced when the labels differ (`ignore_mismatched_sizes=True`).
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from ..configuration_vit_registers import ViTRegistersConfig
    from ..modeling_vit_registers import ViTRegistersForImageClassification

    if source is None:
        source = resolve_model_source(config)
    labels = dict(num_labels=len(data.labels), id2label=data.id2label, label2id=data.label2id)
    if isinstance(source, dict):
        model_config = ViTRegistersConfig(**source, **labels)
        return ViTRegistersForImageClassification(model_config), default_image_processor(model_config), True
    try:  # a local checkpoint loads without transformers' bar and report; what matters is reported below
        with quiet_transformers() if os.path.isdir(source) else contextlib.nullcontext():
            model, loading = AutoModelForImageClassification.from_pretrained(
                source, ignore_mismatched_sizes=True, output_loading_info=True, **labels
            )
    except Exception as error:  # noqa: BLE001
        raise SetupError(f"could not load --model {source!r}: {type(error).__name__}: {error}") from None
    missing = [key for key in loading.get("missing_keys", ()) if not key.startswith("classifier.")]
    unexpected = list(loading.get("unexpected_keys", ()))
    if missing or unexpected:  # the classifier is new on purpose; anything else is worth a line
        print(
            f"finetune.py: warning: --model {source!r}: {len(missing)} weight(s) newly initialised "
            f"{sorted(missing)[:4]}, {len(unexpected)} unused {sorted(unexpected)[:4]}.",
            file=sys.stderr,
        )
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except Exception:  # noqa: BLE001 - no preprocessor_config.json: derive one from the model
        processor = default_image_processor(model.config)
    return model, processor, False


def prepare_model_for_training(model, config: FinetuneConfig) -> dict:
    """Add registers, freeze for a linear probe, freeze parameters classification never uses. Returns a summary."""
    added = 0
    if config.num_register_tokens is not None and config.num_register_tokens != model.config.num_register_tokens:
        try:
            added = add_register_tokens(model, config.num_register_tokens)
        except ValueError as error:
            raise SetupError(f"--num-register-tokens: {error}") from None
    base = model.vit_registers
    if config.linear_probe:
        base.requires_grad_(False)
        if added:  # fresh registers are part of the new head: they train with it
            base.embeddings.register_tokens.requires_grad_(True)
    # Unused in classification: trainable copies would break DDP's gradient reduction.
    if base.embeddings.mask_token is not None:
        base.embeddings.mask_token.requires_grad_(False)
    if model.config.pooling == "cls" and isinstance(base.fc_norm, torch.nn.LayerNorm):
        base.fc_norm.requires_grad_(False)
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"registers_added": added, "trainable_parameters": trainable}


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints `(step, path)` under `output_dir/checkpoints`, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def resolve_checkpoint(value: str, output_dir: str) -> tuple[Path, int]:
    """`latest` → newest complete checkpoint of `output_dir`; else a `step_N` folder. Returns (path, N)."""
    if value == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            where = str(Path(output_dir) / CHECKPOINT_DIR)
            raise SetupError(f"--resume-from-checkpoint latest: no checkpoint in {where!r}.")
        step, path = found[-1]
        return path, step
    path = Path(value)
    if not path.is_dir():
        raise SetupError(f"--resume-from-checkpoint {value!r} is not a directory.")
    state = path / "training_state.json"
    if not state.is_file():
        raise SetupError(f"--resume-from-checkpoint {value!r} is not a checkpoint written by this script.")
    return path, int(json.loads(state.read_text())["completed_steps"])


def _save_checkpoint(accelerator, output_dir: str, step: int, log: dict) -> Path:
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step_{step}"
    partial = root / f".partial_step_{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / "training_state.json").write_text(json.dumps({"completed_steps": step, "log": log}))
        # safetensors writes 0600 (a renamed temporary file): the weights get the mode of the state file written here
        mode = (partial / "training_state.json").stat().st_mode & 0o777
        for weights in partial.rglob("*.safetensors"):
            weights.chmod(mode)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)  # atomic: a killed run never leaves a half-written step_N
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------------------------------------
# Training


def evaluate_accuracy(model, dataloader, accelerator) -> dict[str, float]:
    """Accuracy (the `evaluate` metric) and mean loss over `dataloader`, gathered across processes; a progress bar
    on the main process."""
    from tqdm.auto import tqdm

    model.eval()
    predictions, references, losses = [], [], []
    batches = tqdm(
        dataloader, desc="validation", unit="batch", leave=False, disable=not accelerator.is_local_main_process
    )
    with torch.no_grad():
        for batch in batches:
            outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
            preds, refs = accelerator.gather_for_metrics((outputs.logits.argmax(-1), batch["labels"]))
            loss = accelerator.gather_for_metrics(outputs.loss.detach().float().reshape(1).repeat(len(batch["labels"])))
            predictions.append(preds.cpu())
            references.append(refs.cpu())
            losses.append(loss.cpu())
    model.train()
    metric = Accuracy(keep_in_memory=True)
    result = metric.compute(predictions=torch.cat(predictions).tolist(), references=torch.cat(references).tolist())
    result["loss"] = float(torch.cat(losses).mean())
    return result


def _model_card(config: FinetuneConfig, data: ClassificationData, log: dict, output_dir: str):
    from huggingface_hub import ModelCard, ModelCardData

    local_data = bool(config.train_dir) or (config.dataset and os.path.exists(config.dataset))
    local_model = not config.model or config.model.startswith("config:") or os.path.exists(config.model)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["vit-registers", "image-classification", "registers"],
        datasets=None if local_data else [config.dataset],
        base_model=None if local_model else config.model,
        metrics=["accuracy"],
    )
    hyper = {k: v for k, v in asdict(config).items() if k not in ("extra", "output_dir", "push_to_hub")}
    hyper.update(
        learning_rate=log["learning_rate"],
        weight_decay=log["weight_decay"],
        optimizer=log["optimizer"],
        image_size="×".join(map(str, log["image_size"])),
    )
    hyper.update(
        num_processes=log["num_processes"],
        global_batch_size=log["global_batch_size"],
        training_steps=log["completed_steps"],
    )
    rows = "\n".join(f"| {k} | {v} |" for k, v in hyper.items() if v is not None)
    final = log.get("final_metrics") or {}
    metrics = "\n".join(f"| {k} | {v:.4f} |" for k, v in final.items()) or "| (no validation set) | |"
    source = f"`{config.dataset}`" if config.dataset else f"image folder `{config.train_dir}`"
    content = f"""---
{card_data.to_yaml()}
---

# {Path(output_dir).name}

A Vision Transformer with {log["num_register_tokens"]} register tokens (Darcet et al., "Vision Transformers Need
Registers", ICLR 2024), fine-tuned for image classification on {source} ({len(data.labels)} classes:
{", ".join(data.labels[:20])}{" ..." if len(data.labels) > 20 else ""}) with `scripts/finetune.py` of vit-registers.

## Final metrics

| metric | value |
|---|---|
{metrics}

## Training hyper-parameters

| parameter | value |
|---|---|
{rows}

## Use

```python
import vit_registers  # registers the model type with transformers
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{config.push_to_hub or output_dir}")
model = AutoModelForImageClassification.from_pretrained("{config.push_to_hub or output_dir}")
```
"""
    return ModelCard(content)


def _push(config: FinetuneConfig, output_dir: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(config.push_to_hub, exist_ok=True)
    api.upload_folder(
        repo_id=config.push_to_hub,
        folder_path=output_dir,
        ignore_patterns=[f"{CHECKPOINT_DIR}/*", f"{CHECKPOINT_DIR}/**"],
        commit_message="Upload fine-tuned vit_registers model",
    )


def _num_workers(num_processes: int) -> int:
    cpus = os.cpu_count() or 1
    per_process = cpus // max(num_processes, 1)
    return 0 if per_process < 4 else min(8, per_process - 1)


def train(config: FinetuneConfig) -> dict:
    """Run fine-tuning as configured; returns the training log (also written to `output_dir/training_log.json`)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from tqdm.auto import tqdm

    from ..onednn import apply_cpu_kernels

    config.check()
    try:
        accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
            step_scheduler_with_optimizer=False,
        )
    except (ValueError, RuntimeError) as error:
        raise SetupError(f"cannot start Accelerate: {error}") from None
    set_seed(config.seed)

    # Everything below up to the training loop validates input; nothing has been written yet.
    source = resolve_model_source(config)
    resume = None
    if config.resume_from_checkpoint:
        resume = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
    with accelerator.main_process_first():  # one process fills the `datasets` cache, the others read it
        data = load_classification_data(
            train_dir=config.train_dir,
            validation_dir=config.validation_dir,
            dataset=config.dataset,
            image_column=config.image_column,
            label_column=config.label_column,
        )
    model, processor, from_scratch = build_model(config, data, source)
    if isinstance(source, str) and source != config.model:  # a transformers DINOv2 directory, converted first
        from ..conversion import interpolation_summary

        accelerator.print(
            f"Converted {config.model}: position embeddings "
            f"{interpolation_summary('transformers', model.config, config.model)}; to fine-tune with the other one, "
            "convert first with scripts/convert.py."
        )
    summary = prepare_model_for_training(model, config)
    if config.image_size is not None:
        patch = model.config.patch_size
        if config.image_size % patch:
            raise SetupError(f"--image-size {config.image_size} is not a multiple of the patch size {patch}.")
        processor = processor_at_size(processor, config.image_size)
    input_size = processor_geometry(processor)[1]  # what the model sees in training and validation
    global_batch = config.per_device_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    if config.linear_probe:  # DINO / DINOv2 linear evaluation: SGD, momentum 0.9, no weight decay, lr ∝ batch
        layer_decay = 1.0
        learning_rate = config.learning_rate or linear_probe_learning_rate(global_batch)
        weight_decay = 0.0 if config.weight_decay is None else config.weight_decay
        optimizer_name = "SGD, momentum 0.9 (DINO linear evaluation)"
    else:
        layer_decay = config.layer_decay if config.layer_decay is not None else (1.0 if from_scratch else 0.75)
        learning_rate = config.learning_rate or DEFAULT_LEARNING_RATE
        weight_decay = DEFAULT_WEIGHT_DECAY if config.weight_decay is None else config.weight_decay
        optimizer_name = "AdamW"

    train_set = TransformedDataset(
        data.train, build_transforms(processor, train=True, crop_scale_min=config.crop_scale_min), seed=config.seed
    )
    generator = torch.Generator().manual_seed(config.seed)
    workers = _num_workers(accelerator.num_processes)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=config.per_device_batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=workers,
        generator=generator,
        drop_last=False,
    )
    eval_loader = None
    if data.validation is not None:
        eval_set = TransformedDataset(data.validation, build_transforms(processor, train=False))
        eval_loader = torch.utils.data.DataLoader(
            eval_set, batch_size=config.per_device_batch_size, shuffle=False, collate_fn=collate, num_workers=workers
        )

    if config.linear_probe:
        optimizer = create_linear_probe_optimizer(model, learning_rate, weight_decay)
    else:
        optimizer = create_optimizer(model, learning_rate, weight_decay, layer_decay)
    # The prepared loader yields len(train_loader) / num_processes batches per process and epoch.
    batches_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    if config.max_steps is not None:
        max_steps = config.max_steps
        epochs = math.ceil(max_steps / steps_per_epoch)
    else:
        epochs = config.num_train_epochs or 3
        max_steps = epochs * steps_per_epoch
    scheduler = create_scheduler(optimizer, config.warmup_steps, max_steps)

    if eval_loader is not None:
        model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, eval_loader, scheduler
        )
    else:
        model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    kernelized = apply_cpu_kernels(accelerator.unwrap_model(model))  # oneDNN blocks on the CPU (vit_registers.onednn)
    if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:  # DeepSpeed config overrides
        raise SetupError(
            f"the DeepSpeed config sets gradient_accumulation_steps={accelerator.gradient_accumulation_steps} but "
            f"--gradient-accumulation-steps is {config.gradient_accumulation_steps}: make them agree (or drop the key)."
        )
    if len(train_loader) != batches_per_epoch:  # pragma: no cover - guards the step arithmetic above
        batches_per_epoch = len(train_loader)
        steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)

    log = {
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "global_batch_size": global_batch,
        "steps_per_epoch": steps_per_epoch,
        "max_steps": max_steps,
        "image_size": list(input_size),
        "optimizer": optimizer_name,
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "layer_decay": layer_decay,
        "num_register_tokens": int(accelerator.unwrap_model(model).config.num_register_tokens),
        "cpu_kernel_layers": kernelized,
        **summary,
        "train_loss": [],
        "learning_rates": [],
        "eval": [],
        "resumed_from": None,
    }
    completed_steps, start_epoch, skip_batches = 0, 0, 0
    if resume is not None:
        path, completed_steps = resume
        try:
            accelerator.load_state(str(path))
        except Exception as error:  # noqa: BLE001 - e.g. a checkpoint of a different model
            raise SetupError(f"cannot resume from {str(path)!r}: {type(error).__name__}: {error}") from None
        saved = json.loads((path / "training_state.json").read_text())
        log["train_loss"] = saved["log"].get("train_loss", [])
        log["learning_rates"] = saved["log"].get("learning_rates", [])
        log["eval"] = saved["log"].get("eval", [])
        log["resumed_from"] = str(path)
        start_epoch = completed_steps // steps_per_epoch
        skip_batches = (completed_steps % steps_per_epoch) * config.gradient_accumulation_steps

    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
    depth = accelerator.unwrap_model(model).config.num_hidden_layers
    decay = f", layer decay {layer_decay:g} (embeddings at {learning_rate * layer_decay ** (depth + 1):.3g})"
    accelerator.print(
        f"Training {max_steps} steps ({epochs} epochs of {steps_per_epoch}), global batch {global_batch}, "
        f"{accelerator.num_processes} process(es), {summary['trainable_parameters']:,} trainable parameters"
        + (f", oneDNN CPU kernels in {kernelized} blocks." if kernelized else ".")
    )
    accelerator.print(
        f"Images: {input_size[0]}×{input_size[1]} px in training and validation (--image-size to change). "
        f"Optimizer: {optimizer_name}, peak learning rate {learning_rate:.3g}"
        + (decay if layer_decay != 1.0 else "")
        + f", weight decay {weight_decay:g}."
    )
    progress = tqdm(total=max_steps, initial=completed_steps, disable=not accelerator.is_local_main_process)
    started = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, epochs):
        if completed_steps >= max_steps:
            break
        train_set.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        loader = train_loader
        if epoch == start_epoch and skip_batches:
            loader = accelerator.skip_first_batches(train_loader, skip_batches)
        running, micro = torch.zeros((), device=accelerator.device), 0
        for batch in loader:
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
                accelerator.backward(outputs.loss)
                optimizer.step()
                optimizer.zero_grad()
            running += outputs.loss.detach().float()
            micro += 1
            if not accelerator.sync_gradients:
                continue
            used_learning_rate = peak_learning_rate(optimizer)  # the head's: the other groups scale it down
            scheduler.step()
            completed_steps += 1
            loss = accelerator.reduce(running / micro, reduction="mean").item()
            running, micro = torch.zeros((), device=accelerator.device), 0
            log["train_loss"].append([completed_steps, loss])
            log["learning_rates"].append([completed_steps, used_learning_rate])
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{used_learning_rate:.3g}", epoch=epoch)
            if config.checkpointing_steps and completed_steps % config.checkpointing_steps == 0:
                _save_checkpoint(accelerator, config.output_dir, completed_steps, log)
            if completed_steps >= max_steps:
                break
        if eval_loader is not None:
            result = evaluate_accuracy(model, eval_loader, accelerator)
            log["eval"].append({"epoch": epoch, "step": completed_steps, **result})
            accelerator.print(f"epoch {epoch}: validation accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}")
    progress.close()
    log["completed_steps"] = completed_steps
    log["train_seconds"] = time.perf_counter() - started
    log["final_metrics"] = (
        {f"eval_{k}": v for k, v in log["eval"][-1].items() if k not in ("epoch", "step")} if log["eval"] else {}
    )
    if log["train_loss"]:
        log["final_metrics"]["train_loss"] = log["train_loss"][-1][1]

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    with quiet_transformers():  # no "Writing model shards" bar
        unwrapped.save_pretrained(
            config.output_dir,
            is_main_process=accelerator.is_main_process,
            state_dict=state_dict,
        )
    if accelerator.is_main_process:
        processor.save_pretrained(config.output_dir)
        _model_card(config, data, log, config.output_dir).save(os.path.join(config.output_dir, "README.md"))
        with open(os.path.join(config.output_dir, "training_log.json"), "w", encoding="utf-8") as handle:
            json.dump(log, handle, indent=2)
        if config.push_to_hub:
            _push(config, config.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return log


__all__ = [
    "DataError",
    "FinetuneConfig",
    "SetupError",
    "TINY_CONFIG",
    "build_model",
    "resolve_model_source",
    "default_image_processor",
    "evaluate_accuracy",
    "list_checkpoints",
    "prepare_model_for_training",
    "resolve_checkpoint",
    "train",
]
