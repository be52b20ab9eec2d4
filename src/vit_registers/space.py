"""The Register Explorer demo (Gradio): artifacts and registers of up to three models side by side.

For one image and each chosen model it shows what Darcet et al. 2024 ("Vision Transformers Need Registers") look at:
the patch-norm map with the high-norm outliers (§2.1, Fig. 3), the attention of CLS and of each register to the
patches (Fig. 1, 9), every head, the PCA of the patch features (Fig. 11), the LOST box (Siméoni et al. 2021; §3.3)
and, optionally, test-time registers (Jiang et al. 2025). Every number and figure comes from
`vit_registers.analysis` (`analyze_batch`, `judge_outliers`, the figure functions), so the Space, the CLI and the
Python API agree.

Input limits: images are decoded to 8-bit RGB, then downscaled so that neither side exceeds `max_side` pixels
(default [`DEFAULT_MAX_SIDE`] = 448; a notice says so) and the model input never exceeds `max_side` on its longer
side; images above [`MAX_PIXELS`] pixels or [`MAX_FILE_SIZE`] are refused with a message.

Use it from Python (`build_demo(...).launch()`), from the command line (`vit-registers demo`, see
[`add_demo_arguments`] / [`run_demo`]) or as a Hugging Face Space (`spaces/register-explorer/app.py`). The named
API endpoint `/analyze` takes `(image, models, test_time_registers, layer, rule, percentile, threshold)` (the value
of the chosen rule is used) and returns the values that [`api_outputs`] names.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from .analysis import figures  # noqa: E402
from .analysis.images import (  # noqa: E402
    BUNDLED_PHOTOS,
    ImageError,
    bundled_photos,
    load_image,
    prepare_with_processor,
    target_short_side,
)
from .analysis.loading import ModelLoadError, load_model  # noqa: E402
from .analysis.pipeline import analyze_batch, judge_outliers, layer_outliers  # noqa: E402
from .onednn import apply_cpu_kernels  # noqa: E402

DEFAULT_MAX_SIDE = 448
MAX_PIXELS = 40_000_000  # decoded pixels accepted before downscaling (a 6000x4000 photo is 24 M)
MAX_FILE_SIZE = "50mb"  # upload limit enforced by the Gradio server
MAX_MODELS = 3
CONCURRENCY_LIMIT = 2  # analyses running at once; further requests wait in the queue
QUEUE_SIZE = 64
MODEL_CACHE_SIZE = 6  # loaded (model, test-time registers on/off) variants kept in memory
DPI = 80
EXAMPLE_NAMES = BUNDLED_PHOTOS
RULES = ("gap", "percentile", "absolute")  # gap: above a separate high-norm mode, none without one (outlier_verdict)
MAX_THRESHOLD = 1000.0  # upper end of the absolute-threshold slider
# Test-time register discovery for models without stored neurons (Jiang et al. 2025, §3): outliers are the patches
# above this percentile of the patch norms of the example photos; the top-k MLP units become register neurons.
DISCOVERY_PERCENTILE = 99.0
DISCOVERY_TOP_K = 20
FIGURE_KEYS = ("norms", "cls_attention", "register_attention", "heads", "pca", "lost")
FIGURE_LABELS = {
    "norms": "Patch norms (last layer, before the final norm) and histogram with the threshold",
    "cls_attention": "CLS attention to the patches (mean over heads)",
    "register_attention": "Attention of each register to the patches (mean over heads)",
    "heads": "Every head: CLS and registers",
    "pca": "PCA of the patch features (first three components as RGB)",
    "lost": "LOST object box",
}

_RENDER_LOCK = threading.Lock()  # matplotlib rendering is GIL-bound anyway; one figure at a time keeps it safe


class DemoError(ValueError):
    """A request the demo cannot answer (bad image, unknown model, layer out of range); the message is shown."""


# ------------------------------------------------------------------------------------------------ example photos


def example_images(directory: str | os.PathLike | None = None) -> list[str]:
    """The bundled scikit-image photos (astronaut, coffee, chelsea, rocket) as PNG files in `directory` (default: a
    folder in the system temp dir), written by the analysis library; empty when scikit-image is missing."""
    try:
        return bundled_photos(directory or Path(tempfile.gettempdir()) / "vit-registers-space-examples", EXAMPLE_NAMES)
    except ImportError:
        return []


# ------------------------------------------------------------------------------------------------------ models


@dataclass
class LoadedModel:
    """One model variant kept in memory; `lock` serialises its use (the analysis hooks modules of the model)."""

    name: str
    model: torch.nn.Module
    processor: object
    test_time_registers: bool
    note: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelStore:
    """Loads models on first use (on `device`, default cuda if available) and keeps the last [`MODEL_CACHE_SIZE`]
    variants (plain / with test-time registers). Register neurons found by discovery are cached per model name."""

    def __init__(self, device: str | None = None, capacity: int = MODEL_CACHE_SIZE, example_dir=None):
        self.device = device
        self.capacity = capacity
        self.example_dir = example_dir
        self._entries: OrderedDict[tuple[str, bool], LoadedModel] = OrderedDict()
        self._neurons: dict[str, tuple[dict, str]] = {}
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, bool], threading.Lock] = {}

    def get(self, name: str, test_time_registers: bool = False) -> LoadedModel:
        key = (name, bool(test_time_registers))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per key even when requests arrive together
            with self._lock:
                if key in self._entries:
                    return self._entries[key]
            entry = self._build(name, bool(test_time_registers))
            with self._lock:
                self._entries[key] = entry
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
            return entry

    def _load(self, name: str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model, processor = load_model(name, self.device)
            except ModelLoadError as error:
                raise DemoError(str(error)) from None
        apply_cpu_kernels(model)  # as the command line runs models (vit_registers.onednn)
        return model, processor

    def _build(self, name: str, test_time_registers: bool) -> LoadedModel:
        from .interventions import disable_test_time_registers, enable_test_time_registers

        model, processor = self._load(name)
        stored = model.config.test_time_registers
        if not test_time_registers:
            if stored:
                disable_test_time_registers(model)
            return LoadedModel(name, model, processor, False)
        if stored and stored.get("neurons"):
            neurons = {int(layer): units for layer, units in stored["neurons"].items()}
            note = f"{sum(map(len, neurons.values()))} register neurons stored with the model"
            settings = {key: stored[key] for key in ("mode", "normal_values", "scale") if key in stored}
            settings.setdefault("mode", "per_neuron")  # a spec without mode holds the per-neuron edit
            enable_test_time_registers(model, neurons, int(stored.get("num_tokens", 1)) or 1, **settings)
            return LoadedModel(name, model, processor, True, note)
        neurons, note = self.discover_neurons(name, model, processor)
        enable_test_time_registers(model, neurons)
        return LoadedModel(name, model, processor, True, note)

    def discover_neurons(self, name: str, model, processor) -> tuple[dict, str]:
        """Register neurons of `name` found on the example photos (cached): Jiang et al. 2025, §3."""
        from .interventions import find_register_neurons

        if name in self._neurons:
            return self._neurons[name]
        paths = example_images(self.example_dir)
        if not paths:
            raise DemoError(
                "Test-time registers need register neurons: this model stores none and the example photos for "
                "discovery need scikit-image (pip install scikit-image)."
            )
        patch = model.config.patch_size
        pixels = torch.stack(
            [prepare_with_processor(load_image(p), processor, patch, square=True).pixel_values for p in paths]
        )
        try:
            found = find_register_neurons(model, [pixels], top_k=DISCOVERY_TOP_K, percentile=DISCOVERY_PERCENTILE)
        except ValueError as error:
            raise DemoError(f"Test-time register discovery failed for {name}: {error}") from None
        count = sum(map(len, found.neurons.values()))
        note = (
            f"{count} register neurons found on the {len(paths)} example photos "
            f"(outliers above the {DISCOVERY_PERCENTILE:g}th percentile of patch norms)"
        )
        check = layer_outliers(model, [pixels], model.config.num_hidden_layers - 2, threshold=found.threshold)
        if not check.verdict.found:  # nothing to move: say so next to the toggle
            note += f"; but this model has {check.verdict.headline}, so the test-time register has no artifact to take"
        self._neurons[name] = (found.neurons, note)
        return self._neurons[name]


# ------------------------------------------------------------------------------------------------------ images


def read_image(path: str | os.PathLike | None, max_side: int = DEFAULT_MAX_SIDE) -> tuple[Image.Image, str, dict]:
    """Load an image file as 8-bit RGB and downscale it so neither side exceeds `max_side`.

    Returns `(image, notice, info)`: `notice` is "" or a sentence saying the image was downscaled; `info` has the
    original and the analysed size `(height, width)`. Raises [`DemoError`] naming the problem.
    """
    if path is None or path == "":
        raise DemoError("No image: upload one or pick an example photo.")
    name = Path(path).name
    too_many = f"{name}: too many pixels; the demo accepts at most {MAX_PIXELS / 1e6:.0f} megapixels."
    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except Image.DecompressionBombError:
        raise DemoError(too_many) from None
    except Exception:  # load_image below names the exact problem
        width = height = 0
    if width * height > MAX_PIXELS:
        raise DemoError(
            f"{name}: {width}x{height} is {width * height / 1e6:.0f} megapixels; the demo accepts at most "
            f"{MAX_PIXELS / 1e6:.0f} megapixels."
        )
    try:
        image = load_image(path)
    except ImageError as error:
        raise DemoError(str(error).replace(str(path), name)) from None
    except Image.DecompressionBombError:
        raise DemoError(too_many) from None
    except Exception as error:  # decoder failures PIL does not classify
        raise DemoError(f"{name}: cannot read the image ({type(error).__name__}).") from None
    original = image.size
    notice = ""
    if max(original) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        notice = (
            f"The image was downscaled from {original[0]}x{original[1]} to {image.size[0]}x{image.size[1]} pixels "
            f"(the demo's maximum side is {max_side} px)."
        )
    info = {"original_size": [original[1], original[0]], "analysed_size": [image.size[1], image.size[0]]}
    return image, notice, info


class _SizedProcessor:
    """The processor's normalisation with another resize target (keeps the model input within `max_side`)."""

    def __init__(self, processor, short_side: int):
        self.size = {"shortest_edge": short_side}
        self.image_mean = getattr(processor, "image_mean", None)
        self.image_std = getattr(processor, "image_std", None)
        self.do_normalize = getattr(processor, "do_normalize", True)


