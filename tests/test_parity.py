"""Numerical parity with reference implementations, every output token, max abs diff <= 1e-5 (fp32).

References are built locally with random weights (every parameter re-drawn, not left at its init): timm models,
transformers Dinov2 / Dinov2WithRegisters, and official-DINOv2-format state dicts.
"""

from __future__ import annotations

import pytest
import timm  # a test extra: the parity references must exist, these tests are never skipped
import torch
import torch.nn.functional as F
import transformers
from realistic_weights import activation_stats, redraw_realistic_
from safetensors.torch import load_file, save_file

from vit_registers.conversion import build_reference, convert, model_tokens, reference_tokens

TOLERANCE = 1e-5
SMALL = dict(embed_dim=64, depth=2, num_heads=4)


def redraw_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter redrawn at a trained-like scale (`tests/realistic_weights.py`: activations of every block with
    std >= 1, LayerScale 0.1-1), where a wrong activation or eps would show, and none left at a structured init."""
    return redraw_realistic_(module, seed=seed)


def assert_tokens_close(ours: dict, reference: dict) -> None:
    for group in ("cls", "registers", "patches"):
        if reference[group] is None:
            assert ours[group] is None, f"{group}: reference has none"
            continue
        assert ours[group].shape == reference[group].shape, group
        if reference[group].numel():
            difference = (ours[group] - reference[group]).abs().max().item()
            assert difference <= TOLERANCE, f"{group}: max abs diff {difference:.2e} > {TOLERANCE}"


def sizes_for(patch: int, native: int) -> list[tuple[int, int]]:
    """Native size, a larger square and a non-square size (all multiples of the patch)."""
    return [(native, native), (native + 2 * patch, native + 2 * patch), (3 * patch, 5 * patch)]


TIMM_CASES = [
    ("vit_small_patch14_reg4_dinov2", dict(img_size=56)),
    ("vit_giant_patch14_reg4_dinov2", dict(img_size=56, mlp_ratio=4.0)),  # SwiGLU, giant-style with small dims
    ("deit3_small_patch16_224", dict(img_size=64)),
    ("vit_base_patch16_reg4_gap_256", dict(img_size=64)),  # no CLS, no final norm, fc_norm, no LayerScale
    ("vit_little_patch16_reg1_gap_256", dict(img_size=64)),
    ("vit_small_patch14_dinov2", dict(img_size=56)),  # CLS position embedding, no registers
]


@pytest.mark.parametrize("arch,extra", TIMM_CASES, ids=[case[0] for case in TIMM_CASES])
def test_timm_parity(arch, extra, tmp_path):
    reference = redraw_(
        timm.create_model(arch, pretrained=False, dynamic_img_size=True, num_classes=0, **SMALL, **extra)
    )
    stats = activation_stats(reference, torch.randn(2, 3, extra["img_size"], extra["img_size"]))
    assert min(stats.block_stds) >= 1 and min(stats.mlp_input_stds) >= 1, stats
    path = tmp_path / "model.safetensors"
    save_file(reference.state_dict(), str(path))
    model = convert("timm", path, arch=arch, num_attention_heads=SMALL["num_heads"])
    assert model.config.num_register_tokens == reference.num_reg_tokens
    assert model.config.use_cls_token == (reference.cls_token is not None)
    torch.manual_seed(1)
    for height, width in sizes_for(reference.patch_embed.patch_size[0], extra["img_size"]):
        pixels = torch.randn(2, 3, height, width)
        assert_tokens_close(model_tokens(model, pixels), reference_tokens(reference, pixels))
    # the pooled features equal timm's pre-logits (CLS token, or fc_norm of the mean of patches)
    pixels = torch.randn(2, 3, extra["img_size"], extra["img_size"])
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(pixels), pre_logits=True)
        torch.testing.assert_close(model(pixels).pooler_output, expected, atol=TOLERANCE, rtol=0)


def official_state_dict(timm_model: torch.nn.Module, swiglu: bool) -> dict[str, torch.Tensor]:
    """An official-DINOv2-format state dict. For models without registers timm's keys *are* the official ones, plus
    the mask token and the SwiGLU names `w12`/`w3` (the inverse of timm's public `_convert_dinov2`)."""
    state = {}
    for key, value in timm_model.state_dict().items():
        if swiglu:
            key = key.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
        state[key] = value.clone()
    state["mask_token"] = torch.randn(1, timm_model.embed_dim)
    return state


def official_patch_positions(
    position_embeddings: torch.Tensor, height: int, width: int, offset: float, antialias: bool
):
    """The official DINOv2 resampling formula (dinov2/models/vision_transformer.py, interpolate_pos_encoding)."""
    patch = position_embeddings[:, 1:]
    side = int(patch.shape[1] ** 0.5)
    grid = patch.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if offset:
        kwargs = dict(scale_factor=((height + offset) / side, (width + offset) / side))
    else:
        kwargs = dict(size=(height, width))
    out = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    assert out.shape[-2:] == (height, width)
    return torch.cat([position_embeddings[:, :1], out.permute(0, 2, 3, 1).reshape(1, height * width, -1)], dim=1)


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_official_dinov2_without_registers_uses_offset_interpolation(swiglu):
    """Official models without registers: antialias off, offset 0.1 (checked against the official formula)."""
    arch = "vit_giant_patch14_dinov2" if swiglu else "vit_small_patch14_dinov2"
    extra = dict(mlp_ratio=4.0) if swiglu else {}
    timm_model = redraw_(timm.create_model(arch, pretrained=False, img_size=56, num_classes=0, **SMALL, **extra))
    state = official_state_dict(timm_model, swiglu)
    model = convert("dinov2", state, num_attention_heads=4)
    assert (model.config.interpolate_offset, model.config.interpolate_antialias) == (0.1, False)
    assert model.config.mlp_type == ("swiglu" if swiglu else "mlp")
    for height, width in [(4, 4), (6, 6), (3, 5)]:
        # reference: a timm model built at exactly this grid, fed the officially resampled position embeddings
        fixed = timm.create_model(
            arch, pretrained=False, img_size=(14 * height, 14 * width), num_classes=0, **SMALL, **extra
        )
        weights = dict(timm_model.state_dict())
        if (height, width) != (4, 4):
            weights["pos_embed"] = official_patch_positions(weights["pos_embed"], height, width, 0.1, False)
        fixed.load_state_dict(weights)
        pixels = torch.randn(2, 3, 14 * height, 14 * width)
        assert_tokens_close(model_tokens(model, pixels), reference_tokens(fixed.eval(), pixels))


def test_official_dinov2_with_registers_through_timm_filter():
    """Official `_reg` checkpoints (register_tokens, 1+N pos_embed, mask_token) against timm's own converter."""
    timm_model = redraw_(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, **SMALL))
    generator = torch.Generator().manual_seed(3)
    state = {k: v.clone() for k, v in timm_model.state_dict().items() if not k.startswith("head")}
    state["register_tokens"] = state.pop("reg_token")
    state["pos_embed"] = torch.cat([torch.randn(1, 1, 64, generator=generator), state["pos_embed"]], dim=1)
    state["mask_token"] = torch.randn(1, 64, generator=generator)
    model = convert("dinov2", state, arch=None, num_attention_heads=4)
    assert model.config.num_register_tokens == 4
    assert (model.config.interpolate_offset, model.config.interpolate_antialias) == (0.0, True)
    reference = build_reference("dinov2", state, num_attention_heads=4)
    for height, width in sizes_for(14, 56):
        pixels = torch.randn(2, 3, height, width)
        assert_tokens_close(model_tokens(model, pixels), reference_tokens(reference, pixels))
    # the mask token is carried over: masked patches equal in both
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, :5] = True
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        masked = model(pixels, bool_masked_pos=mask).patch_tokens
        plain = model(pixels).patch_tokens
    assert not torch.allclose(masked[:, :5], plain[:, :5])
    torch.testing.assert_close(model.embeddings.mask_token.reshape(-1), state["mask_token"].reshape(-1))


