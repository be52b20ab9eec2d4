"""Benchmarks of vit-registers against transformers and timm on the same weights (issue 3).

Run `python -m benchmarks --help`. `run.py` is the entry point; `common.py` builds the identical-weight models and
times them; one module per section (`forward`, `memory` (+ conversion), `attention`, `training`, `interventions`,
`analysis`). See README.md in this folder for the method.
"""
