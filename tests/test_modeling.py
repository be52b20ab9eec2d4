"""ViTRegistersModel: outputs, attention backends, heads, masking, errors, checkpointing, compile and export.

A tiny config (image 28, patch 14, hidden 32, 2 layers) keeps every test in milliseconds, as transformers' ModelTester.
"""

from __future__ import annotations

import os

import pytest
import torch

from vit_registers import (
    ViTRegistersBackbone,
    ViTRegistersConfig,
    ViTRegistersForImageClassification,
    ViTRegistersModel,
)

TINY = dict(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2.0)
# The register families of issue 20, as overrides of any size: the tests of attention backends, compile and export run
# on each (tests/test_dinov3_style.py checks the package's other features on them).
FAMILIES = {
    "learned": {},  # DINOv2 with registers
    "dinov3": dict(  # 2D RoPE on the patches, no stored position embeddings; train-time coordinate rescaling
        position_encoding="rope", rope_theta=100.0, rope_rescale_coords=2.0, layer_norm_eps=1e-5, layerscale_value=1e-5
    ),
    "map": dict(  # timm's vit_so150m*_reg4_map*: no CLS, stored position embeddings over the registers, attention pool
        use_cls_token=False,
        cls_token_has_position_embedding=False,
        register_tokens_have_position_embedding=True,
        pooling="map",
    ),
}
# for tests that compile (flex attention, torch.compile: 10-30 s each on a busy 2-core machine): the new families slow
COMPILED_FAMILIES = ["learned", *(pytest.param(family, marks=pytest.mark.slow) for family in ("dinov3", "map"))]


def tiny_config(**overrides) -> ViTRegistersConfig:
    return ViTRegistersConfig(**{**TINY, **overrides})


def tiny_model(cls=ViTRegistersModel, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = cls(tiny_config(**overrides))
    with torch.no_grad():  # LayerScale starts at 1 and tokens at small values: draw everything at random
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


@pytest.mark.parametrize("registers", [0, 1, 4])
@pytest.mark.parametrize("cls_token", [True, False])
def test_output_groups(registers, cls_token):
    overrides = dict(num_register_tokens=registers)
    if not cls_token:
        overrides.update(use_cls_token=False, cls_token_has_position_embedding=False, pooling="mean", use_fc_norm=True)
    model = tiny_model(**overrides)
    pixels = torch.randn(2, 3, 28, 42)  # non-square: 2 x 3 patches
    out = model(pixels, output_hidden_states=True)
    prefix = int(cls_token) + registers
    assert out.last_hidden_state.shape == (2, prefix + 6, 32)
    assert out.register_tokens.shape == (2, registers, 32)
    assert out.patch_tokens.shape == (2, 6, 32)
    assert out.pooler_output.shape == (2, 32)
    torch.testing.assert_close(out.patch_tokens, out.last_hidden_state[:, prefix:])
    torch.testing.assert_close(out.register_tokens, out.last_hidden_state[:, int(cls_token) : prefix])
    if cls_token:
        torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0])
    else:
        torch.testing.assert_close(out.pooler_output, model.fc_norm(out.patch_tokens.mean(1)))
    # hidden states: embeddings + one per layer, before the final norm
    assert len(out.hidden_states) == 4
    torch.testing.assert_close(model.layernorm(out.hidden_states[-1]), out.last_hidden_state)
    assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)


def test_registers_carry_no_position_embedding_and_cls_does():
    model = tiny_model(num_register_tokens=2)
    embeddings = model.embeddings(torch.zeros(1, 3, 28, 28))
    torch.testing.assert_close(embeddings[0, 1:3], model.embeddings.register_tokens[0])
    expected_cls = model.embeddings.cls_token[0, 0] + model.embeddings.position_embeddings[0, 0]
    torch.testing.assert_close(embeddings[0, 0], expected_cls)


