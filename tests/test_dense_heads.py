"""Dense heads on a register backbone (issue 20, part 5): `ViTRegistersBackbone`'s `return_class_token` and
`remove_register_tokens`, and transformers' `DPTForDepthEstimation` / `DepthAnythingForDepthEstimation` with a
4-register backbone (DINOv2-style learned positions, DINOv3-style RoPE) unchanged: forward at two sizes, one training
step, `save_pretrained` / `from_pretrained`, and reloading in an interpreter without the package.

transformers' necks drop exactly one token (the CLS) before reshaping a ViT backbone's sequence to the patch grid,
so the backbone returns `[CLS] + patches` (`reshape_hidden_states=False, remove_register_tokens=True`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForDepthEstimation,
    DepthAnythingConfig,
    DepthAnythingForDepthEstimation,
    DPTConfig,
    DPTForDepthEstimation,
)
from transformers.dynamic_module_utils import custom_object_save

from vit_registers import ViTRegistersBackbone, ViTRegistersConfig

BACKBONE = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4)
FAMILIES = {
    "dinov2": dict(num_register_tokens=4, layerscale_value=1e-5),
    "dinov3": dict(
        num_register_tokens=4,
        layerscale_value=1e-5,
        layer_norm_eps=1e-5,
        position_encoding="rope",
        rope_theta=100.0,
        rope_rescale_coords=2.0,
    ),
}
# what the necks take: one sequence per stage, `[CLS] + patches`
NECK_INPUT = dict(out_indices=[1, 2, 3, 4], reshape_hidden_states=False, remove_register_tokens=True)
HEADS = ("dpt", "depth_anything")


@pytest.fixture(autouse=True)
def _small_model_settings(monkeypatch):
    """Tiny models on a shared 2-core machine: one thread (a second one only waits for the first), and ATen's own
    convolutions (oneDNN builds a primitive for every new input shape, seconds each under load; the heads'
    convolutions see a dozen shapes per test). Same results, restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    yield
    torch.set_num_threads(threads)


def backbone_config(family: str, **overrides) -> ViTRegistersConfig:
    return ViTRegistersConfig(**{**BACKBONE, **FAMILIES[family], **NECK_INPUT, **overrides})


def dense_model(head: str, family: str, seed: int = 0, **backbone_overrides):
    torch.manual_seed(seed)
    backbone = backbone_config(family, **backbone_overrides)
    sizes = dict(neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16)
    if head == "dpt":
        config = DPTConfig(backbone_config=backbone, hidden_size=32, readout_type="project", **sizes)
        model = DPTForDepthEstimation(config)
    else:
        config = DepthAnythingConfig(
            backbone_config=backbone, patch_size=8, reassemble_hidden_size=32, head_hidden_size=8, **sizes
        )
        model = DepthAnythingForDepthEstimation(config)
    with torch.no_grad():  # tokens and LayerScale start tiny: draw the backbone at random so that registers matter
        for parameter in model.backbone.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def tiny_backbone(family: str = "dinov3", **overrides) -> ViTRegistersBackbone:
    torch.manual_seed(0)
    backbone = ViTRegistersBackbone(backbone_config(family, **overrides))
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return backbone.eval()


# ------------------------------------------------------------------------------------------------------ backbone


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_backbone_sequences_and_class_tokens(family):
    pixels = torch.randn(2, 3, 32, 48)  # 4 x 6 patches
    backbone = tiny_backbone(family, out_indices=[2, 4])
    model = backbone.vit_registers
    with torch.no_grad():
        out = backbone(pixels)
        normed = [model.layernorm(h) for h in model(pixels, output_hidden_states=True).hidden_states]
    assert out.cls_tokens is None  # return_class_token defaults to False
    for stage, sequence in zip([2, 4], out.feature_maps):
        assert sequence.shape == (2, 1 + 24, 32)  # [CLS] + patches: the registers are out
        torch.testing.assert_close(sequence, torch.cat([normed[stage][:, :1], normed[stage][:, 5:]], dim=1))

    with torch.no_grad():
        asked = backbone(pixels, return_class_token=True)  # forward argument ...
        backbone.config.return_class_token = True  # ... or config field, as transformers' DINOv3ViTBackbone
        configured = backbone(pixels)
    for result in (asked, configured):
        assert len(result.cls_tokens) == 2
        for stage, cls_token, sequence in zip([2, 4], result.cls_tokens, result.feature_maps):
            torch.testing.assert_close(cls_token, normed[stage][:, 0])
            torch.testing.assert_close(cls_token, sequence[:, 0])
    with torch.no_grad():
        assert backbone(pixels, return_class_token=False).cls_tokens is None
        full = tiny_backbone(family, out_indices=[4], remove_register_tokens=False)(pixels)
        maps = tiny_backbone(family, out_indices=[4], reshape_hidden_states=True)(pixels, return_class_token=True)
    torch.testing.assert_close(full.feature_maps[0], normed[4])  # every token, registers included
    assert maps.feature_maps[0].shape == (2, 32, 4, 6)
    torch.testing.assert_close(maps.cls_tokens[0], normed[4][:, 0])
    torch.testing.assert_close(maps.feature_maps[0].flatten(2).transpose(1, 2), normed[4][:, 5:])


