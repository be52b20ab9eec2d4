"""`vit-registers` command line.

Subcommands live in `SUBCOMMANDS` (name → [`Subcommand`]); others add theirs with [`register_subcommand`]:

    register_subcommand("demo", "launch the demo", add_arguments=my_args, run=my_run)

`run(args)` returns the exit status. Errors a user can fix raise [`CLIError`] (or a `ValueError`/`OSError` with a
clear message): `main` prints one line and exits non-zero, with no traceback unless `--traceback` is given.

Every command that analyses a model gets it from [`load_model_from_args`]. Start-up stays cheap: `main` adds the
arguments of the chosen subcommand only (the demo's come from `vit_registers.space`), and each subcommand imports
what it uses (matplotlib, gradio, ...) inside its `run`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from .cpu_allocator import tune_cpu_allocator
from .onnx_export import add_arguments as _export_arguments
from .onnx_export import run as _run_export

PROG = "vit-registers"


def default_model() -> str | None:
    """The embedded model with 4 registers (`vit_registers.pretrained`), used when `--model` is omitted."""
    from .pretrained import default_model_path, default_models

    return str(default_model_path(4)) if default_models() else None


# Model used when `--model` is omitted: the embedded default model when it is installed.
DEFAULT_MODEL: str | None = default_model()


MAX_LISTED = 20  # skipped inputs printed one per line; the rest are counted


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


@dataclass
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    tune_allocator: bool = True  # batch work: freed activations stay mapped (vit_registers.cpu_allocator)


SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    tune_allocator: bool = True,
) -> None:
    """Add (or replace) a subcommand of `vit-registers`; `tune_allocator=False` for long-running servers, which should
    not keep freed memory resident (see `vit_registers.cpu_allocator`)."""
    SUBCOMMANDS[name] = Subcommand(help, add_arguments, run, tune_allocator)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """`--model PATH_OR_ID` (required while `DEFAULT_MODEL` is None) and `--device`."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        required=DEFAULT_MODEL is None,
        metavar="PATH_OR_ID",
        help="saved vit_registers model directory or Hub id"
        + (f" (default: {DEFAULT_MODEL})" if DEFAULT_MODEL else ""),
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def load_model_from_args(args: argparse.Namespace):
    """`(model, processor)` for `--model` on `--device` (`vit_registers.analysis.loading.load_model`): the one place
    where the subcommands load a model. A missing image processor is reported as a warning line."""
    from .analysis.loading import ModelLoadError, load_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            model, processor = load_model(args.model, args.device)
        except ModelLoadError as error:
            raise CLIError(str(error)) from None
    for warning in caught:
        if "image processor" in str(warning.message):
            _warn(str(warning.message))
    from .onednn import apply_cpu_kernels

    apply_cpu_kernels(model)  # oneDNN blocks on the CPU (vit_registers.onednn); VIT_REGISTERS_CPU_KERNELS=off: plain
    return model, processor


def _add_lost_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LOST")
    group.add_argument("--lost-features", default="keys", choices=("keys", "queries", "values", "tokens"))
    group.add_argument("--lost-layer", type=int, default=-1, help="layer whose features LOST uses (default: last)")
    group.add_argument("--lost-k", type=int, default=100, help="number of lowest-degree patches (default: 100)")
    group.add_argument("--lost-bias", type=float, default=0.0, help="bias b added to A = F F^T (default: 0)")


# ----------------------------------------------------------------------------------------------------- analyze


