"""The Register Explorer Space (issue 9): library-level checks, gradio_client against the launched app, bad inputs,
16 concurrent requests and a real browser (Debian Chromium driven by Playwright).

Models are tiny random `ViTRegistersModel`s saved with `save_pretrained` plus a `BitImageProcessor`; the server runs on
127.0.0.1 in a thread, with no share link and analytics off: nothing touches the network.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import argparse  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import runpy  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers import BitImageProcessor  # noqa: E402

from vit_registers import ViTRegistersConfig, ViTRegistersModel, space  # noqa: E402
from vit_registers.analysis import (  # noqa: E402
    analyze_batch,
    figures,
    load_image,
    load_model,
    prepare_with_processor,
    run_model,
)
from vit_registers.analysis.norms import group_norms, token_norms  # noqa: E402
from vit_registers.analysis.pipeline import judge_outliers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPACE_DIR = ROOT / "spaces" / "register-explorer"
ARTIFACTS = ROOT / "test-artifacts"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def _save_tiny_model(directory: Path, registers: int, seed: int) -> str:
    torch.manual_seed(seed)
    config = ViTRegistersConfig(
        image_size=28,
        patch_size=14,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_register_tokens=registers,
    )
    ViTRegistersModel(config).save_pretrained(directory)
    BitImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("space-models")
    return {
        "tiny-reg4": _save_tiny_model(root / "reg4", registers=4, seed=0),
        "tiny-reg0": _save_tiny_model(root / "reg0", registers=0, seed=1),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The bad and good inputs of the issue, written once."""
    root = tmp_path_factory.mktemp("space-images")
    photo = Image.open(space.example_images(root / "examples")[2]).convert("RGB")  # chelsea, 451x300
    paths = {"examples": space.example_images(root / "examples")}
    paths["small"] = root / "cat.png"
    small = photo.crop((0, 0, 320, 240))
    small.save(paths["small"])  # below the max side: analysed as is
    paths["other"] = root / "other.png"
    photo.crop((100, 40, 400, 280)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(paths["other"])
    paths["text"] = root / "notes.png"
    paths["text"].write_text("this is a text file, not a picture\n")
    paths["tiny"] = root / "one.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(paths["tiny"])
    paths["huge"] = root / "huge.png"
    huge = Image.new("RGB", (6000, 4000), (40, 90, 160))
    ImageDraw.Draw(huge).ellipse((1500, 1000, 4500, 3000), fill=(230, 200, 40))
    huge.save(paths["huge"], compress_level=1)
    paths["gray"] = root / "gray.png"
    small.convert("L").save(paths["gray"])
    paths["rgba"] = root / "rgba.png"
    rgba = small.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(small.size))
    rgba.save(paths["rgba"])
    paths["deep"] = root / "deep.png"
    deep = (np.asarray(small.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep, mode="I;16").save(paths["deep"])
    return {k: v if isinstance(v, list) else str(v) for k, v in paths.items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app(model_dirs, images):
    demo = space.build_demo(models=model_dirs, example_dir=Path(images["examples"][0]).parent)
    port = _free_port()
    space.launch_demo(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app, verbose=False)


def _predict(client, path, models, ttr=False, layer=-1, rule="percentile", value=98.0):
    from gradio_client import handle_file

    percentile, threshold = (value, 150.0) if rule == "percentile" else (98.0, value)
    result = client.predict(handle_file(path), models, ttr, layer, rule, percentile, threshold, api_name="/analyze")
    return space.api_outputs(result)


def _library(path, model_dir, layer=-1, percentile=98.0):
    """The same measurements straight from vit_registers.analysis."""
    model, processor = load_model(model_dir, "cpu")
    prepared = prepare_with_processor(load_image(path), processor, model.config.patch_size)
    (analysis,) = analyze_batch(model, prepared.pixel_values[None], layers=[layer])
    judge_outliers([analysis], rule="percentile", percentile=percentile)
    hidden = run_model(model, prepared.pixel_values[None]).hidden_states[-1]
    groups = group_norms(token_norms(hidden), model.config)
    return prepared, analysis, groups


def _assert_png(path) -> np.ndarray:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert array.shape[0] > 20 and array.shape[1] > 20
    assert array.std() > 1.0, f"{path} is blank"
    return array


# ----------------------------------------------------------------------------------------------- no server


def test_space_files_and_yaml_header():
    import gradio
    from huggingface_hub import SpaceCard

    text = (SPACE_DIR / "README.md").read_text()
    assert text.startswith("---\n"), "README.md must start with the Space YAML header"
    header = SpaceCard.load(SPACE_DIR / "README.md").data.to_dict()
    assert header["sdk"] == "gradio"
    assert header["sdk_version"] == gradio.__version__ == "6.31.0"
    assert (SPACE_DIR / header["app_file"]).is_file()
    assert header["license"] == "apache-2.0"
    assert header["title"] and header["models"]
    requirements = (SPACE_DIR / "requirements.txt").read_text()
    for package in ("torch", "transformers", "scikit-image", "matplotlib", "safetensors"):  # vit_registers is copied in
        assert package in requirements
    assert "448" in text  # the documented maximum side


def test_app_py_is_a_thin_launcher_with_cli_arguments(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SPACE_DIR / "app.py"), "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(SPACE_DIR / "app.py"), run_name="__main__")
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--port", "--max-side"):
        assert flag in out
    assert len((SPACE_DIR / "app.py").read_text().splitlines()) < 40


def test_demo_arguments_and_errors():
    parser = argparse.ArgumentParser()
    space.add_demo_arguments(parser)
    args = parser.parse_args(["--port", "7999", "--model", "a", "--model", "b"])
    assert args.port == 7999 and args.model == ["a", "b"] and args.max_side == space.DEFAULT_MAX_SIDE
    with pytest.raises(ValueError, match="max-side"):
        space.run_demo(parser.parse_args(["--max-side", "4"]))
    with pytest.raises(ValueError, match="at most 3"):
        space.run_demo(parser.parse_args(["--model", "a", "--model", "b", "--model", "c", "--model", "d"]))


def test_model_choice_rules():
    with pytest.raises(space.DemoError, match="Choose at least one model"):
        space.resolve_model_names([], {})
    with pytest.raises(space.DemoError, match="at most 3"):
        space.resolve_model_names(["a", "b", "c", "d"], {})
    assert space.resolve_model_names(["x", "dir/m", "x"], {"x": Path("/p/x")}) == [("x", "/p/x"), ("dir/m", "dir/m")]


def _dropdown(demo):
    import gradio as gr

    (picker,) = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown)]
    return picker


