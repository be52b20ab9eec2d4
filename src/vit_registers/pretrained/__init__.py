"""The small models this project trains itself and ships inside the package, the offline defaults of the CLI and Space.

Two ViTs that differ only in `num_register_tokens` (0 and 4), trained from scratch on the synthetic object dataset
(`scripts/make_dataset.py`) with `scripts/finetune.py`; their model cards give the exact commands and results.
"""

from __future__ import annotations

from pathlib import Path

PRETRAINED_DIR = Path(__file__).resolve().parent
MODEL_NAMES = {4: "vit-tiny-objects-reg4", 0: "vit-tiny-objects-reg0"}


def default_model_path(num_register_tokens: int = 4) -> Path:
    """Directory of the embedded model with `num_register_tokens` registers (4 or 0), loadable offline with
    `AutoModel.from_pretrained`. Raises `FileNotFoundError` naming the directory when it is not there."""
    if num_register_tokens not in MODEL_NAMES:
        raise ValueError(f"Embedded models have {sorted(MODEL_NAMES)} registers, not {num_register_tokens}.")
    path = PRETRAINED_DIR / MODEL_NAMES[num_register_tokens]
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"The embedded model {path.name} is missing from {PRETRAINED_DIR}; pass --model PATH_OR_ID instead."
        )
    return path


def default_models() -> dict[str, Path]:
    """`{label: path}` of the embedded models present, with registers first."""
    found = {}
    for registers, name in MODEL_NAMES.items():
        if (PRETRAINED_DIR / name / "config.json").exists():
            found[f"{name} ({registers} registers)"] = PRETRAINED_DIR / name
    return found


__all__ = ["PRETRAINED_DIR", "MODEL_NAMES", "default_model_path", "default_models"]
