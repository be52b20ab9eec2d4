"""PCA views of planted structure and neighbour similarity of patch embeddings (Darcet et al. 2024, Fig. 5a, 20)."""

import pytest
import torch

from vit_registers import ViTRegistersConfig, ViTRegistersModel
from vit_registers.analysis import (
    foreground_mask,
    input_patch_embeddings,
    neighbor_similarity,
    pca,
    pca_rgb,
    similarity_by_label,
    whitened_first_component,
)


def planted_object(height=8, width=10, dim=16, seed=0):
    """Background feature b everywhere, object feature o in rows 2..4, cols 3..6, small noise."""
    generator = torch.Generator().manual_seed(seed)
    background, obj = torch.zeros(dim), torch.zeros(dim)
    background[0], obj[1] = 5.0, 5.0
    features = background.repeat(height, width, 1)
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[2:5, 3:7] = True
    features[mask] = obj
    return features + 0.05 * torch.randn(height, width, dim, generator=generator), mask


def test_pca_recovers_planted_directions():
    generator = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(20, 3, generator=generator))[0].T  # 3 orthonormal directions
    scales = torch.tensor([10.0, 5.0, 2.0])
    codes = torch.randn(500, 3, generator=generator) * scales
    features = codes @ directions + 3.0
    projections, components, variance = pca(features, 3)
    assert (components @ directions.T).abs().diag() == pytest.approx(torch.ones(3), abs=1e-3)
    assert variance.sqrt() == pytest.approx(scales, rel=0.15)
    assert projections.shape == (500, 3)
    # skew fixes the sign: flipping the data flips nothing in the projections' skew
    assert ((projections**3).mean(0) >= 0).all()
    with pytest.raises(ValueError):
        pca(features[:1])


def test_pca_rgb_and_whitened_component_separate_planted_object():
    features, mask = planted_object()
    rgb = pca_rgb(features)
    assert rgb.shape == (8, 10, 3) and rgb.min() >= 0 and rgb.max() <= 1
    first = rgb[..., 0]
    inside, outside = first[mask], first[~mask]
    assert inside.min() > outside.max() or inside.max() < outside.min()
    whitened = whitened_first_component(features)
    assert whitened.shape == (8, 10) and whitened.abs().max() <= 3.0
    assert whitened[mask].sign().unique().numel() == 1 and whitened[~mask].sign().unique().numel() == 1
    assert whitened[mask][0].sign() != whitened[~mask][0].sign()
    # (N, D) with an explicit grid gives the same picture
    torch.testing.assert_close(pca_rgb(features.reshape(80, 16), (8, 10)), rgb)
    with pytest.raises(ValueError, match="grid"):
        pca_rgb(features.reshape(80, 16), (7, 10))


def test_whitened_component_is_clipped_at_three_sigma():
    features = torch.zeros(100, 4)
    features[:, 0] = torch.linspace(-1, 1, 100)
    features[0, 0] = 100.0  # one extreme patch
    whitened = whitened_first_component(features, (10, 10))
    assert whitened.max() == pytest.approx(3.0)


def test_foreground_mask_and_second_pca():
    features, mask = planted_object()
    assert torch.equal(foreground_mask(features), mask)
    # a third feature splits the object in two halves: the foreground PCA shows it, the background is black
    features[2:5, 3:5, 2] += 3.0
    rgb = pca_rgb(features, foreground=True)
    assert (rgb[~mask] == 0).all()
    left, right = rgb[2:5, 3:5, 0].flatten(), rgb[2:5, 5:7, 0].flatten()
    assert left.min() > right.max() or left.max() < right.min()
    assert torch.equal(pca_rgb(features, foreground=mask), rgb)


def test_neighbor_similarity_known_values():
    constant = torch.ones(1, 3, 4, 8)
    assert torch.allclose(neighbor_similarity(constant), torch.ones(1, 3, 4))
    vector = torch.randn(8)
    signs = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]])  # checkerboard
    checker = signs[None, :, :, None] * vector
    assert torch.allclose(neighbor_similarity(checker), -torch.ones(1, 2, 3), atol=1e-6)
    # one patch orthogonal to a constant field: it has similarity 0, its 4 neighbours lose a quarter
    field = torch.zeros(1, 5, 5, 2)
    field[..., 0] = 1.0
    field[0, 2, 2] = torch.tensor([0.0, 1.0])
    similarity = neighbor_similarity(field)
    assert similarity[0, 2, 2] == pytest.approx(0.0)
    assert similarity[0, 1, 2] == pytest.approx(0.75)
    assert similarity[0, 0, 0] == pytest.approx(1.0)
    assert similarity[0, 0, 2] == pytest.approx(1.0)  # border patch: 3 neighbours, all identical
    split = similarity_by_label(similarity, similarity < 0.5)
    assert split["outlier"].tolist() == [0.0] and split["normal"].numel() == 24
    with pytest.raises(ValueError):
        neighbor_similarity(torch.ones(3, 4, 8))


def test_input_patch_embeddings_are_before_position_embeddings():
    torch.manual_seed(0)
    config = ViTRegistersConfig(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_register_tokens=2
    )
    model = ViTRegistersModel(config).eval()
    pixels = torch.randn(2, 3, 28, 42)
    embeddings = input_patch_embeddings(model, pixels)
    assert embeddings.shape == (2, 2, 3, 32)
    with torch.no_grad():
        projected = model.embeddings.patch_embeddings.projection(pixels)  # (B, D, h, w)
    torch.testing.assert_close(embeddings, projected.permute(0, 2, 3, 1))