def _analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="image files (default: scikit-image's bundled photos astronaut, coffee, chelsea and rocket)",
    )
    add_model_argument(parser)
    parser.add_argument("--output-dir", required=True, type=Path, help="where figures and stats.json go")
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[-1],
        metavar="L",
        help="layers whose attention maps are drawn (negative counts from the end; default: -1)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="absolute norm threshold for outliers (default: the --rule computed over the given images)",
    )
    parser.add_argument(
        "--rule",
        choices=("gap", "percentile", "sigma", "absolute"),
        default=None,
        help="outlier rule (default: absolute with --threshold, else gap: the patches above a "
        "separate high-norm mode, none without one)",
    )
    parser.add_argument("--percentile", type=float, default=98.0, help="percentile for --rule percentile (98)")
    parser.add_argument("--sigma", type=float, default=3.0, help="k for --rule sigma: mean + k std (3)")
    parser.add_argument("--size", type=int, default=None, help="shorter image side in pixels (default: processor's)")
    parser.add_argument("--dpi", type=int, default=100, help="figure resolution")
    parser.add_argument("--batch-size", type=int, default=8, help="images of one input size per model call (8)")
    _add_lost_arguments(parser)


def _figure_stem(path: str, used: set[str]) -> str:
    stem = Path(path).stem or "image"
    candidate, number = stem, 1
    while candidate in used:
        number += 1
        candidate = f"{stem}_{number}"
    used.add(candidate)
    return candidate


