"""The two embedded default models: offline loading, real accuracy, and the README's main command without network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

from vit_registers.data.synthetic import CLASS_NAMES, generate_dataset
from vit_registers.pretrained import MODEL_NAMES, default_model_path, default_models

ROOT = Path(__file__).resolve().parents[1]
CHANCE = 1 / len(CLASS_NAMES)


def test_both_models_ship_with_the_package_and_differ_only_in_registers():
    assert len(default_models()) == 2
    configs = {}
    for registers in MODEL_NAMES:
        path = default_model_path(registers)
        assert (path / "model.safetensors").stat().st_size <= 25 * 1024 * 1024
        assert (path / "README.md").read_text().count("vit-registers study") >= 1  # the card states measured results
        configs[registers] = json.loads((path / "config.json").read_text())
    assert configs[4]["num_register_tokens"] == 4 and configs[0]["num_register_tokens"] == 0
    ignore = {"num_register_tokens", "_name_or_path", "transformers_version"}
    assert {k: v for k, v in configs[4].items() if k not in ignore} == {
        k: v for k, v in configs[0].items() if k not in ignore
    }


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    """A freshly generated test split (seed 0: the held-out backgrounds of the training recipe)."""
    out = tmp_path_factory.mktemp("objects") / "data"
    generate_dataset(out, seed=0, num_train=1, num_validation=1, num_test=12)
    rows = [json.loads(line) for line in (out / "test" / "metadata.jsonl").read_text().splitlines()]
    return out / "test", rows


@pytest.mark.parametrize("registers", sorted(MODEL_NAMES))
def test_models_classify_the_test_split_far_above_chance(registers, test_split):
    from PIL import Image

    folder, rows = test_split
    path = default_model_path(registers)
    model = AutoModelForImageClassification.from_pretrained(path, local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    images = [Image.open(folder / row["file_name"]).convert("RGB") for row in rows]
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    labels = torch.tensor([model.config.label2id[row["label"]] for row in rows])
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    assert accuracy >= 0.6, f"{path.name}: test accuracy {accuracy:.3f} (chance {CHANCE:.3f})"
    base = AutoModel.from_pretrained(path, local_files_only=True)
    assert base(torch.zeros(1, 3, 128, 128)).register_tokens.shape[1] == registers


@pytest.mark.slow
def test_readme_main_command_runs_without_network(tmp_path):
    """The README's first command (after bootstrap) in a network namespace with no network at all."""
    readme = (ROOT / "README.md").read_text()
    command = readme.split("```bash\n", 1)[1].splitlines()[0].split("#")[0].strip()
    assert command.startswith("bash scripts/bootstrap.sh && .venv/bin/vit-registers analyze")
    analyze = command.split("&& ", 1)[1].replace("outputs/demo", str(tmp_path / "demo")).split()
    analyze[0] = str(Path(sys.executable).with_name("vit-registers"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    isolate = ["unshare", "-n"] if shutil.which("unshare") and os.geteuid() == 0 else []
    result = subprocess.run(isolate + analyze, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    stats = json.loads((tmp_path / "demo" / "stats.json").read_text())
    assert stats["model"] == str(default_model_path(4))
    assert len(stats["images"]) == 4 and not stats["errors"]
    for image in stats["images"]:
        for figure in image["figures"].values():
            assert (tmp_path / "demo" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_model_recipe_smoke_trains(tmp_path):
    """The exact recipe of scripts/train_default_models.sh, for 2 steps on a tiny generated dataset."""
    import shlex

    script = (ROOT / "scripts" / "train_default_models.sh").read_text()
    flags = script[script.index("scripts/finetune.py") + len("scripts/finetune.py") : script.index('> "$out')]
    args = shlex.split(flags.replace("\\\n", " ").replace("$name", MODEL_NAMES[4]))
    dataset = tmp_path / "objects"
    generate_dataset(dataset, seed=0, image_size=32, num_train=2, num_validation=1, num_test=1)
    values = dict(zip(args[::2], args[1:][::2]))
    assert values["--model-config"] == f"scripts/default_models/{MODEL_NAMES[4]}.json"
    values.update(
        {
            "--model-config": str(ROOT / values["--model-config"]),
            "--dataset": str(dataset),
            "--output-dir": str(tmp_path / "run"),
            "--per-device-batch-size": "4",
        }
    )
    values.pop("--num-train-epochs")
    command = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--max-steps", "2"]
    for flag, value in values.items():
        command += [flag, value]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    assert log["completed_steps"] == 2 and log["num_register_tokens"] == 4
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "run")
    assert model.config.hidden_size == json.loads((default_model_path(4) / "config.json").read_text())["hidden_size"]
