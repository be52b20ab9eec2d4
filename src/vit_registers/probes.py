"""Probes of what tokens hold: effective rank and linear probes (Darcet et al. 2024, §2.1, Tables 1 and 5).

- `effective_rank`: Roy & Vetterli (2007) — exp of the Shannon entropy of the normalised spectrum. We use the
  eigenvalues of the covariance of the centred patch features (the squared singular values of the centred matrix),
  so an isotropic cloud in k dimensions has effective rank k and a rank-1 cloud has 1.
- `linear_probe`: multinomial logistic regression on frozen features (single-token classification: a random normal
  patch, an outlier patch, CLS or one register), mean ± std over seeds of a random train/test split.
- `position_probe`: predict each patch token's grid position (a classification over positions).
- `reconstruction_probe`: ridge regression from a token to the pixels of its own patch (extracted with `unfold`, so
  pixels and tokens line up); reports the test mean squared error.
Features can come from any layer (`ViTRegistersModel(..., output_hidden_states=True).hidden_states[layer]`), so the
layer where registers acquire semantic content can be traced.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .analysis.tokens import TokenLayout


def effective_rank(features: torch.Tensor, eps: float = 1e-12) -> float:
    """Effective rank of `(samples, dims)` features (see module docstring for the exact definition)."""
    features = features.reshape(-1, features.shape[-1]).double()
    if features.shape[0] < 2:
        raise ValueError("effective_rank needs at least two feature vectors.")
    centred = features - features.mean(dim=0, keepdim=True)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / (features.shape[0] - 1)).clamp_min(0)
    total = eigenvalues.sum()
    if total <= eps:
        return 0.0
    p = eigenvalues / total
    p = p[p > eps]
    return float(torch.exp(-(p * p.log()).sum()))


@dataclass
class ProbeResult:
    """A probe's score (accuracy, or mean squared error for reconstruction) over seeds."""

    mean: float
    std: float
    per_seed: list[float]
    metric: str

    def __str__(self) -> str:
        return f"{self.metric} {self.mean:.4f} ± {self.std:.4f} over {len(self.per_seed)} seeds"


def _split(num_samples: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    num_test = max(1, int(round(num_samples * test_fraction)))
    if num_test >= num_samples:
        raise ValueError(f"{num_samples} samples are too few for a train/test split.")
    return order[num_test:], order[:num_test]


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float = 1e-4, steps: int = 200
) -> torch.nn.Linear:
    """Multinomial logistic regression fitted with L-BFGS (full batch) on float64 features."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(features.shape[1], num_classes).double()
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(features), labels) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return layer


def linear_probe(
    features: torch.Tensor, labels: torch.Tensor, seeds=(0, 1, 2), test_fraction: float = 0.25, weight_decay=1e-4
) -> ProbeResult:
    """Classification accuracy of a logistic-regression probe on `(samples, dims)` features."""
    features = features.detach().double()
    labels = torch.as_tensor(labels).long()
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} feature vectors but {labels.shape[0]} labels.")
    num_classes = int(labels.max()) + 1
    scores = []
    for seed in seeds:
        train, test = _split(features.shape[0], test_fraction, seed)
        x_train, x_test = _standardise(features[train], features[test])
        probe = fit_logistic_regression(x_train, labels[train], num_classes, weight_decay)
        with torch.no_grad():
            scores.append(float((probe(x_test).argmax(1) == labels[test]).double().mean()))
    return _result(scores, "accuracy")


def position_probe(patch_tokens: torch.Tensor, seeds=(0, 1, 2), test_fraction: float = 0.25) -> ProbeResult:
    """Accuracy of predicting each patch's position from its token; `patch_tokens` is `(images, patches, dims)`.

    Images (not tokens) are split between train and test, so a position is never seen from the same image twice.
    """
    images, patches, dims = patch_tokens.shape
    positions = torch.arange(patches).repeat(images, 1)
    scores = []
    for seed in seeds:
        train, test = _split(images, test_fraction, seed)
        x_train, x_test = _standardise(
            patch_tokens[train].reshape(-1, dims).double(), patch_tokens[test].reshape(-1, dims).double()
        )
        probe = fit_logistic_regression(x_train, positions[train].reshape(-1), patches)
        with torch.no_grad():
            scores.append(float((probe(x_test).argmax(1) == positions[test].reshape(-1)).double().mean()))
    return _result(scores, "accuracy")


def patch_pixels(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(images, patches, channels * patch²)` pixels of each patch, in the same raster order as the patch tokens."""
    return F.unfold(pixel_values, kernel_size=patch_size, stride=patch_size).transpose(1, 2)


