"""Image-classification data for fine-tuning: loading, validation and torchvision-v2 transforms.

Two sources are supported: class-per-folder directories read with `datasets`' ``imagefolder`` builder, and any
dataset `datasets.load_dataset` opens (a Hub id or a local path) with named image and label columns. Everything is
checked before training starts, and problems are reported as :class:`DataError` naming the directory, column or file.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers.image_utils import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN  # noqa: E402
from transformers.image_utils import IMAGENET_DEFAULT_STD as IMAGENET_STD  # noqa: E402


class DataError(ValueError):
    """Bad training data: the message names the directory, column or file at fault."""


def image_extensions() -> frozenset[str]:
    """The file extensions `datasets`' ``imagefolder`` builder treats as images (lower case, with the dot)."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return frozenset(ext.lower() for ext in ImageFolder.EXTENSIONS)


def _check_image(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:  # `verify` leaves the file unusable; decoding catches truncated data
            image.load()
    except Exception as error:  # noqa: BLE001 - any decoder failure means "unreadable"
        return f"{path}: {type(error).__name__}: {error}"
    return None


def scan_image_folder(directory: str | os.PathLike, role: str = "train") -> list[str]:
    """Check a class-per-folder directory (``DIR/<class>/<image>``) and return its sorted class names.

    Raises :class:`DataError` when the directory is missing, has no class folders, a class folder holds no image,
    or any image cannot be decoded (every unreadable file is listed).
    """
    root = Path(directory)
    if not root.exists():
        raise DataError(f"{role} directory {str(root)!r} does not exist.")
    if not root.is_dir():
        raise DataError(f"{role} directory {str(root)!r} is not a directory.")
    extensions = image_extensions()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p for p in root.iterdir() if p.suffix.lower() in extensions]
        hint = " (images must sit in one sub-folder per class)" if loose else ""
        raise DataError(f"{role} directory {str(root)!r} has no class sub-folders with images{hint}.")
    files: list[Path] = []
    for name in classes:
        found = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        if not found:
            raise DataError(f"{role} class folder {str(root / name)!r} contains no images.")
        files.extend(found)
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 1)) as pool:
        problems = [p for p in pool.map(_check_image, files) if p]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DataError(f"{len(problems)} unreadable image file(s) in {role} directory {str(root)!r}: {shown}")
    return classes


@dataclass
class ClassificationData:
    """Train (and optional validation) `datasets.Dataset`s with columns ``image`` and ``label`` (integers)."""

    train: object
    validation: object | None
    labels: list[str]
    source: str

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.labels)}


def _load_imagefolder(directory: str, cache_dir: str | None = None):
    from datasets import load_dataset

    from .._quiet import quiet_datasets

    with quiet_datasets():  # a local folder: no "Generating train split" bars
        return load_dataset("imagefolder", data_dir=directory, split="train", cache_dir=cache_dir)


def _label_names(dataset, column: str) -> list[str] | None:
    from datasets import ClassLabel

    feature = dataset.features[column]
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def _standardise(dataset, image_column: str, label_column: str, labels: list[str], where: str):
    """Rename to ``image``/``label``, map labels onto `labels` by name, drop every other column."""
    from datasets import ClassLabel
    from datasets import Image as ImageFeature

    names = _label_names(dataset, label_column)
    index = {name: i for i, name in enumerate(labels)}
    if names is not None:
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise DataError(f"{where} has classes the training data lacks: {unknown}.")
        mapping = [index[name] for name in names]
        needs_map = mapping != list(range(len(mapping)))
    else:
        values = sorted({str(v) for v in dataset.unique(label_column)})
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise DataError(f"{where} has labels the training data lacks: {unknown[:10]}.")
        mapping = None
        needs_map = True
    extra = [c for c in dataset.column_names if c not in (image_column, label_column)]
    dataset = dataset.remove_columns(extra)
    if needs_map:
        if mapping is not None:
            fn = lambda batch: {"label": [mapping[v] for v in batch[label_column]]}  # noqa: E731
        else:
            fn = lambda batch: {"label": [index[str(v)] for v in batch[label_column]]}  # noqa: E731
        features = dataset.features.copy()
        del features[label_column]
        features["label"] = ClassLabel(names=labels)
        dataset = dataset.map(fn, batched=True, remove_columns=[label_column], features=features)
    elif label_column != "label":
        dataset = dataset.rename_column(label_column, "label")
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    if not isinstance(dataset.features["image"], ImageFeature):
        dataset = dataset.cast_column("image", ImageFeature())
    return dataset


