"""ONNX export with dynamic batch, height and width, verified in ONNX Runtime before anything is written.

`export_onnx(model, "model.onnx")` exports a `ViTRegistersModel` with PyTorch's current exporter
(`torch.onnx.export(..., dynamo=True)`, which needs onnxscript), runs the file in ONNX Runtime on the CPU at the export
size and at two other sizes (one of them non-square, with another batch size) and compares every output token with
the PyTorch model. Above the tolerance (1e-4 in float32) it raises [`OnnxMismatchError`] and leaves no file behind:
everything is written into a hidden folder next to the output and moved into place only after the check passed.
`vit-registers export` is the command line of the same function ([`add_arguments`], [`run`]).

Outputs carry the names of the model's fields: `last_hidden_state`, `pooler_output`, `register_tokens`,
`patch_tokens`, and `attentions.L` (softmax weights of layer `L`) for each layer asked for with `attention_layers`.

One part of the model is replaced while exporting, by an equivalent that an exported graph can express
([`export_friendly_positions`]): position embeddings resampled with an offset (official DINOv2 without registers,
`interpolate_offset=0.1`). PyTorch resamples them by the factor `(n + offset) / M` and not at all at the stored grid;
torch.export cannot keep that factor symbolic (it is a float computed from the input size) and cannot branch on the
size, so the exporter routes the resampling through a custom op that becomes one ONNX `Resize` with computed scales
(scale 1, an exact identity, at the stored grid). Without offset the model's own code exports as it is.

Module-level imports stay light (`vit-registers --help` must not import onnx or onnxruntime): the heavy libraries are
imported inside the functions. Missing libraries raise [`MissingOnnxExtraError`] naming the `onnx` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType

OUTPUT_FIELDS = ("last_hidden_state", "pooler_output", "register_tokens", "patch_tokens")
INPUT_NAME = "pixel_values"
DEFAULT_OPSET = 18  # Resize with antialias (the position-embedding resampling of register models) needs opset 18
# Largest error allowed on any output token (docs/onnx.md): float32 |ONNX Runtime - PyTorch|; float16, whose rounding
# step grows with the value, |ONNX Runtime - PyTorch| / max(1, |PyTorch|) (see `SCALED_ERROR`).
TOLERANCES = {"float32": 1e-4, "float16": 3e-2}
SCALED_ERROR = {"float32": False, "float16": True}
EXTRA_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
CARD_START = "<!-- vit-registers onnx export: start -->"
CARD_END = "<!-- vit-registers onnx export: end -->"
CUSTOM_OP = "vit_registers_onnx::resample_positions"


class MissingOnnxExtraError(ImportError):
    """onnx, onnxruntime or onnxscript is not installed."""


class OnnxExportError(ValueError):
    """The export was refused (bad arguments, or a model the exporter cannot express); nothing was written."""


class OnnxMismatchError(OnnxExportError):
    """ONNX Runtime's outputs differ from PyTorch's by more than the tolerance; nothing was written."""

    def __init__(self, message: str, check: list[SizeCheck]):
        super().__init__(message)
        self.check = check


def require_onnx():
    """`(onnx, onnxruntime, onnxscript)`, or [`MissingOnnxExtraError`] naming what is missing and the extra."""
    import importlib

    modules, missing = [], []
    for name in EXTRA_PACKAGES:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingOnnxExtraError(
            f"ONNX export needs {', '.join(missing)} (not installed): pip install 'vit-registers[onnx]' "
            f"(onnx, onnxruntime, onnxscript)."
        )
    return tuple(modules)


# ------------------------------------------------------------------------------------------ position embeddings

_RESAMPLE_OP = None


def _resample_op():
    """The custom op `vit_registers_onnx::resample_positions(image, rows, cols, offset, antialias)`: the model's
    position-embedding resampling of a `(1, dim, M, N)` table to `(1, dim, rows, cols)`, identity at the stored grid
    (as `ViTRegistersEmbeddings.interpolate_pos_encoding` outside export). Registered once per process."""
    global _RESAMPLE_OP
    if _RESAMPLE_OP is not None:
        return _RESAMPLE_OP
    import torch

    from .modeling_vit_registers import resample_position_embeddings

    @torch.library.custom_op(
        CUSTOM_OP,
        mutates_args=(),
        schema="(Tensor image, SymInt rows, SymInt cols, float offset, bool antialias) -> Tensor",
    )
    def resample_positions(image, rows, cols, offset, antialias):
        _, dim, stored_rows, stored_cols = image.shape
        if (rows, cols) == (stored_rows, stored_cols):
            return image.clone()
        table = image.permute(0, 2, 3, 1).reshape(1, stored_rows * stored_cols, dim)
        resized = resample_position_embeddings(
            table, (stored_rows, stored_cols), (rows, cols), offset=offset, antialias=antialias
        )
        return resized.reshape(1, rows, cols, dim).permute(0, 3, 1, 2).contiguous()

    @resample_positions.register_fake
    def _(image, rows, cols, offset, antialias):
        return image.new_empty(1, image.shape[1], rows, cols)

    _RESAMPLE_OP = resample_positions
    return resample_positions


def _resample_translation():
    """ONNX for the custom op: one `Resize` by the scales `(n + offset) / M` PyTorch uses (its bicubic kernel maps
    output pixel i to `(i + 0.5) / scale - 0.5`, ONNX's `half_pixel`), scale 1 at the stored grid, where cubic
    interpolation at whole pixels is an exact identity. Antialiased: PyTorch's kernel (Keys a = -0.5, samples outside
    the image dropped and the weights renormalised) as in onnxscript's `_upsample_bicubic2d_aa`."""
    from onnxscript import FLOAT, INT64
    from onnxscript import opset18 as op

    def resample_positions(image, rows, cols, offset: float, antialias: bool):
        stored = op.Cast(op.Slice(op.Shape(image), [2], [4]), to=FLOAT.dtype)
        grid = op.Cast(op.Concat(op.Reshape(rows, [1]), op.Reshape(cols, [1]), axis=0), to=INT64.dtype)
        grid = op.Cast(grid, to=FLOAT.dtype)
        at_stored_grid = op.ReduceMin(op.Cast(op.Equal(grid, stored), to=INT64.dtype), keepdims=0)
        scales = op.Where(
            op.Cast(at_stored_grid, to=9),  # BOOL
            op.Constant(value_floats=[1.0, 1.0]),
            op.Div(op.Add(grid, op.Constant(value_float=float(offset))), stored),
        )
        scales = op.Concat(op.Constant(value_floats=[1.0, 1.0]), scales, axis=0)
        return op.Resize(
            image,
            None,
            scales,
            None,
            mode="cubic",
            coordinate_transformation_mode="half_pixel",
            cubic_coeff_a=-0.5 if antialias else -0.75,
            antialias=int(antialias),
            exclude_outside=int(antialias),
            nearest_mode="floor",
        )

    return resample_positions