def reconstruction_probe(
    patch_tokens: torch.Tensor, pixels: torch.Tensor, seeds=(0, 1, 2), test_fraction: float = 0.25, ridge: float = 1e-3
) -> ProbeResult:
    """Test MSE of a ridge regression from each patch token to its own pixels (`patch_pixels`)."""
    if patch_tokens.shape[:2] != pixels.shape[:2]:
        raise ValueError(f"tokens {tuple(patch_tokens.shape)} and pixels {tuple(pixels.shape)} do not line up.")
    images = patch_tokens.shape[0]
    scores = []
    for seed in seeds:
        train, test = _split(images, test_fraction, seed)
        x_train = patch_tokens[train].reshape(-1, patch_tokens.shape[-1]).double()
        x_test = patch_tokens[test].reshape(-1, patch_tokens.shape[-1]).double()
        y_train = pixels[train].reshape(-1, pixels.shape[-1]).double()
        y_test = pixels[test].reshape(-1, pixels.shape[-1]).double()
        x_train, x_test = _standardise(x_train, x_test)
        x_train = torch.cat([x_train, torch.ones(len(x_train), 1, dtype=x_train.dtype)], 1)
        x_test = torch.cat([x_test, torch.ones(len(x_test), 1, dtype=x_test.dtype)], 1)
        gram = x_train.T @ x_train + ridge * len(x_train) * torch.eye(x_train.shape[1], dtype=x_train.dtype)
        weights = torch.linalg.solve(gram, x_train.T @ y_train)
        scores.append(float(((x_test @ weights - y_test) ** 2).mean()))
    return _result(scores, "mse")


TOKEN_KINDS = ("cls", "register", "normal_patch", "outlier_patch")


@torch.no_grad()
def probe_tokens(
    model,
    pixel_values: torch.Tensor,
    kind: str = "cls",
    layer: int = -1,
    register_index: int = 0,
    threshold: float | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per image for single-token probes (Darcet et al. 2024, Table 1): `"cls"`, `"register"` (number
    `register_index`), a random `"normal_patch"` or a random `"outlier_patch"` (norm above `threshold` at the last
    layer, before the final norm), taken from hidden state `layer` (0 = embeddings, -1 = last layer).

    Returns `(features (n, dims), image_indices (n,))`: images without a patch of the requested kind are left out.
    """
    if kind not in TOKEN_KINDS:
        raise ValueError(f"kind must be one of {TOKEN_KINDS}, got {kind!r}.")
    base = getattr(model, "vit_registers", model)
    config = base.config
    hidden_states = base(pixel_values, output_hidden_states=True).hidden_states
    tokens = hidden_states[layer]
    layout = TokenLayout.from_config(config, tokens.shape[1])
    images = torch.arange(tokens.shape[0])
    if kind == "cls":
        if not len(layout.cls):
            raise ValueError("This model has no CLS token.")
        return tokens[:, layout.cls[0]], images
    if kind == "register":
        if not 0 <= register_index < config.num_register_tokens:
            raise ValueError(f"Register {register_index} does not exist (the model has {config.num_register_tokens}).")
        return tokens[:, layout.registers[register_index]], images  # trained registers come first
    if threshold is None:
        raise ValueError(f"kind={kind!r} needs the outlier norm threshold.")
    outliers = hidden_states[-1][:, layout.patches].norm(dim=-1) > threshold
    wanted = outliers if kind == "outlier_patch" else ~outliers
    generator = torch.Generator().manual_seed(seed)
    chosen, kept = [], []
    for image in range(tokens.shape[0]):
        candidates = torch.nonzero(wanted[image]).flatten()
        if len(candidates):
            pick = candidates[torch.randint(len(candidates), (1,), generator=generator)].item()
            chosen.append(tokens[image, int(layout.patches[pick])])
            kept.append(image)
    if not chosen:
        return tokens.new_zeros(0, tokens.shape[-1]), torch.zeros(0, dtype=torch.long)
    return torch.stack(chosen), torch.tensor(kept)


def _result(scores: list[float], metric: str) -> ProbeResult:
    spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
    return ProbeResult(statistics.fmean(scores), spread, scores, metric)


__all__ = [
    "TOKEN_KINDS",
    "probe_tokens",
    "ProbeResult",
    "effective_rank",
    "fit_logistic_regression",
    "linear_probe",
    "position_probe",
    "patch_pixels",
    "reconstruction_probe",
]
