"""DINOv3 conversion (issue 20): official checkpoints and transformers DINOv3ViT, every token ≤ 1e-5 in float32.

Reference weights are redrawn at a realistic scale (`realistic_weights`: every block's hidden states and MLP inputs
with std ≥ 1, LayerScale 0.1–1), so that a wrong activation or a wrong eps shows (the negative tests prove it);
three input sizes each, one non-square. Official-format state dicts are built here with the official key names and
shapes (facebookresearch/dinov3: `storage_tokens`, `rope_embed.periods`, `qkv.bias_mask`, `local_cls_norm`,
`ls1.gamma`, SwiGLU `w1` / `w2` / `w3`, mask token (1, D)) and compared with timm's DINOv3 port loaded through
timm's own `checkpoint_filter_fn`. Also: parity on the real trained DINOv2-S weights in ../shared/real-weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import timm
import torch
import transformers
from realistic_weights import activation_stats, redraw_realistic_
from safetensors.torch import load_file, save_file

from vit_registers.conversion import (
    ConversionError,
    build_reference,
    convert,
    interpolation_summary,
    model_tokens,
    reference_tokens,
    source_interpolation,
)
from vit_registers.conversion.dinov3 import OFFICIAL_DINOV3

TOLERANCE = 1e-5
PATCH = 16
SIZES = [(64, 64), (96, 96), (48, 80)]  # stored grid 4×4, larger, non-square 3×5
REAL_DINOV2_S = Path(__file__).resolve().parents[1] / ".." / "shared" / "real-weights" / "dinov2-small-imgfocus"


def max_diff(ours: dict, theirs: dict) -> float:
    worst = 0.0
    for group in ("cls", "registers", "patches"):
        assert (ours[group] is None) == (theirs[group] is None), group
        if theirs[group] is not None and theirs[group].numel():
            assert ours[group].shape == theirs[group].shape, group
            worst = max(worst, (ours[group] - theirs[group]).abs().max().item())
    return worst


def worst_over_sizes(model, reference, sizes=SIZES, seed: int = 1) -> float:
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for height, width in sizes:
        pixels = torch.randn(2, 3, height, width, generator=generator)
        worst = max(worst, max_diff(model_tokens(model, pixels), reference_tokens(reference, pixels)))
    return worst


def assert_realistic(module, *inputs) -> None:
    stats = activation_stats(module, *inputs)
    assert stats.minimum >= 1.0, stats


# ----------------------------------------------------------------------------------------------------------------------
# Official-format state dicts (three architecture styles, shrunk)
# ----------------------------------------------------------------------------------------------------------------------
# name: (width, heads, Eva mlp_ratio (the gated width for SwiGLU), SwiGLU align, qkv bias, local_cls_norm)
OFFICIAL_STYLES = {
    "mlp": (64, 4, 4.0, None, True, False),  # dinov3_vits16 / vitb16 / vitl16
    "swiglu": (64, 4, 176 / 64, 8, True, False),  # vits16plus / vitl16plus / vith16plus (2/3 · 4 · 64 → 176)
    "swiglu64_7b": (128, 1, 192 / 128, 64, False, True),  # vit7b16: head size 128, no qkv bias, local_cls_norm
}


def eva_model(style: str, seed: int = 0):
    width, heads, ratio, align, qkv_bias, _ = OFFICIAL_STYLES[style]
    kwargs = dict(embed_dim=width, depth=2, num_heads=heads, img_size=64, num_classes=0, qkv_bias=qkv_bias)
    kwargs["mlp_ratio"] = ratio + 1e-9
    if align:
        kwargs["swiglu_align_to"] = align
    arch = "vit_small_plus_patch16_dinov3" if align else "vit_small_patch16_dinov3"
    return redraw_realistic_(timm.create_model(arch, pretrained=False, **kwargs), seed=seed)


def official_state_dict(style: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """An official-format state dict of the shrunk `style` and the redrawn timm Eva its weights come from."""
    eva = eva_model(style, seed)
    width, heads, _, align, qkv_bias, local_norm = OFFICIAL_STYLES[style]
    state = official_from_eva(eva, heads, swiglu=bool(align), local_norm=local_norm, seed=seed)
    assert qkv_bias == any(key.endswith("qkv.bias") for key in state)
    return state, eva


def official_from_eva(eva, heads: int, swiglu: bool, local_norm: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of the official `DinoVisionTransformer` with the weights of a timm Eva: the inverse of timm's
    `checkpoint_filter_fn`, plus what the official model stores and timm does not (a random key bias that the stored
    `bias_mask` zeroes, the periods, the (1, D) mask token, `local_cls_norm`)."""
    width = eva.embed_dim

    generator = torch.Generator().manual_seed(100 + seed)
    state: dict[str, torch.Tensor] = {}
    for key, value in eva.state_dict().items():
        if key.startswith("rope."):
            continue
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if swiglu:
            key = key.replace("mlp.fc1_g", "mlp.w1").replace("mlp.fc1_x", "mlp.w2").replace("mlp.fc2", "mlp.w3")
        if key.endswith("attn.q_bias"):
            block = key.removesuffix("q_bias")
            key_bias = torch.randn(width, generator=generator)  # trained models carry one; the mask removes it
            state[f"{block}qkv.bias"] = torch.cat([value, key_bias, eva.state_dict()[f"{block}v_bias"]])
            state[f"{block}qkv.bias_mask"] = torch.cat([torch.ones(width), torch.zeros(width), torch.ones(width)])
            continue
        if key.endswith("attn.v_bias"):
            continue
        state[key] = value.clone()
    state["mask_token"] = torch.randn(1, width, generator=generator)
    bands = width // heads // 4
    state["rope_embed.periods"] = 100.0 ** (2 * torch.arange(bands, dtype=torch.float32) / (bands * 2))
    if local_norm:
        state["local_cls_norm.weight"] = torch.rand(width, generator=generator) + 0.5
        state["local_cls_norm.bias"] = torch.randn(width, generator=generator)
    return state


