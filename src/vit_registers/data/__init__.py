"""Datasets for training and evaluating the package's small models (issue 8).

`synthetic` builds a deterministic object-localisation dataset from photos bundled in scikit-image and
scikit-learn; `sources` lists those photos with their licences.
"""

from .sources import SOURCES, SourceImage, load_source
from .synthetic import (
    BACKGROUND_NAMES,
    CLASS_NAMES,
    SPLITS,
    Sample,
    generate_dataset,
    load_synthetic_dataset,
    mask_bbox,
    render_sample,
)

__all__ = [
    "SOURCES",
    "SourceImage",
    "load_source",
    "BACKGROUND_NAMES",
    "CLASS_NAMES",
    "SPLITS",
    "Sample",
    "generate_dataset",
    "load_synthetic_dataset",
    "mask_bbox",
    "render_sample",
]