def _needs_custom_resampling(model) -> bool:
    config = model.config
    embeddings = getattr(model, "embeddings", None)
    return (
        getattr(config, "position_encoding", "learned") == "learned"
        and bool(getattr(config, "interpolate_offset", 0.0))
        and hasattr(embeddings, "interpolate_pos_encoding")
        and getattr(embeddings, "position_embeddings", None) is not None
    )


@contextlib.contextmanager
def export_friendly_positions(model) -> Iterator[dict]:
    """While exporting `model`: position embeddings resampled with an offset go through the custom op (see the
    module docstring); yields the custom translation table for `torch.onnx.export`. Other models are left as they
    are (empty table). The model is restored on exit."""
    if not _needs_custom_resampling(model):
        yield {}
        return
    import torch

    resample = _resample_op()
    embeddings = model.embeddings
    config = model.config
    if not 1e-3 <= float(config.interpolate_offset) < 1:
        raise OnnxExportError(
            f"interpolate_offset={config.interpolate_offset} cannot be exported: the exporter supports offsets in "
            f"[0.001, 1) (official DINOv2: 0.1) or 0."
        )

    def interpolate_pos_encoding(self, grid_height, grid_width):
        patch_positions = self.position_embeddings[:, self.num_position_prefix :]
        stored_rows, stored_cols = self.grid_size
        dim = patch_positions.shape[-1]
        image = patch_positions.float().reshape(1, stored_rows, stored_cols, dim).permute(0, 3, 1, 2)
        resized = resample(
            image, grid_height, grid_width, float(config.interpolate_offset), bool(config.interpolate_antialias)
        )
        return resized.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, dim).to(patch_positions.dtype)

    embeddings.interpolate_pos_encoding = MethodType(interpolate_pos_encoding, embeddings)
    try:
        yield {torch.ops.vit_registers_onnx.resample_positions.default: _resample_translation()}
    finally:
        embeddings.__dict__.pop("interpolate_pos_encoding", None)