@pytest.mark.parametrize("style", list(OFFICIAL_STYLES))
def test_official_dinov3_every_token_matches_timm_through_its_own_filter(style, tmp_path):
    state, eva = official_state_dict(style)
    path = tmp_path / "dinov3.pth"
    torch.save(state, path)
    assert torch.load(path, weights_only=True).keys() == state.keys()  # a plain tensor dict: weights_only reads it
    model = convert("dinov3", path)
    config = model.config
    width, heads, _, align, qkv_bias, _ = OFFICIAL_STYLES[style]
    assert (config.position_encoding, config.rope_type, config.rope_theta) == ("rope", "dinov3", 100.0)
    assert config.num_attention_heads == heads  # from the stored periods (the 7B style has head size 128)
    assert (config.layer_norm_eps, config.num_register_tokens, config.qkv_bias) == (1e-5, 4, qkv_bias)
    assert config.mlp_type == ("swiglu" if align else "mlp") and config.rope_rescale_coords == 2.0
    if qkv_bias:  # the masked key third is zero in the converted model
        bias = model.encoder.layer[0].attention.qkv.bias
        assert torch.count_nonzero(bias[width : 2 * width]) == 0 and torch.count_nonzero(bias[:width]) == width
    reference = build_reference("dinov3", path)
    pixels = torch.randn(2, 3, 48, 80)
    assert_realistic(reference, pixels)
    torch.testing.assert_close(  # timm's filter reproduced the Eva the weights came from
        reference.forward_features(pixels), eva.forward_features(pixels), rtol=0, atol=1e-6
    )
    worst = worst_over_sizes(model, reference)
    assert worst <= TOLERANCE, f"{style}: max abs diff {worst:.2e}"
    # the mask token (official (1, D)) is carried over
    torch.testing.assert_close(model.embeddings.mask_token.reshape(-1), state["mask_token"].reshape(-1))
    assert "nothing is resampled" in interpolation_summary("dinov3", config, path)
    assert source_interpolation("dinov3", config, path) == {}


OFFICIAL_CODE_STYLES = {  # DinoVisionTransformer arguments of the shrunk styles (dinov3/hub/backbones.py otherwise)
    "mlp": dict(embed_dim=64, num_heads=4, ffn_ratio=4.0, ffn_layer="mlp", qkv_bias=True),
    "swiglu": dict(embed_dim=64, num_heads=4, ffn_ratio=4.0, ffn_layer="swiglu", qkv_bias=True),
    "swiglu64_7b": dict(
        embed_dim=128,
        num_heads=1,
        ffn_ratio=2.0,
        ffn_layer="swiglu64",
        qkv_bias=False,
        untie_global_and_local_cls_norm=True,
    ),
}