def run_analyze(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from .analysis import figures
    from .analysis.images import ImageError, load_image, prepare_with_processor
    from .analysis.pipeline import analyze_batch, judge_outliers

    rule = args.rule or ("absolute" if args.threshold is not None else "gap")
    if rule == "absolute" and args.threshold is None:
        raise CLIError("--rule absolute needs --threshold VALUE.")
    if args.size is not None and args.size < 1:
        raise CLIError(f"--size must be positive, got {args.size}.")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if not args.images:
        from .analysis.images import bundled_photos

        args.images = bundled_photos(args.output_dir / "inputs")
    model, processor = load_model_from_args(args)
    config = model.config
    depth = config.num_hidden_layers
    for layer in [*args.layers, args.lost_layer]:
        if not -depth <= layer < depth:
            raise CLIError(f"layer {layer} does not exist in this {depth}-layer model (valid: {-depth}..{depth - 1}).")
    args.output_dir.mkdir(parents=True, exist_ok=True)

    done, errors, pending = {}, [], {}
    # one bar per stage, each counting work done: an image is "analysed" once its model call has returned
    quiet = len(args.images) < 2
    bar = tqdm(total=len(args.images), desc="model", unit="image", disable=quiet)

    def run_batch(size):
        batch = pending.pop(size)
        pixel_values = torch.stack([prepared.pixel_values for _, _, prepared in batch])
        analyses = analyze_batch(
            model,
            pixel_values,
            layers=args.layers,
            lost_layer=args.lost_layer,
            lost_kind=args.lost_features,
            lost_k=args.lost_k,
            lost_bias=args.lost_bias,
        )
        for (index, path, prepared), analysis in zip(batch, analyses):
            done[index] = (path, prepared, analysis)
        bar.update(len(batch))

    # images of one input size share a batch; the results keep the command line's order
    for index, path in enumerate(args.images):
        try:
            prepared = prepare_with_processor(
                load_image(path), processor, config.patch_size, name=path, short_side=args.size
            )
        except ImageError as error:
            errors.append({"path": path, "error": str(error)})
            bar.update(1)
            if quiet:
                _warn(f"skipped {error}")
            else:  # above the bar, not through it
                tqdm.write(f"{PROG}: warning: skipped {error}", file=sys.stderr)
            continue
        pending.setdefault(prepared.input_size, []).append((index, path, prepared))
        if len(pending[prepared.input_size]) >= args.batch_size:
            run_batch(prepared.input_size)
    for size in list(pending):
        run_batch(size)
    bar.close()
    done = [done[index] for index in sorted(done)]

    stats = {
        "model": args.model,
        "outlier_rule": {"rule": rule, "threshold": args.threshold, "percentile": args.percentile, "k": args.sigma},
        "threshold": None,
        "outlier_verdict": None,
        "outliers_by_rule": None,
        "images": [],
        "errors": errors,
    }
    verdict = None
    if done:
        analyses = [analysis for _, _, analysis in done]
        verdict = judge_outliers(
            analyses, rule=rule, threshold=args.threshold, percentile=args.percentile, k=args.sigma
        )
        stats["threshold"] = analyses[0].threshold
        stats["outlier_verdict"] = verdict.to_dict()
        stats["outliers_by_rule"] = {
            name: sum(analysis.outlier_summary()["outliers_by_rule"][name] for analysis in analyses)
            for name in analyses[0].thresholds_by_rule
        }
    used: set[str] = set()
    for path, prepared, analysis in tqdm(done, desc="figures", unit="image", disable=quiet):
        stem = _figure_stem(path, used)
        image = prepared.image
        written = {}
        written["norms"] = figures.norm_figure(
            image,
            analysis.patch_norm_map,
            threshold=analysis.threshold,
            verdict=verdict,
            rule=rule,
            title=f"{Path(path).name}: patch norms after layer {depth} of {depth} (last), before the final norm",
        )
        for maps in analysis.attention:
            named = maps.named_maps()
            if named:
                written[f"attention_layer{maps.layer + 1}"] = figures.attention_figure(
                    image,
                    named,
                    dpi=args.dpi,
                    title=f"{Path(path).name}: attention to the patches in layer {maps.layer + 1} of {depth}",
                )
        written["pca"] = figures.pca_figure(
            image, analysis.pca_rgb, analysis.pca_whitened, analysis.pca_foreground_rgb, title=Path(path).name
        )
        written["lost"] = figures.lost_figure(
            image,
            analysis.lost.box,
            analysis.lost.similarity,
            title=f"{Path(path).name}: LOST",
            degenerate=analysis.lost.degenerate,
        )
        files = {}
        for name, fig in written.items():
            files[name] = f"{stem}_{name}.png"
            figures.save_figure(fig, args.output_dir / files[name], dpi=args.dpi)
        stats["images"].append({"path": path, **analysis.summary(prepared), "figures": files})
    stats_path = args.output_dir / "stats.json"
    stats_path.write_text(json.dumps(stats, indent=2))
    print(f"analysed {len(done)} of {len(args.images)} image(s); figures and stats in {stats_path.parent}")
    if verdict is not None:
        counts = ", ".join(f"{name} {count}" for name, count in stats["outliers_by_rule"].items())
        print(f"{verdict.headline}; patches flagged by each rule: {counts} of {verdict.num_patches}")
    for path, _, analysis in done:
        if analysis.lost.degenerate:
            print(f"LOST found no object in {path}: {analysis.lost.degenerate} (no box drawn; 'lost' in stats.json)")
    if errors:
        _warn(f"{len(errors)} image(s) could not be analysed (listed under 'errors' in {stats_path}).")
        return 1
    return 0


# ------------------------------------------------------------------------------------------------------ corloc


def _corloc_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument(
        "--dataset",
        required=True,
        type=Path,
        help="imagefolder-style directory with metadata.jsonl rows {file_name, objects: {bbox}}",
    )
    parser.add_argument("--box-format", choices=("xyxy", "xywh"), default="xyxy", help="bbox format (xyxy)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--square", action="store_true", help="resize to a square (default keeps the aspect ratio)")
    parser.add_argument("--size", type=int, default=None, help="shorter image side in pixels (default: processor's)")
    parser.add_argument("--output", type=Path, default=None, help="write per-image results as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_lost_arguments(parser)


def run_corloc(args: argparse.Namespace) -> int:
    from .analysis.corloc import DatasetError, evaluate_corloc, read_box_dataset

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if args.size is not None and args.size < 1:
        raise CLIError(f"--size must be positive, got {args.size}.")
    try:
        read_box_dataset(args.dataset, args.box_format)  # fail fast on a missing dataset, before loading the model
    except DatasetError as error:
        raise CLIError(str(error)) from None
    model, processor = load_model_from_args(args)
    depth = model.config.num_hidden_layers
    if not -depth <= args.lost_layer < depth:
        raise CLIError(f"--lost-layer {args.lost_layer} does not exist in this {depth}-layer model.")
    result = evaluate_corloc(
        model,
        processor,
        args.dataset,
        batch_size=args.batch_size,
        box_format=args.box_format,
        square=args.square,
        layer=args.lost_layer,
        kind=args.lost_features,
        k=args.lost_k,
        bias=args.lost_bias,
        progress=not args.quiet,
        short_side=args.size,
    )
    for message in result.skipped[:MAX_LISTED]:
        _warn(f"skipped {message}")
    if len(result.skipped) > MAX_LISTED:
        where = f"all listed in {args.output}" if args.output else "use --output to list them all"
        _warn(f"... and {len(result.skipped) - MAX_LISTED} more skipped ({where}).")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result.to_dict(), indent=2))
    if result.corloc is None:
        raise CLIError(f"no usable image in {args.dataset} ({len(result.skipped)} skipped).")
    print(
        f"CorLoc: {100 * result.corloc:.2f}% ({result.num_correct}/{result.num_images} images"
        + (f", {len(result.skipped)} skipped)" if result.skipped else ")")
    )
    if result.num_degenerate:
        print(
            f"LOST found no object in {result.num_degenerate} image(s) (their whole-image box is scored, as in LOST; "
            "'degenerate' per image with --output)"
        )
    return 0


