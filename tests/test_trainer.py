"""`ViTRegistersForImageClassification` with `transformers.Trainer`, unchanged (issue 5, part 1).

Data: crops of scikit-image photos written as an image folder, loaded with `datasets`' ``imagefolder`` builder.
"""

from __future__ import annotations

import os

import datasets
import numpy as np
import pytest
import torch

import vit_registers  # noqa: F401 - registers the Auto classes
from vit_registers import ViTRegistersConfig, ViTRegistersForImageClassification
from vit_registers.training import collate, compute_metrics_for_trainer, hf_transform
from vit_registers.training.loop import default_image_processor
from vit_registers.training.toy_data import make_image_folder


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"), raising=False)


def _pretrained_dir(tmp_path):
    """A saved 'pre-trained' checkpoint with its processor, as a user would download."""
    config = ViTRegistersConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_register_tokens=2
    )
    torch.manual_seed(0)
    path = tmp_path / "pretrained"
    ViTRegistersForImageClassification(config).save_pretrained(path)
    default_image_processor(config).save_pretrained(path)
    return path


def _load(tmp_path, classes=("astronaut", "coffee", "chelsea")):
    make_image_folder(tmp_path / "train", classes=classes, per_class=16, size=32, seed=0)
    make_image_folder(tmp_path / "val", classes=classes, per_class=6, size=32, seed=1)
    cache = str(tmp_path / "hf-datasets")
    train = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "train"), split="train", cache_dir=cache)
    val = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "val"), split="train", cache_dir=cache)
    return train, val


def _model_and_processor(path, train):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    names = train.features["label"].names
    model = AutoModelForImageClassification.from_pretrained(
        path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        ignore_mismatched_sizes=True,
    )
    return model, AutoImageProcessor.from_pretrained(path)


def _args(tmp_path, **overrides):
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        num_train_epochs=4,
        learning_rate=2e-3,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def test_trainer_trains_evaluates_and_reloads(tmp_path):
    from transformers import AutoModelForImageClassification, Trainer

    train, val = _load(tmp_path)
    model, processor = _model_and_processor(_pretrained_dir(tmp_path), train)
    assert model.config.id2label == {0: "astronaut", 1: "chelsea", 2: "coffee"}
    train.set_transform(hf_transform(processor, train=True))
    val.set_transform(hf_transform(processor, train=False))
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=train,
        eval_dataset=val,
        data_collator=collate,
        compute_metrics=compute_metrics_for_trainer,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 24  # 48 images / batch 8 = 6 steps × 4 epochs, logged every step
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert after["eval_loss"] < before["eval_loss"]
    assert 0.0 <= after["eval_accuracy"] <= 1.0

    trainer.save_model(str(tmp_path / "final"))
    processor.save_pretrained(tmp_path / "final")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "final").eval()
    batch = collate([val[i] for i in range(len(val))])
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(pixel_values=batch["pixel_values"]).logits
        got = reloaded(pixel_values=batch["pixel_values"]).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert reloaded.config.id2label == trained.config.id2label


def test_trainer_gradient_accumulation_matches_full_batch(tmp_path):
    """Trainer passes `num_items_in_batch`; the model must scale its loss so that 2 × 4 accumulated == 8."""
    from transformers import Trainer

    train, _ = _load(tmp_path, classes=("astronaut", "coffee"))
    path = _pretrained_dir(tmp_path)
    weights = []
    for batch, accumulation in ((8, 1), (4, 2)):
        model, processor = _model_and_processor(path, train)
        torch.manual_seed(1)
        model.classifier.reset_parameters()
        train.set_transform(hf_transform(processor, train=False))
        args = _args(
            tmp_path,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            num_train_epochs=1,
            learning_rate=1e-3,
            warmup_steps=0,
            weight_decay=0.0,
            optim="sgd",  # unlike Adam, SGD sees a wrongly scaled loss
            max_grad_norm=0.0,
        )
        Trainer(model=model, args=args, train_dataset=train, data_collator=collate).train()
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    initial, _ = _model_and_processor(path, train)
    assert not torch.allclose(
        weights[0]["vit_registers.encoder.layer.0.mlp.fc1.weight"],
        initial.state_dict()["vit_registers.encoder.layer.0.mlp.fc1.weight"],
    )
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], atol=2e-5, rtol=1e-4, msg=name)


def test_trainer_push_to_hub_over_http(tmp_path, hub_server, monkeypatch):
    """Trainer's own `push_to_hub`, against the Hub-compatible server on 127.0.0.1; the pushed model reloads."""
    from huggingface_hub import HfApi
    from transformers import AutoModelForImageClassification, Trainer

    monkeypatch.delenv("HF_HUB_OFFLINE")
    train, _ = _load(tmp_path)
    model, processor = _model_and_processor(_pretrained_dir(tmp_path), train)
    train.set_transform(hf_transform(processor, train=True))
    args = _args(
        tmp_path, num_train_epochs=1, push_to_hub=True, hub_model_id="test-user/trainer-push", hub_strategy="end"
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate, processing_class=processor)
    trainer.train()
    trainer.push_to_hub()
    files = set(HfApi().list_repo_files("test-user/trainer-push"))
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "modeling_vit_registers.py"} <= files
    pushed = AutoModelForImageClassification.from_pretrained("test-user/trainer-push").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pushed(pixels).logits, trainer.model.eval()(pixels).logits)


def test_trainer_logs_the_peak_learning_rate_under_layer_decay(tmp_path):
    """`create_optimizer` puts the head's group first: Trainer logs `get_last_lr()[0]`, so it reports the peak
    (5e-5), not the embeddings' 5e-5 × 0.75^(L + 1)."""
    from transformers import Trainer

    from vit_registers.training import create_optimizer

    train, _ = _load(tmp_path, classes=("astronaut", "coffee"))
    model, processor = _model_and_processor(_pretrained_dir(tmp_path), train)
    train.set_transform(hf_transform(processor, train=False))
    optimizer = create_optimizer(model, 5e-5, weight_decay=0.05, layer_decay=0.75)
    assert optimizer.param_groups[0]["lr"] == max(group["lr"] for group in optimizer.param_groups) == 5e-5
    assert min(group["lr"] for group in optimizer.param_groups) == pytest.approx(5e-5 * 0.75**3)
    args = _args(tmp_path, max_steps=2, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate, optimizers=(optimizer, None))
    trainer.train()
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert logged == [pytest.approx(5e-5)] * 2
    umask = os.umask(0o022)
    try:
        trainer.save_model(str(tmp_path / "final"))
    finally:
        os.umask(umask)
    assert (tmp_path / "final" / "model.safetensors").stat().st_mode & 0o777 == 0o644  # not safetensors' 0600
