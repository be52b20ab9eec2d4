"""Third-party output that is noise in this package's commands, switched off where it is.

transformers draws a "Loading weights" bar for every `from_pretrained` and a "Writing model shards" bar for every
`save_pretrained`, and logs a "LOAD REPORT" table when a classifier is new; `datasets` draws "Generating train split"
bars while it reads a local image folder. For local files these say nothing a command's own output does not, and
`scripts/convert.py` and `scripts/finetune.py` have their own progress bars. Downloads keep their bars: callers use
these only around local reads and writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """transformers' progress bars off inside the block; restored after."""
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars off and its logging at error level inside the block; both restored after."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with transformers_bars_off():
            yield
    finally:
        logging.set_verbosity(verbosity)


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """`datasets`' progress bars off inside the block; restored after."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars:
            datasets.enable_progress_bars()
