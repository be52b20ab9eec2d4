"""Test-time registers and register-neuron search against re-implementations of the authors' code.

Jiang, Dravid, Efros, Gandelsman, "Vision Transformers Don't Need Trained Registers" (NeurIPS 2025), repository
nickjiang2378/test-time-registers: the edit is `shared/hook_fn.py::activate_on_registers` (a forward hook on the MLP
activation that edits batch element 0, run one image at a time), the search `shared/algorithms.py::
find_register_neurons` followed by the notebook's `filter_layers` and top-k. The functions below were written from
reading that code; the package must give the same numbers on every image of a batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from vit_registers import ViTRegistersConfig, ViTRegistersModel
from vit_registers.interventions import PAPER_SETTINGS, enable_test_time_registers, find_register_neurons
from vit_registers.modeling_vit_registers import apply_test_time_registers

TINY = dict(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2.0)
NEURONS = {0: [1, 5, 9], 1: [3], 2: [0, 7, 40, 47]}


def tiny_model(seed=0, **overrides) -> ViTRegistersModel:
    torch.manual_seed(seed)
    model = ViTRegistersModel(ViTRegistersConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.eval()


# ------------------------------------------------------------------------------------------ the authors' edit


def authors_sign_max(values: torch.Tensor) -> torch.Tensor:
    """Their `sign_max`: the largest entry, unless the smallest has a strictly larger magnitude."""
    largest, smallest = torch.max(values), torch.min(values)
    return largest if abs(largest) > abs(smallest) else smallest


def authors_activate_on_registers(module, inputs, output, num_registers, neuron_indices, scale=1.0, normal="zero"):
    """Their forward hook, edit for edit: batch element 0 only; CLS (position 0) untouched."""
    if isinstance(scale, list):
        for i in range(num_registers):  # the maximum is taken again after each register is written
            output[0, -num_registers + i, neuron_indices] = scale[i] * authors_sign_max(output[0, :, neuron_indices])
    else:
        peak = authors_sign_max(output[0, :, neuron_indices])
        output[0, -num_registers:, neuron_indices] = (scale * peak).unsqueeze(0).expand(num_registers, -1)
    normal_slice = (0, slice(1, -num_registers))
    if normal == "zero":
        output[normal_slice + (neuron_indices,)] = 0
    elif normal == "mean":
        patches = output[normal_slice + (neuron_indices,)]
        output[normal_slice + (neuron_indices,)] = patches.mean(dim=0).unsqueeze(0).expand(patches.shape[0], -1)
    elif normal == "only_outliers":
        patches = output[normal_slice + (neuron_indices,)].clone()
        means, stds = patches.mean(dim=0), patches.std(dim=0)
        above = patches > (means + stds).unsqueeze(0)
        patches[above] = means.unsqueeze(0).expand_as(patches)[above]
        output[normal_slice + (neuron_indices,)] = patches
    elif normal != "same":
        raise ValueError(normal)


def hook_target(mlp):
    """Where their hook sits: the activation module (`mlp.act`), or for SwiGLU the identity after the gated product
    (`hidden_identity`), which is where this package's edit module sits."""
    return mlp.test_time_registers if mlp.gated else mlp.activation


def authors_run(model, pixels, neurons, num_registers, scale, normal):
    """Every hidden state of each image run alone, with their hook on the layers of `neurons`; the model appends
    `num_registers` zero tokens but edits nothing itself."""
    model.set_test_time_registers({}, num_tokens=num_registers)  # extra tokens, no neurons: no edit of its own
    handles = [
        hook_target(model.encoder.layer[layer].mlp).register_forward_hook(
            lambda module, args, output, units=units: authors_activate_on_registers(
                module, args, output, num_registers, units, scale, normal
            )
        )
        for layer, units in neurons.items()
    ]
    try:
        with torch.no_grad():
            runs = [model(pixels[i : i + 1], output_hidden_states=True) for i in range(pixels.shape[0])]
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat([run.hidden_states[depth] for run in runs]) for depth in range(len(runs[0].hidden_states))]


