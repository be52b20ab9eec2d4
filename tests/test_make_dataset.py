"""The synthetic object-localisation dataset (issue 8): determinism, exact boxes, disjoint splits, loading, CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vit_registers.data import synthetic
from vit_registers.data.sources import SOURCES, load_source
from vit_registers.data.synthetic import (
    BACKGROUND_BANDS,
    CLASS_NAMES,
    SPLITS,
    generate_dataset,
    load_synthetic_dataset,
    mask_bbox,
    render_sample,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_dataset.py"
SMALL = dict(image_size=64, num_train=3, num_validation=2, num_test=2)


def _hashes(root: Path) -> dict[str, str]:
    files = (p for p in sorted(root.rglob("*")) if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "ds"
    generate_dataset(out, seed=3, **SMALL)
    return out


def test_same_seed_gives_byte_identical_files(small_dataset, tmp_path):
    again = tmp_path / "again"
    generate_dataset(again, seed=3, **SMALL)
    first, second = _hashes(small_dataset), _hashes(again)
    n_images = len(CLASS_NAMES) * (3 + 2 + 2)
    assert sum(name.endswith(".png") for name in first) == n_images
    assert first == second
    for split in SPLITS:
        metadata = Path(split) / "metadata.jsonl"
        assert (small_dataset / metadata).read_bytes() == (again / metadata).read_bytes()

    other = tmp_path / "other"
    generate_dataset(other, seed=4, **SMALL)
    changed = [name for name, digest in _hashes(other).items() if name.endswith(".png") and first[name] != digest]
    assert len(changed) == n_images  # another seed gives other images


@pytest.mark.parametrize("split", SPLITS)
def test_boxes_are_exactly_the_pasted_object(split):
    for index in range(28):
        label = CLASS_NAMES[index % len(CLASS_NAMES)]
        sample = render_sample(11, split, index, label, image_size=96)
        x0, y0, x1, y1 = sample.bbox
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
        assert sample.bbox == mask_bbox(sample.mask)
        changed = np.any(sample.image != sample.background, axis=2)
        assert not np.any(changed & ~sample.mask), "pixels outside the object differ from the background"
        # The pixels that differ from the object-free rendering span exactly the box.
        assert mask_bbox(changed) == sample.bbox
        # Objects are masked, not pasted as rectangles: the box is not entirely covered.
        if label in {"astronaut", "cat", "coffee", "flower", "coin", "horse"}:
            assert sample.mask[y0:y1, x0:x1].mean() < 0.97


def test_written_files_match_the_rendered_samples(small_dataset):
    info = json.loads((small_dataset / "generation.json").read_text())
    for split in SPLITS:
        rows = [json.loads(line) for line in (small_dataset / split / "metadata.jsonl").read_text().splitlines()]
        assert Counter(row["label"] for row in rows) == {name: info["images_per_class"][split] for name in CLASS_NAMES}
        for index, row in enumerate(rows):
            sample = render_sample(3, split, index, row["label"], image_size=64)
            saved = np.asarray(Image.open(small_dataset / split / row["file_name"]))
            assert saved.shape == (64, 64, 3)
            np.testing.assert_array_equal(saved, sample.image)
            assert row["objects"] == {"bbox": [list(sample.bbox)], "category": [row["label"]]}
            assert row["background"] == sample.background_name


def test_splits_are_disjoint(small_dataset):
    digests = {
        split: {hashlib.sha256(p.read_bytes()).hexdigest() for p in (small_dataset / split).glob("*.png")}
        for split in SPLITS
    }
    assert digests["train"].isdisjoint(digests["validation"])
    assert digests["train"].isdisjoint(digests["test"])
    assert digests["validation"].isdisjoint(digests["test"])

    # Backgrounds are cut from disjoint bands of each texture.
    for split in SPLITS:
        low, high = BACKGROUND_BANDS[split]
        for index in range(40):
            sample = render_sample(0, split, index, "cat", image_size=64)
            height = load_source(sample.background_name).shape[0]
            x, y, side = sample.background_window
            assert round(low * height) <= y and y + side <= round(high * height)
    # The coin class uses different coins per split.
    coins = synthetic.object_templates()["coin"]
    keys = {split: {t.rgb.tobytes() for t in coins[split]} for split in SPLITS}
    assert all(keys[split] for split in SPLITS)
    assert keys["train"].isdisjoint(keys["test"]) and keys["train"].isdisjoint(keys["validation"])
    assert keys["validation"].isdisjoint(keys["test"])


def test_loads_as_imagefolder(small_dataset, tmp_path):
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(small_dataset), cache_dir=str(tmp_path / "cache"))
    assert set(ds) == set(SPLITS)
    assert ds["train"].num_rows == 3 * len(CLASS_NAMES)
    assert ds["test"].num_rows == 2 * len(CLASS_NAMES)
    assert set(ds["train"].column_names) == {"image", "label", "objects", "background"}
    row = ds["validation"][0]
    assert row["image"].size == (64, 64)
    assert row["label"] in CLASS_NAMES
    assert row["objects"]["category"] == [row["label"]] and len(row["objects"]["bbox"][0]) == 4

    typed = load_synthetic_dataset(small_dataset, cache_dir=str(tmp_path / "cache"))
    feature = typed["train"].features["label"]
    assert isinstance(feature, datasets.ClassLabel) and feature.names == list(CLASS_NAMES)
    assert feature.int2str(typed["validation"][0]["label"]) == row["label"]


def test_dataset_card_names_every_source_and_licence(small_dataset):
    card = (small_dataset / "README.md").read_text()
    for source in SOURCES.values():
        assert source.name in card and source.licence in card
    assert "x1, y1` exclusive" in card


def test_bad_parameters_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="num_train must be a positive integer"):
        generate_dataset(tmp_path / "a", num_train=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        generate_dataset(tmp_path / "b", seed=-1)
    with pytest.raises(ValueError, match="image_size must be at least 32"):
        generate_dataset(tmp_path / "c", image_size=16)
    with pytest.raises(ValueError, match="unknown class"):
        render_sample(0, "train", 0, "dog")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli():
    """The script's ``main`` loaded in-process (each subprocess pays ~10 s of imports on the shared CPU)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dataset_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


