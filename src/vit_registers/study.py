"""A small-scale version of Darcet et al.'s comparison: the same recipe with and without registers.

For each model of a study (by default the two embedded models, 0 and 4 registers) and a labelled box dataset
(`scripts/make_dataset.py`, split `test`): classification accuracy, LOST CorLoc (Siméoni et al. 2021), per-layer
patch-norm statistics before the final norm (max, median, max/median, fraction above mean + 3σ pooled over the
split — Darcet et al. §2.1), and attention figures of a few images. Every number comes from the analysis library;
`vit-registers study` prints the Markdown table that the README records.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .analysis import figures
from .analysis.corloc import evaluate_corloc
from .analysis.images import ImageError, load_image, prepare_with_processor
from .analysis.norms import group_norms, layer_norms
from .analysis.outliers import outlier_fraction, sigma_threshold
from .analysis.pipeline import analyze_batch


@dataclass
class ModelStudy:
    name: str
    path: str
    num_register_tokens: int
    accuracy: float
    corloc: float | None
    num_images: int
    layers: list[dict] = field(default_factory=list)  # per depth: max, median, max/median, fraction > mean + 3σ
    figures: list[str] = field(default_factory=list)


def _split_rows(dataset: Path, split: str) -> list[dict]:
    metadata = dataset / split / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} not found: give a dataset written by scripts/make_dataset.py.")
    rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
    for row in rows:
        row["path"] = str(dataset / split / row["file_name"])
    return rows


@torch.no_grad()
def study_model(
    path: str | os.PathLike,
    dataset: str | os.PathLike,
    split: str = "test",
    batch_size: int = 32,
    output_dir: str | os.PathLike | None = None,
    num_figures: int = 3,
    limit: int | None = None,
) -> ModelStudy:
    """Accuracy, CorLoc, per-layer patch-norm statistics and attention figures of one classification model."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import vit_registers  # noqa: F401  (Auto classes)

    from .analysis.loading import without_loading_bar

    dataset, path = Path(dataset), str(path)
    with without_loading_bar(path):  # a local directory: its loading bar is noise in the study's output
        classifier = AutoModelForImageClassification.from_pretrained(path).eval()
    processor = AutoImageProcessor.from_pretrained(path)
    config = classifier.config
    rows = _split_rows(dataset, split)[:limit]
    correct, norms_per_depth = 0, None
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        images = [load_image(row["path"]) for row in batch]
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        output = classifier(pixels, output_hidden_states=True)
        labels = torch.tensor([config.label2id[row["label"]] for row in batch])
        correct += int((output.logits.argmax(-1) == labels).sum())
        norms = group_norms(layer_norms(output.hidden_states), config)["patches"]  # (L+1, B, patches)
        norms_per_depth = norms if norms_per_depth is None else torch.cat([norms_per_depth, norms], dim=1)
    layers = []
    for depth, norms in enumerate(norms_per_depth.flatten(1)):
        threshold = sigma_threshold(norms, k=3.0)
        median = float(norms.median())
        layers.append(
            {
                "depth": depth,
                "max_patch_norm": float(norms.max()),
                "median_patch_norm": median,
                "max_over_median": float(norms.max()) / median,
                "outlier_fraction_3sigma": outlier_fraction(norms > threshold),
            }
        )
    base = classifier.base_model
    corloc = evaluate_corloc(base, processor, dataset / split, batch_size=batch_size, progress=False, square=True)
    written = []
    if output_dir is not None and num_figures:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        for row in rows[:num_figures]:
            prepared = prepare_with_processor(load_image(row["path"]), processor, config.patch_size, square=True)
            analysis = analyze_batch(base, prepared.pixel_values[None])[0]
            named = analysis.attention[-1].named_maps()
            name = f"{Path(path).name}_{Path(row['file_name']).stem}"
            for kind, fig in (
                ("attention", figures.attention_figure(prepared.image, named, title=f"{Path(path).name}: attention")),
                ("norms", figures.norm_figure(prepared.image, analysis.patch_norm_map, title=f"{Path(path).name}")),
            ):
                written.append(figures.save_figure(fig, output_dir / f"{name}_{kind}.png"))
    return ModelStudy(
        name=Path(path).name,
        path=path,
        num_register_tokens=config.num_register_tokens,
        accuracy=correct / len(rows),
        corloc=corloc.corloc,
        num_images=len(rows),
        layers=layers,
        figures=written,
    )


def markdown_table(studies: list[ModelStudy]) -> str:
    """The README's results table: one row per model."""
    lines = [
        "| model | registers | test accuracy | CorLoc (LOST) | last-layer max / median patch norm | "
        "patches > mean + 3σ (last layer) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for study in studies:
        last = study.layers[-1]
        corloc = "—" if study.corloc is None else f"{100 * study.corloc:.1f} %"
        lines.append(
            f"| {study.name} | {study.num_register_tokens} | {100 * study.accuracy:.1f} % | {corloc} | "
            f"{last['max_over_median']:.2f} | {100 * last['outlier_fraction_3sigma']:.2f} % |"
        )
    return "\n".join(lines)


def _below(path: str | os.PathLike, base: Path) -> str:
    """`path` relative to `base` when it lies below it, else as given."""
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def portable_record(study: ModelStudy, output_dir: Path) -> dict:
    """`study` for study.json without the paths of the machine that ran it: figures relative to `output_dir`, the
    model relative to the working directory when it lies below it (as the commands were given)."""
    record = asdict(study)
    record["path"] = _below(study.path, Path.cwd())
    record["figures"] = [_below(figure, output_dir) for figure in study.figures]
    return record


def run_study(
    models: list[str],
    dataset: str | os.PathLike,
    output_dir: str | os.PathLike,
    split: str = "test",
    limit: int | None = None,
    num_figures: int = 3,
) -> list[ModelStudy]:
    studies = [
        study_model(model, dataset, split, output_dir=output_dir, limit=limit, num_figures=num_figures)
        for model in models
    ]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = [portable_record(study, output_dir) for study in studies]
    (output_dir / "study.json").write_text(json.dumps(records, indent=2))
    (output_dir / "study.md").write_text(markdown_table(studies) + "\n")
    return studies


__all__ = ["ModelStudy", "study_model", "markdown_table", "run_study", "ImageError"]
