#!/usr/bin/env python
"""Build the synthetic object-localisation dataset (issue 8) as a `datasets` imagefolder.

    python scripts/make_dataset.py --output-dir data/synthetic-objects --seed 0

Offline and deterministic: objects cut from photos bundled with scikit-image / scikit-learn are pasted on bundled
textures; the same seed gives byte-identical files. See vit_registers.data.synthetic for the details.
"""

from __future__ import annotations

import argparse
import sys

from vit_registers.argtypes import non_negative_int, positive_int
from vit_registers.data.synthetic import CLASS_NAMES, DEFAULT_COUNTS, DEFAULT_IMAGE_SIZE, generate_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=f"Build the synthetic object-localisation dataset ({len(CLASS_NAMES)} classes: "
        f"{', '.join(CLASS_NAMES)}) from images bundled in installed packages."
    )
    parser.add_argument("--output-dir", required=True, help="directory to write train/, validation/, test/ into")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=DEFAULT_IMAGE_SIZE,
        help=f"side of the square images in pixels (default: {DEFAULT_IMAGE_SIZE})",
    )
    for split in ("train", "validation", "test"):
        parser.add_argument(
            f"--num-{split}",
            type=positive_int,
            default=DEFAULT_COUNTS[split],
            help=f"{split} images per class (default: {DEFAULT_COUNTS[split]})",
        )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --output-dir")
    parser.add_argument("--quiet", action="store_true", help="do not print the summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = generate_dataset(
            args.output_dir,
            seed=args.seed,
            image_size=args.image_size,
            num_train=args.num_train,
            num_validation=args.num_validation,
            num_test=args.num_test,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, ImportError, OSError) as err:
        print(f"make_dataset.py: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        counts = ", ".join(f"{split} {n}" for split, n in info["num_images"].items())
        print(f"wrote {counts} images ({info['image_size']}px, seed {info['seed']}) to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