def official_hub_arch_config():
    from vit_registers.conversion import OFFICIAL_DINOV2

    assert len(OFFICIAL_DINOV2) == 8
    return OFFICIAL_DINOV2


def test_official_arch_names_fix_the_interpolation_flags():
    table = official_hub_arch_config()
    assert table["dinov2_vitg14_reg"]["mlp_type"] == "swiglu" and table["dinov2_vitg14_reg"]["num_register_tokens"] == 4
    assert table["dinov2_vitl14"]["interpolate_offset"] == 0.1 and not table["dinov2_vitl14"]["interpolate_antialias"]
    assert (
        table["dinov2_vitb14_reg"]["interpolate_offset"] == 0.0 and table["dinov2_vitb14_reg"]["interpolate_antialias"]
    )


def _hf_model(with_registers: bool, swiglu: bool):
    kwargs = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        use_swiglu_ffn=swiglu,
        layerscale_value=0.5,
    )
    if with_registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **kwargs)
        return redraw_(transformers.Dinov2WithRegistersModel(config))
    config = transformers.Dinov2Config(**kwargs)
    return redraw_(transformers.Dinov2Model(config))


@pytest.mark.parametrize("with_registers", [True, False], ids=["with_registers", "dinov2"])
@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
@pytest.mark.parametrize("legacy", [False, True], ids=["current_keys", "legacy_keys"])
def test_transformers_parity(with_registers, swiglu, legacy, tmp_path):
    reference = _hf_model(with_registers, swiglu)
    reference.save_pretrained(tmp_path)  # transformers 5 writes the legacy names (attention.attention.query, ...)
    saved = load_file(str(tmp_path / "model.safetensors"))
    if legacy:
        assert any(".attention.attention.query." in key for key in saved)
    else:  # the names of the in-memory v5 modules (q_proj, gate_proj/up_proj, ...)
        save_file(reference.state_dict(), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        assert any(".attention.q_proj." in key for key in reference.state_dict())
        reloaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
        pixels = torch.randn(1, 3, 56, 56)
        torch.testing.assert_close(reloaded(pixels).last_hidden_state, reference(pixels).last_hidden_state)
    model = convert("transformers", tmp_path)
    assert model.config.num_register_tokens == (4 if with_registers else 0)
    for height, width in sizes_for(14, 56):
        pixels = torch.randn(2, 3, height, width)
        assert_tokens_close(model_tokens(model, pixels), reference_tokens(reference, pixels))


def _at_grid(model, grid: tuple[int, int], position_embeddings: torch.Tensor):
    """The same weights in a model whose stored grid is `grid`, holding `position_embeddings`: it never resamples."""
    from vit_registers import ViTRegistersConfig, ViTRegistersModel

    values = model.config.to_dict()
    values["image_size"] = [grid[0] * model.config.patch_size, grid[1] * model.config.patch_size]
    fixed = ViTRegistersModel(ViTRegistersConfig(**values))
    state = dict(model.state_dict())
    state["embeddings.position_embeddings"] = position_embeddings
    fixed.load_state_dict(state)
    return fixed.eval()


@pytest.mark.parametrize("with_registers", [False, True], ids=["dinov2", "with_registers"])
def test_transformers_conversion_with_official_interpolation_follows_the_official_formula(with_registers, tmp_path):
    """`interpolation="official"`: every token at other sizes equals a model fed the official DINOv2 resampling
    (offset 0.1 without registers); "source" (the default) equals transformers' formula (offset 0) instead."""
    reference = _hf_model(with_registers, swiglu=False)
    reference.save_pretrained(tmp_path)
    source = convert("transformers", tmp_path)
    official = convert("transformers", tmp_path, interpolation="official")
    expected = (True, 0.0) if with_registers else (False, 0.1)
    assert (official.config.interpolate_antialias, official.config.interpolate_offset) == expected
    assert (source.config.interpolate_antialias, source.config.interpolate_offset) == (with_registers, 0.0)
    stored = source.embeddings.position_embeddings.detach()
    torch.manual_seed(2)
    for height, width in [(6, 6), (3, 5)]:
        pixels = torch.randn(2, 3, 14 * height, 14 * width)
        for model, offset in ((official, expected[1]), (source, 0.0)):
            resampled = official_patch_positions(stored, height, width, offset, antialias=with_registers)
            assert_tokens_close(
                model_tokens(model, pixels), model_tokens(_at_grid(model, (height, width), resampled), pixels)
            )
        assert_tokens_close(model_tokens(source, pixels), reference_tokens(reference, pixels))  # source = transformers
        difference = (model_tokens(official, pixels)["patches"] - model_tokens(source, pixels)["patches"]).abs().max()
        assert (difference > 1e-3) == (not with_registers)  # without registers the two formulas differ
    pixels = torch.randn(1, 3, 56, 56)  # at the stored grid nothing is resampled
    assert_tokens_close(model_tokens(official, pixels), reference_tokens(reference, pixels))


def test_official_interpolation_is_refused_for_weights_that_are_not_dinov2():
    reference = redraw_(timm.create_model("deit3_small_patch16_224", pretrained=False, img_size=64, **SMALL))
    with pytest.raises(ValueError, match="DINOv2 weights only"):
        convert("timm", reference.state_dict(), arch="deit3_small_patch16_224", interpolation="official")
    timm_dinov2 = redraw_(timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, **SMALL))
    model = convert("timm", timm_dinov2.state_dict(), arch="vit_small_patch14_dinov2", interpolation="official")
    assert (model.config.interpolate_antialias, model.config.interpolate_offset) == (False, 0.1)
    with pytest.raises(ValueError, match="interpolation"):
        convert("transformers", {}, interpolation="bilinear")


