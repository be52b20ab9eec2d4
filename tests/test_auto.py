"""Every Hugging Face entry point: Auto classes, pipelines, save/load, and trust_remote_code without the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    BitImageProcessor,
    pipeline,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vit_registers import (
    ViTRegistersBackbone,
    ViTRegistersConfig,
    ViTRegistersForImageClassification,
    ViTRegistersModel,
)

CONFIG = dict(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def processor() -> BitImageProcessor:
    return BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 28, "width": 28},
        do_convert_rgb=True,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )


@pytest.fixture
def saved_classifier(tmp_path):
    torch.manual_seed(0)
    config = ViTRegistersConfig(**CONFIG, num_labels=3, id2label={0: "cat", 1: "dog", 2: "cup"})
    model = ViTRegistersForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    processor().save_pretrained(tmp_path)
    return model, str(tmp_path)


def tmp_path_of(path: str):
    from pathlib import Path

    return Path(path)


def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))


def test_saved_directory_has_code_auto_map_and_safetensors(saved_classifier):
    _, path = saved_classifier
    files = set(os.listdir(path))
    path = tmp_path_of(path)
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= files
    assert {"configuration_vit_registers.py", "modeling_vit_registers.py"} <= files
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "vit_registers"
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForImageClassification", "AutoBackbone"}


def test_auto_classes_load_the_package_classes(saved_classifier):
    model, path = saved_classifier
    assert isinstance(AutoConfig.from_pretrained(path), ViTRegistersConfig)
    base = AutoModel.from_pretrained(path)
    assert type(base) is ViTRegistersModel
    classifier = AutoModelForImageClassification.from_pretrained(path).eval()
    assert type(classifier) is ViTRegistersForImageClassification
    # transformers 5.23's AutoBackbone.from_pretrained asks the Hub `repo_exists` even for a local directory (and
    # fails offline), for every model type; from_config goes through the same registry without that call.
    backbone = AutoBackbone.from_config(AutoConfig.from_pretrained(path, out_indices=[2]))
    assert type(backbone) is ViTRegistersBackbone and backbone.out_indices == [2]
    assert isinstance(AutoImageProcessor.from_pretrained(path), BitImageProcessor)
    pixels = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(classifier(pixels).logits, model(pixels).logits)
    torch.testing.assert_close(base(pixels).last_hidden_state, model.vit_registers(pixels).last_hidden_state)


def test_image_processor_is_registered_for_the_config():
    config = ViTRegistersConfig(**CONFIG)
    from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

    assert get_image_processor_class_from_name("BitImageProcessor") is BitImageProcessor
    model = ViTRegistersModel(config)
    assert model.config.model_type == "vit_registers"


def test_image_processor_is_registered_for_both_backends(saved_classifier):
    """With only one backend registered, loading a `BitImageProcessor` config finds no torchvision entry in this
    mapping and logs "Requested torchvision backend is not available. Falling back to pil backend"."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    from vit_registers.auto import IMAGE_PROCESSOR_CLASSES

    _, path = saved_classifier
    assert IMAGE_PROCESSOR_MAPPING[ViTRegistersConfig] == IMAGE_PROCESSOR_CLASSES
    assert set(IMAGE_PROCESSOR_CLASSES) == {"torchvision", "pil"}
    assert type(AutoImageProcessor.from_pretrained(path)) is IMAGE_PROCESSOR_CLASSES["torchvision"]
    assert type(AutoImageProcessor.from_pretrained(path, backend="pil")) is IMAGE_PROCESSOR_CLASSES["pil"]


def test_pipelines(saved_classifier):
    model, path = saved_classifier
    features = pipeline("image-feature-extraction", model=str(path), device="cpu")
    out = np.asarray(features(photo()))
    assert out.shape == (1, 1 + 4 + 4, 32)
    inputs = AutoImageProcessor.from_pretrained(path)(photo(), return_tensors="pt")
    expected = AutoModel.from_pretrained(path)(**inputs).last_hidden_state
    np.testing.assert_allclose(out, expected.detach().numpy(), atol=1e-5)
    classify = pipeline("image-classification", model=str(path), device="cpu")
    predictions = classify(photo(), top_k=3)
    assert {p["label"] for p in predictions} == {"cat", "dog", "cup"}
    probabilities = model(**inputs).logits.softmax(-1)[0]
    best = int(probabilities.argmax())
    assert predictions[0]["label"] == model.config.id2label[best]
    assert predictions[0]["score"] == pytest.approx(float(probabilities[best]), abs=1e-5)


BLOCKED_IMPORT = textwrap.dedent(
    """
    import sys, importlib.abc, json
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "vit_registers" or name.startswith("vit_registers."):
                raise ImportError("vit_registers is blocked in this interpreter")
    sys.meta_path.insert(0, Block())
    try:
        import vit_registers
        raise SystemExit("the package must not be importable here")
    except ImportError:
        pass
    import torch
    from transformers import AutoModel, AutoModelForImageClassification
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    path = sys.argv[1]
    pixels = torch.load(sys.argv[2], weights_only=True)
    classifier = AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    # AutoBackbone.from_pretrained calls the Hub even for local paths in transformers 5.23: resolve the class the way
    # it would, from the directory's auto_map
    auto_map = json.load(open(path + "/config.json"))["auto_map"]
    backbone_class = get_class_from_dynamic_module(auto_map["AutoBackbone"], path)
    backbone = backbone_class.from_pretrained(path, out_indices=[2]).eval()
    assert "vit_registers" not in sys.modules
    assert type(base).__module__.startswith("transformers_modules"), type(base).__module__
    with torch.no_grad():
        torch.save({"logits": classifier(pixels).logits, "registers": base(pixels).register_tokens,
                    "maps": backbone(pixels).feature_maps[0]}, sys.argv[3])
    """
)


def test_trust_remote_code_without_the_package(saved_classifier, tmp_path_factory):
    model, path = saved_classifier
    work = tmp_path_factory.mktemp("remote")
    pixels = torch.randn(2, 3, 28, 42)
    torch.save(pixels, work / "pixels.pt")
    env = dict(os.environ, HF_HOME=str(work / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT, str(path), str(work / "pixels.pt"), str(work / "out.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(work / "out.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(pixels).logits)
        torch.testing.assert_close(out["registers"], model.vit_registers(pixels).register_tokens)
        backbone = ViTRegistersBackbone.from_pretrained(path, out_indices=[2]).eval()
        torch.testing.assert_close(out["maps"], backbone(pixels).feature_maps[0])


def test_config_round_trip_keeps_every_field(tmp_path):
    config = ViTRegistersConfig(
        **CONFIG,
        num_register_tokens=0,
        use_cls_token=False,
        cls_token_has_position_embedding=False,
        use_final_norm=False,
        use_fc_norm=True,
        pooling="mean",
        mlp_type="swiglu",
        layerscale_value=None,
        interpolate_offset=0.1,
        interpolate_antialias=False,
        test_time_registers={"num_tokens": 1, "neurons": {"1": [3, 5]}},
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    for key in (
        "use_cls_token",
        "use_final_norm",
        "use_fc_norm",
        "pooling",
        "mlp_type",
        "layerscale_value",
        "interpolate_offset",
        "interpolate_antialias",
        "test_time_registers",
        "num_register_tokens",
    ):
        assert getattr(loaded, key) == getattr(config, key), key
    assert loaded.mlp_hidden_size == config.mlp_hidden_size
