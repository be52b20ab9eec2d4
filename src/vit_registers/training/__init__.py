"""Fine-tuning ViTRegisters classifiers: data, optimiser, register surgery and the Accelerate training loop.

`scripts/finetune.py` is the command-line front; everything it does is importable from here. The metrics (which need
`datasets` and `evaluate`) are imported from `metrics` on first use.
"""

from .._lazy import lazy_names
from .data import (
    ClassificationData,
    DataError,
    TransformedDataset,
    build_transforms,
    collate,
    hf_transform,
    load_classification_data,
    scan_image_folder,
)
from .optim import create_optimizer, create_scheduler, parameter_groups
from .registers import add_register_tokens

__getattr__, __dir__ = lazy_names(__name__, {"metrics": ["Accuracy", "compute_metrics_for_trainer", "load_accuracy"]})

__all__ = [
    "Accuracy",
    "ClassificationData",
    "DataError",
    "TransformedDataset",
    "add_register_tokens",
    "build_transforms",
    "collate",
    "compute_metrics_for_trainer",
    "create_optimizer",
    "create_scheduler",
    "hf_transform",
    "load_accuracy",
    "load_classification_data",
    "parameter_groups",
    "scan_image_folder",
]
