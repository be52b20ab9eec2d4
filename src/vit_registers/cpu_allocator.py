"""Keep freed CPU tensor memory in the process for reuse: glibc `mallopt` settings for this package's commands.

glibc returns every allocation above its mmap threshold (adaptive, at most 32 MiB) to the kernel when it is freed,
and trims freed memory from the top of the heap once more than twice that threshold is free. A ViT's activations are
megabytes to hundreds of megabytes, so each forward pass asks the kernel for them again and touches every page anew:
one page fault per 4 KiB, paid by transformers and timm alike (ViT-S/14 at 518², batch 8: 380 000 faults per
forward, 1.5 GB of fresh pages).

`tune_cpu_allocator()` raises both thresholds to `KEEP_BYTES`, so freed tensors stay in the heap and the next forward
reuses pages that are already mapped. On the README's 2-core machine the benchmark's forward section (S/14, 518²,
batch 8, all four implementations in one process) spent 52 s → 5 s and 67 s → 21 s in the kernel in two A/B runs,
and every implementation ran 7-104 % faster; a training step gained 12 % in one pair of runs and nothing in another.
The cost is resident memory: the process keeps what it freed, and glibc 2.36 does not reuse a freed chunk of exactly
the size an aligned allocation asks for, so the heap settles at a few times the largest tensor before it is reused
(S/14 518² batch 8 forward: peak RSS 1108 → 1253 MB; one 64 MiB tensor allocated in a loop: 512 MiB of heap).

Importing `vit_registers` changes nothing; the `vit-registers` command and the fine-tuning script call it at
start-up, `python -m benchmarks --allocator tuned` for every implementation. In your own script call it once, before
the model runs. `VIT_REGISTERS_CPU_ALLOCATOR=off` leaves glibc as it is. Nothing is changed either when another
allocator is preloaded (jemalloc, tcmalloc, mimalloc), when glibc's own variables (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`, `GLIBC_TUNABLES` with `glibc.malloc`) already set the policy, or off glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV_VAR = "VIT_REGISTERS_CPU_ALLOCATOR"
MODES = ("tuned", "off")
KEEP_BYTES = 1 << 30  # allocations and free heap tops up to 1 GiB stay in the process

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_tuned = False


def _glibc():
    """The process's C library when it is glibc (it exports `gnu_get_libc_version` and `mallopt`), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def policy_set_elsewhere() -> str | None:
    """Why the allocator is somebody else's choice (a preloaded allocator, glibc's own variables), or None."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in _PRELOADED_ALLOCATORS:
        if name in preload:
            return f"{name} is preloaded"
    for variable in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        if variable in os.environ:
            return f"{variable} is set"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    return None


def tune_cpu_allocator(mode: str | None = None) -> bool:
    """Keep freed tensor memory in the process (see the module text); True when glibc's settings were changed now or
    earlier in this process.

    `mode`: "tuned" or "off"; None reads `VIT_REGISTERS_CPU_ALLOCATOR` (default "tuned"). An unknown mode raises
    `ValueError` naming the variable."""
    global _tuned
    source = "mode" if mode is not None else ENV_VAR
    value = (mode if mode is not None else os.environ.get(ENV_VAR, "tuned")).strip().lower()
    if value not in MODES:
        raise ValueError(f"{source}={value!r}: expected one of {', '.join(MODES)}")
    if value == "off" or policy_set_elsewhere() is not None:
        return _tuned
    if _tuned:
        return True
    libc = _glibc()
    if libc is None:
        return False
    # mmap threshold first: it also switches off glibc's adaptive thresholds, which would otherwise lower the trim one
    _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
    return _tuned


def cpu_allocator_tuned() -> bool:
    """Whether `tune_cpu_allocator` changed glibc's settings in this process."""
    return _tuned
