"""Register Explorer, the vit-registers demo Space: a thin launcher around `vit_registers.space`.

Locally: `python spaces/register-explorer/app.py [--model PATH_OR_ID] [--port P]` (or `vit-registers demo`).
On the Hub the package comes from requirements.txt; Spaces set GRADIO_SERVER_NAME/PORT.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:
    import vit_registers  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from vit_registers.space import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
