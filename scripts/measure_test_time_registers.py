"""Compare the test-time-register edits (`mode="reference"`, the authors' code; `mode="per_neuron"`) on real models.

For each model: register neurons are found once on the photos (`find_register_neurons`, as the package and as the
authors search), then each edit is applied with the same neurons, and the script reports, over the photos, what the
README states: the patch norms (largest / median, and how many patches stay above the discovery threshold at the
detection layer), the norm of the test-time register, where the CLS token of the last layer attends (the register;
the patches that were outliers without the edit; the largest patch share relative to a uniform map), and how far
the CLS output moves (cosine with the unedited model).

    python scripts/measure_test_time_registers.py                      # embedded model without registers
    python scripts/measure_test_time_registers.py --dinov2 ../shared/real-weights/dinov2-small-imgfocus
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image
from skimage import color, data

from vit_registers.analysis.images import prepare_with_processor
from vit_registers.analysis.loading import load_model
from vit_registers.interventions import disable_test_time_registers, enable_test_time_registers, find_register_neurons
from vit_registers.pretrained import default_model_path

PHOTOS = (  # scikit-image's photos that ship with it (no download)
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "camera",
    "grass",
    "gravel",
    "brick",
    "coins",
    "moon",
    "clock",
)


def photos() -> list[np.ndarray]:
    images = [getattr(data, name)() for name in PHOTOS]
    images.append(data.stereo_motorcycle()[0])
    return [color.gray2rgb(image) if image.ndim == 2 else image[..., :3] for image in images]


def pixels_for(model, processor, short_side: int) -> torch.Tensor:
    patch = model.config.patch_size
    prepared = [
        prepare_with_processor(
            Image.fromarray(image), processor, patch, square=True, short_side=short_side
        ).pixel_values
        for image in photos()
    ]
    return torch.stack(prepared)


@torch.no_grad()
def measure(model, pixels, detection_layer: int, threshold: float, reference=None) -> dict:
    """The numbers of one variant; `reference` (the unedited run's outputs) gives the outlier positions and CLS."""
    config = model.config
    out = model(pixels, output_hidden_states=True, attention_layers=[-1])
    slices = config.token_slices(out.hidden_states[-1].shape[1])
    patches = slices["patches"][0]
    extra = slices["registers"][1]
    last = out.hidden_states[-1][:, patches].norm(dim=-1)
    detected = out.hidden_states[detection_layer + 1][:, patches].norm(dim=-1)
    cls_attention = out.attentions[-1].mean(dim=1)[:, 0]  # (batch, tokens), heads averaged
    patch_attention = cls_attention[:, patches]
    result = {
        "max/median patch norm, last layer": float((last.amax(1) / last.median(1).values).mean()),
        "max/median patch norm, detection layer": float((detected.amax(1) / detected.median(1).values).mean()),
        "patches above threshold, detection layer": int((detected > threshold).sum()),
        "largest CLS attention to a patch / uniform": float(
            (patch_attention.amax(1) * patch_attention.shape[1]).mean()
        ),
    }
    if config.num_test_time_registers:
        result["test-time register norm, last layer"] = float(out.hidden_states[-1][:, extra].norm(dim=-1).mean())
        result["CLS attention to the test-time register"] = float(cls_attention[:, extra].sum(1).mean())
    if reference is not None:
        outliers = reference["outliers"]
        mass = (patch_attention * outliers).sum(1)
        result["CLS attention to the unedited outlier patches"] = float(mass.mean())
        cosine = torch.nn.functional.cosine_similarity(out.pooler_output, reference["cls"], dim=-1)
        result["cosine of the CLS output with the unedited model"] = float(cosine.mean())
    else:
        result["CLS attention to the unedited outlier patches"] = float(
            (patch_attention * (detected > threshold)).sum(1).mean()
        )
    return result, {"outliers": (detected > threshold).float(), "cls": out.pooler_output}


def compare(name: str, model, processor, short_side: int, top_k: int, percentile: float) -> dict:
    model = model.eval()
    pixels = pixels_for(model, processor, short_side)
    depth = model.config.num_hidden_layers
    detection_layer = depth - 2
    report = {"model": name, "images": int(pixels.shape[0]), "input": list(pixels.shape[-2:]), "searches": {}}
    for search, options in (
        ("package (patch norms)", {}),
        ("authors (all tokens, sparsity filter)", dict(norm_tokens="all", sparsity_filter=True)),
    ):
        disable_test_time_registers(model)
        found = find_register_neurons(model, [pixels], top_k=top_k, percentile=percentile, **options)
        plain, reference = measure(model, pixels, detection_layer, found.threshold)
        rows = {"none": plain}
        for mode in ("per_neuron", "reference"):
            enable_test_time_registers(model, found, num_tokens=1, mode=mode)
            rows[mode], _ = measure(model, pixels, detection_layer, found.threshold, reference)
        disable_test_time_registers(model)
        report["searches"][search] = {
            "threshold": found.threshold,
            "images_with_outliers": found.images_with_outliers,
            "neurons": {str(layer): units for layer, units in found.neurons.items()},
            "variants": rows,
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dinov2", help="a transformers Dinov2Model directory (converted here) to measure as well")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--percentile", type=float, default=98.0)
    parser.add_argument("--output", help="write the JSON report here too")
    args = parser.parse_args()
    torch.manual_seed(0)
    reports = []
    model, processor = load_model(str(default_model_path(0)), "cpu")
    reports.append(compare("embedded, no registers", model, processor, 128, args.top_k, args.percentile))
    if args.dinov2:
        from vit_registers.conversion import convert

        converted = convert("transformers", args.dinov2).float()
        reports.append(compare("DINOv2-S (real weights)", converted, 224, 224, args.top_k, args.percentile))
    text = json.dumps(reports, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