# ----------------------------------------------------------------------------------------- find-register-neurons


def _neuron_arguments(parser: argparse.ArgumentParser) -> None:
    from .configuration_vit_registers import (
        DEFAULT_TEST_TIME_REGISTER_MODE,
        TEST_TIME_REGISTER_MODES,
        TEST_TIME_REGISTER_NORMAL_VALUES,
    )

    add_model_argument(parser)
    parser.add_argument("--images", required=True, type=Path, help="directory of images used for discovery")
    parser.add_argument("--output-dir", required=True, type=Path, help="where the ready model directory goes")
    parser.add_argument("--top-k", type=int, default=50, help="number of register neurons (paper: 45-50 for L/14)")
    parser.add_argument(
        "--highest-layer",
        type=int,
        default=None,
        help="last layer searched (default: the detection layer; paper: 17 for DINOv2-L)",
    )
    parser.add_argument(
        "--detection-layer",
        type=int,
        default=None,
        help="layer whose output norms flag outliers (default: second to last)",
    )
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float, help="absolute patch-norm threshold (paper: 150 for DINOv2-L)")
    rule.add_argument("--percentile", type=float, help="percentile of the pooled patch norms (default: 98)")
    parser.add_argument("--num-tokens", type=int, default=1, help="test-time registers to append (default: 1)")
    parser.add_argument(
        "--mode",
        choices=TEST_TIME_REGISTER_MODES,
        default=DEFAULT_TEST_TIME_REGISTER_MODE,
        help="the edit: 'reference' (the authors' code, default) or 'per_neuron'",
    )
    parser.add_argument(
        "--normal-values",
        choices=TEST_TIME_REGISTER_NORMAL_VALUES,
        default="zero",
        help="what the other tokens get in the register neurons (default: zero)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        nargs="+",
        default=[1.0],
        help="factor of the test-time registers' value: one, or one per token (default: 1)",
    )
    parser.add_argument(
        "--norm-tokens",
        choices=("patches", "all"),
        default="patches",
        help="tokens whose norms flag outliers: patches only (default) or all, as the authors",
    )
    parser.add_argument("--sparsity-filter", action="store_true", help="the authors' sparsity filter of the search")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--force",
        action="store_true",
        help="write the model even when the images show no high-norm outliers that the network grows",
    )


