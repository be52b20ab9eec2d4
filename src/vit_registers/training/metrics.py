"""Accuracy as an `evaluate` module that works offline.

`evaluate.load("accuracy")` fetches its script from the Hub; this is the same metric defined locally, so training
and tests never touch the network. It behaves like any `evaluate.Metric` (`add_batch`, `compute`).
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np


class Accuracy(evaluate.Metric):
    """Fraction of predictions equal to the references (optionally weighted by `sample_weight`)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Accuracy: proportion of correct predictions.",
            citation="",
            inputs_description="predictions and references: lists of integer class ids.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        correct = (predictions == references).astype(np.float64)
        if sample_weight is None:
            return {"accuracy": float(correct.mean()) if correct.size else 0.0}
        weights = np.asarray(sample_weight, dtype=np.float64)
        return {"accuracy": float((correct * weights).sum() / weights.sum())}


def load_accuracy() -> evaluate.Metric:
    """A fresh accuracy metric (the local twin of `evaluate.load("accuracy")`)."""
    return Accuracy()


def compute_metrics_for_trainer(eval_prediction) -> dict[str, float]:
    """`Trainer(compute_metrics=...)` function: argmax of the logits against the labels."""
    logits, labels = eval_prediction
    logits = logits[0] if isinstance(logits, tuple) else logits
    return load_accuracy().compute(predictions=np.argmax(logits, axis=-1), references=labels)


__all__ = ["Accuracy", "compute_metrics_for_trainer", "load_accuracy"]