def test_backbone_leaves_test_time_registers_out_and_needs_cls_for_class_tokens():
    backbone = tiny_backbone("dinov3", out_indices=[4])
    backbone.vit_registers.set_test_time_registers({0: [1, 2]}, num_tokens=2)
    pixels = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        (sequence,) = backbone(pixels).feature_maps
        last = backbone.vit_registers(pixels)
    assert last.register_tokens.shape == (1, 6, 32)  # 4 trained + 2 test-time
    torch.testing.assert_close(sequence, torch.cat([last.last_hidden_state[:, :1], last.patch_tokens], dim=1))
    no_cls = tiny_backbone("dinov3", use_cls_token=False, cls_token_has_position_embedding=False, pooling="mean")
    with torch.no_grad():
        assert no_cls(pixels).feature_maps[0].shape == (1, 20, 32)  # patches only
    with pytest.raises(ValueError, match="needs a model with a CLS token"):
        no_cls(pixels, return_class_token=True)


# ------------------------------------------------------------------------------------------- DPT, Depth Anything


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("head", HEADS)
def test_depth_heads_run_train_and_reload(head, family, tmp_path):
    model = dense_model(head, family)
    upsampling = 2 if head == "dpt" else 1  # DPT's head doubles the resolution; Depth Anything's returns the input's
    for height, width in ((32, 32), (48, 64)):  # square, then non-square 6 x 8 patches (DPT wants even grids)
        with torch.no_grad():
            depth = model(torch.randn(2, 3, height, width)).predicted_depth
        assert depth.shape == (2, height * upsampling, width * upsampling) and torch.isfinite(depth).all()

    # one training step (neither head takes `labels`: the loss is ours)
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pixels = torch.randn(2, 3, 32, 40)
    depth = model(pixels).predicted_depth
    loss = torch.nn.functional.mse_loss(depth, torch.rand_like(depth))
    loss.backward()
    registers = model.backbone.vit_registers.embeddings.register_tokens
    assert registers.grad is not None and registers.grad.abs().sum() > 0
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert "backbone.vit_registers.embeddings.register_tokens" in changed
    assert any(name.startswith("head.") for name in changed) and any(name.startswith("neck.") for name in changed)
    model.eval()

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForDepthEstimation.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model) and type(reloaded.backbone) is ViTRegistersBackbone
    config = reloaded.backbone.config
    assert (config.num_register_tokens, config.position_encoding) == (
        4,
        FAMILIES[family].get("position_encoding", "learned"),
    )
    assert config.remove_register_tokens and not config.reshape_hidden_states
    pixels = torch.randn(1, 3, 40, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).predicted_depth, model(pixels).predicted_depth)


@pytest.mark.parametrize("head", HEADS)
def test_necks_need_the_registers_removed(head):
    """Without `remove_register_tokens` the necks reshape CLS-dropped `registers + patches`: transformers fails."""
    model = dense_model(head, "dinov3", remove_register_tokens=False)
    with pytest.raises(RuntimeError, match="shape"), torch.no_grad():
        model(torch.randn(1, 3, 32, 32))


# --------------------------------------------------------------------------------- reloading without the package

WITHOUT_PACKAGE = textwrap.dedent(
    """
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "vit_registers" or name.startswith("vit_registers."):
                raise ImportError("vit_registers is blocked in this interpreter")
    sys.meta_path.insert(0, Block())
    import torch
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # as the test process (see _small_model_settings)
    from transformers import AutoBackbone, AutoConfig, DepthAnythingForDepthEstimation, DPTForDepthEstimation
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    dpt_path, depth_anything_path, pixels_path, out_path = sys.argv[1:]
    errors = []
    for kwargs in ({}, {"trust_remote_code": True}):  # the nested backbone_config names an unknown model type
        try:
            DPTForDepthEstimation.from_pretrained(dpt_path, **kwargs)
        except (KeyError, ValueError) as error:
            errors.append(repr(error))
    # the code files written next to the weights (custom_object_save), registered before loading
    config_class = get_class_from_dynamic_module("configuration_vit_registers.ViTRegistersConfig", dpt_path)
    backbone_class = get_class_from_dynamic_module("modeling_vit_registers.ViTRegistersBackbone", dpt_path)
    AutoConfig.register("vit_registers", config_class)
    AutoBackbone.register(config_class, backbone_class)
    pixels = torch.load(pixels_path, weights_only=True)
    with torch.no_grad():
        dpt = DPTForDepthEstimation.from_pretrained(dpt_path).eval()
        depth_anything = DepthAnythingForDepthEstimation.from_pretrained(depth_anything_path).eval()
        out = {"dpt": dpt(pixels).predicted_depth, "depth_anything": depth_anything(pixels).predicted_depth}
    assert "vit_registers" not in sys.modules
    assert type(dpt.backbone).__module__.startswith("transformers_modules"), type(dpt.backbone).__module__
    torch.save({"errors": errors, **out}, out_path)
    """
)


@pytest.mark.slow
def test_composite_models_reload_without_the_package(tmp_path):
    models = {}
    for head in HEADS:
        models[head] = dense_model(head, "dinov3")
        models[head].save_pretrained(tmp_path / head)
        written = custom_object_save(models[head].backbone, tmp_path / head)  # the backbone's two code files
        assert {Path(path).name for path in written} == {"modeling_vit_registers.py", "configuration_vit_registers.py"}
    pixels = torch.randn(2, 3, 32, 40)
    torch.save(pixels, tmp_path / "pixels.pt")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    argv = [str(tmp_path / head) for head in HEADS] + [str(tmp_path / "pixels.pt"), str(tmp_path / "out.pt")]
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_PACKAGE, *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert len(out["errors"]) == 2 and all("vit_registers" in error for error in out["errors"]), out["errors"]
    with torch.no_grad():
        for head in HEADS:
            torch.testing.assert_close(out[head], models[head](pixels).predicted_depth)
