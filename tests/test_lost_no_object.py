"""When LOST finds no object (every patch has the same degree, or the mask covers the whole image), the user sees it:
in `stats.json`, in the CLI's output, in the figure (no box drawn) and in the Space's table."""

from __future__ import annotations

import json
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import BitImageProcessor  # noqa: E402

from vit_registers import ViTRegistersConfig, ViTRegistersModel, space  # noqa: E402
from vit_registers.analysis import analyze_batch  # noqa: E402
from vit_registers.cli import main  # noqa: E402


def keys_all_alike(model: ViTRegistersModel) -> ViTRegistersModel:
    """Every key of the last layer gets a large common component: all key similarities are positive, as on the real
    DINOv2-S weights, so every patch has the same degree."""
    hidden = model.config.hidden_size
    with torch.no_grad():
        model.encoder.layer[-1].attention.qkv.bias[hidden : 2 * hidden] = 50.0
    return model


def tiny_model(seed=0) -> ViTRegistersModel:
    torch.manual_seed(seed)
    config = ViTRegistersConfig(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_register_tokens=1
    )
    return ViTRegistersModel(config).eval()


def test_analysis_summary_flags_a_degenerate_lost_result():
    pixels = torch.randn(2, 3, 42, 56)
    (normal, _) = analyze_batch(tiny_model(), pixels)
    (flat, _) = analyze_batch(keys_all_alike(tiny_model()), pixels)
    assert normal.summary()["lost"]["detected"] is True and normal.summary()["lost"]["degenerate"] is None
    lost = flat.summary()["lost"]
    assert lost["detected"] is False and "same degree" in lost["degenerate"]
    assert lost["seed"] == [0, 0] and lost["box_input"] == [0.0, 0.0, 56.0, 42.0]


def test_cli_and_space_show_that_lost_found_no_object(tmp_path, capsys):
    model_dir = tmp_path / "model"
    keys_all_alike(tiny_model()).save_pretrained(model_dir)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(model_dir)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (42, 56, 3), dtype=np.uint8)).save(photo)
    code = main(["analyze", str(photo), "--model", str(model_dir), "--output-dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"LOST found no object in {photo}: no seed" in printed
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["images"][0]["lost"]["detected"] is False
    assert "same degree" in stats["images"][0]["lost"]["degenerate"]
    assert (tmp_path / "out" / "photo_lost.png").exists()

    model, processor = space.ModelStore(device="cpu")._load(str(model_dir))
    entry = space.LoadedModel("flat keys", model, processor, False)
    result = space.analyze_model(entry, Image.open(photo))
    assert result.stats["lost_degenerate"] and "same degree" in result.stats["lost_degenerate"]
    rows = dict(result.table())
    assert rows["LOST box (x0, y0, x1, y1)"].startswith("none: no object found")
