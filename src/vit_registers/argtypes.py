"""argparse `type=` helpers shared by the command-line fronts (scripts/, benchmarks/, the `vit-registers` CLI)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def integer_at_least(minimum: int, name: str) -> Callable[[str], int]:
    """A `type=` that accepts integers >= `minimum` and names the rule (`name`, e.g. "positive") otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {name} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {name} integer, got {value}")
        return value

    return parse


positive_int = integer_at_least(1, "positive")
non_negative_int = integer_at_least(0, "non-negative")
