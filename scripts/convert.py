#!/usr/bin/env python
"""Convert an official DINOv2 / DINOv3, timm or transformers checkpoint to vit_registers, verify, write, publish it.

    python scripts/convert.py --source {dinov2,dinov3,timm,transformers} --checkpoint PATH [--arch NAME] \
        --output-dir DIR [--push-to-hub ORG/NAME] [--private] [--dtype {float32,float16,bfloat16}] \
        [--interpolation {source,official}]

A thin front over `vit_registers.conversion.publish.convert_and_publish`: every output token is compared with the
source library's own model at two resolutions (fp32, max abs diff <= 1e-4) before anything is written or pushed.
Errors print one line and exit with status 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source", required=True, choices=["dinov2", "dinov3", "timm", "transformers"], help="checkpoint family"
    )
    parser.add_argument(
        "--checkpoint", required=True, help=".pth/.safetensors/.bin file, or a transformers model directory"
    )
    parser.add_argument(
        "--arch", default=None, help="official hub name (e.g. dinov2_vits14_reg, dinov3_vits16) or timm model name"
    )
    parser.add_argument("--output-dir", required=True, help="new (or empty) directory to write the model to")
    parser.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="upload the result to this repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the saved weights (verification always runs in float32)",
    )
    parser.add_argument(
        "--interpolation",
        default="source",
        choices=["source", "official"],
        help="position-embedding resampling away from the stored grid: as the source library's model (default) or "
        "the official DINOv2 formula (DINOv2 weights; differs for transformers' Dinov2Model: offset 0.1, not 0)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Cheap checks first, before the heavy imports (the library repeats them).
    if not Path(args.checkpoint).exists():
        print(f"error: Checkpoint not found: {args.checkpoint}", file=sys.stderr)
        return 1
    output = Path(args.output_dir)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        print(
            f"error: Output directory {output} already exists and is not empty; choose a new --output-dir.",
            file=sys.stderr,
        )
        return 1

    from vit_registers.conversion import ConversionError
    from vit_registers.conversion.publish import convert_and_publish

    try:
        convert_and_publish(
            args.source,
            args.checkpoint,
            arch=args.arch,
            output_dir=args.output_dir,
            push_to_hub=args.push_to_hub,
            private=args.private,
            dtype=args.dtype,
            interpolation=args.interpolation,
        )
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except ConversionError as error:  # bad input: the message says what is wrong
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - I/O, Hub or library errors: one line, no traceback
        message = " ".join(str(error).split())
        print(f"error: {type(error).__name__}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
