"""The bundled photographs the synthetic dataset is built from, with their packages and licences.

Every image here ships inside an installed Python package (scikit-image's ``skimage/data`` folder or
scikit-learn's ``sklearn/datasets/images`` folder), so building the dataset never touches the network.
The licence and attribution of each photograph are taken from the package's own documentation
(``skimage.data.<name>.__doc__`` and ``sklearn/datasets/images/README.txt``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SourceImage", "SOURCES", "load_source", "sources_table"]


@dataclass(frozen=True)
class SourceImage:
    """One bundled photograph: where it comes from and under which terms."""

    name: str
    package: str
    path: str
    role: str  # "object" or "background"
    licence: str
    attribution: str
    url: str


SOURCES: dict[str, SourceImage] = {
    s.name: s
    for s in (
        SourceImage(
            "astronaut",
            "scikit-image",
            "skimage/data/astronaut.png",
            "object",
            "Public domain (NASA; no known copyright restrictions)",
            "NASA, portrait of astronaut Eileen Collins",
            "https://flic.kr/p/r9qvLn",
        ),
        SourceImage(
            "chelsea",
            "scikit-image",
            "skimage/data/chelsea.png",
            "object",
            "CC0",
            "Stefan van der Walt (photographer)",
            "https://scikit-image.org/docs/stable/api/skimage.data.html",
        ),
        SourceImage(
            "coffee",
            "scikit-image",
            "skimage/data/coffee.png",
            "object",
            "CC0",
            "Rachel Michetti (photographer), courtesy of Pikolo Espresso Bar",
            "https://scikit-image.org/docs/stable/api/skimage.data.html",
        ),
        SourceImage(
            "rocket",
            "scikit-image",
            "skimage/data/rocket.jpg",
            "object",
            "Public domain (released by SpaceX)",
            "SpaceX, launch of DSCOVR on Falcon 9",
            "https://www.flickr.com/photos/spacexphotos/16511594820/",
        ),
        SourceImage(
            "horse",
            "scikit-image",
            "skimage/data/horse.png",
            "object",
            "CC0",
            "Andreas Preuss (marauder), openclipart",
            "http://openclipart.org/detail/158377/horse-by-marauder",
        ),
        SourceImage(
            "coins",
            "scikit-image",
            "skimage/data/coins.png",
            "object",
            "No known copyright restrictions",
            "Brooklyn Museum Collection, Greek coins from Pompeii",
            "https://www.brooklynmuseum.org/opencollection/archives/image/51611",
        ),
        SourceImage(
            "flower",
            "scikit-learn",
            "sklearn/datasets/images/flower.jpg",
            "object",
            "CC BY 2.0",
            "vultilion on Flickr (retrieved by Robert Layton for scikit-learn)",
            "https://www.flickr.com/photos/vultilion/6056698931/",
        ),
        SourceImage(
            "grass",
            "scikit-image",
            "skimage/data/grass.png",
            "background",
            "CC0",
            "linolafett on DeviantArt",
            "https://www.deviantart.com/linolafett/art/Grass-01-434853879",
        ),
        SourceImage(
            "gravel",
            "scikit-image",
            "skimage/data/gravel.png",
            "background",
            "CC0",
            "CC0Textures (Gravel04)",
            "https://cc0textures.com/view.php?tex=Gravel04",
        ),
        SourceImage(
            "brick",
            "scikit-image",
            "skimage/data/brick.png",
            "background",
            "CC0",
            "CC0Textures (Bricks25)",
            "https://cc0textures.com/view.php?tex=Bricks25",
        ),
        SourceImage(
            "china",
            "scikit-learn",
            "sklearn/datasets/images/china.jpg",
            "background",
            "CC BY 2.0",
            "danielbuechele on Flickr (retrieved by Robert Layton for scikit-learn)",
            "https://www.flickr.com/photos/danielbuechele/6061409035/",
        ),
    )
}


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"building the synthetic dataset needs the '{package}' package (its bundled photos are the source "
            f"images); install it with `pip install {package}`"
        ) from err


def load_source(name: str) -> np.ndarray:
    """Return the bundled photograph ``name`` as a uint8 array: (H, W, 3) for colour, (H, W) for grey or binary."""
    if name not in SOURCES:
        raise KeyError(f"unknown source image {name!r}; known: {', '.join(sorted(SOURCES))}")
    source = SOURCES[name]
    if source.package == "scikit-learn":
        datasets = _require("sklearn.datasets", "scikit-learn")
        image = np.asarray(datasets.load_sample_image(source.path.rsplit("/", 1)[-1]))
    else:
        data = _require("skimage.data", "scikit-image")
        image = np.asarray(getattr(data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        raise TypeError(f"source image {name!r} has dtype {image.dtype}, expected uint8")
    return image


def sources_table() -> str:
    """A Markdown table of every source image, for the dataset card."""
    lines = [
        "| image | package (file) | used as | licence | attribution |",
        "|---|---|---|---|---|",
    ]
    for s in SOURCES.values():
        lines.append(f"| {s.name} | {s.package} (`{s.path}`) | {s.role} | {s.licence} | [{s.attribution}]({s.url}) |")
    return "\n".join(lines)
