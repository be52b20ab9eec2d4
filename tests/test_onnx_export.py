"""ONNX export (issue 21): every model kind exports with dynamic batch, height and width, and ONNX Runtime matches
PyTorch on every output token at sizes the file was not exported at; a mismatch leaves no file; a missing extra is
named. Tiny configs (image 42, patch 14, hidden 32, 2 layers) except the shipped and the real DINOv2-S models.

Besides the check `export_onnx` runs itself, each test runs the written file in ONNX Runtime at one more shape (batch
3, non-square, never traced) and compares it with the PyTorch model here, so the exporter's own check is not the only
witness.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vit_registers import ViTRegistersConfig, ViTRegistersModel
from vit_registers.onnx_export import (
    TOLERANCES,
    MissingOnnxExtraError,
    OnnxMismatchError,
    export_onnx,
    output_names,
    require_onnx,
    tensor_outputs,
)

ROOT = Path(__file__).resolve().parents[1]
REAL_DINOV2_S = ROOT / ".." / "shared" / "real-weights" / "dinov2-small-imgfocus"
TINY = dict(image_size=42, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2.0)

KINDS = {
    # DINOv2 with registers: antialiased bicubic resampling, offset 0
    "registers": dict(num_register_tokens=4, layerscale_value=1.0),
    # official DINOv2 without registers: offset 0.1, no antialias (the exporter's custom Resize)
    "offset-0.1": dict(num_register_tokens=0, interpolate_offset=0.1, interpolate_antialias=False),
    # timm's *_reg*_gap_*: no CLS, mean pooling with fc_norm, no final norm
    "gap-no-cls": dict(
        num_register_tokens=4,
        use_cls_token=False,
        cls_token_has_position_embedding=False,
        pooling="mean",
        use_fc_norm=True,
        use_final_norm=False,
    ),
    # DINOv3: rotary position encoding (nothing to resample), LayerScale
    "rope-dinov3": dict(
        num_register_tokens=4,
        position_encoding="rope",
        rope_type="dinov3",
        rope_rescale_coords=2.0,
        layerscale_value=0.1,
    ),
    # timm's attention pool (a latent query over the patches)
    "map-pool": dict(num_register_tokens=1, pooling="map"),
}


def tiny_model(seed: int = 0, **overrides) -> ViTRegistersModel:
    torch.manual_seed(seed)
    model = ViTRegistersModel(ViTRegistersConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # every weight at random, so that nothing passes by being zero or one
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def ort_matches_torch(path: Path, model, shape, attention_layers=(), tolerance=1e-4, scaled=False) -> dict:
    """Run `path` in ONNX Runtime at `shape` and assert every output within `tolerance` of the PyTorch model
    (`scaled`: |difference| / max(1, |PyTorch value|), the float16 measure)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    assert names == output_names(attention_layers)
    pixels = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = [tensor.float().numpy() for tensor in tensor_outputs(model, attention_layers)(pixels)]
    got = session.run(None, {"pixel_values": pixels.numpy()})
    diffs = {}
    for name, onnx_value, torch_value in zip(names, got, expected, strict=True):
        assert onnx_value.shape == torch_value.shape, name
        difference = np.abs(onnx_value.astype(np.float64) - torch_value)
        if scaled:
            difference /= np.maximum(1.0, np.abs(torch_value))
        diffs[name] = float(difference.max()) if onnx_value.size else 0.0
        assert diffs[name] <= tolerance, (name, diffs)
    return diffs


def assert_exported(result, model, extra_shape, attention_layers=()):
    config = model.config
    patch = config.patch_size
    shapes = [check.shape for check in result.check]
    assert len(shapes) == 3 and len({shape[0] for shape in shapes}) == 2  # two batch sizes
    assert any(height != width for _, _, height, width in shapes)  # one non-square size
    assert all(shape[2] % patch == 0 and shape[3] % patch == 0 for shape in shapes)
    assert result.worst <= TOLERANCES[result.dtype], result.check
    ort_matches_torch(result.path, model, extra_shape, attention_layers)


