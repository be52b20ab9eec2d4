"""Test-time registers (Jiang et al. 2025), token ablations, effective rank and linear probes."""

from __future__ import annotations

import math

import pytest
import torch
from test_modeling import FAMILIES

from vit_registers import ViTRegistersConfig, ViTRegistersForImageClassification, ViTRegistersModel
from vit_registers.interventions import (
    TokenStatistics,
    ablate_tokens,
    calibrate_token_statistics,
    enable_test_time_registers,
    find_register_neurons,
)
from vit_registers.modeling_vit_registers import apply_test_time_registers
from vit_registers.probes import effective_rank, linear_probe, patch_pixels, position_probe, reconstruction_probe

TINY = dict(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2.0)


def tiny_model(seed=0, **overrides) -> ViTRegistersModel:
    torch.manual_seed(seed)
    model = ViTRegistersModel(ViTRegistersConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def test_algorithm_2_on_a_hand_checked_example():
    # 2 images, 3 tokens + 1 test-time register (last), 3 units; register neurons 0 and 2
    hidden = torch.tensor(
        [
            [[1.0, 5.0, -2.0], [3.0, 6.0, 4.0], [-1.0, 7.0, 0.5], [0.0, 8.0, 0.0]],
            [[9.0, 1.0, 1.0], [2.0, 2.0, -3.0], [0.0, 3.0, 2.0], [0.0, 4.0, 0.0]],
        ]
    )
    edited = apply_test_time_registers(hidden, torch.tensor([0, 2]), num_registers=1, mode="per_neuron", first_normal=0)
    expected = torch.tensor(
        [
            [[0.0, 5.0, 0.0], [0.0, 6.0, 0.0], [0.0, 7.0, 0.0], [3.0, 8.0, 4.0]],  # max over tokens of image 0
            [[0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 3.0, 0.0], [9.0, 4.0, 2.0]],  # of image 1, independently
        ]
    )
    torch.testing.assert_close(edited, expected, rtol=0, atol=0)
    original = hidden.clone()
    assert torch.equal(hidden, original)  # the default leaves its input alone
    in_place = apply_test_time_registers(
        hidden, torch.tensor([0, 2]), num_registers=1, mode="per_neuron", first_normal=0, inplace=True
    )
    assert in_place.data_ptr() == hidden.data_ptr() and not torch.equal(hidden, original)
    torch.testing.assert_close(in_place, expected, rtol=0, atol=0)


def test_zero_test_time_registers_equal_the_plain_model_exactly():
    plain = tiny_model()
    pixels = torch.randn(3, 3, 56, 56)
    expected = plain(pixels).last_hidden_state
    spec = ViTRegistersConfig(**TINY, test_time_registers={"num_tokens": 0, "neurons": {"0": [1, 2]}})
    configured = ViTRegistersModel(spec).eval()
    configured.load_state_dict(plain.state_dict())
    assert configured.config.num_test_time_registers == 0
    torch.testing.assert_close(configured(pixels).last_hidden_state, expected, rtol=0, atol=0)
    plain.set_test_time_registers({0: [1]}, num_tokens=1)
    plain.set_test_time_registers(None)
    torch.testing.assert_close(plain(pixels).last_hidden_state, expected, rtol=0, atol=0)


@pytest.mark.parametrize("num_tokens", [1, 2])
def test_batch_invariance_with_test_time_registers(num_tokens):
    model = enable_test_time_registers(tiny_model(), {0: [1, 5, 9], 2: [0, 63]}, num_tokens=num_tokens)
    pixels = torch.randn(8, 3, 56, 42)
    batched = model(pixels)
    assert batched.register_tokens.shape == (8, 4 + num_tokens, 32)
    assert batched.patch_tokens.shape == (8, 12, 32)
    for index in range(8):
        alone = model(pixels[index : index + 1])
        torch.testing.assert_close(alone.last_hidden_state[0], batched.last_hidden_state[index], atol=1e-5, rtol=0)


def test_test_time_registers_survive_save_and_load(tmp_path):
    model = enable_test_time_registers(tiny_model(), {1: [2, 4]}, num_tokens=1)
    model.save_pretrained(tmp_path)
    loaded = ViTRegistersModel.from_pretrained(tmp_path).eval()
    spec = {"num_tokens": 1, "neurons": {"1": [2, 4]}, "mode": "reference", "normal_values": "zero", "scale": 1.0}
    assert loaded.config.test_time_registers == spec
    pixels = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(loaded(pixels).register_tokens, model(pixels).register_tokens)
    with pytest.raises(ValueError, match="must lie in"):
        model.set_test_time_registers({0: [10_000]})
    assert model.config.test_time_registers == spec


def planted_model(units=(3, 7), **overrides) -> ViTRegistersModel:
    """A model whose layer-0 MLP units `units` fire on bright patches and write a large vector into them."""
    model = tiny_model(num_register_tokens=0, **overrides)
    with torch.no_grad():
        conv = model.embeddings.patch_embeddings.projection
        conv.weight.mul_(0.01)
        conv.weight[0] = 1.0 / (3 * 14 * 14)  # channel 0 = mean intensity of the patch
        conv.bias.zero_()
        if model.embeddings.position_embeddings is not None:  # none with RoPE
            model.embeddings.position_embeddings.mul_(0.01)
        mlp = model.encoder.layer[0].mlp
        for unit in units:
            mlp.fc1.weight[unit] = 0.0
            mlp.fc1.weight[unit, 0] = 4.0
            mlp.fc1.bias[unit] = -2.0
            mlp.fc2.weight[:, unit] = 3.0
    return model


def bright_patch_images(count=6) -> torch.Tensor:
    images = torch.rand(count, 3, 56, 56) * 0.1
    for index in range(count):
        row, col = divmod(index * 5 % 16, 4)
        images[index, :, 14 * row : 14 * row + 14, 14 * col : 14 * col + 14] = 10.0
    return images


@pytest.mark.parametrize("family", ["learned", "dinov3"])  # DINOv3 style: RoPE (tests/test_modeling.py)
def test_discovery_finds_planted_register_neurons(family):
    model = planted_model(units=(3, 7), **FAMILIES[family])
    images = bright_patch_images()
    found = find_register_neurons(
        model, [images[:3], images[3:]], top_k=2, highest_layer=1, detection_layer=1, percentile=90
    )
    assert found.neurons == {0: [3, 7]}
    assert found.images_with_outliers == 6 and found.images_seen == 6
    by_threshold = find_register_neurons(model, [images], top_k=2, highest_layer=1, threshold=found.threshold)
    assert by_threshold.neurons == {0: [3, 7]}
    # moving the neurons into a test-time register removes the outlier norms from the patches
    norms_before = model(images, output_hidden_states=True).hidden_states[2][:, 1:17].norm(dim=-1).amax(1)
    enable_test_time_registers(model, found)
    norms_after = model(images, output_hidden_states=True).hidden_states[2][:, 1:17].norm(dim=-1).amax(1)
    assert (norms_after < 0.5 * norms_before).all()
    with pytest.raises(ValueError, match="exactly one of threshold"):
        find_register_neurons(model, [images], threshold=1.0, percentile=90)


def test_discovery_reports_when_nothing_is_an_outlier():
    with pytest.raises(ValueError, match="No patch exceeds the norm threshold"):
        find_register_neurons(tiny_model(), [torch.randn(2, 3, 56, 56)], threshold=1e9)


def _layer_inputs(model, layer):
    seen = {}

    def hook(module, args, output):
        seen["x"] = args[0]

    return seen, model.encoder.layer[layer].register_forward_hook(hook)


def test_zero_ablation_replaces_only_the_chosen_tokens_and_restores_the_model():
    model = tiny_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    pixels = torch.randn(2, 3, 56, 56)
    plain = model(pixels, output_hidden_states=True)
    with ablate_tokens(model, tokens=[0, 2], layers=[1], mode="zero"):
        seen, handle = _layer_inputs(model, 1)
        ablated = model(pixels)
        handle.remove()
    x = seen["x"]
    assert torch.equal(x[:, [1, 3]], torch.zeros_like(x[:, [1, 3]]))  # registers 0 and 2 sit at positions 1 and 3
    torch.testing.assert_close(x[:, [0, 2, 4]], plain.hidden_states[1][:, [0, 2, 4]])
    assert (ablated.patch_tokens - plain.patch_tokens).abs().max() > 1e-4
    torch.testing.assert_close(model(pixels).last_hidden_state, plain.last_hidden_state, rtol=0, atol=0)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_mean_substitution_from_the_same_image_changes_nothing_but_zeroing_does(tmp_path):
    model = tiny_model()
    pixels = torch.randn(1, 3, 56, 56)
    statistics = calibrate_token_statistics(model, [pixels])
    statistics.save(tmp_path / "stats.safetensors")
    statistics = TokenStatistics.load(tmp_path / "stats.safetensors")
    assert statistics.mean.shape == (3, 5, 32) and statistics.count == 1
    plain = model(pixels).last_hidden_state
    with ablate_tokens(model, "registers", mode="mean", statistics=statistics):
        torch.testing.assert_close(model(pixels).last_hidden_state, plain, atol=1e-5, rtol=0)
    with ablate_tokens(model, "registers", mode="noise", statistics=statistics):  # variance 0 → the mean
        torch.testing.assert_close(model(pixels).last_hidden_state, plain, atol=1e-5, rtol=0)
    with ablate_tokens(model, "registers", mode="zero"):
        assert (model(pixels).last_hidden_state - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs statistics"):
        with ablate_tokens(model, "cls", mode="mean"):
            pass


def test_shuffle_takes_the_token_of_another_image():
    model = tiny_model()
    same = torch.randn(1, 3, 56, 56).repeat(2, 1, 1, 1)
    plain = model(same).last_hidden_state
    with ablate_tokens(model, "cls", layers=[0, 1], mode="shuffle"):
        torch.testing.assert_close(model(same).last_hidden_state, plain)
    with pytest.raises(ValueError, match="Register 9 does not exist"):
        with ablate_tokens(model, [9]):
            pass


def test_ablation_reaches_the_classifier():
    torch.manual_seed(0)
    classifier = ViTRegistersForImageClassification(ViTRegistersConfig(**TINY, num_labels=3)).eval()
    pixels = torch.randn(2, 3, 56, 56)
    before = classifier(pixels).logits
    with ablate_tokens(classifier, "registers", mode="zero"):
        assert not torch.allclose(classifier(pixels).logits, before)


def test_effective_rank_of_known_spectra():
    generator = torch.Generator().manual_seed(0)
    isotropic = torch.zeros(4000, 16)
    isotropic[:, :5] = torch.randn(4000, 5, generator=generator)
    assert effective_rank(isotropic) == pytest.approx(5.0, rel=0.05)
    line = torch.randn(500, 1, generator=generator) * torch.randn(1, 16, generator=generator)
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-6)
    two = torch.zeros(3000, 8)
    two[:, 0] = torch.randn(3000, generator=generator) * 2  # eigenvalues 4 and 1 → p = (0.8, 0.2)
    two[:, 1] = torch.randn(3000, generator=generator)
    expected = math.exp(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)))
    assert effective_rank(two) == pytest.approx(expected, rel=0.05)


