"""Reading an embedding directory written by `vit-registers embed` back: its index and the feature matrices of a split.

Inputs are named like `cls`, `cls+patch_mean` or `cls+registers`: the stored features joined with `+`. A feature with
several vectors per image (`registers`, `patches`) is flattened, so `registers` of a 4-register model is 4 × hidden
wide. Reading streams the shards one at a time and keeps only the requested columns.
"""

from __future__ import annotations

import json
from pathlib import Path

from .embed import MANIFEST


class FeatureError(ValueError):
    """The embedding directory, a split or a feature is missing or incomplete."""


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        if (directory / "embed_settings.json").exists():
            raise FeatureError(
                f"{directory} is an unfinished embedding run (no {MANIFEST}); rerun the same `vit-registers embed` "
                "command to finish it."
            )
        raise FeatureError(f"{directory} is not a directory written by `vit-registers embed` (no {MANIFEST}).")
    return json.loads(path.read_text())


def parse_inputs(specs: list[str], manifest: dict) -> list[tuple[str, list[str]]]:
    """`[(name, [feature, ...])]` for specs like `cls+registers`; unknown features raise naming what is stored."""
    stored = manifest["features"]
    parsed = []
    for spec in specs:
        parts = [part.strip() for part in spec.split("+") if part.strip()]
        missing = [part for part in parts if part not in stored]
        if not parts or missing:
            raise FeatureError(
                f"input {spec!r}: {', '.join(missing) or 'empty'} not stored (stored: {', '.join(stored)}); "
                "embed with --features to add it."
            )
        parsed.append(("+".join(parts), parts))
    return parsed


def default_inputs(manifest: dict) -> list[str]:
    """CLS alone, CLS + mean patch, CLS + registers and the registers alone, as far as they are stored (else the
    first stored feature)."""
    stored = manifest["features"]
    wanted = ["cls", "cls+patch_mean", "cls+registers", "registers"]
    chosen = [spec for spec in wanted if all(part in stored for part in spec.split("+"))]
    return chosen or [next(iter(stored))]


def load_split(directory: str | Path, split: str, features: list[str]):
    """`(matrices, labels, rows)`: `{feature: float32 array (n, width)}` of the split's embedded rows, their labels and
    row ids, in row order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    manifest = read_manifest(directory)
    if split not in manifest["splits"]:
        raise FeatureError(f"{directory} has no split {split!r} (splits: {', '.join(manifest['splits'])}).")
    if not manifest.get("label_column"):
        raise FeatureError(f"{directory} was embedded without labels (--label-column none): nothing to evaluate.")
    parts: dict[str, list] = {name: [] for name in features}
    labels, rows = [], []
    for shard in manifest["splits"][split]["shards"]:
        table = pq.read_table(directory / shard, columns=["row", "label", *features])
        rows.append(table.column("row").to_numpy())
        labels.append(table.column("label").to_numpy())
        for name in features:
            column = table.column(name).combine_chunks()
            width = int(np.prod(manifest["features"][name]))
            values = column
            while pa.types.is_fixed_size_list(values.type) or pa.types.is_list(values.type):
                values = values.flatten()
            parts[name].append(np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width))
    if not rows or sum(len(r) for r in rows) == 0:
        raise FeatureError(f"split {split!r} of {directory} has no embedded rows.")
    return (
        {name: np.concatenate(chunks) for name, chunks in parts.items()},
        np.concatenate(labels).astype(np.int64),
        np.concatenate(rows).astype(np.int64),
    )