def _check_columns(dataset, image_column: str, label_column: str, where: str) -> None:
    columns = list(dataset.column_names)
    for role, column in (("image", image_column), ("label", label_column)):
        if column not in columns:
            raise DataError(
                f"{role} column {column!r} not found in {where}; available columns: {', '.join(columns)} "
                f"(choose with --{role}-column)."
            )
    from datasets import Image as ImageFeature

    feature = dataset.features[image_column]
    if not isinstance(feature, ImageFeature) and len(dataset):
        try:
            training_image(dataset[0][image_column])
        except Exception as error:  # noqa: BLE001
            raise DataError(f"column {image_column!r} of {where} does not hold images ({error}).") from None


def load_classification_data(
    train_dir: str | None = None,
    validation_dir: str | None = None,
    dataset: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    cache_dir: str | None = None,
) -> ClassificationData:
    """Load and validate image-classification data.

    Either `train_dir` (class-per-folder, optional `validation_dir`) or `dataset` (anything `load_dataset` accepts;
    its ``train`` split trains, its ``validation`` — else ``test`` — split evaluates). Labels are named by the class
    folders or the label column's `ClassLabel` names (else the sorted distinct values); validation labels are mapped
    onto the training labels by name.
    """
    if bool(train_dir) == bool(dataset):
        raise DataError("give exactly one of --train-dir or --dataset.")
    if train_dir:
        labels = scan_image_folder(train_dir, "train")
        if len(labels) < 2:
            raise DataError(f"train directory {train_dir!r} has {len(labels)} class folder; at least 2 are needed.")
        train = _standardise(_load_imagefolder(train_dir, cache_dir), "image", "label", labels, f"{train_dir!r}")
        validation = None
        if validation_dir:
            val_labels = scan_image_folder(validation_dir, "validation")
            unknown = sorted(set(val_labels) - set(labels))
            if unknown:
                raise DataError(
                    f"validation directory {validation_dir!r} has classes the training data lacks: {unknown}."
                )
            validation = _standardise(
                _load_imagefolder(validation_dir, cache_dir), "image", "label", labels, f"{validation_dir!r}"
            )
        return ClassificationData(train, validation, labels, source=str(train_dir))

    if validation_dir:
        raise DataError("--validation-dir goes with --train-dir; a --dataset brings its own validation split.")
    from datasets import load_dataset

    try:
        splits = load_dataset(dataset, cache_dir=cache_dir)
    except Exception as error:  # noqa: BLE001 - report any loading failure in one line
        raise DataError(f"could not load dataset {dataset!r}: {type(error).__name__}: {error}") from None
    if "train" not in splits:
        raise DataError(f"dataset {dataset!r} has no 'train' split (splits: {', '.join(splits)}).")
    _check_columns(splits["train"], image_column, label_column, f"dataset {dataset!r} (split 'train')")
    names = _label_names(splits["train"], label_column)
    labels = names if names is not None else sorted({str(v) for v in splits["train"].unique(label_column)})
    if len(labels) < 2:
        raise DataError(f"dataset {dataset!r} has {len(labels)} distinct label(s); at least 2 are needed.")
    train = _standardise(splits["train"], image_column, label_column, labels, f"dataset {dataset!r}")
    validation = None
    for split in ("validation", "test"):
        if split in splits:
            where = f"dataset {dataset!r} (split {split!r})"
            _check_columns(splits[split], image_column, label_column, where)
            validation = _standardise(splits[split], image_column, label_column, labels, where)
            break
    return ClassificationData(train, validation, labels, source=str(dataset))


# --------------------------------------------------------------------------------------------------------------------
# Transforms


