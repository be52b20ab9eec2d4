"""oneDNN CPU kernels for `ViTRegistersLayer`: the same block, faster on x86 CPUs, outside the model file.

The model file (`modeling_vit_registers.py`, what `trust_remote_code` users download) holds only the reference block
in plain PyTorch. This module swaps each block's `forward` for `OneDNNViTRegistersLayer.forward`, per instance, the
way the `kernels` package's `kernelize` does for layers marked with transformers' `use_kernel_forward_from_hub`
(`ViTRegistersLayer` carries that mark): a stateless layer class whose `forward` has the reference signature, bound to
the existing module, falling back to the reference wherever it does not apply. `kernels` itself is not used: the
transformers this project pins accepts only `kernels` >= 0.18.2, which its package index does not serve, and a
`kernels` layer repository must be a built kernel; the hook has the same shape so that it can move there.

    from vit_registers import onednn
    onednn.kernelize(model)          # every ViTRegistersLayer of `model`; returns how many
    onednn.prepack_weights(model)    # optional: oneDNN-packed weights for CPU inference (a second copy)
    onednn.kernelize(model, enable=False)  # back to the reference forward

The `vit-registers` command and `scripts/finetune.py` apply it on the CPU (`apply_cpu_kernels`; opt out with
`VIT_REGISTERS_CPU_KERNELS=off`).

What it does: the block's four matrix products run in PyTorch's oneDNN kernels (`mkldnn._linear_pointwise`) with the
bias added in the product's epilogue, where `F.linear` first copies the bias into the output and then runs MKL's GEMM;
without gradients the MLP activation and (without LayerScale) the residual addition join the epilogue too, saving a
pass over memory each. Gradients go through `_OneDNNLinearFunction` (oneDNN forward, the usual products backward), with
LayerScale folded into the output products' weights and the residual in their epilogue; under torch.compile without
gradients the products are opaque custom ops and Inductor fuses the rest. It steps aside (reference forward) wherever it
could change more than speed: not float32 on the CPU, autocast, hooks or replaced forwards on the block's modules,
adapters or non-plain weights, compiled training, export or tracing, `torch.backends.mkldnn.enabled` off. oneDNN sums
the products in another order than MKL, so results differ from the reference by float32 rounding only (tests compare
every token and every gradient). Which parts are used depends on the CPU's vector instructions (`onednn_policy`):
each is on only where it was measured faster than the plain path (docs/cpu-performance.md, benchmarks/).
"""

from __future__ import annotations

import inspect
import os
import weakref
from functools import partial
from types import MethodType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .modeling_vit_registers import (
    ViTRegistersDropPath,
    ViTRegistersLayer,
    ViTRegistersLayerScale,
    ViTRegistersMLP,
    ViTRegistersSwiGLU,
    ViTRegistersTestTimeRegisters,
)

_ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


class OneDNNPolicy(NamedTuple):
    """Which parts of the oneDNN path a block uses."""

    inference: bool  # products without gradients (bias, and without LayerScale the residual, in the epilogue)
    fused_activation: bool  # the MLP activation in fc1's epilogue too (without gradients)
    training: bool  # products with gradients (`_OneDNNLinearFunction`)
    # oneDNN inference products only for blocks whose input has at least this many elements (token rows × width),
    # unless the block's weights are prepacked: below it, oneDNN reordering the plain weight on every call costs more
    # than its kernel gains, so the block takes ATen's products and keeps the rest of its fused path
    min_inference_work: int = 0


