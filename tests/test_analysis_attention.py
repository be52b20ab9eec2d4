"""Attention maps of CLS and registers from the chosen-layers path, DINO mass maps, averages and group flow."""

import pytest
import torch

from vit_registers import ViTRegistersConfig, ViTRegistersModel
from vit_registers.analysis import (
    attention_flow,
    attention_maps,
    dataset_average_maps,
    maps_from_weights,
    top_mass_mask,
    upsample,
)

CASES = {
    "cls+registers": dict(num_register_tokens=4),
    "no-cls-no-registers": dict(
        use_cls_token=False, cls_token_has_position_embedding=False, num_register_tokens=0, pooling="mean"
    ),
    "test-time-registers": dict(num_register_tokens=2, test_time_registers={"num_tokens": 1, "neurons": {"1": [3]}}),
}


def tiny_pair(tmp_path, **kwargs):
    """The same weights twice: the default backend (sdpa) and attn_implementation='eager'."""
    torch.manual_seed(0)
    config = ViTRegistersConfig(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, **kwargs
    )
    fast = ViTRegistersModel(config).eval()
    eager = ViTRegistersModel(ViTRegistersConfig(**{**config.to_dict(), "attn_implementation": "eager"})).eval()
    eager.load_state_dict(fast.state_dict())
    assert eager.config._attn_implementation == "eager"
    return fast, eager


@pytest.mark.parametrize("case", list(CASES))
def test_chosen_layer_maps_equal_eager_attention(tmp_path, case):
    fast, eager = tiny_pair(tmp_path, **CASES[case])
    assert fast.config._attn_implementation != "eager"
    config = fast.config
    pixels = torch.randn(2, 3, 28, 42)
    maps = attention_maps(fast, pixels, layers=[0, -1])
    assert [m.layer for m in maps] == [0, 2]
    with torch.no_grad():
        reference = eager(pixels, output_attentions=True).attentions  # every layer, eager
    prefix = int(config.use_cls_token) + config.num_register_tokens
    extra = config.num_test_time_registers
    tokens = reference[0].shape[-1]
    for got in maps:
        weights = reference[got.layer]
        patches = weights[..., prefix : tokens - extra]  # (B, heads, T, N)
        if config.use_cls_token:
            torch.testing.assert_close(got.cls, patches[:, :, 0].reshape(2, 4, 2, 3), atol=1e-5, rtol=1e-4)
        else:
            assert got.cls is None and got.cls_mean is None
        register_rows = list(range(int(config.use_cls_token), prefix)) + list(range(tokens - extra, tokens))
        assert got.registers.shape == (2, len(register_rows), 4, 2, 3)
        for slot, row in enumerate(register_rows):
            torch.testing.assert_close(
                got.registers[:, slot], patches[:, :, row].reshape(2, 4, 2, 3), atol=1e-5, rtol=1e-4
            )
        named = got.named_maps(1)
        trained = [f"reg {i}" for i in range(config.num_register_tokens)]
        test_time = [f"test-time reg {j}" for j in range(extra)]  # labelled as such, after the trained ones
        expected_names = (["CLS"] if config.use_cls_token else []) + trained + test_time
        assert list(named) == expected_names


def test_maps_land_on_the_right_patch():
    config = ViTRegistersConfig(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_register_tokens=2
    )
    tokens = 1 + 2 + 6  # grid 2 x 3
    weights = torch.zeros(1, 4, tokens, tokens)
    weights[0, :, 0, 3 + 4] = 1.0  # CLS looks at patch 4 = (row 1, col 1)
    weights[0, :, 2, 3 + 2] = 1.0  # register 1 looks at patch 2 = (row 0, col 2)
    maps = maps_from_weights(weights, config, (2, 3))
    assert maps.cls_mean[0].nonzero().tolist() == [[1, 1]]
    assert maps.registers_mean[0, 1].nonzero().tolist() == [[0, 2]]
    assert maps.registers_mean[0, 0].sum() == 0


def test_top_mass_mask_keeps_sixty_percent_of_mass():
    attention = torch.tensor([[0.5, 0.1], [0.3, 0.1]])
    assert top_mass_mask(attention, 0.6).tolist() == [[True, False], [True, False]]
    assert top_mass_mask(attention, 0.5).tolist() == [[True, False], [False, False]]
    assert top_mass_mask(attention, 1.0).all()
    batched = top_mass_mask(torch.stack([attention, attention.flip(0)]), 0.6)
    assert batched[1].tolist() == [[True, False], [True, False]]
    with pytest.raises(ValueError):
        top_mass_mask(attention, 0.0)


def test_upsample_to_image_size():
    maps = torch.arange(6.0).reshape(1, 2, 3)
    big = upsample(maps, (28, 42))
    assert big.shape == (1, 28, 42)
    assert big[0, 0, 0] == 0 and big[0, 27, 41] == 5 and big[0, 14, 14] == 4
    assert upsample(maps, (28, 42), mode="bilinear").shape == (1, 28, 42)


@pytest.mark.parametrize("case", ["cls+registers", "no-cls-no-registers"])
def test_attention_flow_matches_eager_and_rows_sum_to_one(tmp_path, case):
    fast, eager = tiny_pair(tmp_path, **CASES[case])
    pixels = torch.randn(2, 3, 28, 28)
    flow = attention_flow(fast, pixels)
    assert sorted(flow) == [0, 1, 2]
    with torch.no_grad():
        weights = eager(pixels, output_attentions=True).attentions[1]
    prefix = int(fast.config.use_cls_token) + fast.config.num_register_tokens
    groups = {"patches": slice(prefix, None)}
    if fast.config.use_cls_token:
        groups["cls"] = slice(0, 1)
    if fast.config.num_register_tokens:
        groups["registers"] = slice(1, prefix)
    assert set(flow[1]) == set(groups)
    for query, rows in groups.items():
        assert sum(flow[1][query].values()) == pytest.approx(1.0, abs=1e-5)
        for key, cols in groups.items():
            expected = weights[:, :, rows, cols].sum(-1).mean().item()
            assert flow[1][query][key] == pytest.approx(expected, abs=1e-5)
    assert sorted(attention_flow(fast, pixels, layers=[-1])) == [2]


def test_dataset_average_is_mean_of_image_maps(tmp_path):
    fast, _ = tiny_pair(tmp_path, **CASES["cls+registers"])
    first, second = torch.randn(2, 3, 28, 28), torch.randn(1, 3, 28, 28)
    (average,) = dataset_average_maps(fast, [first, second])
    single = attention_maps(fast, torch.cat([first, second]))[0]
    assert average.count == 3
    torch.testing.assert_close(average.cls, single.cls_mean.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(average.registers, single.registers_mean.mean(0), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="one input size"):
        dataset_average_maps(fast, [first, torch.randn(1, 3, 28, 42)])
    with pytest.raises(ValueError, match="No images"):
        dataset_average_maps(fast, [])
    with pytest.raises(ValueError, match="does not exist"):
        attention_maps(fast, first, layers=[7])
