"""Linear classifiers on frozen features, in the manner of DINOv2's linear evaluation (`dinov2/eval/linear.py`).

As DINOv2 does, one classifier per hyper-parameter setting is trained at the same time on the same mini-batches (SGD,
momentum 0.9, cosine learning-rate decay), and the setting with the best accuracy on held-out data is reported. Here
the grid is learning rate × weight decay, and the held-out data is a fixed random part of the train split
(`val_fraction`, 10 % by default): the winner is chosen there, then retrained on the whole train split and scored
once on the test split. Features are standardised with the mean and standard deviation of the data the classifier is
trained on (one scale for every model, so one grid fits all).
"""

from __future__ import annotations

DEFAULT_LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3)


def train_heads(features, labels, num_classes, settings, epochs=30, batch_size=256, seed=0):
    """Train one linear layer per `(learning_rate, weight_decay)` in `settings` on the same batches; returns
    `(weights (G, D, C), biases (G, C), mean, std)`."""
    import math

    import torch

    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.int64)
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    count, dim = x.shape
    heads = len(settings)
    # all heads in one (dim, heads × classes) matrix: one GEMM per step instead of a batched product
    weights = torch.zeros(dim, heads * num_classes, requires_grad=True)
    biases = torch.zeros(heads * num_classes, requires_grad=True)
    learning_rates = torch.tensor([lr for lr, _ in settings]).repeat_interleave(num_classes)
    decays = torch.tensor([wd for _, wd in settings]).repeat_interleave(num_classes)
    velocity_w = torch.zeros_like(weights)
    velocity_b = torch.zeros_like(biases)
    steps_per_epoch = max(1, math.ceil(count / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, batch_size):
            index = order[start : start + batch_size]
            logits = torch.addmm(biases, x[index], weights).view(len(index) * heads, num_classes)
            # summed over heads: each head's gradient is that of its own mean cross-entropy
            loss = torch.nn.functional.cross_entropy(logits, y[index].repeat_interleave(heads), reduction="sum") / len(
                index
            )
            grad_w, grad_b = torch.autograd.grad(loss, (weights, biases))
            scale = 0.5 * (1 + math.cos(math.pi * step / total))  # cosine decay to 0
            with torch.no_grad():
                grad_w = grad_w + decays * weights  # L2 weight decay on the weights, not the biases (SGD's form)
                velocity_w.mul_(0.9).add_(grad_w)
                velocity_b.mul_(0.9).add_(grad_b)
                weights -= scale * learning_rates * velocity_w
                biases -= scale * learning_rates * velocity_b
            step += 1
    return (
        weights.detach().view(dim, heads, num_classes).permute(1, 0, 2).contiguous(),
        biases.detach().view(heads, num_classes),
        mean,
        std,
    )


def predict(heads, features):
    """`(G, n, C)` logits of every head."""
    import torch

    weights, biases, mean, std = heads
    x = (torch.as_tensor(features, dtype=torch.float32) - mean) / std
    return torch.einsum("bd,gdc->gbc", x, weights) + biases[:, None, :]


def linear_evaluate(
    train,
    train_labels,
    test,
    test_labels,
    learning_rates=DEFAULT_LEARNING_RATES,
    weight_decays=DEFAULT_WEIGHT_DECAYS,
    epochs=30,
    batch_size=256,
    val_fraction=0.1,
    seed=0,
    num_classes=None,
):
    """Grid search on a held-out `val_fraction` of train, retrain the best setting on all of train, score on test.
    Returns a dict with the grid's validation accuracies, the chosen setting and test top-1 / top-5 (fractions)."""
    import numpy as np
    import torch

    from ..training.metrics import load_accuracy
    from .knn import top_k_accuracy

    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    settings = [(float(lr), float(wd)) for lr in learning_rates for wd in weight_decays]
    order = np.random.default_rng(seed).permutation(len(train_labels))
    held_out = max(1, int(round(val_fraction * len(order))))
    if held_out >= len(order):
        raise ValueError(f"{len(order)} train rows are too few to hold out {val_fraction:.0%} for validation.")
    val_index, fit_index = np.sort(order[:held_out]), np.sort(order[held_out:])
    train = np.asarray(train, dtype=np.float32)
    heads = train_heads(train[fit_index], train_labels[fit_index], num_classes, settings, epochs, batch_size, seed)
    val_logits = predict(heads, train[val_index])
    grid = []
    for (lr, wd), logits in zip(settings, val_logits):
        accuracy = load_accuracy().compute(predictions=logits.argmax(1).numpy(), references=train_labels[val_index])[
            "accuracy"
        ]
        grid.append({"learning_rate": lr, "weight_decay": wd, "val_top1": accuracy})
    best = max(range(len(grid)), key=lambda i: (grid[i]["val_top1"], -i))  # ties: the first (smaller lr, wd)
    chosen = settings[best]
    final = train_heads(train, train_labels, num_classes, [chosen], epochs, batch_size, seed)
    logits = predict(final, test)[0]
    with torch.no_grad():
        top1 = load_accuracy().compute(predictions=logits.argmax(1).numpy(), references=test_labels)["accuracy"]
        top5 = top_k_accuracy(logits, test_labels, 5)
    return {
        "learning_rate": chosen[0],
        "weight_decay": chosen[1],
        "val_top1": grid[best]["val_top1"],
        "top1": top1,
        "top5": top5,
        "grid": grid,
        "num_fit": int(len(fit_index)),
        "num_val": int(len(val_index)),
    }