@pytest.mark.skipif(not os.environ.get("DINOV3_SRC"), reason="set DINOV3_SRC to a facebookresearch/dinov3 checkout")
@pytest.mark.parametrize("style", list(OFFICIAL_STYLES))
def test_official_code_has_the_same_keys_and_outputs(style, monkeypatch):
    """With the official code at hand (`DINOV3_SRC`): the state dicts built here have exactly its keys and shapes,
    and its own forward gives our tokens (measured: 0.0 for the three styles)."""
    monkeypatch.syspath_prepend(os.environ["DINOV3_SRC"])
    from dinov3.models.vision_transformer import DinoVisionTransformer

    official = DinoVisionTransformer(
        img_size=64,
        patch_size=16,
        depth=2,
        pos_embed_rope_base=100,
        pos_embed_rope_rescale_coords=2,
        pos_embed_rope_dtype="fp32",
        layerscale_init=1e-5,
        norm_layer="layernormbf16",
        n_storage_tokens=4,
        mask_k_bias=True,
        **OFFICIAL_CODE_STYLES[style],
    )
    state, _ = official_state_dict(style)
    assert {k: v.shape for k, v in official.state_dict().items()} == {k: v.shape for k, v in state.items()}
    official.load_state_dict(state, strict=True)
    model = convert("dinov3", state)
    generator = torch.Generator().manual_seed(1)
    for height, width in SIZES:
        pixels = torch.randn(2, 3, height, width, generator=generator)
        with torch.no_grad():
            out = official.eval().forward_features(pixels)
        expected = dict(
            cls=out["x_norm_clstoken"], registers=out["x_storage_tokens"], patches=out["x_norm_patchtokens"]
        )
        assert max_diff(model_tokens(model, pixels), expected) <= TOLERANCE


def test_official_prefixed_teacher_checkpoint_converts_the_same(tmp_path):
    state, _ = official_state_dict("mlp")
    plain = convert("dinov3", state)
    wrapped = convert("dinov3", {"teacher": {f"backbone.{key}": value for key, value in state.items()}})
    pixels = torch.randn(1, 3, 48, 80)
    torch.testing.assert_close(wrapped(pixels).last_hidden_state, plain(pixels).last_hidden_state, rtol=0, atol=0)


def test_official_arch_table_matches_the_hub_entry_points():
    assert set(OFFICIAL_DINOV3) == {
        "dinov3_vits16",
        "dinov3_vits16plus",
        "dinov3_vitb16",
        "dinov3_vitl16",
        "dinov3_vitl16plus",
        "dinov3_vith16plus",
        "dinov3_vit7b16",
    }
    from vit_registers import ViTRegistersConfig

    def mlp_width(name):
        return ViTRegistersConfig(**{**OFFICIAL_DINOV3[name], "num_hidden_layers": 1}).mlp_hidden_size

    # official SwiGLUFFN: d = int(dim * ffn_ratio * 2 / 3) rounded up to align_to; Mlp: dim * ffn_ratio
    assert mlp_width("dinov3_vits16") == 1536 and mlp_width("dinov3_vitb16") == 3072
    assert mlp_width("dinov3_vits16plus") == 1536 and mlp_width("dinov3_vitl16plus") == 4096
    assert mlp_width("dinov3_vith16plus") == 5120 and mlp_width("dinov3_vit7b16") == 8192
    seven_b = OFFICIAL_DINOV3["dinov3_vit7b16"]
    assert (seven_b["qkv_bias"], seven_b["mlp_align_to"], seven_b["num_attention_heads"]) == (False, 64, 32)
    assert all(spec["layer_norm_eps"] == 1e-5 and spec["num_register_tokens"] == 4 for spec in OFFICIAL_DINOV3.values())