def run_find_register_neurons(args: argparse.Namespace) -> int:
    import torch

    from .analysis.images import ImageError, load_image
    from .analysis.pipeline import layer_outliers
    from .interventions import enable_test_time_registers, find_register_neurons

    if not args.images.is_dir():
        raise CLIError(f"--images {args.images} is not a directory.")
    if args.output_dir.exists() and any(args.output_dir.iterdir()):
        raise CLIError(f"--output-dir {args.output_dir} exists and is not empty.")
    if args.top_k < 1 or args.num_tokens < 1 or args.batch_size < 1:
        raise CLIError("--top-k, --num-tokens and --batch-size must be >= 1.")
    if len(args.scale) not in (1, args.num_tokens):
        raise CLIError(f"--scale takes one factor or one per test-time token ({args.num_tokens}), got {args.scale}.")
    if args.percentile is not None and not 0 < args.percentile < 100:
        raise CLIError(f"--percentile must be in (0, 100), got {args.percentile}.")
    percentile = 98.0 if args.threshold is None and args.percentile is None else args.percentile
    model, processor = load_model_from_args(args)
    depth = model.config.num_hidden_layers
    for name in ("highest_layer", "detection_layer"):
        value = getattr(args, name)
        if value is not None and not -depth <= value < depth:
            raise CLIError(f"--{name.replace('_', '-')} {value} does not exist in this {depth}-layer model.")
    images = []
    for path in sorted(p for p in args.images.iterdir() if p.is_file()):
        try:
            images.append(load_image(path))
        except ImageError as error:
            _warn(f"skipped {error}")
    if not images:
        raise CLIError(f"no readable image in {args.images}.")
    device = next(model.parameters()).device
    batches = [
        processor(images[i : i + args.batch_size], return_tensors="pt")["pixel_values"].to(device)
        for i in range(0, len(images), args.batch_size)
    ]
    with torch.no_grad():
        found = find_register_neurons(
            model,
            batches,
            top_k=args.top_k,
            highest_layer=args.highest_layer,
            detection_layer=args.detection_layer,
            threshold=args.threshold,
            percentile=percentile,
            norm_tokens=args.norm_tokens,
            sparsity_filter=args.sparsity_filter,
        )
    # refuse to build test-time registers from patches that are not artifacts (Darcet et al. Fig. 4a: they separate
    # from the other patches inside the network; outliers.outlier_verdict: they form a separate high-norm mode)
    detection = depth - 2 if args.detection_layer is None else args.detection_layer % depth
    check = layer_outliers(model, batches, detection, threshold=found.threshold)
    problems = []
    if check.first_separating_layer is None:
        problems.append(
            f"the patches above the norm threshold {found.threshold:.4g} never stand apart from the "
            "others (at no depth is their mean norm 2x the rest's)"
        )
    if not check.verdict.found:
        problems.append(f"the output of layer {detection + 1} of {depth} has {check.verdict.headline}")
    problem = "; ".join(problems) or None
    if problem is not None:
        if not args.force:
            raise CLIError(
                f"no artifacts to move into test-time registers: {problem}. Nothing was written "
                "(--force writes the model anyway)."
            )
        _warn(f"{problem}. --force: writing the model anyway.")
    scale = args.scale[0] if len(args.scale) == 1 else args.scale
    enable_test_time_registers(
        model, found, num_tokens=args.num_tokens, mode=args.mode, normal_values=args.normal_values, scale=scale
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    from ._quiet import quiet_transformers

    with quiet_transformers():  # transformers' "Writing model shards" bar: noise next to the command's own result
        model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    report = {
        "model": args.model,
        "threshold": found.threshold,
        "rule": "absolute" if args.threshold is not None else f"percentile {percentile}",
        "images_seen": found.images_seen,
        "images_with_outliers": found.images_with_outliers,
        "first_separating_layer": check.first_separating_layer,
        "separation_ratio_per_layer": check.separation_ratios,
        "outlier_verdict": check.verdict.to_dict(),
        "forced": problem is not None,
        "neurons": {str(k): v for k, v in found.neurons.items()},
        "search": {"norm_tokens": args.norm_tokens, "sparsity_filter": args.sparsity_filter},
        "test_time_registers": model.config.test_time_registers,  # as stored in config.json
        "ranking": [{"layer": layer, "unit": unit, "score": score} for layer, unit, score in found.ranking],
    }
    (args.output_dir / "register_neurons.json").write_text(json.dumps(report, indent=2))
    count = sum(len(units) for units in found.neurons.values())
    print(
        f"{count} register neurons in layers {sorted(found.neurons)}; model with {args.num_tokens} test-time "
        f"register(s) written to {args.output_dir}"
    )
    return 0


# -------------------------------------------------------------------------------------------------------- demo


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .space import add_demo_arguments

    add_demo_arguments(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from .space import run_demo

    return run_demo(args)


# ------------------------------------------------------------------------------------------------------- study


def _study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="PATH_OR_ID",
        help="classification models to compare (default: the embedded models, 0 and 4 registers)",
    )
    parser.add_argument("--dataset", required=True, type=Path, help="dataset written by scripts/make_dataset.py")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--output-dir", required=True, type=Path, help="where study.json, study.md and figures go")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images of the split")
    parser.add_argument("--figures", type=int, default=3, help="images with attention figures per model (3)")


