"""Benchmarks of vit-registers against transformers and timm on the same weights (issue 3).

Run `python -m benchmarks --help`; `benchmarks/run.py` holds the measurements.
"""
