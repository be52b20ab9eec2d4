"""Latency of the Register Explorer Space (issue 9): time from request to full result through `/analyze`.

    python -m benchmarks.space_latency                       # the embedded default model(s), else a random ViT-S/14
    python -m benchmarks.space_latency --model PATH --repeats 5 --json space.json

The app is launched on 127.0.0.1 in this process and called with `gradio_client` as a user would be served: upload,
queue, analysis, figure rendering and download of every PNG. The first request (model load, discovery) is reported
apart from the steady state.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _random_model(directory: Path, arch: str) -> str:
    import torch
    from transformers import BitImageProcessor

    from vit_registers import ViTRegistersConfig, ViTRegistersModel

    sizes = {
        "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        "S/14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    }
    torch.manual_seed(0)
    config = ViTRegistersConfig(image_size=224, patch_size=14, num_register_tokens=4, **sizes[arch])
    ViTRegistersModel(config).save_pretrained(directory)
    BitImageProcessor(size={"shortest_edge": 224}).save_pretrained(directory)
    return str(directory)


def measure(url: str, image: str, models: list[str], repeats: int = 3, test_time_registers: bool = False) -> dict:
    """Seconds from request to full result (all PNGs downloaded) for `repeats` requests after a first one."""
    from gradio_client import Client, handle_file

    from vit_registers.space import api_outputs

    client = Client(url, verbose=False)

    def once() -> float:
        start = time.perf_counter()
        result = client.predict(
            handle_file(image), models, test_time_registers, -1, "percentile", 98.0, 150.0, api_name="/analyze"
        )
        elapsed = time.perf_counter() - start
        out = api_outputs(result)
        assert len(out["models"]) == len(models) and all(Path(m["norms"]).stat().st_size > 0 for m in out["models"])
        return elapsed

    first = once()
    times = [once() for _ in range(repeats)]
    return {
        "first_request_s": round(first, 3),
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
        "repeats": repeats,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="PATH_OR_ID",
        help="model(s) to analyse (default: the embedded models, else a random --arch model)",
    )
    parser.add_argument(
        "--arch",
        choices=("tiny", "S/14"),
        default="S/14",
        help="random model used when no model is given and none is embedded (default: S/14)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--test-time-registers", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    import torch

    from vit_registers import space
    from vit_registers.pretrained import default_models

    with tempfile.TemporaryDirectory() as scratch:
        if args.model:
            models, source = {m: m for m in args.model}, "given"
        elif default_models():
            models, source = {k: str(v) for k, v in default_models().items()}, "embedded defaults"
        else:
            models = {f"random {args.arch}": _random_model(Path(scratch) / "model", args.arch)}
            source = f"random {args.arch} (no embedded model yet)"
        demo = space.build_demo(models=models)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        space.launch_demo(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
        try:
            image = space.example_images()[1]  # coffee, 600x400 -> downscaled to 448x299
            result = {
                "models": list(models),
                "source": source,
                "image": Path(image).name,
                "torch_threads": torch.get_num_threads(),
                "max_side": space.DEFAULT_MAX_SIDE,
                **measure(
                    f"http://127.0.0.1:{port}/",
                    image,
                    list(models)[: space.MAX_MODELS],
                    args.repeats,
                    args.test_time_registers,
                ),
            }
        finally:
            demo.close()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
