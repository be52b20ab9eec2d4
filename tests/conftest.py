"""Shared pytest setup.

`hub_server` (tests/hub_server.py) starts a local Hub-compatible server and sets `HF_ENDPOINT` and
`HF_HUB_DISABLE_XET=1` at import; importing it here runs that before any test module imports `huggingface_hub`.

`VIT_REGISTERS_CPU_ALLOCATOR=off`: tests that call `vit_registers.cli.main` in this process must not tune its glibc
allocator (a tuning cannot be undone, and later benchmark smoke tests report glibc's defaults); tests of the tuning run
fresh processes without the variable (tests/test_cpu_allocator.py).
"""

import os
import sys
from pathlib import Path

os.environ["VIT_REGISTERS_CPU_ALLOCATOR"] = "off"
sys.path.insert(0, str(Path(__file__).parent))

from hub_server import hub_server  # noqa: E402,F401  (fixture)
