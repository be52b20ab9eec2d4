"""`vit-registers embed` (issue 22): features of real CIFAR-10 images (`../shared/data/cifar10`) and of an image folder
as sharded Parquet, bad input, SIGKILL + resume, two real `accelerate launch` processes, and the push to the local
Hub-compatible server (tests/hub_server.py, real HTTP).

The model is the embedded 4-register default (128 px input); the data are small slices of CIFAR-10.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import vit_registers.cli as cli
from vit_registers.features.embed import KILL_ENV, MANIFEST
from vit_registers.pretrained import default_model_path

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
BIN = Path(sys.executable).parent
CONFIGS = ROOT / "scripts" / "accelerate_configs"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"), raising=False)


def _slice(path: Path, split: str, count: int, seed: int) -> Path:
    """`count` random rows of a CIFAR-10 split, with its `datasets` feature metadata (Image, ClassLabel)."""
    table = pq.read_table(CIFAR / f"{split}.parquet")
    rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=count, replace=False))
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.take(rows), path / f"{split}.parquet")
    return path / f"{split}.parquet"


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    """A directory with train.parquet (48 rows) and test.parquet (24 rows) cut from the real CIFAR-10 files."""
    root = tmp_path_factory.mktemp("cifar-slice")
    _slice(root, "train", 48, seed=1)
    _slice(root, "test", 24, seed=2)
    return root


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _main(argv, capsys):
    """`vit-registers ARGV` in this process: `(exit code, stdout, stderr)`."""
    _reset_accelerate()
    try:
        code = cli.main([str(a) for a in argv])
    finally:
        _reset_accelerate()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _env(tmp_path, **extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"), OMP_NUM_THREADS="1")
    env.pop(KILL_ENV, None)
    env.update(extra)
    return env


def _cli(argv, tmp_path, launcher=(str(BIN / "vit-registers"),), **env):
    return subprocess.run(
        [*launcher, *map(str, argv)], cwd=ROOT, env=_env(tmp_path, **env), capture_output=True, text=True, timeout=300
    )


def _tables(directory: Path) -> dict[str, dict]:
    """Every shard's columns as NumPy arrays, by file name."""
    found = {}
    for path in sorted((directory / "data").glob("*.parquet")):
        table = pq.read_table(path)
        found[path.name] = {name: np.asarray(table.column(name).to_pylist()) for name in table.column_names}
    return found


def _assert_same_shards(a: Path, b: Path, atol: float = 0.0):
    first, second = _tables(a), _tables(b)
    assert sorted(first) == sorted(second) and first
    for name in first:
        assert first[name].keys() == second[name].keys()
        for column in first[name]:
            np.testing.assert_allclose(first[name][column], second[name][column], atol=atol, rtol=0, err_msg=column)


