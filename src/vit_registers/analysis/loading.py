"""Loading a vit_registers model and its image processor from a saved directory or a Hub id."""

from __future__ import annotations

import contextlib
import os
import warnings

import torch


class ModelLoadError(ValueError):
    """The model or its image processor cannot be loaded."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def checkpoint_class(config):
    """The vit_registers class whose weights a checkpoint holds: the first of its `config.architectures` that is one
    (a classifier checkpoint holds `classifier.*` too), else `ViTRegistersModel`. Loading the bare model from a
    classifier checkpoint would report the head weights as unexpected."""
    from ..modeling_vit_registers import ViTRegistersBackbone, ViTRegistersForImageClassification, ViTRegistersModel

    classes = {
        model_class.__name__: model_class
        for model_class in (ViTRegistersModel, ViTRegistersForImageClassification, ViTRegistersBackbone)
    }
    for name in getattr(config, "architectures", None) or ():
        if name in classes:
            return classes[name]
    return ViTRegistersModel


@contextlib.contextmanager
def without_loading_bar(name_or_path: str):
    """Around a `from_pretrained(name_or_path)`: transformers draws a "Loading weights" bar on every call, noise in a
    command's output for a local directory (the embedded models load in milliseconds). Downloads from the Hub keep
    their bars."""
    from .._quiet import transformers_bars_off

    with transformers_bars_off() if os.path.isdir(name_or_path) else contextlib.nullcontext():
        yield


def load_model(name_or_path: str, device: str | None = None):
    """`(model, processor)`: the `ViTRegistersModel` of the checkpoint (the bare model, or the one inside a classifier
    or backbone, loaded with that class: [`checkpoint_class`]) in eval mode on `device`, and
    `AutoImageProcessor.from_pretrained`, or, when the checkpoint has none, the model's image size as resize target
    with ImageNet normalisation (a warning says so)."""
    import transformers

    import vit_registers  # noqa: F401  (registers the Auto classes)

    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
    except Exception as error:  # transformers raises OSError/ValueError/EnvironmentError variants
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {_first_line(error)}") from None
    if getattr(config, "model_type", None) != "vit_registers":
        raise ModelLoadError(
            f"{name_or_path!r} is a {config.model_type!r} model; the analysis needs a vit_registers model."
        )
    try:
        with without_loading_bar(name_or_path):
            model = checkpoint_class(config).from_pretrained(name_or_path, config=config)
    except Exception as error:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {_first_line(error)}") from None
    model = model.base_model  # the ViTRegistersModel inside a classifier or backbone
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
