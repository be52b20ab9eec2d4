"""Loading images for analysis: any PIL-readable file → 8-bit RGB, resized to multiples of the patch size.

Unreadable files raise [`ImageError`] with a message naming the file; grayscale, palette, RGBA/LA (composited on
white), CMYK, 16-bit and float images are converted to 8-bit RGB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers.image_utils import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN  # noqa: E402
from transformers.image_utils import IMAGENET_DEFAULT_STD as IMAGENET_STD  # noqa: E402


class ImageError(ValueError):
    """An input image cannot be analysed (unreadable, not an image, too small)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB: 16-bit/int images are scaled to 0–255, alpha is composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image).astype(np.float64)
        if mode == "F":
            low, high = float(np.nanmin(array)), float(np.nanmax(array))
            scale = 1.0 if high <= 1.0 and low >= 0.0 else None
            if scale is None:
                array = (array - low) / max(high - low, 1e-12)
            array = np.nan_to_num(array) * 255.0
        elif mode.startswith("I;16") or array.max(initial=0) > 255:  # 16-bit samples
            array = array / 257.0
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open `path` as an 8-bit RGB PIL image, or raise [`ImageError`] saying why it cannot be read."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file.")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a directory, not an image file.")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = to_rgb(opened)
            if image is opened:
                image = opened.copy()
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file (PIL cannot identify its format).") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: cannot read the image ({error}).") from None
    return image


def check_image_size(image: Image.Image, patch_size: int, name: str = "image") -> None:
    """Raise [`ImageError`] if the image is smaller than one `patch_size` x `patch_size` patch."""
    width, height = image.size
    if min(width, height) < patch_size:
        raise ImageError(
            f"{name}: {width}x{height} pixels is smaller than one {patch_size}x{patch_size} patch of the model."
        )


def _processor_value(size, key):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def target_short_side(processor, default: int = 224) -> int:
    """The shorter side the model works at: the crop size when the processor center-crops (DINOv2: resize 256,
    crop 224 → 224), else its `shortest_edge`, else min(height, width). An int is returned as is."""
    if isinstance(processor, int):
        return processor
    attributes = ("crop_size", "size") if getattr(processor, "do_center_crop", False) else ("size", "crop_size")
    for attribute in attributes:
        size = getattr(processor, attribute, None)
        if isinstance(size, int):
            return size
        height, width = _processor_value(size, "height"), _processor_value(size, "width")
        if height and width:
            return int(min(height, width))
        edge = _processor_value(size, "shortest_edge")
        if edge:
            return int(edge)
    return default


@dataclass
class PreparedImage:
    """A model input built from one image and the per-axis scale from original to input pixels."""

    pixel_values: torch.Tensor  # (3, H, W), normalised
    image: Image.Image  # the resized RGB image the model sees (for figures)
    original_size: tuple[int, int]  # (height, width)
    scale: tuple[float, float]  # (sy, sx): input pixel = original pixel * scale

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.pixel_values.shape[-2:])

    def box_to_original(self, box):
        """Map an `[x0, y0, x1, y1]` box from input pixels back to original-image pixels."""
        sy, sx = self.scale
        x0, y0, x1, y1 = box
        return [x0 / sx, y0 / sy, x1 / sx, y1 / sy]


def prepare_image(
    image: Image.Image,
    patch_size: int,
    short_side: int = 224,
    image_mean=IMAGENET_MEAN,
    image_std=IMAGENET_STD,
    square: bool = False,
    name: str = "image",
) -> PreparedImage:
    """Resize an RGB image so its shorter side is ~`short_side` with both sides multiples of `patch_size`
    (no crop, so the whole image is analysed as in LOST), then normalise with `image_mean`/`image_std`.

    With `square=True` the image is resized to `short_side` x `short_side` (batchable, aspect not kept).
    """
    check_image_size(image, patch_size, name)
    width, height = image.size
    if square:
        new_height = new_width = max(patch_size, round(short_side / patch_size) * patch_size)
    else:
        factor = short_side / min(width, height)
        new_height = max(patch_size, round(height * factor / patch_size) * patch_size)
        new_width = max(patch_size, round(width * factor / patch_size) * patch_size)
    resized = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    array = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)
    return PreparedImage(
        pixel_values=(array - mean) / std,
        image=resized,
        original_size=(height, width),
        scale=(new_height / height, new_width / width),
    )


def prepare_with_processor(
    image: Image.Image,
    processor,
    patch_size: int,
    square: bool = False,
    name: str = "image",
    short_side: int | None = None,
) -> PreparedImage:
    """[`prepare_image`] with the resize target (unless `short_side` is given) and normalisation read from a
    transformers image processor (or an int: the shorter side, with ImageNet normalisation)."""
    mean = getattr(processor, "image_mean", None) or IMAGENET_MEAN
    std = getattr(processor, "image_std", None) or IMAGENET_STD
    if getattr(processor, "do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return prepare_image(
        image,
        patch_size,
        short_side or target_short_side(processor),
        image_mean=mean,
        image_std=std,
        square=square,
        name=name,
    )


BUNDLED_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def bundled_photos(directory: str | os.PathLike, names=BUNDLED_PHOTOS) -> list[str]:
    """Write scikit-image's bundled photos (public domain / CC0) as PNG files into `directory`; return the paths.

    These are the offline example inputs of the CLI and the Space. Files already present are reused; each file is
    written under a temporary name and renamed, so concurrent callers never see a partial PNG.
    """
    from skimage import data

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name in names:
        path = os.path.join(directory, f"{name}.png")
        if not os.path.exists(path):
            partial = f"{path}.{os.getpid()}.{id(paths)}.tmp"
            Image.fromarray(getattr(data, name)()).save(partial, format="PNG")
            os.replace(partial, path)
        paths.append(path)
    return paths
