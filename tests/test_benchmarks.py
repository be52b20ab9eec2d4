"""Smoke tests of the benchmark harness (issue 3): same weights everywhere, FLOP count, CLI and JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root

from benchmarks.run import (  # noqa: E402
    IMPLEMENTATIONS,
    build_implementations,
    check_parity,
    forward_flops,
    main,
    to_transformers,
)
from vit_registers import ViTRegistersConfig, ViTRegistersModel  # noqa: E402


def test_every_implementation_gets_the_same_weights():
    forwards, config = build_implementations("tiny", 28, seed=0)
    assert set(forwards) == set(IMPLEMENTATIONS)
    differences = check_parity(forwards, 28, seed=1)
    assert set(differences) == set(IMPLEMENTATIONS) - {"vit-registers"}
    assert max(differences.values()) < 1e-5

    # The check notices an implementation with other weights.
    broken = dict(forwards)
    broken["timm"] = lambda x: forwards["timm"](x) + 0.01
    with pytest.raises(RuntimeError, match="not the same weights"):
        check_parity(broken, 28, seed=1)


@pytest.mark.parametrize("cls_position", [True, False])
def test_to_transformers_reproduces_our_tokens(cls_position):
    config = ViTRegistersConfig(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_register_tokens=4, layerscale_value=0.5, cls_token_has_position_embedding=cls_position,
    )
    torch.manual_seed(0)
    ours = ViTRegistersModel(config).eval()
    with torch.no_grad():
        for parameter in ours.parameters():  # non-trivial values everywhere (zero-initialised tokens included)
            parameter.add_(0.1 * torch.randn_like(parameter))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = ours(pixel_values=x).last_hidden_state
        for attention in ("sdpa", "eager"):
            hf = to_transformers(ours, attention)
            torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, expected, atol=1e-5, rtol=1e-5)


def test_forward_flops_match_torch_flop_counter():
    _, config = build_implementations("tiny", 28, seed=0, names=("vit-registers",))
    ours = ViTRegistersModel(config).eval()
    hf = to_transformers(ours, "eager")  # eager attention: every product is a visible matmul
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        hf(pixel_values=torch.randn(3, 3, 28, 28))
    assert counter.get_total_flops() == forward_flops(config, 3, 28)
    # Registers add tokens, so FLOPs grow with them.
    assert forward_flops(config, 1, 28, 0) < forward_flops(config, 1, 28, 4) < forward_flops(config, 1, 28, 16)


def test_cli_smoke_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--archs", "tiny", "--image-sizes", "28", "--batch-sizes", "2", "--repeats", "2", "--warmup", "1"]
    assert main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| ViT-tiny reg4 | 28² | 2 | timm |" in printed and "Cost of registers" in printed
    result = json.loads(out.read_text())
    rows = {row["implementation"]: row for row in result["forward"]}
    assert set(rows) == set(IMPLEMENTATIONS)
    assert rows["vit-registers"]["ratio_ours_over_this"] == pytest.approx(1.0)
    for row in rows.values():
        assert row["images_per_s"] > 0 and len(row["times_s"]) == 2
        assert row["ratio_ours_over_this"] == pytest.approx(row["median_s"] / rows["vit-registers"]["median_s"])
    assert [r["registers"] for r in result["registers"]] == [0, 1, 4, 16]
    assert result["gemm_peak_gflops"] > 0 and result["machine"]["torch"] == torch.__version__

    assert main(["--archs", "L/99"]) == 2
    assert "unknown arch" in capsys.readouterr().err
    assert main(["--archs", "tiny", "--image-sizes", "30"]) == 2
