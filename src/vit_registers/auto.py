"""Registration with transformers' Auto classes and `auto_map` for `trust_remote_code` loading."""

from __future__ import annotations

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    BitImageProcessor,
)

try:  # transformers >= 5.x with image-processor backends: BitImageProcessor is the torchvision one
    from transformers import BitImageProcessorPil

    IMAGE_PROCESSOR_CLASSES = {"torchvision": BitImageProcessor, "pil": BitImageProcessorPil}
except ImportError:  # pragma: no cover - earlier transformers: BitImageProcessor is the PIL one
    from transformers import BitImageProcessorFast

    IMAGE_PROCESSOR_CLASSES = {"torchvision": BitImageProcessorFast, "pil": BitImageProcessor}

from .configuration_vit_registers import ViTRegistersConfig
from .modeling_vit_registers import ViTRegistersBackbone, ViTRegistersForImageClassification, ViTRegistersModel

AUTO_CLASSES = {
    "AutoModel": ViTRegistersModel,
    "AutoModelForImageClassification": ViTRegistersForImageClassification,
    "AutoBackbone": ViTRegistersBackbone,
}


def register_auto_classes() -> None:
    """Make `vit_registers` known to the Auto API (idempotent)."""
    try:
        AutoConfig.register(ViTRegistersConfig.model_type, ViTRegistersConfig, exist_ok=True)
        AutoModel.register(ViTRegistersConfig, ViTRegistersModel, exist_ok=True)
        AutoModelForImageClassification.register(ViTRegistersConfig, ViTRegistersForImageClassification, exist_ok=True)
        AutoBackbone.register(ViTRegistersConfig, ViTRegistersBackbone, exist_ok=True)
        # Both backends, as transformers maps DINOv2: with only one registered, loading a `BitImageProcessor` config
        # looks for the torchvision entry of this mapping, finds none and logs "Falling back to pil backend".
        AutoImageProcessor.register(
            ViTRegistersConfig,
            slow_image_processor_class=IMAGE_PROCESSOR_CLASSES["pil"],
            fast_image_processor_class=IMAGE_PROCESSOR_CLASSES["torchvision"],
            exist_ok=True,
        )
    except TypeError:  # pragma: no cover - transformers without `exist_ok`
        pass
    # `auto_map` in config.json + code files copied by save_pretrained → trust_remote_code works anywhere.
    ViTRegistersConfig.register_for_auto_class()
    for auto_name, model_class in AUTO_CLASSES.items():
        model_class.register_for_auto_class(auto_name)