@pytest.mark.parametrize(
    "kind", [kind if kind == "registers" else pytest.param(kind, marks=pytest.mark.slow) for kind in KINDS]
)
def test_model_kinds_export_and_match_at_other_sizes(kind, tmp_path):
    model = tiny_model(**KINDS[kind])
    layers = (-1,) if kind == "registers" else ()
    result = export_onnx(model, tmp_path / "model.onnx", attention_layers=layers)
    assert_exported(result, model, (3, 3, 70, 28), attention_layers=(1,) if layers else ())
    if layers:  # attention maps from ONNX Runtime: rows are softmax distributions over every token
        import onnxruntime

        session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
        (weights,) = session.run(["attentions.1"], {"pixel_values": np.zeros((1, 3, 28, 56), np.float32)})
        assert weights.shape == (1, 2, 1 + 4 + 8, 1 + 4 + 8)
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_test_time_registers_export(tmp_path):
    model = tiny_model(num_register_tokens=0)
    model.set_test_time_registers({0: [1, 5], 1: [3]}, num_tokens=2)
    result = export_onnx(model, tmp_path / "model.onnx")
    assert_exported(result, model, (3, 3, 70, 28))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (registers,) = session.run(["register_tokens"], {"pixel_values": np.zeros((1, 3, 42, 42), np.float32)})
    assert registers.shape == (1, 2, 32)  # the test-time registers come out of ONNX Runtime


@pytest.mark.slow
def test_float16_export(tmp_path):
    model = tiny_model(num_register_tokens=4)
    result = export_onnx(model, tmp_path / "model.onnx", dtype="float16")
    assert result.worst <= TOLERANCES["float16"], result.check
    half = tiny_model(num_register_tokens=4).half()
    ort_matches_torch(result.path, half, (3, 3, 70, 28), tolerance=TOLERANCES["float16"], scaled=True)


@pytest.mark.slow
@pytest.mark.parametrize("registers", [0, 4])
def test_shipped_default_models_through_the_command(registers, tmp_path, capsys):
    from transformers import AutoImageProcessor, AutoModel

    from vit_registers.cli import main
    from vit_registers.pretrained import default_model_path

    path = default_model_path(registers)
    output = tmp_path / "onnx" / "model.onnx"
    argv = ["export", "--model", str(path), "--output", str(output), "--attention-layers", "-1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {output}" in printed and printed.count("ONNX Runtime vs PyTorch at") == 3
    assert sorted(p.name for p in output.parent.iterdir()) == ["README.md", "model.onnx", "preprocessor_config.json"]
    assert (
        AutoImageProcessor.from_pretrained(output.parent).to_dict()
        == AutoImageProcessor.from_pretrained(path).to_dict()
    )
    card = (output.parent / "README.md").read_text()
    assert "## ONNX export (`model.onnx`)" in card and "ONNX Runtime" in card

    import onnx

    proto = onnx.load(str(output))
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert json.loads(metadata["vit_registers.config"])["num_register_tokens"] == registers
    model = AutoModel.from_pretrained(path).eval()
    ort_matches_torch(output, model, (3, 3, 96, 176), attention_layers=(5,))


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DINOV2_S.is_dir(), reason="../shared/real-weights not present")
def test_real_dinov2_small(tmp_path):
    from vit_registers.conversion import convert

    model = convert("transformers", REAL_DINOV2_S).eval()
    result = export_onnx(model, tmp_path / "model.onnx", height=224, width=224)
    assert_exported(result, model, (2, 3, 126, 336))


