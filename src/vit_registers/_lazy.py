"""Names of a package that are imported from their submodule on first use (PEP 562 module `__getattr__`).

A package `__init__` that re-exports a submodule with a heavy dependency (matplotlib, datasets) would otherwise import
it for every user of any sibling submodule, the CLI included.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence


def lazy_names(package: str, exports: Mapping[str, Sequence[str]]) -> tuple[Callable, Callable]:
    """`(__getattr__, __dir__)` for `package` whose names `exports[submodule]` are imported from `.submodule` when
    first read; the value is then stored in the package, so later reads are plain attribute reads."""
    owners = {name: submodule for submodule, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in owners:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{owners[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(owners))

    return __getattr__, __dir__
