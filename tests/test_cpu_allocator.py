"""`vit_registers.cpu_allocator`: freed tensor memory stays mapped (counted in page faults of a fresh process), the
opt-out and the policies set elsewhere are respected, bad values are named, and the entry points apply it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vit_registers import cpu_allocator

ROOT = Path(__file__).resolve().parents[1]
GLIBC = cpu_allocator._glibc() is not None
needs_glibc = pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere the module changes nothing")

# In a fresh process: set the mode, then allocate, fill and free a 64 MiB tensor (above glibc's largest adaptive mmap
# threshold, like a ViT-B activation at 518²) five times after twelve warm-ups; count the minor page faults of the five
# and the growth of the resident set over 20 more (freed memory is kept, but reused: it must not keep growing).
# The module is loaded from its file (it imports nothing of the package): no transformers import per process.
FAULTS = textwrap.dedent("""
    import importlib.util, json, resource, sys
    spec = importlib.util.spec_from_file_location("cpu_allocator", sys.argv[2])
    allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(allocator)
    returned = allocator.tune_cpu_allocator(sys.argv[1] if sys.argv[1] != "env" else None)
    if sys.argv[3] == "state":
        print(json.dumps({"returned": returned, "tuned": allocator.cpu_allocator_tuned()}))
        sys.exit()
    import torch
    def fill_and_free(times):
        for _ in range(times):
            tensor = torch.empty(16 << 20).fill_(1.0)
            del tensor
    def rss():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    fill_and_free(12)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fill_and_free(5)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    kept = rss()
    fill_and_free(20)
    print(json.dumps({"returned": returned, "tuned": allocator.cpu_allocator_tuned(), "faults": faults,
                      "growth": rss() - kept}))
""")


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD", cpu_allocator.ENV_VAR)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return {**env, **extra}


def _faults(mode: str, measure: bool = True, **env) -> dict:
    argv = [sys.executable, "-c", FAULTS, mode, cpu_allocator.__file__, "faults" if measure else "state"]
    done = subprocess.run(argv, env=_clean_env(**env), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_glibc
def test_tuned_allocator_reuses_freed_pages_that_glibc_defaults_fault_again():
    default, tuned = _faults("off"), _faults("tuned")
    assert not default["returned"] and not default["tuned"]
    assert tuned["returned"] and tuned["tuned"]
    pages = 5 * (64 << 20) // 4096
    assert default["faults"] > pages / 2  # the effect exists here: glibc unmaps the freed 64 MiB each time
    assert tuned["faults"] < pages / 20
    assert tuned["growth"] < (64 << 20) // 8  # kept memory is reused, not added to


@needs_glibc
def test_environment_variable_chooses_and_glibc_variables_win():
    assert _faults("env", measure=False)["tuned"]  # unset: tuned
    assert not _faults("env", measure=False, **{cpu_allocator.ENV_VAR: "off"})["tuned"]
    assert not _faults("env", measure=False, **{cpu_allocator.ENV_VAR: " Off "})["tuned"]
    glibc_set = _faults("tuned", MALLOC_MMAP_THRESHOLD_="131072")  # glibc's own variable: its policy stays
    assert not glibc_set["returned"] and glibc_set["faults"] > 5 * (64 << 20) // 4096 / 2


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "jemalloc is preloaded"),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_ is set"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES sets glibc.malloc"),
        ({}, None),
    ],
)
def test_policies_set_outside_are_named(monkeypatch, env, reason):
    for name in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cpu_allocator.policy_set_elsewhere() == reason


def test_unknown_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(cpu_allocator.ENV_VAR, "jemalloc")
    with pytest.raises(ValueError, match=r"VIT_REGISTERS_CPU_ALLOCATOR='jemalloc': expected one of tuned, off"):
        cpu_allocator.tune_cpu_allocator()
    with pytest.raises(ValueError, match=r"mode='fast'"):
        cpu_allocator.tune_cpu_allocator("fast")


def _entry_point(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_clean_env(**env), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@needs_glibc
def test_command_line_tunes_before_running_and_reports_a_bad_value(tmp_path):
    code = f"""
        from vit_registers import cli, cpu_allocator
        status = cli.main(["analyze", {str(tmp_path / "missing.png")!r}, "--output-dir", {str(tmp_path / "out")!r}])
        print(status, cpu_allocator.cpu_allocator_tuned())
    """
    done = _entry_point(code)
    assert done.stdout.split()[-2:] == ["1", "True"], done.stdout + done.stderr  # the run failed, after tuning
    bad = _entry_point(code, **{cpu_allocator.ENV_VAR: "fast"})
    assert bad.stdout.split()[-2:] == ["1", "False"]
    assert bad.stderr.strip().splitlines()[-1] == (
        "vit-registers: error: VIT_REGISTERS_CPU_ALLOCATOR='fast': expected one of tuned, off"
    )


def test_finetune_script_reports_a_bad_value_before_writing(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--dataset", "digits", "--output-dir",
         str(tmp_path / "run")], env=_clean_env(**{cpu_allocator.ENV_VAR: "fast"}), capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "finetune.py: error: VIT_REGISTERS_CPU_ALLOCATOR='fast': expected one of tuned, off"
    )
    assert not (tmp_path / "run").exists()  # nothing half-written