def test_default_models_used_when_present_and_optional(monkeypatch, model_dirs):
    import vit_registers.pretrained as pretrained

    monkeypatch.setattr(pretrained, "default_models", lambda: {})
    empty = space.build_demo()
    assert _dropdown(empty).choices == [] and _dropdown(empty).value == []
    monkeypatch.setattr(pretrained, "default_models", lambda: {"reg4 (4 registers)": Path(model_dirs["tiny-reg4"])})
    filled = space.build_demo()
    assert _dropdown(filled).value == ["reg4 (4 registers)"]
    assert not Path(space.__file__).with_suffix(".pyi").exists()  # Gradio writes one for Component subclasses


def test_read_image_messages(images):
    with pytest.raises(space.DemoError, match="notes.png: not an image file"):
        space.read_image(images["text"])
    with pytest.raises(space.DemoError, match="No image"):
        space.read_image(None)
    image, notice, info = space.read_image(images["huge"], max_side=448)
    assert image.size == (448, 299) and "downscaled from 6000x4000 to 448x299" in notice
    assert info == {"original_size": [4000, 6000], "analysed_size": [299, 448]}
    image, notice, _ = space.read_image(images["deep"])
    assert image.mode == "RGB" and notice == ""


def test_model_input_never_exceeds_max_side(model_dirs):
    store = space.ModelStore()
    entry = store.get(model_dirs["tiny-reg4"])
    panorama = Image.new("RGB", (440, 60), (10, 200, 30))  # shorter side 56 would give a 406 px wide input
    result = space.analyze_model(entry, panorama, max_side=112)
    assert max(result.stats["input_size"]) <= 112
    with pytest.raises(space.DemoError, match="Layer 5 does not exist"):
        space.analyze_model(entry, panorama, layer=5)