def prepare_for_model(image: Image.Image, processor, patch_size: int, max_side: int = DEFAULT_MAX_SIDE):
    """`prepare_with_processor`, with a smaller resize target when the longer side would exceed `max_side`."""
    try:
        prepared = prepare_with_processor(image, processor, patch_size)
        longest = max(prepared.input_size)
        if longest > max_side:
            short = max(patch_size, int(target_short_side(processor) * max_side / longest))
            prepared = prepare_with_processor(image, _SizedProcessor(processor, short), patch_size)
    except ImageError as error:
        raise DemoError(str(error)) from None
    return prepared


# ---------------------------------------------------------------------------------------------------- analysis


def figure_to_image(fig, dpi: int = DPI) -> Image.Image:
    """Render a matplotlib figure to an RGB PIL image (PNG round trip, lossless)."""
    buffer = io.BytesIO()
    with _RENDER_LOCK:
        fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    with Image.open(buffer) as rendered:
        return rendered.convert("RGB")


@dataclass
class ModelResult:
    """Figures (PIL images, None when the model lacks that token) and statistics of one model."""

    name: str
    header: str
    figures: dict[str, Image.Image | None]
    stats: dict

    def table(self) -> list[list[str]]:
        """Rows `[statistic, value]` for the stats table."""
        s = self.stats
        rows = [
            ["model input (px)", "{}x{}".format(*reversed(s["input_size"]))],
            ["patch grid", "{}x{}".format(*reversed(s["grid"]))],
            ["high-norm outliers", s["outlier_verdict_text"]],
            ["widest gap, max / median norm", f"{s['gap']:.2f}x, {s['max_over_median']:.2f}"],
            ["outlier rule", s["rule_text"]],
            ["threshold", "none" if s["threshold"] is None else f"{s['threshold']:.4g}"],
            ["max patch norm", f"{s['max_patch_norm']:.4g}"],
            ["outliers", f"{s['num_outliers']} of {s['num_patches']} patches"],
            ["outlier fraction", f"{100 * s['outlier_fraction']:.2f}%"],
        ]
        if s["cls_norm"] is not None:
            rows.append(["CLS norm", f"{s['cls_norm']:.4g}"])
        for index, value in enumerate(s["register_norms"]):
            kind = "test-time register" if index >= s["num_trained_registers"] else "register"
            rows.append([f"{kind} {index} norm", f"{value:.4g}"])
        if s.get("lost_degenerate"):
            rows.append(["LOST box (x0, y0, x1, y1)", f"none: no object found ({s['lost_degenerate']})"])
        else:
            rows.append(["LOST box (x0, y0, x1, y1)", ", ".join(f"{v:.0f}" for v in s["lost_box"])])
        return rows