# by ATen's CPU capability (`torch.backends.cpu.get_cpu_capability()`), from ViT-S/B/14 forward and training steps
# against the plain path on 2-core EPYC VMs (benchmarks/, README). AVX-512 (measured on Zen 4; applied to every CPU
# with AVX-512, Intel's included): gains in all three. AVX2 (measured on Zen 3): gains in products at batch 8 and 518²
# but loses 10-15 % on fc1 with oneDNN's GELU epilogue and ~5 % on a training step, so there the activation runs after
# the product and training keeps the plain path; with plain weights, oneDNN products lost to the plain ones at
# 261 × 384 (S/14 224² b1: the whole forward 4-5 % slower) and won from 261 × 768 (B/14 224² b1) and 522 × 384 up.
# Other instruction sets (ARM, older x86): the plain path.
_ONEDNN_POLICIES = {
    "AVX512": OneDNNPolicy(inference=True, fused_activation=True, training=True),
    "AVX2": OneDNNPolicy(inference=True, fused_activation=False, training=False, min_inference_work=512 * 384),
}
_NO_ONEDNN = OneDNNPolicy(inference=False, fused_activation=False, training=False)
_CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()


def onednn_policy() -> OneDNNPolicy:
    """The parts of the oneDNN path used on this CPU (see `_ONEDNN_POLICIES`); none without PyTorch's oneDNN op."""
    if _ONEDNN_LINEAR is None:
        return _NO_ONEDNN
    return _ONEDNN_POLICIES.get(_CPU_CAPABILITY, _NO_ONEDNN)


