"""`vit_registers.cpu_allocator`: freed tensor memory stays mapped (counted in page faults of a fresh process), the
opt-out and the policies set elsewhere are respected, bad values are named, and the entry points apply it."""

from __future__ import annotations

import json
import os
import re
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
# Transparent huge pages are switched off for the process (prctl PR_SET_THP_DISABLE) so that a page is a base page
# whatever the machine's THP policy. The module is loaded from its file (it imports nothing of the package): no
# transformers import per process.
FAULTS = textwrap.dedent("""
    import ctypes, importlib.util, json, resource, sys
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)
    spec = importlib.util.spec_from_file_location("cpu_allocator", sys.argv[2])
    allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(allocator)
    returned = allocator.tune_cpu_allocator(sys.argv[1] if sys.argv[1] != "env" else None)
    state = {"returned": returned, "tuned": allocator.cpu_allocator_tuned(),
             "settings": allocator.cpu_allocator_settings()}
    if sys.argv[3] == "state":
        print(json.dumps(state))
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
    print(json.dumps({**state, "faults": faults, "growth": rss() - kept, "page": resource.getpagesize()}))
""")


def _clean_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD", cpu_allocator.ENV_VAR)
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return {**env, **extra}


def _faults(mode: str, measure: bool = True, **env) -> dict:
    argv = [sys.executable, "-c", FAULTS, mode, cpu_allocator.__file__, "faults" if measure else "state"]
    done = subprocess.run(argv, env=_clean_env(**env), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_glibc
def test_tuned_allocator_reuses_freed_pages_that_glibc_defaults_fault_again():
    tuned = _faults("tuned")
    assert tuned["returned"] and tuned["tuned"]
    assert tuned["settings"]["trim_threshold"] == cpu_allocator.KEEP_BYTES
    if tuned["settings"]["mmap_threshold"] < (64 << 20):  # glibc < 2.35 takes at most 32 MiB
        assert tuned["settings"]["mmap_threshold"] == cpu_allocator.OLD_GLIBC_MMAP_MAX
        pytest.skip("this glibc caps the mmap threshold below the 64 MiB tensor of the test")
    assert tuned["settings"]["mmap_threshold"] == cpu_allocator.KEEP_BYTES
    default = _faults("off")
    assert not default["returned"] and not default["tuned"] and default["settings"] == {}
    pages = 5 * (64 << 20) // tuned["page"]
    assert default["faults"] > pages / 2  # the effect exists here: glibc unmaps the freed 64 MiB each time
    assert tuned["faults"] < pages / 20
    assert tuned["growth"] < (64 << 20) // 8  # kept memory is reused, not added to


@needs_glibc
def test_environment_variable_chooses_and_glibc_variables_win():
    assert _faults("env", measure=False)["tuned"]  # unset: tuned
    assert not _faults("env", measure=False, **{cpu_allocator.ENV_VAR: "off"})["tuned"]
    assert not _faults("env", measure=False, **{cpu_allocator.ENV_VAR: " Off "})["tuned"]
    assert _faults("env", measure=False, **{cpu_allocator.ENV_VAR: ""})["tuned"]  # empty: as unset
    glibc_set = _faults("tuned", MALLOC_MMAP_THRESHOLD_="131072")  # glibc's own variable: its policy stays
    assert not glibc_set["returned"] and glibc_set["settings"] == {}
    assert glibc_set["faults"] > 5 * (64 << 20) // glibc_set["page"] / 2


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "jemalloc is preloaded"),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_ is set"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES sets glibc.malloc.trim_threshold"),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4096"},
            "GLIBC_TUNABLES sets glibc.malloc.mmap_threshold",
        ),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.pthread.rseq=0"}, None),  # other tunables leave it to us
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
    monkeypatch.setenv(cpu_allocator.ENV_VAR, " Fast ")  # the value as given, not as normalised
    with pytest.raises(ValueError, match=r"VIT_REGISTERS_CPU_ALLOCATOR=' Fast ': expected"):
        cpu_allocator.tune_cpu_allocator()
    with pytest.raises(ValueError, match=r"mode='fast'"):
        cpu_allocator.tune_cpu_allocator("fast")
    with pytest.raises(ValueError, match=r"mode=''"):
        cpu_allocator.tune_cpu_allocator("")


def _entry_point(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=_clean_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@needs_glibc
def test_command_line_tunes_before_running_and_reports_a_bad_value(tmp_path):
    code = f"""
        from vit_registers import cli, cpu_allocator
        status = cli.main(["analyze", {str(tmp_path / "missing.png")!r}, "--output-dir", {str(tmp_path / "out")!r}])
        print(status, cpu_allocator.cpu_allocator_tuned())
    """
    done = _entry_point(code)
    assert done.stdout.split()[-2:] == ["1", "True"], done.stdout + done.stderr  # the run failed, after tuning
    demo = _entry_point("""
        from vit_registers import cli, cpu_allocator
        cli.SUBCOMMANDS["demo"].run = lambda args: 0  # the server itself is tested in test_space_browser
        print(cli.main(["demo"]), cpu_allocator.cpu_allocator_tuned())
    """)
    assert demo.stdout.split()[-2:] == ["0", "False"], demo.stdout + demo.stderr  # long-running: glibc's defaults
    bad = _entry_point(code, **{cpu_allocator.ENV_VAR: "fast"})
    assert bad.stdout.split()[-2:] == ["1", "False"]
    assert bad.stderr.strip().splitlines()[-1] == (
        "vit-registers: error: VIT_REGISTERS_CPU_ALLOCATOR='fast': expected one of tuned, off"
    )


def test_finetune_script_reports_a_bad_value_before_writing(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "finetune.py"),
            "--dataset",
            "digits",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        env=_clean_env(**{cpu_allocator.ENV_VAR: "fast"}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "finetune.py: error: VIT_REGISTERS_CPU_ALLOCATOR='fast': expected one of tuned, off"
    )
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_the_test_process_keeps_glibc_defaults():
    """conftest sets the opt-out, so in-process `cli.main` calls leave this process (and the benchmarks run in it)
    with glibc's defaults: a tuning cannot be undone."""
    assert os.environ[cpu_allocator.ENV_VAR] == "off"
    assert not cpu_allocator.cpu_allocator_tuned()


@needs_glibc
def test_benchmarks_run_with_the_tuned_allocator_and_refuse_to_claim_defaults_after(tmp_path):
    code = f"""
        import json, sys
        sys.path.insert(0, ".")
        from benchmarks.run import main
        argv = ["--quick", "--archs", "tiny", "--image-sizes", "28", "--batch-sizes", "1", "--repeats", "1",
                "--warmup", "1", "--threads", "1", "--implementations", "vit-registers", "--sections", "registers"]
        print("tuned", main([*argv, "--allocator", "tuned", "--json", {str(tmp_path / "b.json")!r}]))
        print("glibc", main([*argv, "--allocator", "glibc"]))
    """
    done = _entry_point(code)
    assert "tuned 0" in done.stdout and "glibc 2" in done.stdout, done.stdout + done.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["settings"]["allocator"] == "tuned"
    assert re.fullmatch(  # 32 MiB where glibc < 2.35 caps the mmap threshold
        r"glibc malloc keeping freed memory \(mmap threshold (1024|32) MiB, trim threshold 1024 MiB; "
        r"vit_registers\.cpu_allocator\)",
        result["machine"]["allocator"],
    )
    assert done.stderr.strip().splitlines()[-1] == (
        "benchmarks: error: --allocator glibc: glibc's allocator was already tuned in this process "
        "(vit_registers.cpu_allocator), which cannot be undone; run the benchmarks in a fresh process"
    )
