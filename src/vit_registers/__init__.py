"""vit-registers: Vision Transformers with register tokens for the Hugging Face ecosystem.

Importing the package registers the model with transformers' Auto classes (AutoConfig, AutoModel,
AutoModelForImageClassification, AutoBackbone, AutoImageProcessor) and marks every class for `auto_map`, so that
`save_pretrained` writes the code next to the weights and `trust_remote_code=True` works without the package.
Importing changes no process-wide setting; `tune_cpu_allocator()` is there for scripts that want the CPU speed-up the
package's own commands get (see `vit_registers.cpu_allocator`).

The registration needs the model classes, so importing the package imports torch and transformers' `PreTrainedModel`
(nearly all of its import time) and nothing else: `analysis`, `interventions`, `training`, `space` and the CLI's
subcommands import matplotlib, gradio, datasets or evaluate only where they use them (tests/test_imports.py).
"""

from .auto import register_auto_classes
from .configuration_vit_registers import ViTRegistersConfig
from .cpu_allocator import tune_cpu_allocator
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
    "tune_cpu_allocator",
    "__version__",
]
