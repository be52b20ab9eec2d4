"""scripts/finetune.py and vit_registers.training (issue 5): optimiser groups, register surgery, data validation,
learning, several real processes, and kill/resume fault tolerance.

Data are crops of scikit-image photos written as image folders (one class per photo); models are tiny
(hidden 32, 2 layers, patch 8, 32 px images).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vit_registers  # noqa: F401 - Auto registration
from vit_registers import ViTRegistersConfig, ViTRegistersForImageClassification
from vit_registers.training import add_register_tokens, create_optimizer, create_scheduler, parameter_groups
from vit_registers.training.toy_data import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "finetune.py"
CONFIGS = ROOT / "scripts" / "accelerate_configs"
BIN = Path(sys.executable).parent
TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
NO_DROPOUT = dict(TINY, num_register_tokens=2, drop_path_rate=0.0, hidden_dropout_prob=0.0)
CLASSES = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"), raising=False)


def _env(tmp_path, **extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _script_module():
    spec = importlib.util.spec_from_file_location("finetune_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _run_inprocess(argv, capsys):
    """Run the script's `main` in this process (fresh Accelerate state: each run may ask for other settings);
    `(exit code, stderr)`."""
    code, _, err = _run_inprocess_with_output(argv, capsys)
    return code, err


def _run(argv, tmp_path, launcher=(sys.executable,), **env):
    return subprocess.run(
        [*launcher, str(SCRIPT), *map(str, argv)],
        cwd=ROOT,
        env=_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _start(argv, tmp_path, **env):
    """Start the script in the background; stderr goes to a file (`process.stderr_path`) read on failure."""
    stderr_path = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *map(str, argv)],
            cwd=ROOT,
            env=_env(tmp_path, **env),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    process.stderr_path = stderr_path
    return process


def _finish(process):
    process.wait(timeout=300)
    assert process.returncode == 0, process.stderr_path.read_text()[-3000:]


def _config_json(tmp_path, values, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return path


def _weights(directory):
    return load_file(Path(directory) / "model.safetensors")


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# --------------------------------------------------------------------------------------------------------------------
# Optimiser


def test_training_images_are_converted_by_the_analysis_to_rgb(tmp_path):
    """RGBA images (alpha composited on white, not dropped as by PIL's plain convert) and 16-bit "I;16" images
    (rescaled, not clipped) reach the training transforms exactly as `vit_registers.analysis.to_rgb` converts them,
    whether they come as PIL images, paths or `datasets` dicts of bytes, through `TransformedDataset` and
    `hf_transform` alike."""
    import io

    import numpy as np
    from PIL import Image

    from vit_registers.analysis import to_rgb
    from vit_registers.training import TransformedDataset, build_transforms, hf_transform
    from vit_registers.training.data import training_image
    from vit_registers.training.loop import default_image_processor

    generator = np.random.default_rng(0)
    rgba = Image.fromarray(generator.integers(0, 256, (40, 36, 4), dtype=np.uint8), mode="RGBA")
    deep = Image.fromarray(generator.integers(0, 65536, (40, 36), dtype=np.uint16))
    assert deep.mode == "I;16"
    for image in (rgba, deep):
        expected = np.asarray(to_rgb(image))
        assert not np.array_equal(expected, np.asarray(image.convert("RGB")))  # the conversion matters here
        path = tmp_path / f"{image.mode.replace(';', '')}.png"
        image.save(path)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        for source in (image, path, str(path), {"bytes": buffer.getvalue(), "path": None}, {"path": str(path)}):
            converted = training_image(source)
            assert converted.mode == "RGB" and np.array_equal(np.asarray(converted), expected), (image.mode, source)

    transform = build_transforms(default_image_processor(ViTRegistersConfig(**TINY)), train=False)
    expected = [transform(to_rgb(image)) for image in (rgba, deep)]
    dataset = TransformedDataset([{"image": rgba, "label": 0}, {"image": deep, "label": 1}], transform)
    for index, pixels in enumerate(expected):
        assert torch.equal(dataset[index]["pixel_values"], pixels)
    batch = hf_transform(default_image_processor(ViTRegistersConfig(**TINY)), train=False)(
        {"image": [rgba, deep], "label": [0, 1]}
    )
    for produced, pixels in zip(batch["pixel_values"], expected):
        assert torch.equal(produced, pixels)


def test_parameter_groups_no_decay_on_tokens_norms_biases_and_layer_decay():
    config = ViTRegistersConfig(**TINY, num_register_tokens=2, num_labels=3)
    model = ViTRegistersForImageClassification(config)
    groups = parameter_groups(model, learning_rate=1.0, weight_decay=0.1, layer_decay=0.5)
    by_name = {name: group for group in groups for name in group["names"]}
    assert set(by_name) == {n for n, p in model.named_parameters()}
    for name in by_name:
        exempt = any(
            key in name
            for key in (
                "cls_token",
                "register_tokens",
                "position_embeddings",
                "mask_token",
                "norm",
                "bias",
                "layer_scale",
            )
        )
        assert (by_name[name]["weight_decay"] == 0.0) == exempt, name
    # Layer-wise decay: embeddings/tokens at 0.5^3, block i at 0.5^(2-i), head and final norm at 1.
    assert by_name["vit_registers.embeddings.register_tokens"]["lr"] == pytest.approx(0.125)
    assert by_name["vit_registers.embeddings.patch_embeddings.projection.weight"]["lr"] == pytest.approx(0.125)
    assert by_name["vit_registers.encoder.layer.0.attention.qkv.weight"]["lr"] == pytest.approx(0.25)
    assert by_name["vit_registers.encoder.layer.1.mlp.fc1.weight"]["lr"] == pytest.approx(0.5)
    assert by_name["classifier.weight"]["lr"] == pytest.approx(1.0)
    assert by_name["vit_registers.layernorm.weight"]["lr"] == pytest.approx(1.0)

    optimizer = create_optimizer(model, learning_rate=1e-3, weight_decay=0.1, layer_decay=0.5)
    scheduler = create_scheduler(optimizer, warmup_steps=2, total_steps=10)
    head = next(g for g in optimizer.param_groups if "classifier.weight" in g["names"])
    stem = next(g for g in optimizer.param_groups if "vit_registers.embeddings.cls_token" in g["names"])
    seen = []
    for _ in range(10):
        seen.append(head["lr"])
        assert stem["lr"] == pytest.approx(head["lr"] * 0.125)
        optimizer.step()
        scheduler.step()
    assert seen[0] == 0.0 and seen[2] == pytest.approx(1e-3)  # warm-up, then the peak
    assert all(a >= b for a, b in zip(seen[2:], seen[3:]))  # cosine decay
    assert seen[-1] < 1e-4

    model.vit_registers.requires_grad_(False)
    names = {n for g in parameter_groups(model, 1.0) for n in g["names"]}
    assert names == {"classifier.weight", "classifier.bias"}
    with pytest.raises(ValueError, match="layer_decay"):
        parameter_groups(model, 1.0, layer_decay=0.0)


def test_create_optimizer_takes_the_fused_adamw_where_torch_has_it_with_the_same_updates():
    """Fused AdamW (transformers' `Trainer` default) on the CPU, foreach on a device without fused kernels or when
    asked; the same layer-decay groups and, after 5 steps, the same weights as the foreach one within 1e-5 (float32
    rounding, amplified where a gradient is near AdamW's eps; one step moves a weight by up to 1e-3)."""

    def build():
        torch.manual_seed(0)
        return ViTRegistersForImageClassification(ViTRegistersConfig(**TINY, num_register_tokens=2, num_labels=3))

    x, labels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    weights = {}
    for fused in (None, False):
        model = build()
        optimizer = create_optimizer(model, learning_rate=1e-3, weight_decay=0.1, layer_decay=0.5, fused=fused)
        assert optimizer.defaults["fused"] is (fused is None)
        assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in parameter_groups(model, 1e-3, 0.1, 0.5)]
        for _ in range(5):
            optimizer.zero_grad()
            model(pixel_values=x, labels=labels).loss.backward()
            optimizer.step()
        weights[fused] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    initial = build().state_dict()
    for key, value in weights[None].items():
        assert (value - weights[False][key]).abs().max() <= 1e-5, key
    assert (weights[None]["classifier.weight"] - initial["classifier.weight"]).abs().max() > 1e-3  # they moved

    on_meta = ViTRegistersForImageClassification(ViTRegistersConfig(**TINY, num_labels=3)).to("meta")
    assert not create_optimizer(on_meta, learning_rate=1e-3).defaults["fused"]  # meta has no fused kernels


# --------------------------------------------------------------------------------------------------------------------
# Registers


def test_add_register_tokens_with_and_without_cls(tmp_path):
    torch.manual_seed(0)
    config = ViTRegistersConfig(**TINY, num_register_tokens=0, num_labels=2)
    model = ViTRegistersForImageClassification(config).eval()
    embeddings = model.vit_registers.embeddings
    assert embeddings.register_tokens is None
    assert add_register_tokens(model, 3) == 3
    assert model.config.num_register_tokens == 3
    tokens = embeddings.register_tokens
    assert tokens.shape == (1, 3, 32) and tokens.requires_grad
    cls_input = embeddings.cls_token + embeddings.position_embeddings[:, :1]
    offset = (tokens - cls_input).detach()
    assert offset.abs().max() <= 2 * config.initializer_range + 1e-7  # CLS input + truncated-normal noise
    assert offset.std() > 0.2 * config.initializer_range
    assert not torch.allclose(tokens[:, 0], tokens[:, 1])  # registers differ from each other
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = model.vit_registers(pixels)
        logits = model(pixels).logits
    assert outputs.register_tokens.shape == (2, 3, 32) and outputs.patch_tokens.shape == (2, 16, 32)
    model.save_pretrained(tmp_path / "m")
    reloaded = ViTRegistersForImageClassification.from_pretrained(tmp_path / "m").eval()
    assert reloaded.config.num_register_tokens == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, logits)

    # Existing registers are kept, new ones appended; fewer is refused.
    before = embeddings.register_tokens.detach().clone()
    assert add_register_tokens(model, 5) == 2
    torch.testing.assert_close(embeddings.register_tokens[:, :3].detach(), before)
    assert add_register_tokens(model, 5) == 0
    with pytest.raises(ValueError, match="already has 5 registers"):
        add_register_tokens(model, 4)

    # No CLS token (timm *_gap_* layout): plain truncated normal of std initializer_range.
    gap = ViTRegistersForImageClassification(
        ViTRegistersConfig(
            **TINY,
            num_register_tokens=0,
            use_cls_token=False,
            cls_token_has_position_embedding=False,
            pooling="mean",
            num_labels=2,
            initializer_range=0.02,
        )
    )
    add_register_tokens(gap, 4)
    fresh = gap.vit_registers.embeddings.register_tokens.detach()
    assert fresh.abs().max() <= 0.04 + 1e-7 and 0.005 < fresh.std() < 0.03
    assert gap(pixels).logits.shape == (2, 2)


def test_add_register_tokens_to_rope_models_and_refused_over_stored_register_positions():
    torch.manual_seed(0)
    rope = ViTRegistersForImageClassification(
        ViTRegistersConfig(**TINY, num_register_tokens=4, position_encoding="rope", num_labels=2)
    ).eval()
    assert rope.vit_registers.embeddings.position_embeddings is None  # DINOv3 style: no stored position embeddings
    assert add_register_tokens(rope, 6) == 2
    with torch.no_grad():
        outputs = rope.vit_registers(torch.randn(2, 3, 32, 32))
    assert outputs.register_tokens.shape == (2, 6, 32) and outputs.patch_tokens.shape == (2, 16, 32)

    covered = ViTRegistersForImageClassification(
        ViTRegistersConfig(
            **TINY,
            num_register_tokens=4,
            use_cls_token=False,
            cls_token_has_position_embedding=False,
            register_tokens_have_position_embedding=True,
            pooling="mean",
            num_labels=2,
        )
    )
    assert covered.vit_registers.embeddings.position_embeddings.shape[1] == 4 + 16
    with pytest.raises(ValueError, match="stored position embeddings"):
        add_register_tokens(covered, 5)
    assert covered.config.num_register_tokens == 4


# --------------------------------------------------------------------------------------------------------------------
# Bad input: clear one-line errors before training starts


@pytest.fixture()
def folders(tmp_path):
    train = make_image_folder(tmp_path / "train", classes=CLASSES[:2], per_class=4, size=32)
    return train


def test_bad_inputs_fail_before_training_with_clear_errors(tmp_path, folders, capsys):
    out = tmp_path / "out"
    base = ["--output-dir", out, "--max-steps", 2, "--per-device-batch-size", 4]
    tiny = ["--model", "config:tiny"]

    def fails(argv, *needles):
        code, err = _run_inprocess([*base, *argv], capsys)
        assert code == 2, err
        line = err.strip().splitlines()[-1]
        assert line.startswith("finetune.py: error:"), err
        for needle in needles:
            assert needle in line, (needle, line)
        assert not (out / "model.safetensors").exists()
        return line

    fails([*tiny, "--train-dir", tmp_path / "missing"], "train directory", "missing", "does not exist")
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "cat" / "notes.txt").write_text("not an image")
    fails([*tiny, "--train-dir", empty], "contains no images", str(empty / "cat"))
    (tmp_path / "flat").mkdir()
    fails([*tiny, "--train-dir", tmp_path / "flat"], "no class sub-folders")
    broken = make_image_folder(tmp_path / "broken", classes=CLASSES[:2], per_class=3, size=32)
    (broken / "coffee" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    fails([*tiny, "--train-dir", broken], "unreadable", "corrupt.jpg", "coffee")
    fails([*tiny, "--train-dir", folders, "--validation-dir", tmp_path / "nope"], "validation directory", "nope")

    # --dataset: a local image folder read by `datasets`, with columns `image` and `label`.
    fails([*tiny, "--dataset", folders, "--image-column", "img"], "image column 'img' not found", "image, label")
    fails([*tiny, "--dataset", folders, "--label-column", "fine_label"], "label column 'fine_label' not found")

    # --model that is not a vit_registers (or convertible) checkpoint.
    fails(["--model", tmp_path / "no-model", "--train-dir", folders], "no-model")
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    fails(["--model", not_model, "--train-dir", folders], "not a model directory")
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
    )
    ViTForImageClassification(vit).save_pretrained(tmp_path / "vit")
    fails(["--model", tmp_path / "vit", "--train-dir", folders], "'vit' checkpoint", "not 'vit_registers'")
    fails(["--model", "config:huge", "--train-dir", folders], "config:huge")
    fails(
        [
            "--model-config",
            _config_json(tmp_path, {"hidden_size": 30, "num_attention_heads": 4}),
            "--train-dir",
            folders,
        ],
        "hidden_size",
    )
    fails([*tiny, "--train-dir", folders, "--resume-from-checkpoint", "latest"], "no checkpoint")
    fails([*tiny, "--train-dir", folders, "--resume-from-checkpoint", tmp_path / "gone"], "gone", "not a directory")
    fails([*tiny, "--train-dir", folders, "--learning-rate", "-1"], "--learning-rate")


