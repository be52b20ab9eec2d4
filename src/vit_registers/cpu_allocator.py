"""Keep freed CPU tensor memory in the process for reuse: glibc `mallopt` settings for this package's batch commands.

glibc returns every allocation above its mmap threshold (adaptive, at most 32 MiB) to the kernel when it is freed,
and trims freed memory from the top of the heap once more than twice that threshold is free. A ViT's activations are
megabytes to hundreds of megabytes, so each forward pass asks the kernel for them again and touches every page anew:
one page fault per 4 KiB page, paid by transformers and timm alike (ViT-S/14 at 518², batch 8: 380 000 faults per
forward, 1.5 GB of fresh pages).

`tune_cpu_allocator()` raises both thresholds to `KEEP_BYTES` (glibc before 2.35 refuses an mmap threshold above
32 MiB on 64-bit machines; that largest value is set instead and `cpu_allocator_settings()` says so), so freed
tensors stay in the heap and the next forward reuses pages that are already mapped. On the README's 2-core machine
the benchmark's forward section (S/14, 518², batch 8, all four implementations in one process) spent 52 s → 5 s and
67 s → 21 s in the kernel in two A/B runs, and every implementation ran 7-104 % faster; a training step gained 12 %
in one pair of runs and nothing in another.

Limits:
- Resident memory: the process keeps what it freed, and glibc 2.36 does not reuse a freed chunk of exactly the size
  an aligned allocation asks for, so the heap settles at a few times the largest tensor before it is reused (S/14
  518² batch 8 forward: peak RSS 1108 → 1253 MB; one 64 MiB tensor allocated in a loop: 512 MiB of heap). For this
  reason the long-running `vit-registers demo` server is left with glibc's defaults.
- Only the main thread's heap: allocations made in other threads come from glibc's per-thread arenas, which cannot
  hold one block above 64 MiB; those are still mapped and unmapped each time.
- One way: `"off"` leaves glibc as it is but does not undo a tuning done earlier in the same process.

Importing `vit_registers` changes nothing; the `vit-registers` batch subcommands and the fine-tuning script call it
at start-up, `python -m benchmarks --allocator tuned` for every implementation. In your own script call it once,
before the model runs. `VIT_REGISTERS_CPU_ALLOCATOR=off` leaves glibc as it is (unset or empty: tuned). Nothing is
changed either when another allocator is preloaded (jemalloc, tcmalloc, mimalloc), when glibc's own settings
(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `glibc.malloc.mmap_threshold` or `glibc.malloc.trim_threshold`
in `GLIBC_TUNABLES`) already choose the policy, or off glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV_VAR = "VIT_REGISTERS_CPU_ALLOCATOR"
MODES = ("tuned", "off")
KEEP_BYTES = 1 << 30  # allocations and free heap tops up to 1 GiB stay in the process
OLD_GLIBC_MMAP_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # the largest mmap threshold glibc < 2.35 takes

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_PARAMETERS = {"mmap_threshold": _M_MMAP_THRESHOLD, "trim_threshold": _M_TRIM_THRESHOLD}
_PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_GLIBC_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")

_settings: dict[str, int] = {}  # what mallopt accepted in this process, in bytes


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
    """Why the allocator is somebody else's choice (a preloaded allocator, glibc's own settings), or None."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in _PRELOADED_ALLOCATORS:
        if name in preload:
            return f"{name} is preloaded"
    for variable in _GLIBC_VARIABLES:
        if variable in os.environ:
            return f"{variable} is set"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    for tunable in _GLIBC_TUNABLES:
        if f"{tunable}=" in tunables:
            return f"GLIBC_TUNABLES sets {tunable}"
    return None


def _mode(mode: str | None) -> str:
    if mode is not None:
        source, raw = "mode", mode
    else:
        source, raw = ENV_VAR, os.environ.get(ENV_VAR, "")
    value = raw.strip().lower() or ("tuned" if mode is None else "")
    if value not in MODES:
        raise ValueError(f"{source}={raw!r}: expected one of {', '.join(MODES)}")
    return value


def tune_cpu_allocator(mode: str | None = None) -> bool:
    """Keep freed tensor memory in the process (see the module text); True when glibc's mmap threshold was raised
    now or earlier in this process.

    `mode`: "tuned" or "off"; None reads `VIT_REGISTERS_CPU_ALLOCATOR` (unset or empty: "tuned"). An unknown mode
    raises `ValueError` naming the variable and the value given."""
    if _mode(mode) == "off" or policy_set_elsewhere() is not None:
        return cpu_allocator_tuned()
    libc = _glibc()
    if libc is None:
        return False
    # Each call also switches off glibc's adaptive thresholds (which would lower the trim threshold after the first
    # large free); the two are independent, so one refused value does not keep the other from being set.
    for name, parameter in _PARAMETERS.items():
        for size in (KEEP_BYTES, OLD_GLIBC_MMAP_MAX):
            if name not in _settings and libc.mallopt(parameter, size):
                _settings[name] = size
    return cpu_allocator_tuned()


def cpu_allocator_tuned() -> bool:
    """Whether `tune_cpu_allocator` raised glibc's mmap threshold in this process."""
    return "mmap_threshold" in _settings


def cpu_allocator_settings() -> dict[str, int]:
    """The glibc settings `tune_cpu_allocator` made in this process, in bytes (`mmap_threshold`, `trim_threshold`);
    empty when it changed nothing."""
    return dict(_settings)