def test_test_time_registers_toggle(model_dirs, images, tmp_path):
    store = space.ModelStore(example_dir=tmp_path)
    plain = space.analyze(images["small"], ["tiny-reg0"], False, models=model_dirs, store=store).results[0]
    assert plain.stats["register_norms"] == [] and plain.figures["register_attention"] is None
    edited = space.analyze(images["small"], ["tiny-reg0"], True, models=model_dirs, store=store).results[0]
    assert len(edited.stats["register_norms"]) == 1  # one test-time register appended
    assert edited.figures["register_attention"] is not None and "test-time register" in edited.header
    assert model_dirs["tiny-reg0"] in store._neurons  # discovery ran once and is cached
    assert store.get(model_dirs["tiny-reg0"]).model.config.test_time_registers is None  # plain variant untouched
    # A model that stores its neurons uses them instead of discovery.
    model = ViTRegistersModel.from_pretrained(model_dirs["tiny-reg4"])
    model.set_test_time_registers({0: [1, 2]}, num_tokens=2)
    stored_dir = tmp_path / "stored"
    model.save_pretrained(stored_dir)
    BitImageProcessor(size={"shortest_edge": 56}).save_pretrained(stored_dir)
    stored = store.get(str(stored_dir), True)
    assert "2 register neurons stored" in stored.note and stored.model.config.num_test_time_registers == 2
    assert store.get(str(stored_dir), False).model.config.test_time_registers is None


def test_register_norms_come_from_the_image_analysis(model_dirs, images, monkeypatch, tmp_path):
    """The CLS and register norms the Space reports are those `analyze_batch` measured (`ImageAnalysis.
    last_layer_norms`, same forward pass); the Space puts no hook of its own on the model."""
    entry = space.ModelStore(example_dir=tmp_path).get(model_dirs["tiny-reg4"], False)
    analyses = []

    def recording_analyze_batch(*args, **kwargs):
        analyses.extend(results := analyze_batch(*args, **kwargs))
        return results

    def refuse_hook(*args, **kwargs):
        raise AssertionError("the Space hooks the model itself")

    monkeypatch.setattr(space, "analyze_batch", recording_analyze_batch)
    monkeypatch.setattr(entry.model, "register_forward_hook", refuse_hook)
    stats = space.analyze_model(entry, load_image(images["small"])).stats
    (analysis,) = analyses
    assert len(stats["register_norms"]) == 4
    assert stats["register_norms"] == analysis.last_layer_norms["registers"].tolist()
    assert stats["cls_norm"] == analysis.last_layer_norms["cls"].item()


# ----------------------------------------------------------------------------------------- gradio_client