# ------------------------------------------------------------------------------------------------------ export


def tensor_outputs(model, attention_layers: Sequence[int] = ()):
    import torch

    class Outputs(torch.nn.Module):
        """The model with tensors out, in the order of `output_names` (export needs tensors, not a ModelOutput)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            out = self.model(
                pixel_values,
                output_hidden_states=False,
                output_attentions=bool(attention_layers),
                attention_layers=list(attention_layers) if attention_layers else None,
            )
            return (*(getattr(out, name) for name in OUTPUT_FIELDS), *(out.attentions or ()))

    return Outputs().eval()


def output_names(attention_layers: Sequence[int]) -> list[str]:
    return [*OUTPUT_FIELDS, *(f"attentions.{layer}" for layer in attention_layers)]


@dataclass
class SizeCheck:
    """ONNX Runtime against PyTorch at one input shape, per output: max |difference| and the error compared with the
    tolerance (the same in float32; |difference| / max(1, |PyTorch|) with `scaled`)."""

    shape: tuple[int, int, int, int]
    max_abs_diff: dict[str, float]
    max_error: dict[str, float]

    @property
    def worst(self) -> float:
        return max(self.max_error.values(), default=0.0)


@dataclass
class ExportResult:
    path: Path
    opset: int
    dtype: str
    tolerance: float
    outputs: list[str]
    check: list[SizeCheck]
    side_files: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def worst(self) -> float:
        return max((check.worst for check in self.check), default=0.0)


def default_check_shapes(batch: int, height: int, width: int, patch: int) -> list[tuple[int, int, int, int]]:
    """The export shape, then two others with batch + 1: larger in both sides, and a non-square one (half the height,
    4 patches wider)."""
    half = max(patch, round(height / 2 / patch) * patch)
    return [
        (batch, 3, height, width),
        (batch + 1, 3, height + 2 * patch, width + 2 * patch),
        (batch + 1, 3, half, width + 4 * patch),
    ]


def compare_with_pytorch(
    session,
    module,
    shapes: Sequence[tuple[int, int, int, int]],
    names: Sequence[str],
    seed: int = 0,
    scaled: bool = False,
) -> list[SizeCheck]:
    """Run `session` (ONNX Runtime) and `module` (PyTorch) on the same random pixels of each shape; max |difference|
    of every output, over every token (`scaled`: each difference divided by max(1, |PyTorch value|))."""
    import numpy as np
    import torch

    generator = torch.Generator().manual_seed(seed)
    checks = []
    for shape in shapes:
        pixels = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = [tensor.float().numpy() for tensor in module(pixels)]
        got = session.run(list(names), {INPUT_NAME: pixels.numpy()})
        diffs, errors = {}, {}
        for name, onnx_value, torch_value in zip(names, got, expected, strict=True):
            if onnx_value.shape != torch_value.shape:
                raise OnnxMismatchError(
                    f"ONNX Runtime gives {name} of shape {onnx_value.shape} at input {tuple(shape)}, PyTorch "
                    f"{torch_value.shape}.",
                    checks,
                )
            reference = torch_value.astype(np.float64)
            difference = np.abs(onnx_value.astype(np.float64) - reference)
            error = difference / np.maximum(1.0, np.abs(reference)) if scaled else difference
            diffs[name] = float(difference.max()) if difference.size else 0.0
            errors[name] = float(error.max()) if error.size else 0.0
            if not np.isfinite(onnx_value).all() and np.isfinite(torch_value).all():
                diffs[name] = errors[name] = math.inf
        checks.append(SizeCheck(tuple(shape), diffs, errors))
    return checks


def _rename_dims(path: Path, names: Sequence[str]) -> None:
    """Readable names for the dynamic dimensions of the graph's inputs and outputs (the exporter writes `s30*s68`)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    wanted = {
        INPUT_NAME: ["batch", None, "height", "width"],
        "last_hidden_state": ["batch", "tokens", None],
        "pooler_output": ["batch", None],
        "register_tokens": ["batch", None, None],
        "patch_tokens": ["batch", "patches", None],
    }
    for name in names:
        if name.startswith("attentions."):
            wanted[name] = ["batch", None, "tokens", "tokens"]
    for value in [*proto.graph.input, *proto.graph.output]:
        for dim, label in zip(value.type.tensor_type.shape.dim, wanted.get(value.name, ())):
            if label is not None and dim.HasField("dim_param"):
                dim.dim_param = label
    onnx.save(proto, str(path))


