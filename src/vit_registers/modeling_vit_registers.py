"""PyTorch Vision Transformer with register tokens (Darcet et al., "Vision Transformers Need Registers", ICLR 2024).

Sequence layout in every layer: ``[CLS] + registers + patches (+ test-time registers)``. The registers are learnable
tokens without position embedding that every block processes and that the outputs return separately
(`register_tokens`) instead of hiding them in `last_hidden_state`.

This file is copied next to the weights by ``save_pretrained`` so that ``trust_remote_code=True`` works without the
package: it may import only torch, transformers, the standard library and its sibling configuration file.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BackboneOutput, ImageClassifierOutput
from transformers.utils import ModelOutput

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - transformers < 4.52
    GradientCheckpointingLayer = nn.Module
try:
    from transformers.backbone_utils import BackboneMixin
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers.utils.backbone_utils import BackboneMixin
try:
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4.x
    init = nn.init
try:
    from transformers.utils.generic import can_return_tuple
except ImportError:  # pragma: no cover

    def can_return_tuple(func):
        return func


from .configuration_vit_registers import ViTRegistersConfig


@dataclass
class ViTRegistersModelOutput(ModelOutput):
    """
    Outputs of [`ViTRegistersModel`]. Token tensors below come after the final norm (when the model has one).

    Args:
        last_hidden_state (`(batch, tokens, hidden)`): every token, in sequence order.
        pooler_output (`(batch, hidden)` or `(batch, 2 * hidden)`): as chosen by `config.pooling` (CLS by default).
        register_tokens (`(batch, registers, hidden)`): the trained registers, then any test-time registers.
        patch_tokens (`(batch, patches, hidden)`): patch tokens in raster order (row-major over the patch grid).
        hidden_states (`tuple` of `(batch, tokens, hidden)`): embedding output and the output of every layer,
            *before* the final norm (the paper measures token norms there), when `output_hidden_states=True`.
        attentions (`tuple` of `(batch, heads, tokens, tokens)`): softmax attention weights of the requested layers
            (all layers unless `attention_layers` narrows them), when `output_attentions=True`, under any backend.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    register_tokens: torch.FloatTensor | None = None
    patch_tokens: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return tuple(value) if isinstance(value, Iterable) else (value, value)