def _full_size_vits16_state() -> dict[str, torch.Tensor]:
    """dinov3_vits16's exact key names and shapes (width 384, 12 blocks, head size 64), random values."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.02):
        return torch.randn(*shape, generator=generator) * std

    d = 384
    state = {
        "cls_token": rand(1, 1, d),
        "storage_tokens": rand(1, 4, d),
        "mask_token": rand(1, d),
        "patch_embed.proj.weight": rand(d, 3, 16, 16),
        "patch_embed.proj.bias": rand(d),
        "rope_embed.periods": 100.0 ** (torch.arange(16, dtype=torch.float32) / 16),
        "norm.weight": 1 + rand(d),
        "norm.bias": rand(d),
    }
    for i in range(12):
        block = {
            "norm1.weight": 1 + rand(d),
            "norm1.bias": rand(d),
            "attn.qkv.weight": rand(3 * d, d),
            "attn.qkv.bias": rand(3 * d),
            "attn.qkv.bias_mask": torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)]),
            "attn.proj.weight": rand(d, d),
            "attn.proj.bias": rand(d),
            "ls1.gamma": rand(d, std=0.1),
            "norm2.weight": 1 + rand(d),
            "norm2.bias": rand(d),
            "mlp.fc1.weight": rand(4 * d, d),
            "mlp.fc1.bias": rand(4 * d),
            "mlp.fc2.weight": rand(d, 4 * d),
            "mlp.fc2.bias": rand(d),
            "ls2.gamma": rand(d, std=0.1),
        }
        state.update({f"blocks.{i}.{key}": value for key, value in block.items()})
    return state


def test_official_hub_name_sets_the_architecture_and_a_wrong_one_is_named():
    state = _full_size_vits16_state()
    model = convert("dinov3", state, arch="dinov3_vits16")
    assert (model.config.num_attention_heads, model.config.image_size, model.config.patch_size) == (6, 224, 16)
    with pytest.raises(ConversionError, match=r"not dinov3_vitb16: hidden_size 384 \(expected 768\)"):
        convert("dinov3", state, arch="dinov3_vitb16")
    with pytest.raises(ConversionError, match=r"not dinov3_vits16plus: mlp_type mlp \(expected swiglu\)"):
        convert("dinov3", state, arch="dinov3_vits16plus")
    with pytest.raises(ConversionError, match="Unknown DINOv3 architecture 'dinov3_vitx16'"):
        convert("dinov3", state, arch="dinov3_vitx16")


@pytest.mark.slow  # full-size ViT-S/16 (22M parameters), both implementations at 224² and 160×224 (15-50 s)
def test_full_size_dinov3_vits16_by_hub_name_through_the_pipeline(tmp_path):
    from vit_registers.conversion.publish import convert_and_publish

    eva = timm.create_model("vit_small_patch16_dinov3", pretrained=False, qkv_bias=True, num_classes=0)
    state = official_from_eva(redraw_realistic_(eva), heads=6, swiglu=False, local_norm=False)
    checkpoint = tmp_path / "dinov3_vits16.pth"
    torch.save(state, checkpoint)
    result = convert_and_publish(
        "dinov3",
        checkpoint,
        arch="dinov3_vits16",
        output_dir=tmp_path / "out",
        tolerance=TOLERANCE,
        progress=False,
        log=lambda _: None,
    )
    assert [(row.height, row.width) for row in result.report.rows] == [(224, 224), (160, 224)]
    assert result.report.passed, result.report.lines()
    card = (result.output_dir / "README.md").read_text()
    assert "base_model: facebook/dinov3-vits16-pretrain-lvd1689m" in card
    config = json.loads((result.output_dir / "config.json").read_text())
    assert (config["num_attention_heads"], config["layer_norm_eps"], config["rope_rescale_coords"]) == (6, 1e-5, 2.0)


@pytest.mark.parametrize("case", ["periods_theta", "periods_heads", "missing_key", "unexpected_key", "cls_norm"])
def test_official_bad_checkpoints_are_named(case):
    state, _ = official_state_dict("mlp")
    if case == "periods_theta":  # trained with another RoPE base
        state["rope_embed.periods"] = 1000.0 ** (torch.arange(4, dtype=torch.float32) / 4)
        message = "rope_embed.periods"
    elif case == "periods_heads":  # periods of head size 32 while 4 heads of 16 are asked for
        state["rope_embed.periods"] = 100.0 ** (torch.arange(8, dtype=torch.float32) / 8)
        with pytest.raises(ConversionError, match="rope_embed.periods") as error:
            convert("dinov3", state, num_attention_heads=4)
        assert "8 values" in str(error.value) and "4 heads" in str(error.value)
        return
    elif case == "missing_key":
        del state["blocks.1.mlp.fc2.weight"]
        message = "missing from the checkpoint: encoder.layer.1.mlp.fc2.weight"
    elif case == "unexpected_key":
        state["blocks.0.attn.q_norm.weight"] = torch.ones(16)
        message = "blocks.0.attn.q_norm.weight"
    else:
        state["cls_norm.weight"] = torch.ones(64)
        message = "untied CLS norm"
    with pytest.raises(ConversionError, match=message):
        convert("dinov3", state)


def test_official_bfloat16_periods_of_a_training_checkpoint_are_accepted():
    """DinoVisionTransformer's default `pos_embed_rope_dtype="bf16"` stores the periods rounded to bfloat16."""
    state, _ = official_state_dict("mlp")
    state["rope_embed.periods"] = state["rope_embed.periods"].to(torch.bfloat16)
    assert convert("dinov3", state).config.num_attention_heads == 4
    state["rope_embed.periods"] = (state["rope_embed.periods"].float() * 1.02).to(torch.bfloat16)
    with pytest.raises(ConversionError, match="rope_embed.periods"):
        convert("dinov3", state)


