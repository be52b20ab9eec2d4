"""The outlier verdict (Darcet et al. 2024, §2.1, Fig. 3-4): a separate high-norm mode, or none.

Three kinds of model: the two embedded models and the real DINOv2-S of ../shared (no artifacts: the verdict is "none"
while the 98th percentile still flags 2 %), and a tiny model with planted high-norm tokens (the verdict finds exactly
the planted patches).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from planted_artifacts import planted_model
from skimage import data
from transformers import AutoImageProcessor, AutoModel, BitImageProcessor

import vit_registers  # noqa: F401  (Auto classes)
from vit_registers.analysis.outliers import outlier_threshold, outlier_verdict, rule_thresholds
from vit_registers.analysis.pipeline import analyze_batch, judge_outliers
from vit_registers.pretrained import default_model_path

REAL_DINOV2_S = Path(__file__).resolve().parents[1] / ".." / "shared" / "real-weights" / "dinov2-small-imgfocus"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # the default command's four photos


def _bulk(count=5000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return 50 + 5 * torch.randn(count, generator=generator)


def test_verdict_on_synthetic_norms():
    bulk = _bulk()
    none = outlier_verdict(bulk)
    assert not none.found and none.threshold is None and none.num_outliers == 0
    assert none.max_over_median < 2 and "no patch stands out" in none.reason
    assert none.headline.startswith("no high-norm outliers")
    # the percentile rule still flags 2 %: the count that the verdict is read against
    thresholds = rule_thresholds(bulk, none)
    assert thresholds["gap"] == math.inf and int((bulk > thresholds["percentile"]).sum()) == 100
    assert outlier_threshold(bulk, rule="gap") == math.inf

    planted = bulk.clone()
    planted[:100] = 400 + 20 * torch.rand(100)  # a 2 % mode 8x above the bulk
    found = outlier_verdict(planted)
    assert found.found and found.num_outliers == 100
    assert found.gap_bounds[0] < found.threshold < found.gap_bounds[1] and found.gap > 4
    assert outlier_threshold(planted, rule="gap") == pytest.approx(found.threshold)

    # one heavy tail (log-normal, max/median about 6) is not a mode, nor are a couple of extreme values of it
    generator = torch.Generator().manual_seed(1)
    tail = torch.exp(0.5 * torch.randn(5000, generator=generator)) * 50
    verdict = outlier_verdict(tail)
    assert verdict.max_over_median > 2 and not verdict.found and "no separate mode" in verdict.reason

    # high norms that are already high in the input (depth 0) come from the pixels, not from the network
    per_layer = torch.stack([planted, planted])
    assert not outlier_verdict(planted, per_layer).found
    grown = torch.stack([bulk, planted])
    assert outlier_verdict(planted, grown).first_separating_layer == 1


def _photos():
    return [getattr(data, name)() for name in PHOTOS]


@pytest.mark.parametrize("registers", [0, 4])
def test_embedded_models_have_no_outliers(registers):
    path = default_model_path(registers)
    model = AutoModel.from_pretrained(path).eval()
    pixels = AutoImageProcessor.from_pretrained(path)(images=_photos(), return_tensors="pt").pixel_values
    analyses = analyze_batch(model, pixels)
    verdict = judge_outliers(analyses, rule="gap")
    assert not verdict.found, verdict
    assert sum(a.outlier_summary()["num_outliers"] for a in analyses) == 0
    summary = analyses[0].summary()
    assert summary["outlier_verdict"]["found"] is False and summary["threshold"] is None
    assert summary["outliers_by_rule"]["gap"] == 0


@pytest.mark.skipif(not REAL_DINOV2_S.is_dir(), reason="../shared/real-weights not present")
def test_real_dinov2_small_has_no_outliers_but_the_percentile_rule_flags_2_percent():
    from vit_registers.conversion import convert

    model = convert("transformers", REAL_DINOV2_S)
    processor = BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )  # DINOv2's evaluation transform
    pixels = processor(images=_photos(), return_tensors="pt").pixel_values
    analyses = analyze_batch(model, pixels)
    verdict = judge_outliers(analyses, rule="percentile")
    assert not verdict.found and verdict.max_over_median < 2, verdict
    flagged = sum(a.outlier_summary()["num_outliers"] for a in analyses)
    assert flagged == pytest.approx(0.02 * verdict.num_patches, abs=2)  # what the old default reported
    assert sum(a.outlier_summary()["outliers_by_rule"]["gap"] for a in analyses) == 0


def test_planted_high_norm_tokens_are_found_exactly():
    positions = (0, 5, 10)
    model = planted_model(positions, layer=0)
    pixels = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    analyses = analyze_batch(model, pixels)
    verdict = judge_outliers(analyses)
    assert verdict.found and verdict.num_outliers == 4 * len(positions), verdict
    assert verdict.first_separating_layer == 1  # grown by layer 0 (depth 1), not present in the embeddings
    for analysis in analyses:
        assert analysis.outliers.flatten().nonzero().flatten().tolist() == list(positions)
    summary = analyses[0].summary()
    assert summary["outlier_verdict"]["found"] and summary["num_outliers"] == len(positions)
    assert summary["outliers_by_rule"]["gap"] == len(positions)
    # the same model without the plant: none
    plain = analyze_batch(planted_model(positions, strength=0), pixels)
    assert not judge_outliers(plain).found


# ------------------------------------------------------------------------------ find-register-neurons refuses


def _save(model, path):
    model.save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(path)
    return str(path)


def _noise_images(path, count=6):
    import numpy as np
    from PIL import Image

    path.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path / f"{index}.png")
    return str(path)


def test_find_register_neurons_refuses_without_artifacts_unless_forced(tmp_path, capsys):
    import json

    from vit_registers.cli import main

    model = _save(planted_model(strength=0), tmp_path / "plain")
    images = _noise_images(tmp_path / "images")
    command = ["find-register-neurons", "--model", model, "--images", images, "--output-dir"]
    assert main([*command, str(tmp_path / "refused")]) == 1
    err = capsys.readouterr().err
    assert "no artifacts to move into test-time registers" in err and "no high-norm outliers" in err
    assert "--force" in err and not (tmp_path / "refused").exists()

    assert main([*command, str(tmp_path / "forced"), "--force"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "--force: writing the model anyway" in err
    report = json.loads((tmp_path / "forced" / "register_neurons.json").read_text())
    assert report["forced"] is True and report["outlier_verdict"]["found"] is False


def test_find_register_neurons_moves_planted_artifacts_into_a_test_time_register(tmp_path, capsys):
    import json

    from planted_artifacts import UNIT

    from vit_registers.cli import main

    model = _save(planted_model((0, 5, 10), layer=0), tmp_path / "planted")
    images = _noise_images(tmp_path / "images")
    out = tmp_path / "ttr"
    code = main(
        ["find-register-neurons", "--model", model, "--images", images, "--output-dir", str(out), "--top-k", "4"]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "register_neurons.json").read_text())
    assert report["forced"] is False and report["outlier_verdict"]["found"] is True
    assert report["first_separating_layer"] == 1
    assert report["ranking"][0]["layer"] == 0 and report["ranking"][0]["unit"] == UNIT  # the planted neuron first
    # with the test-time register, the patches have no high-norm outliers any more
    edited = AutoModel.from_pretrained(out).eval()
    pixels = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    assert judge_outliers(analyze_batch(planted_model((0, 5, 10), layer=0), pixels)).found
    assert not judge_outliers(analyze_batch(edited, pixels)).found
