"""Every register family of timm converts with exact parity, or is refused by name (issue 20).

Each family is a small version of its timm model (width 64-128, two blocks) whose weights are redrawn at a trained-like
scale (`realistic_weights`: every block's activations have std >= 1, LayerScale 0.1-1), so that a wrong activation,
norm epsilon or rotary setting shows. Every output token and the pooled output are compared with timm's
`forward_features` / `forward_head(pre_logits=True)` at three sizes, one non-square, in float32.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch
from realistic_weights import activation_stats, redraw_realistic_
from safetensors.torch import save_file

from vit_registers.conversion import ConversionError, convert, reference_tokens
from vit_registers.conversion.timm_families import SUPPORTED_FAMILIES

TOLERANCE = 1e-5
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert.py"

# arch: (keywords of the small timm model, conversion overrides). Eva RoPE models get a non-square reference grid,
# passed to both (a real checkpoint takes timm's 16×16 from --arch).
FAMILIES = {
    # SBB RoPE ViTs (Eva, RotaryEmbeddingCat): q/v bias, no k bias; no qkv bias (four registers: the script test)
    "vit_medium_patch16_rope_reg1_gap_256": (dict(img_size=64, ref_feat_shape=(6, 4)), {}),
    "vit_mediumd_patch16_rope_reg1_gap_256": (dict(img_size=64, ref_feat_shape=(6, 4)), {}),
    # timm's DINOv3 (Eva, RotaryEmbeddingDinoV3, eps 1e-5, CLS + 4 registers): plain MLP / SwiGLU with q/v bias /
    # the 7B's SwiGLU aligned to 64
    "vit_small_patch16_dinov3": (dict(img_size=64), {}),
    "vit_small_plus_patch16_dinov3_qkvb": (dict(img_size=64), {}),
    "vit_7b_patch16_dinov3": (dict(img_size=64, embed_dim=128, num_heads=2), {}),
    # SO150M (VisionTransformer): position embeddings over the registers; attention pool; no qkv bias + fc_norm
    "vit_so150m_patch16_reg4_map_256": (dict(img_size=64), {}),
    "vit_so150m2_patch16_reg1_gap_256": (dict(img_size=64), {}),
    # TIPSv2 (VisionTransformer, DINOv2-style, 1 register; the giant's SwiGLU is DINOv2-g's, tested in test_parity)
    "vit_base_patch14_reg1_tipsv2": (dict(img_size=56), {}),
}


def small_reference(arch: str, seed: int = 0, **extra) -> torch.nn.Module:
    kwargs = dict(embed_dim=64, num_heads=4, depth=2, dynamic_img_size=True, num_classes=0)
    kwargs.update(FAMILIES.get(arch, ({}, {}))[0])
    kwargs.update(extra)
    return redraw_realistic_(timm.create_model(arch, pretrained=False, **kwargs), seed=seed)


def overrides_for(arch: str, reference: torch.nn.Module) -> dict:
    overrides = dict(num_attention_heads=reference.blocks[0].attn.num_heads)
    rope = getattr(reference, "rope", None)
    if getattr(rope, "ref_feat_shape", None) is not None:
        overrides["rope_reference_grid"] = list(rope.ref_feat_shape)
    return {**overrides, **FAMILIES[arch][1]}


def sizes(reference: torch.nn.Module) -> list[tuple[int, int]]:
    """The stored grid, a larger square and a non-square size."""
    patch = reference.patch_embed.patch_size[0]
    native = reference.patch_embed.img_size[0]
    return [(native, native), (native + 2 * patch, native + 2 * patch), (3 * patch, 5 * patch)]


@torch.no_grad()
def max_differences(model, reference, height: int, width: int, seed: int = 1) -> dict[str, float | None]:
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed))
    output = model(pixels)
    ours = dict(zip(("cls", "registers", "patches"), model.split_tokens(output.last_hidden_state)))
    features = reference.forward_features(pixels)
    theirs = reference_tokens(_Cached(reference, features), pixels)
    differences = {}
    for group in ("cls", "registers", "patches"):
        if theirs[group] is None:
            assert ours[group] is None, f"{group}: the reference has none"
            differences[group] = None
            continue
        assert ours[group].shape == theirs[group].shape, group
        differences[group] = (ours[group] - theirs[group]).abs().max().item()
    pooled = reference.forward_head(features, pre_logits=True)
    differences["pooled"] = (output.pooler_output - pooled).abs().max().item()
    return differences


class _Cached:
    """`reference` whose `forward_features` returns already computed tokens (one reference forward per size)."""

    def __init__(self, reference, features):
        self._reference, self._features = reference, features

    def forward_features(self, pixels):
        return self._features

    def __getattr__(self, name):
        return getattr(self._reference, name)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_family_converts_with_exact_parity(arch, tmp_path):
    reference = small_reference(arch)
    native = sizes(reference)[0]
    stats = activation_stats(reference, torch.randn(2, 3, *native))
    assert stats.minimum >= 1.0, f"weights not at a realistic scale: {stats}"
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = convert("timm", path, arch=arch, **overrides_for(arch, reference))
    config = model.config
    assert config.num_register_tokens == reference.num_prefix_tokens - int(reference.cls_token is not None)
    assert config.use_cls_token == (reference.cls_token is not None)
    assert (config.position_encoding == "rope") == (getattr(reference, "rope", None) is not None)
    assert config.layer_norm_eps == reference.blocks[0].norm1.eps
    if "so150m_" in arch or "so150m2" in arch:  # position embeddings over the registers too (no_embed_class=False)
        assert config.register_tokens_have_position_embedding
    for height, width in sizes(reference):
        differences = max_differences(model, reference, height, width)
        worst = max(value for value in differences.values() if value is not None)
        assert worst <= TOLERANCE, f"{arch} at {height}x{width}: {differences}"


@pytest.mark.parametrize(
    "arch,wrong",
    [
        ("vit_so150m_patch16_reg4_map_256", dict(hidden_act="gelu_pytorch_tanh")),  # a wrong activation
        ("vit_medium_patch16_rope_reg1_gap_256", dict(rope_reference_grid=[16, 16])),  # timm's grid, not this one's
        ("vit_small_patch16_dinov3", dict(rope_theta=10000.0)),  # EVA's temperature, not DINOv3's
    ],
)
def test_the_comparison_sees_a_wrong_setting(arch, wrong):
    reference = small_reference(arch)
    model = convert("timm", reference.state_dict(), arch=arch, **{**overrides_for(arch, reference), **wrong})
    height, width = sizes(reference)[2]
    differences = max_differences(model, reference, height, width)
    assert max(value for value in differences.values() if value is not None) > 1e-3


def test_eva_key_bias_is_zero_and_settings_come_from_the_name():
    reference = small_reference("vit_medium_patch16_rope_reg1_gap_256")
    model = convert("timm", reference.state_dict(), arch="vit_medium_patch16_rope_reg1_gap_256", num_attention_heads=4)
    config = model.config
    assert (config.rope_type, config.rope_theta, config.rope_reference_grid) == ("eva", 10000.0, [16, 16])
    assert (config.pooling, config.use_fc_norm, config.use_final_norm, config.use_cls_token) == (
        "mean",
        True,
        False,
        False,
    )
    bias = model.encoder.layer[0].attention.qkv.bias
    width = config.hidden_size
    assert torch.equal(bias[width : 2 * width], torch.zeros(width))
    assert torch.equal(bias[:width], reference.blocks[0].attn.q_bias.detach())
    dinov3 = convert("timm", small_reference("vit_small_patch16_dinov3").state_dict(), arch="vit_small_patch16_dinov3")
    assert (dinov3.config.rope_type, dinov3.config.rope_theta, dinov3.config.layer_norm_eps) == ("dinov3", 100.0, 1e-5)
    assert not dinov3.config.qkv_bias and dinov3.config.pooling == "mean"  # timm's DINOv3 pools the mean by default


# ----------------------------------------------------------------------------------------------------------------------
# Families that stay out: named, with the ones that convert
# ----------------------------------------------------------------------------------------------------------------------
REFUSED = {
    "vit_dwee_patch16_reg1_gap_256": "differential attention",
    "vit_dlittle_patch16_reg1_gap_256": "differential attention",
    "vit_dpwee_patch16_reg1_gap_256": "differential attention",
    "vit_pwee_patch16_reg1_gap_256": "parallel blocks",
    "naflexvit_so150m2_patch16_reg1_map": "NaFlex",
}


def _tiny_state(arch: str) -> dict[str, torch.Tensor]:
    model = timm.create_model(arch, pretrained=False, embed_dim=64, num_heads=4, depth=1, img_size=32, num_classes=0)
    return model.state_dict()


@pytest.mark.parametrize("arch", list(REFUSED))
def test_unsupported_family_is_named(arch):
    state = _tiny_state(arch)
    for name in (arch, None):  # by the model name, and by the weights alone
        with pytest.raises(ConversionError) as error:
            convert("timm", state, arch=name)
        message = str(error.value)
        assert message.startswith(f"{arch}: {REFUSED[arch]}" if name else REFUSED[arch]), message
        assert "not supported (" in message and "supported timm families" in message and "SO150M" in message


def test_eva_options_the_model_lacks_are_refused_by_name():
    kwargs = dict(embed_dim=64, num_heads=4, depth=1, img_size=28, num_classes=0)
    scale_mlp = timm.create_model("eva02_base_patch14_224", pretrained=False, **kwargs).state_dict()
    with pytest.raises(ConversionError, match=r"inner MLP norm .*supported timm families"):
        convert("timm", scale_mlp, arch="eva02_base_patch14_224")
    rope_and_learned = timm.create_model("eva02_tiny_patch14_224", pretrained=False, **kwargs).state_dict()
    with pytest.raises(ConversionError, match=r"RoPE together with learned position embeddings: not supported"):
        convert("timm", rope_and_learned, arch="eva02_tiny_patch14_224")
    with pytest.raises(ConversionError, match=r"need --arch"):  # the rotary settings are not in the weights
        convert("timm", rope_and_learned)


def test_supported_families_cover_every_converting_register_model():
    register_models = set(timm.list_models("vit_*reg*")) | set(timm.list_models("*dinov3*"))
    register_models |= set(timm.list_models("naflexvit_*reg*"))
    refused = {name for name in register_models if any(name.startswith(p) for p in ("vit_dwee", "vit_dlittle"))}
    refused |= {name for name in register_models if name.startswith(("vit_pwee", "vit_dpwee", "naflexvit_"))}
    assert refused == set(REFUSED) | {"naflexvit_so150m2_patch16_reg1_gap"}
    assert len(register_models) == 47 and len(SUPPORTED_FAMILIES) == 7


# ----------------------------------------------------------------------------------------------------------------------
# scripts/convert.py on real files: the parity gate and the model card's table
# ----------------------------------------------------------------------------------------------------------------------
def _script_main(*argv: str) -> int:
    spec = importlib.util.spec_from_file_location("convert_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(argv))


@pytest.mark.parametrize(
    "arch,rows",
    [
        # RoPE: the registry's 256×256 grid (16×16 reference grid from the name), then 192×256
        ("vit_betwixt_patch16_rope_reg4_gap_256", ("| 256×256 |", "| 192×256 |")),
        ("vit_so150m_patch16_reg4_map_256", ("| 64×64 |", "| 48×64 |")),
    ],
)
def test_script_converts_and_writes_the_parity_table(arch, rows, tmp_path, capsys):
    extra = dict(ref_feat_shape=(16, 16)) if "rope" in arch else {}  # timm's own, as --arch gives it
    reference = small_reference(arch, embed_dim=128, num_heads=2, **extra)  # heads = width // 64: shapes agree
    checkpoint = tmp_path / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(checkpoint))
    output = tmp_path / "out"
    assert (
        _script_main("--source", "timm", "--checkpoint", str(checkpoint), "--arch", arch, "--output-dir", str(output))
        == 0
    )
    printed = capsys.readouterr().out
    assert "ok" in printed and "FAIL" not in printed
    card = (output / "README.md").read_text()
    assert all(row in card for row in rows) and "FAIL" not in card
    config = json.loads((output / "config.json").read_text())
    if "rope" in arch:
        assert config["position_encoding"] == "rope" and config["rope_reference_grid"] == [16, 16]
        assert "rotary position encoding" in card and "rotary position encoding" in printed
        assert "interpolate_antialias" not in card  # no position embeddings, no resampling settings
        assert "pooled = outputs.pooler_output          # (batch, 128): the mean of the patch tokens" in card
        assert "attention pool" not in card
    else:  # the attention pool has weights: the gate compares its output too, and the card has a column for it
        assert config["pooling"] == "map" and config["register_tokens_have_position_embedding"]
        assert "| input (H×W) | CLS | registers | patches | attention pool | result |" in card
        assert "pooled " in printed and "(batch, 128): the attention pool over the patch tokens" in card


def test_script_refuses_an_unsupported_family_and_writes_nothing(tmp_path, capsys):
    arch = "vit_dwee_patch16_reg1_gap_256"
    checkpoint = tmp_path / "dwee.safetensors"
    save_file(_tiny_state(arch), str(checkpoint))
    output = tmp_path / "out"
    assert (
        _script_main("--source", "timm", "--checkpoint", str(checkpoint), "--arch", arch, "--output-dir", str(output))
        == 1
    )
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error.startswith("error: ") and "differential attention" in error and "supported timm families" in error
    assert not output.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
