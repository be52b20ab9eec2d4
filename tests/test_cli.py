"""`vit-registers analyze` and `corloc` end to end on bundled photos (skimage.data) and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from skimage import data
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vit_registers import ViTRegistersConfig, ViTRegistersModel, cli

GROUP_KEYS = {"mean", "std", "min", "median", "max"}


def save_tiny_model(directory, **kwargs):
    torch.manual_seed(0)
    config = ViTRegistersConfig(
        image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **kwargs
    )
    ViTRegistersModel(config).save_pretrained(directory)
    transformers.BitImageProcessor(
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56},
        do_center_crop=True,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    ).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), num_register_tokens=4)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    paths = {}
    for name in ("astronaut", "coffee", "chelsea", "camera"):  # camera is grayscale
        paths[name] = root / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(paths[name])
    rgba = np.dstack([data.chelsea(), np.full(data.chelsea().shape[:2], 128, dtype=np.uint8)])
    paths["rgba"] = root / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(paths["rgba"])
    paths["deep"] = root / "deep.png"
    Image.fromarray(data.camera().astype(np.uint16) * 257).save(paths["deep"])
    paths["text"] = root / "notes.png"
    paths["text"].write_text("this is not a picture")
    paths["tiny"] = root / "tiny.png"
    Image.new("RGB", (10, 10), "white").save(paths["tiny"])
    return {name: str(path) for name, path in paths.items()}


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def check_stats_schema(stats, depth=2):
    assert set(stats) >= {
        "model",
        "outlier_rule",
        "threshold",
        "outlier_verdict",
        "outliers_by_rule",
        "images",
        "errors",
    }
    assert stats["threshold"] is None or isinstance(stats["threshold"], float)  # None: the gap rule found no mode
    assert set(stats["outlier_verdict"]) >= {"found", "reason", "gap", "max_over_median", "threshold"}
    for entry in stats["images"]:
        assert set(entry) >= {
            "path",
            "original_size",
            "input_size",
            "grid",
            "norms",
            "threshold",
            "num_outliers",
            "outlier_fraction",
            "first_separating_layer",
            "separation_ratio_per_layer",
            "neighbor_similarity",
            "attention_flow",
            "lost",
            "figures",
        }
        assert len(entry["norms"]) == depth + 1
        for depth_stats in entry["norms"]:
            assert depth_stats["patches"].keys() == GROUP_KEYS
            for group in ("cls", "registers"):
                assert depth_stats[group] is None or depth_stats[group].keys() == GROUP_KEYS
        assert 0.0 <= entry["outlier_fraction"] <= 1.0
        assert entry["num_outliers"] == round(entry["outlier_fraction"] * entry["grid"][0] * entry["grid"][1])
        x0, y0, x1, y1 = entry["lost"]["box"]
        height, width = entry["original_size"]
        assert 0 <= x0 < x1 <= width + 1e-3 and 0 <= y0 < y1 <= height + 1e-3
        assert set(entry["lost"]) >= {"box", "box_input", "seed", "features", "layer"}


def test_analyze_bundled_photos_and_bad_input(tmp_path, capsys, model_dir, photos):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        capsys,
        "analyze",
        photos["astronaut"],
        photos["text"],
        photos["camera"],
        photos["tiny"],
        photos["coffee"],
        photos["chelsea"],
        photos["rgba"],
        photos["deep"],
        tmp_path / "missing.jpg",
        "--model",
        model_dir,
        "--output-dir",
        out,
        "--layers",
        "0",
        "-1",
    )
    assert code == 1  # some inputs failed, the others were processed
    assert "Traceback" not in stderr
    assert "notes.png: not an image file" in stderr
    assert "tiny.png: 10x10 pixels is smaller than one 14x14 patch" in stderr
    assert "missing.jpg: no such file" in stderr
    stats = json.loads((out / "stats.json").read_text())
    check_stats_schema(stats)
    analysed = [Path(entry["path"]).stem for entry in stats["images"]]
    assert analysed == ["astronaut", "camera", "coffee", "chelsea", "rgba", "deep"]
    assert sorted(Path(e["path"]).name for e in stats["errors"]) == ["missing.jpg", "notes.png", "tiny.png"]
    # random weights have no high-norm mode: the default (gap) rule flags nothing, while the pooled 98th percentile,
    # reported next to it, would flag about 2% of all patches
    total = sum(entry["num_outliers"] for entry in stats["images"])
    patches = sum(entry["grid"][0] * entry["grid"][1] for entry in stats["images"])
    assert stats["outlier_rule"]["rule"] == "gap" and stats["outlier_verdict"]["found"] is False
    assert total == 0 and stats["threshold"] is None
    assert 1 <= stats["outliers_by_rule"]["percentile"] <= 0.02 * patches + 1
    assert stats["outliers_by_rule"]["percentile"] == sum(e["outliers_by_rule"]["percentile"] for e in stats["images"])
    assert "no high-norm outliers" in stdout
    astronaut = stats["images"][0]
    assert astronaut["input_size"] == [56, 56] and astronaut["grid"] == [4, 4]
    assert set(astronaut["attention_flow"]) == {"1", "2"}  # layers 1..L, as the norms' depths
    assert set(astronaut["figures"]) == {"norms", "attention_layer1", "attention_layer2", "pca", "lost"}
    for entry in stats["images"]:
        for name in entry["figures"].values():
            with Image.open(out / name) as figure:
                figure.verify()
            with Image.open(out / name) as figure:
                assert figure.format == "PNG" and figure.size[0] > 200
    assert "analysed 6 of 9 image(s)" in stdout


def test_analyze_absolute_threshold_and_model_without_cls_or_registers(tmp_path, capsys, photos):
    model_dir = save_tiny_model(
        tmp_path / "plain",
        use_cls_token=False,
        cls_token_has_position_embedding=False,
        num_register_tokens=0,
        pooling="mean",
    )
    out = tmp_path / "out"
    code, _, stderr = run_cli(
        capsys,
        "analyze",
        photos["chelsea"],
        photos["coffee"],
        "--model",
        model_dir,
        "--output-dir",
        out,
        "--threshold",
        "0",
        "--lost-features",
        "values",
        "--size",
        "70",
    )
    assert code == 0, stderr
    stats = json.loads((out / "stats.json").read_text())
    check_stats_schema(stats)
    assert stats["threshold"] == 0.0 and stats["outlier_rule"]["rule"] == "absolute"
    for entry in stats["images"]:
        assert entry["outlier_fraction"] == 1.0  # every norm is above 0
        assert entry["norms"][0]["cls"] is None and entry["norms"][0]["registers"] is None
        assert set(entry["figures"]) == {"norms", "pca", "lost"}  # no CLS and no register: no attention grid
        assert entry["input_size"][0] == 70 and entry["lost"]["features"] == "values"
        assert entry["attention_flow"]["2"] == {"patches": {"patches": pytest.approx(1.0, abs=1e-4)}}


def test_analyze_batches_give_the_same_numbers(tmp_path, capsys, model_dir, photos):
    images = [photos[name] for name in ("astronaut", "coffee", "camera", "chelsea")]  # two input sizes
    results = []
    for batch_size in (1, 8):
        out = tmp_path / f"b{batch_size}"
        code, _, stderr = run_cli(
            capsys,
            "analyze",
            *images,
            "--model",
            model_dir,
            "--output-dir",
            out,
            "--batch-size",
            batch_size,
            "--rule",
            "percentile",
        )
        assert code == 0, stderr
        results.append(json.loads((out / "stats.json").read_text()))
    single, batched = results
    assert [e["path"] for e in batched["images"]] == images
    assert batched["threshold"] == pytest.approx(single["threshold"], rel=1e-4)
    for one, many in zip(single["images"], batched["images"]):
        assert many["lost"] == one["lost"]
        assert many["norms"][-1]["patches"] == pytest.approx(one["norms"][-1]["patches"], rel=1e-3)


def test_analyze_usage_errors_are_one_line(tmp_path, capsys, model_dir, photos):
    code, _, stderr = run_cli(
        capsys, "analyze", photos["coffee"], "--model", tmp_path / "nowhere", "--output-dir", tmp_path / "o"
    )
    assert code == 1 and stderr.startswith("vit-registers: error: cannot load model") and stderr.count("\n") == 1
    code, _, stderr = run_cli(
        capsys, "analyze", photos["coffee"], "--model", model_dir, "--output-dir", tmp_path / "o", "--layers", "5"
    )
    assert code == 1 and "layer 5 does not exist" in stderr and "Traceback" not in stderr
    code, _, stderr = run_cli(
        capsys, "analyze", photos["coffee"], "--model", model_dir, "--output-dir", tmp_path / "o", "--rule", "absolute"
    )
    assert code == 1 and "--rule absolute needs --threshold" in stderr
    code, _, stderr = run_cli(capsys, "analyze", photos["text"], "--model", model_dir, "--output-dir", tmp_path / "o")
    assert code == 1 and "not an image file" in stderr
    assert json.loads((tmp_path / "o" / "stats.json").read_text())["images"] == []
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["analyze", photos["coffee"], "--model", str(model_dir)])  # --output-dir is required
    assert exit_info.value.code == 2
    assert "--output-dir" in capsys.readouterr().err


def test_analyze_defaults_to_the_embedded_model_and_bundled_photos(tmp_path, capsys):
    from vit_registers.pretrained import default_model_path

    assert cli.DEFAULT_MODEL == str(default_model_path(4))
    code, stdout, _ = run_cli(capsys, "analyze", "--output-dir", tmp_path / "demo")
    assert code == 0 and "analysed 4 of 4" in stdout
    stats = json.loads((tmp_path / "demo" / "stats.json").read_text())
    # the embedded model has no artifacts (docs/default-models.md): the verdict says so, on the terminal too
    assert stats["outlier_verdict"]["found"] is False and "no high-norm outliers" in stdout
    assert stats["model"] == cli.DEFAULT_MODEL
    assert [Path(image["path"]).name for image in stats["images"]] == [
        "astronaut.png",
        "coffee.png",
        "chelsea.png",
        "rocket.png",
    ]


def test_corloc_command(tmp_path, capsys, model_dir, photos):
    dataset = tmp_path / "voc"
    dataset.mkdir()
    rows = []
    for name in ("astronaut", "coffee", "chelsea", "camera"):
        image = Image.open(photos[name])
        image.save(dataset / f"{name}.jpg")
        width, height = image.size
        rows.append({"file_name": f"{name}.jpg", "objects": {"bbox": [[0, 0, width, height]]}})
    rows.append({"file_name": "unlabelled.jpg", "objects": {}})
    (dataset / "notes.jpg").write_text("nope")
    rows.append({"file_name": "notes.jpg", "objects": {"bbox": [[0, 0, 5, 5]]}})
    (dataset / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    output = tmp_path / "corloc.json"
    code, stdout, stderr = run_cli(
        capsys, "corloc", "--model", model_dir, "--dataset", dataset, "--batch-size", "2", "--output", output, "--quiet"
    )
    assert code == 0, stderr
    result = json.loads(output.read_text())
    assert result["num_images"] == 4 and result["num_skipped"] == 2
    assert "unlabelled.jpg has no boxes" in stderr and "notes.jpg: not an image file" in stderr
    assert "Traceback" not in stderr
    assert f"CorLoc: {100 * result['corloc']:.2f}% ({result['num_correct']}/4 images, 2 skipped)" in stdout
    for item in result["per_image"]:  # ground truth is the whole image: correct iff the box covers more than half
        assert item["correct"] == (item["best_iou"] > 0.5)  # LOST's boundary: an IoU of exactly 0.5 is wrong

    code, _, stderr = run_cli(capsys, "corloc", "--model", model_dir, "--dataset", tmp_path / "absent")
    assert code == 1 and "absent: not a directory" in stderr and stderr.count("\n") == 1


def test_corloc_lists_at_most_twenty_skipped_rows(tmp_path, capsys, model_dir, photos):
    Image.open(photos["coffee"]).save(tmp_path / "coffee.jpg")
    rows = [{"file_name": "coffee.jpg", "objects": {"bbox": [[0, 0, 100, 100]]}}]
    rows += [{"file_name": f"missing{i}.jpg"} for i in range(25)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    code, stdout, stderr = run_cli(capsys, "corloc", "--model", model_dir, "--dataset", tmp_path, "--quiet")
    assert code == 0
    assert "/1 images, 25 skipped)" in stdout
    assert stderr.count("has no boxes") == 20
    assert "... and 5 more skipped (use --output to list them all)." in stderr


def test_subcommands_can_be_registered(capsys):
    calls = []

    def add_arguments(parser):
        parser.add_argument("--name", default="x")

    cli.register_subcommand("hello", "say hello", add_arguments, lambda args: calls.append(args.name) or 3)
    try:
        assert cli.main(["hello", "--name", "registers"]) == 3
        assert calls == ["registers"]
    finally:
        del cli.SUBCOMMANDS["hello"]
    assert set(cli.SUBCOMMANDS) >= {"analyze", "corloc"}


def test_only_the_chosen_subcommand_gets_its_arguments(capsys):
    assert cli.chosen_command(["--traceback", "corloc", "--dataset", "d"]) == "corloc"
    assert cli.chosen_command(["--help"]) is None and cli.chosen_command(["bogus", "analyze"]) is None
    parser = cli.build_parser(["corloc"])
    assert parser.parse_args(["corloc", "--dataset", "d"]).dataset == Path("d")
    with pytest.raises(SystemExit):
        parser.parse_args(["analyze", "--output-dir", "o"])  # analyze has no arguments in this parser
    assert "unrecognized arguments: --output-dir" in capsys.readouterr().err
    full = cli.build_parser()  # every subcommand's arguments
    assert full.parse_args(["analyze", "--output-dir", "o"]).output_dir == Path("o")


@pytest.mark.slow  # a fresh interpreter imports torch + transformers: ~10-25 s on 2 busy cores
def test_console_script_runs_without_traceback(tmp_path, model_dir, photos):
    script = Path(sys.executable).with_name("vit-registers")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "vit_registers.cli"]
    done = subprocess.run(
        [
            *command,
            "analyze",
            photos["coffee"],
            photos["text"],
            "--model",
            model_dir,
            "--output-dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "notes.png: not an image file" in done.stderr
    assert (tmp_path / "o" / "coffee_pca.png").exists()


@pytest.mark.slow  # a fresh interpreter imports torch + transformers: ~10-25 s on 2 busy cores
def test_readme_command_prints_only_its_own_result(tmp_path, photos):
    """The README's main command (embedded default model) on one photo, where no progress bar is drawn: one result
    line, nothing on stderr. transformers' load report (classifier.* UNEXPECTED), its "Falling back to pil backend"
    notice and its weight-loading bar were printed here."""
    script = Path(sys.executable).with_name("vit-registers")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "vit_registers.cli"]
    out = tmp_path / "demo"
    done = subprocess.run(
        [*command, "analyze", photos["coffee"], "--output-dir", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    assert "UNEXPECTED" not in printed and "Falling back to pil backend" not in printed
    assert done.stderr == ""
    result, verdict = done.stdout.splitlines()  # the result and the outlier verdict
    assert result == f"analysed 1 of 1 image(s); figures and stats in {out}"
    assert verdict.startswith("no high-norm outliers")