# ----------------------------------------------------------------------------------------------------------------------
# transformers DINOv3ViTModel / DINOv3ViTBackbone
# ----------------------------------------------------------------------------------------------------------------------
def hf_config(gated: bool, **extra) -> transformers.DINOv3ViTConfig:
    values = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=176 if gated else 256,
        patch_size=PATCH,
        image_size=64,
        num_register_tokens=4,
        use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
        layer_norm_eps=1e-5,
        rope_theta=100.0,
        pos_embed_rescale=2.0,
    )
    values.update(extra)
    return transformers.DINOv3ViTConfig(**values)


def save_with_prefix(model, path: Path, prefixed: bool) -> None:
    """`save_pretrained`, then the weights file rewritten with the block keys under `model.layer.*` (current) or
    `layer.*` (the first Hub uploads)."""
    model.save_pretrained(path)
    state = load_file(str(path / "model.safetensors"))
    renamed = {}
    for key, value in state.items():
        bare = key.removeprefix("model.")
        renamed[f"model.{bare}" if prefixed and bare.startswith("layer.") else bare] = value
    assert any(key.startswith("model.layer.") for key in renamed) == prefixed
    save_file(renamed, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("prefixed", [True, False], ids=["model_prefix", "no_prefix"])
@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "gated"])
def test_transformers_dinov3_every_token_matches(gated, prefixed, tmp_path):
    reference = redraw_realistic_(transformers.DINOv3ViTModel(hf_config(gated)))
    save_with_prefix(reference, tmp_path, prefixed)
    model = convert("transformers", tmp_path)
    config = model.config
    assert (config.position_encoding, config.num_register_tokens, config.layer_norm_eps) == ("rope", 4, 1e-5)
    assert config.mlp_type == ("swiglu" if gated else "mlp") and config.rope_rescale_coords == 2.0
    loaded = build_reference("transformers", tmp_path)  # AutoModel reads both key layouts
    pixels = torch.randn(2, 3, 48, 80)
    torch.testing.assert_close(loaded(pixels).last_hidden_state, reference(pixels).last_hidden_state)
    assert_realistic(loaded, pixels)
    worst = worst_over_sizes(model, loaded)
    assert worst <= TOLERANCE, f"max abs diff {worst:.2e}"
    assert "transformers' `DINOv3ViTModel`" in interpolation_summary("transformers", config, tmp_path)


def test_transformers_dinov3_backbone_checkpoint(tmp_path):
    config = hf_config(gated=False, out_features=["stage2"])
    backbone = redraw_realistic_(transformers.DINOv3ViTBackbone(config))
    backbone.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["DINOv3ViTBackbone"]
    model = convert("transformers", tmp_path)
    worst = worst_over_sizes(model, build_reference("transformers", tmp_path))
    assert worst <= TOLERANCE, f"max abs diff {worst:.2e}"
    for height, width in SIZES:  # the backbone's own last feature map: the normed patch tokens, as a grid
        pixels = torch.randn(2, 3, height, width)
        with torch.no_grad():
            feature_map = backbone(pixels).feature_maps[-1]
        patches = model_tokens(model, pixels)["patches"]
        expected = feature_map.flatten(2).transpose(1, 2)
        assert (patches - expected).abs().max().item() <= TOLERANCE


