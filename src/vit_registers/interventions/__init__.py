"""Interventions on a trained model without retraining: test-time registers and token ablations."""

from .ablations import MODES, TokenStatistics, ablate_tokens, calibrate_token_statistics, token_positions
from .test_time_registers import (
    PAPER_SETTINGS,
    RegisterNeurons,
    capture_mlp_activations,
    disable_test_time_registers,
    enable_test_time_registers,
    find_register_neurons,
)

__all__ = [
    "MODES",
    "TokenStatistics",
    "ablate_tokens",
    "calibrate_token_statistics",
    "token_positions",
    "PAPER_SETTINGS",
    "RegisterNeurons",
    "capture_mlp_activations",
    "disable_test_time_registers",
    "enable_test_time_registers",
    "find_register_neurons",
]
