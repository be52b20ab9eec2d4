"""`vit-registers study` on a small generated dataset: every number is computed and consistent."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import BitImageProcessor

from vit_registers import ViTRegistersConfig, ViTRegistersForImageClassification
from vit_registers.cli import main
from vit_registers.data.synthetic import CLASS_NAMES, generate_dataset


def test_study_reports_accuracy_corloc_and_norm_statistics(tmp_path, capsys):
    dataset = tmp_path / "objects"
    generate_dataset(dataset, seed=1, image_size=32, num_train=1, num_validation=1, num_test=2)
    paths = []
    for registers in (0, 4):
        torch.manual_seed(registers)
        config = ViTRegistersConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_register_tokens=registers,
            id2label=dict(enumerate(CLASS_NAMES)),
            label2id={name: i for i, name in enumerate(CLASS_NAMES)},
        )
        path = tmp_path / f"model-reg{registers}"
        ViTRegistersForImageClassification(config).save_pretrained(path)
        BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
        paths.append(str(path))
    out = tmp_path / "study"
    code = main(["study", "--models", *paths, "--dataset", str(dataset), "--output-dir", str(out), "--figures", "1"])
    captured = capsys.readouterr()
    printed = captured.out
    assert "Loading weights" not in captured.err  # no third-party loading bars for the local models
    assert code == 0
    results = json.loads((out / "study.json").read_text())
    assert [r["num_register_tokens"] for r in results] == [0, 4]
    for result in results:
        assert result["num_images"] == 2 * len(CLASS_NAMES)
        assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["corloc"] <= 1.0
        assert len(result["layers"]) == 3  # embeddings + 2 layers
        assert all(layer["max_patch_norm"] >= layer["median_patch_norm"] > 0 for layer in result["layers"])
        # no paths of the machine that ran it: figures relative to the output folder
        assert len(result["figures"]) == 2 and all((out / figure).exists() for figure in result["figures"])
        assert not any(Path(figure).is_absolute() for figure in result["figures"])
    assert "| model-reg4 | 4 |" in printed and (out / "study.md").read_text().strip() in printed
