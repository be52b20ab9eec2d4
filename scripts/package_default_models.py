#!/usr/bin/env python
"""Copy the two trained default models into the package (src/vit_registers/pretrained/) with their model cards.

    python scripts/package_default_models.py --runs runs/default-models --dataset data/synthetic-objects

Runs `vit-registers study` on both models, then writes, for each, the weights (safetensors), config, image processor
and code files, `training_log.json` and a model card rendered from `model_cards/default_model.md` with the measured
results. The study report goes to `<runs>/study/`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The code files are not copied: inside the package the installed classes load these models.
KEEP = ("config.json", "model.safetensors", "preprocessor_config.json", "training_log.json")


def training_command(name: str) -> str:
    script = (ROOT / "scripts" / "train_default_models.sh").read_text()
    body = script[script.index("OMP_NUM_THREADS=1") : script.index('> "$out.$name.log"')]
    body = (
        body.replace("\\\n", " ")
        .replace("$name", name)
        .replace("$python", "python")
        .replace('"$out/' + name + '"', f"runs/default-models/{name}")
    )
    return "python scripts/make_dataset.py --output-dir data/synthetic-objects --seed 0\n" + " ".join(body.split())


def layer_table(study) -> str:
    lines = ["| depth | max patch norm | median | max / median | > mean + 3σ |", "|---:|---:|---:|---:|---:|"]
    for layer in study.layers:
        lines.append(
            f"| {layer['depth']} | {layer['max_patch_norm']:.2f} | {layer['median_patch_norm']:.2f} | "
            f"{layer['max_over_median']:.2f} | {100 * layer['outlier_fraction_3sigma']:.2f} % |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "default-models")
    parser.add_argument("--dataset", type=Path, default=ROOT / "data" / "synthetic-objects")
    args = parser.parse_args(argv)

    from huggingface_hub import ModelCard, ModelCardData

    from vit_registers.pretrained import MODEL_NAMES, PRETRAINED_DIR
    from vit_registers.study import markdown_table, run_study

    runs = {registers: args.runs / name for registers, name in MODEL_NAMES.items()}
    missing = [str(path) for path in runs.values() if not (path / "model.safetensors").exists()]
    if missing:
        print(f"package_default_models.py: error: no trained model in {', '.join(missing)}", file=sys.stderr)
        return 2
    studies = run_study([str(runs[0]), str(runs[4])], args.dataset, args.runs / "study")
    results = markdown_table(studies)
    for study in studies:
        registers = study.num_register_tokens
        name, source = MODEL_NAMES[registers], runs[registers]
        target = PRETRAINED_DIR / name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for file in KEEP:
            shutil.copy2(source / file, target / file)
        config = json.loads((source / "config.json").read_text())
        log = json.loads((source / "training_log.json").read_text())
        summary = (
            f"{log.get('completed_steps')} steps, global batch {log.get('global_batch_size')}, "
            f"{log.get('train_seconds', 0) / 60:.1f} min on a 2-core CPU (one thread per model, both in parallel). "
            f"Final validation accuracy {100 * log['final_metrics'].get('eval_accuracy', float('nan')):.1f} %."
        )
        architecture = (
            f"patch {config['patch_size']}, image {config['image_size']}, width {config['hidden_size']}, "
            f"{config['num_hidden_layers']} layers, {config['num_attention_heads']} heads, MLP ratio "
            f"{config['mlp_ratio']}, LayerScale {config['layerscale_value']}, CLS pooling, "
            f"{registers} registers, a linear classifier over {len(config['id2label'])} classes."
        )
        card_data = ModelCardData(
            license="apache-2.0",
            library_name="transformers",
            pipeline_tag="image-classification",
            tags=["vit-registers", "vision-transformer", "registers", "image-classification"],
            datasets=["synthetic-objects (scripts/make_dataset.py)"],
        )
        card = ModelCard.from_template(
            card_data,
            template_path=str(ROOT / "model_cards" / "default_model.md"),
            model_name=name,
            twin_name=MODEL_NAMES[4 - registers],
            num_register_tokens=registers,
            architecture=architecture,
            training_command=training_command(name),
            training_summary=summary,
            results_table=results,
            layer_table=layer_table(study),
        )
        card.save(target / "README.md")
        print(f"wrote {target}")
    print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