def test_client_results_equal_the_library(client, model_dirs, images):
    out = _predict(client, images["small"], ["tiny-reg4", "tiny-reg0"])
    assert out["notice"] == ""
    assert [m["model"] for m in out["stats"]["models"]] == [model_dirs["tiny-reg4"], model_dirs["tiny-reg0"]]
    for stats, shown in zip(out["stats"]["models"], out["models"]):
        prepared, analysis, groups = _library(images["small"], stats["model"])
        assert stats["input_size"] == list(analysis.input_size) == [56, 70]
        assert stats["threshold"] == pytest.approx(analysis.threshold, rel=1e-6)
        assert stats["outlier_verdict"]["found"] is analysis.verdict.found is False  # random weights: no mode
        assert stats["outliers_by_rule"]["percentile"] == stats["num_outliers"] >= 1
        assert stats["max_patch_norm"] == pytest.approx(analysis.patch_norm_map.max().item(), rel=1e-6)
        assert stats["num_outliers"] == int(analysis.outliers.sum())
        assert stats["outlier_fraction"] == pytest.approx(analysis.outlier_summary()["outlier_fraction"])
        torch.testing.assert_close(torch.tensor(stats["patch_norm_map"]), analysis.patch_norm_map, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(stats["register_norms"]), groups["registers"][0], rtol=1e-5, atol=1e-5)
        assert stats["cls_norm"] == pytest.approx(groups["cls"][0, 0].item(), rel=1e-5)
        assert stats["lost_box"] == pytest.approx(analysis.lost.box)
        # The norm figure is the library's figure, pixel for pixel, delivered as PNG.
        expected = space.figure_to_image(
            figures.norm_figure(
                prepared.image,
                analysis.patch_norm_map,
                threshold=analysis.threshold,
                title=f"{stats['label']}: patch norms",
                verdict=analysis.verdict,
                rule="percentile",
            )
        )
        np.testing.assert_array_equal(_assert_png(shown["norms"]), np.asarray(expected))
        table = dict(shown["table"]["data"])
        assert table["max patch norm"] == f"{stats['max_patch_norm']:.4g}"
        assert sum(k.startswith("register") for k in table) == len(stats["register_norms"])
    assert out["models"][1]["register_attention"] is None  # the model without registers has no register panel


@pytest.mark.parametrize(
    "name, message",
    [
        ("text", "notes.png: not an image file"),
        ("tiny", "1x1 pixels is smaller than one 14x14 patch"),
    ],
)
def test_client_bad_files_get_a_clear_message(client, images, name, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=re.escape(message)) as caught:
        _predict(client, images[name], ["tiny-reg4"])
    assert "Traceback" not in str(caught.value)
    assert _predict(client, images["small"], ["tiny-reg4"])["stats"]["models"][0]["threshold"] > 0  # still serving


def test_client_converts_or_downscales_unusual_images(client, images):
    huge = _predict(client, images["huge"], ["tiny-reg4"])
    assert "downscaled from 6000x4000 to 448x299" in huge["notice"]
    assert max(huge["stats"]["models"][0]["input_size"]) <= space.DEFAULT_MAX_SIDE
    gray = _predict(client, images["gray"], ["tiny-reg4"])["stats"]["models"][0]
    deep = _predict(client, images["deep"], ["tiny-reg4"])["stats"]["models"][0]
    np.testing.assert_allclose(deep["patch_norm_map"], gray["patch_norm_map"], rtol=1e-5)  # 16-bit = its 8-bit
    rgba = _predict(client, images["rgba"], ["tiny-reg4"])
    assert rgba["notice"] == "" and rgba["models"][0]["norms"].endswith(".png")


def test_client_rejects_bad_requests(client, images):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Choose at least one model"):
        _predict(client, images["small"], [])
    with pytest.raises(AppError, match="cannot load model"):
        _predict(client, images["small"], [str(ROOT / "no-such-model")])
    with pytest.raises(AppError, match="Layer -7 does not exist"):
        _predict(client, images["small"], ["tiny-reg4"], layer=-7)
    absolute = _predict(client, images["small"], ["tiny-reg4"], rule="absolute", value=999)["stats"]["models"][0]
    assert absolute["threshold"] == 999 and absolute["num_outliers"] == 0
    low = _predict(client, images["small"], ["tiny-reg4"], rule="absolute", value=0)["stats"]["models"][0]
    assert low["num_outliers"] == low["num_patches"] and low["rule"] == "absolute"
    with pytest.raises(AppError, match="greater than maximum"):  # the slider's range, checked by Gradio
        _predict(client, images["small"], ["tiny-reg4"], rule="percentile", value=101)