def test_registers_change_the_other_tokens():
    """Registers take part in attention: changing them changes CLS and patches."""
    model = tiny_model(num_register_tokens=2)
    pixels = torch.randn(1, 3, 28, 28)
    before = model(pixels).patch_tokens
    with torch.no_grad():
        model.embeddings.register_tokens.add_(torch.randn_like(model.embeddings.register_tokens))
    assert (model(pixels).patch_tokens - before).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_attentions_are_real_under_every_backend(family):
    pixels = torch.randn(2, 3, 28, 42)
    outputs = {}
    for backend in ("eager", "sdpa", "flex_attention"):
        model = tiny_model(**FAMILIES[family])
        model.set_attn_implementation(backend)
        assert model.config._attn_implementation == backend
        outputs[backend] = model(pixels, output_attentions=True)
    eager = outputs["eager"]
    tokens = model.config.num_prefix_tokens + 6  # 11 with a CLS, 10 without
    assert len(eager.attentions) == 3 and eager.attentions[0].shape == (2, 4, tokens, tokens)
    torch.testing.assert_close(eager.attentions[0].sum(-1), torch.ones(2, 4, tokens))
    for backend in ("sdpa", "flex_attention"):
        for ours, ref in zip(outputs[backend].attentions, eager.attentions):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(outputs[backend].last_hidden_state, eager.last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", COMPILED_FAMILIES)
def test_fast_backends_agree_with_eager_without_weights(family):
    pixels = torch.randn(2, 3, 42, 28)
    results = []
    for backend in ("eager", "sdpa", "flex_attention"):
        model = tiny_model(**FAMILIES[family])
        model.set_attn_implementation(backend)
        with torch.no_grad():  # torch's flex attention has no CPU backward
            results.append(model(pixels).last_hidden_state)
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_of_chosen_layers_only(family):
    model = tiny_model(**FAMILIES[family])  # sdpa by default
    assert model.config._attn_implementation == "sdpa"
    pixels = torch.randn(1, 3, 28, 28)
    full = model(pixels, output_attentions=True)
    last = model(pixels, attention_layers=[-1])
    assert len(last.attentions) == 1
    torch.testing.assert_close(last.attentions[0], full.attentions[-1])
    some = model(pixels, output_attentions=True, attention_layers=[0, 2])
    torch.testing.assert_close(torch.stack(some.attentions), torch.stack([full.attentions[0], full.attentions[2]]))
    torch.testing.assert_close(last.last_hidden_state, full.last_hidden_state, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="Layer 5 does not exist"):
        model(pixels, attention_layers=[5])


def test_eager_model_returns_no_attentions_unless_asked():
    model = tiny_model()
    model.set_attn_implementation("eager")
    assert model(torch.randn(1, 3, 28, 28)).attentions is None


def test_bool_masked_pos_uses_mask_token():
    model = tiny_model(num_register_tokens=1)
    pixels = torch.randn(2, 3, 28, 28)
    mask = torch.tensor([[True, False, False, True], [False, False, False, False]])
    masked = model.embeddings(pixels, bool_masked_pos=mask)
    plain = model.embeddings(pixels)
    positions = model.embeddings.position_embeddings[0, 1:]
    torch.testing.assert_close(masked[0, 2], model.embeddings.mask_token[0, 0] + positions[0])
    torch.testing.assert_close(masked[1], plain[1])
    torch.testing.assert_close(masked[0, 3:5], plain[0, 3:5])
    with pytest.raises(ValueError, match="use_mask_token=False"):
        tiny_model(use_mask_token=False)(pixels, bool_masked_pos=mask)
    with pytest.raises(ValueError, match="marks 6 patches but the image has 4"):
        model(pixels, bool_masked_pos=torch.zeros(2, 6, dtype=torch.bool))


def test_position_embedding_resampling_is_identity_at_the_stored_grid():
    model = tiny_model()
    stored = model.embeddings.position_embeddings[:, 1:]
    torch.testing.assert_close(model.embeddings.interpolate_pos_encoding(2, 2), stored)
    torch.compiler.is_exporting  # noqa: B018 - exists in this torch
    grid = stored.reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid, size=(2, 2), mode="bicubic", antialias=True)
    torch.testing.assert_close(resized.permute(0, 2, 3, 1).reshape(1, 4, -1), stored, atol=0, rtol=0)


