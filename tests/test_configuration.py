"""ViTRegistersConfig behaves like a transformers config: the checks of transformers' ConfigTester (which is not in the
wheel, so they are written out here), per-field errors at construction and errors between fields when a model is built.

Each common check also runs on transformers' own `Dinov2WithRegistersConfig`, which shows that the check asks for
what transformers' configs do.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Dinov2WithRegistersConfig

from vit_registers import (
    ViTRegistersBackbone,
    ViTRegistersConfig,
    ViTRegistersForImageClassification,
    ViTRegistersModel,
)

TINY = dict(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2.0)
CONFIG_CLASSES = [ViTRegistersConfig, Dinov2WithRegistersConfig]
# What transformers' model tests hand to ConfigTester: a ModelTester's tiny config, and a lone width that the default
# 12 heads do not divide (hidden_size=37 in the ViT and DINOv2 tests).
TESTER_INPUTS = [
    dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, image_size=30, patch_size=2),
    dict(hidden_size=32),
    dict(hidden_size=37),
]
COMMON_PROPERTIES = ("hidden_size", "num_attention_heads", "num_hidden_layers")


def _ids(value) -> str:
    return value.__name__ if isinstance(value, type) else ",".join(f"{k}={v}" for k, v in value.items())


each_tester_input = pytest.mark.parametrize("inputs", TESTER_INPUTS, ids=_ids)
each_config_class = pytest.mark.parametrize("config_class", CONFIG_CLASSES, ids=_ids)


# --------------------------------------------------------------------------------------------------------------------
# transformers' ConfigTester, check by check


@each_config_class
@each_tester_input
def test_common_properties_can_be_read_set_and_passed(config_class, inputs):
    config = config_class(**inputs)
    for index, name in enumerate(COMMON_PROPERTIES):
        assert hasattr(config, name), name
        setattr(config, name, index)
        assert getattr(config, name) == index, name
    for index, name in enumerate(COMMON_PROPERTIES):  # hidden_size=0, num_attention_heads=1, num_hidden_layers=2
        assert getattr(config_class(**{name: index}), name) == index, name


@each_config_class
@each_tester_input
def test_to_json_string_holds_every_argument(config_class, inputs):
    written = json.loads(config_class(**inputs).to_json_string())
    for key, value in inputs.items():
        assert written[key] == value, key


@each_config_class
@each_tester_input
def test_json_file_round_trip(config_class, inputs, tmp_path):
    first = config_class(**inputs)
    first.to_json_file(tmp_path / "config.json")
    second = config_class.from_json_file(tmp_path / "config.json")
    assert second.to_dict() == first.to_dict()


@each_config_class
@each_tester_input
def test_save_pretrained_round_trip(config_class, inputs, tmp_path):
    first = config_class(**inputs)
    first.save_pretrained(tmp_path / "saved")
    assert config_class.from_pretrained(tmp_path / "saved").to_dict() == first.to_dict()
    first.save_pretrained(tmp_path / "parent" / "sub")
    assert config_class.from_pretrained(tmp_path / "parent", subfolder="sub").to_dict() == first.to_dict()
    with pytest.raises(OSError):
        config_class.from_pretrained(tmp_path / "missing")


@each_config_class
@each_tester_input
def test_num_labels_sets_the_label_maps(config_class, inputs):
    config = config_class(**inputs, num_labels=5)
    assert len(config.id2label) == 5 and len(config.label2id) == 5
    config.num_labels = 3
    assert len(config.id2label) == 3 and len(config.label2id) == 3


@each_config_class
def test_init_without_parameters(config_class):
    assert not config_class.sub_configs
    assert config_class() is not None


@each_config_class
def test_common_arguments_are_kept(config_class):
    common = dict(
        return_dict=False,
        output_hidden_states=True,
        output_attentions=True,
        chunk_size_feed_forward=5,
        architectures=["SomeModel"],
        id2label={0: "label"},
        label2id={"label": "0"},
        problem_type="regression",
        finetuning_task="translation",  # not a field of any config: kept as an attribute
    )
    config = config_class(**common, dtype="float16")
    assert config.dtype == torch.float16
    wrong = {key: getattr(config, key, None) for key, value in common.items() if getattr(config, key, None) != value}
    assert not wrong


# --------------------------------------------------------------------------------------------------------------------
# Where errors are raised


def test_fields_are_set_one_at_a_time_like_transformers_configs():
    config = ViTRegistersConfig(hidden_size=32)  # 32 is not a multiple of the default 12 heads
    assert (config.hidden_size, config.num_attention_heads) == (32, 12)
    with pytest.raises(ValueError, match="must be divisible by `num_attention_heads`"):
        config.check_consistency()
    config.num_attention_heads = 4
    config.check_consistency()
    assert ViTRegistersConfig(use_cls_token=False).pooling == "cls"  # pooling is set next


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_register_tokens=-1), "`num_register_tokens` must be an integer >= 0, got -1"),
        (dict(hidden_size=-32), "`hidden_size` must be an integer >= 0, got -32"),
        (dict(num_attention_heads=2.0), "`num_attention_heads` must be an integer >= 0, got 2.0"),
        (dict(patch_size=True), "`patch_size` must be an integer >= 0, got True"),
        (dict(image_size=[28, 28, 28]), "`image_size` must be one or two integers"),
        (dict(intermediate_size=-1), "`intermediate_size` must be None or an integer >= 0"),
        (dict(mlp_type="moe"), "`mlp_type` must be one of"),
        (dict(pooling="max"), "`pooling` must be one of"),
        (dict(mlp_ratio=0), "`mlp_ratio` must be > 0"),
        (dict(drop_path_rate=1.5), "`drop_path_rate` must be in"),
        (dict(attention_probs_dropout_prob=-0.1), "`attention_probs_dropout_prob` must be in"),
        (dict(interpolate_offset=-0.1), "`interpolate_offset` must be >= 0"),
        (dict(layer_norm_eps=0.0), "`layer_norm_eps` must be > 0"),
        (dict(test_time_registers={"num_tokens": -1}), "`test_time_registers` must be a dict"),
        (dict(test_time_registers=[1]), "`test_time_registers` must be a dict"),
        (dict(position_encoding="sincos"), "`position_encoding` must be one of"),
        (dict(rope_type="mrope"), "`rope_type` must be one of"),
        (dict(rope_normalize_coords="mean"), "`rope_normalize_coords` must be one of"),
        (dict(rope_theta=0), "`rope_theta` must be a number > 0"),
        (dict(rope_rescale_coords=-2.0), "`rope_rescale_coords` must be a number > 0 or None"),
        (dict(rope_shift_coords=-0.1), "`rope_shift_coords` must be a number >= 0 or None"),
        (dict(rope_reference_grid=[16]), "`rope_reference_grid` must be None or two sizes"),
        (dict(mlp_align_to=0), "`mlp_align_to` must be an integer >= 1"),
    ],
)
def test_a_bad_single_value_raises_when_the_config_is_made(overrides, message):
    with pytest.raises(ValueError, match=f"ViTRegistersConfig: {message}".replace("[", r"\[")):
        ViTRegistersConfig(**{**TINY, **overrides})


INCONSISTENT = [
    (dict(hidden_size=30), r"`hidden_size` \(30\) must be divisible by `num_attention_heads` \(4\)"),
    (dict(patch_size=0), "`patch_size` must be a positive integer, got 0"),
    (dict(num_hidden_layers=0), "`num_hidden_layers` must be a positive integer, got 0"),
    (dict(intermediate_size=0), "`intermediate_size` must be a positive integer"),
    (dict(image_size=10), r"`image_size` 10 must be at least `patch_size` \(14\)"),
    (dict(image_size=[28, 10]), r"`image_size` \[28, 10\] must be at least `patch_size` \(14\)"),
    (
        dict(use_cls_token=False, pooling="cls", cls_token_has_position_embedding=False),
        "`pooling='cls'` needs a CLS token",
    ),
    (dict(use_cls_token=False, pooling="mean"), "`cls_token_has_position_embedding=True` needs `use_cls_token=True`"),
    (
        dict(position_encoding="rope", hidden_size=72, num_attention_heads=12),
        "`position_encoding='rope'` needs a head size divisible by 4, got 6",
    ),
    (dict(position_encoding="rope", rope_min_period=0.5), "`rope_min_period` and `rope_max_period` are given together"),
    (
        dict(position_encoding="rope", register_tokens_have_position_embedding=True),
        "`register_tokens_have_position_embedding=True` needs `position_encoding='learned'`",
    ),
    (
        dict(register_tokens_have_position_embedding=True, cls_token_has_position_embedding=False),
        "`register_tokens_have_position_embedding=True` with a CLS token needs `cls_token_has_position_embedding=True`",
    ),
    (
        dict(test_time_registers={"num_tokens": 1, "neurons": {"7": [0]}}),
        "test-time register neurons name layer 7, the model has 3",
    ),
    (
        dict(test_time_registers={"num_tokens": 1, "neurons": {"1": [64]}}),
        r"test-time register neurons of layer 1 must lie in \[0, 64\)",
    ),
]


@pytest.mark.parametrize("overrides,message", INCONSISTENT)
def test_check_consistency_names_the_fields_that_clash(overrides, message):
    config = ViTRegistersConfig(**{**TINY, **overrides})  # accepted on its own, as transformers' configs
    with pytest.raises(ValueError, match=f"ViTRegistersConfig: {message}"):
        config.check_consistency()
    with pytest.raises(ValueError, match=message):
        config._check_values()  # the earlier name, called by `set_test_time_registers`


@pytest.mark.parametrize("model_class", [ViTRegistersModel, ViTRegistersForImageClassification, ViTRegistersBackbone])
@pytest.mark.parametrize("overrides,message", INCONSISTENT)
def test_inconsistent_config_is_refused_when_the_model_is_built(model_class, overrides, message):
    config = ViTRegistersConfig(**{**TINY, **overrides})
    with pytest.raises(ValueError, match=f"ViTRegistersConfig: {message}"):
        model_class(config)


def test_a_config_that_clashes_can_be_saved_and_loaded(tmp_path):
    config = ViTRegistersConfig(hidden_size=32)
    config.save_pretrained(tmp_path)
    assert ViTRegistersConfig.from_pretrained(tmp_path).hidden_size == 32


def test_save_pretrained_checks_each_value_and_this_configs_own_validators(tmp_path):
    # transformers' `validate()` calls the base class's `validate_output_attentions`, which refuses attention weights
    # under SDPA; this model returns them under every backend, and its override is the one that runs.
    model = ViTRegistersModel(ViTRegistersConfig(**TINY, output_attentions=True))
    assert model.config._attn_implementation != "eager" and model.config.output_attentions
    model.save_pretrained(tmp_path / "model")
    assert ViTRegistersConfig.from_pretrained(tmp_path / "model").output_attentions
    config = ViTRegistersConfig(**TINY)
    config.pooling = "max"  # set after construction: refused when written
    with pytest.raises(ValueError, match="`pooling` must be one of"):
        config.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad" / "config.json").exists()