def analyze_model(
    entry: LoadedModel,
    image: Image.Image,
    layer: int = -1,
    rule: str = "gap",
    value: float = 98.0,
    max_side: int = DEFAULT_MAX_SIDE,
    label: str | None = None,
) -> ModelResult:
    """Analyse `image` with one model: `analyze_batch` + `judge_outliers`, then the library's figures.

    Norms are last-layer patch norms before the final norm (Darcet et al. §2.1); attention maps are those of `layer`.
    The verdict says whether the image's patch norms have a separate high-norm mode; the outliers are the patches
    above its gap (`rule="gap"`, none without a mode), above `value` itself (`rule="absolute"`) or above the
    `value`-th percentile of this image's patch norms (`rule="percentile"`).
    """
    model, config = entry.model, entry.model.config
    depth = config.num_hidden_layers
    layer = int(layer)
    if not -depth <= layer < depth:
        raise DemoError(
            f"Layer {layer} does not exist in {entry.name} ({depth} layers: use {-depth}..{depth - 1}, -1 = last)."
        )
    if rule not in RULES:
        raise DemoError(f"Unknown outlier rule {rule!r}; choose one of {', '.join(RULES)}.")
    if rule == "percentile" and not 0.0 <= float(value) <= 100.0:
        raise DemoError(f"A percentile must lie between 0 and 100, got {value}.")
    prepared = prepare_for_model(image, entry.processor, config.patch_size, max_side)
    with entry.lock:
        (analysis,) = analyze_batch(model, prepared.pixel_values[None], layers=[layer])
    verdict = judge_outliers(
        [analysis],
        rule=rule,
        threshold=float(value) if rule == "absolute" else None,
        percentile=float(value) if rule == "percentile" else 98.0,
    )
    threshold = analysis.threshold
    summary = analysis.outlier_summary()
    register_norms = analysis.last_layer_norms["registers"].tolist()  # last layer, before the final norm
    cls_norm = analysis.last_layer_norms["cls"].tolist()
    maps = analysis.attention[0]
    named = maps.named_maps()
    shown = prepared.image
    title = label or entry.name
    rendered = {
        "norms": figures.norm_figure(
            shown,
            analysis.patch_norm_map,
            threshold=threshold,
            title=f"{title}: patch norms",
            verdict=verdict,
            rule=rule,
        ),
        "cls_attention": None
        if maps.cls is None
        else figures.attention_figure(shown, {"CLS": named["CLS"]}, max_heads=0, dpi=DPI),
        "register_attention": None
        if maps.registers.shape[1] == 0
        else figures.attention_figure(shown, {k: v for k, v in named.items() if k != "CLS"}, max_heads=0, dpi=DPI),
        "heads": figures.attention_figure(shown, named, title=f"layer {maps.layer + 1} of {depth}, every head", dpi=DPI)
        if named
        else None,
        "pca": figures.pca_figure(
            shown, analysis.pca_rgb, analysis.pca_whitened, analysis.pca_foreground_rgb, title=title
        ),
        "lost": figures.lost_figure(
            shown,
            analysis.lost.box,
            analysis.lost.similarity,
            title=f"{title}: LOST",
            degenerate=analysis.lost.degenerate,
        ),
    }
    images = {key: None if fig is None else figure_to_image(fig) for key, fig in rendered.items()}
    panels = {key: image is not None for key, image in images.items()}
    rule_text = {
        "gap": "above the gap of a separate high-norm mode",
        "percentile": f"{float(value):g}th percentile of this image",
        "absolute": "absolute norm",
    }[rule]
    stats = {
        "model": entry.name,
        "label": title,
        "test_time_registers": entry.test_time_registers,
        "test_time_registers_note": entry.note,
        "layer": maps.layer + 1,  # 1..L, as in the figures and the CLI's stats.json
        "input_size": list(analysis.input_size),
        "grid": list(analysis.grid),
        "rule": rule,
        "rule_value": float(value),
        "rule_text": rule_text,
        "threshold": threshold,
        "outlier_verdict": verdict.to_dict(),
        "outlier_verdict_text": verdict.headline,
        "gap": verdict.gap,
        "max_over_median": verdict.max_over_median,
        "outliers_by_rule": summary["outliers_by_rule"],
        "max_patch_norm": float(analysis.patch_norm_map.max()),
        "num_patches": int(analysis.patch_norm_map.numel()),
        "num_outliers": summary["num_outliers"],
        "outlier_fraction": summary["outlier_fraction"],
        "cls_norm": cls_norm[0] if cls_norm else None,
        "num_trained_registers": int(config.num_register_tokens),
        "register_norms": register_norms,
        "lost_box": [float(v) for v in analysis.lost.box],  # model-input pixels, as in the figures
        "lost_degenerate": analysis.lost.degenerate,  # why LOST found no object (the box is no detection), or None
        "first_separating_layer": summary["first_separating_layer"],
        "patch_norm_map": analysis.patch_norm_map.tolist(),
        "panels": panels,  # which figures this model has
    }
    registers = int(config.num_register_tokens)
    parts = [f"{registers} trained register{'s' if registers != 1 else ''}"]
    if entry.test_time_registers:
        extra = config.num_test_time_registers
        parts.append(f"+ {extra} test-time register{'s' if extra != 1 else ''} ({entry.note})")
    parts.append(f"{depth} layers, attention of layer {maps.layer + 1} of {depth}")
    if images["register_attention"] is None:
        parts.append("no registers: nothing to show in the register panel")
    header = f"### {title}\n" + " · ".join(parts)
    return ModelResult(entry.name, header, images, stats)


