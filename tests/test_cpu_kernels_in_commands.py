"""The package's commands run models with the oneDNN CPU kernels (`vit_registers.onednn.apply_cpu_kernels`) where
this CPU has them, and with the reference model file when `VIT_REGISTERS_CPU_KERNELS=off`: the analysis CLI's one
loader and the Space's (the fine-tuning script's is checked in tests/test_finetune.py)."""

from __future__ import annotations

import argparse

import pytest

from vit_registers import onednn
from vit_registers.pretrained import default_model_path


def expected_kernelized() -> bool:
    policy = onednn.onednn_policy()
    return onednn._ONEDNN_LINEAR is not None and (policy.inference or policy.training)


def kernelized_blocks(model) -> list[bool]:
    return [onednn.is_kernelized(block) for block in model.encoder.layer]


@pytest.mark.parametrize("setting", ["", "off"])
def test_cli_loader_applies_the_cpu_kernels(setting, monkeypatch):
    from vit_registers.cli import load_model_from_args

    monkeypatch.setenv("VIT_REGISTERS_CPU_KERNELS", setting)
    model, _ = load_model_from_args(argparse.Namespace(model=str(default_model_path(4)), device="cpu"))
    blocks = kernelized_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    assert blocks == [expected_kernelized() and setting != "off"] * len(blocks)


@pytest.mark.parametrize("setting", ["", "off"])
def test_space_loader_applies_the_cpu_kernels(setting, monkeypatch):
    from vit_registers.space import ModelStore

    monkeypatch.setenv("VIT_REGISTERS_CPU_KERNELS", setting)
    model, _ = ModelStore(device="cpu")._load(str(default_model_path(0)))
    blocks = kernelized_blocks(model)
    assert blocks == [expected_kernelized() and setting != "off"] * len(blocks)
