"""Loading a vit_registers model and its image processor from a saved directory or a Hub id."""

from __future__ import annotations

import warnings

import torch


class ModelLoadError(ValueError):
    """The model or its image processor cannot be loaded."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str, device: str | None = None):
    """`(model, processor)`: `AutoModel.from_pretrained` (a `ViTRegistersModel`) in eval mode on `device`, and
    `AutoImageProcessor.from_pretrained`, or, when the checkpoint has none, the model's image size as resize target
    with ImageNet normalisation (a warning says so)."""
    import transformers

    import vit_registers  # noqa: F401  (registers the Auto classes)

    try:
        model = transformers.AutoModel.from_pretrained(name_or_path)
    except Exception as error:  # transformers raises OSError/ValueError/EnvironmentError variants
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {str(error).splitlines()[0]}") from None
    if getattr(model.config, "model_type", None) != "vit_registers":
        raise ModelLoadError(
            f"{name_or_path!r} is a {model.config.model_type!r} model; the analysis needs a vit_registers model."
        )
    model = model.to(device or default_device()).eval()
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name_or_path)
    except Exception:
        size = model.config.image_size
        processor = min(size) if isinstance(size, (list, tuple)) else int(size)
        warnings.warn(
            f"{name_or_path!r} has no image processor: resizing to {processor} px with ImageNet mean/std.",
            stacklevel=2,
        )
    return model, processor
