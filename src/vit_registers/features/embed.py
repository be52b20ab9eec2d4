"""`vit-registers embed`: the features of every image of a dataset, as sharded Parquet loadable with `datasets`.

Layout of `--output DIR`:

    DIR/data/{split}-{i:05d}-of-{n:05d}.parquet    one shard: `row` (index in the split), `label`, the features
    DIR/.progress/{split}-{i:05d}.json             per shard: rows written, images skipped (with the reason), rank
    DIR/embed_settings.json                        what the run embeds (checked when a run resumes)
    DIR/embeddings.json                            the merged index, written last: its presence marks completion
    DIR/README.md                                  dataset card whose `configs` make `load_dataset(DIR)` work

A shard is a fixed range of rows of its split, whatever the number of processes, so one process and many give the same
files. Each is written under a temporary name and renamed when complete: after a kill, a rerun keeps the finished
shards and embeds the others. Under `accelerate launch`, each process takes its share of the missing shards
(`split_between_processes`); the main process writes the index once every shard is there (a shared directory on many
machines).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

FEATURE_NAMES = ("cls", "pooled", "registers", "patch_mean", "patches")
DEFAULT_FEATURES = ("cls", "pooled", "registers", "patch_mean")
MANIFEST = "embeddings.json"
SETTINGS = "embed_settings.json"
PROGRESS = ".progress"
DATA = "data"
# Tests only: "shards:N" SIGKILLs this process after it has written N shards, "temp:N" after writing the N-th shard's
# temporary file but before renaming it (a real kill at the worst moment, deterministic).
KILL_ENV = "VIT_REGISTERS_EMBED_TEST_KILL"


def _csv_features(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FEATURE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown feature(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(FEATURE_NAMES)}"
        )
    return list(dict.fromkeys(names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..argtypes import non_negative_int, positive_int
    from ..cli import add_model_argument

    add_model_argument(parser)
    parser.add_argument(
        "--dataset",
        required=True,
        help="a .parquet file, a directory (image folder, Parquet files or save_to_disk output) or a Hub dataset id",
    )
    parser.add_argument("--output", required=True, type=Path, help="directory for the shards and the index")
    parser.add_argument("--split", default=None, help="comma list of splits to embed (default: every split)")
    parser.add_argument("--image-column", default="image", help="column with the images (default: image)")
    parser.add_argument(
        "--label-column",
        default=None,
        help="column with the labels (default: label, when the dataset has one; 'none': no labels)",
    )
    parser.add_argument(
        "--features",
        type=_csv_features,
        default=None,
        help="comma list of " + ", ".join(FEATURE_NAMES) + " (default: " + ",".join(DEFAULT_FEATURES) + ", those "
        "the model has); patches = every patch token, large",
    )
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored dtype (float16)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per model call (64)")
    parser.add_argument(
        "--num-workers",
        type=non_negative_int,
        default=None,
        help="DataLoader processes decoding and preprocessing (default: 1 per 8 CPU cores, at least 1; 0: inline)",
    )
    parser.add_argument(
        "--image-size", type=positive_int, default=None, help="square model input in pixels (default: processor's)"
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="embed a random subset of N rows of each split (all rows of a smaller split; fixed by --seed)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --limit's subset (0)")
    parser.add_argument("--shard-size", type=positive_int, default=4096, help="rows per Parquet shard (4096)")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="upload the result as a dataset repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


# ------------------------------------------------------------------------------------------------------ dataset


def _split_name(stem: str) -> str:
    return stem if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", stem) else "train"


def load_source(dataset: str, cache_dir: str | None = None) -> dict:
    """`{split: datasets.Dataset}` for `--dataset`: a .parquet file (its split is named after the file when the name
    is a valid split name, e.g. test.parquet → test), a `save_to_disk` directory, any directory `load_dataset` reads
    (image folder, Parquet/CSV files, named splits), or a Hub id."""
    import datasets

    from ..cli import CLIError

    path = Path(dataset)
    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # "Generating split" bars: noise before the command's own bar
    try:
        if path.is_file():
            if path.suffix != ".parquet":
                raise CLIError(f"--dataset {dataset}: a file must be .parquet (or give a directory or dataset id).")
            import pyarrow.parquet as pq

            if pq.ParquetFile(path).metadata.num_rows == 0:
                raise CLIError(f"--dataset {dataset} is empty: nothing to embed.")
            loaded = datasets.load_dataset(
                "parquet", data_files={_split_name(path.stem): str(path)}, cache_dir=cache_dir
            )
        elif path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path), cache_dir=cache_dir)
        elif path.exists():
            raise CLIError(f"--dataset {dataset} is neither a file nor a directory.")
        elif dataset.startswith((".", "/", "~")) or dataset.endswith(".parquet") or dataset.count("/") > 1:
            raise CLIError(f"--dataset {dataset}: no such file or directory.")
        else:
            loaded = datasets.load_dataset(dataset, cache_dir=cache_dir)
    except CLIError:
        raise
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds; the message says what is wrong
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(f"cannot load --dataset {dataset}: {first}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    return dict(loaded)


def choose_rows(num_rows: int, limit: int | None, seed: int) -> list[int]:
    """The rows of a split to embed, ascending: all, or a random subset of `limit` fixed by `seed`."""
    if limit is None or limit >= num_rows:
        return list(range(num_rows))
    import numpy as np

    return sorted(np.random.default_rng(seed).choice(num_rows, size=limit, replace=False).tolist())


class ImageRows:
    """A map-style dataset whose item is one batch `(split, shard, start, stop)`: the images of those positions of the
    split's chosen rows, decoded, converted to RGB and preprocessed (in a DataLoader worker). Unreadable images are left
    out and reported in `skipped` with the reason."""

    def __init__(self, sources: dict, rows: dict, image_column: str, label_column: str | None, processor):
        self.sources = sources
        self.rows = rows
        self.image_column = image_column
        self.label_column = label_column
        self.processor = processor

    def __getitem__(self, key):
        import io

        import torch
        from PIL import Image

        from ..analysis.images import to_rgb

        split, shard, start, stop = key
        rows = self.rows[split][start:stop]
        table = self.sources[split][rows]
        images, kept, labels, skipped = [], [], [], []
        for position, (row, value) in enumerate(zip(rows, table[self.image_column])):
            name = f"{split} row {row}"
            try:
                if isinstance(value, dict):
                    name += f" ({value['path']})" if value.get("path") else ""
                    source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
                    if source is None:
                        raise ValueError("no image bytes and no path")
                elif isinstance(value, str):
                    name += f" ({value})"
                    source = value
                elif isinstance(value, Image.Image):
                    source = value
                else:
                    raise ValueError(f"not an image but {type(value).__name__}")
                if isinstance(source, Image.Image):
                    image = to_rgb(source)
                else:
                    with Image.open(source) as opened:
                        opened.load()
                        image = to_rgb(opened)
                        image = image.copy() if image is opened else image
            except Exception as error:  # noqa: BLE001 - any decoder failure: skip and say why
                skipped.append({"row": row, "image": name, "error": f"{type(error).__name__}: {error}"})
                continue
            images.append(image)
            kept.append(row)
            if self.label_column is not None:
                labels.append(table[self.label_column][position])
        pixels = None
        if images:
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return {
            "split": split,
            "shard": shard,
            "pixel_values": pixels,
            "rows": torch.tensor(kept, dtype=torch.int64),
            "labels": torch.tensor(labels, dtype=torch.int64) if self.label_column is not None else None,
            "skipped": skipped,
            "count": len(rows),
        }


# ------------------------------------------------------------------------------------------------------ shards


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def plan_shards(rows: dict[str, list[int]], shard_size: int) -> list[tuple[str, int, int, int, int]]:
    """`(split, index, count, start, stop)` for every shard: fixed ranges of positions in each split's chosen rows."""
    plan = []
    for split, chosen in rows.items():
        count = max(1, -(-len(chosen) // shard_size))
        for index in range(count):
            plan.append((split, index, count, index * shard_size, min((index + 1) * shard_size, len(chosen))))
    return plan


def feature_spec(model, names: list[str], dtype: str) -> dict[str, tuple[int, ...]]:
    """`{feature: per-row shape}` for the model (pixel size of the processor decides the patch count)."""
    config = model.config
    hidden = config.hidden_size
    shapes = {}
    for name in names:
        if name == "cls":
            shapes[name] = (hidden,)
        elif name == "pooled":
            shapes[name] = (hidden * (2 if getattr(config, "pooling", "cls") == "cls_mean" else 1),)
        elif name == "registers":
            shapes[name] = (config.num_register_tokens + getattr(config, "num_test_time_registers", 0), hidden)
        elif name == "patch_mean":
            shapes[name] = (hidden,)
        elif name == "patches":
            shapes[name] = (-1, hidden)  # set from the first batch
    return shapes


def extract(output, names: list[str]) -> dict:
    """The requested features of one model output, float32 on the CPU."""
    values = {}
    for name in names:
        if name == "cls":
            value = output.last_hidden_state[:, 0]
        elif name == "pooled":
            value = output.pooler_output
        elif name == "registers":
            value = output.register_tokens
        elif name == "patch_mean":
            value = output.patch_tokens.float().mean(1)
        else:
            value = output.patch_tokens
        values[name] = value.float().cpu()
    return values


def _arrow_features(names: list[str], shapes: dict, dtype: str, label_feature):
    import datasets

    columns = {"row": datasets.Value("int64")}
    if label_feature is not None:
        columns["label"] = label_feature
    for name in names:
        feature = datasets.Value(dtype)
        for size in reversed(shapes[name]):
            feature = datasets.List(feature, length=size)
        columns[name] = feature
    return datasets.Features(columns)


def _fixed_size(array):
    import pyarrow as pa

    values = pa.array(array.reshape(-1))
    for size in reversed(array.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    return values


def write_shard(output: Path, shard: tuple, columns: dict, features, progress: dict, kill_at: tuple | None) -> None:
    """Write one shard: Parquet and progress record under temporary names, then rename (progress first, Parquet
    last: a shard is complete iff its Parquet file exists under its final name)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    split, index, count, _, _ = shard
    name = shard_name(split, index, count)
    final = output / DATA / name
    temporary = output / DATA / f".{name}.tmp-{os.getpid()}"
    arrays = [pa.array(columns["row"])]
    if "label" in columns:
        arrays.append(pa.array(columns["label"]))
    arrays += [_fixed_size(columns[key]) for key in features if key not in ("row", "label")]
    table = pa.Table.from_arrays(arrays, schema=features.arrow_schema)
    pq.write_table(table, temporary)
    record = output / PROGRESS / f"{split}-{index:05d}.json"
    record_temporary = record.with_name(f".{record.name}.tmp-{os.getpid()}")
    record_temporary.write_text(json.dumps(progress, indent=1))
    if kill_at == ("temp", progress["written_by_this_process"]):
        _kill_self()
    os.replace(record_temporary, record)
    os.replace(temporary, final)
    if kill_at == ("shards", progress["written_by_this_process"]):
        _kill_self()


def _kill_self() -> None:
    import signal

    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_setting() -> tuple[str, int] | None:
    value = os.environ.get(KILL_ENV)
    if not value:
        return None
    kind, _, count = value.partition(":")
    return kind, int(count)


def shard_complete(output: Path, shard: tuple) -> bool:
    split, index, count, _, _ = shard
    return (output / DATA / shard_name(split, index, count)).exists() and (
        output / PROGRESS / f"{split}-{index:05d}.json"
    ).exists()


# ------------------------------------------------------------------------------------------------------- run


def _processor_for(model, processor, image_size: int | None):
    from ..training.loop import default_image_processor, processor_at_size

    if isinstance(processor, int) or processor is None:  # no saved processor: resize + crop at the model's size
        processor = default_image_processor(model.config)
    if image_size is not None:
        patch = model.config.patch_size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        if image_size % patch:
            from ..cli import CLIError

            raise CLIError(f"--image-size {image_size} is not a multiple of the patch size {patch}.")
        processor = processor_at_size(processor, image_size)
    return processor


def _resolve_model(args, scratch: Path) -> str:
    """`--model` as a vit_registers model: a transformers Dinov2 / Dinov2WithRegisters directory is converted first
    (as `scripts/finetune.py` does) into `scratch`."""
    config_path = Path(args.model) / "config.json"
    if config_path.is_file():
        try:
            model_type = json.loads(config_path.read_text()).get("model_type")
        except (OSError, json.JSONDecodeError):
            model_type = None
        from ..training.loop import CONVERTIBLE_MODEL_TYPES, convert_transformers_checkpoint

        if model_type in CONVERTIBLE_MODEL_TYPES:
            return convert_transformers_checkpoint(args.model, str(scratch))
    return args.model


def _settings(args, model, processor, names, shapes, rows, label_names) -> dict:
    crop = getattr(processor, "crop_size", None) or {}
    return {
        "model": str(args.model),
        "dataset": str(args.dataset),
        "splits": {split: {"rows": len(chosen), "first_rows": chosen[:5]} for split, chosen in rows.items()},
        "limit": args.limit,
        "seed": args.seed if args.limit is not None else None,
        "image_column": args.image_column,
        "label_column": args.label_column,
        "label_names": label_names,
        "features": {name: list(shapes[name]) for name in names},
        "dtype": args.dtype,
        "shard_size": args.shard_size,
        "input_size": [crop.get("height"), crop.get("width")] if crop else None,
        "processor": type(processor).__name__,
        "num_register_tokens": model.config.num_register_tokens,
        "hidden_size": model.config.hidden_size,
    }


def _check_columns(sources: dict, args) -> None:
    from ..cli import CLIError

    for split, data in sources.items():
        if args.image_column not in data.column_names:
            raise CLIError(
                f"split {split!r} has no image column {args.image_column!r} (columns: {', '.join(data.column_names)}); "
                "use --image-column."
            )
        if args.label_column is not None and args.label_column not in data.column_names:
            raise CLIError(
                f"split {split!r} has no label column {args.label_column!r} (columns: {', '.join(data.column_names)})."
            )
        if len(data) == 0:
            raise CLIError(f"split {split!r} of {args.dataset} is empty: nothing to embed.")


def _prepare_sources(sources: dict, args):
    """Images undecoded (decoding happens in the workers, where a bad file is skipped), only the used columns."""
    import datasets

    from ..cli import CLIError

    prepared, label_names = {}, None
    for split, data in sources.items():
        keep = [args.image_column] + ([args.label_column] if args.label_column else [])
        data = data.select_columns(keep)
        feature = data.features[args.image_column]
        if isinstance(feature, datasets.Image):
            data = data.cast_column(args.image_column, datasets.Image(decode=False))
        elif not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise CLIError(f"column {args.image_column!r} holds {feature}, not images or image paths.")
        if args.label_column:
            label = data.features[args.label_column]
            if isinstance(label, datasets.ClassLabel):
                label_names = label_names or list(label.names)
            elif not (isinstance(label, datasets.Value) and label.dtype.startswith(("int", "uint"))):
                raise CLIError(f"label column {args.label_column!r} holds {label}, not integer class ids.")
        prepared[split] = data
    return prepared, label_names


def run(args: argparse.Namespace) -> int:
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import datasets
    import numpy as np
    import torch
    from accelerate import Accelerator
    from tqdm import tqdm

    from ..cli import MAX_LISTED, CLIError, _warn, load_model_from_args

    if args.output.exists() and not args.output.is_dir():
        raise CLIError(f"--output {args.output} exists and is not a directory.")
    accelerator = Accelerator()
    main = accelerator.is_main_process
    with accelerator.main_process_first():  # one process builds the datasets cache, the others read it
        sources = load_source(args.dataset)
    if args.split:
        wanted = [name.strip() for name in args.split.split(",") if name.strip()]
        missing = [name for name in wanted if name not in sources]
        if missing:
            raise CLIError(
                f"--dataset {args.dataset} has no split {', '.join(missing)} (splits: {', '.join(sources)})."
            )
        sources = {name: sources[name] for name in wanted}
    if args.label_column == "none":
        args.label_column = None
    elif args.label_column is None:
        args.label_column = "label" if all("label" in data.column_names for data in sources.values()) else None
    _check_columns(sources, args)
    sources, label_names = _prepare_sources(sources, args)

    with tempfile.TemporaryDirectory(prefix="vit-registers-embed-") as scratch:
        model_args = argparse.Namespace(**vars(args))
        model_args.model = _resolve_model(args, Path(scratch) / "converted")
        if model_args.device is None:
            model_args.device = str(accelerator.device)
        model, processor = load_model_from_args(model_args)
    processor = _processor_for(model, processor, args.image_size)
    config = model.config
    available = [name for name in FEATURE_NAMES if not (name == "cls" and not getattr(config, "use_cls_token", True))]
    registers = config.num_register_tokens + getattr(config, "num_test_time_registers", 0)
    if registers == 0:
        available.remove("registers")
    if args.features is None:
        names = [name for name in DEFAULT_FEATURES if name in available]
    else:
        names = args.features
        unavailable = [name for name in names if name not in available]
        if unavailable:
            raise CLIError(f"this model has no {', '.join(unavailable)} (it can give {', '.join(available)}).")
    shapes = feature_spec(model, names, args.dtype)
    if "patches" in names:
        crop = getattr(processor, "crop_size", None)
        if not crop:
            raise CLIError("--features patches needs a processor with a fixed crop size.")
        patch = config.patch_size[0] if isinstance(config.patch_size, (list, tuple)) else config.patch_size
        shapes["patches"] = ((crop["height"] // patch) * (crop["width"] // patch), config.hidden_size)

    rows = {split: choose_rows(len(data), args.limit, args.seed) for split, data in sources.items()}
    settings = _settings(args, model, processor, names, shapes, rows, label_names)
    label_feature = None
    if args.label_column is not None:
        label_feature = datasets.ClassLabel(names=label_names) if label_names else datasets.Value("int64")
    features = _arrow_features(names, shapes, args.dtype, label_feature)

    output: Path = args.output
    settings_path = output / SETTINGS
    if main:
        (output / DATA).mkdir(parents=True, exist_ok=True)
        (output / PROGRESS).mkdir(parents=True, exist_ok=True)
        if settings_path.exists():
            previous = json.loads(settings_path.read_text())
            if previous != settings:
                changed = sorted(key for key in set(previous) | set(settings) if previous.get(key) != settings.get(key))
                raise CLIError(
                    f"--output {output} holds an embedding run with other settings ({', '.join(changed)} differ); "
                    "choose another --output or delete it."
                )
        else:
            if any((output / DATA).iterdir()):
                raise CLIError(f"--output {output} holds data files but no {SETTINGS}; choose an empty directory.")
            temporary = settings_path.with_name(f".{SETTINGS}.tmp")
            temporary.write_text(json.dumps(settings, indent=2))
            os.replace(temporary, settings_path)
        for stale in [*(output / DATA).glob(".*.tmp-*"), *(output / PROGRESS).glob(".*.tmp-*")]:
            stale.unlink()  # temporary files of a killed run: never complete
    accelerator.wait_for_everyone()
    if not main and json.loads(settings_path.read_text()) != settings:
        raise CLIError(f"process {accelerator.process_index} computed other settings than the main process.")

    plan = plan_shards(rows, args.shard_size)
    pending = [shard for shard in plan if not shard_complete(output, shard)]
    accelerator.wait_for_everyone()  # every process has seen the same finished shards before any writes
    resumed = len(plan) - len(pending)
    if main and resumed and pending:
        print(f"resuming: {resumed} of {len(plan)} shard(s) already written, {len(pending)} to embed")
    with accelerator.split_between_processes(pending) as mine:
        mine = list(mine)

    batches = [
        (split, index, start, min(start + args.batch_size, stop))
        for split, index, _, first, stop in mine
        for start in range(first, stop, args.batch_size)
    ]
    workers = args.num_workers
    if workers is None:
        workers = max(1, (os.cpu_count() or 1) // 8)
    loader = torch.utils.data.DataLoader(
        ImageRows(sources, rows, args.image_column, args.label_column, processor),
        sampler=batches,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        pin_memory=accelerator.device.type == "cuda",
    )
    my_rows = sum(stop - start for _, _, _, start, stop in mine)
    bar = tqdm(
        total=my_rows,
        unit="img",
        desc=f"embed (process {accelerator.process_index})" if accelerator.num_processes > 1 else "embed",
        disable=args.quiet or not main or not mine,
        dynamic_ncols=True,
    )
    storage = np.float16 if args.dtype == "float16" else np.float32
    device = next(model.parameters()).device
    kill_at = _kill_setting()
    by_key = {(split, index): (split, index, count, start, stop) for split, index, count, start, stop in mine}
    writer = ThreadPoolExecutor(max_workers=1)  # Parquet encoding overlaps the next batches (pyarrow drops the GIL)
    previous_write = None
    current, chunks, skipped, seen = None, [], [], 0
    written, started = 0, time.perf_counter()

    def flush():
        nonlocal previous_write, written
        shard = by_key[current]
        columns = {
            "row": np.concatenate([c["row"] for c in chunks]) if chunks else np.zeros(0, np.int64),
        }
        if args.label_column is not None:
            columns["label"] = np.concatenate([c["label"] for c in chunks]) if chunks else np.zeros(0, np.int64)
        for name in names:
            columns[name] = (
                np.concatenate([c[name] for c in chunks]) if chunks else np.zeros((0, *shapes[name]), storage)
            )
        written += 1
        progress = {
            "shard": shard_name(shard[0], shard[1], shard[2]),
            "rows": int(len(columns["row"])),
            "skipped": list(skipped),
            "process_index": accelerator.process_index,
            "num_processes": accelerator.num_processes,
            "written_by_this_process": written,
        }
        if previous_write is not None:
            previous_write.result()
        previous_write = writer.submit(write_shard, output, shard, columns, features, progress, kill_at)

    try:
        with torch.inference_mode():
            for batch in loader:
                key = (batch["split"], batch["shard"])
                if key != current:
                    if current is not None:
                        flush()
                    current, chunks, skipped = key, [], []
                skipped.extend(batch["skipped"])
                for problem in batch["skipped"]:
                    message = f"skipped {problem['image']}: {problem['error']}"
                    if bar.disable:
                        _warn(message)
                    else:
                        tqdm.write(f"vit-registers: warning: {message}", file=sys.stderr)
                if batch["pixel_values"] is not None:
                    pixels = batch["pixel_values"].to(device, non_blocking=True)
                    values = extract(model(pixel_values=pixels), names)
                    chunk = {"row": batch["rows"].numpy()}
                    if batch["labels"] is not None:
                        chunk["label"] = batch["labels"].numpy()
                    for name in names:
                        chunk[name] = values[name].numpy().astype(storage, copy=False)
                    chunks.append(chunk)
                seen += batch["count"]
                bar.update(batch["count"])
            if current is not None:
                flush()
            if previous_write is not None:
                previous_write.result()
    finally:
        writer.shutdown(wait=True)
        bar.close()
    elapsed = time.perf_counter() - started

    accelerator.wait_for_everyone()
    stats = torch.tensor([seen, elapsed], dtype=torch.float64)
    if accelerator.num_processes > 1:
        stats = accelerator.gather(stats.to(accelerator.device)).cpu().view(-1, 2)
    else:
        stats = stats.view(1, 2)
    if not main:
        return 0
    missing = [shard_name(s[0], s[1], s[2]) for s in plan if not shard_complete(output, s)]
    if missing:
        raise CLIError(f"{len(missing)} shard(s) missing after the run ({', '.join(missing[:3])}); rerun to finish.")
    manifest = write_manifest(output, settings, plan, accelerator, stats, resumed)
    all_skipped = [item for split in manifest["splits"].values() for item in split["skipped"]]
    for problem in all_skipped[:MAX_LISTED]:
        _warn(f"skipped {problem['image']}: {problem['error']}")
    if len(all_skipped) > MAX_LISTED:
        _warn(f"... and {len(all_skipped) - MAX_LISTED} more skipped (all listed in {output / MANIFEST}).")
    summary = ", ".join(
        f"{split} {info['num_embedded']} of {info['num_rows']}" for split, info in manifest["splits"].items()
    )
    speed = manifest["images_per_s"]
    print(
        f"embedded {summary} image(s) with {accelerator.num_processes} process(es) in {elapsed:.1f} s"
        + (f" ({speed:.1f} img/s)" if speed else "")
        + f"; features {', '.join(names)} ({args.dtype}) in {output}"
    )
    if all_skipped:
        _warn(f"{len(all_skipped)} unreadable image(s) skipped (listed under 'skipped' in {output / MANIFEST}).")
    if args.push_to_hub:
        url = push_to_hub(output, args.push_to_hub, private=args.private)
        print(f"pushed to {url}")
    return 0


def write_manifest(output: Path, settings: dict, plan: list, accelerator, stats, resumed: int) -> dict:
    """The merged index (`embeddings.json`) and the dataset card, from the shards' progress records; written under a
    temporary name and renamed, last of all."""
    splits: dict = {}
    for split, index, count, start, stop in plan:
        record = json.loads((output / PROGRESS / f"{split}-{index:05d}.json").read_text())
        info = splits.setdefault(
            split, {"num_rows": 0, "num_embedded": 0, "shards": [], "skipped": [], "written_by_process": {}}
        )
        info["num_rows"] += stop - start
        info["num_embedded"] += record["rows"]
        info["shards"].append(f"{DATA}/{shard_name(split, index, count)}")
        info["skipped"] += record["skipped"]
        by = str(record["process_index"])
        info["written_by_process"][by] = info["written_by_process"].get(by, 0) + 1
    seen, elapsed = float(stats[:, 0].sum()), float(stats[:, 1].max())
    manifest = {
        "format": "vit-registers embeddings v1",
        **settings,
        "splits": splits,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "shards_resumed": resumed,
        "images_this_run": int(seen),
        "wall_s_this_run": elapsed,
        "images_per_s": seen / elapsed if elapsed > 0 and seen else None,
    }
    (output / "README.md").write_text(dataset_card(manifest))
    temporary = output / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, output / MANIFEST)
    return manifest


def dataset_card(manifest: dict) -> str:
    configs = "\n".join(f"  - split: {split}\n    path: {DATA}/{split}-*" for split in manifest["splits"])
    features = "\n".join(
        f"| `{name}` | {' × '.join(map(str, shape))} |" for name, shape in manifest["features"].items()
    )
    splits = "\n".join(
        f"| {split} | {info['num_rows']} | {info['num_embedded']} | {len(info['skipped'])} |"
        for split, info in manifest["splits"].items()
    )
    return f"""---
configs:
- config_name: default
  data_files:
{configs}
tags:
- vit-registers
- embeddings
---
# Features of `{manifest["model"]}` on `{manifest["dataset"]}`

Written by `vit-registers embed` ({manifest["dtype"]}, input {manifest["input_size"]}). Each row: `row` (index of the
image in its split of the source dataset){", `label`" if manifest["label_column"] else ""} and the features below.

| feature | shape per image |
|---|---|
{features}

| split | rows | embedded | skipped (unreadable) |
|---:|---:|---:|---:|
{splits}

```python
from datasets import load_dataset
features = load_dataset("path/or/repo-of-this-dataset")
```

`vit-registers eval knn --features DIR` and `vit-registers eval linear --features DIR` evaluate them.
"""


def push_to_hub(output: Path, repo_id: str, private: bool = False) -> str:
    """Upload the finished embedding directory as a dataset repo (progress records and temporary files stay local)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(output),
        repo_id=repo_id,
        repo_type="dataset",
        commit_message="Add features from vit-registers embed",
        ignore_patterns=[f"{PROGRESS}/*", "**/.*.tmp*", ".*.tmp*"],
    )
    return f"{api.endpoint}/datasets/{repo_id}"