def test_cifar_features_are_the_models_tokens_and_load_as_a_dataset(tmp_path, cifar, capsys):
    """Shards of 16 rows + the index; `load_dataset(DIR)` gives both splits with ClassLabel labels and row ids;
    every stored feature equals the model's own output on the processor's pixels (float32)."""
    import datasets
    from PIL import Image
    from transformers import AutoImageProcessor

    from vit_registers import ViTRegistersModel

    out = tmp_path / "features"
    argv = ["embed", "--dataset", cifar, "--output", out, "--shard-size", 16, "--batch-size", 6, "--dtype", "float32"]
    code, stdout, stderr = _main(
        [*argv, "--features", "cls,pooled,registers,patch_mean,patches", "--num-workers", 1], capsys
    )
    assert code == 0, stderr
    assert "embedded" in stdout and "img/s" in stdout
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["splits"]["train"]["num_embedded"] == 48 and manifest["splits"]["test"]["num_embedded"] == 24
    assert len(manifest["splits"]["train"]["shards"]) == 3 and manifest["num_processes"] == 1
    assert manifest["features"] == {
        "cls": [128],
        "pooled": [128],
        "registers": [4, 128],
        "patch_mean": [128],
        "patches": [64, 128],
    }
    loaded = datasets.load_dataset(str(out))
    assert set(loaded) == {"train", "test"} and len(loaded["test"]) == 24
    assert loaded["test"].features["label"].names[:2] == ["airplane", "automobile"]
    source = datasets.load_dataset("parquet", data_files=str(cifar / "test.parquet"), split="train")
    test = loaded["test"].with_format("numpy")[:]
    assert test["row"].tolist() == list(range(24))
    assert test["label"].tolist() == list(source["label"])

    path = default_model_path(4)
    model = ViTRegistersModel.from_pretrained(path).eval()
    processor = AutoImageProcessor.from_pretrained(path)
    picked = [0, 17, 23]
    images = [source[i]["image"].convert("RGB") for i in picked]
    assert all(isinstance(image, Image.Image) for image in images)
    with torch.no_grad():
        reference = model(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    expected = {
        "cls": reference.last_hidden_state[:, 0],
        "pooled": reference.pooler_output,
        "registers": reference.register_tokens,
        "patch_mean": reference.patch_tokens.mean(1),
        "patches": reference.patch_tokens,
    }
    for name, values in expected.items():
        stored = test[name][picked]
        np.testing.assert_allclose(stored, values.numpy(), atol=2e-4, rtol=0, err_msg=name)

    # float16 storage: the same numbers rounded
    half = tmp_path / "half"
    code, _, stderr = _main(
        ["embed", "--dataset", cifar / "test.parquet", "--output", half, "--features", "cls", "--num-workers", 0],
        capsys,
    )
    assert code == 0, stderr
    table = pq.read_table(half / "data" / "test-00000-of-00001.parquet")
    assert str(table.schema.field("cls").type.value_type) == "halffloat"
    np.testing.assert_allclose(
        np.asarray(table.column("cls").to_pylist(), dtype=np.float32),
        test["cls"].astype(np.float16).astype(np.float32),
        atol=2e-3,
    )


def test_image_folder_with_an_unreadable_image_skips_and_counts_it_then_evaluates(tmp_path, capsys):
    """An image folder with train/ and test/ (one sub-folder per class): the broken file is skipped, named and counted;
    `eval knn` and `eval linear` run on the result."""
    from vit_registers.training.toy_data import make_image_folder

    folder = tmp_path / "images"
    make_image_folder(folder / "train", classes=("astronaut", "coffee"), per_class=5, size=40, seed=0)
    make_image_folder(folder / "test", classes=("astronaut", "coffee"), per_class=3, size=40, seed=1)
    (folder / "train" / "coffee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    out = tmp_path / "out"
    code, stdout, stderr = _main(["embed", "--dataset", folder, "--output", out, "--num-workers", 1], capsys)
    assert code == 0, stderr
    assert "broken.png" in stderr and "1 unreadable image(s) skipped" in stderr
    manifest = json.loads((out / MANIFEST).read_text())
    info = manifest["splits"]["train"]
    assert info["num_rows"] == 11 and info["num_embedded"] == 10 and manifest["splits"]["test"]["num_embedded"] == 6
    assert len(info["skipped"]) == 1 and "broken.png" in info["skipped"][0]["image"]
    assert manifest["label_names"] == ["astronaut", "coffee"]
    assert manifest["features"] == {"cls": [128], "pooled": [128], "registers": [4, 128], "patch_mean": [128]}
    rows = pq.read_table(out / "data" / "train-00000-of-00001.parquet").column("row").to_pylist()
    assert len(rows) == 10 and info["skipped"][0]["row"] not in rows

    for protocol, extra in (("knn", ["--k", 3]), ("linear", ["--epochs", 3, "--val-fraction", 0.2])):
        code, stdout, stderr = _main(["eval", protocol, "--features", out, "--output-dir", tmp_path, *extra], capsys)
        assert code == 0, stderr
        report = json.loads((tmp_path / f"{protocol}.json").read_text())
        assert report["train"]["rows"] == 10 and report["test"]["rows"] == 6
        assert [r["input"] for r in report["results"]] == ["cls", "cls+patch_mean", "cls+registers", "registers"]


def test_bad_input_gives_one_clear_line(tmp_path, cifar, capsys):
    out = tmp_path / "out"
    cases = [
        (["--dataset", cifar, "--image-column", "picture"], "no image column 'picture'"),
        (["--dataset", cifar, "--label-column", "fine_label"], "no label column 'fine_label'"),
        (["--dataset", cifar, "--split", "validation"], "no split validation"),
        (["--dataset", tmp_path / "nowhere"], "no such file or directory"),
        (["--dataset", cifar, "--model", default_model_path(0), "--features", "registers"], "no registers"),
    ]
    empty = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(cifar / "test.parquet").slice(0, 0), empty)
    cases.append((["--dataset", empty], "is empty"))
    (tmp_path / "no-images").mkdir()
    cases.append((["--dataset", tmp_path / "no-images"], "cannot load --dataset"))
    for argv, message in cases:
        code, _, stderr = _main(["embed", "--output", out, *argv], capsys)
        assert code == 1 and message in stderr, (argv, stderr)
        assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (out / MANIFEST).exists()
    # a directory from another run is not mixed with this one
    code, _, stderr = _main(
        ["embed", "--dataset", cifar / "test.parquet", "--output", out, "--features", "cls"], capsys
    )
    assert code == 0, stderr
    code, _, stderr = _main(
        ["embed", "--dataset", cifar / "test.parquet", "--output", out, "--dtype", "float32"], capsys
    )
    assert code == 1 and "other settings" in stderr and "dtype" in stderr


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, cifar, capsys):
    """A real process SIGKILLs itself after writing its 2nd shard's temporary file (before the rename): one finished
    shard, one half-written file, no index. Rerunning the same command keeps the finished shard, drops the temporary
    file, embeds the rest, and the shards equal those of an uninterrupted run exactly."""
    argv = ["embed", "--dataset", cifar / "train.parquet", "--shard-size", 16, "--batch-size", 8, "--quiet"]
    killed = tmp_path / "killed"
    done = _cli([*argv, "--output", killed], tmp_path, **{KILL_ENV: "temp:2"})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert sorted(p.name for p in (killed / "data").glob("*.parquet")) == ["train-00000-of-00003.parquet"]
    assert [p.name for p in (killed / "data").glob(".*.tmp-*")]  # the half-written shard, under its temporary name
    assert not (killed / MANIFEST).exists()
    first = (killed / "data" / "train-00000-of-00003.parquet").stat().st_mtime_ns

    resumed = _cli([*argv, "--output", killed], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming: 1 of 3 shard(s) already written" in resumed.stdout
    assert (killed / "data" / "train-00000-of-00003.parquet").stat().st_mtime_ns == first  # kept, not redone
    assert not list((killed / "data").glob(".*.tmp-*"))
    manifest = json.loads((killed / MANIFEST).read_text())
    assert manifest["shards_resumed"] == 1 and manifest["images_this_run"] == 32

    straight = tmp_path / "straight"
    code, _, stderr = _main([*argv, "--output", straight], capsys)  # the reference, in this process
    assert code == 0, stderr
    _assert_same_shards(killed, straight)


@pytest.mark.slow
def test_two_real_processes_write_the_features_of_one(tmp_path, cifar, capsys):
    """`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2` (gloo): each process embeds its share
    of the shards, the main one writes one index; the shards equal those of one process."""
    argv = ["embed", "--dataset", cifar, "--shard-size", 16, "--batch-size", 8, "--quiet", "--dtype", "float32"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = (
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        str(BIN / "vit-registers"),
    )
    two = _cli([*argv, "--output", tmp_path / "two"], tmp_path, launcher=launcher, ACCELERATE_USE_CPU="true")
    assert two.returncode == 0, two.stderr[-3000:]
    code, _, stderr = _main([*argv, "--output", tmp_path / "one"], capsys)  # one process: this one
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "two" / MANIFEST).read_text())
    assert manifest["num_processes"] == 2 and "MULTI_CPU" in manifest["distributed_type"]
    writers = manifest["splits"]["train"]["written_by_process"] | manifest["splits"]["test"]["written_by_process"]
    assert set(writers) == {"0", "1"}  # both processes wrote shards
    assert json.loads((tmp_path / "one" / MANIFEST).read_text())["num_processes"] == 1
    _assert_same_shards(tmp_path / "one", tmp_path / "two", atol=1e-5)


