"""Conversion front end (issue 4): verification, atomic output, model cards and publishing over real HTTP.

Reference models have random weights and are saved to real files in the test's tmp dir; the Hub is the local server of
`tests/hub_server.py` on 127.0.0.1 driven by the real `huggingface_hub` client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vit_registers
from vit_registers import ViTRegistersConfig, ViTRegistersModel
from vit_registers.conversion import ConversionError, publish
from vit_registers.conversion.publish import (
    ParityError,
    build_model_card,
    convert_and_publish,
    fixed_inputs,
    push_folder,
    verify,
    write_output,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "convert.py"
WIDTH, HEADS = 128, 2  # heads = width // 64, the convention shapes cannot contradict

# Runs python with `vit_registers` made unimportable (the editable install's finder is bypassed by a meta-path
# finder placed first), so `trust_remote_code` must load the code files shipped in the repo.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "vit_registers" or name.startswith("vit_registers."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None
    sys.meta_path.insert(0, _Block())
    try:
        import vit_registers
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("vit_registers is still importable")
    """
)


def run_python(code: str, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=os.environ.copy(),
    )


def run_script(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=os.environ.copy(),
    )


def tiny_model(**overrides) -> ViTRegistersModel:
    torch.manual_seed(0)
    config = ViTRegistersConfig(
        **{
            **dict(
                image_size=28,
                patch_size=14,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_register_tokens=4,
            ),
            **overrides,
        }
    )
    return ViTRegistersModel(config).eval()


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (LayerNorm/LayerScale included) so that a wrong mapping cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return module


def assert_nothing_written(tmp_path: Path, output: Path) -> None:
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")], "staging dir left"


# ----------------------------------------------------------------------------------------------------------------------
# Source checkpoints with random weights, on disk
# ----------------------------------------------------------------------------------------------------------------------
TIMM_ARCHS = {  # name: patch size
    "vit_small_patch14_reg4_dinov2": 14,
    "deit3_small_patch16_224": 16,
    "vit_base_patch16_reg4_gap_256": 16,
}


def timm_checkpoint(tmp_path: Path, arch: str, suffix: str = ".safetensors") -> Path:
    import timm

    patch = TIMM_ARCHS[arch]
    model = timm.create_model(
        arch,
        pretrained=False,
        embed_dim=WIDTH,
        depth=2,
        num_heads=HEADS,
        img_size=patch * 4,
        patch_size=patch,
        num_classes=0,
    )
    state = {k: v.contiguous() for k, v in randomize_(model).state_dict().items()}
    path = tmp_path / f"{arch}{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    return path


def official_dinov2_checkpoint(tmp_path: Path, registers: int, grid: int = 4, depth: int = 2) -> Path:
    """A state dict with the key names and layout of facebookresearch/dinov2's hub checkpoints, saved as .pth."""
    generator = torch.Generator().manual_seed(registers)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    d = WIDTH
    state = {
        "cls_token": rand(1, 1, d),
        "pos_embed": rand(1, 1 + grid * grid, d),
        "mask_token": rand(1, d),
        "patch_embed.proj.weight": rand(d, 3, 14, 14),
        "patch_embed.proj.bias": rand(d),
        "norm.weight": rand(d),
        "norm.bias": rand(d),
    }
    if registers:
        state["register_tokens"] = rand(1, registers, d)
    for i in range(depth):
        block = {
            "norm1.weight": rand(d),
            "norm1.bias": rand(d),
            "attn.qkv.weight": rand(3 * d, d),
            "attn.qkv.bias": rand(3 * d),
            "attn.proj.weight": rand(d, d),
            "attn.proj.bias": rand(d),
            "ls1.gamma": rand(d),
            "norm2.weight": rand(d),
            "norm2.bias": rand(d),
            "mlp.fc1.weight": rand(4 * d, d),
            "mlp.fc1.bias": rand(4 * d),
            "mlp.fc2.weight": rand(d, 4 * d),
            "mlp.fc2.bias": rand(d),
            "ls2.gamma": rand(d),
        }
        state.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    path = tmp_path / f"dinov2_reg{registers}.pth"
    torch.save(state, path)
    return path


