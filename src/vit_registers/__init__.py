"""vit-registers: Vision Transformers with register tokens for the Hugging Face ecosystem.

Importing the package registers the model with transformers' Auto classes (AutoConfig, AutoModel,
AutoModelForImageClassification, AutoBackbone, AutoImageProcessor) and marks every class for `auto_map`, so that
`save_pretrained` writes the code next to the weights and `trust_remote_code=True` works without the package.
"""

from .auto import register_auto_classes
from .configuration_vit_registers import ViTRegistersConfig
from .modeling_vit_registers import (
    ViTRegistersBackbone,
    ViTRegistersForImageClassification,
    ViTRegistersModel,
    ViTRegistersModelOutput,
    ViTRegistersPreTrainedModel,
)

__version__ = "0.1.0"

register_auto_classes()

__all__ = [
    "ViTRegistersConfig",
    "ViTRegistersModel",
    "ViTRegistersModelOutput",
    "ViTRegistersPreTrainedModel",
    "ViTRegistersForImageClassification",
    "ViTRegistersBackbone",
    "__version__",
]