def test_bad_inputs_name_the_problem():
    model = tiny_model()
    with pytest.raises(ValueError, match="1 channels but the model expects 3"):
        model(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match="30x28 is not a multiple of the patch size 14"):
        model(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        model(torch.randn(3, 28, 28))


@pytest.mark.parametrize("pooling", ["cls", "mean", "cls_mean"])
def test_classification_pooling_and_loss(pooling):
    model = tiny_model(ViTRegistersForImageClassification, pooling=pooling, num_labels=5, use_fc_norm=pooling != "cls")
    pixels = torch.randn(3, 3, 28, 28)
    labels = torch.tensor([0, 4, 2])
    out = model(pixels, labels=labels)
    assert out.logits.shape == (3, 5)
    expected = torch.nn.functional.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.loss, expected)
    base = model.vit_registers(pixels)
    cls_token, mean = base.last_hidden_state[:, 0], model.vit_registers.fc_norm(base.patch_tokens.mean(1))
    features = {"cls": cls_token, "mean": mean, "cls_mean": torch.cat([cls_token, mean], -1)}[pooling]
    torch.testing.assert_close(out.logits, model.classifier(features))
    out.loss.backward()
    assert model.vit_registers.embeddings.register_tokens.grad is not None


def test_registers_are_never_pooled():
    model = tiny_model(ViTRegistersForImageClassification, pooling="cls_mean", num_labels=2)
    pixels = torch.randn(1, 3, 28, 28)
    base = model.vit_registers(pixels)
    mean = base.patch_tokens.mean(1)
    assert not torch.allclose(mean, base.last_hidden_state[:, 1:].mean(1))
    torch.testing.assert_close(base.pooler_output[:, 32:], mean)


def test_backbone_feature_maps():
    config = tiny_config(num_register_tokens=2, out_indices=[1, 3])
    torch.manual_seed(0)
    backbone = ViTRegistersBackbone(config).eval()
    pixels = torch.randn(2, 3, 28, 42)
    out = backbone(pixels)
    assert backbone.out_features == ["stage1", "stage3"]
    assert [tuple(m.shape) for m in out.feature_maps] == [(2, 32, 2, 3), (2, 32, 2, 3)]
    hidden = backbone.vit_registers(pixels, output_hidden_states=True).hidden_states[3]
    patches = backbone.vit_registers.layernorm(hidden)[:, 3:]
    torch.testing.assert_close(out.feature_maps[1], patches.reshape(2, 2, 3, 32).permute(0, 3, 1, 2))
    assert out.hidden_states is None


def test_gradient_checkpointing_gives_the_same_gradients():
    pixels = torch.randn(2, 3, 28, 28)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(ViTRegistersForImageClassification, num_labels=3).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        model(pixels, labels=torch.tensor([0, 2])).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_drop_path_decays_linearly_and_only_in_training():
    model = tiny_model(drop_path_rate=0.2)
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.encoder.layer]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    pixels = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(model(pixels).last_hidden_state, model(pixels).last_hidden_state)