class ViTRegistersPatchEmbeddings(nn.Module):
    """Non-overlapping `patch_size` patches → `hidden_size` vectors with one strided convolution."""

    def __init__(self, config: ViTRegistersConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}."
            )
        channels, height, width = pixel_values.shape[1:]
        if channels != self.num_channels:
            raise ValueError(
                f"pixel_values have {channels} channels but the model expects {self.num_channels} "
                f"(config.num_channels)."
            )
        if not torch.compiler.is_compiling():
            if height % self.patch_size or width % self.patch_size:
                raise ValueError(
                    f"Input size {height}x{width} is not a multiple of the patch size {self.patch_size}: resize or "
                    f"crop to multiples of {self.patch_size} (e.g. {height // self.patch_size * self.patch_size}x"
                    f"{width // self.patch_size * self.patch_size})."
                )
        pixel_values = pixel_values.to(self.projection.weight.dtype)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ViTRegistersEmbeddings(nn.Module):
    """Patch embeddings + position embeddings, then the CLS token and the register tokens (no position embedding)."""

    def __init__(self, config: ViTRegistersConfig):
        super().__init__()
        self.config = config
        self.patch_embeddings = ViTRegistersPatchEmbeddings(config)
        self.grid_size = config.image_grid
        hidden = config.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden)) if config.use_cls_token else None
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, hidden)) if config.num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden)) if config.use_mask_token else None
        self.num_position_prefix = int(config.cls_token_has_position_embedding)
        num_positions = self.grid_size[0] * self.grid_size[1] + self.num_position_prefix
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, hidden))
        self.num_test_time_registers = config.num_test_time_registers
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """Patch position embeddings for a `grid_height` x `grid_width` patch grid, `(1, h * w, hidden)`.

        Bicubic resampling in float32, as official DINOv2: with `interpolate_offset > 0` the grid is resampled by
        `scale_factor = (n + offset) / M` (DINO's trick against rounding), else to the output size directly.
        """
        patch_pos = self.position_embeddings[:, self.num_position_prefix :]
        stored_height, stored_width = self.grid_size
        offset = self.config.interpolate_offset
        # Official DINOv2 skips resampling at the stored grid. An exported graph must not branch on the input size,
        # so it always resamples: without offset that is an exact identity at the stored grid.
        if not torch.compiler.is_exporting() and (grid_height, grid_width) == (stored_height, stored_width):
            return patch_pos
        dim = patch_pos.shape[-1]
        grid = patch_pos.float().reshape(1, stored_height, stored_width, dim).permute(0, 3, 1, 2)
        if offset:
            scale = ((grid_height + offset) / stored_height, (grid_width + offset) / stored_width)
            resized = F.interpolate(
                grid, scale_factor=scale, mode="bicubic", align_corners=False, antialias=self.config.interpolate_antialias
            )
        else:
            resized = F.interpolate(
                grid,
                size=(grid_height, grid_width),
                mode="bicubic",
                align_corners=False,
                antialias=self.config.interpolate_antialias,
            )
        return resized.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, dim).to(patch_pos.dtype)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        embeddings = self.patch_embeddings(pixel_values)
        batch_size, _, height, width = pixel_values.shape
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos needs a mask token: this model was built with use_mask_token=False.")
            mask = bool_masked_pos.reshape(batch_size, -1, 1).to(torch.bool)
            if mask.shape[1] != embeddings.shape[1]:
                raise ValueError(
                    f"bool_masked_pos marks {mask.shape[1]} patches but the image has {embeddings.shape[1]}."
                )
            embeddings = torch.where(mask, self.mask_token.to(embeddings.dtype), embeddings)
        patch_size = self.config.patch_size
        embeddings = embeddings + self.interpolate_pos_encoding(height // patch_size, width // patch_size)

        prefix = []
        if self.cls_token is not None:
            cls_token = self.cls_token
            if self.num_position_prefix:
                cls_token = cls_token + self.position_embeddings[:, :1]
            prefix.append(cls_token.expand(batch_size, -1, -1))
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(batch_size, -1, -1))
        suffix = []
        if self.num_test_time_registers:
            suffix.append(embeddings.new_zeros(batch_size, self.num_test_time_registers, embeddings.shape[-1]))
        embeddings = torch.cat([*prefix, embeddings, *suffix], dim=1)
        return self.dropout(embeddings)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ · scaling) v on `(batch, heads, tokens, head_dim)`; returns `(batch, tokens, heads, head_dim)`."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = weights.softmax(dim=-1)
    probs = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, weights


class ViTRegistersAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, dispatched through transformers' attention interface.

    A layer asked for its weights computes them with the eager path; the others keep `config._attn_implementation`.
    """

    def __init__(self, config: ViTRegistersConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.attention_dropout = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        output, weights = self.attend(self.qkv(hidden_states), output_attentions)
        return self.proj_dropout(self.proj(output)), weights

    def attend(self, qkv: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of the fused projection `qkv` `(batch, tokens, 3 * hidden)`: the heads' outputs, merged to
        `(batch, tokens, hidden)`, before `proj`; and the weights when `output_attentions`."""
        batch_size, num_tokens, _ = qkv.shape
        qkv = qkv.reshape(batch_size, num_tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if output_attentions:  # weights asked for this layer: the eager path computes them, other layers stay fast
            attention = eager_attention_forward
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        output = output.reshape(batch_size, num_tokens, self.num_heads * self.head_dim)
        return output, (weights if output_attentions else None)


class ViTRegistersLayerScale(nn.Module):
    """Per-channel residual-branch scale `gamma ⊙ x` (Touvron et al., CaiT §3)."""

    def __init__(self, config: ViTRegistersConfig):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((config.hidden_size,), float(config.layerscale_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.gamma


class ViTRegistersDropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample during training (Huang et al. 2016)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return hidden_states
        keep = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(shape).bernoulli_(keep)
        return hidden_states * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


# ----------------------------------------------------------------------------------------------------------------------
# oneDNN path on the CPU. The block's four matrix products run in PyTorch's oneDNN kernels (`mkldnn._linear_pointwise`)
# with the bias added in the product's epilogue, where `F.linear` first copies the bias into the output and then runs
# MKL's GEMM; without gradients the MLP activation and (without LayerScale) the residual addition join the epilogue
# too, saving a pass over memory each. Gradients go through `_OneDNNLinearFunction` (oneDNN forward, the usual products
# backward), with LayerScale folded into the output products' weights and the residual in their epilogue; under
# torch.compile without gradients the products are opaque custom ops and Inductor fuses the rest.
# Used only where it changes nothing but speed: float32 on the CPU, no autocast, no hooks or replaced forwards on the
# block's modules, plain `nn.Linear` weights, not in compiled training, export or tracing (plain ATen graphs there),
# and `torch.backends.mkldnn.enabled`. oneDNN sums the products in another order than MKL, so results differ from the
# plain path by float32 rounding only (tests compare every token and every gradient). Which parts are used depends on
# the CPU's vector instructions (`onednn_policy`): each is on only for the instruction sets where it was measured faster
# than the plain path.
# ----------------------------------------------------------------------------------------------------------------------
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
        "vit_registers::onednn_linear", linear, mutates_args=(),
        schema="(Tensor inputs, Tensor weight, Tensor? bias, str post_op, str algorithm) -> Tensor",
    )
    linear_op.register_fake(lambda inputs, weight, *_: inputs.new_empty((*inputs.shape[:-1], weight.shape[0])))
    add_op = torch.library.custom_op(
        "vit_registers::onednn_linear_add", linear_add, mutates_args=(),
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


def _project(inputs: torch.Tensor, linear: nn.Linear, onednn: bool, plain: bool = False) -> torch.Tensor:
    """`linear(inputs)`, as a oneDNN product on the block's oneDNN path (unless `plain`, see `onednn_linear`)."""
    return onednn_linear(inputs, linear, plain=plain) if onednn else linear(inputs)


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


def apply_test_time_registers(
    hidden: torch.Tensor, neurons: torch.Tensor, num_registers: int, inplace: bool = False
) -> torch.Tensor:
    """Jiang et al. 2025, Algorithm 2, on MLP hidden activations `(batch, tokens, units)`.

    In each register neuron the last `num_registers` tokens (the test-time registers) take the maximum activation
    over all tokens of their own image, and every other token's activation is set to 0. Every image of the batch is
    edited independently. `inplace` writes the edited columns into `hidden` instead of copying all of it.
    """
    selected = hidden[..., neurons]
    peak = selected.amax(dim=1, keepdim=True)
    is_register = torch.zeros(hidden.shape[1], 1, dtype=torch.bool, device=hidden.device)
    is_register[hidden.shape[1] - num_registers :] = True
    edited = torch.where(is_register, peak, torch.zeros_like(selected))
    return hidden.index_copy_(-1, neurons, edited) if inplace else hidden.index_copy(-1, neurons, edited)


class ViTRegistersMLP(nn.Module):
    """fc1 → activation → fc2 (`mlp_type="mlp"`), or SwiGLU (`"swiglu"`, DINOv2-g): fc1 packs [gate, value]."""

    def __init__(self, config: ViTRegistersConfig, layer_index: int = 0):
        super().__init__()
        hidden = config.mlp_hidden_size
        self.swiglu = config.mlp_type == "swiglu"
        self.fc1 = nn.Linear(config.hidden_size, 2 * hidden if self.swiglu else hidden)
        self.activation = ACT2FN["silu"] if self.swiglu else ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.activation_name = config.hidden_act
        self.activation_type = type(self.activation)  # the oneDNN path steps aside if `activation` is replaced
        self.register_neurons: tuple[int, ...] = ()
        self.num_test_time_registers = 0
        self.set_register_neurons(config.test_time_registers, layer_index)

    def set_register_neurons(self, spec: dict | None, layer_index: int) -> None:
        """Register neurons of this layer from a `config.test_time_registers` spec (none → plain MLP)."""
        neurons = (spec or {}).get("neurons") or {}
        units = neurons.get(str(layer_index), neurons.get(layer_index, []))
        self.num_test_time_registers = int((spec or {}).get("num_tokens", 0)) if len(units) else 0
        self.register_neurons = tuple(sorted(int(u) for u in units))

    def hidden_activations(
        self, hidden_states: torch.Tensor, onednn: bool = False, plain_products: bool = False
    ) -> torch.Tensor:
        """The MLP hidden units after the activation (for SwiGLU: the gated product); test-time edit applied.

        `onednn` (the block's oneDNN path): fc1 as a oneDNN product (ATen's with `plain_products`); without gradients
        the activation joins the product's epilogue where `onednn_policy` fuses it, and otherwise runs in place on the
        product's output, so only one `(tokens, mlp_hidden_size)` tensor is alive either way.
        """
        scratch = onednn and not self.swiglu and not torch.is_grad_enabled()  # fc1's output is ours to overwrite
        fuse = scratch and onednn_policy().fused_activation and not plain_products
        post_op = _ONEDNN_ACTIVATIONS.get(self.activation_name) if fuse else None
        in_place = _INPLACE_ACTIVATIONS.get(self.activation_name) if scratch else None
        if post_op is not None:
            hidden = onednn_linear(hidden_states, self.fc1, *post_op)
        elif in_place is not None:
            hidden = in_place(onednn_linear(hidden_states, self.fc1, plain=plain_products))
        else:
            hidden = _project(hidden_states, self.fc1, onednn, plain_products)
            if self.swiglu:
                gate, value = hidden.chunk(2, dim=-1)
                hidden = self.activation(gate) * value
            else:
                hidden = self.activation(hidden)
        if self.num_test_time_registers:
            neurons = torch.tensor(self.register_neurons, dtype=torch.long, device=hidden.device)
            # without gradients the activations are this call's own scratch tensor: edit the neurons' columns in place
            hidden = apply_test_time_registers(
                hidden, neurons, self.num_test_time_registers, inplace=not torch.is_grad_enabled()
            )
        return hidden

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.hidden_activations(hidden_states))
        return self.dropout(self.fc2(hidden))


class ViTRegistersLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + DropPath(LS1(Attn(LN(x)))), then x + DropPath(LS2(MLP(LN(x))))."""

    def __init__(self, config: ViTRegistersConfig, layer_index: int = 0):
        super().__init__()
        depth = config.num_hidden_layers
        drop_path = config.drop_path_rate * layer_index / (depth - 1) if depth > 1 else config.drop_path_rate
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ViTRegistersAttention(config)
        use_scale = config.layerscale_value is not None
        self.layer_scale1 = ViTRegistersLayerScale(config) if use_scale else nn.Identity()
        self.drop_path = ViTRegistersDropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ViTRegistersMLP(config, layer_index)
        self.layer_scale2 = ViTRegistersLayerScale(config) if use_scale else nn.Identity()

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.can_use_onednn(hidden_states):
            return self.onednn_forward(hidden_states, output_attentions)
        return self.compose(hidden_states, output_attentions)

    def compose(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block from its submodules (the regular path)."""
        attended, weights = self.attention(self.norm1(hidden_states), output_attentions)
        hidden_states = hidden_states + self.drop_path(self.layer_scale1(attended))
        del attended  # free the attention output before the MLP, where activation memory peaks
        mlp_output = self.mlp(self.norm2(hidden_states))
        hidden_states = hidden_states + self.drop_path(self.layer_scale2(mlp_output))
        return hidden_states, weights

    def can_use_onednn(self, hidden_states: torch.Tensor) -> bool:
        """Whether this call may take the oneDNN path (see `_OneDNNLinearFunction`): float32 on the CPU, plain
        `nn.Linear` weights, and nothing (hooks, replaced forwards, adapters) expecting the regular submodule calls."""
        if not _onednn_path_available(hidden_states):
            return False
        policy = onednn_policy()
        # train mode counts as training also without gradients (a reentrant checkpoint's first pass), so that the
        # forward and its recomputation take the same path
        if not (policy.training if self.training or torch.is_grad_enabled() else policy.inference):
            return False
        if type(self.mlp.activation) is not self.mlp.activation_type:
            return False  # a replaced activation module: the oneDNN path would pick the activation by name
        # replaced LayerScale, dropout or drop-path modules: the oneDNN path folds, skips or fuses these by their type
        if not all(type(m) in (ViTRegistersLayerScale, nn.Identity) for m in (self.layer_scale1, self.layer_scale2)):
            return False
        if not all(type(m) in (nn.Dropout, ViTRegistersDropPath, nn.Identity) for m in self._stochastic_modules):
            return False
        for name, module in self.named_modules():
            if name and (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__):
                return False
        return all(_plain_float32_cpu_linear(linear) for linear in self.products)

    @property
    def products(self) -> tuple[nn.Module, ...]:
        """The block's four matrix products (qkv, proj, fc1, fc2): what the oneDNN path runs and `prepack_weights`
        packs."""
        return self.attention.qkv, self.attention.proj, self.mlp.fc1, self.mlp.fc2

    def onednn_forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward` with oneDNN products (the same arithmetic up to float32 rounding). With gradients, in training
        mode or with a dropout or drop-path module drawing masks (Monte Carlo dropout in eval mode) see
        `_onednn_training_forward`; otherwise the activation and the residual move into the products'
        epilogues, or, below the policy's `min_inference_work` without prepacked weights, the products are ATen's with
        the activation and the residual in place after them."""
        if self.training or torch.is_grad_enabled() or any(_drops(m) for m in self._stochastic_modules):
            return self._onednn_training_forward(hidden_states, output_attentions)
        attention, mlp = self.attention, self.mlp
        plain = hidden_states.numel() < onednn_policy().min_inference_work and attention.qkv not in _PACKED_WEIGHTS
        qkv = onednn_linear(self.norm1(hidden_states), attention.qkv, plain=plain)
        attended, weights = attention.attend(qkv, output_attentions)
        del qkv
        hidden_states = self._residual(hidden_states, attended.contiguous(), attention.proj, self.layer_scale1, plain)
        del attended
        activations = mlp.hidden_activations(self.norm2(hidden_states), onednn=True, plain_products=plain)
        hidden_states = self._residual(hidden_states, activations, mlp.fc2, self.layer_scale2, plain)
        return hidden_states, weights

    def _onednn_training_forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`onednn_forward` with gradients, in train mode or with active dropout: the regular composition's
        arithmetic (dropout and drop path drawn in the same order) with oneDNN products, LayerScale folded into the
        output products' weights (`(γ ⊙ W) x + γ ⊙ b`: weight-sized products in forward and backward instead of
        activation-sized ones) and the residual added in their epilogue wherever no dropout or drop path draws a mask
        between them."""
        attention, mlp = self.attention, self.mlp
        qkv = onednn_linear(self.norm1(hidden_states), attention.qkv)
        attended, weights = attention.attend(qkv, output_attentions)
        del qkv
        hidden_states = self._training_residual(
            hidden_states, attended.contiguous(), attention.proj, self.layer_scale1, attention.proj_dropout
        )
        del attended  # free the attention output before the MLP, where activation memory peaks
        activations = mlp.dropout(mlp.hidden_activations(self.norm2(hidden_states), onednn=True))
        hidden_states = self._training_residual(hidden_states, activations, mlp.fc2, self.layer_scale2, mlp.dropout)
        return hidden_states, weights

    def _training_residual(
        self,
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
        if not (_drops(dropout) or _drops(self.drop_path)):
            return onednn_product(inputs, weight, bias, residual)
        return residual + self.drop_path(dropout(onednn_product(inputs, weight, bias)))

    @property
    def _stochastic_modules(self) -> tuple[nn.Module, ...]:
        """The modules between the output products and the residual that may draw random masks."""
        return self.attention.proj_dropout, self.mlp.dropout, self.drop_path

    @staticmethod
    def _residual(
        residual: torch.Tensor, inputs: torch.Tensor, linear: nn.Linear, layer_scale: nn.Module, plain: bool = False
    ) -> torch.Tensor:
        """`residual + layer_scale(linear(inputs))` (no gradients): one pass after the product with LayerScale, none
        without it (oneDNN adds the residual in the epilogue; a `plain` product gets it in place)."""
        if isinstance(layer_scale, ViTRegistersLayerScale):
            return torch.addcmul(residual, onednn_linear(inputs, linear, plain=plain), layer_scale.gamma)
        return onednn_linear_add(inputs, residual, linear, plain)


def _drops(module: nn.Module) -> bool:
    """Whether a dropout or drop-path module (or `nn.Identity`) changes its input in its current mode."""
    if isinstance(module, nn.Dropout):
        return module.training and module.p > 0
    if isinstance(module, ViTRegistersDropPath):
        return module.training and module.drop_prob > 0
    return False


def resolve_layer_indices(layers: int | Iterable[int] | None, depth: int) -> tuple[int, ...]:
    """Sorted, unique, non-negative layer indices (negative ones count from the end); `None` means every layer."""
    if layers is None:
        return tuple(range(depth))
    chosen = [layers] if isinstance(layers, int) else list(layers)
    resolved = set()
    for index in chosen:
        if not -depth <= int(index) < depth:
            raise ValueError(f"Layer {index} does not exist in a {depth}-layer model (valid: {-depth}..{depth - 1}).")
        resolved.add(int(index) % depth)
    return tuple(sorted(resolved))


class ViTRegistersEncoder(nn.Module):
    def __init__(self, config: ViTRegistersConfig):
        super().__init__()
        self.layer = nn.ModuleList([ViTRegistersLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_hidden_states: bool = False,
        attention_layers: frozenset[int] = frozenset(),
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        all_hidden = (hidden_states,) if output_hidden_states else None
        attentions = () if attention_layers else None
        for index, layer in enumerate(self.layer):
            hidden_states, weights = layer(hidden_states, index in attention_layers)
            if weights is not None:
                attentions += (weights,)
            if output_hidden_states:
                all_hidden += (hidden_states,)
        return hidden_states, all_hidden, attentions


class ViTRegistersPreTrainedModel(PreTrainedModel):
    config_class = ViTRegistersConfig
    config: ViTRegistersConfig
    base_model_prefix = "vit_registers"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViTRegistersEmbeddings", "ViTRegistersLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal weights (std `initializer_range`), zero biases, unit LayerNorms, LayerScale at its value."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ViTRegistersEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            for token in (module.cls_token, module.register_tokens):
                if token is not None:
                    init.trunc_normal_(token, mean=0.0, std=std)
            if module.mask_token is not None:
                init.zeros_(module.mask_token)
        elif isinstance(module, ViTRegistersLayerScale):
            init.constant_(module.gamma, self.config.layerscale_value)

    def prepack_weights(self, enable: bool = True) -> int:
        """Keep each block's matrix-product weights also in oneDNN's packed layout for CPU inference.

        Faster products without gradients on CPUs whose `onednn_policy()` uses oneDNN for inference (oneDNN then
        skips reordering the weight on every call; README, benchmarks) for a second copy of the block weights in
        memory. Gradients, torch.compile and other devices keep using the plain weights. A weight that changes in
        place or is replaced is packed again on its next use; after writes through `.data` call this again.
        `enable=False` drops the packs. Returns the number of weights packed (0 where oneDNN inference is off).
        """
        layers = [module for module in self.modules() if isinstance(module, ViTRegistersLayer)]
        linears = [linear for layer in layers for linear in layer.products]
        for linear in linears:
            _PACKED_WEIGHTS.pop(linear, None)
        if not enable or _REORDER_WEIGHT is None or not onednn_policy().inference:
            return 0
        packable = [linear for linear in linears if _plain_float32_cpu_linear(linear)]
        for linear in packable:
            _pack(linear)
        return len(packable)


class ViTRegistersModel(ViTRegistersPreTrainedModel):
    """The bare encoder: returns CLS, register and patch tokens separately (see [`ViTRegistersModelOutput`])."""

    def __init__(self, config: ViTRegistersConfig):
        super().__init__(config)
        self.embeddings = ViTRegistersEmbeddings(config)
        self.encoder = ViTRegistersEncoder(config)
        self.layernorm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.use_final_norm else nn.Identity()
        )
        self.fc_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.use_fc_norm else nn.Identity()
        )
        self.post_init()

    def get_input_embeddings(self) -> ViTRegistersPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def set_test_time_registers(self, neurons: dict[int, Sequence[int]] | None, num_tokens: int = 1) -> None:
        """Enable test-time registers (Jiang et al. 2025) with the given register neurons `{layer: [unit, ...]}`, or
        disable them with `None`. Stored in the config, so `save_pretrained` / `from_pretrained` reproduce it."""
        if neurons is None or num_tokens == 0:
            spec = None
        else:
            if num_tokens < 1:
                raise ValueError(f"num_tokens must be >= 1, got {num_tokens}.")
            spec = {"num_tokens": int(num_tokens), "neurons": {str(int(k)): sorted(int(u) for u in v) for k, v in neurons.items()}}
        previous = self.config.test_time_registers
        self.config.test_time_registers = spec
        try:
            self.config._check_values()
        except ValueError:
            self.config.test_time_registers = previous
            raise
        self.embeddings.num_test_time_registers = self.config.num_test_time_registers
        for index, layer in enumerate(self.encoder.layer):
            layer.mlp.set_register_neurons(spec, index)

    def split_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Split a `(batch, tokens, hidden)` sequence into (CLS or None, registers incl. test-time, patches)."""
        groups = self.config.token_slices(tokens.shape[1])
        cls_token = tokens[:, 0] if self.config.use_cls_token else None
        trained, test_time = (tokens[:, group] for group in groups["registers"])
        registers = torch.cat([trained, test_time], dim=1) if self.config.num_test_time_registers else trained
        return cls_token, registers, tokens[:, groups["patches"][0]]

    def pool(self, cls_token: torch.Tensor | None, patch_tokens: torch.Tensor) -> torch.Tensor:
        """`config.pooling`: CLS, fc_norm(mean of patches), or both concatenated. Registers are never pooled."""
        if self.config.pooling == "cls":
            return cls_token
        mean = self.fc_norm(patch_tokens.mean(dim=1))
        return mean if self.config.pooling == "mean" else torch.cat([cls_token, mean], dim=-1)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        attention_layers: int | Sequence[int] | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ViTRegistersModelOutput:
        r"""
        Args:
            pixel_values (`(batch, channels, height, width)`): height and width any multiples of the patch size.
            bool_masked_pos (`(batch, patches)` bool, *optional*): patches replaced by the mask token.
            output_hidden_states (`bool`): return the L+1 hidden states before the final norm.
            output_attentions (`bool`): return attention weights (under every attention backend).
            attention_layers (`int` or list of `int`, *optional*): with `output_attentions`, only these layers
                (negative indices count from the end) compute weights; the others keep the fast backend. Implies
                `output_attentions=True` when given.
        """
        if pixel_values is None:
            raise ValueError("pixel_values is required.")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions or attention_layers is not None
        depth = self.config.num_hidden_layers
        chosen = frozenset(resolve_layer_indices(attention_layers, depth)) if output_attentions else frozenset()

        embeddings = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        last, hidden_states, attentions = self.encoder(embeddings, output_hidden_states, chosen)
        sequence = self.layernorm(last)
        cls_token, register_tokens, patch_tokens = self.split_tokens(sequence)
        return ViTRegistersModelOutput(
            last_hidden_state=sequence,
            pooler_output=self.pool(cls_token, patch_tokens),
            register_tokens=register_tokens,
            patch_tokens=patch_tokens,
            hidden_states=hidden_states,
            attentions=attentions,
        )


class ViTRegistersForImageClassification(ViTRegistersPreTrainedModel):
    """Encoder + linear classifier on `pooler_output` (CLS, mean of patches, or both as in DINOv2's linear head)."""

    def __init__(self, config: ViTRegistersConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit_registers = ViTRegistersModel(config)
        features = config.hidden_size * (2 if config.pooling == "cls_mean" else 1)
        self.classifier = nn.Linear(features, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        attention_layers: int | Sequence[int] | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        outputs = self.vit_registers(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            attention_layers=attention_layers,
        )
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class ViTRegistersBackbone(BackboneMixin, ViTRegistersPreTrainedModel):
    """Feature maps of chosen stages (`out_features` / `out_indices`), CLS and registers removed, NCHW by default."""

    def __init__(self, config: ViTRegistersConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.vit_registers = ViTRegistersModel(config)
        self.post_init()

    def get_input_embeddings(self) -> ViTRegistersPatchEmbeddings:
        return self.vit_registers.embeddings.patch_embeddings

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput:
        model = self.vit_registers
        outputs = model(pixel_values, output_hidden_states=True, output_attentions=output_attentions)
        batch_size, _, height, width = pixel_values.shape
        patch = self.config.patch_size
        feature_maps = ()
        for stage, hidden_state in zip(self.stage_names, outputs.hidden_states):
            if stage not in self.out_features:
                continue
            if self.config.apply_layernorm:
                hidden_state = model.layernorm(hidden_state)
            if self.config.reshape_hidden_states:
                _, _, patches = model.split_tokens(hidden_state)
                hidden_state = patches.reshape(batch_size, height // patch, width // patch, -1)
                hidden_state = hidden_state.permute(0, 3, 1, 2).contiguous()
            feature_maps += (hidden_state,)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return BackboneOutput(
            feature_maps=feature_maps,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=outputs.attentions,
        )


__all__ = [
    "ViTRegistersModelOutput",
    "ViTRegistersPreTrainedModel",
    "ViTRegistersModel",
    "ViTRegistersForImageClassification",
    "ViTRegistersBackbone",
    "apply_test_time_registers",
    "resolve_layer_indices",
]
