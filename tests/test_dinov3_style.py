"""Issue 20, part 4: the package's features on the new register families, with tiny models (hidden 64, 4 heads, 2
layers, patch 8, 4 registers):

* DINOv3 style: 2D rotary position encoding of the patches (`position_encoding="rope"`, DINOv3's `rope_theta=100`
  and train-time coordinate rescaling), no stored position embeddings, LayerScale 1e-5, LayerNorm eps 1e-5;
* MAP style (timm's `vit_so150m*_reg4_map*`): no CLS token, position embeddings stored for the registers too,
  attention-pool head (`pooling="map"`).

Features that existing tests check on learned-position models are checked there, parametrised over these families
rather than copied: attention weights under eager / SDPA / flex attention and `attention_layers`,
`torch.compile(fullgraph=True)` and `torch.export` with dynamic height and width (tests/test_modeling.py,
`FAMILIES`), the oneDNN CPU block (tests/test_onednn_path.py) and the discovery of planted register neurons
(tests/test_interventions.py). The DPT / Depth Anything heads are in tests/test_dense_heads.py. This file has the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from test_modeling import FAMILIES as MODELING_FAMILIES  # tests/ is on sys.path (conftest)
from test_modeling import tiny_model
from transformers import BitImageProcessor

from vit_registers import ViTRegistersBackbone, ViTRegistersForImageClassification, ViTRegistersModel
from vit_registers import modeling_vit_registers as modeling
from vit_registers.interventions import enable_test_time_registers, find_register_neurons

SIZES = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
# test_modeling's family overrides (DINOv3: rope_theta 100, coordinate rescaling 2, LayerScale 1e-5, eps 1e-5) at
# these sizes, with 4 registers
FAMILIES = {family: dict(SIZES, num_register_tokens=4, **MODELING_FAMILIES[family]) for family in ("dinov3", "map")}


def family_model(family: str, cls=ViTRegistersModel, **overrides):
    """test_modeling's tiny model (every weight drawn at random, eval mode) with a family's config."""
    return tiny_model(cls, **{**FAMILIES[family], **overrides})


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: a second thread only waits for the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ tokens, heads


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_token_groups_and_register_tokens(family):
    model = family_model(family)
    pixels = torch.randn(2, 3, 32, 48)  # 4 x 6 patches
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True)
    prefix = model.config.num_prefix_tokens  # CLS (DINOv3 only) + 4 registers
    assert out.last_hidden_state.shape == (2, prefix + 24, 64)
    assert out.register_tokens.shape == (2, 4, 64) and out.patch_tokens.shape == (2, 24, 64)
    assert out.pooler_output.shape == (2, 64) and len(out.hidden_states) == 3
    torch.testing.assert_close(out.register_tokens, out.last_hidden_state[:, prefix - 4 : prefix])
    torch.testing.assert_close(out.patch_tokens, out.last_hidden_state[:, prefix:])
    positions = model.embeddings.position_embeddings
    if family == "dinov3":
        assert positions is None and not any("position" in name for name in model.state_dict())
        torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])
    else:  # one stored embedding per register, then the patches; the attention pool reads the patches only
        assert positions.shape == (1, 4 + 16, 64)
        torch.testing.assert_close(out.pooler_output, model.pooler(None, out.patch_tokens, model.fc_norm))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_image_classification(family):
    model = family_model(family, ViTRegistersForImageClassification, num_labels=3).train()
    pixels, labels = torch.randn(3, 3, 32, 40), torch.tensor([0, 2, 1])
    out = model(pixels, labels=labels)
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    out.loss.backward()
    embeddings = model.vit_registers.embeddings
    assert embeddings.register_tokens.grad.abs().sum() > 0
    if family == "map":
        assert model.vit_registers.pooler.latent.grad.abs().sum() > 0
    else:
        assert embeddings.cls_token.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, model.classifier(model.vit_registers(pixels).pooler_output))


# ------------------------------------------------------------------------------------------------------- RoPE


def test_rope_rotates_the_patches_only_never_cls_registers_or_test_time_registers(monkeypatch):
    model = family_model("dinov3")
    model.set_test_time_registers({0: [1, 5]}, num_tokens=2)
    calls = []

    def recording(states, position_embeddings, start, interleaved):
        rotated = rotate(states, position_embeddings, start, interleaved)
        calls.append((states, rotated))
        return rotated

    rotate = modeling.rotate_patch_tokens
    monkeypatch.setattr(modeling, "rotate_patch_tokens", recording)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 48))
    assert out.register_tokens.shape == (2, 4 + 2, 64)
    assert len(calls) == 2 * 2  # queries and keys of each layer
    for states, rotated in calls:  # (batch, heads, 1 + 4 + 24 + 2, head_dim)
        assert states.shape[2] == 1 + 4 + 24 + 2
        torch.testing.assert_close(rotated[:, :, :5], states[:, :, :5], rtol=0, atol=0)  # CLS and registers
        torch.testing.assert_close(rotated[:, :, -2:], states[:, :, -2:], rtol=0, atol=0)  # test-time registers
        assert (rotated[:, :, 5:-2] - states[:, :, 5:-2]).abs().amax() > 1e-3  # the patches are rotated


def test_rope_coordinate_augmentation_is_seeded_and_only_in_train_mode():
    model = family_model("dinov3", rope_shift_coords=0.5, rope_jitter_coords=1.5)  # and rescale 2 (DINOV3)
    plain = family_model("dinov3", rope_rescale_coords=None)  # same weights (same seed), no augmentation
    plain.load_state_dict(model.state_dict())
    pixels = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        evaluated = model(pixels).last_hidden_state
        torch.testing.assert_close(model(pixels).last_hidden_state, evaluated, rtol=0, atol=0)
        torch.testing.assert_close(plain(pixels).last_hidden_state, evaluated, rtol=0, atol=0)
        model.train()
        draws = []
        for seed in (3, 3, 4):
            torch.manual_seed(seed)
            draws.append(model(pixels).last_hidden_state)
        plain.train()
        torch.testing.assert_close(plain(pixels).last_hidden_state, evaluated, rtol=0, atol=0)  # nothing to draw
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)  # torch.manual_seed repeats the draws
    assert (draws[0] - draws[2]).abs().max() > 1e-4 and (draws[0] - evaluated).abs().max() > 1e-4
    rope = model.rope_embeddings.eval()
    centres = torch.tensor([-0.75, -0.25, 0.25, 0.75])
    torch.testing.assert_close(rope.coordinates(4, 4)[:4], torch.stack([centres.new_full((4,), -0.75), centres], -1))


# -------------------------------------------------------------------------------------------- test-time registers


def test_test_time_registers_discovery_and_intervention_on_a_rope_model(tmp_path):
    model = family_model("dinov3")
    pixels = torch.randn(4, 3, 32, 48)
    with torch.no_grad():
        plain = model(pixels)
    found = find_register_neurons(model, [pixels[:2], pixels[2:]], top_k=6, percentile=90)
    assert sum(map(len, found.neurons.values())) == 6 and found.images_with_outliers >= 1
    assert all(0 <= unit < model.config.mlp_hidden_size for units in found.neurons.values() for unit in units)

    # an edit that cannot change anything leaves the model exactly as it was
    model.set_test_time_registers(found.neurons, num_tokens=0)
    assert model.config.test_time_registers is None
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).last_hidden_state, plain.last_hidden_state, rtol=0, atol=0)

    enable_test_time_registers(model, found, num_tokens=1)
    with torch.no_grad():
        edited = model(pixels)
        alone = model(pixels[1:2])
    assert edited.register_tokens.shape == (4, 4 + 1, 64) and edited.patch_tokens.shape == (4, 24, 64)
    assert (edited.patch_tokens - plain.patch_tokens).abs().max() > 1e-4  # the edit happened
    torch.testing.assert_close(alone.last_hidden_state[0], edited.last_hidden_state[1], atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    reloaded = ViTRegistersModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).register_tokens, edited.register_tokens)
    model.set_test_time_registers(None)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).last_hidden_state, plain.last_hidden_state, rtol=0, atol=0)


# ------------------------------------------------------------------------------ analysis, LOST, Space, loading


def _save_checkpoint(directory, family: str, **overrides) -> str:
    model = family_model(family, ViTRegistersForImageClassification, **{"num_labels": 3, **overrides})
    model.save_pretrained(directory)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_analysis_lost_and_space_on_a_saved_checkpoint(family, tmp_path):
    from vit_registers import space
    from vit_registers.analysis import analyze_batch, label_outliers, load_model, lost_boxes, percentile_threshold

    path = _save_checkpoint(tmp_path / "model", family)
    model, _ = load_model(path, device="cpu")
    assert type(model) is ViTRegistersModel and model.config.num_register_tokens == 4
    pixels = torch.randn(2, 3, 32, 48)
    results = analyze_batch(model, pixels, layers=[-1], lost_kind="keys")
    boxes = lost_boxes(model, pixels, kind="keys")
    for result, box in zip(results, boxes):
        assert result.grid == (4, 6) and result.patch_norm_map.shape == (4, 6)
        (maps,) = result.attention
        assert maps.registers.shape[:2] == (1, 4) and (maps.cls is None) == (family == "map")
        assert result.lost.box == box.box
        x0, y0, x1, y1 = box.box
        assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 32
        assert len(result.last_layer_norms["registers"]) == 4
    label_outliers(results, percentile_threshold([r.patch_norm_map for r in results]))
    json.dumps(results[0].summary())

    image = tmp_path / "photo.png"
    Image.fromarray((torch.rand(40, 56, 3) * 255).byte().numpy()).save(image)
    store = space.ModelStore(device="cpu", example_dir=tmp_path / "examples")
    test_time_registers = family == "dinov3"  # one Space request per family (each renders every figure)
    (result,) = space.analyze(str(image), [path], test_time_registers, store=store).results
    assert len(result.stats["register_norms"]) == 4 + test_time_registers
    assert result.figures["register_attention"] is not None and result.figures["norms"] is not None


def test_trainer_one_step_and_reload(tmp_path, monkeypatch):
    import datasets
    from test_trainer import _args, _load, _model_and_processor
    from transformers import AutoModelForImageClassification, Trainer

    from vit_registers.training import collate, hf_transform

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"), raising=False)
    train, _ = _load(tmp_path, classes=("astronaut", "coffee"))
    model, processor = _model_and_processor(_save_checkpoint(tmp_path / "pretrained", "dinov3", num_labels=2), train)
    assert model.config.position_encoding == "rope"
    train.set_transform(hf_transform(processor, train=True))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=train, data_collator=collate)
    trainer.train()
    assert [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert "vit_registers.embeddings.register_tokens" in changed and "classifier.weight" in changed
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "final").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, trainer.model.eval()(pixels).logits)


def test_finetune_script_one_step(tmp_path, capsys, monkeypatch):
    from test_finetune import _run_inprocess

    from vit_registers.training.toy_data import make_image_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = _save_checkpoint(tmp_path / "pretrained", "dinov3")
    train = make_image_folder(tmp_path / "train", classes=("astronaut", "coffee"), per_class=4, size=32)
    out = tmp_path / "out"
    argv = ["--model", source, "--train-dir", train, "--output-dir", out, "--max-steps", 1]
    code, err = _run_inprocess([*argv, "--per-device-batch-size", 4, "--learning-rate", 1e-3], capsys)
    assert code == 0, err
    model = ViTRegistersForImageClassification.from_pretrained(out)
    assert model.config.position_encoding == "rope" and model.config.num_labels == 2
    assert model.vit_registers.embeddings.position_embeddings is None


@pytest.mark.slow
def test_trust_remote_code_without_the_package(tmp_path):
    """test_auto's interpreter that cannot import `vit_registers`, on a DINOv3-style checkpoint whose config switches
    test-time registers on: the code files next to the weights reproduce RoPE and the edit."""
    from test_auto import BLOCKED_IMPORT

    model = family_model("dinov3", ViTRegistersForImageClassification, num_labels=3)
    model.vit_registers.set_test_time_registers({0: [2, 9]}, num_tokens=1)
    model.save_pretrained(tmp_path / "model")
    pixels = torch.randn(2, 3, 32, 48)
    torch.save(pixels, tmp_path / "pixels.pt")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    argv = [str(tmp_path / "model"), str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt")]
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT, *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    backbone = ViTRegistersBackbone.from_pretrained(tmp_path / "model", out_indices=[2]).eval()
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(pixels).logits)
        torch.testing.assert_close(out["registers"], model.vit_registers(pixels).register_tokens)
        torch.testing.assert_close(out["maps"], backbone(pixels).feature_maps[0])
    assert out["registers"].shape == (2, 4 + 1, 64)