def test_cli_error_is_one_line_without_traceback(tmp_path, folders):
    result = _run(["--model", "org/not-a-model", "--train-dir", folders, "--output-dir", tmp_path / "o"], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[-1]] and "org/not-a-model" in errors[-1], result.stderr


# --------------------------------------------------------------------------------------------------------------------
# Training runs


def test_script_learns_separable_classes_and_saves_everything(tmp_path):
    train = make_image_folder(tmp_path / "train", classes=CLASSES, per_class=16, size=32, seed=0)
    val = make_image_folder(tmp_path / "val", classes=CLASSES, per_class=6, size=32, seed=1)
    out = tmp_path / "out"
    result = _run(
        [
            "--model",
            "config:tiny",
            "--train-dir",
            train,
            "--validation-dir",
            val,
            "--output-dir",
            out,
            "--max-steps",
            36,
            "--per-device-batch-size",
            16,
            "--learning-rate",
            3e-3,
            "--warmup-steps",
            3,
            "--seed",
            0,
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = json.loads((out / "training_log.json").read_text())
    assert log["num_processes"] == 1 and log["completed_steps"] == 36
    assert len(log["eval"]) == 9  # evaluated after each of the 9 epochs (64 images / 16 = 4 steps per epoch)
    accuracy = log["final_metrics"]["eval_accuracy"]
    assert accuracy >= 0.6, log["eval"]  # chance is 0.25
    losses = [loss for _, loss in log["train_loss"]]
    assert sum(losses[-4:]) < sum(losses[:4])

    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "learning_rate | 0.003" in card and "eval_accuracy" in card
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from vit_registers.training import TransformedDataset, build_transforms, collate, load_classification_data

    model = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    assert model.config.id2label == dict(enumerate(sorted(CLASSES)))
    data = load_classification_data(train_dir=str(train), validation_dir=str(val))
    batch = collate(list(TransformedDataset(data.validation, build_transforms(processor, train=False))))
    with torch.no_grad():
        predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(-1)
    assert (predictions == batch["labels"]).float().mean().item() == pytest.approx(accuracy)


def test_adding_registers_and_linear_probe_train_and_reload(tmp_path, capsys):
    """From a checkpoint without registers: add 2 (trained), then a linear probe on a parquet `--dataset`."""
    import datasets
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    source = tmp_path / "no-registers"
    config = ViTRegistersConfig(**TINY, num_register_tokens=0, num_labels=2)
    ViTRegistersForImageClassification(config).save_pretrained(source)
    train = make_image_folder(tmp_path / "train", classes=CLASSES[:3], per_class=8, size=32)

    out = tmp_path / "registers"
    code, err = _run_inprocess(
        [
            "--model",
            source,
            "--train-dir",
            train,
            "--output-dir",
            out,
            "--max-steps",
            4,
            "--per-device-batch-size",
            8,
            "--num-register-tokens",
            2,
            "--learning-rate",
            1e-2,
        ],
        capsys,
    )
    assert code == 0, err
    log = json.loads((out / "training_log.json").read_text())
    assert log["registers_added"] == 2 and log["num_register_tokens"] == 2
    # the script trains with the oneDNN CPU kernels where this CPU has them, as the `vit-registers` command runs
    from vit_registers.onednn import _ONEDNN_LINEAR, onednn_policy

    policy = onednn_policy()
    expected = TINY["num_hidden_layers"] if _ONEDNN_LINEAR is not None and (policy.inference or policy.training) else 0
    assert log["cpu_kernel_layers"] == expected
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.num_register_tokens == 2 and model.config.num_labels == 3
    registers = model.vit_registers.embeddings.register_tokens
    original = ViTRegistersForImageClassification.from_pretrained(source).vit_registers.embeddings
    start = original.cls_token + original.position_embeddings[:, :1]
    assert (registers - start).abs().max() > 2 * config.initializer_range  # moved beyond the initial noise: trained
    assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 3)

    # Linear probe on a `datasets` parquet dataset with non-default column names.
    loaded = datasets.load_dataset("imagefolder", data_dir=str(train), split="train")
    loaded = loaded.rename_columns({"image": "img", "label": "fine_label"})
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    loaded.to_parquet(str(parquet / "train.parquet"))
    probe = tmp_path / "probe"
    code, err = _run_inprocess(
        [
            "--model",
            out,
            "--dataset",
            parquet,
            "--image-column",
            "img",
            "--label-column",
            "fine_label",
            "--output-dir",
            probe,
            "--max-steps",
            3,
            "--per-device-batch-size",
            8,
            "--linear-probe",
            "--learning-rate",
            1e-2,
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads((probe / "training_log.json").read_text())["cpu_kernel_layers"] == expected
    before, after = _weights(out), _weights(probe)
    backbone = [k for k in before if not k.startswith("classifier.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)  # frozen
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])  # trained
    log = json.loads((probe / "training_log.json").read_text())
    assert log["trainable_parameters"] == 3 * 32 + 3
    reloaded = AutoModelForImageClassification.from_pretrained(probe)
    assert torch.equal(reloaded.classifier.weight.detach(), after["classifier.weight"])


@pytest.mark.slow
def test_two_real_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """`accelerate launch` of 2 real CPU processes (gloo, cpu_multiprocess.yaml): 2 × 4 per device vs 1 × 8.

    Tolerance: DDP averages float32 gradients in a different order than one big batch, so updates differ by
    rounding only; after 6 AdamW steps at lr 1e-3 every weight agrees within 1e-4 (a tenth of one step's size).
    """
    train = make_image_folder(tmp_path / "train", classes=CLASSES, per_class=8, size=32, seed=0)
    config = _config_json(tmp_path, NO_DROPOUT)
    common = [
        "--model-config",
        config,
        "--train-dir",
        train,
        "--max-steps",
        6,
        "--learning-rate",
        1e-3,
        "--seed",
        3,
        "--checkpointing-steps",
        100,
    ]
    one = _run([*common, "--output-dir", tmp_path / "one", "--per-device-batch-size", 8], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    # The shipped config = `--multi_gpu --num_processes 2` + ACCELERATE_USE_CPU=true (`--cpu` starts one process).
    import socket

    with socket.socket() as probe:  # a free rendezvous port, so concurrent launches cannot collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = (
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        str(CONFIGS / "cpu_multiprocess.yaml"),
        "--main_process_port",
        str(port),
    )
    two = _run(
        [*common, "--output-dir", tmp_path / "two", "--per-device-batch-size", 4],
        tmp_path,
        launcher=launcher,
        ACCELERATE_USE_CPU="true",
    )
    assert two.returncode == 0, two.stderr[-3000:]
    log_one = json.loads((tmp_path / "one" / "training_log.json").read_text())
    log_two = json.loads((tmp_path / "two" / "training_log.json").read_text())
    assert log_one["num_processes"] == 1 and log_two["num_processes"] == 2
    assert log_one["global_batch_size"] == log_two["global_batch_size"] == 8
    assert log_two["completed_steps"] == 6 and "MULTI_CPU" in log_two["distributed_type"]
    for (s1, l1), (s2, l2) in zip(log_one["train_loss"], log_two["train_loss"], strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-5)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    assert _max_diff(a, b) <= 1e-4


@pytest.mark.slow
def test_sigkill_then_resume_latest_matches_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL after its first checkpoint and resumed with `--resume-from-checkpoint latest`
    ends with the weights of an uninterrupted run (≤ 1e-6), dropout and drop path included."""
    train = make_image_folder(tmp_path / "train", classes=CLASSES[:2], per_class=12, size=32, seed=0)
    config = _config_json(tmp_path, dict(TINY, num_register_tokens=2, drop_path_rate=0.1, hidden_dropout_prob=0.1))
    common = [
        "--model-config",
        config,
        "--train-dir",
        train,
        "--max-steps",
        30,
        "--per-device-batch-size",
        8,
        "--learning-rate",
        1e-3,
        "--seed",
        5,
        "--checkpointing-steps",
        4,
    ]
    killed = tmp_path / "killed"
    # The uninterrupted reference runs at the same time (own datasets cache).
    straight = _start(
        [*common, "--output-dir", tmp_path / "straight"], tmp_path, HF_DATASETS_CACHE=str(tmp_path / "c2")
    )
    process = _start([*common, "--output-dir", killed], tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoints" / "step_4").is_dir():
            assert process.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()  # really interrupted mid-training
    steps = sorted(int(p.name.split("_")[1]) for p in (killed / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps and steps[-1] < 30

    resumed = _run([*common, "--output-dir", killed, "--resume-from-checkpoint", "latest"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _finish(straight)
    log = json.loads((killed / "training_log.json").read_text())
    assert log["resumed_from"].endswith(f"step_{steps[-1]}") and log["completed_steps"] == 30
    # 24 images / 8 = 3 steps per epoch: the checkpoint at step 4 resumes mid-epoch.
    assert _max_diff(_weights(killed), _weights(tmp_path / "straight")) <= 1e-6
    reference = json.loads((tmp_path / "straight" / "training_log.json").read_text())
    losses = [loss for _, loss in log["train_loss"]]
    assert losses == pytest.approx([loss for _, loss in reference["train_loss"]], abs=1e-6)
    assert math.isfinite(log["final_metrics"]["train_loss"])


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {
        "cpu_multiprocess.yaml": DistributedType.MULTI_GPU,  # + ACCELERATE_USE_CPU=true, see the file
        "ddp.yaml": DistributedType.MULTI_GPU,
        "fsdp.yaml": DistributedType.FSDP,
        "deepspeed.yaml": DistributedType.DEEPSPEED,
    }
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(expected)
    for name, kind in expected.items():
        config = load_config_from_file(str(CONFIGS / name))
        assert config.distributed_type == kind, name
        assert config.num_processes >= 2 and config.compute_environment.value == "LOCAL_MACHINE"
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "ViTRegistersLayer"
    from vit_registers.modeling_vit_registers import ViTRegistersLayer  # the class FSDP wraps exists

    assert ViTRegistersLayer.__name__ == fsdp["fsdp_transformer_layer_cls_to_wrap"]
    assert "gradient_accumulation_steps" not in load_config_from_file(str(CONFIGS / "deepspeed.yaml")).deepspeed_config


def test_bf16_gradient_checkpointing_accumulation_and_push_to_hub(tmp_path, folders, capsys, hub_server):
    """The push goes over real HTTP to the local Hub-compatible server (tests/hub_server.py)."""
    from huggingface_hub import HfApi, snapshot_download

    from vit_registers.training.loop import FinetuneConfig, prepare_model_for_training

    model = ViTRegistersForImageClassification(ViTRegistersConfig(**TINY, num_labels=2))
    options = FinetuneConfig(output_dir="unused", model="x", gradient_checkpointing=True)
    summary = prepare_model_for_training(model, options)
    assert all(layer.gradient_checkpointing for layer in model.vit_registers.encoder.layer)
    assert not model.vit_registers.embeddings.mask_token.requires_grad  # unused by classification (DDP-safe)
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.parameters()) - 32

    out = tmp_path / "bf16"
    code, err = _run_inprocess(
        [
            "--model",
            "config:tiny",
            "--train-dir",
            folders,
            "--output-dir",
            out,
            "--max-steps",
            2,
            "--per-device-batch-size",
            2,
            "--gradient-accumulation-steps",
            2,
            "--mixed-precision",
            "bf16",
            "--gradient-checkpointing",
            "--checkpointing-steps",
            1,
            "--push-to-hub",
            "test-user/tiny-registers",
        ],
        capsys,
    )
    assert code == 0, err
    files = set(HfApi().list_repo_files("test-user/tiny-registers"))
    assert {"model.safetensors", "README.md", "config.json", "preprocessor_config.json"} <= files
    assert not any(name.startswith("checkpoints/") for name in files)  # training state stays local
    assert "test-user/tiny-registers" in (out / "README.md").read_text()
    downloaded = snapshot_download("test-user/tiny-registers", cache_dir=tmp_path / "download")
    assert (Path(downloaded) / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    log = json.loads((out / "training_log.json").read_text())
    assert log["global_batch_size"] == 4 and log["steps_per_epoch"] == 2 and log["completed_steps"] == 2
    assert all(math.isfinite(loss) for _, loss in log["train_loss"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1", "step_2"]  # no partial folder left
    assert all(v.dtype == torch.float32 for v in _weights(out).values())


def test_transformers_dinov2_checkpoint_is_converted_then_finetuned(tmp_path, capsys):
    """`--model` may be a transformers Dinov2WithRegisters directory: it is converted (weights equal) and trained."""
    import transformers
    from transformers import AutoModelForImageClassification

    from vit_registers.conversion import convert

    torch.manual_seed(0)
    hf_config = transformers.Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, num_register_tokens=2
    )
    source = tmp_path / "dinov2-registers"
    transformers.Dinov2WithRegistersModel(hf_config).save_pretrained(source)
    train = make_image_folder(tmp_path / "train", classes=CLASSES[:2], per_class=6, size=32)
    out = tmp_path / "finetuned"
    code, printed, err = _run_inprocess_with_output(
        ["--model", source, "--train-dir", train, "--output-dir", out, "--max-steps", 2, "--per-device-batch-size", 4],
        capsys,
    )
    assert code == 0, err
    assert "the official DINOv2 formula for models with registers, which transformers'" in printed  # named
    converted = convert("transformers", source)
    saved = ViTRegistersForImageClassification.from_pretrained(out / "converted-model").vit_registers
    torch.testing.assert_close(saved.embeddings.register_tokens, converted.embeddings.register_tokens)
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.model_type == "vit_registers" and model.config.num_register_tokens == 2


# --------------------------------------------------------------------------------------------------------------------
# Image size, linear-probe defaults, logged learning rate, file modes (issue 24)


def _run_inprocess_with_output(argv, capsys):
    """The script's `main` in this process with a fresh Accelerate state: `(exit code, stdout, stderr)`."""
    _reset_accelerate()
    try:
        code = _script_module().main([str(a) for a in argv])
    finally:
        _reset_accelerate()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_image_size_peak_learning_rate_and_validation_are_shown_and_files_are_0644(tmp_path, capsys):
    """`--image-size` sets what training and validation see (printed at the start, in the log, the card and the saved
    processor); the logged learning rate is the peak under layer decay; validation has a progress bar; weights,
    checkpoints included, are written 0644 like the other files (safetensors alone would give 0600)."""
    train = make_image_folder(tmp_path / "train", classes=CLASSES[:2], per_class=4, size=40, seed=0)
    val = make_image_folder(tmp_path / "val", classes=CLASSES[:2], per_class=2, size=40, seed=1)
    out = tmp_path / "out"
    argv = ["--model", "config:tiny", "--train-dir", train, "--validation-dir", val, "--output-dir", out]
    argv += ["--max-steps", 2, "--per-device-batch-size", 4, "--learning-rate", 1e-3, "--layer-decay", 0.5]
    umask = os.umask(0o022)
    try:
        code, printed, err = _run_inprocess_with_output([*argv, "--image-size", 48, "--checkpointing-steps", 1], capsys)
    finally:
        os.umask(umask)
    assert code == 0, err
    log = json.loads((out / "training_log.json").read_text())
    assert log["image_size"] == [48, 48] and log["optimizer"] == "AdamW" and log["layer_decay"] == 0.5
    assert log["learning_rates"] == [[1, pytest.approx(1e-3)], [2, pytest.approx(5e-4)]]  # cosine, 2 steps
    assert "48×48 px in training and validation" in printed
    assert "peak learning rate 0.001, layer decay 0.5 (embeddings at 0.000125)" in printed
    assert "validation" in err  # the progress bar (tqdm writes to stderr)
    for noise in ("Writing model shards", "Generating train split"):  # third-party bars for local files: off
        assert noise not in err
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 48, "width": 48}
    assert processor["size"] == {"shortest_edge": round(37 * 48 / 32)}  # the default resize/crop ratio, 37 / 32
    assert "| image_size | 48×48 |" in (out / "README.md").read_text()
    for path in [out / "model.safetensors", out / "config.json", *(out / "checkpoints").rglob("*.safetensors")]:
        assert path.stat().st_mode & 0o777 == 0o644, path

    code, err = _run_inprocess([*argv[:-2], "--output-dir", tmp_path / "bad", "--image-size", 50], capsys)
    assert code == 2 and "--image-size 50 is not a multiple of the patch size 8" in err


def test_linear_probe_defaults_to_dino_linear_evaluation(tmp_path, capsys):
    """Without --learning-rate a probe trains like DINO's linear evaluation: SGD with momentum 0.9, no weight decay,
    learning rate 0.1 × global batch / 256 (cosine); explicit values still win."""
    from vit_registers.training.optim import create_linear_probe_optimizer, linear_probe_learning_rate

    assert linear_probe_learning_rate(1024) == pytest.approx(0.4)
    model = ViTRegistersForImageClassification(ViTRegistersConfig(**TINY, num_labels=3))
    model.vit_registers.requires_grad_(False)
    optimizer = create_linear_probe_optimizer(model, 0.1)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.0}

    train = make_image_folder(tmp_path / "train", classes=CLASSES[:2], per_class=4, size=32, seed=0)
    argv = ["--model", "config:tiny", "--train-dir", train, "--max-steps", 2, "--per-device-batch-size", 8]
    code, err = _run_inprocess([*argv, "--output-dir", tmp_path / "probe", "--linear-probe"], capsys)
    assert code == 0, err
    log = json.loads((tmp_path / "probe" / "training_log.json").read_text())
    assert log["optimizer"].startswith("SGD") and log["weight_decay"] == 0.0 and log["layer_decay"] == 1.0
    assert log["learning_rate"] == pytest.approx(0.1 * 8 / 256) == log["learning_rates"][0][1]
    code, err = _run_inprocess(
        [*argv, "--output-dir", tmp_path / "probe-lr", "--linear-probe", "--learning-rate", 0.05], capsys
    )
    assert code == 0, err
    assert json.loads((tmp_path / "probe-lr" / "training_log.json").read_text())["learning_rate"] == 0.05
    code, err = _run_inprocess([*argv, "--output-dir", tmp_path / "x", "--linear-probe", "--layer-decay", 0.7], capsys)
    assert code == 2 and "--layer-decay does not apply to --linear-probe" in err


def test_transformers_dinov2_directory_gets_the_processor_convert_writes(tmp_path):
    """A transformers DINOv2 directory without a processor (the real DINOv2-S weights of ../shared) trains at 224 px,
    the size `scripts/convert.py` writes, not at the 518 px grid of its position embeddings."""
    from transformers import AutoImageProcessor

    from vit_registers.training.loop import convert_transformers_checkpoint, processor_at_size

    source = ROOT.parent / "shared" / "real-weights" / "dinov2-small-imgfocus"
    if not (source / "config.json").is_file():
        pytest.skip("the shared real weights are not on this machine")
    assert not (source / "preprocessor_config.json").exists()
    convert_transformers_checkpoint(str(source), str(tmp_path / "converted"))
    processor = AutoImageProcessor.from_pretrained(tmp_path / "converted")
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["image_size"] == 518
    assert processor.crop_size["height"] == processor.crop_size["width"] == 224
    assert processor.size["shortest_edge"] == 256
    smaller = processor_at_size(processor, 112)
    assert (smaller.crop_size["height"], smaller.size["shortest_edge"]) == (112, 128)
