"""Issue 24, items 3 and 6: `vit-registers analyze` shows progress over the model calls and the figure writing, and
attention figures stay readable from 16x16 to 37x37 patch grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from planted_artifacts import planted_model
from transformers import BitImageProcessor

from vit_registers.analysis import figures
from vit_registers.cli import main


def test_analyze_progress_covers_model_calls_and_figures(tmp_path, capsys):
    model_dir = tmp_path / "model"
    planted_model(strength=0).save_pretrained(model_dir)
    BitImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(paths[-1])
    (tmp_path / "bad.png").write_text("not a picture")
    argv = ["analyze", *map(str, paths), str(tmp_path / "bad.png"), "--model", str(model_dir)]
    code = main([*argv, "--output-dir", str(tmp_path / "out"), "--batch-size", "2"])
    err = capsys.readouterr().err
    assert code == 1  # one file could not be read; the others were analysed
    # the model bar counts all 4 inputs (3 analysed + 1 skipped), then the figures bar the 3 analysed images
    model_done, figures_done = err.rfind("model: 100%"), err.rfind("figures: 100%")
    assert model_done != -1 and figures_done != -1 and model_done < err.find("figures:")
    assert "4/4" in err[: err.find("figures:")] and "3/3" in err[figures_done:]
    assert "bad.png: not an image file" in err


@pytest.mark.parametrize("grid", [(16, 16), (37, 37), (8, 12)])
def test_attention_figure_gives_every_patch_at_least_six_pixels(tmp_path, grid):
    image = Image.new("RGB", (grid[1] * 14, grid[0] * 14), "white")
    heads = 6
    maps = {
        "CLS": torch.rand(heads, *grid),
        "reg 0": torch.rand(heads, *grid),
        "test-time reg 0": torch.rand(heads, *grid),
    }
    path = figures.save_figure(figures.attention_figure(image, maps, title="t", dpi=100), tmp_path / "a.png", dpi=100)
    with Image.open(path) as saved:
        width, height = saved.size
    columns, rows = heads + 2, len(maps)  # input, head mean, each head
    assert width >= columns * max(6 * grid[1], 130 * grid[1] // max(grid))
    assert height >= rows * max(6 * grid[0], 130 * grid[0] // max(grid))
    assert width <= columns * 400 + 200  # and not a poster