@dataclass
class DemoResult:
    notice: str
    input: dict
    results: list[ModelResult]

    def stats(self) -> dict:
        return {"notice": self.notice, "input": self.input, "models": [r.stats for r in self.results]}


def resolve_model_names(choices, models: Mapping[str, str | os.PathLike]) -> list[tuple[str, str]]:
    """`[(label, path_or_id)]` for the chosen labels (defaults) or free-form paths / Hub ids; 1 to 3 of them."""
    if isinstance(choices, str):
        choices = [choices]
    chosen = [str(c).strip() for c in (choices or []) if str(c).strip()]
    chosen = list(dict.fromkeys(chosen))
    if not chosen:
        raise DemoError("Choose at least one model (type a local model directory or a Hub id if none is listed).")
    if len(chosen) > MAX_MODELS:
        raise DemoError(f"Choose at most {MAX_MODELS} models, got {len(chosen)}.")
    return [(c, os.fspath(models[c])) if c in models else (c, c) for c in chosen]


def analyze(
    image_path,
    model_choices,
    test_time_registers: bool = False,
    layer: int = -1,
    rule: str = "gap",
    value: float = 98.0,
    *,
    models: Mapping[str, str | os.PathLike] | None = None,
    store: ModelStore | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
) -> DemoResult:
    """The whole request: read and downscale the image, then [`analyze_model`] for each chosen model."""
    models = {} if models is None else models
    store = store or ModelStore()
    try:
        layer = int(layer)
        value = float(value)
    except (TypeError, ValueError):
        raise DemoError(f"Layer must be an integer and the rule value a number, got {layer!r} and {value!r}.") from None
    names = resolve_model_names(model_choices, models)
    image, notice, info = read_image(image_path, max_side)
    results = []
    for label, name in names:
        entry = store.get(name, test_time_registers)
        results.append(analyze_model(entry, image, layer, rule, value, max_side, label=label))
    return DemoResult(notice, info, results)