@pytest.mark.slow
def test_sixteen_concurrent_requests_all_answered_correctly(client, model_dirs, images):
    from gradio_client import handle_file

    cases = [(images["small" if i % 2 else "other"], 90.0 + (i % 4)) for i in range(16)]
    store = space.ModelStore()
    expected = {
        case: space.analyze(case[0], ["tiny-reg4"], rule="percentile", value=case[1], models=model_dirs, store=store)
        .results[0]
        .stats["threshold"]
        for case in set(cases)
    }
    jobs = [
        client.submit(handle_file(path), ["tiny-reg4"], False, -1, "percentile", value, 150, api_name="/analyze")
        for path, value in cases
    ]
    results = [job.result(timeout=240) for job in jobs]
    assert len(results) == 16
    for (path, value), result in zip(cases, results):
        out = space.api_outputs(result)
        assert out["stats"]["models"][0]["threshold"] == pytest.approx(expected[(path, value)], rel=1e-6)
        assert out["stats"]["models"][0]["rule_value"] == value
        _assert_png(out["models"][0]["lost"])


def test_latency_benchmark_measures_full_requests(app, images):
    sys.path.insert(0, str(ROOT))
    from benchmarks.space_latency import measure

    result = measure(app, images["small"], ["tiny-reg4"], repeats=1)
    assert result["repeats"] == 1 and 0 < result["min_s"] <= result["max_s"] and result["first_request_s"] > 0


# -------------------------------------------------------------------------------------------------- browser


def test_browser_upload_run_and_bad_file(app, images):
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).exists(), "Debian Chromium is needed: apt-get install -y chromium"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            page.goto(app, wait_until="domcontentloaded")
            page.locator("#input-image input[type=file]").set_input_files(images["examples"][1])  # coffee, 600x400
            page.locator("#analyze").click()
            expected = {0: space.FIGURE_KEYS, 1: [k for k in space.FIGURE_KEYS if k != "register_attention"]}
            for slot, keys in expected.items():
                for key in keys:
                    expect(page.locator(f"#{key}-{slot} img")).to_be_visible(timeout=90_000)
            expect(page.locator("#notice")).to_contain_text("downscaled from 600x400 to 448x299")
            expect(page.locator("#stats-0")).to_contain_text("max patch norm")
            expect(page.locator("#register_attention-1")).to_be_hidden()  # the model without registers
            expect(page.locator("#model-2")).to_be_hidden()  # only two models chosen
            for slot, keys in expected.items():
                for key in keys:
                    image = page.locator(f"#{key}-{slot} img")
                    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
                    response = page.request.get(image.get_attribute("src"))
                    assert response.ok and response.body()[:8] == PNG_SIGNATURE and len(response.body()) > 1000
            page.screenshot(path=str(ARTIFACTS / "space_register_explorer.png"), full_page=True)
            # A text file named .png and a 1x1 image: a message in the page, no traceback; the app keeps serving.
            for name, message in (("text", "not an image file"), ("tiny", "smaller than one 14x14 patch")):
                page.locator("#input-image button[aria-label='Remove Image']").first.click()
                page.locator("#input-image input[type=file]").set_input_files(images[name])
                page.locator("#analyze").click()
                expect(page.get_by_text(message).first).to_be_visible(timeout=60_000)
                assert "Traceback" not in page.content()
                if name == "text":
                    page.screenshot(path=str(ARTIFACTS / "space_register_explorer_bad_file.png"), full_page=True)
            page.locator("#input-image button[aria-label='Remove Image']").first.click()
            page.locator("#input-image input[type=file]").set_input_files(images["examples"][3])  # rocket, 640x427
            page.locator("#analyze").click()
            expect(page.locator("#notice")).to_contain_text("downscaled from 640x427", timeout=60_000)
            expect(page.locator("#lost-0 img")).to_be_visible(timeout=60_000)
        finally:
            browser.close()