def _session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_onnx(
    model,
    output: str | os.PathLike,
    processor=None,
    *,
    opset: int = DEFAULT_OPSET,
    dtype: str = "float32",
    attention_layers: Sequence[int] | None = None,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    tolerance: float | None = None,
    check_shapes: Sequence[tuple[int, int, int, int]] | None = None,
    reference=None,
    card: bool = True,
) -> ExportResult:
    """Export `model` (a `ViTRegistersModel`, or a classifier / backbone holding one) to `output` with dynamic batch,
    height and width, check it in ONNX Runtime and only then move it into place.

    `height` x `width` (default: the model's `image_size`) and `batch` are the example the exporter traces and the
    first size checked; `check_shapes` (default [`default_check_shapes`]) the input shapes compared. `tolerance`
    (default `TOLERANCES[dtype]`): the largest |ONNX Runtime - PyTorch| allowed on any output; above it
    [`OnnxMismatchError`] and nothing written. `reference`: the PyTorch module the check compares with (default: the
    model itself, in `dtype`, with the same outputs); tests pass a perturbed one. `processor`: an image processor whose
    `save_pretrained` writes `preprocessor_config.json` next to the file; `card`: write the model-card section into
    `README.md` there (an existing README keeps its other text). The model is exported on the CPU in eval mode, with
    the reference forward of each block (oneDNN kernels step aside under export)."""
    started = time.perf_counter()
    require_onnx()
    import torch

    from .modeling_vit_registers import resolve_layer_indices

    model = getattr(model, "base_model", model)
    config = model.config
    if dtype not in TOLERANCES:
        raise OnnxExportError(f"dtype must be one of {sorted(TOLERANCES)}, got {dtype!r}.")
    if opset < DEFAULT_OPSET:
        raise OnnxExportError(
            f"opset {opset} is too old: the exporter needs opset >= {DEFAULT_OPSET} (Resize with antialias)."
        )
    if batch < 1:
        raise OnnxExportError(f"batch must be >= 1, got {batch}.")
    patch = config.patch_size
    image_size = config.image_size
    default_height, default_width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    height = default_height if height is None else height
    width = default_width if width is None else width
    for name, value in (("height", height), ("width", width)):
        if value < patch or value % patch:
            raise OnnxExportError(f"{name} {value} is not a positive multiple of the patch size {patch}.")
    try:
        layers = resolve_layer_indices(attention_layers, config.num_hidden_layers) if attention_layers else ()
    except ValueError as error:
        raise OnnxExportError(str(error)) from None
    tolerance = TOLERANCES[dtype] if tolerance is None else float(tolerance)
    output = Path(output)
    if output.is_dir():
        raise OnnxExportError(f"--output {output} is a directory; give a file name such as {output / 'model.onnx'}.")
    if output.suffix != ".onnx":
        raise OnnxExportError(f"--output {output} should end in .onnx.")
    folder = output.parent
    created = [parent for parent in [folder, *folder.parents] if not parent.exists()]
    folder.mkdir(parents=True, exist_ok=True)

    torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    parameter = next(model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch_dtype:
        import copy

        model = copy.deepcopy(model).to(device="cpu", dtype=torch_dtype)
    was_training = model.training
    model.eval()
    names = output_names(layers)
    module = tensor_outputs(model, layers)
    shapes = list(check_shapes) if check_shapes else default_check_shapes(batch, height, width, patch)

    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=folder))
    try:
        staged = staging / output.name
        rows = torch.export.Dim("rows", min=1, max=4096)
        cols = torch.export.Dim("cols", min=1, max=4096)
        # size-1 dimensions are specialised by torch.export: trace a batch of at least 2, the graph takes any batch
        example = torch.randn(max(batch, 2), config.num_channels, height, width)
        dynamic = {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=4096), 2: patch * rows, 3: patch * cols}}
        with export_friendly_positions(model) as translations, torch.no_grad(), _quiet_export():
            try:
                program = torch.onnx.export(
                    module,
                    (example,),
                    dynamo=True,
                    input_names=[INPUT_NAME],
                    output_names=names,
                    dynamic_shapes=dynamic,
                    opset_version=opset,
                    custom_translation_table=translations or None,
                    verbose=False,
                )
            except Exception as error:
                raise OnnxExportError(f"torch.onnx.export failed: {_first_line(error)}") from error
        program.save(str(staged))
        del program
        _rename_dims(staged, names)
        _write_metadata(staged, config, dtype, names)
        session = _session(staged)
        check = compare_with_pytorch(
            session, reference if reference is not None else module, shapes, names, scaled=SCALED_ERROR[dtype]
        )
        del session
        result = ExportResult(output, opset, dtype, tolerance, names, check)
        bad = [(c, name, d) for c in check for name, d in c.max_error.items() if not d <= tolerance]
        if bad:
            worst = max(bad, key=lambda item: item[2])
            raise OnnxMismatchError(
                f"ONNX Runtime differs from PyTorch by {worst[2]:.3g} on {worst[1]} at input {worst[0].shape} "
                f"(tolerance {tolerance:g}, {dtype}); nothing written.",
                check,
            )
        staged_side = []
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(str(staging))
            staged_side.append(staging / "preprocessor_config.json")
        if card:
            readme = staging / "README.md"
            readme.write_text(_card_text(folder / "README.md", result, config))
            staged_side.append(readme)
        # move into place: side files first, the .onnx file (and its external data) last
        for path in staged_side:
            if path.exists():
                os.replace(path, folder / path.name)
                result.side_files.append(folder / path.name)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == output.name):
            os.replace(path, folder / path.name)
            if path.name != output.name:
                result.side_files.append(folder / path.name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in created:  # folders this call made, if still empty
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if was_training:
            model.train()
    result.seconds = time.perf_counter() - started
    return result


@contextlib.contextmanager
def _quiet_export():
    """The exporter prints its progress ("[torch.onnx] Obtain model graph ... ✅") to stdout: keep it out of the
    command's output (errors still raise)."""
    import io
    import warnings

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _write_metadata(path: Path, config, dtype: str, names: Sequence[str]) -> None:
    import onnx

    from . import __version__

    proto = onnx.load(str(path), load_external_data=False)
    for key, value in {
        "vit_registers.version": __version__,
        "vit_registers.dtype": dtype,
        "vit_registers.outputs": json.dumps(list(names)),
        "vit_registers.config": config.to_json_string(use_diff=False),
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def _card_text(existing: Path, result: ExportResult, config) -> str:
    """The README next to the file: its previous text with this section replaced (or appended), or the section."""
    import onnxruntime
    import torch

    name = result.path.name
    patch = config.patch_size
    attention = [output for output in result.outputs if output.startswith("attentions.")]
    header = "| input (batch, 3, H, W) | " + " | ".join(f"`{output}`" for output in result.outputs) + " |"
    rows = [header, "|---|" + "---:|" * len(result.outputs)]
    for check in result.check:
        values = " | ".join(f"{check.max_error[output]:.1e}" for output in result.outputs)
        rows.append(f"| {tuple(check.shape)} | {values} |")
    lines = [
        CARD_START,
        f"## ONNX export (`{name}`)",
        "",
        "Exported by vit-registers with `torch.onnx.export(..., dynamo=True)`"
        f" (torch {torch.__version__.split('+')[0]}), opset {result.opset}, {result.dtype} weights.",
        f"Input `{INPUT_NAME}`: float32 `(batch, 3, height, width)`; batch, height and width are dynamic (height and"
        f" width multiples of {patch} px); normalise images as `preprocessor_config.json` says.",
        f"Outputs: `last_hidden_state` (batch, tokens, {config.hidden_size}), `pooler_output`, `register_tokens`"
        f" (batch, {config.num_register_tokens + getattr(config, 'num_test_time_registers', 0)},"
        f" {config.hidden_size}), `patch_tokens` (batch, patches, {config.hidden_size})"
        + (
            f", attention weights {', '.join(f'`{a}`' for a in attention)} (batch, heads, tokens, tokens)"
            if attention
            else ""
        )
        + ".",
        "",
        f"Checked in ONNX Runtime {onnxruntime.__version__} (CPU) against the PyTorch model before it was written:"
        f" max {_metric(result.dtype)} over every output token (tolerance {result.tolerance:g}):",
        "",
        *rows,
        "",
        "```python",
        "import numpy as np, onnxruntime as ort",
        f'session = ort.InferenceSession("{name}", providers=["CPUExecutionProvider"])',
        f"pixels = np.random.randn(1, 3, {4 * patch}, {6 * patch}).astype(np.float32)  # the processor's output",
        f'tokens = dict(zip([o.name for o in session.get_outputs()], session.run(None, {{"{INPUT_NAME}": pixels}})))',
        "```",
        CARD_END,
    ]
    section = "\n".join(lines) + "\n"
    if existing.is_file():
        text = existing.read_text()
        if CARD_START in text and CARD_END in text:
            before, rest = text.split(CARD_START, 1)
            after = rest.split(CARD_END, 1)[1].lstrip("\n")
            return before + section + after
        return text.rstrip("\n") + "\n\n" + section
    return section


# ---------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `vit-registers export`."""
    from .cli import add_model_argument

    add_model_argument(parser)
    parser.add_argument("--output", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= {DEFAULT_OPSET}, default)")
    parser.add_argument("--dtype", choices=sorted(TOLERANCES), default="float32", help="weights (default: float32)")
    parser.add_argument(
        "--attention-layers",
        type=int,
        nargs="+",
        default=None,
        metavar="L",
        help="also output the attention weights of these layers (negative counts from the end), as attentions.L",
    )
    parser.add_argument("--batch", type=int, default=1, help="example batch size (default 1; any batch runs)")
    parser.add_argument("--height", type=int, default=None, help="example height (default: the model's image size)")
    parser.add_argument("--width", type=int, default=None, help="example width (default: the model's image size)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest |ONNX Runtime - PyTorch| allowed on any output token "
        + ", ".join(f"({name}: {value:g})" for name, value in TOLERANCES.items()),
    )


def run(args: argparse.Namespace) -> int:
    """`vit-registers export`: load `--model`, export, check in ONNX Runtime, write; non-zero exit and no file on a
    mismatch."""
    from .cli import CLIError, load_model_from_args

    try:
        require_onnx()
    except MissingOnnxExtraError as error:
        raise CLIError(str(error)) from None
    if args.device not in (None, "cpu"):
        raise CLIError(f"export runs on the CPU (ONNX Runtime checks it there); got --device {args.device}.")
    args.device = "cpu"
    model, processor = load_model_from_args(args)
    from .onednn import kernelize

    kernelize(model, enable=False)  # the reference forward (the model file), what the exported graph reproduces
    if not hasattr(processor, "save_pretrained"):
        processor = _fallback_processor(processor)
    try:
        result = export_onnx(
            model,
            args.output,
            processor,
            opset=args.opset,
            dtype=args.dtype,
            attention_layers=args.attention_layers,
            batch=args.batch,
            height=args.height,
            width=args.width,
            tolerance=args.tolerance,
        )
    except OnnxExportError as error:
        raise CLIError(str(error)) from None
    print(f"wrote {result.path} (opset {result.opset}, {result.dtype}; outputs {', '.join(result.outputs)})")
    for check in result.check:
        print(f"  ONNX Runtime vs PyTorch at {tuple(check.shape)}: max {_metric(result.dtype)} {check.worst:.2e}")
    print(f"  tolerance {result.tolerance:g}; also wrote {', '.join(str(path.name) for path in result.side_files)}")
    return 0


def _metric(dtype: str) -> str:
    return "|difference| / max(1, |value|)" if SCALED_ERROR[dtype] else "|difference|"


def _fallback_processor(size):
    """What the loader falls back to without an image processor (resize to the model's size, ImageNet mean/std)."""
    from transformers import BitImageProcessor

    return BitImageProcessor(
        do_resize=True,
        size={"height": int(size), "width": int(size)},
        do_center_crop=False,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )


__all__ = [
    "DEFAULT_OPSET",
    "ExportResult",
    "MissingOnnxExtraError",
    "OnnxExportError",
    "OnnxMismatchError",
    "SizeCheck",
    "TOLERANCES",
    "compare_with_pytorch",
    "default_check_shapes",
    "export_friendly_positions",
    "export_onnx",
    "output_names",
    "require_onnx",
    "tensor_outputs",
]