# --------------------------------------------------------------------------------------------------------- UI

OUTPUTS_PER_MODEL = 1 + len(FIGURE_KEYS) + 1  # header, figures, stats table


def api_outputs(result) -> dict:
    """Name the values returned by `/analyze` (a tuple from `gradio_client`): `{"notice", "stats", "models":
    [{"header", <figure keys>, "table"}, ...]}` for the models that were analysed."""
    notice, stats, *slots = result
    count = len(stats["models"]) if isinstance(stats, dict) else 0
    models = []
    for index in range(count):
        values = slots[index * OUTPUTS_PER_MODEL : (index + 1) * OUTPUTS_PER_MODEL]
        item = {"header": values[0], "table": values[-1]}
        item.update(dict(zip(FIGURE_KEYS, values[1:-1])))
        models.append(item)
    return {"notice": notice, "stats": stats, "models": models}


def _pass_unreadable_files(image) -> None:
    """Let an input `gr.Image` hand files PIL cannot open to the app (which names the problem) instead of failing
    inside Gradio. Done on the instance: a `gr.Image` subclass would make Gradio write a .pyi next to this module."""
    original = image.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except Exception:
            if payload is None or getattr(payload, "path", None) is None:
                raise
            return str(payload.path)

    image.preprocess = preprocess


