"""`vit-registers eval knn` / `eval linear` (issue 22): the k-NN vote against a direct transcription of DINOv2's rule,
the linear probe's grid search on data with a known answer, and both commands on features that `embed` wrote for a
slice of real CIFAR-10."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import vit_registers.cli as cli
from vit_registers.features.knn import knn_evaluate
from vit_registers.features.linear import linear_evaluate

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"), raising=False)


def _main(argv, capsys):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def reference_knn(train, train_labels, test, k, temperature, num_classes):
    """DINOv2's rule written out one test image at a time: cosine similarities, the k most similar train images,
    weights exp(sim / T) summed per class; `(top-1 predictions, top-5 class lists)`."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    predictions, top5 = [], []
    for query in test:
        similarity = train @ (query / np.linalg.norm(query))
        nearest = np.argsort(-similarity, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for index in nearest:
            votes[train_labels[index]] += math.exp(similarity[index] / temperature)
        order = np.argsort(-votes, kind="stable")
        predictions.append(order[0])
        top5.append(order[:5])
    return np.array(predictions), top5


def test_knn_matches_the_rule_written_out():
    generator = np.random.default_rng(0)
    centres = generator.normal(size=(7, 12))
    train_labels = generator.integers(0, 7, 300)
    test_labels = generator.integers(0, 7, 90)
    train = centres[train_labels] + 1.5 * generator.normal(size=(300, 12))
    test = centres[test_labels] + 1.5 * generator.normal(size=(90, 12))
    results = knn_evaluate(train, train_labels, test, test_labels, ks=(1, 10, 50), temperature=0.07, num_classes=7)
    for k in (1, 10, 50):
        predictions, top5 = reference_knn(train, train_labels, test, k, 0.07, 7)
        assert results[k]["top1"] == pytest.approx(np.mean(predictions == test_labels), abs=1e-12)
        assert results[k]["top5"] == pytest.approx(np.mean([y in t for y, t in zip(test_labels, top5)]), abs=1e-12)
    assert 0.3 < results[10]["top1"] < 1.0  # neither trivial nor chance (1/7)
    # the temperature matters: T large = plain majority vote, a different answer on this data
    flat = knn_evaluate(train, train_labels, test, test_labels, ks=(50,), temperature=100.0, num_classes=7)
    predictions, _ = reference_knn(train, train_labels, test, 50, 100.0, 7)
    assert flat[50]["top1"] == pytest.approx(np.mean(predictions == test_labels), abs=1e-12)


def test_linear_probe_chooses_on_held_out_train_and_learns_separable_classes():
    generator = np.random.default_rng(1)
    centres = 3 * generator.normal(size=(5, 20))
    train_labels = generator.integers(0, 5, 400)
    test_labels = generator.integers(0, 5, 200)
    train = centres[train_labels] + generator.normal(size=(400, 20))
    test = centres[test_labels] + generator.normal(size=(200, 20))
    result = linear_evaluate(
        train, train_labels, test, test_labels, learning_rates=(1e-4, 0.1), weight_decays=(0.0, 1e-3), epochs=10
    )
    assert result["num_val"] == 40 and result["num_fit"] == 360
    assert len(result["grid"]) == 4
    assert result["val_top1"] == max(row["val_top1"] for row in result["grid"])
    first_best = next(row for row in result["grid"] if row["val_top1"] == result["val_top1"])  # ties: first setting
    assert (result["learning_rate"], result["weight_decay"]) == (
        first_best["learning_rate"],
        first_best["weight_decay"],
    )
    assert result["top1"] > 0.95 and result["top5"] == 1.0
    # features that carry no class information: about chance (1/5)
    noise = linear_evaluate(
        generator.normal(size=(400, 20)), train_labels, generator.normal(size=(200, 20)), test_labels
    )
    assert noise["top1"] < 0.35


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Features of 120 train and 60 test CIFAR-10 images, written by `vit-registers embed` (4-register model)."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "cifar"
    data.mkdir()
    for split, count, seed in (("train", 120, 3), ("test", 60, 4)):
        table = pq.read_table(CIFAR / f"{split}.parquet")
        rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=count, replace=False))
        pq.write_table(table.take(rows), data / f"{split}.parquet")
    out = root / "features"
    import os

    old = os.environ.get("HF_DATASETS_CACHE")
    os.environ["HF_DATASETS_CACHE"] = str(root / "cache")
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        code = cli.main(["embed", "--dataset", str(data), "--output", str(out), "--quiet", "--dtype", "float32"])
    finally:
        if old is None:
            os.environ.pop("HF_DATASETS_CACHE")
        else:
            os.environ["HF_DATASETS_CACHE"] = old
    assert code == 0
    return out


def test_eval_knn_and_linear_on_embedded_cifar(tmp_path, embedded, capsys):
    import datasets

    code, stdout, stderr = _main(
        ["eval", "knn", "--features", embedded, "--output-dir", tmp_path, "--k", 5, 20], capsys
    )
    assert code == 0, stderr
    report = json.loads((tmp_path / "knn.json").read_text())
    assert [r["input"] for r in report["results"]] == ["cls", "cls+patch_mean", "cls+registers", "registers"]
    assert [r["dim"] for r in report["results"]] == [128, 256, 640, 512]
    assert report["train"]["rows"] == 120 and report["test"]["rows"] == 60
    assert "| cls+registers | 640 |" in stdout and (tmp_path / "knn.md").read_text().strip() in stdout.strip()
    # the CLS row against the rule written out on the stored features
    data = datasets.load_dataset(str(embedded)).with_format("numpy")
    train, test = data["train"][:], data["test"][:]
    for k in (5, 20):
        predictions, top5 = reference_knn(train["cls"], train["label"], test["cls"], k, 0.07, 10)
        cls = report["results"][0]["knn"][str(k)]
        assert cls["top1"] == pytest.approx(np.mean(predictions == test["label"]), abs=1e-9)
        assert cls["top5"] == pytest.approx(np.mean([y in t for y, t in zip(test["label"], top5)]), abs=1e-9)

    argv = ["eval", "linear", "--features", embedded, "--output-dir", tmp_path, "--inputs", "cls", "cls+registers"]
    code, stdout, stderr = _main([*argv, "--epochs", 5, "--learning-rates", 0.01, 0.1, "--weight-decays", 0], capsys)
    assert code == 0, stderr
    report = json.loads((tmp_path / "linear.json").read_text())
    assert [r["input"] for r in report["results"]] == ["cls", "cls+registers"]
    for row in report["results"]:
        assert row["linear"]["learning_rate"] in (0.01, 0.1) and len(row["linear"]["grid"]) == 2
        assert 0 <= row["linear"]["top1"] <= row["linear"]["top5"] <= 1
    assert "| cls+registers | 640 |" in stdout

    for argv, message in (
        (["knn", "--features", embedded, "--inputs", "cls+patches"], "patches not stored"),
        (["knn", "--features", tmp_path / "nothing"], "not a directory written by `vit-registers embed`"),
        (["knn", "--features", embedded, "--test-split", "validation"], "no split 'validation'"),
        (["linear", "--features", embedded, "--val-fraction", 1.5], "--val-fraction"),
    ):
        code, _, stderr = _main(["eval", *argv], capsys)
        assert code == 1 and message in stderr, (argv, stderr)