def test_transformers_dinov3_without_biases_and_as_a_state_dict(tmp_path):
    """`key_bias=False` is the default; with no query / value / projection / MLP biases at all the converted model
    holds zeros. A bare state dict (no config.json) converts with DINOv3's settings and the given head count."""
    reference = redraw_realistic_(
        transformers.DINOv3ViTModel(
            hf_config(False, query_bias=False, value_bias=False, proj_bias=False, mlp_bias=False)
        )
    )
    reference.save_pretrained(tmp_path)
    model = convert("transformers", tmp_path)
    assert not model.config.qkv_bias
    assert worst_over_sizes(model, reference) <= TOLERANCE
    bare = convert("transformers", dict(reference.state_dict()), num_attention_heads=4)
    assert bare.config.layer_norm_eps == 1e-5 and bare.config.position_encoding == "rope"
    assert worst_over_sizes(bare, reference) <= TOLERANCE


def test_transformers_dinov3_refusals(tmp_path):
    reference = transformers.DINOv3ViTModel(hf_config(True, hidden_act="gelu"))
    reference.save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="only SiLU-gated"):
        convert("transformers", tmp_path)
    with pytest.raises(ConversionError, match="DINOv2 weights only"):
        convert("transformers", tmp_path, interpolation="official")
    with pytest.raises(ConversionError, match="leave it out"):
        convert("transformers", dict(reference.state_dict()), arch="dinov3_vits16")


# ----------------------------------------------------------------------------------------------------------------------
# scripts/convert.py: the parity gate and the card's table, refusals with nothing written
# ----------------------------------------------------------------------------------------------------------------------
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert.py"


