#!/usr/bin/env python
"""Fine-tune (or train from scratch) a ViT with registers for image classification, on one CPU or many GPUs.

    accelerate launch scripts/finetune.py --model PATH_OR_ID --train-dir DIR [--validation-dir DIR] \\
        [--dataset HUB_ID --image-column image --label-column label] --output-dir DIR \\
        [--num-train-epochs N | --max-steps N] [--per-device-batch-size B] [--learning-rate LR] \\
        [--layer-decay F] [--weight-decay F] [--warmup-steps N] [--gradient-accumulation-steps N] \\
        [--mixed-precision {no,fp16,bf16}] [--gradient-checkpointing] [--linear-probe] \\
        [--num-register-tokens N] [--checkpointing-steps N] [--resume-from-checkpoint PATH|latest] \\
        [--image-size PX] [--seed S] [--push-to-hub ORG/NAME] [--model-config CONFIG.json]

Multi-GPU / multi-node: `accelerate launch --config_file scripts/accelerate_configs/<ddp|fsdp|deepspeed>.yaml ...`.
The work is done by `vit_registers.training.loop.train`.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune.py",
        description="Fine-tune a ViT with registers for image classification (Accelerate; one CPU to many GPUs).",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="vit_registers checkpoint (folder or Hub id), 'config:tiny' or a config .json.")
    model.add_argument("--model-config", help="JSON of ViTRegistersConfig arguments: train a new model from scratch.")
    model.add_argument("--num-register-tokens", type=int, help="Total registers; adds new ones if the model has fewer.")
    model.add_argument(
        "--linear-probe",
        action="store_true",
        help="Freeze the backbone; train the classifier only, as DINO's linear evaluation: SGD with momentum 0.9, "
        "no weight decay, learning rate 0.1 × global batch / 256 unless --learning-rate is given.",
    )
    model.add_argument("--gradient-checkpointing", action="store_true", help="Recompute activations to save memory.")
    data = parser.add_argument_group("data")
    data.add_argument("--train-dir", help="Training images, one sub-folder per class.")
    data.add_argument("--validation-dir", help="Validation images, one sub-folder per class.")
    data.add_argument("--dataset", help="A `datasets` dataset (Hub id or local path) with a train split.")
    data.add_argument("--image-column", default="image", help="Image column of --dataset (default: image).")
    data.add_argument("--label-column", default="label", help="Label column of --dataset (default: label).")
    data.add_argument(
        "--image-size",
        type=int,
        metavar="PX",
        help="Train and validate at PX × PX (a multiple of the patch size; the processor's resize keeps its ratio to "
        "the crop). Default: the model's image processor (224 px for a transformers DINOv2 directory without one).",
    )
    run = parser.add_argument_group("training")
    run.add_argument("--output-dir", required=True, help="Where checkpoints, the final model and its card go.")
    length = run.add_mutually_exclusive_group()
    length.add_argument("--num-train-epochs", type=int, help="Epochs to train (default 3).")
    length.add_argument("--max-steps", type=int, help="Optimizer steps to train (overrides epochs).")
    run.add_argument("--per-device-batch-size", type=int, default=32, help="Batch per process (default 32).")
    run.add_argument(
        "--learning-rate",
        type=float,
        help="Peak learning rate, of the head (default 1e-4; with --linear-probe 0.1 × global batch / 256).",
    )
    run.add_argument("--layer-decay", type=float, help="Layer-wise LR decay (default 0.75; 1.0 from scratch).")
    run.add_argument(
        "--weight-decay", type=float, help="Weight decay, not on tokens/norms/biases (default 0.05; 0 for a probe)."
    )
    run.add_argument("--warmup-steps", type=int, default=0, help="Linear warm-up steps before the cosine decay.")
    run.add_argument("--gradient-accumulation-steps", type=int, default=1)
    run.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    run.add_argument("--checkpointing-steps", type=int, help="Save the full training state every N steps.")
    run.add_argument("--resume-from-checkpoint", help="A checkpoint folder, or 'latest' in --output-dir.")
    run.add_argument(
        "--crop-scale-min",
        type=float,
        default=0.08,
        help="Smallest area fraction of RandomResizedCrop (default 0.08, as DeiT; raise it when objects are small).",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--push-to-hub", metavar="ORG/NAME", help="Upload the final model, processor and card.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vit_registers.cpu_allocator import tune_cpu_allocator
    from vit_registers.training.data import DataError
    from vit_registers.training.loop import FinetuneConfig, SetupError, train

    config = FinetuneConfig(**vars(args))
    try:
        tune_cpu_allocator()  # activations freed after each step stay mapped for the next one
    except ValueError as error:  # a bad VIT_REGISTERS_CPU_ALLOCATOR, named
        print(f"finetune.py: error: {error}", file=sys.stderr)
        return 2
    try:
        train(config)
    except (DataError, SetupError) as error:
        print(f"finetune.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
