"""Norms per layer/token group and the three outlier rules (Darcet et al. 2024, §2.1)."""

import pytest
import torch

from vit_registers import ViTRegistersConfig, ViTRegistersModel
from vit_registers.analysis import (
    first_separating_layer,
    group_norms,
    norm_stats_per_layer,
    outlier_fraction,
    outlier_mask,
    outlier_threshold,
    patch_norm_map,
    percentile_threshold,
    separation_ratios,
    sigma_threshold,
    token_norms,
)


def tiny_config(**kwargs):
    base = dict(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_register_tokens=4
    )
    base.update(kwargs)
    return ViTRegistersConfig(**base)


def planted_norms(num=100, planted=37, value=1000.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    norms = 10 + torch.randn(num, generator=generator)
    norms[planted] = value
    return norms


@pytest.mark.parametrize("rule", ["absolute", "percentile", "sigma"])
def test_planted_high_norm_token_flagged_by_every_rule(rule):
    norms = planted_norms()
    threshold = outlier_threshold(norms, rule=rule, threshold=150.0, percentile=98.0, k=3.0)
    mask = outlier_mask(norms, threshold)
    assert mask[37]
    # the planted token is the only one far from the bulk: at most the 98th-percentile tail is flagged
    assert mask.sum() <= 2
    if rule != "percentile":
        assert mask.nonzero().flatten().tolist() == [37]


def test_percentile_pools_over_images_and_sigma_formula():
    first, second = torch.arange(50.0), torch.arange(50.0, 100.0)
    assert percentile_threshold([first, second], 98) == pytest.approx(torch.quantile(torch.arange(100.0), 0.98).item())
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert sigma_threshold(values, 2.0) == pytest.approx(2.5 + 2 * values.std(unbiased=False).item())
    with pytest.raises(ValueError, match="percentile"):
        percentile_threshold(values, 120)
    with pytest.raises(ValueError, match="empty"):
        percentile_threshold([], 98)
    with pytest.raises(ValueError, match="Unknown outlier rule"):
        outlier_threshold(values, rule="magic")
    with pytest.raises(ValueError, match="needs a threshold"):
        outlier_threshold(values, rule="absolute")


def test_outlier_fraction():
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[0, :2] = True
    assert outlier_fraction(mask) == pytest.approx(0.02)


def test_first_separating_layer():
    # 5 depths x 10 patches; patch 0 is the final outlier; it separates (ratio >= 2) from depth 2 on
    norms = torch.ones(5, 10)
    norms[:, 0] = torch.tensor([1.0, 1.5, 3.0, 8.0, 20.0])
    mask = torch.zeros(10, dtype=torch.bool)
    mask[0] = True
    assert first_separating_layer(norms, mask) == 2
    ratios = separation_ratios(norms, mask)
    assert ratios.tolist() == pytest.approx([1.0, 1.5, 3.0, 8.0, 20.0])
    # separated early, merges back, separates again: the last continuous run counts
    norms[:, 0] = torch.tensor([5.0, 1.0, 3.0, 3.0, 3.0])
    assert first_separating_layer(norms, mask) == 2
    assert first_separating_layer(norms, torch.zeros(10, dtype=torch.bool)) is None
    norms[:, 0] = 1.0
    assert first_separating_layer(norms, mask) is None


def test_group_split_and_patch_map_raster_order():
    config = tiny_config()  # CLS + 4 registers + 2x2 patches
    hidden = torch.zeros(1, 9, 32)
    for token in range(9):
        hidden[0, token, 0] = token + 1  # norm of token t is t + 1
    groups = group_norms(token_norms(hidden), config)
    assert groups["cls"].tolist() == [[1.0]]
    assert groups["registers"].tolist() == [[2.0, 3.0, 4.0, 5.0]]
    assert patch_norm_map(hidden, config, (2, 2)).tolist() == [[[6.0, 7.0], [8.0, 9.0]]]
    with pytest.raises(ValueError, match="grid"):
        patch_norm_map(hidden, config, (3, 3))


def test_test_time_registers_are_registers():
    config = tiny_config(test_time_registers={"num_tokens": 1, "neurons": {"0": [1]}})
    norms = torch.arange(1.0, 11.0)[None]  # CLS, 4 registers, 4 patches, 1 test-time register
    groups = group_norms(norms, config)
    assert groups["registers"].tolist() == [[2.0, 3.0, 4.0, 5.0, 10.0]]
    assert groups["patches"].tolist() == [[6.0, 7.0, 8.0, 9.0]]


@pytest.mark.parametrize("cls_token,registers", [(True, 4), (False, 0)])
def test_norm_stats_use_states_before_final_norm(cls_token, registers):
    torch.manual_seed(0)
    config = tiny_config(
        use_cls_token=cls_token,
        cls_token_has_position_embedding=cls_token,
        num_register_tokens=registers,
        pooling="cls" if cls_token else "mean",
    )
    model = ViTRegistersModel(config).eval()
    with torch.no_grad():
        model.layernorm.weight.fill_(0.5)
        outputs = model(torch.randn(2, 3, 28, 42), output_hidden_states=True)
    stats = norm_stats_per_layer(outputs.hidden_states, config)
    assert [s["layer"] for s in stats] == [0, 1, 2]
    last = outputs.hidden_states[-1].norm(dim=-1)
    start = int(cls_token) + registers
    assert stats[-1]["patches"]["mean"] == pytest.approx(last[:, start:].mean().item(), rel=1e-5)
    assert stats[-1]["patches"]["max"] == pytest.approx(last[:, start:].max().item(), rel=1e-5)
    normalised = outputs.last_hidden_state.norm(dim=-1)[:, start:].mean().item()
    assert stats[-1]["patches"]["mean"] != pytest.approx(normalised, rel=1e-3)
    assert (stats[0]["cls"] is None) == (not cls_token)
    assert (stats[0]["registers"] is None) == (registers == 0)
    assert patch_norm_map(outputs.hidden_states[-1], config, (2, 3)).shape == (2, 2, 3)