def training_image(value) -> Image.Image:
    """The 8-bit RGB PIL image of one dataset value (a PIL image, a path or a `datasets` image dict): opened here,
    converted by the analysis' own `vit_registers.analysis.images.to_rgb` (alpha on white, 16-bit and float images
    rescaled), so that a model is trained on what it is later analysed with."""
    from ..analysis.images import to_rgb

    if isinstance(value, dict):
        value = Image.open(value["path"]) if value.get("bytes") is None else Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, (str, os.PathLike)):
        value = Image.open(value)
    return to_rgb(value)


def processor_geometry(image_processor) -> tuple[int | tuple[int, int], tuple[int, int]]:
    """(resize argument, (crop height, crop width)) of an image processor, torchvision-style.

    The resize argument is an int (shortest edge) or (height, width); the crop is the model's input size.
    """

    def get(obj, key):
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    size = image_processor.size
    if get(size, "shortest_edge"):
        resize: int | tuple[int, int] = int(get(size, "shortest_edge"))
    elif get(size, "height") and get(size, "width"):
        resize = (int(get(size, "height")), int(get(size, "width")))
    else:
        raise DataError(f"unsupported image processor size {size!r}: need shortest_edge or height/width.")
    crop = getattr(image_processor, "crop_size", None)
    if getattr(image_processor, "do_center_crop", False) and crop is not None and get(crop, "height"):
        output = (int(get(crop, "height")), int(get(crop, "width")))
    elif isinstance(resize, tuple):
        output = resize
    else:
        output = (resize, resize)
    return resize, output


def build_transforms(image_processor, train: bool, augment: bool = True, crop_scale_min: float = 0.08) -> Callable:
    """torchvision.transforms.v2 pipeline that matches `image_processor` (size, crop, mean/std).

    Training (with `augment`): RandomResizedCrop (area fraction in [`crop_scale_min`, 1]) to the model's input size +
    horizontal flip. Evaluation: the
    processor's resize and center crop. Both end with float conversion to [0, 1] and the processor's normalisation.
    """
    from torchvision.transforms import InterpolationMode, v2

    resize, output = processor_geometry(image_processor)
    mean = list(getattr(image_processor, "image_mean", None) or IMAGENET_MEAN)
    std = list(getattr(image_processor, "image_std", None) or IMAGENET_STD)
    interpolation = InterpolationMode.BICUBIC
    if train and augment:
        geometry = [
            v2.RandomResizedCrop(output, scale=(crop_scale_min, 1.0), interpolation=interpolation, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [v2.Resize(resize, interpolation=interpolation, antialias=True), v2.CenterCrop(output)]
    return v2.Compose(
        [v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=mean, std=std)]
    )


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class TransformedDataset(torch.utils.data.Dataset):
    """Map-style view of a `datasets.Dataset` (``image``, ``label``) that applies `transform` per sample.

    With `seed` set, the random augmentation of sample `i` in epoch `e` depends only on (seed, e, i): runs with any
    number of processes, or resumed from a checkpoint, see exactly the same augmented images.
    """

    def __init__(self, dataset, transform: Callable, seed: int | None = None):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[int(index)]
        image = training_image(row["image"])
        if self.seed is None:
            pixels = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_sample_seed(self.seed, self.epoch, int(index)))
                pixels = self.transform(image)
        return {"pixel_values": pixels, "labels": int(row["label"])}


def collate(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack ``pixel_values`` and ``labels`` of a list of samples (works as a `Trainer` data collator too)."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([int(e["labels"] if "labels" in e else e["label"]) for e in examples]),
    }


def hf_transform(image_processor, train: bool, augment: bool = True) -> Callable[[dict], dict]:
    """A `datasets.Dataset.set_transform` function producing ``pixel_values``/``labels`` (for `Trainer`)."""
    transform = build_transforms(image_processor, train=train, augment=augment)

    def apply(batch: dict) -> dict:
        return {
            "pixel_values": [transform(training_image(image)) for image in batch["image"]],
            "labels": list(batch["label"]),
        }

    return apply


__all__ = [
    "DataError",
    "ClassificationData",
    "TransformedDataset",
    "build_transforms",
    "collate",
    "hf_transform",
    "load_classification_data",
    "processor_geometry",
    "scan_image_folder",
    "training_image",
]
