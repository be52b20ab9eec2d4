"""Training step (forward + cross-entropy backward + fused AdamW step) of `ViTRegistersForImageClassification` against
transformers' `Dinov2WithRegistersForImageClassification` (sdpa and eager) on the same weights (issue 5).

transformers' head is a linear layer on concat(CLS, mean of patch tokens) (DINOv2's linear probe), which is our
`pooling="cls_mean"`; the backbone and the classifier weights are copied, so logits, loss and gradients agree before
anything is timed. Each implementation has its own `torch.optim.AdamW(fused=True)` (same hyper-parameters; the fused
kernels are the default optimizer of transformers' `Trainer` and of `vit_registers.training.create_optimizer`; on a
2-core CPU the optimizer step of ViT-S/14 takes 12 ms instead of 69 with torch's foreach default and glibc's malloc
defaults, 15 instead of 33 with the tuned allocator; ViT-B/14 32 instead of 143).
"""

from __future__ import annotations

import torch

from .common import (
    OURS,
    PARITY_ATOL,
    ParityError,
    build_models,
    build_on_meta,
    case_cells,
    markdown_table,
    ratio_text,
    synchronizer,
    time_alternating,
    timing_rows,
    transformers_config,
    transformers_state_dict,
)

IMPLEMENTATIONS = (OURS, "transformers-sdpa", "transformers-eager")
NUM_LABELS = 1000


def build_classifiers(arch: str, image_size: int, seed: int, names=IMPLEMENTATIONS) -> dict[str, torch.nn.Module]:
    """`{name: classifier}` with the same backbone and head weights, in train mode."""
    from transformers import Dinov2WithRegistersForImageClassification

    from vit_registers import ViTRegistersForImageClassification, onednn

    backbone = build_models(arch, image_size, seed, (OURS,))[OURS]
    config = backbone.config.__class__.from_dict(
        {**backbone.config.to_dict(), "pooling": "cls_mean", "num_labels": NUM_LABELS}
    )

    def ours_state(target):
        generator = torch.Generator().manual_seed(seed)
        state = {f"vit_registers.{k}": v.clone() for k, v in backbone.state_dict().items()}
        for key in ("classifier.weight", "classifier.bias"):
            state[key] = 0.02 * torch.randn(target[key].shape, generator=generator)
        return state

    ours = build_on_meta(ViTRegistersForImageClassification, config, ours_state)
    onednn.kernelize(ours)  # as scripts/finetune.py trains on the CPU
    models = {OURS: ours.train()}
    for name in names:
        if name == OURS:
            continue
        if not name.startswith("transformers-"):
            raise ValueError(f"unknown training implementation {name!r}; known: {', '.join(IMPLEMENTATIONS)}")
        hf_config = transformers_config(
            backbone.config, name.split("-", 1)[1], id2label={i: f"LABEL_{i}" for i in range(NUM_LABELS)}
        )

        def state_for(target, prefix="dinov2_with_registers."):
            backbone_keys = {k[len(prefix) :]: v for k, v in target.items() if k.startswith(prefix)}
            state = {prefix + k: v for k, v in transformers_state_dict(backbone, backbone_keys).items()}
            state["classifier.weight"] = ours.classifier.weight.detach().clone()
            state["classifier.bias"] = ours.classifier.bias.detach().clone()
            return state

        models[name] = build_on_meta(Dinov2WithRegistersForImageClassification, hf_config, state_for).train()
    return models


def check_training_parity(
    models: dict[str, torch.nn.Module], image_size: int, seed: int, device: str = "cpu"
) -> dict[str, float]:
    """Max abs difference from ours of the logits and of the patch-embedding and classifier gradients (relative to
    their scale), in float32 on `device`; raise `ParityError` above `PARITY_ATOL`."""
    x, labels = training_batch(2, image_size, seed, device)
    results = {}
    for name, model in models.items():
        model.zero_grad(set_to_none=True)
        out = model(pixel_values=x, labels=labels)
        out.loss.backward()
        patch = next(p for n, p in model.named_parameters() if n.endswith("patch_embeddings.projection.weight"))
        results[name] = (out.logits.detach(), patch.grad.clone(), model.classifier.weight.grad.clone())
        model.zero_grad(set_to_none=True)
    differences = {}
    for name, tensors in results.items():
        if name == OURS:
            continue
        diff = 0.0
        for ours_tensor, other in zip(results[OURS], tensors):
            scale = max(1.0, float(ours_tensor.abs().max()))
            diff = max(diff, float((ours_tensor - other).abs().max()) / scale)
        differences[name] = diff
        if not diff <= PARITY_ATOL:
            raise ParityError(f"{name} differs from {OURS} by {diff:.2e} > {PARITY_ATOL} (logits or gradients)")
    return differences


def training_batch(batch_size: int, image_size: int, seed: int, device: str = "cpu"):
    """`(pixel_values, labels)`: random images and labels drawn from `seed` (on the CPU, so every device gets the same
    values), placed on `device`."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, NUM_LABELS, (batch_size,), generator=generator)
    return x.to(device), labels.to(device)


def training_steps(models: dict[str, torch.nn.Module], labels: torch.Tensor, dtype: str = "float32"):
    """`{name: step(pixel_values)}`: zero_grad, forward with labels, backward, fused AdamW step. With another `dtype`
    than float32 the forward runs under autocast to it (mixed precision: float32 weights and optimizer)."""
    steps = {}
    precision = getattr(torch, dtype)
    for name, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05, fused=True)

        def step(x, model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(x.device.type, dtype=precision, enabled=precision != torch.float32):
                loss = model(pixel_values=x, labels=labels).loss
            loss.backward()
            optimizer.step()

        steps[name] = step
    return steps


def run(args, context) -> dict:
    rows, parity = [], {}
    batch_size = args.training_batch_size
    for arch in args.archs:
        image_size = args.training_image_size
        models = build_classifiers(arch, image_size, args.seed)
        for model in models.values():
            model.to(args.device)
        parity[f"{arch}@{image_size}"] = check_training_parity(models, image_size, args.seed, args.device)
        x, labels = training_batch(batch_size, image_size, args.seed, args.device)
        times = time_alternating(
            training_steps(models, labels, args.dtype),
            x,
            args.repeats,
            args.warmup,
            grad=True,
            max_seconds=args.max_case_seconds,
            sync=synchronizer(args.device),
        )
        case_rows = timing_rows("training", times, batch_size, arch=arch, image_size=image_size, batch_size=batch_size)
        rows += case_rows
        context.log_rows(format_table(case_rows))
    return {"rows": rows, "parity_max_abs_diff": parity, "markdown": format_table(rows)}


def format_table(rows: list[dict]) -> str:
    body = [
        [
            *case_cells(r),
            f"{r['items_per_s']:.2f}",
            f"{r['median_s']:.3f}",
            ratio_text(r["ratio_ours_over_this"], r.get("ratio_quartiles")),
        ]
        for r in rows
    ]
    return markdown_table(
        ["model", "image", "batch", "implementation", "img/s", "s/step", "ours / this"], body, "lrrlrrr"
    )