def test_push_to_hub_uploads_a_dataset_repo_that_loads_back(tmp_path, cifar, capsys, hub_server, monkeypatch):
    import datasets
    import huggingface_hub.constants
    from huggingface_hub import HfApi, snapshot_download

    monkeypatch.delenv("HF_HUB_OFFLINE")  # the local server is the Hub here (HF_ENDPOINT, tests/hub_server.py)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    out = tmp_path / "out"
    code, stdout, stderr = _main(
        ["embed", "--dataset", cifar / "test.parquet", "--output", out, "--features", "cls,registers"]
        + ["--shard-size", 16, "--push-to-hub", "test-user/cifar-features"],
        capsys,
    )
    assert code == 0, stderr
    assert "pushed to" in stdout
    files = set(HfApi().list_repo_files("test-user/cifar-features", repo_type="dataset"))
    assert {"README.md", MANIFEST, "data/test-00000-of-00002.parquet", "data/test-00001-of-00002.parquet"} <= files
    assert not any(name.startswith(".progress") for name in files)
    local = snapshot_download("test-user/cifar-features", repo_type="dataset", cache_dir=tmp_path / "download")
    remote = datasets.load_dataset(local, split="test").with_format("numpy")[:]
    mine = datasets.load_dataset(str(out), split="test").with_format("numpy")[:]
    assert len(remote["row"]) == 24 and np.array_equal(remote["registers"], mine["registers"])
    assert np.array_equal(remote["label"], mine["label"])
