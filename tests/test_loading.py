"""`vit_registers.analysis.loading.load_model`: a checkpoint is loaded with the class that holds its weights."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoConfig, BitImageProcessor

from vit_registers import (
    ViTRegistersBackbone,
    ViTRegistersConfig,
    ViTRegistersForImageClassification,
    ViTRegistersModel,
)
from vit_registers.analysis.loading import ModelLoadError, checkpoint_class, load_model
from vit_registers.auto import IMAGE_PROCESSOR_CLASSES

CONFIG = dict(
    image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_register_tokens=2
)


@pytest.fixture
def transformers_warnings():
    """Warnings logged by transformers (its library logger does not propagate to the root logger)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    yield records
    library_logger.removeHandler(handler)


def save(model, directory):
    model.save_pretrained(directory)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(directory)
    return str(directory)


def test_classifier_checkpoint_loads_with_its_class_and_without_warnings(tmp_path, transformers_warnings):
    torch.manual_seed(0)
    classifier = ViTRegistersForImageClassification(ViTRegistersConfig(**CONFIG, num_labels=3)).eval()
    path = save(classifier, tmp_path)
    assert checkpoint_class(AutoConfig.from_pretrained(path)) is ViTRegistersForImageClassification
    model, processor = load_model(path, "cpu")
    # the bare model loaded from it reported classifier.weight / classifier.bias as UNEXPECTED
    assert [record.getMessage() for record in transformers_warnings] == []
    assert type(model) is ViTRegistersModel and not model.training
    expected = classifier.vit_registers.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name])
    assert type(processor) is IMAGE_PROCESSOR_CLASSES["torchvision"]


def test_bare_and_backbone_checkpoints(tmp_path, transformers_warnings):
    torch.manual_seed(0)
    bare = ViTRegistersModel(ViTRegistersConfig(**CONFIG)).eval()
    model, _ = load_model(save(bare, tmp_path / "bare"), "cpu")
    assert type(model) is ViTRegistersModel
    torch.testing.assert_close(model.state_dict(), bare.state_dict())
    backbone = ViTRegistersBackbone(ViTRegistersConfig(**CONFIG, out_indices=[2])).eval()
    path = save(backbone, tmp_path / "backbone")
    assert checkpoint_class(AutoConfig.from_pretrained(path)) is ViTRegistersBackbone
    model, _ = load_model(path, "cpu")
    assert type(model) is ViTRegistersModel
    torch.testing.assert_close(model.state_dict(), backbone.vit_registers.state_dict())
    assert [record.getMessage() for record in transformers_warnings] == []
    assert checkpoint_class(ViTRegistersConfig(**CONFIG)) is ViTRegistersModel  # no `architectures`


def test_other_model_types_and_missing_paths_are_refused_before_loading_weights(tmp_path):
    from transformers import Dinov2Config

    Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="is a 'dinov2' model"):
        load_model(str(tmp_path), "cpu")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(str(tmp_path / "nowhere"), "cpu")


def test_loading_bar_is_off_for_local_directories_only(tmp_path):
    from transformers.utils import logging as transformers_logging

    from vit_registers.analysis.loading import without_loading_bar

    assert transformers_logging.is_progress_bar_enabled()
    with without_loading_bar(str(tmp_path)):
        assert not transformers_logging.is_progress_bar_enabled()
    assert transformers_logging.is_progress_bar_enabled()
    with without_loading_bar("org/model-on-the-hub"):
        assert transformers_logging.is_progress_bar_enabled()
