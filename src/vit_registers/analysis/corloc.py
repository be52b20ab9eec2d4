"""CorLoc of LOST boxes over an imagefolder-style dataset (Siméoni et al. 2021, §4; Darcet et al. 2024, Table 3).

The dataset directory holds images and a `metadata.jsonl` (as 🤗 datasets' imagefolder) whose rows read
`{"file_name": "a.jpg", "objects": {"bbox": [[x0, y0, x1, y1], ...]}}`, boxes in original-image pixels.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .images import ImageError, load_image, prepare_with_processor
from .lost import box_iou, is_correct_localization, lost_boxes
from .tokens import base_model

BOX_FORMATS = ("xyxy", "xywh")


class DatasetError(ValueError):
    """The dataset directory cannot be used at all (no metadata, unreadable metadata)."""


@dataclass
class BoxSample:
    path: str
    boxes: list[list[float]]


def read_box_dataset(directory: str | os.PathLike, box_format: str = "xyxy") -> tuple[list[BoxSample], list[str]]:
    """Rows of `directory/metadata.jsonl` (else of every `directory/<split>/metadata.jsonl`) → samples with boxes
    `[x0, y0, x1, y1]`, plus one message per row that had to be skipped (no boxes, malformed boxes, missing file
    name). Raises [`DatasetError`] when the directory or its metadata is missing."""
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}.")
    root = Path(directory)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory.")
    metadata_files = [root / "metadata.jsonl"] if (root / "metadata.jsonl").is_file() else []
    metadata_files = metadata_files or sorted(root.glob("*/metadata.jsonl"))  # split folders: train/, test/, ...
    if not metadata_files:
        raise DatasetError(
            f"{root}: no metadata.jsonl with boxes found in it or its split folders (imagefolder layout expected)."
        )
    samples, problems = [], []
    for metadata in metadata_files:
        with open(metadata, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{metadata}:{number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    problems.append(f"{where}: not valid JSON ({error.msg}).")
                    continue
                name = row.get("file_name") if isinstance(row, dict) else None
                if not name:
                    problems.append(f"{where}: row has no file_name.")
                    continue
                objects = row.get("objects")
                boxes = objects.get("bbox") if isinstance(objects, dict) else None
                if not boxes:
                    problems.append(f"{where}: {name} has no boxes (objects.bbox missing or empty); skipped.")
                    continue
                try:
                    parsed = [_parse_box(box, box_format) for box in boxes]
                except ValueError as error:
                    problems.append(f"{where}: {name}: {error}; skipped.")
                    continue
                samples.append(BoxSample(str(metadata.parent / name), parsed))
    return samples, problems


def _parse_box(box, box_format: str) -> list[float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"box {box!r} is not 4 numbers")
    try:
        x0, y0, a, b = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box {box!r} is not 4 numbers") from None
    x1, y1 = (x0 + a, y0 + b) if box_format == "xywh" else (a, b)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {box!r} is empty or not [x0, y0, x1, y1]")
    return [x0, y0, x1, y1]


@dataclass
class CorLocResult:
    corloc: float | None
    num_images: int
    num_correct: int
    per_image: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def num_degenerate(self) -> int:
        """Images where LOST found no object (`LostResult.degenerate`); their box is still scored, as LOST does."""
        return sum(item.get("degenerate") is not None for item in self.per_image)

    def to_dict(self) -> dict:
        return {
            "corloc": self.corloc,
            "num_images": self.num_images,
            "num_correct": self.num_correct,
            "num_degenerate": self.num_degenerate,
            "num_skipped": len(self.skipped),
            "skipped": self.skipped,
            "per_image": self.per_image,
        }


@torch.no_grad()
def evaluate_corloc(
    model,
    processor,
    directory: str | os.PathLike,
    batch_size: int = 8,
    box_format: str = "xyxy",
    square: bool = False,
    layer: int = -1,
    kind: str = "keys",
    k: int = 100,
    bias: float = 0.0,
    progress: bool = True,
    short_side: int | None = None,
) -> CorLocResult:
    """LOST box for every image of the dataset (batched by input size), mapped back to original pixels, and CorLoc.

    `processor`: a transformers image processor (resize target and normalisation) or an int shorter side;
    `short_side` overrides the processor's resize target. Unreadable images and rows without boxes are skipped
    with a message in `skipped`. Images where LOST finds no object keep their box in the score, as LOST's own
    evaluation does, and are marked (`degenerate` per image, `num_degenerate`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    patch_size = base_model(model).config.patch_size
    samples, skipped = read_box_dataset(directory, box_format)
    per_image: list[dict] = []
    buckets: dict[tuple[int, int], list] = {}

    def flush(size):
        batch = buckets.pop(size)
        pixel_values = torch.stack([prepared.pixel_values for _, prepared in batch])
        for (sample, prepared), result in zip(batch, lost_boxes(model, pixel_values, layer, kind, k, bias)):
            box = prepared.box_to_original(result.box)
            per_image.append(
                {
                    "file": sample.path,
                    "box": [round(v, 2) for v in box],
                    "best_iou": round(max(box_iou(box, gt) for gt in sample.boxes), 4),
                    "correct": is_correct_localization(box, sample.boxes),
                    "degenerate": result.degenerate,
                }
            )

    for sample in tqdm(samples, desc="CorLoc", unit="image", disable=not progress):
        try:
            image = load_image(sample.path)
            prepared = prepare_with_processor(
                image, processor, patch_size, square=square, name=sample.path, short_side=short_side
            )
        except ImageError as error:
            skipped.append(str(error))
            continue
        buckets.setdefault(prepared.input_size, []).append((sample, prepared))
        if len(buckets[prepared.input_size]) >= batch_size:
            flush(prepared.input_size)
        elif sum(len(bucket) for bucket in buckets.values()) >= 4 * batch_size:  # many sizes: bound the memory
            flush(max(buckets, key=lambda size: len(buckets[size])))
    for size in list(buckets):
        flush(size)
    correct = sum(item["correct"] for item in per_image)
    return CorLocResult(
        corloc=correct / len(per_image) if per_image else None,
        num_images=len(per_image),
        num_correct=correct,
        per_image=per_image,
        skipped=skipped,
    )