@pytest.mark.parametrize(
    "num_tokens,scale,normal,overrides",
    [
        (1, 1.0, "zero", {}),
        (2, 2.5, "zero", {"num_register_tokens": 2}),
        (2, [1.5, 0.5], "mean", {}),
        (3, [0.5, 2.0, 1.0], "only_outliers", {"num_register_tokens": 1}),
        (1, 1.0, "same", {}),
        (2, 1.0, "zero", {"mlp_type": "swiglu"}),  # the gated product goes negative: sign_max keeps the sign
        (1, [-1.0], "mean", {"mlp_type": "swiglu", "num_register_tokens": 0}),
    ],
)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-6), (torch.float32, 2e-5)])
def test_reference_mode_equals_the_authors_hook_image_by_image(num_tokens, scale, normal, overrides, dtype, tolerance):
    """Every token of every hidden state within 1e-6 (float64). In float32 a batch of 4 and single images differ by up
    to 6e-6 in this model without any edit (values up to 30), so float32 is held to 2e-5."""
    model = tiny_model(**overrides).to(dtype)
    pixels = torch.randn(4, 3, 56, 42, dtype=dtype)  # 4 different images, one batch
    expected = authors_run(model, pixels, NEURONS, num_tokens, scale, normal)
    model.set_test_time_registers(NEURONS, num_tokens=num_tokens, mode="reference", normal_values=normal, scale=scale)
    with torch.no_grad():
        got = model(pixels, output_hidden_states=True).hidden_states
    assert len(got) == len(expected) and got[-1].shape == expected[-1].shape
    for depth, (ours, theirs) in enumerate(zip(got, expected)):
        message = lambda m, d=depth: f"hidden state {d}: {m}"  # noqa: E731
        torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance, msg=message)
    # the edit did something: test-time tokens differ from the run without it
    model.set_test_time_registers({}, num_tokens=num_tokens)
    with torch.no_grad():
        plain = model(pixels, output_hidden_states=True).hidden_states[-1]
    assert (plain[:, -num_tokens:] - got[-1][:, -num_tokens:]).abs().max() > 1e-3


def test_reference_mode_keeps_cls_and_writes_one_signed_value_per_layer():
    # 1 image, CLS + 3 tokens + 1 test-time register, 3 units; register neurons 0 and 2
    hidden = torch.tensor([[[9.0, 5.0, -9.5], [3.0, 6.0, 4.0], [-1.0, 7.0, 0.5], [2.0, 1.0, -3.0], [0.0, 8.0, 0.0]]])
    neurons = torch.tensor([0, 2])
    edited = apply_test_time_registers(hidden, neurons, num_registers=1)
    # sign max over every token (CLS included) and both units: -9.5; CLS keeps its values
    expected = torch.tensor([[[9.0, 5.0, -9.5], [0, 6, 0], [0, 7, 0], [0, 1, 0], [-9.5, 8.0, -9.5]]])
    torch.testing.assert_close(edited, expected, rtol=0, atol=0)
    per_neuron = apply_test_time_registers(hidden, neurons, num_registers=1, mode="per_neuron", first_normal=0)
    expected = torch.tensor([[[0, 5.0, 0], [0, 6, 0], [0, 7, 0], [0, 1, 0], [9.0, 8.0, 4.0]]])
    torch.testing.assert_close(per_neuron, expected, rtol=0, atol=0)
    # a tie of magnitudes gives the negative value, as their `sign_max`
    tie = torch.tensor([[[0.0, 2.0], [0.0, -2.0], [5.0, 0.0]]])
    assert apply_test_time_registers(tie, torch.tensor([1]), num_registers=1)[0, -1, 1] == -2.0


def test_modes_are_stored_validated_and_reloaded(tmp_path):
    model = tiny_model()
    enable_test_time_registers(model, NEURONS, num_tokens=2, normal_values="mean", scale=[1.5, 0.5])
    spec = model.config.test_time_registers
    assert spec == {
        "num_tokens": 2,
        "neurons": {"0": [1, 5, 9], "1": [3], "2": [0, 7, 40, 47]},
        "mode": "reference",
        "normal_values": "mean",
        "scale": [1.5, 0.5],
    }
    model.save_pretrained(tmp_path)
    loaded = ViTRegistersModel.from_pretrained(tmp_path).eval()
    assert loaded.config.test_time_registers == spec
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).last_hidden_state, model(pixels).last_hidden_state)
    for bad, message in [
        (dict(mode="max"), "mode"),
        (dict(normal_values="median"), "normal_values"),
        (dict(scale=[1.0]), "scale"),  # one factor per test-time token
    ]:
        with pytest.raises(ValueError, match=message):
            model.set_test_time_registers(NEURONS, num_tokens=2, **bad)
        assert model.config.test_time_registers == spec  # a refused setting leaves the previous one
    with pytest.raises(ValueError, match="mode"):
        ViTRegistersConfig(**TINY, test_time_registers={"num_tokens": 1, "neurons": {}, "mode": "max"})


def test_a_spec_without_mode_keeps_the_earlier_per_neuron_edit():
    """Configs saved before modes existed hold the per-neuron edit with CLS zeroed: they give the same outputs."""
    legacy = tiny_model(test_time_registers={"num_tokens": 1, "neurons": {"0": [1, 5], "2": [7]}})
    explicit = tiny_model()
    explicit.set_test_time_registers({0: [1, 5], 2: [7]}, num_tokens=1, mode="per_neuron")
    assert legacy.encoder.layer[0].mlp.test_time_registers.settings["first_normal"] == 0
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(legacy(pixels).last_hidden_state, explicit(pixels).last_hidden_state)