def test_transformers_head_checkpoint_prefix_is_stripped(tmp_path):
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14, num_labels=3
    )
    classifier = redraw_(transformers.Dinov2WithRegistersForImageClassification(config))
    classifier.save_pretrained(tmp_path)
    model = convert("transformers", tmp_path)
    pixels = torch.randn(1, 3, 56, 56)
    expected = classifier.dinov2_with_registers(pixels).last_hidden_state
    torch.testing.assert_close(model(pixels).last_hidden_state, expected, atol=TOLERANCE, rtol=0)


def test_timm_head_count_comes_from_the_registry_when_the_width_matches():
    from vit_registers.conversion import _timm_registry_hints

    assert _timm_registry_hints("vit_little_patch16_reg1_gap_256", 320) == {"num_attention_heads": 5}
    assert _timm_registry_hints("vit_little_patch16_reg1_gap_256", 64) == {}  # another width: not that model
    with pytest.raises(ValueError, match="Unknown timm architecture"):
        _timm_registry_hints("vit_does_not_exist", 64)


def test_convert_never_shares_storage_with_a_callers_state_dict():
    reference = redraw_(timm.create_model("deit3_small_patch16_224", pretrained=False, img_size=64, **SMALL))
    state = reference.state_dict()
    model = convert("timm", state, num_attention_heads=4)
    assert all(p.device.type == "cpu" and p.requires_grad for p in model.parameters())
    pointers = {t.untyped_storage().data_ptr() for t in state.values()}
    assert not any(p.untyped_storage().data_ptr() in pointers for p in model.parameters())
    with torch.no_grad():
        reference.pos_embed.add_(torch.randn_like(reference.pos_embed))  # (a constant would vanish in LayerNorm)
    pixels = torch.randn(1, 3, 64, 64)
    assert (model_tokens(model, pixels)["patches"] - reference_tokens(reference, pixels)["patches"]).abs().max() > 1e-3