def test_linear_probe_separates_linearly_encoded_labels_only():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=generator)
    centres = torch.randn(3, 10, generator=generator) * 3
    features = centres[labels] + torch.randn(300, 10, generator=generator)
    result = linear_probe(features, labels, seeds=(0, 1, 2))
    assert result.mean > 0.95 and len(result.per_seed) == 3 and result.std >= 0
    noise = linear_probe(torch.randn(300, 10, generator=generator), labels)
    assert noise.mean < 0.55


def test_position_and_reconstruction_probes():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(20, 3, 28, 28, generator=generator)
    targets = patch_pixels(pixels, 14)
    assert targets.shape == (20, 4, 3 * 14 * 14)
    torch.testing.assert_close(targets[0, 1], pixels[0, :, :14, 14:].reshape(-1))  # raster order, like the tokens
    position_code = torch.eye(4) * 3
    tokens = position_code.expand(20, 4, 4) + 0.1 * torch.randn(20, 4, 4, generator=generator)
    assert position_probe(tokens).mean == pytest.approx(1.0)
    latent = torch.randn(40, 4, 6, generator=generator)  # pixels and tokens both linear in a 6-d latent
    synthetic_pixels = latent @ torch.randn(6, 588, generator=generator)
    encoded = latent @ torch.randn(6, 16, generator=generator)
    assert reconstruction_probe(encoded, synthetic_pixels, ridge=1e-8).mean < 1e-6
    unrelated = reconstruction_probe(torch.randn(20, 4, 16, generator=generator), targets)
    assert unrelated.mean >= 0.9 * float(targets.var())  # no better than predicting the mean pixel


