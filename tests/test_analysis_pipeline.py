"""analyze_batch agrees with the single-purpose functions; figures render to PNG."""

import pytest
import torch
from PIL import Image

from vit_registers import ViTRegistersConfig, ViTRegistersModel
from vit_registers.analysis import (
    analyze_batch,
    attention_figure,
    attention_maps,
    label_outliers,
    lost_boxes,
    lost_figure,
    norm_figure,
    pca_figure,
    pca_rgb,
    percentile_threshold,
    save_figure,
)


def tiny_model(**kwargs):
    torch.manual_seed(0)
    config = ViTRegistersConfig(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, **kwargs
    )
    return ViTRegistersModel(config).eval()


@pytest.mark.parametrize("kind", ["keys", "tokens"])
def test_analyze_batch_matches_the_single_functions(kind):
    model = tiny_model(num_register_tokens=2)
    pixels = torch.randn(2, 3, 42, 56)
    results = analyze_batch(model, pixels, layers=[1, -1], lost_kind=kind, lost_layer=-1)
    maps = attention_maps(model, pixels, layers=[1, -1])
    boxes = lost_boxes(model, pixels, kind=kind)
    with torch.no_grad():
        outputs = model(pixels, output_hidden_states=True)
    for index, result in enumerate(results):
        assert result.grid == (3, 4) and result.input_size == (42, 56)
        assert [m.layer for m in result.attention] == [1, 2]
        torch.testing.assert_close(result.attention[1].cls[0], maps[1].cls[index])
        torch.testing.assert_close(result.attention[0].registers[0], maps[0].registers[index])
        assert result.lost.box == boxes[index].box
        expected_norms = outputs.hidden_states[-1][index, 3:].norm(dim=-1).reshape(3, 4)
        torch.testing.assert_close(result.patch_norm_map, expected_norms)
        assert result.patch_norms.shape == (4, 3, 4)
        last = outputs.hidden_states[-1][index].norm(dim=-1)
        torch.testing.assert_close(result.last_layer_norms["cls"], last[:1])
        torch.testing.assert_close(result.last_layer_norms["registers"], last[1:3])
        torch.testing.assert_close(result.last_layer_norms["patches"], expected_norms.flatten())
        torch.testing.assert_close(result.pca_rgb, pca_rgb(outputs.patch_tokens[index], (3, 4)))
        assert sorted(result.attention_flow) == [1, 2]
    with pytest.raises(ValueError, match="label_outliers"):
        results[0].outlier_summary()
    threshold = percentile_threshold([r.patch_norm_map for r in results])
    label_outliers(results, threshold)
    summaries = [r.outlier_summary() for r in results]
    assert sum(s["num_outliers"] for s in summaries) >= 1
    assert all(len(s["separation_ratio_per_layer"]) == 4 for s in summaries)


def test_figures_render(tmp_path):
    image = Image.new("RGB", (56, 42), "gray")
    figures = {
        "norms": norm_figure(image, torch.rand(3, 4), threshold=0.5),
        "attention": attention_figure(image, {"CLS": torch.rand(4, 3, 4), "reg 0": torch.rand(4, 3, 4)}),
        "means_only": attention_figure(image, {"CLS": torch.rand(4, 3, 4)}, max_heads=0),
        "pca": pca_figure(image, torch.rand(3, 4, 3), torch.randn(3, 4), torch.rand(3, 4, 3)),
        "lost": lost_figure(image, [14, 0, 42, 28], torch.rand(3, 4), ground_truth=[[0, 0, 20, 20]]),
    }
    for name, figure in figures.items():
        path = save_figure(figure, tmp_path / f"{name}.png")
        with Image.open(path) as png:
            assert png.format == "PNG" and png.size[0] >= 300
    with pytest.raises(ValueError, match="neither CLS nor registers"):
        attention_figure(image, {})


def test_summary_is_json_ready():
    import json

    from vit_registers.analysis import prepare_image

    model = tiny_model(
        use_cls_token=False, cls_token_has_position_embedding=False, num_register_tokens=0, pooling="mean"
    )
    prepared = prepare_image(Image.new("RGB", (80, 60), "white"), patch_size=14, short_side=28)
    (result,) = analyze_batch(model, prepared.pixel_values[None], lost_layer=1, lost_kind="queries")
    summary = result.summary()
    assert "outlier_fraction" not in summary and "original_size" not in summary
    label_outliers([result], 0.0)
    summary = json.loads(json.dumps(result.summary(prepared)))
    assert summary["outlier_fraction"] == 1.0
    assert summary["original_size"] == [60, 80] and summary["input_size"] == [28, 42]
    assert summary["lost"]["layer"] == 2 and summary["lost"]["features"] == "queries"  # 1-based, as the norms
    x0, y0, x1, y1 = summary["lost"]["box"]
    assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 60
    assert summary["norms"][0]["cls"] is None
    assert summary["attention_flow"] == {"3": {"patches": {"patches": 1.0}}}