def build_demo(
    models: Mapping[str, str | os.PathLike] | Sequence[str] | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    store: ModelStore | None = None,
    example_dir: str | os.PathLike | None = None,
):
    """The Gradio app. `models`: `{label: path_or_id}` or a list of paths / Hub ids offered in the model picker
    (default: `vit_registers.pretrained.default_models()`, the embedded models, which may be none: then the user
    types a path or Hub id). The first three are selected at start."""
    import gradio as gr

    if models is None:
        from .pretrained import default_models

        models = default_models()
    if not isinstance(models, Mapping):
        models = {os.fspath(m): os.fspath(m) for m in models}
    models = {str(k): os.fspath(v) for k, v in models.items()}
    store = store or ModelStore(example_dir=example_dir)
    examples = example_images(example_dir)

    def run(image_path, model_choices, test_time_registers, layer, rule, percentile, threshold):
        value = threshold if rule == "absolute" else percentile
        try:
            result = analyze(
                image_path,
                model_choices,
                test_time_registers,
                layer,
                rule,
                value,
                models=models,
                store=store,
                max_side=max_side,
            )
        except DemoError as error:
            raise gr.Error(str(error), print_exception=False) from None
        outputs = [result.notice or "", result.stats()]
        for slot in range(MAX_MODELS):
            if slot < len(result.results):
                item = result.results[slot]
                outputs += [gr.Column(visible=True), item.header]
                outputs += [item.figures[key] for key in FIGURE_KEYS]
                outputs.append(item.table())
            else:
                outputs += [gr.Column(visible=False), ""] + [None] * len(FIGURE_KEYS) + [[]]
        return outputs

    with gr.Blocks(title="Register Explorer", analytics_enabled=False) as demo:
        gr.Markdown(
            "# Register Explorer\n"
            "High-norm artifact tokens and registers in Vision Transformers (Darcet et al. 2024, *Vision Transformers "
            "Need Registers*), side by side for up to three models, with optional test-time registers (Jiang et al. "
            f"2025). Images are downscaled to at most {max_side} px on the longer side."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    label="Image",
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    format="png",
                    elem_id="input-image",
                )
                _pass_unreadable_files(image)
                if examples:
                    gr.Examples(
                        examples=[[p] for p in examples], inputs=[image], label="Example photos", cache_examples=False
                    )
            with gr.Column(scale=1):
                model_picker = gr.Dropdown(
                    choices=list(models),
                    value=list(models)[:MAX_MODELS],
                    multiselect=True,
                    max_choices=MAX_MODELS,
                    allow_custom_value=True,
                    label="Models (1 to 3)",
                    info="Pick listed models or type a local model directory or Hub id and press Enter.",
                    elem_id="models",
                )
                ttr = gr.Checkbox(
                    value=False,
                    label="Test-time registers",
                    info="Move the register neurons' activations into an extra token (Jiang et al. 2025).",
                )
                layer = gr.Number(
                    value=-1,
                    precision=0,
                    label="Attention layer",
                    info="-1 = last; negative counts from the end.",
                )
                rule = gr.Radio(
                    list(RULES),
                    value="gap",
                    label="Outlier rule",
                    info="gap: the patches above a separate high-norm mode (the paper's artifacts); none without one.",
                )
                percentile = gr.Slider(
                    0,
                    100,
                    value=98,
                    step=0.5,
                    label="Percentile of this image's patch norms",
                    info="Patches above this percentile are outliers (the reproducibility studies use 98).",
                    elem_id="percentile",
                )
                threshold = gr.Slider(
                    0,
                    MAX_THRESHOLD,
                    value=150,
                    step=0.1,
                    label="Absolute norm threshold",
                    visible=False,
                    info="Patches above this norm are outliers (the paper uses 150 for DINOv2).",
                    elem_id="threshold",
                )
                button = gr.Button("Analyze", variant="primary", elem_id="analyze")
        notice = gr.Markdown(elem_id="notice")
        columns, slot_outputs, figure_outputs = [], [], []
        with gr.Row(equal_height=False):
            for slot in range(MAX_MODELS):
                with gr.Column(visible=False, elem_id=f"model-{slot}") as column:
                    header = gr.Markdown()
                    pictures = [
                        gr.Image(
                            label=FIGURE_LABELS[key],
                            format="png",
                            type="pil",
                            interactive=False,
                            elem_id=f"{key}-{slot}",
                        )
                        for key in FIGURE_KEYS
                    ]
                    table = gr.Dataframe(
                        headers=["statistic", "value"], label="Statistics", interactive=False, elem_id=f"stats-{slot}"
                    )
                columns.append(column)
                figure_outputs += pictures
                slot_outputs += [column, header, *pictures, table]
        with gr.Accordion("All numbers (JSON)", open=False):
            stats = gr.JSON(label="stats")

        def switch_rule(rule_name):
            return gr.Slider(visible=rule_name == "percentile"), gr.Slider(visible=rule_name == "absolute")

        rule.change(switch_rule, rule, [percentile, threshold], api_name=False, queue=False)

        def show_panels(numbers):  # hide the panels a model has nothing for (no CLS, no register)
            models_stats = (numbers or {}).get("models", [])
            return [
                gr.Image(visible=slot >= len(models_stats) or bool(models_stats[slot]["panels"][key]))
                for slot in range(MAX_MODELS)
                for key in FIGURE_KEYS
            ]

        button.click(lambda: "", None, notice, api_name=False, queue=False).then(  # no stale notice on errors
            run,
            [image, model_picker, ttr, layer, rule, percentile, threshold],
            [notice, stats, *slot_outputs],
            api_name="analyze",
            concurrency_limit=CONCURRENCY_LIMIT,
        ).then(show_panels, stats, figure_outputs, api_name=False, queue=False)
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_SIZE)
    demo.example_dir = str(Path(examples[0]).parent) if examples else None
    return demo