def test_probe_tokens_pick_the_requested_token_of_each_image():
    from vit_registers.probes import probe_tokens

    model = planted_model(units=(3, 7))
    images = bright_patch_images(4)
    out = model(images, output_hidden_states=True)
    states = out.hidden_states
    cls_features, kept = probe_tokens(model, images, "cls", layer=1)
    torch.testing.assert_close(cls_features, states[1][:, 0])
    assert kept.tolist() == [0, 1, 2, 3]
    last_norms = states[-1][:, 1:].norm(dim=-1)
    threshold = float(last_norms.median()) * 1.5
    outlier_features, kept = probe_tokens(model, images, "outlier_patch", layer=-1, threshold=threshold)
    assert (outlier_features.norm(dim=-1) > threshold).all() and len(kept) >= 1
    normal_features, _ = probe_tokens(model, images, "normal_patch", layer=-1, threshold=threshold)
    assert (normal_features.norm(dim=-1) <= threshold).all()
    registers, _ = probe_tokens(tiny_model(), images, "register", register_index=3)
    assert registers.shape == (4, 32)
    with pytest.raises(ValueError, match="needs the outlier norm threshold"):
        probe_tokens(model, images, "outlier_patch")


def test_paper_settings_are_valid_discovery_arguments():
    from vit_registers.interventions import PAPER_SETTINGS

    model = planted_model(units=(3, 7))
    images = bright_patch_images(4)
    for name, settings in PAPER_SETTINGS.items():
        assert settings["highest_layer"] in (5, 17)
        scaled = dict(settings, highest_layer=1, top_k=2)  # the tiny model has 3 layers
        scaled["sparsity_activation"] = 2.0  # the planted units sit near 1 away from the bright patch
        hidden = model(images, output_hidden_states=True).hidden_states[settings["detection_layer"]]
        scaled["threshold"] = float(hidden.norm(dim=-1).quantile(0.9))  # every token: CLS too, as the authors
        assert find_register_neurons(model, [images], **scaled).neurons == {0: [3, 7]}, name
