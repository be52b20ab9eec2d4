"""A deterministic, labelled object-localisation dataset built only from photos bundled in installed packages.

Each image is one object (a masked crop of a bundled photo, see :mod:`vit_registers.data.sources`) pasted at a
random position, scale, rotation and left-right orientation, with mild colour jitter, onto a random crop of a
bundled texture (grass, gravel, brick, or a colour photo). The label is the object's class and the box is the exact
bounding box of the pasted pixels, so the set supports both classification and the single-object localisation
(CorLoc) evaluation of LOST (Siméoni et al. 2021, Sec. 4) used by Darcet et al. 2024 (Sec. 3 / Table 3).

Boxes are ``[x0, y0, x1, y1]`` in pixels of the saved image: ``x0, y0`` inclusive, ``x1, y1`` exclusive, so the
object's pixels are exactly ``image[y0:y1, x0:x1]`` restricted to its mask and ``x1 - x0`` is the box width.

Determinism: every random choice comes from ``numpy.random.default_rng`` seeded with ``(seed, split, index)``;
resizing and rotation use Pillow with fixed filters, and PNGs are written without timestamps, so the same seed
gives byte-identical files. Splits do not share background pixels: each texture is cut into horizontal bands
(train / validation / test) and a split only crops from its own band; the coin class also uses different coins per
split. The other object classes have a single source photo each, so the test split measures generalisation to new
placements, scales, colours and backgrounds, not to new object instances.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .sources import load_source, sources_table

__all__ = [
    "CLASS_NAMES",
    "BACKGROUND_NAMES",
    "SPLITS",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_COUNTS",
    "ObjectTemplate",
    "Sample",
    "object_templates",
    "render_sample",
    "split_labels",
    "generate_split",
    "generate_dataset",
    "load_synthetic_dataset",
    "mask_bbox",
    "BACKGROUND_BANDS",
]

CLASS_NAMES: tuple[str, ...] = ("astronaut", "cat", "coffee", "rocket", "horse", "coin", "flower")
BACKGROUND_NAMES: tuple[str, ...] = ("grass", "gravel", "brick", "china")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
DEFAULT_IMAGE_SIZE = 128
DEFAULT_COUNTS = {"train": 600, "validation": 60, "test": 100}  # images per class
GENERATOR_VERSION = 1
MARKER_FILE = "generation.json"

# Horizontal bands (fractions of the texture height) that each split may crop its backgrounds from. Every split
# uses the same range of crop sizes (half to all of the narrowest band), so backgrounds have the same scale.
BACKGROUND_BANDS = {"train": (0.0, 0.5), "validation": (0.5, 0.7), "test": (0.7, 1.0)}
# Long side of the pasted object, as a fraction of the image side.
_SCALE_RANGE = {"rocket": (0.6, 0.9), "coin": (0.3, 0.55)}
_DEFAULT_SCALE_RANGE = (0.35, 0.7)
_MAX_ROTATION_DEGREES = 15.0
_SPLIT_INDEX = {name: i for i, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class ObjectTemplate:
    """An object crop: ``rgb`` (h, w, 3) uint8 and its boolean ``mask`` (h, w), tight around the mask."""

    rgb: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class Sample:
    """One rendered image with its ground truth; ``background`` is the same image without the object."""

    image: np.ndarray  # (S, S, 3) uint8
    background: np.ndarray  # (S, S, 3) uint8
    mask: np.ndarray  # (S, S) bool, the pasted object's pixels
    bbox: tuple[int, int, int, int]  # x0, y0 inclusive; x1, y1 exclusive
    label: str
    background_name: str
    background_window: tuple[int, int, int]  # (x, y, side) of the square cut from the background texture


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box ``(x0, y0, x1, y1)`` of the True pixels of ``mask`` (x1, y1 exclusive)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("mask is empty")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _tight(rgb: np.ndarray, mask: np.ndarray) -> ObjectTemplate:
    x0, y0, x1, y1 = mask_bbox(mask)
    return ObjectTemplate(np.ascontiguousarray(rgb[y0:y1, x0:x1]), np.ascontiguousarray(mask[y0:y1, x0:x1]))


def _ellipse(shape: tuple[int, int], cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def _coin_templates() -> list[ObjectTemplate]:
    """Segment the individual coins of ``skimage.data.coins`` (background subtraction + threshold), row-major."""
    from scipy import ndimage as ndi

    gray = load_source("coins").astype(np.float64)
    smooth = ndi.gaussian_filter(gray, 2)
    background = ndi.gaussian_filter(ndi.grey_opening(smooth, size=(75, 75)), 10)
    mask = ndi.binary_fill_holes(ndi.binary_opening(smooth - background > 40, iterations=2))
    labels, count = ndi.label(mask)
    tint = np.array([1.0, 0.86, 0.62])  # bronze
    coins = []
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        piece = labels[box] == index
        height, width = piece.shape
        if piece.sum() < 800 or not 0.75 < height / width < 1.33:
            continue
        rgb = np.clip(gray[box][..., None] * tint * 1.15, 0, 255).astype(np.uint8)
        coins.append((box[0].start // 60, box[1].start, _tight(rgb, ndi.binary_fill_holes(piece))))
    coins.sort(key=lambda c: (c[0], c[1]))
    return [c[2] for c in coins]


def _horse_templates() -> list[ObjectTemplate]:
    """The horse silhouette filled with a few coat colours, shaded by distance to the outline."""
    from scipy import ndimage as ndi

    mask = load_source("horse") == 0
    depth = ndi.distance_transform_edt(mask)
    shade = 0.75 + 0.35 * np.clip(depth / 12.0, 0, 1)
    coats = ((120, 72, 40), (60, 40, 30), (170, 120, 70), (200, 195, 185))
    return [_tight(np.clip(shade[..., None] * np.array(c), 0, 255).astype(np.uint8), mask) for c in coats]


def _rocket_template() -> ObjectTemplate:
    """The Falcon 9 with its strongback: non-sky pixels (not blue) above the pad, a plain column below."""
    from scipy import ndimage as ndi

    photo = load_source("rocket")
    crop = photo[120:404, 300:345].astype(np.int16)
    mask = (crop[..., 2] - crop[..., 0]) < 25
    mask[:, :8] = False  # the launch tower left of the rocket
    mask[:, 36:] = False
    mask[225:] = False  # rows from y = 345 down: the pad structure, replaced by the body column
    mask[225:, 12:34] = True
    mask = ndi.binary_fill_holes(ndi.binary_opening(mask, iterations=1))
    labels, _ = ndi.label(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return _tight(photo[120:404, 300:345], labels == sizes.argmax())


@lru_cache(maxsize=1)
def object_templates() -> dict[str, dict[str, tuple[ObjectTemplate, ...]]]:
    """``{class: {split: templates}}``. Coins are divided between splits; other classes share their templates."""
    astronaut = load_source("astronaut")
    chelsea = load_source("chelsea")
    coffee = load_source("coffee")
    flower = load_source("flower")
    shared = {
        "astronaut": [_tight(astronaut, _ellipse(astronaut.shape[:2], 226, 112, 80, 100))],
        "cat": [_tight(chelsea, _ellipse(chelsea.shape[:2], 215, 150, 185, 150))],
        "coffee": [
            _tight(
                coffee,
                _ellipse(coffee.shape[:2], 278, 238, 200, 148) | _ellipse(coffee.shape[:2], 290, 112, 118, 95),
            )
        ],
        "rocket": [_rocket_template()],
        "horse": _horse_templates(),
        "flower": [_tight(flower, _ellipse(flower.shape[:2], 307, 222, 140, 136))],
    }
    templates = {name: {split: tuple(t) for split in SPLITS} for name, t in shared.items()}
    coins = _coin_templates()
    if len(coins) < 12:
        raise RuntimeError(f"coin segmentation found only {len(coins)} coins; expected about 24")
    # Every sixth coin is held out for test and every sixth-but-one for validation.
    templates["coin"] = {
        "train": tuple(c for i, c in enumerate(coins) if i % 6 < 4),
        "validation": tuple(c for i, c in enumerate(coins) if i % 6 == 4),
        "test": tuple(c for i, c in enumerate(coins) if i % 6 == 5),
    }
    return {name: templates[name] for name in CLASS_NAMES}


@lru_cache(maxsize=1)
def _backgrounds() -> dict[str, np.ndarray]:
    return {name: _rgb(load_source(name)) for name in BACKGROUND_NAMES}


def _resize(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Resize a uint8 array to ``size = (width, height)`` with Pillow."""
    return np.asarray(Image.fromarray(array).resize(size, resample=resample))


