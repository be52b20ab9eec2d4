"""`vit-registers eval knn` and `vit-registers eval linear`: accuracy of features written by `vit-registers embed`.

    vit-registers eval knn    --features DIR [--inputs cls cls+patch_mean cls+registers] [--k 10 20 100 200]
    vit-registers eval linear --features DIR [--inputs ...] [--learning-rates ...] [--weight-decays ...]

Train on `--train-split` (default train), score `--test-split` (default test) of one embedding directory, or of
`--test-features DIR2` when the test split was embedded separately. Each input is a stored feature or several joined
with `+`; for k-NN each part is L2-normalised before concatenation (every part weighs the same in the cosine), the
linear probe sees the plain concatenation (standardised). Results: `{knn,linear}.json` and `.md` in `--output-dir`,
and the Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, type=Path, help="directory written by `vit-registers embed`")
    parser.add_argument(
        "--test-features", type=Path, default=None, help="another embedding directory holding the test split"
    )
    parser.add_argument("--train-split", default="train", help="split the classifier learns from (train)")
    parser.add_argument("--test-split", default="test", help="split scored (test)")
    parser.add_argument(
        "--inputs",
        nargs="+",
        default=None,
        metavar="FEATURE[+FEATURE]",
        help="what to evaluate, e.g. cls cls+patch_mean cls+registers registers (default: those of these stored)",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="write the JSON and Markdown results here")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..argtypes import positive_int
    from .knn import DEFAULT_KS, DEFAULT_TEMPERATURE
    from .linear import DEFAULT_LEARNING_RATES, DEFAULT_WEIGHT_DECAYS

    commands = parser.add_subparsers(dest="protocol", metavar="{knn,linear}")
    commands.required = True
    knn = commands.add_parser("knn", help="weighted k-NN (DINOv2: cosine, exp(sim/T) votes, top-1 and top-5)")
    _common(knn)
    knn.add_argument("--k", type=positive_int, nargs="+", default=list(DEFAULT_KS), help="neighbour counts")
    knn.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="T of exp(sim/T) (0.07)")
    linear = commands.add_parser("linear", help="linear classifier on frozen features, lr x weight-decay grid")
    _common(linear)
    linear.add_argument("--learning-rates", type=float, nargs="+", default=list(DEFAULT_LEARNING_RATES))
    linear.add_argument("--weight-decays", type=float, nargs="+", default=list(DEFAULT_WEIGHT_DECAYS))
    linear.add_argument("--epochs", type=positive_int, default=30, help="passes over the train features (30)")
    linear.add_argument("--batch-size", type=positive_int, default=256)
    linear.add_argument(
        "--val-fraction", type=float, default=0.1, help="part of train held out to choose the setting (0.1)"
    )
    linear.add_argument("--seed", type=int, default=0)


def _join(matrices: dict, parts: list[str], normalise: bool):
    import numpy as np

    chosen = [matrices[part] for part in parts]
    if normalise:
        chosen = [m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12) for m in chosen]
    return np.concatenate(chosen, axis=1) if len(chosen) > 1 else chosen[0]


def run(args: argparse.Namespace) -> int:
    from ..cli import CLIError
    from .store import FeatureError, default_inputs, load_split, parse_inputs, read_manifest

    if args.protocol == "linear" and not 0 < args.val_fraction < 1:
        raise CLIError(f"--val-fraction must be in (0, 1), got {args.val_fraction}.")
    if args.protocol == "knn" and not args.temperature > 0:
        raise CLIError(f"--temperature must be positive, got {args.temperature}.")
    test_dir = args.test_features or args.features
    try:
        manifest = read_manifest(args.features)
        test_manifest = read_manifest(test_dir)
        inputs = parse_inputs(args.inputs or default_inputs(manifest), manifest)
        parse_inputs([name for name, _ in inputs], test_manifest)
        needed = sorted({part for _, parts in inputs for part in parts})
        train, train_labels, _ = load_split(args.features, args.train_split, needed)
        test, test_labels, _ = load_split(test_dir, args.test_split, needed)
    except FeatureError as error:
        raise CLIError(str(error)) from None
    for name in needed:
        if train[name].shape[1] != test[name].shape[1]:
            raise CLIError(f"feature {name!r} is {train[name].shape[1]} wide in train, {test[name].shape[1]} in test.")
    names = manifest.get("label_names")
    num_classes = len(names) if names else int(max(train_labels.max(), test_labels.max())) + 1

    results = []
    for name, parts in inputs:
        started = time.perf_counter()
        if args.protocol == "knn":
            from .knn import knn_evaluate

            by_k = knn_evaluate(
                _join(train, parts, True),
                train_labels,
                _join(test, parts, True),
                test_labels,
                ks=args.k,
                temperature=args.temperature,
                num_classes=num_classes,
            )
            result = {"input": name, "dim": int(_join(test, parts, False).shape[1]), "knn": by_k}
        else:
            from .linear import linear_evaluate

            result = {
                "input": name,
                "dim": int(_join(test, parts, False).shape[1]),
                "linear": linear_evaluate(
                    _join(train, parts, False),
                    train_labels,
                    _join(test, parts, False),
                    test_labels,
                    learning_rates=args.learning_rates,
                    weight_decays=args.weight_decays,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    val_fraction=args.val_fraction,
                    seed=args.seed,
                    num_classes=num_classes,
                ),
            }
        result["seconds"] = time.perf_counter() - started
        results.append(result)

    report = {
        "protocol": args.protocol,
        "features": str(args.features),
        "test_features": str(test_dir),
        "model": manifest.get("model"),
        "dataset": manifest.get("dataset"),
        "input_size": manifest.get("input_size"),
        "train": {"split": args.train_split, "rows": int(len(train_labels))},
        "test": {"split": args.test_split, "rows": int(len(test_labels))},
        "num_classes": num_classes,
        "settings": (
            {"k": args.k, "temperature": args.temperature, "similarity": "cosine", "weights": "exp(sim/T)"}
            if args.protocol == "knn"
            else {
                "learning_rates": args.learning_rates,
                "weight_decays": args.weight_decays,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "val_fraction": args.val_fraction,
                "seed": args.seed,
                "optimizer": "SGD momentum 0.9, cosine decay, features standardised",
            }
        ),
        "metric": "accuracy (vit_registers.training.metrics: the offline twin of evaluate.load('accuracy'))",
        "results": results,
    }
    table = markdown(report)
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / f"{args.protocol}.json").write_text(json.dumps(report, indent=2))
        (args.output_dir / f"{args.protocol}.md").write_text(table + "\n")
    print(table)
    return 0


def markdown(report: dict) -> str:
    """The results as a Markdown table (percentages), one row per input."""
    head = (
        f"{report['protocol']} on {report['features']}: train {report['train']['split']} "
        f"({report['train']['rows']} rows), test {report['test']['split']} ({report['test']['rows']} rows)\n\n"
    )
    if report["protocol"] == "knn":
        ks = report["settings"]["k"]
        header = "| input | dim | " + " | ".join(f"{k}-NN top-1 / top-5" for k in ks) + " |"
        rule = "|---|---:|" + "---:|" * len(ks)
        rows = [
            f"| {r['input']} | {r['dim']} | "
            + " | ".join(f"{100 * r['knn'][k]['top1']:.2f} / {100 * r['knn'][k]['top5']:.2f}" for k in ks)
            + " |"
            for r in report["results"]
        ]
    else:
        header = "| input | dim | learning rate | weight decay | val top-1 | test top-1 | test top-5 |"
        rule = "|---|---:|---:|---:|---:|---:|---:|"
        rows = [
            f"| {r['input']} | {r['dim']} | {r['linear']['learning_rate']:g} | {r['linear']['weight_decay']:g} | "
            f"{100 * r['linear']['val_top1']:.2f} | {100 * r['linear']['top1']:.2f} | {100 * r['linear']['top5']:.2f} |"
            for r in report["results"]
        ]
    return head + "\n".join([header, rule, *rows])
