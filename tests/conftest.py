"""Shared pytest setup.

`hub_server` (tests/hub_server.py) starts a local Hub-compatible server and sets `HF_ENDPOINT` and
`HF_HUB_DISABLE_XET=1` at import; importing it here runs that before any test module imports `huggingface_hub`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hub_server import hub_server  # noqa: E402,F401  (fixture)