def run_study_command(args: argparse.Namespace) -> int:
    from .pretrained import default_models
    from .study import markdown_table, run_study

    models = args.models or [str(path) for path in reversed(list(default_models().values()))]
    if not models:
        raise CLIError("no --models given and no embedded model installed.")
    studies = run_study(
        models, args.dataset, args.output_dir, split=args.split, limit=args.limit, num_figures=args.figures
    )
    print(markdown_table(studies))
    return 0


register_subcommand(
    "analyze", "norms, outliers, attention maps, PCA and LOST for images", _analyze_arguments, run_analyze
)
register_subcommand(
    "study",
    "accuracy, CorLoc, patch-norm statistics and figures of models with/without registers",
    _study_arguments,
    run_study_command,
)
register_subcommand(
    "find-register-neurons",
    "find register neurons and write a model with test-time registers",
    _neuron_arguments,
    run_find_register_neurons,
)
register_subcommand(
    "demo", "launch the register-explorer Space locally", _demo_arguments, _run_demo, tune_allocator=False
)
register_subcommand("corloc", "LOST CorLoc over a dataset with boxes", _corloc_arguments, run_corloc)
register_subcommand(
    "export", "ONNX file with dynamic batch, height and width, checked in ONNX Runtime", _export_arguments, _run_export
)


# ------------------------------------------------------------------------------------------------ embed and eval


def _embed_arguments(parser: argparse.ArgumentParser) -> None:
    from .features.embed import add_arguments

    add_arguments(parser)


def _run_embed(args: argparse.Namespace) -> int:
    from .features.embed import run

    return run(args)


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .features.evaluation import add_arguments

    add_arguments(parser)


def _run_eval(args: argparse.Namespace) -> int:
    from .features.evaluation import run

    return run(args)


register_subcommand(
    "embed",
    "features of every image of a dataset as sharded Parquet (a datasets dataset)",
    _embed_arguments,
    _run_embed,
)
register_subcommand("eval", "k-NN or linear-probe accuracy on features written by embed", _eval_arguments, _run_eval)


# -------------------------------------------------------------------------------------------------------- main


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The `vit-registers` parser; only the subcommands in `commands` (default: all) get their arguments, the others
    are listed with their help line."""
    from . import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="Vision Transformers with registers: analysis tools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, command in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        if commands is None or name in commands:
            command.add_arguments(sub)
        sub.set_defaults(_run=command.run, _tune_allocator=command.tune_allocator)
    return parser


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in `argv`: its first argument that is not an option (the options before the subcommand
    take no value), or None when there is none or it is not a subcommand."""
    for argument in argv:
        if not argument.startswith("-"):
            return argument if argument in SUBCOMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vit-registers` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = chosen_command(argv)
    parser = build_parser(commands=[command] if command else [])
    args = parser.parse_args(argv)
    try:
        if args._tune_allocator:
            tune_cpu_allocator()  # freed activations stay mapped for the next image (see vit_registers.cpu_allocator)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line, no traceback, unless asked
        if args.traceback:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not isinstance(error, (CLIError, ValueError, OSError)):
            message = f"{type(error).__name__}: {message} (rerun with --traceback for details)"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