# config.hidden_act -> (oneDNN post-op, algorithm); other activations run after an unfused product
_ONEDNN_ACTIVATIONS = {
    "gelu": ("gelu", "none"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
    "silu": ("swish", ""),
    "swish": ("swish", ""),
}
# config.hidden_act -> the same activation in place (where the policy leaves it out of the epilogue)
_INPLACE_ACTIVATIONS = {
    "gelu": lambda hidden: torch.ops.aten.gelu_(hidden),
    "gelu_pytorch_tanh": lambda hidden: torch.ops.aten.gelu_(hidden, approximate="tanh"),
    "relu": torch.relu_,
    "silu": lambda hidden: F.silu(hidden, inplace=True),
    "swish": lambda hidden: F.silu(hidden, inplace=True),
}


class _OneDNNLinearFunction(torch.autograd.Function):
    """`F.linear(inputs, weight, bias)`, plus `residual` when given, with a oneDNN forward product (the residual added
    in its epilogue); backward: `grad @ weight` in oneDNN, `gradᵀ @ inputs` and the bias sum as `F.linear`'s backward
    does them (differentiable ops under `create_graph`), and the residual's gradient is the output's."""

    @staticmethod
    def forward(
        ctx, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        ctx.save_for_backward(inputs, weight)
        ctx.has_bias = bias is not None
        if residual is None:
            return _ONEDNN_LINEAR(inputs, weight, bias, "none", [], "")
        return _ONEDNN_LINEAR.binary(inputs, residual, weight, bias, "add")

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        inputs, weight = ctx.saved_tensors
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_inputs = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled():  # create_graph=True: keep the backward itself differentiable
                grad_inputs = grad @ weight
            else:
                grad_inputs = _ONEDNN_LINEAR(grad, weight.t(), None, "none", [], "")
            grad_inputs = grad_inputs.reshape(inputs.shape)
        if ctx.needs_input_grad[1]:
            flat = inputs.reshape(-1, inputs.shape[-1])
            if torch.is_grad_enabled() or weight.shape[1] <= weight.shape[0]:
                grad_weight = grad.t() @ flat
            else:  # wide inputs (fc2): oneDNN's product is the faster one here
                grad_weight = _ONEDNN_LINEAR(grad.t(), flat.t(), None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        grad_residual = grad_output if len(ctx.needs_input_grad) > 3 and ctx.needs_input_grad[3] else None
        return grad_inputs, grad_weight, grad_bias, grad_residual


def _opaque_onednn_ops():
    """`(linear, linear_add)`: the oneDNN products as opaque custom ops for torch.compile (Inductor lowers
    `mkldnn._linear_pointwise` only for frozen weights; an opaque op keeps the product and lets Inductor fuse the rest
    around it). Registered once per process, also when this file is imported a second time as remote code."""
    namespace = torch.ops.vit_registers
    if _ONEDNN_LINEAR is None or hasattr(namespace, "onednn_linear"):
        return getattr(namespace, "onednn_linear", None), getattr(namespace, "onednn_linear_add", None)

    def linear(inputs, weight, bias, post_op, algorithm):
        return _ONEDNN_LINEAR(inputs.contiguous(), weight, bias, post_op, [], algorithm)

    def linear_add(inputs, other, weight, bias):
        return _ONEDNN_LINEAR.binary(inputs.contiguous(), other.contiguous(), weight, bias, "add")

    linear_op = torch.library.custom_op(
        "vit_registers::onednn_linear",
        linear,
        mutates_args=(),
        schema="(Tensor inputs, Tensor weight, Tensor? bias, str post_op, str algorithm) -> Tensor",
    )
    linear_op.register_fake(lambda inputs, weight, *_: inputs.new_empty((*inputs.shape[:-1], weight.shape[0])))
    add_op = torch.library.custom_op(
        "vit_registers::onednn_linear_add",
        linear_add,
        mutates_args=(),
        schema="(Tensor inputs, Tensor other, Tensor weight, Tensor? bias) -> Tensor",
    )
    add_op.register_fake(lambda inputs, other, *_: other.new_empty(other.shape))
    return namespace.onednn_linear, namespace.onednn_linear_add


_COMPILED_LINEAR, _COMPILED_LINEAR_ADD = _opaque_onednn_ops()


# Prepacked weights (opt-in: `ViTRegistersPreTrainedModel.prepack_weights`). Given a plain (out, in) weight, oneDNN
# reorders it into its blocked layout on every product; a copy packed once per `nn.Linear` skips that, at the cost of
# a second copy of the block weights. The pack records the weight it was made from (address, version counter, shape,
# dtype) and is remade when that changes: in-place updates (optimizer steps, `load_state_dict`) bump the version
# counter, replaced tensors change the address. Writes through `.data` bypass the version counter: call
# `prepack_weights()` again after those. Packs are only read by products without gradients outside torch.compile.
_REORDER_WEIGHT = getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)
_PACKED_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # nn.Linear -> (weight key, packed weight)


def _weight_key(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype


def _pack(linear: nn.Linear) -> torch.Tensor:
    with torch.no_grad():
        packed = _REORDER_WEIGHT(linear.weight.detach(), None)
    _PACKED_WEIGHTS[linear] = (_weight_key(linear.weight), packed)
    return packed


def _inference_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight for a oneDNN product without gradients: the packed copy where `linear` has one (remade if the
    weight changed since), else the plain weight."""
    entry = _PACKED_WEIGHTS.get(linear)
    if entry is None:
        return linear.weight
    key, packed = entry
    return packed if key == _weight_key(linear.weight) else _pack(linear)


def onednn_linear(
    inputs: torch.Tensor, linear: nn.Linear, post_op: str = "none", algorithm: str = "", plain: bool = False
) -> torch.Tensor:
    """`post_op(linear(inputs))` as one oneDNN product (see `onednn_product`), from the packed weight where `linear`
    has one. `plain`: ATen's product instead (`OneDNNPolicy.min_inference_work`), without post-op."""
    if plain:
        if post_op != "none":
            raise ValueError("a plain product has no post-op: apply the activation after it")
        return F.linear(inputs, linear.weight, linear.bias)
    return onednn_product(inputs, _product_weight(linear), linear.bias, post_op=post_op, algorithm=algorithm)


def onednn_linear_add(
    inputs: torch.Tensor, residual: torch.Tensor, linear: nn.Linear, plain: bool = False
) -> torch.Tensor:
    """`residual + linear(inputs)` as one oneDNN product, the residual added in its epilogue (see `onednn_product`).
    `plain`: ATen's product, then the residual added in place on its output (no gradients)."""
    if plain:
        return F.linear(inputs, linear.weight, linear.bias).add_(residual)
    return onednn_product(inputs, _product_weight(linear), linear.bias, residual)


def _product_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight a oneDNN product of `linear` reads: the packed copy for eager products without gradients (see
    `_inference_weight`), the parameter itself for differentiable and compiled ones."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return linear.weight
    return _inference_weight(linear)


def onednn_product(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    post_op: str = "none",
    algorithm: str = "",
) -> torch.Tensor:
    """`post_op(F.linear(inputs, weight, bias))`, or `residual + F.linear(inputs, weight, bias)`, as one oneDNN
    product of an explicit weight (a parameter, its packed copy, or one with LayerScale folded in): differentiable
    with gradients (`post_op="none"` only), the opaque custom ops under torch.compile without them, PyTorch's oneDNN
    op otherwise."""
    if residual is not None and post_op != "none":
        raise ValueError("a oneDNN product takes either a post-op or a residual, not both")
    if torch.is_grad_enabled():
        if post_op != "none":
            raise ValueError("oneDNN post-ops have no gradient: apply the activation after the product")
        return _OneDNNLinearFunction.apply(inputs, weight, bias, residual)
    if torch.compiler.is_compiling():
        if residual is None:
            return _COMPILED_LINEAR(inputs, weight, bias, post_op, algorithm)
        return _COMPILED_LINEAR_ADD(inputs, residual, weight, bias)
    if residual is None:
        return _ONEDNN_LINEAR(inputs, weight, bias, post_op, [], algorithm)
    return _ONEDNN_LINEAR.binary(inputs, residual, weight, bias, "add")


def _plain_float32_cpu_linear(linear: nn.Module) -> bool:
    """Whether `linear` is a plain `nn.Linear` (no adapter) whose weight is a plain float32 CPU tensor (no DTensor,
    quantized or other subclass): what the oneDNN path and its packs can take."""
    if type(linear) is not nn.Linear:
        return False
    weight = linear.weight
    plain_tensor = type(weight) in (nn.Parameter, torch.Tensor)
    return plain_tensor and weight.dtype == torch.float32 and weight.device.type == "cpu"


def _onednn_path_available(hidden_states: torch.Tensor) -> bool:
    """Whether a block may take the oneDNN path for `hidden_states` (the conditions that do not depend on the block)."""
    if _ONEDNN_LINEAR is None or not torch.backends.mkldnn.enabled:
        return False
    if hidden_states.device.type != "cpu" or hidden_states.dtype != torch.float32:
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_exporting():
        return False  # exported and traced graphs stay with portable ATen ops
    if torch.compiler.is_compiling() and torch.is_grad_enabled():
        return False  # compiled training: AOTAutograd differentiates the plain ops and fuses on its own
    if torch.is_autocast_enabled("cpu"):
        return False
    module_hooks = torch.nn.modules.module
    return not (module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks)


def products(layer: ViTRegistersLayer) -> tuple[nn.Module, ...]:
    """A block's four matrix products (qkv, proj, fc1, fc2): what the oneDNN path runs and `prepack_weights` packs."""
    return layer.attention.qkv, layer.attention.proj, layer.mlp.fc1, layer.mlp.fc2


def _stochastic_modules(layer: ViTRegistersLayer) -> tuple[nn.Module, ...]:
    """The modules between the output products and the residual that may draw random masks."""
    return layer.attention.proj_dropout, layer.mlp.dropout, layer.drop_path


def _drops(module: nn.Module) -> bool:
    """Whether a dropout or drop-path module (or `nn.Identity`) changes its input in its current mode."""
    if isinstance(module, nn.Dropout):
        return module.training and module.p > 0
    if isinstance(module, ViTRegistersDropPath):
        return module.training and module.drop_prob > 0
    return False


def can_use_onednn(layer: ViTRegistersLayer, hidden_states: torch.Tensor) -> bool:
    """Whether this call of `layer` may take the oneDNN path: float32 on the CPU, plain `nn.Linear` weights, the
    package's own submodules, and nothing (hooks, replaced forwards, adapters) expecting the regular submodule calls."""
    if not _onednn_path_available(hidden_states):
        return False
    policy = onednn_policy()
    # train mode counts as training also without gradients (a reentrant checkpoint's first pass), so that the
    # forward and its recomputation take the same path
    if not (policy.training if layer.training or torch.is_grad_enabled() else policy.inference):
        return False
    mlp = layer.mlp
    if type(mlp) not in (ViTRegistersMLP, ViTRegistersSwiGLU) or type(mlp.activation) is not _activation_type(mlp):
        return False  # a replaced MLP or activation module: the oneDNN path picks the activation by name
    if type(mlp.test_time_registers) is not ViTRegistersTestTimeRegisters:
        return False
    # replaced LayerScale, dropout or drop-path modules: the oneDNN path folds, skips or fuses these by their type
    if not all(type(m) in (ViTRegistersLayerScale, nn.Identity) for m in (layer.layer_scale1, layer.layer_scale2)):
        return False
    if not all(type(m) in (nn.Dropout, ViTRegistersDropPath, nn.Identity) for m in _stochastic_modules(layer)):
        return False
    for name, module in layer.named_modules():
        if name and (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__):
            return False
    return all(_plain_float32_cpu_linear(linear) for linear in products(layer))


_ACTIVATION_TYPES: dict[str, type] = {}


def _activation_type(mlp: ViTRegistersMLP) -> type:
    """The module type `ACT2FN` gives for the MLP's activation name (a different type: the module was replaced)."""
    if mlp.hidden_act not in _ACTIVATION_TYPES:
        _ACTIVATION_TYPES[mlp.hidden_act] = type(ACT2FN[mlp.hidden_act])
    return _ACTIVATION_TYPES[mlp.hidden_act]


def _mlp_hidden_units(mlp: ViTRegistersMLP, hidden_states: torch.Tensor, plain: bool = False) -> torch.Tensor:
    """`mlp.activate(mlp.fc1(hidden_states))` with fc1 as a oneDNN product (ATen's with `plain`). Without gradients
    the activation joins the product's epilogue where `onednn_policy` fuses it, and otherwise runs in place on the
    product's output, so only one `(tokens, mlp_hidden_size)` tensor is alive either way."""
    scratch = not mlp.gated and not torch.is_grad_enabled()  # fc1's output is ours to overwrite
    fuse = scratch and onednn_policy().fused_activation and not plain
    post_op = _ONEDNN_ACTIVATIONS.get(mlp.hidden_act) if fuse else None
    in_place = _INPLACE_ACTIVATIONS.get(mlp.hidden_act) if scratch else None
    if post_op is not None:
        return mlp.test_time_registers(onednn_linear(hidden_states, mlp.fc1, *post_op))
    if in_place is not None:
        return mlp.test_time_registers(in_place(onednn_linear(hidden_states, mlp.fc1, plain=plain)))
    return mlp.activate(onednn_linear(hidden_states, mlp.fc1, plain=plain))


def onednn_block_forward(
    layer: ViTRegistersLayer,
    hidden_states: torch.Tensor,
    output_attentions: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The block with oneDNN products (the reference arithmetic up to float32 rounding). With gradients, in training
    mode or with a dropout or drop-path module drawing masks (Monte Carlo dropout in eval mode) see
    `_training_block_forward`; otherwise the activation and the residual move into the products' epilogues, or,
    below the policy's `min_inference_work` without prepacked weights, the products are ATen's with the activation
    and the residual in place after them."""
    if layer.training or torch.is_grad_enabled() or any(_drops(m) for m in _stochastic_modules(layer)):
        return _training_block_forward(layer, hidden_states, output_attentions, position_embeddings)
    attention, mlp = layer.attention, layer.mlp
    plain = hidden_states.numel() < onednn_policy().min_inference_work and attention.qkv not in _PACKED_WEIGHTS
    qkv = onednn_linear(layer.norm1(hidden_states), attention.qkv, plain=plain)
    attended, weights = attention.attend(qkv, output_attentions, position_embeddings)
    del qkv
    hidden_states = _inference_residual(hidden_states, attended.contiguous(), attention.proj, layer.layer_scale1, plain)
    del attended
    activations = _mlp_hidden_units(mlp, layer.norm2(hidden_states), plain)
    hidden_states = _inference_residual(hidden_states, activations, mlp.fc2, layer.layer_scale2, plain)
    return hidden_states, weights


def _training_block_forward(
    layer: ViTRegistersLayer,
    hidden_states: torch.Tensor,
    output_attentions: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`onednn_block_forward` with gradients, in train mode or with active dropout: the reference arithmetic
    (dropout and drop path drawn in the same order) with oneDNN products, LayerScale folded into the output products'
    weights (`(γ ⊙ W) x + γ ⊙ b`: weight-sized products in forward and backward instead of activation-sized ones) and
    the residual added in their epilogue wherever no dropout or drop path draws a mask between them."""
    attention, mlp = layer.attention, layer.mlp
    qkv = onednn_linear(layer.norm1(hidden_states), attention.qkv)
    attended, weights = attention.attend(qkv, output_attentions, position_embeddings)
    del qkv
    hidden_states = _training_residual(
        layer, hidden_states, attended.contiguous(), attention.proj, layer.layer_scale1, attention.proj_dropout
    )
    del attended  # free the attention output before the MLP, where activation memory peaks
    activations = mlp.dropout(_mlp_hidden_units(mlp, layer.norm2(hidden_states)))
    hidden_states = _training_residual(layer, hidden_states, activations, mlp.fc2, layer.layer_scale2, mlp.dropout)
    return hidden_states, weights


def _training_residual(
    layer: ViTRegistersLayer,
    residual: torch.Tensor,
    inputs: torch.Tensor,
    linear: nn.Linear,
    layer_scale: nn.Module,
    dropout: nn.Module,
) -> torch.Tensor:
    """`residual + drop_path(layer_scale(dropout(linear(inputs))))` as one oneDNN product where it can be."""
    weight, bias = linear.weight, linear.bias
    if isinstance(layer_scale, ViTRegistersLayerScale):
        weight = weight * layer_scale.gamma[:, None]
        bias = None if bias is None else bias * layer_scale.gamma
    if not (_drops(dropout) or _drops(layer.drop_path)):
        return onednn_product(inputs, weight, bias, residual)
    return residual + layer.drop_path(dropout(onednn_product(inputs, weight, bias)))


def _inference_residual(
    residual: torch.Tensor, inputs: torch.Tensor, linear: nn.Linear, layer_scale: nn.Module, plain: bool = False
) -> torch.Tensor:
    """`residual + layer_scale(linear(inputs))` (no gradients): one pass after the product with LayerScale, none
    without it (oneDNN adds the residual in the epilogue; a `plain` product gets it in place)."""
    if isinstance(layer_scale, ViTRegistersLayerScale):
        return torch.addcmul(residual, onednn_linear(inputs, linear, plain=plain), layer_scale.gamma)
    return onednn_linear_add(inputs, residual, linear, plain)


class OneDNNViTRegistersLayer(nn.Module):
    """The oneDNN forward of `ViTRegistersLayer`, in the shape of a `kernels` layer: stateless, the reference
    `forward` signature, bound to an existing block by `kernelize`. Falls back to the reference forward wherever
    `can_use_onednn` says no."""

    can_torch_compile = True  # the products are opaque custom ops under torch.compile
    has_backward = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if getattr(self, "gradient_checkpointing", False) and self.training:
            # transformers' GradientCheckpointingLayer checkpoints the class's `forward`; one bound to the instance
            # has to do it itself, the same way (the layer's checkpoint function, positional tensors)
            return self._gradient_checkpointing_func(
                partial(onednn_layer_forward, self), hidden_states, output_attentions, position_embeddings
            )
        return onednn_layer_forward(self, hidden_states, output_attentions, position_embeddings)


# the reference block without GradientCheckpointingLayer's checkpointing wrapper (the kernel checkpoints itself)
_REFERENCE_FORWARD = inspect.unwrap(ViTRegistersLayer.forward)


def onednn_layer_forward(
    layer: ViTRegistersLayer,
    hidden_states: torch.Tensor,
    output_attentions: bool = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`onednn_block_forward` where `can_use_onednn`, the reference forward elsewhere."""
    if can_use_onednn(layer, hidden_states):
        return onednn_block_forward(layer, hidden_states, output_attentions, position_embeddings)
    return _REFERENCE_FORWARD(layer, hidden_states, output_attentions, position_embeddings)


def _blocks(model: nn.Module) -> list[ViTRegistersLayer]:
    return [module for module in model.modules() if type(module) is ViTRegistersLayer]


def is_kernelized(layer: nn.Module) -> bool:
    """Whether `layer` runs `OneDNNViTRegistersLayer.forward` (set by `kernelize`)."""
    forward = layer.__dict__.get("forward")
    return isinstance(forward, MethodType) and forward.__func__ is OneDNNViTRegistersLayer.forward


def kernelize(model: nn.Module, enable: bool = True) -> int:
    """Bind `OneDNNViTRegistersLayer.forward` to every `ViTRegistersLayer` of `model` (`enable=False`: back to the
    reference forward). Returns the number of blocks changed. The kernel decides per call whether it applies, so a
    kernelized model can still move to another device or dtype, take hooks or be exported: it then runs the
    reference forward. As with the `kernels` package, the bound forward refers back to its block (a reference
    cycle): a kernelized model is freed by Python's cyclic garbage collector, not the moment its last name goes."""
    blocks = _blocks(model)
    for block in blocks:
        if enable:
            block.forward = MethodType(OneDNNViTRegistersLayer.forward, block)
        else:
            block.__dict__.pop("forward", None)
    return len(blocks)


def apply_cpu_kernels(model: nn.Module) -> int:
    """What the package's commands do after loading a model: `kernelize` it when it sits on the CPU and oneDNN's
    path is on for this CPU, unless `VIT_REGISTERS_CPU_KERNELS=off`. Returns the number of blocks kernelized."""
    if os.environ.get("VIT_REGISTERS_CPU_KERNELS", "").strip().lower() in ("off", "0", "false", "no"):
        return 0
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu" or _ONEDNN_LINEAR is None:
        return 0
    policy = onednn_policy()
    if not (policy.inference or policy.training):
        return 0
    return kernelize(model)


def prepack_weights(model: nn.Module, enable: bool = True) -> int:
    """Keep each block's matrix-product weights also in oneDNN's packed layout for CPU inference.

    Faster products without gradients on CPUs whose `onednn_policy()` uses oneDNN for inference (oneDNN then skips
    reordering the weight on every call) for a second copy of the block weights in memory; used by kernelized blocks
    (`kernelize`). Gradients, torch.compile and other devices keep using the plain weights. A weight that changes in
    place or is replaced is packed again on its next use; after writes through `.data` call this again.
    `enable=False` drops the packs. Returns the number of weights packed (0 where oneDNN inference is off).
    """
    linears = [linear for block in _blocks(model) for linear in products(block)]
    for linear in linears:
        _PACKED_WEIGHTS.pop(linear, None)
    if not enable or _REORDER_WEIGHT is None or not onednn_policy().inference:
        return 0
    packable = [linear for linear in linears if _plain_float32_cpu_linear(linear)]
    for linear in packable:
        _pack(linear)
    return len(packable)


__all__ = [
    "OneDNNPolicy",
    "OneDNNViTRegistersLayer",
    "apply_cpu_kernels",
    "can_use_onednn",
    "is_kernelized",
    "kernelize",
    "onednn_policy",
    "prepack_weights",
]