def script_main(*argv: str) -> int:
    """`scripts/convert.py`'s `main` in this process (no interpreter start-up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_script_dinov3", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(argv))


def test_script_converts_official_dinov3_with_the_parity_table(tmp_path, capsys):
    state, _ = official_state_dict("swiglu")
    checkpoint = tmp_path / "dinov3_small.pth"
    torch.save(state, checkpoint)
    output = tmp_path / "out"
    assert script_main("--source", "dinov3", "--checkpoint", str(checkpoint), "--output-dir", str(output)) == 0
    printed = capsys.readouterr().out
    assert "DINOv3 RoPE" in printed and "nothing is resampled" in printed and "timm" in printed
    card = (output / "README.md").read_text()
    assert "| 224×224 |" in card and "| 160×224 |" in card and "FAIL" not in card  # stored grid, non-square
    assert "official DINOv3 checkpoint" in card
    config = json.loads((output / "config.json").read_text())
    assert (config["position_encoding"], config["mlp_type"], config["num_register_tokens"]) == ("rope", "swiglu", 4)
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 256, "width": 256} and not processor["do_center_crop"]
    reloaded = transformers.AutoModel.from_pretrained(output).eval()
    pixels = torch.randn(1, 3, 48, 80)
    reference = build_reference("dinov3", checkpoint)
    assert max_diff(model_tokens(reloaded, pixels), reference_tokens(reference, pixels)) <= TOLERANCE


def test_script_converts_a_transformers_dinov3_directory(tmp_path, capsys):
    source = tmp_path / "hf"
    redraw_realistic_(transformers.DINOv3ViTModel(hf_config(gated=True))).save_pretrained(source)
    output = tmp_path / "out"
    assert script_main("--source", "transformers", "--checkpoint", str(source), "--output-dir", str(output)) == 0
    assert "transformers' `DINOv3ViTModel`" in capsys.readouterr().out
    card = (output / "README.md").read_text()
    assert "| 64×64 |" in card and "| 48×64 |" in card and "FAIL" not in card


@pytest.mark.parametrize("case", ["periods", "wrong_arch", "missing_key", "parity"])
def test_script_refuses_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    state, _ = official_state_dict("mlp")
    arch = []
    if case == "missing_key":
        del state["blocks.0.ls2.gamma"]
        message = "missing from the checkpoint: encoder.layer.0.layer_scale2.gamma"
    elif case == "periods":
        state["rope_embed.periods"] = state["rope_embed.periods"] * 1.01
        message = "rope_embed.periods"
    elif case == "wrong_arch":
        arch = ["--arch", "dinov3_vitb16"]
        message = "not dinov3_vitb16"
    else:  # a reference that disagrees by 1e-3 on one LayerNorm bias: the gate stops the write
        from vit_registers.conversion import publish

        real = publish.build_reference

        def drifting(*args, **kwargs):
            reference = real(*args, **kwargs)
            with torch.no_grad():
                reference.norm.bias[0] += 1e-3
            return reference

        monkeypatch.setattr(publish, "build_reference", drifting)
        message = "Parity check failed"
    checkpoint = tmp_path / "dinov3.pth"
    torch.save(state, checkpoint)
    output = tmp_path / "out"
    assert script_main("--source", "dinov3", "--checkpoint", str(checkpoint), *arch, "--output-dir", str(output)) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and message in error, error
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dinov3.pth"]


# ----------------------------------------------------------------------------------------------------------------------
# Negative tests: at this weight scale a wrong activation or a wrong eps fails the 1e-5 bound
# ----------------------------------------------------------------------------------------------------------------------
WRONG = {"right": {}, "tanh_gelu": dict(hidden_act="gelu_pytorch_tanh"), "eps_1e-6": dict(layer_norm_eps=1e-6)}


@pytest.mark.parametrize("source", ["transformers", "dinov3"])
def test_wrong_activation_or_eps_fails_parity_at_realistic_scale(source, tmp_path):
    if source == "transformers":
        reference = redraw_realistic_(transformers.DINOv3ViTModel(hf_config(gated=False)))
        reference.save_pretrained(tmp_path)
        checkpoint = tmp_path
    else:
        state, _ = official_state_dict("mlp")
        checkpoint = state
        reference = build_reference("dinov3", state)
    measured = {
        name: worst_over_sizes(convert(source, checkpoint, **extra), reference) for name, extra in WRONG.items()
    }
    assert measured["right"] <= TOLERANCE, measured
    assert measured["tanh_gelu"] > 10 * TOLERANCE, measured
    assert measured["eps_1e-6"] > TOLERANCE, measured


# ----------------------------------------------------------------------------------------------------------------------
# The real trained DINOv2-S (transformers format, fp16-stored weights, run in float64 and float32)
# ----------------------------------------------------------------------------------------------------------------------
REAL_SIZES = [(126, 126), (98, 98), (84, 140)]  # 9×9, 7×7 and a non-square 6×10 grid (stored: 37×37)
# float32 bound for the trained weights: each float32 implementation alone is 1.2e-5 to 2.4e-5 away from its own
# float64 result (tokens up to |9|, 12 layers), so two float32 implementations cannot agree to 1e-5 in general;
# measured between them: 9.7e-6 (224²), 1.3e-5 (98²), 1.1e-5 (112×168). float64 shows the mapping is exact.
REAL_FLOAT32_BOUND = 3e-5


@pytest.mark.slow  # ViT-S, 12 layers, three sizes, both implementations, float64 and float32 (20-80 s)
@pytest.mark.skipif(not REAL_DINOV2_S.is_dir(), reason="../shared/real-weights not present")
def test_real_dinov2_small_every_token_matches_transformers():
    reference = build_reference("transformers", REAL_DINOV2_S)
    assert type(reference).__name__ == "Dinov2Model"
    model = convert("transformers", REAL_DINOV2_S)
    model, reference = model.double(), reference.double()
    worst64 = 0.0
    generator = torch.Generator().manual_seed(1)
    for height, width in REAL_SIZES:
        pixels = torch.randn(1, 3, height, width, generator=generator, dtype=torch.float64)
        worst64 = max(worst64, max_diff(model_tokens(model, pixels), reference_tokens(reference, pixels)))
    assert worst64 <= 1e-10, f"float64: max abs diff {worst64:.2e}"  # measured 3.7e-14: the same function
    worst32 = worst_over_sizes(model.float(), reference.float(), REAL_SIZES)
    assert worst32 <= REAL_FLOAT32_BOUND, f"float32: max abs diff {worst32:.2e}"