@pytest.mark.parametrize("family", COMPILED_FAMILIES)
def test_torch_compile_fullgraph_captures_without_graph_breaks(family):
    model = tiny_model(**FAMILIES[family])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    pixels = torch.randn(2, 3, 28, 42)
    got, want = compiled(pixels), model(pixels)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    model = tiny_model(num_register_tokens=2)
    compiled = torch.compile(model, fullgraph=True)
    pixels = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        got, want = compiled(pixels), model(pixels)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.register_tokens, want.register_tokens, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export_with_dynamic_height_and_width(family):
    model = tiny_model(**{"num_register_tokens": 2, **FAMILIES[family]})

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            out = self.inner(pixel_values)
            return out.last_hidden_state, out.register_tokens, out.patch_tokens, out.pooler_output

    rows = torch.export.Dim("rows", min=2, max=32)
    cols = torch.export.Dim("cols", min=2, max=32)
    example = torch.randn(2, 3, 28, 42)
    exported = torch.export.export(
        Wrapper(model), (example,), dynamic_shapes={"pixel_values": {2: 14 * rows, 3: 14 * cols}}
    )
    for height, width in [(28, 28), (56, 42), (28, 70)]:
        pixels = torch.randn(2, 3, height, width)
        expected = Wrapper(model)(pixels)
        for got, want in zip(exported.module()(pixels), expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_hub_code_files_use_only_public_torch_apis():
    """The files `save_pretrained` copies next to the weights (what every `trust_remote_code` user downloads) hold
    no device dispatch and nothing private of torch: no `torch.ops`, no `mkldnn`, no `torch._*` module or attribute.
    Device kernels live in `vit_registers.onednn`, which these files never import."""
    import ast
    from pathlib import Path

    import vit_registers

    package = Path(vit_registers.__file__).parent
    torch_names = {"torch", "F", "nn", "init"}
    for name in ("modeling_vit_registers.py", "configuration_vit_registers.py"):
        source = (package / name).read_text()
        assert "mkldnn" not in source and "onednn" not in source.replace("vit_registers.onednn", ""), name
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                private = [part for part in module.split(".") if part.startswith("_") and part != "__future__"]
                assert not private, (name, module)
                assert node.level == 0 or module == "configuration_vit_registers", (name, module)
                assert not module.startswith("vit_registers"), (name, module)
            if isinstance(node, ast.Attribute):
                chain, inner = [node.attr], node.value
                while isinstance(inner, ast.Attribute):
                    chain.append(inner.attr)
                    inner = inner.value
                if isinstance(inner, ast.Name) and inner.id in torch_names:
                    chain.reverse()
                    assert "ops" not in chain and not any(part.startswith("_") for part in chain), (name, chain)
        lines = len(source.splitlines())
        assert name != "modeling_vit_registers.py" or lines < 900, f"the model file grew to {lines} lines"


def test_saved_weights_get_the_mode_of_any_new_file(tmp_path):
    """safetensors writes a temporary file (0600) and renames it; `save_pretrained` gives the weights the mode of
    `config.json` (0644 under umask 022), sharded or not. Every writer of a model goes through it: `scripts/convert.py`,
    `scripts/finetune.py` and `Trainer.save_model` (their tests check the mode too), `find-register-neurons`."""
    umask = os.umask(0o022)
    try:
        tiny_model(ViTRegistersForImageClassification).save_pretrained(tmp_path / "single")
        tiny_model().save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    finally:
        os.umask(umask)
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    for folder in ("single", "sharded"):
        written = [*(tmp_path / folder).glob("*.safetensors"), tmp_path / folder / "config.json"]
        assert len(written) >= 2
        for path in written:
            assert path.stat().st_mode & 0o777 == 0o644, path


def test_find_register_neurons_writes_weights_0644(tmp_path):
    """The command saves through `save_pretrained`: its weights come out 0644 like its JSON files."""
    from tests.test_cli_register_neurons import _images, _saved_model
    from vit_registers.cli import main

    _saved_model(tmp_path / "model")
    argv = ["find-register-neurons", "--model", str(tmp_path / "model"), "--images", str(_images(tmp_path / "in"))]
    umask = os.umask(0o022)
    try:
        code = main([*argv, "--output-dir", str(tmp_path / "out"), "--top-k", "6", "--percentile", "90", "--force"])
    finally:
        os.umask(umask)
    assert code == 0
    for name in ("model.safetensors", "config.json", "register_neurons.json"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name