def transformers_checkpoint(tmp_path: Path, registers: bool) -> Path:
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    common = dict(
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH,
        image_size=56,
        patch_size=14,
    )
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    path = tmp_path / ("hf-dinov2-reg" if registers else "hf-dinov2")
    randomize_(model).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Each source family converts and verifies
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(TIMM_ARCHS))
def test_timm_family_converts_and_verifies(tmp_path, arch):
    checkpoint = timm_checkpoint(tmp_path, arch)
    result = convert_and_publish(
        "timm", checkpoint, arch=arch, output_dir=tmp_path / "out", progress=False, log=lambda _: None
    )
    report = result.report
    assert report.passed and len(report.rows) == 2
    (h1, w1), (h2, w2) = [(r.height, r.width) for r in report.rows]
    assert h1 == w1 and h2 != w2  # stored grid, then a non-square size
    for group in ("cls", "registers", "patches"):
        expected_none = (group == "cls" and "gap" in arch) or (group == "registers" and "reg" not in arch)
        assert (report.max_abs_diff(group) is None) == expected_none
        if not expected_none:
            assert report.max_abs_diff(group) <= 1e-4
    files = {p.name for p in result.output_dir.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "configuration_vit_registers.py",
        "modeling_vit_registers.py",
    } <= files
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_vit_registers.ViTRegistersModel"
    processor = json.loads((result.output_dir / "preprocessor_config.json").read_text())
    import timm

    pretrained_cfg = timm.models.get_pretrained_cfg(arch)
    assert processor["image_mean"] == pytest.approx(list(pretrained_cfg.mean))
    assert processor["crop_size"]["height"] == pretrained_cfg.input_size[1]