SMALL_ARGS = ["--image-size", "48", "--num-train", "1", "--num-validation", "1", "--num-test", "1"]


def test_script_exits_non_zero_with_one_line_errors(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    result = _run("--output-dir", str(occupied), *SMALL_ARGS)
    assert result.returncode != 0
    assert "not empty" in result.stderr and "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (occupied / "notes.txt").read_text() == "keep me"


def test_cli_overwrite_rules(cli, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    assert cli(["--output-dir", str(occupied), "--overwrite", *SMALL_ARGS]) != 0
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (occupied / "notes.txt").read_text() == "keep me"

    for bad in (["--num-test", "0"], ["--num-train", "-3"], ["--seed", "-1"], ["--image-size", "abc"]):
        with pytest.raises(SystemExit) as exit_info:
            cli(["--output-dir", str(tmp_path / "x"), *bad])
        assert exit_info.value.code != 0
        err = capsys.readouterr().err
        assert bad[0] in err and ("positive" in err or "non-negative" in err) and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    assert cli(["--output-dir", str(tmp_path / "small"), "--image-size", "16"]) != 0
    assert "image_size must be at least 32" in capsys.readouterr().err

    out = tmp_path / "ds"
    assert cli(["--output-dir", str(out), *SMALL_ARGS]) == 0
    before = _hashes(out)
    assert len([k for k in before if k.endswith(".png")]) == len(CLASS_NAMES) * 3
    assert cli(["--output-dir", str(out), *SMALL_ARGS]) != 0
    assert "not empty" in capsys.readouterr().err
    assert _hashes(out) == before
    assert cli(["--output-dir", str(out), "--overwrite", "--seed", "1", *SMALL_ARGS]) == 0
    after = _hashes(out)
    assert after.keys() == before.keys() and after != before
