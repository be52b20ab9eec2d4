"""Weighted k-NN classification on frozen features, DINOv2's protocol (`dinov2/eval/knn.py`, after Wu et al. 2018).

Train and test features are L2-normalised; for each test image the `max(k)` train images of highest cosine similarity
vote for their class with weight `exp(similarity / T)` (T = 0.07). For each k the first k neighbours' votes are summed
per class; top-1 is the class of largest total, top-5 asks whether the true class is among the 5 largest. Test images
are processed in chunks, so memory is `chunk × train` similarities, not `test × train`.
"""

from __future__ import annotations

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


def normalize(features):
    import torch

    return torch.nn.functional.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)


def knn_scores(train, train_labels, test, ks, num_classes: int, temperature: float = DEFAULT_TEMPERATURE, chunk=1024):
    """`{k: (test, num_classes) float tensor}` of class votes; `train`/`test` already L2-normalised."""
    import torch

    train = torch.as_tensor(train, dtype=torch.float32)
    test = torch.as_tensor(test, dtype=torch.float32)
    train_labels = torch.as_tensor(train_labels, dtype=torch.int64)
    largest = min(max(ks), train.shape[0])
    scores = {k: torch.zeros(test.shape[0], num_classes) for k in ks}
    for start in range(0, test.shape[0], chunk):
        similarity = test[start : start + chunk] @ train.T
        top, index = similarity.topk(largest, dim=1)  # sorted, largest first
        neighbour_labels = train_labels[index]
        weights = (top / temperature).exp()
        for k in ks:
            used = min(k, largest)
            votes = torch.zeros(top.shape[0], num_classes)
            votes.scatter_add_(1, neighbour_labels[:, :used], weights[:, :used])
            scores[k][start : start + chunk] = votes
    return scores


def top_k_accuracy(scores, labels, k: int) -> float:
    """Fraction of rows whose true label is among the `k` largest scores (the usual top-k accuracy); equal scores are
    ranked by class index (a stable sort), so classes without votes enter in a fixed order."""
    import torch

    labels = torch.as_tensor(labels, dtype=torch.int64)
    k = min(k, scores.shape[1])
    ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    hits = (ranked == labels[:, None]).any(dim=1)
    return float(hits.double().mean()) if len(labels) else 0.0


def knn_evaluate(
    train, train_labels, test, test_labels, ks=DEFAULT_KS, temperature=DEFAULT_TEMPERATURE, num_classes=None
):
    """`{k: {"top1": ..., "top5": ...}}` (fractions). Top-1 goes through the `evaluate` accuracy metric
    (`vit_registers.training.metrics`, the offline twin of `evaluate.load("accuracy")`)."""
    import numpy as np

    from ..training.metrics import load_accuracy

    if num_classes is None:
        num_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
    scores = knn_scores(normalize(train), train_labels, normalize(test), ks, num_classes, temperature)
    results = {}
    for k, votes in scores.items():
        predictions = votes.argmax(dim=1).numpy()
        top1 = load_accuracy().compute(predictions=predictions, references=np.asarray(test_labels))["accuracy"]
        results[k] = {"top1": top1, "top5": top_k_accuracy(votes, test_labels, 5)}
    return results
