"""A tiny, offline image-classification set: random crops of scikit-image's bundled photos, one class per photo.

Used by the tests and the README example; nothing is downloaded. Needs `scikit-image` (a test dependency).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def make_image_folder(
    root: str | Path,
    classes: tuple[str, ...] = PHOTOS[:2],
    per_class: int = 8,
    size: int = 32,
    seed: int = 0,
    crop_fraction: float = 0.5,
) -> Path:
    """Write `root/<class>/<i>.png`: `per_class` random square crops (side `crop_fraction` of the shorter edge) of
    each named `skimage.data` photo, resized to `size` x `size`. Returns `root`."""
    import skimage.data

    rng = np.random.default_rng(seed)
    root = Path(root)
    for name in classes:
        photo = np.asarray(getattr(skimage.data, name)())
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, axis=-1)
        photo = photo[..., :3]
        height, width = photo.shape[:2]
        side = int(min(height, width) * crop_fraction)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
            crop = Image.fromarray(photo[top : top + side, left : left + side])
            crop.resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{index:03d}.png")
    return root


__all__ = ["PHOTOS", "make_image_folder"]