def launch_demo(demo, host: str | None = None, port: int | None = None, **kwargs):
    """`demo.launch` with the demo's limits (upload size, no share link, example folder allowed, system fonts)."""
    import gradio as gr

    allowed = [demo.example_dir] if getattr(demo, "example_dir", None) else []
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    options = {
        "share": False,
        "max_file_size": MAX_FILE_SIZE,
        "allowed_paths": allowed,
        "theme": theme,
        "ssr_mode": False,
        "footer_links": ["api"],
    }
    options.update(kwargs)
    return demo.launch(server_name=host, server_port=port, **options)


# ------------------------------------------------------------------------------------------------------- CLI


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `vit-registers demo` (and of the Space's app.py)."""
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="PATH_OR_ID",
        help="model offered in the picker (repeat for up to three; default: the embedded models)",
    )
    parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--host", default=None, help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument(
        "--max-side",
        type=int,
        default=DEFAULT_MAX_SIDE,
        help=f"images are downscaled to this longer side (default: {DEFAULT_MAX_SIDE})",
    )
    parser.add_argument("--device", default=None, help="torch device for the models (default: cuda if available)")


def run_demo(args: argparse.Namespace) -> int:
    """Launch the demo from parsed [`add_demo_arguments`]; blocks until interrupted. Returns 0."""
    if args.max_side < 16:
        raise ValueError(f"--max-side must be at least 16 pixels, got {args.max_side}.")
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must lie in 1..65535, got {args.port}.")
    models = None
    if args.model:
        if len(args.model) > MAX_MODELS:
            raise ValueError(f"give at most {MAX_MODELS} --model, got {len(args.model)}.")
        models = {m: m for m in args.model}
    demo = build_demo(models=models, max_side=args.max_side, store=ModelStore(device=args.device))
    launch_demo(demo, host=args.host, port=args.port)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Register Explorer: artifacts and registers in ViTs.")
    add_demo_arguments(parser)
    return run_demo(parser.parse_args(argv))


__all__ = [
    "DEFAULT_MAX_SIDE",
    "DemoError",
    "DemoResult",
    "ModelResult",
    "ModelStore",
    "add_demo_arguments",
    "analyze",
    "analyze_model",
    "api_outputs",
    "build_demo",
    "example_images",
    "figure_to_image",
    "launch_demo",
    "main",
    "read_image",
    "run_demo",
]