def _band_rows(split: str, height: int) -> tuple[int, int]:
    """First and last-plus-one texture row of the background band of ``split``."""
    low, high = BACKGROUND_BANDS[split]
    return int(round(low * height)), int(round(high * height))


def _render_background(
    rng: np.random.Generator, split: str, image_size: int
) -> tuple[np.ndarray, str, tuple[int, int, int]]:
    name = BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
    texture = _backgrounds()[name]
    height, width = texture.shape[:2]
    top, bottom = _band_rows(split, height)
    largest = min(min(b - t for t, b in (_band_rows(s, height) for s in SPLITS)), width)
    side = int(rng.integers(largest // 2, largest + 1))
    band = bottom - top
    y = top + int(rng.integers(0, band - side + 1))
    x = int(rng.integers(0, width - side + 1))
    crop = _resize(np.ascontiguousarray(texture[y : y + side, x : x + side]), (image_size, image_size), Image.BILINEAR)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if name == "china":
        tint = rng.uniform(0.85, 1.15, size=3)
    else:  # grey textures get a random colour cast
        tint = rng.uniform(0.45, 1.2, size=3)
    crop = np.clip(crop.astype(np.float64) * tint, 0, 255).astype(np.uint8)
    return crop, name, (x, y, side)


def _render_object(rng: np.random.Generator, template: ObjectTemplate, label: str, image_size: int) -> ObjectTemplate:
    low, high = _SCALE_RANGE.get(label, _DEFAULT_SCALE_RANGE)
    long_side = float(rng.uniform(low, high)) * image_size
    rgb = Image.fromarray(template.rgb)
    mask = Image.fromarray(template.mask.astype(np.uint8) * 255)
    # Shrink large templates to twice the target size first, so that rotating them is cheap.
    pre = min(1.0, 2.0 * long_side / max(rgb.size))
    if pre < 1.0:
        pre_size = (max(2, int(round(rgb.size[0] * pre))), max(2, int(round(rgb.size[1] * pre))))
        rgb = rgb.resize(pre_size, resample=Image.BILINEAR)
        mask = mask.resize(pre_size, resample=Image.BILINEAR)
    if rng.random() < 0.5:
        rgb = rgb.transpose(Image.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.FLIP_LEFT_RIGHT)
    angle = float(rng.uniform(-_MAX_ROTATION_DEGREES, _MAX_ROTATION_DEGREES))
    rgb = rgb.rotate(angle, resample=Image.BILINEAR, expand=True)
    mask = mask.rotate(angle, resample=Image.BILINEAR, expand=True)
    box = mask.getbbox()
    rgb, mask = rgb.crop(box), mask.crop(box)
    factor = long_side / max(rgb.size)
    size = (max(2, int(round(rgb.size[0] * factor))), max(2, int(round(rgb.size[1] * factor))))
    rgb_array = np.asarray(rgb.resize(size, resample=Image.BILINEAR)).astype(np.float64)
    mask_array = np.asarray(mask.resize(size, resample=Image.BILINEAR)) >= 128
    # Mild colour jitter: brightness, saturation and a small per-channel gain.
    gray = rgb_array.mean(axis=2, keepdims=True)
    rgb_array = gray + float(rng.uniform(0.75, 1.25)) * (rgb_array - gray)
    rgb_array = rgb_array * float(rng.uniform(0.8, 1.2)) * rng.uniform(0.92, 1.08, size=3)
    return _tight(np.clip(rgb_array, 0, 255).astype(np.uint8), mask_array)


def render_sample(seed: int, split: str, index: int, label: str, image_size: int = DEFAULT_IMAGE_SIZE) -> Sample:
    """Render image ``index`` of ``split`` with object class ``label``; a pure function of its arguments."""
    if split not in _SPLIT_INDEX:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if label not in CLASS_NAMES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASS_NAMES}")
    rng = np.random.default_rng([seed, _SPLIT_INDEX[split], 1, index])
    background, background_name, window = _render_background(rng, split, image_size)
    templates = object_templates()[label][split]
    template = templates[int(rng.integers(len(templates)))]
    obj = _render_object(rng, template, label, image_size)
    height, width = obj.mask.shape
    x0 = int(rng.integers(0, image_size - width + 1))
    y0 = int(rng.integers(0, image_size - height + 1))
    mask = np.zeros((image_size, image_size), dtype=bool)
    mask[y0 : y0 + height, x0 : x0 + width] = obj.mask
    image = background.copy()
    image[mask] = obj.rgb[obj.mask]
    return Sample(image, background, mask, (x0, y0, x0 + width, y0 + height), label, background_name, window)


def split_labels(seed: int, split: str, per_class: int) -> list[str]:
    """The shuffled, class-balanced label sequence of a split (``per_class`` images of every class)."""
    rng = np.random.default_rng([seed, _SPLIT_INDEX[split], 0, 0])
    order = rng.permutation(len(CLASS_NAMES) * per_class)
    return [CLASS_NAMES[i % len(CLASS_NAMES)] for i in order]


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def generate_split(
    output_dir: str | os.PathLike,
    split: str,
    per_class: int,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Write ``output_dir/split/*.png`` and its ``metadata.jsonl``; returns the metadata rows."""
    split_dir = Path(output_dir) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    labels = split_labels(seed, split, per_class)
    width = max(5, len(str(len(labels) - 1)))
    rows = []
    for index, label in enumerate(labels):
        sample = render_sample(seed, split, index, label, image_size)
        file_name = f"{index:0{width}d}.png"
        Image.fromarray(sample.image).save(split_dir / file_name, format="PNG", compress_level=3)
        rows.append(
            {
                "file_name": file_name,
                "label": label,
                "objects": {"bbox": [list(sample.bbox)], "category": [label]},
                "background": sample.background_name,
            }
        )
        if progress is not None:
            progress(1)
    with open(split_dir / "metadata.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def _prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output path {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {output_dir} is not empty; pass --overwrite to replace it")
        if not (output_dir / MARKER_FILE).is_file():
            raise FileExistsError(
                f"refusing to overwrite {output_dir}: it has no {MARKER_FILE}, so it was not written by this generator"
            )
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)


def generate_dataset(
    output_dir: str | os.PathLike,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    num_train: int = DEFAULT_COUNTS["train"],
    num_validation: int = DEFAULT_COUNTS["validation"],
    num_test: int = DEFAULT_COUNTS["test"],
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write the whole dataset (three splits, dataset card, ``generation.json``) and return its parameters.

    ``num_*`` are images per class. Raises ``ValueError`` for bad parameters and ``FileExistsError`` when
    ``output_dir`` is non-empty and ``overwrite`` is false (or it was not written by this generator).
    """
    counts = {
        "train": _check_positive_int("num_train", num_train),
        "validation": _check_positive_int("num_validation", num_validation),
        "test": _check_positive_int("num_test", num_test),
    }
    image_size = _check_positive_int("image_size", image_size)
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    output_dir = Path(output_dir)
    _prepare_output_dir(output_dir, overwrite)
    info = {
        "generator": "vit_registers.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "image_size": image_size,
        "images_per_class": counts,
        "num_images": {split: n * len(CLASS_NAMES) for split, n in counts.items()},
        "class_names": list(CLASS_NAMES),
        "backgrounds": list(BACKGROUND_NAMES),
        "bbox_format": "[x0, y0, x1, y1] pixels; x0, y0 inclusive, x1, y1 exclusive",
    }
    for split in SPLITS:
        generate_split(output_dir, split, counts[split], seed=int(seed), image_size=image_size, progress=progress)
    (output_dir / "README.md").write_text(dataset_card(info), encoding="utf-8")
    (output_dir / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def dataset_card(info: dict) -> str:
    """The dataset card (README.md) written next to the splits."""
    names = ", ".join(f"{i} `{name}`" for i, name in enumerate(info["class_names"]))
    coins = " / ".join(str(len(object_templates()["coin"][split])) for split in SPLITS)
    sizes = ", ".join(f"{split} {n}" for split, n in info["num_images"].items())
    return f"""---
license: other
license_name: mixed-cc0-public-domain-cc-by-2.0
task_categories:
- image-classification
- object-detection
pretty_name: vit-registers synthetic objects
size_categories:
- 1K<n<10K
---

# vit-registers synthetic objects

A small, deterministic object-localisation dataset generated offline by `scripts/make_dataset.py`
(`vit_registers.data.synthetic`, generator version {info["generator_version"]}) from photographs bundled in the
scikit-image and scikit-learn packages. Each {info["image_size"]}x{info["image_size"]} image shows one object of
{len(info["class_names"])} classes ({", ".join(info["class_names"])}) pasted on a textured background.

Generated with seed {info["seed"]}: {sizes} images ({", ".join(f"{k} {v}" for k, v in info["images_per_class"].items())}
per class). The same command with the same seed and the same package versions reproduces every file byte for
byte (the JPEG sources are decoded by Pillow, so another libjpeg build could change a few pixel values).

## Structure

`train/`, `validation/` and `test/` hold PNG images and a `metadata.jsonl` with one row per image:

```json
{{"file_name": "00000.png", "label": "cat", "objects": {{"bbox": [[x0, y0, x1, y1]], "category": ["cat"]}}, "background": "grass"}}
```

Boxes are in pixels of the image: `x0, y0` inclusive, `x1, y1` exclusive (the object lies in
`image[y0:y1, x0:x1]`), and they are the exact bounding box of the pasted object's pixels. Load with
`datasets.load_dataset("imagefolder", data_dir=PATH)` (label as a string) or
`vit_registers.data.load_synthetic_dataset(PATH)` (label as a `ClassLabel` in the order below).

Class ids: {names}.

## How it is made

Objects: masked crops (an ellipse around the astronaut's head, the cat's face, the cup and saucer and the dahlia; a
colour mask (not sky) for the rocket; the silhouette for the horse, filled with one of four coat colours; segmented
coins). Each is flipped left-right with probability 0.5, rotated by up to ±15°, scaled so its long side is 35–70 %
of the image (rocket 60–90 %, coins 30–55 %), colour-jittered (saturation ×0.75–1.25, brightness ×0.8–1.2,
channel gain ×0.92–1.08) and pasted with a binary mask at a uniformly random position, fully inside the image.
Backgrounds: a random square crop of grass, gravel, brick (grey textures with a random colour cast) or the
scikit-learn `china.jpg` photo, resized to the image size and flipped with probability 0.5.

Splits: the splits never share background pixels (each texture is cut into horizontal bands: top 50 % for train,
next 20 % for validation, bottom 30 % for test; crops have the same size range in every split) and the coin class
uses different coins per split ({coins}).
The other classes come from a single photograph each, so the test split measures generalisation to new positions,
scales, colours and backgrounds, not to unseen object instances.

Limitations: synthetic composites with hard mask edges; one object per image; objects are specific instances, not
categories; it is meant for small training runs and for checking localisation (CorLoc) of attention maps, not as
a benchmark.

## Sources and licences

{sources_table()}

The generated images are derivatives of these photographs; the CC BY 2.0 sources (`flower`, `china`) require
attribution as above. The generator code is Apache-2.0 (vit-registers).
"""


def load_synthetic_dataset(data_dir: str | os.PathLike, **kwargs):
    """Load a generated dataset as a ``DatasetDict`` with ``label`` cast to ``ClassLabel(names=CLASS_NAMES)``."""
    import datasets

    data_dir = Path(data_dir)
    if not (data_dir / MARKER_FILE).is_file():
        raise FileNotFoundError(
            f"{data_dir} is not a generated dataset (no {MARKER_FILE}); run scripts/make_dataset.py"
        )
    names = json.loads((data_dir / MARKER_FILE).read_text(encoding="utf-8"))["class_names"]
    dataset = datasets.load_dataset("imagefolder", data_dir=str(data_dir), **kwargs)
    return dataset.cast_column("label", datasets.ClassLabel(names=names))


def iter_metadata(data_dir: str | os.PathLike, split: str) -> Iterable[dict]:
    """Yield the metadata rows of one split."""
    with open(Path(data_dir) / split / "metadata.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
