"""Start-up of the `vit-registers` CLI: importing it, `--help` and the start of each subcommand import only what they
use. torch, transformers (with the accelerate and scipy it imports itself) are needed by the model classes, which the
package imports to register the Auto classes; everything below is imported by the subcommand that uses it."""

import json
import subprocess
import sys
import textwrap

import pytest

NEVER_AT_START = [
    "gradio",
    "datasets",
    "evaluate",
    "sklearn",
    "timm",
    "skimage",
    "pandas",
    "pyarrow",
    "vit_registers.study",
    "vit_registers.training",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "vit_registers.features",
]
FOR_ANALYSIS = ["matplotlib", "vit_registers.space", "vit_registers.analysis.figures"]

STEPS = textwrap.dedent(
    """
    import contextlib, io, json, sys

    names = json.loads(sys.argv[1])
    loaded = {}
    import vit_registers.cli as cli
    import transformers

    loaded["import"] = [name for name in names if name in sys.modules]
    loaded["auto_config"] = type(transformers.AutoConfig.for_model("vit_registers")).__name__

    def run(step, *argv):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                code = cli.main(list(argv))
            except SystemExit as exit:
                code = exit.code
        loaded[step] = [name for name in names if name in sys.modules]
        loaded[step + " exit"] = [code, err.getvalue()]

    missing = sys.argv[2] + "/missing"
    run("--help", "--help")
    run("corloc", "corloc", "--dataset", missing)
    run("find-register-neurons", "find-register-neurons", "--images", missing, "--output-dir", missing)
    run("study --help", "study", "--help")
    run("analyze", "analyze", missing + ".png", "--output-dir", missing, "--rule", "absolute")
    run("demo --help", "demo", "--help")
    print(json.dumps(loaded))
    """
)


@pytest.mark.slow  # a fresh interpreter imports torch + transformers: ~10-25 s on 2 busy cores
def test_cli_start_imports_only_what_the_subcommand_uses(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", STEPS, json.dumps(NEVER_AT_START + FOR_ANALYSIS), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert loaded["auto_config"] == "ViTRegistersConfig"  # importing the package still registers the Auto classes
    for step in ("import", "--help", "corloc", "find-register-neurons", "study --help"):
        assert loaded[step] == [], step
    assert loaded["corloc exit"][0] == 1 and "not a directory" in loaded["corloc exit"][1]
    code, stderr = loaded["find-register-neurons exit"]
    assert code == 1 and "is not a directory" in stderr
    # analyze draws figures (matplotlib) but reads no bundled photo (skimage) when given images; the demo's
    # arguments come from vit_registers.space, gradio is imported only when the demo starts
    assert loaded["analyze exit"][0] == 1 and "--rule absolute needs --threshold" in loaded["analyze exit"][1]
    assert not set(loaded["analyze"]) & set(NEVER_AT_START)
    assert loaded["demo --help exit"][0] == 0
    assert not set(loaded["demo --help"]) & set(NEVER_AT_START)