def test_mismatch_leaves_no_file(tmp_path, capsys):
    """--tolerance 0: the check fails (float rounding differs), exit status 1, nothing in the output folder."""
    from vit_registers.cli import main

    model_dir = tmp_path / "tiny"
    tiny_model(num_register_tokens=4).save_pretrained(model_dir)
    output = tmp_path / "out" / "model.onnx"
    assert main(["export", "--model", str(model_dir), "--output", str(output), "--tolerance", "0"]) == 1
    error = capsys.readouterr().err
    assert "ONNX Runtime differs from PyTorch" in error and "nothing written" in error
    assert not output.parent.exists()  # the folder it created is gone too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


@pytest.mark.slow
def test_perturbed_reference_raises_and_keeps_an_existing_folder_clean(tmp_path):
    """A reference 1e-3 away (a perturbed LayerNorm): OnnxMismatchError, nothing left in the existing folder."""
    model = tiny_model(num_register_tokens=2)
    perturbed = tiny_model(num_register_tokens=2)
    with torch.no_grad():
        perturbed.layernorm.bias.add_(1e-3)
    with pytest.raises(OnnxMismatchError) as raised:
        export_onnx(model, tmp_path / "model.onnx", reference=tensor_outputs(perturbed), check_shapes=[(2, 3, 28, 42)])
    assert 5e-4 < raised.value.check[0].max_abs_diff["patch_tokens"] < 2e-3
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_removes_external_data_too(tmp_path, monkeypatch):
    """The exporter fails after writing the graph and its external-data file: both go."""
    require_onnx()

    class Program:
        def save(self, destination, **kwargs):
            Path(destination).write_bytes(b"graph")
            Path(str(destination) + ".data").write_bytes(b"weights")
            raise OSError("No space left on device")

    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: Program())
    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(OSError, match="No space left"):
        export_onnx(tiny_model(), folder / "model.onnx")
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime", "onnxscript"])
def test_missing_extra_is_named(missing, tmp_path, monkeypatch, capsys):
    from vit_registers.cli import main

    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    with pytest.raises(MissingOnnxExtraError, match=r"pip install 'vit-registers\[onnx\]'"):
        require_onnx()
    output = tmp_path / "model.onnx"
    assert main(["export", "--output", str(output)]) == 1
    error = capsys.readouterr().err
    assert f"needs {missing}" in error and "vit-registers[onnx]" in error
    assert not output.exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--height", "50"], "not a positive multiple of the patch size 14"),
        (["--opset", "17"], "needs opset >= 18"),
        (["--attention-layers", "7"], "Layer 7 does not exist"),
        (["--device", "cuda"], "export runs on the CPU"),
    ],
)
def test_bad_arguments_are_named(arguments, message, tmp_path, capsys):
    from vit_registers.cli import main

    model_dir = tmp_path / "tiny"
    tiny_model().save_pretrained(model_dir)
    output = tmp_path / "model.onnx"
    assert main(["export", "--model", str(model_dir), "--output", str(output), *arguments]) == 1
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_card_section_replaces_its_previous_version_and_keeps_the_rest(tmp_path):
    from vit_registers.onnx_export import CARD_END, CARD_START, ExportResult, SizeCheck, _card_text

    config = ViTRegistersConfig(**TINY, num_register_tokens=4)
    check = [SizeCheck((1, 3, 42, 42), dict.fromkeys(output_names(()), 1e-6), dict.fromkeys(output_names(()), 1e-6))]
    result = ExportResult(tmp_path / "model.onnx", 18, "float32", 1e-4, output_names(()), check)
    readme = tmp_path / "README.md"
    readme.write_text(f"# My model\n\nintro\n\n{CARD_START}\nold section\n{CARD_END}\n\noutro\n")
    text = _card_text(readme, result, config)
    assert text.startswith("# My model\n\nintro\n\n") and text.endswith("outro\n")
    assert "old section" not in text and text.count(CARD_START) == text.count(CARD_END) == 1
    assert "| (1, 3, 42, 42) | 1.0e-06 |" in text and "(batch, 4, 32)" in text
    readme.write_text("# Another card\n")
    assert _card_text(readme, result, config).startswith("# Another card\n\n" + CARD_START)