def test_both_modes_train_with_gradients():
    for mode, scale in (("reference", [2.0, 1.0]), ("per_neuron", 1.0)):
        model = tiny_model().train()
        model.set_test_time_registers(NEURONS, num_tokens=2, mode=mode, scale=scale, normal_values="only_outliers")
        model(torch.randn(2, 3, 56, 56)).last_hidden_state.square().mean().backward()
        assert all(p.grad is not None for p in model.encoder.parameters())


REMOTE = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "vit_registers" or name.startswith("vit_registers."):
                raise ImportError("vit_registers is blocked in this interpreter")
    sys.meta_path.insert(0, Block())
    import torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[2], weights_only=True)).last_hidden_state, sys.argv[3])
    """
)


def test_reference_mode_with_trust_remote_code(tmp_path):
    model = tiny_model(num_register_tokens=2)
    model.set_test_time_registers(NEURONS, num_tokens=2, normal_values="only_outliers", scale=[2.0, 0.5])
    model.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["test_time_registers"]["mode"] == "reference"
    pixels = torch.randn(2, 3, 56, 42)
    torch.save(pixels, tmp_path / "pixels.pt")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-c", REMOTE, str(tmp_path / "model"), str(tmp_path / "pixels.pt"), str(tmp_path / "o")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "o", weights_only=True), model(pixels).last_hidden_state)


# ---------------------------------------------------------------------------------------- the authors' search


def authors_find_register_neurons(model, images, threshold, detect_layer, highest_layer, top_k, sparsity=None):
    """Their search, one image at a time: norms of every token of block `detect_layer`'s output, outliers strictly
    above `threshold`, per image and layer mean |activation| at the outliers (times the sparsity mask), averaged over
    the images with outliers; sorted over all layers, then `filter_layers(highest_layer)`, then the first `top_k`."""
    depth = model.config.num_hidden_layers
    units = model.config.mlp_hidden_size
    activations = {}
    handles = [
        model.encoder.layer[layer].mlp.activation.register_forward_hook(
            lambda module, args, output, layer=layer: activations.__setitem__(layer, output[0].detach().clone())
        )
        for layer in range(depth)
    ]
    scores = []
    try:
        for image in images:
            with torch.no_grad():
                outputs = model(image[None], output_hidden_states=True).hidden_states[1:]  # block outputs
            norm_map = torch.norm(outputs[detect_layer][0], dim=1)
            locations = torch.where(norm_map > threshold)[0]
            if len(locations) == 0:
                continue
            image_scores = torch.zeros(depth, units)
            for layer in range(depth):
                values = activations[layer][locations].abs()
                if sparsity is not None:
                    fraction, level = sparsity
                    act = activations[layer]
                    sparse = torch.sum(act < level, dim=0) >= fraction * act.shape[0]
                    if not torch.any(sparse):
                        continue
                    image_scores[layer] = values.mean(dim=0) * sparse.float()
                else:
                    image_scores[layer] = values.mean(dim=0)
            scores.append(image_scores)
    finally:
        for handle in handles:
            handle.remove()
    mean = torch.stack(scores).mean(dim=0)
    values, indices = torch.sort(mean.flatten(), descending=True)
    ranked = [(int(i) // units, int(i) % units, float(v)) for i, v in zip(indices, values)]
    ranked = [entry for entry in ranked if entry[0] <= highest_layer][:top_k]
    neurons: dict[int, list[int]] = {}
    for layer, unit, _ in ranked:
        neurons.setdefault(layer, []).append(unit)
    return {layer: sorted(found) for layer, found in sorted(neurons.items())}, mean, len(scores)


@pytest.mark.parametrize("sparsity", [None, (0.5, 0.5), (0.5, 0.0)])
@pytest.mark.parametrize("overrides", [{}, {"num_register_tokens": 2}])
def test_search_reproduces_the_authors_search(sparsity, overrides):
    model = tiny_model(seed=1, **overrides)
    images = torch.randn(6, 3, 56, 56)
    with torch.no_grad():
        norms = model(images, output_hidden_states=True).hidden_states[2].norm(dim=-1)  # output of layer 1
    threshold = float(norms.flatten().quantile(0.9))
    expected, expected_scores, with_outliers = authors_find_register_neurons(
        model, images, threshold, detect_layer=-2, highest_layer=1, top_k=12, sparsity=sparsity
    )
    options = {} if sparsity is None else dict(sparsity_fraction=sparsity[0], sparsity_activation=sparsity[1])
    found = find_register_neurons(
        model,
        [images[:4], images[4:]],
        top_k=12,
        highest_layer=1,
        detection_layer=-2,
        threshold=threshold,
        norm_tokens="all",
        sparsity_filter=sparsity is not None,
        **options,
    )
    assert found.images_with_outliers == with_outliers
    torch.testing.assert_close(found.scores, expected_scores[:2], rtol=1e-5, atol=1e-6)
    assert found.neurons == expected
    if sparsity is not None:  # the filter removes units that score without it
        unfiltered = find_register_neurons(
            model, [images], top_k=12, highest_layer=1, threshold=threshold, norm_tokens="all"
        )
        removed = (found.scores == 0) & (unfiltered.scores > 0)
        assert removed.any() or sparsity == (0.5, 0.5)


def test_norm_tokens_all_counts_cls_and_registers_as_outliers():
    model = tiny_model(seed=1, num_register_tokens=2)
    with torch.no_grad():
        model.embeddings.cls_token.mul_(100.0)  # a CLS token of high norm at the detection layer
    images = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        hidden = model(images, output_hidden_states=True).hidden_states[2]
    threshold = float(hidden[:, 3:].norm(dim=-1).max()) + 1e-3  # above every patch
    assert (hidden[:, 0].norm(dim=-1) > threshold).all()
    found = find_register_neurons(model, [images], top_k=3, highest_layer=1, threshold=threshold, norm_tokens="all")
    assert found.images_with_outliers == 4
    with pytest.raises(ValueError, match="No patch exceeds"):
        find_register_neurons(model, [images], top_k=3, highest_layer=1, threshold=threshold)
    with pytest.raises(ValueError, match="norm_tokens"):
        find_register_neurons(model, [images], threshold=1.0, norm_tokens="cls")


def test_paper_settings_follow_the_authors_configs():
    assert PAPER_SETTINGS["openclip_vitb16"] == dict(
        top_k=10, highest_layer=5, detection_layer=-1, threshold=30.0, norm_tokens="all", sparsity_filter=True
    )
    assert PAPER_SETTINGS["dinov2_vitl14"] == dict(
        top_k=50, highest_layer=17, detection_layer=-2, threshold=150.0, norm_tokens="all", sparsity_filter=True
    )


def planted_model_directory(root):
    """A saved model whose layer-0 units 3 and 7 write a large vector into red patches, and 5 green photos with one
    red patch each: every patch embedding has the same norm, the red one becomes a high-norm outlier in layer 0."""
    from test_interventions import planted_model
    from transformers import BitImageProcessor

    model = planted_model()
    with torch.no_grad():
        conv = model.embeddings.patch_embeddings.projection
        conv.weight[:2] = 0.0
        conv.weight[0, 0] = 1.0 / (14 * 14)  # channel 0: mean red of the patch, which the planted units read
        conv.weight[1, 1] = 1.0 / (14 * 14)  # channel 1: mean green
    model.save_pretrained(root / "model")
    processor = BitImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, do_normalize=False, do_convert_rgb=True
    )
    processor.save_pretrained(root / "model")
    (root / "images").mkdir()
    for index in range(5):
        pixels = np.zeros((56, 56, 3), dtype=np.uint8)
        pixels[..., 1] = 255
        row, col = divmod(index * 5 % 16, 4)
        pixels[14 * row : 14 * row + 14, 14 * col : 14 * col + 14] = (255, 0, 0)
        Image.fromarray(pixels).save(root / "images" / f"{index}.png")
    return root / "model", root / "images"


def test_cli_find_register_neurons_takes_the_modes_and_the_authors_search(tmp_path, capsys):
    from vit_registers.cli import main

    model, images = planted_model_directory(tmp_path)
    common = ["find-register-neurons", "--model", str(model), "--images", str(images), "--top-k", "2"]
    common += ["--threshold", "100", "--highest-layer", "1"]
    out = tmp_path / "out"
    options = ["--num-tokens", "2", "--mode", "per_neuron", "--normal-values", "mean", "--scale", "2", "0.5"]
    options += ["--norm-tokens", "all", "--sparsity-filter"]
    assert main([*common, "--output-dir", str(out), *options]) == 0, capsys.readouterr().err
    report = json.loads((out / "register_neurons.json").read_text())
    stored = json.loads((out / "config.json").read_text())["test_time_registers"]
    assert stored == report["test_time_registers"]
    assert stored["mode"] == "per_neuron" and stored["normal_values"] == "mean" and stored["scale"] == [2.0, 0.5]
    assert report["search"] == {"norm_tokens": "all", "sparsity_filter": True}
    assert main([*common, "--output-dir", str(tmp_path / "default")]) == 0, capsys.readouterr().err
    default = json.loads((tmp_path / "default" / "config.json").read_text())["test_time_registers"]
    assert default["mode"] == "reference" and default["scale"] == 1.0 and default["neurons"] == {"0": [3, 7]}
    assert main([*common, "--output-dir", str(tmp_path / "bad"), "--scale", "1", "2", "3"]) != 0
    assert "--scale takes one factor or one per test-time token" in capsys.readouterr().err