@pytest.mark.parametrize("registers", [4, 0])
def test_official_dinov2_converts_and_verifies(tmp_path, registers):
    checkpoint = official_dinov2_checkpoint(tmp_path, registers)
    result = convert_and_publish("dinov2", checkpoint, output_dir=tmp_path / "out", progress=False, log=lambda _: None)
    assert result.report.passed
    assert result.report.max_abs_diff("patches") <= 1e-4
    assert (result.report.max_abs_diff("registers") is None) == (registers == 0)
    if registers == 0:  # the reference lacks DINOv2's 0.1 offset: the resized row says how it was checked
        assert result.report.rows[1].note and not result.report.rows[0].note
    processor = json.loads((result.output_dir / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 256} and processor["crop_size"] == {"height": 224, "width": 224}
    assert processor["resample"] == 3 and processor["image_std"] == pytest.approx([0.229, 0.224, 0.225])


@pytest.mark.slow  # ViT-S/14 at 518×518 and 378×518, both implementations (~30 s on 2 busy cores)
def test_official_dinov2_real_size_by_hub_name(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "WIDTH", 384)
    checkpoint = official_dinov2_checkpoint(tmp_path, 4, grid=37, depth=12)
    result = convert_and_publish(
        "dinov2", checkpoint, arch="dinov2_vits14_reg", output_dir=tmp_path / "out", progress=False, log=lambda _: None
    )
    assert [(r.height, r.width) for r in result.report.rows] == [(518, 518), (378, 518)]
    assert result.report.passed and result.report.max_abs_diff("registers") <= 1e-4
    config = json.loads((result.output_dir / "config.json").read_text())
    assert (config["num_attention_heads"], config["interpolate_antialias"], config["num_register_tokens"]) == (
        6,
        True,
        4,
    )
    card = (result.output_dir / "README.md").read_text()
    assert "base_model: facebook/dinov2-with-registers-small" in card and "| 378×518 |" in card


@pytest.mark.parametrize("registers", [True, False])
def test_transformers_family_converts_and_verifies(tmp_path, registers):
    checkpoint = transformers_checkpoint(tmp_path, registers)
    result = convert_and_publish(
        "transformers", checkpoint, output_dir=tmp_path / "out", progress=False, log=lambda _: None
    )
    assert result.report.passed and result.report.max_abs_diff("cls") <= 1e-4
    processor = json.loads((result.output_dir / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 64}  # copied from the source directory


def _script_main(*argv: str) -> int:
    """`scripts/convert.py`'s `main` in this process (no interpreter start-up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(argv))


def test_the_output_and_the_card_say_which_resampling_and_convert_offers_the_official_one(tmp_path, capsys):
    """transformers' `Dinov2Model` resamples with offset 0, official DINOv2 with 0.1: the default keeps the source's,
    `--interpolation official` the official formula (checked against it in test_parity); both are named."""
    checkpoint = transformers_checkpoint(tmp_path, registers=False)
    assert (
        _script_main("--source", "transformers", "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "a"))
        == 0
    )
    printed = capsys.readouterr().out
    assert "as transformers' `Dinov2Model` does, not with the official DINOv2 formula" in printed
    assert "`--interpolation official` converts with that one" in printed
    card = (tmp_path / "a" / "README.md").read_text()
    assert (
        "embeddings are resampled away from the stored 4×4 patch grid with bicubic, no antialias, offset 0, as "
        "transformers' `Dinov2Model` does" in " ".join(card.split())
    )
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["interpolate_antialias"], config["interpolate_offset"]) == (False, 0.0)

    argv = ["--source", "transformers", "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "b")]
    assert _script_main(*argv, "--interpolation", "official") == 0
    printed, err = capsys.readouterr()
    assert "Loading weights" not in err and "Writing model shards" not in err  # transformers' bars: off
    assert "offset 0.1: the official DINOv2 formula for models without registers, not transformers'" in printed
    assert "interpolate_antialias=False, interpolate_offset=0.0" in printed  # how the resized row was verified
    card = " ".join((tmp_path / "b" / "README.md").read_text().split())
    assert "the official DINOv2 formula for models without registers" in card and "`interpolate_offset`" in card
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (config["interpolate_antialias"], config["interpolate_offset"]) == (False, 0.1)

    with_registers = transformers_checkpoint(tmp_path, registers=True)
    result = convert_and_publish(
        "transformers", with_registers, output_dir=tmp_path / "c", interpolation="official", progress=False, log=print
    )
    assert result.report.passed and not any(row.note for row in result.report.rows)  # official = transformers here
    assert "the official DINOv2 formula for models with registers, which transformers'" in capsys.readouterr().out


def test_verify_measures_every_token_group():
    model = tiny_model()
    reference = tiny_model()

    class Reference(torch.nn.Module):  # a foreign-looking reference: transformers-style output
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, pixel_values):
            return self.inner(pixel_values)

    with torch.no_grad():
        reference.embeddings.register_tokens[0, 2, 0] += 0.5  # one channel of one register drifts
    report = verify(model, Reference(reference), resolutions=[(28, 28), (28, 42)])
    assert not report.passed
    assert all(row.max_abs_diff["registers"] > 1e-4 for row in report.rows)
    assert "FAIL" in report.to_markdown() and "28×42" in report.to_markdown()
    same = verify(model, Reference(tiny_model()), resolutions=[(28, 28), (28, 42)])
    assert same.passed and same.max_abs_diff("patches") == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: clear message, non-zero exit, nothing written or pushed
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # three interpreter start-ups with torch + transformers + timm (~10 s each on 2 busy cores)
def test_cli_bad_inputs_exit_nonzero_and_write_nothing(tmp_path):
    output = tmp_path / "out"
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02 definitely not a checkpoint" * 10)
    good = timm_checkpoint(tmp_path, "vit_small_patch14_reg4_dinov2")
    cases = [
        (
            [
                "--source",
                "timm",
                "--checkpoint",
                str(tmp_path / "missing.pth"),
                "--arch",
                "vit_small_patch14_reg4_dinov2",
            ],
            "not found",
        ),
        (["--source", "dinov2", "--checkpoint", str(corrupt)], "corrupt"),
        (["--source", "timm", "--checkpoint", str(good), "--arch", "vit_no_such_model"], "unknown timm architecture"),
    ]
    for args, message in cases:
        done = run_script(*args, "--output-dir", str(output))
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("error: ") and message in lines[-1].lower(), done.stderr
        assert "Traceback" not in done.stderr
        assert_nothing_written(tmp_path, output)


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.parametrize(
    "case",
    [
        "missing_file",
        "other_architecture",
        "missing_key",
        "unexpected_key",
        "shape_mismatch",
        "unknown_official_arch",
        "unknown_source",
    ],
)
def test_library_bad_inputs_raise_and_write_nothing(tmp_path, case):
    source, arch = "timm", "vit_small_patch14_reg4_dinov2"
    state = _state(timm_checkpoint(tmp_path, arch))
    if case == "missing_file":
        output = tmp_path / "out"
        with pytest.raises(ConversionError, match="not found"):
            convert_and_publish(source, tmp_path / "nope.pth", arch=arch, output_dir=output, progress=False)
        assert_nothing_written(tmp_path, output)
        return
    if case == "other_architecture":
        import timm

        state = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
        message = "not part of"
    elif case == "missing_key":
        del state["blocks.1.mlp.fc2.weight"]
        message = "missing"
    elif case == "unexpected_key":
        state["blocks.0.attn.extra.weight"] = torch.zeros(3)
        message = "blocks.0.attn.extra.weight"
    elif case == "shape_mismatch":
        state["blocks.1.mlp.fc2.bias"] = torch.zeros(WIDTH + 1)
        message = "shape"
    elif case == "unknown_official_arch":
        source, arch = "dinov2", "dinov2_vitx14"
        state = torch.load(official_dinov2_checkpoint(tmp_path, 4), weights_only=True)
        message = "dinov2_vitx14"
    else:
        source, message = "caffe", "unknown source"
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    output = tmp_path / "out"
    with pytest.raises(ConversionError) as error:
        convert_and_publish(source, path, arch=arch, output_dir=output, progress=False, log=lambda _: None)
    assert message in str(error.value).lower() or message in str(error.value)
    assert_nothing_written(tmp_path, output)


def test_parity_failure_writes_and_pushes_nothing(tmp_path, hub_server, monkeypatch):
    arch = "vit_small_patch14_reg4_dinov2"
    checkpoint = timm_checkpoint(tmp_path, arch)
    real_build_reference = publish.build_reference

    def drifting_reference(*args, **kwargs):  # a reference that disagrees slightly (1e-2 on one bias entry)
        reference = real_build_reference(*args, **kwargs)
        with torch.no_grad():
            reference.blocks[1].mlp.fc2.bias[0] += 1e-2
        return reference

    monkeypatch.setattr(publish, "build_reference", drifting_reference)
    output, lines = tmp_path / "out", []
    before = len(hub_server.repos)
    with pytest.raises(ParityError, match="Parity check failed"):
        convert_and_publish(
            "timm",
            checkpoint,
            arch=arch,
            output_dir=output,
            push_to_hub="test-org/never",
            progress=False,
            log=lines.append,
        )
    assert any("FAIL" in line for line in lines)  # the per-group diffs were printed
    assert_nothing_written(tmp_path, output)
    assert len(hub_server.repos) == before and ("model", "test-org/never") not in hub_server.repos


def test_existing_output_and_interrupted_write_leave_no_partial_output(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert_and_publish("timm", tmp_path / "whatever.pth", output_dir=occupied, progress=False)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]

    class ExplodingCard:
        def save(self, path):
            Path(path).write_text("half")
            raise KeyboardInterrupt

    output = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_output(output, tiny_model(), model_card=ExplodingCard())
    assert_nothing_written(tmp_path, output)

    written = write_output(tmp_path / "sharded", tiny_model(), max_shard_size="20KB", dtype="bfloat16")
    assert (written / "model.safetensors.index.json").exists()
    assert len(list(written.glob("model-*.safetensors"))) > 1
    assert json.loads((written / "config.json").read_text())["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------------------------------------------------
# Publishing over real HTTP
# ----------------------------------------------------------------------------------------------------------------------
def test_push_and_load_back_with_and_without_package(tmp_path, hub_server):
    from huggingface_hub import HfApi, ModelCard
    from transformers import AutoImageProcessor, AutoModel

    model = tiny_model()
    randomize_(model, seed=3)
    report = verify(model, model, resolutions=[(28, 28), (28, 42)])
    card = build_model_card(
        model,
        report,
        source="timm",
        arch="vit_small_patch14_reg4_dinov2",
        repo_id="test-org/tiny-registers",
        base_model="timm/vit_small_patch14_reg4_dinov2.lvd142m",
    )
    processor, _ = publish.make_image_processor("dinov2")
    folder = write_output(tmp_path / "tiny", model, processor, card)
    info = push_folder(folder, "test-org/tiny-registers", private=True)
    assert hub_server.repo("test-org/tiny-registers").private
    assert hub_server.repo("test-org/tiny-registers").branches["main"] == info.oid
    remote = HfApi().list_repo_files("test-org/tiny-registers")
    assert {"model.safetensors", "config.json", "README.md", "modeling_vit_registers.py"} <= set(remote)
    assert hub_server.repo("test-org/tiny-registers").resolve("main").files["model.safetensors"].lfs_sha256

    pixel_values = fixed_inputs(model.config, (28, 42), batch_size=2, seed=1)
    with torch.no_grad():
        expected = model(pixel_values)

    loaded = AutoModel.from_pretrained("test-org/tiny-registers", cache_dir=tmp_path / "cache").eval()
    assert type(loaded) is vit_registers.ViTRegistersModel
    with torch.no_grad():
        got = loaded(pixel_values)
    for name in ("last_hidden_state", "pooler_output", "register_tokens", "patch_tokens"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=1e-6)
    assert AutoImageProcessor.from_pretrained("test-org/tiny-registers", cache_dir=tmp_path / "cache").crop_size == {
        "height": 224,
        "width": 224,
    }

    card = ModelCard.load("test-org/tiny-registers")
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert card.data.base_model == "timm/vit_small_patch14_reg4_dinov2.lvd142m"
    assert "registers-4" in card.data.tags
    assert "| 28×42 |" in card.text and "trust_remote_code=True" in card.text and "darcet2024vision" in card.text

    inputs, outputs = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(pixel_values, inputs)
    code = BLOCK_PACKAGE + textwrap.dedent(
        """
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained("test-org/tiny-registers", trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            out = model(torch.load(sys.argv[1]))
        torch.save({k: out[k] for k in ("last_hidden_state", "register_tokens", "patch_tokens")}, sys.argv[2])
        """
    )
    done = run_python(code, str(inputs), str(outputs))
    assert done.returncode == 0, done.stderr[-3000:]
    remote_outputs = torch.load(outputs)
    for name, value in remote_outputs.items():
        torch.testing.assert_close(value, getattr(expected, name), rtol=0, atol=1e-6)
    assert not [r for r in hub_server.responses if r[2] >= 500]


def test_cli_converts_and_pushes_over_http(tmp_path, hub_server):
    from transformers import AutoModel

    arch = "vit_small_patch14_reg4_dinov2"
    checkpoint = timm_checkpoint(tmp_path, arch, suffix=".pth")
    output = tmp_path / "converted"
    done = run_script(
        "--source",
        "timm",
        "--checkpoint",
        str(checkpoint),
        "--arch",
        arch,
        "--output-dir",
        str(output),
        "--push-to-hub",
        "test-user/cli-model",
        "--dtype",
        "bfloat16",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for group in ("cls", "registers", "patches"):
        assert group in done.stdout
    assert hub_server.token not in done.stdout + done.stderr
    for path in output.iterdir():
        assert hub_server.token.encode() not in path.read_bytes()
    remote = hub_server.head_files("test-user/cli-model")
    assert remote["config.json"] == (output / "config.json").read_bytes()
    assert remote["model.safetensors"] == (output / "model.safetensors").read_bytes()

    import timm
    from safetensors.torch import load_file

    reference = timm.create_model(
        arch,
        pretrained=False,
        embed_dim=WIDTH,
        depth=2,
        num_heads=HEADS,
        img_size=56,
        patch_size=14,
        num_classes=0,
        dynamic_img_size=True,
    )
    reference.load_state_dict(torch.load(checkpoint, weights_only=True))
    loaded = AutoModel.from_pretrained("test-user/cli-model", cache_dir=tmp_path / "cache")
    assert loaded.dtype == torch.bfloat16
    pixel_values = fixed_inputs(loaded.config, (56, 42), seed=5)
    with torch.no_grad():
        ours = loaded.float()(pixel_values).patch_tokens
        theirs = reference.forward_features(pixel_values)[:, reference.num_prefix_tokens :]
    # bfloat16 storage: equal to the reference up to bf16 rounding of the weights
    torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.05)
    assert load_file(output / "model.safetensors")["embeddings.cls_token"].dtype == torch.bfloat16


def test_push_with_rejected_token_fails_before_converting(tmp_path, hub_server):
    output = tmp_path / "out"
    with pytest.raises(ConversionError, match="rejected the token") as error:
        convert_and_publish(
            "timm",
            tmp_path / "not-even-read.pth",
            output_dir=output,
            push_to_hub="test-org/x",
            token="hf_wrong",
            progress=False,
        )
    assert "hf_wrong" not in str(error.value)
    with pytest.raises(ConversionError, match="ORG/NAME"):
        convert_and_publish("timm", tmp_path / "x.pth", output_dir=output, push_to_hub="no-namespace", progress=False)
    assert_nothing_written(tmp_path, output)
    assert ("model", "test-org/x") not in hub_server.repos
