"""PyTorch Vision Transformer with register tokens (Darcet et al., "Vision Transformers Need Registers", ICLR 2024).

Sequence layout in every layer: ``[CLS] + registers + patches (+ test-time registers)``. The registers are learnable
tokens (DINOv3 calls them storage tokens) that every block processes and that the outputs return separately
(`register_tokens`) instead of hiding them in `last_hidden_state`.

The model is composed of small components, each chosen by a config value: patch embedding, the position encoding
(`position_encoding`: learned embeddings resampled to any grid by `resample_position_embeddings`, or 2D rotary
encoding of the patch queries and keys, `ViTRegistersRotaryEmbedding`), attention (through transformers' attention
interface), feed-forward (`mlp_type`: MLP or SwiGLU), LayerScale, drop path, the test-time-register edit, the block,
and the pooling (`pooling`, including timm's attention pool).

This file is copied next to the weights by ``save_pretrained`` so that ``trust_remote_code=True`` works without the
package: it imports only torch (public APIs), transformers, the standard library and its sibling configuration file.
Device-specific speed-ups live outside it: the block is marked for transformers' kernel convention
(`use_kernel_forward_from_hub`), and `vit_registers.onednn.kernelize` swaps in a oneDNN CPU forward.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BackboneOutput, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

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


try:
    from transformers.integrations import use_kernel_forward_from_hub
except ImportError:  # pragma: no cover - transformers without the kernels integration

    def use_kernel_forward_from_hub(layer_name):
        return lambda cls: cls


from .configuration_vit_registers import ViTRegistersConfig, make_test_time_register_spec


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


def resample_position_embeddings(
    patch_positions: torch.Tensor,
    stored_grid: Sequence[int],
    grid: Sequence[int],
    offset: float = 0.0,
    antialias: bool = True,
) -> torch.Tensor:
    """Resample `(1, rows * columns, dim)` patch position embeddings from `stored_grid` to `grid` (rows, columns).

    Bicubic in float32, as official DINOv2: with `offset > 0` the grid is resampled by `scale_factor = (n + offset) /
    M` (DINO's trick against rounding; official models without registers use 0.1), else to the output size directly.
    Plain tensor operations on the sizes, so that `torch.export` keeps height and width symbolic.
    """
    (stored_height, stored_width), (height, width) = stored_grid, grid
    dim = patch_positions.shape[-1]
    image = patch_positions.float().reshape(1, stored_height, stored_width, dim).permute(0, 3, 1, 2)
    if offset:
        size = {"scale_factor": ((height + offset) / stored_height, (width + offset) / stored_width)}
    else:
        size = {"size": (height, width)}
    resized = F.interpolate(image, mode="bicubic", align_corners=False, antialias=antialias, **size)
    return resized.permute(0, 2, 3, 1).reshape(1, height * width, dim).to(patch_positions.dtype)


class ViTRegistersEmbeddings(nn.Module):
    """Patch embeddings (+ learned position embeddings), after the CLS token and the register tokens. Prefix tokens get
    a stored embedding where the config says so (`cls_token_has_position_embedding`,
    `register_tokens_have_position_embedding`); with `position_encoding="rope"` there are none."""

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
        self.num_position_prefix = config.num_position_prefix
        num_positions = self.grid_size[0] * self.grid_size[1] + self.num_position_prefix
        learned = config.position_encoding == "learned"
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, hidden)) if learned else None
        self.num_test_time_registers = config.num_test_time_registers
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """Patch position embeddings for a `grid_height` x `grid_width` patch grid, `(1, h * w, hidden)`."""
        patch_positions = self.position_embeddings[:, self.num_position_prefix :]
        # Official DINOv2 skips resampling at the stored grid. An exported graph must not branch on the input size,
        # so it always resamples: without offset that is an exact identity at the stored grid.
        if not torch.compiler.is_exporting() and (grid_height, grid_width) == tuple(self.grid_size):
            return patch_positions
        return resample_position_embeddings(
            patch_positions,
            self.grid_size,
            (grid_height, grid_width),
            offset=self.config.interpolate_offset,
            antialias=self.config.interpolate_antialias,
        )

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
        if self.position_embeddings is not None:
            embeddings = embeddings + self.interpolate_pos_encoding(height // patch_size, width // patch_size)

        prefix = [token for token in (self.cls_token, self.register_tokens) if token is not None]
        if prefix:
            tokens = torch.cat(prefix, dim=1)  # (1, CLS + registers, hidden)
            covered = self.num_position_prefix  # the first `covered` prefix tokens have a stored embedding
            if covered:
                stored = tokens[:, :covered] + self.position_embeddings[:, :covered]
                tokens = torch.cat([stored, tokens[:, covered:]], dim=1)
            prefix = [tokens.expand(batch_size, -1, -1)]
        suffix = []
        if self.num_test_time_registers:
            suffix.append(embeddings.new_zeros(batch_size, self.num_test_time_registers, embeddings.shape[-1]))
        embeddings = torch.cat([*prefix, embeddings, *suffix], dim=1)
        return self.dropout(embeddings)


class ViTRegistersRotaryEmbedding(nn.Module):
    """2D axial rotary position encoding (`position_encoding="rope"`): `(sin, cos)`, each `(rows * columns, head_dim)`
    in float32, for a patch grid. The first half of the frequencies encodes the row, the second the column.

    `rope_type="dinov3"` (DINOv3): patch centres normalised to [-1, 1], angles `2π · coordinate / period`, laid out
    for rotating the two halves of a head; in train mode the coordinates are augmented (`rope_shift_coords`,
    `rope_jitter_coords`, `rope_rescale_coords`). `"eva"` (timm `RotaryEmbeddingCat`): integer patch indices scaled
    to `rope_reference_grid`, angles `index · rope_theta ** (-i / bands)`, laid out for interleaved pairs. No weights:
    everything is computed from the config and the grid, so `torch.export` keeps the grid symbolic.
    """

    def __init__(self, config: ViTRegistersConfig):
        super().__init__()
        self.config = config
        self.bands = config.hidden_size // config.num_attention_heads // 4  # frequencies per axis

    def coordinates(self, rows: int, columns: int, device: torch.device | None = None) -> torch.Tensor:
        """Patch coordinates `(rows * columns, 2)` as (row, column), in raster order."""
        config = self.config
        axes = [torch.arange(size, device=device, dtype=torch.float32) for size in (rows, columns)]
        if config.rope_type == "eva":
            if config.rope_reference_grid is not None:
                axes = [
                    axis / size * reference
                    for axis, size, reference in zip(axes, (rows, columns), config.rope_reference_grid)
                ]
        else:
            sizes = {"separate": (rows, columns), "min": (min(rows, columns),) * 2, "max": (max(rows, columns),) * 2}
            axes = [(axis + 0.5) / size for axis, size in zip(axes, sizes[config.rope_normalize_coords])]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flatten(0, 1)
        if config.rope_type == "eva":
            return coords
        coords = 2.0 * coords - 1.0
        if self.training:  # DINOv3's augmentation: shift, then jitter per axis, then one rescale factor
            if config.rope_shift_coords is not None:
                shift = config.rope_shift_coords
                coords = coords + torch.empty(2, device=device).uniform_(-shift, shift)
            if config.rope_jitter_coords is not None:
                jitter = math.log(config.rope_jitter_coords)
                coords = coords * torch.empty(2, device=device).uniform_(-jitter, jitter).exp()
            if config.rope_rescale_coords is not None:
                rescale = math.log(config.rope_rescale_coords)
                coords = coords * torch.empty(1, device=device).uniform_(-rescale, rescale).exp()
        return coords

    def forward(self, rows: int, columns: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        config, bands = self.config, self.bands
        coords = self.coordinates(rows, columns, device)[:, :, None]  # (patches, 2, 1)
        if config.rope_type == "eva":
            frequencies = 1.0 / config.rope_theta ** (torch.arange(bands, device=device, dtype=torch.float32) / bands)
            angles = (coords * frequencies).flatten(1).repeat_interleave(2, dim=-1)
        else:
            if config.rope_min_period is not None:
                ratio = config.rope_max_period / config.rope_min_period
                exponents = torch.linspace(0, 1, bands, device=device, dtype=torch.float32)
                periods = ratio**exponents / ratio * config.rope_max_period
            else:
                periods = config.rope_theta ** (
                    2 * torch.arange(bands, device=device, dtype=torch.float32) / (2 * bands)
                )
            angles = (2 * math.pi * coords / periods).flatten(1).tile(2)
        return angles.sin(), angles.cos()


def rotate_patch_tokens(
    states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], start: int, interleaved: bool
) -> torch.Tensor:
    """Rotary encoding of the patch tokens of `states` `(batch, heads, tokens, head_dim)`: tokens `start` to
    `start + patches` are rotated by `(sin, cos)` in float32; CLS, registers and test-time registers are not."""
    sin, cos = position_embeddings
    end = start + sin.shape[0]
    patches = states[:, :, start:end].float()
    if interleaved:  # pairs (0, 1), (2, 3), ... as timm's EVA
        rotated = torch.stack((-patches[..., 1::2], patches[..., ::2]), dim=-1).flatten(-2)
    else:  # halves: dimension i with i + head_dim / 2, as DINOv3
        first, second = patches.chunk(2, dim=-1)
        rotated = torch.cat((-second, first), dim=-1)
    patches = (patches * cos + rotated * sin).to(states.dtype)
    return torch.cat([states[:, :, :start], patches, states[:, :, end:]], dim=2)


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
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        output, weights = self.attend(self.qkv(hidden_states), output_attentions, position_embeddings)
        return self.proj_dropout(self.proj(output)), weights

    def attend(
        self,
        qkv: torch.Tensor,
        output_attentions: bool = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of the fused projection `qkv` `(batch, tokens, 3 * hidden)`: the heads' outputs, merged to
        `(batch, tokens, hidden)`, before `proj`; and the weights when `output_attentions`. `position_embeddings`:
        the rotary `(sin, cos)` of the patch grid (`ViTRegistersRotaryEmbedding`), applied to queries and keys."""
        batch_size, num_tokens, _ = qkv.shape
        qkv = qkv.reshape(batch_size, num_tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if position_embeddings is not None:
            start, interleaved = self.config.num_prefix_tokens, self.config.rope_type == "eva"
            query, key = (rotate_patch_tokens(t, position_embeddings, start, interleaved) for t in (query, key))
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


def apply_test_time_registers(
    hidden, neurons, num_registers, mode="reference", normal_values="zero", scale=1.0, first_normal=1, inplace=False
) -> torch.Tensor:
    """Test-time registers (Jiang et al. 2025) on MLP hidden activations `(batch, tokens, units)`, each image alone: in
    the units `neurons`, the last `num_registers` tokens get the outliers' activation times `scale` (one factor or one
    per register), tokens `first_normal:-num_registers` get `normal_values` (`"zero"`, `"mean"`, `"only_outliers"`:
    above mean + std set to the mean, `"same"`). `mode="reference"`: the authors' `activate_on_registers`, one signed
    maximum per layer (re-taken after each write with per-register factors); `"per_neuron"`: each unit's maximum."""

    def signed_peak(values):  # per image, the entry of largest magnitude, sign kept (a tie gives the negative one)
        high, low = values.amax(dim=(1, 2), keepdim=True), values.amin(dim=(1, 2), keepdim=True)
        return torch.where(high.abs() > low.abs(), high, low)

    selected = hidden[..., neurons]
    end = selected.shape[1] - num_registers
    peak = selected.amax(dim=1, keepdim=True) if mode == "per_neuron" else signed_peak(selected)
    sequential = mode == "reference" and isinstance(scale, (list, tuple))
    for index, factor in enumerate(scale if isinstance(scale, (list, tuple)) else [scale] * num_registers):
        value = factor * (signed_peak(selected) if sequential else peak)
        selected = selected.clone()  # not in place: the backward pass of the peak reads these values
        selected[:, end + index : end + index + 1] = value
    normal = selected[:, first_normal:end]
    mean = normal.mean(dim=1, keepdim=True)
    if normal_values == "zero":
        normal = torch.zeros_like(normal)
    elif normal_values == "mean":
        normal = mean.expand_as(normal)
    elif normal_values == "only_outliers":
        normal = torch.where(normal > mean + normal.std(dim=1, keepdim=True), mean, normal)
    elif normal_values != "same":
        raise ValueError(f"Unknown normal_values {normal_values!r}.")
    edited = torch.cat([selected[:, :first_normal], normal, selected[:, end:]], dim=1)
    return hidden.index_copy_(-1, neurons, edited) if inplace else hidden.index_copy(-1, neurons, edited)


class ViTRegistersTestTimeRegisters(nn.Module):
    """One block's test-time-register edit (`config.test_time_register_edit`); identity without register neurons."""

    def __init__(self, config: ViTRegistersConfig, layer_index: int = 0):
        super().__init__()
        self.configure(config, layer_index)

    def configure(self, config: ViTRegistersConfig, layer_index: int) -> None:
        self.settings = config.test_time_register_edit(layer_index)  # mode, normal_values, scale, first_normal
        self.neurons, self.num_tokens = self.settings.pop("neurons"), self.settings.pop("num_registers")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.num_tokens:
            return hidden
        neurons = torch.tensor(self.neurons, dtype=torch.long, device=hidden.device)
        inplace = not torch.is_grad_enabled()  # no gradients: the MLP's own scratch tensor, edited in place
        return apply_test_time_registers(hidden, neurons, self.num_tokens, inplace=inplace, **self.settings)

    def extra_repr(self) -> str:
        return f"neurons={list(self.neurons)}, num_tokens={self.num_tokens}, {self.settings}" if self.num_tokens else ""


class ViTRegistersMLP(nn.Module):
    """fc1 → activation → fc2 (`mlp_type="mlp"`), with the test-time-register edit on the hidden units."""

    gated = False  # fc1 packs [gate, value] (SwiGLU)

    def __init__(self, config: ViTRegistersConfig, layer_index: int = 0):
        super().__init__()
        hidden = config.mlp_hidden_size
        self.fc1 = nn.Linear(config.hidden_size, 2 * hidden if self.gated else hidden)
        self.hidden_act = "silu" if self.gated else config.hidden_act
        self.activation = ACT2FN[self.hidden_act]
        self.test_time_registers = ViTRegistersTestTimeRegisters(config, layer_index)
        self.fc2 = nn.Linear(hidden, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def activate(self, projected: torch.Tensor) -> torch.Tensor:
        """The hidden units from fc1's output: the activation, then the test-time-register edit."""
        return self.test_time_registers(self.activation(projected))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(self.activate(self.fc1(hidden_states)))
        return self.dropout(self.fc2(hidden))


class ViTRegistersSwiGLU(ViTRegistersMLP):
    """SwiGLU feed-forward (`mlp_type="swiglu"`, DINOv2-g): fc1 packs [gate, value], silu(gate) * value → fc2."""

    gated = True

    def activate(self, projected: torch.Tensor) -> torch.Tensor:
        gate, value = projected.chunk(2, dim=-1)
        return self.test_time_registers(self.activation(gate) * value)


FEED_FORWARD_CLASSES = {"mlp": ViTRegistersMLP, "swiglu": ViTRegistersSwiGLU}


@use_kernel_forward_from_hub("ViTRegistersLayer")
class ViTRegistersLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + DropPath(LS1(Attn(LN(x)))), then x + DropPath(LS2(FFN(LN(x)))).

    The reference forward. Device kernels replace it per instance (`vit_registers.onednn.kernelize`) and fall back
    to it wherever they do not apply.
    """

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
        self.mlp = FEED_FORWARD_CLASSES[config.mlp_type](config, layer_index)
        self.layer_scale2 = ViTRegistersLayerScale(config) if use_scale else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attention(self.norm1(hidden_states), output_attentions, position_embeddings)
        hidden_states = hidden_states + self.drop_path(self.layer_scale1(attended))
        del attended  # free the attention output before the MLP, where activation memory peaks
        mlp_output = self.mlp(self.norm2(hidden_states))
        hidden_states = hidden_states + self.drop_path(self.layer_scale2(mlp_output))
        return hidden_states, weights


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
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        all_hidden = (hidden_states,) if output_hidden_states else None
        attentions = () if attention_layers else None
        for index, layer in enumerate(self.layer):
            hidden_states, weights = layer(hidden_states, index in attention_layers, position_embeddings)
            if weights is not None:
                attentions += (weights,)
            if output_hidden_states:
                all_hidden += (hidden_states,)
        return hidden_states, all_hidden, attentions


class ViTRegistersPooler(nn.Module):
    """`pooler_output` as chosen by `config.pooling`: the CLS token (`"cls"`), the mean of the patch tokens then
    `fc_norm` (`"mean"`, timm's global average pooling), or both concatenated (`"cls_mean"`, DINOv2's linear head).
    Registers are never pooled. Holds no weights (`fc_norm` stays on the model, as in timm)."""

    def __init__(self, config: ViTRegistersConfig):
        super().__init__()
        self.pooling = config.pooling

    def forward(self, cls_token: torch.Tensor | None, patch_tokens: torch.Tensor, fc_norm: nn.Module) -> torch.Tensor:
        if self.pooling == "cls":
            return cls_token
        mean = fc_norm(patch_tokens.mean(dim=1))
        return mean if self.pooling == "mean" else torch.cat([cls_token, mean], dim=-1)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}"


class ViTRegistersAttentionPool(nn.Module):
    """`pooling="map"` (timm's `AttentionPoolLatent`, the MAP head of SigLIP): one learned latent query attends to the
    patch tokens (all heads), then `proj` and a residual MLP after a LayerNorm. Registers are not attended to."""

    def __init__(self, config: ViTRegistersConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, hidden // config.num_attention_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, hidden))
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.mlp = ViTRegistersMLP(config, layer_index=-1)  # no block -1: never edited by test-time registers

    def forward(self, cls_token: torch.Tensor | None, patch_tokens: torch.Tensor, fc_norm: nn.Module) -> torch.Tensor:
        batch_size, num_patches, hidden = patch_tokens.shape
        query = self.q(self.latent).reshape(1, self.num_heads, 1, self.head_dim).expand(batch_size, -1, -1, -1)
        kv = self.kv(patch_tokens).reshape(batch_size, num_patches, 2, self.num_heads, self.head_dim)
        key, value = kv.permute(2, 0, 3, 1, 4).unbind(0)
        pooled, _ = eager_attention_forward(self, query, key, value, None, scaling=self.head_dim**-0.5)
        pooled = self.proj(pooled.reshape(batch_size, hidden))
        return pooled + self.mlp(self.norm(pooled))


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

    def __init__(self, config: ViTRegistersConfig, *inputs, **kwargs):
        config.check_consistency()  # the relations between fields, which transformers configs accept at creation
        super().__init__(config, *inputs, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, then the weight files get the mode of `config.json` next to them (what
        `open()` gives a new file: 0644 under the usual umask 022): safetensors >= 0.8 writes a temporary file
        (created 0600) and renames it into place, so the weights would otherwise be readable by their owner only."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        config_file = os.path.join(save_directory, "config.json")
        if kwargs.get("is_main_process", True) and os.path.isfile(config_file):
            mode = os.stat(config_file).st_mode & 0o777
            for name in os.listdir(save_directory):
                if name.startswith("model") and name.endswith(".safetensors"):  # model[-0000k-of-0000n].safetensors
                    os.chmod(os.path.join(save_directory, name), mode)
        return result

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
            if module.position_embeddings is not None:
                init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            for token in (module.cls_token, module.register_tokens):
                if token is not None:
                    init.trunc_normal_(token, mean=0.0, std=std)
            if module.mask_token is not None:
                init.zeros_(module.mask_token)
        elif isinstance(module, ViTRegistersLayerScale):
            init.constant_(module.gamma, self.config.layerscale_value)
        elif isinstance(module, ViTRegistersAttentionPool):
            init.trunc_normal_(module.latent, mean=0.0, std=module.latent.shape[-1] ** -0.5)


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
        self.pooler = ViTRegistersAttentionPool(config) if config.pooling == "map" else ViTRegistersPooler(config)
        self.rope_embeddings = ViTRegistersRotaryEmbedding(config) if config.position_encoding == "rope" else None
        self.post_init()

    def get_input_embeddings(self) -> ViTRegistersPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def set_test_time_registers(self, neurons: dict | None, num_tokens: int = 1, **settings) -> None:
        """Enable test-time registers (Jiang et al. 2025) with register neurons `{layer: [unit, ...]}` (`None`: off);
        `settings`: `mode` (default `"reference"`), `normal_values`, `scale` (`apply_test_time_registers`). Stored in
        the config (`make_test_time_register_spec`): `save_pretrained` and `trust_remote_code` reproduce it."""
        self.config.use_test_time_registers(make_test_time_register_spec(neurons, num_tokens, **settings))
        self.embeddings.num_test_time_registers = self.config.num_test_time_registers
        for index, layer in enumerate(self.encoder.layer):
            layer.mlp.test_time_registers.configure(self.config, index)

    def split_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Split a `(batch, tokens, hidden)` sequence into (CLS or None, registers incl. test-time, patches)."""
        groups = self.config.token_slices(tokens.shape[1])
        (cls_slice,) = groups["cls"]
        cls_token = tokens[:, cls_slice.start] if self.config.use_cls_token else None
        trained, test_time = (tokens[:, group] for group in groups["registers"])
        registers = torch.cat([trained, test_time], dim=1) if self.config.num_test_time_registers else trained
        return cls_token, registers, tokens[:, groups["patches"][0]]

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
        rotary = None
        if self.rope_embeddings is not None:
            patch = self.config.patch_size
            height, width = pixel_values.shape[-2:]
            rotary = self.rope_embeddings(height // patch, width // patch, device=embeddings.device)
        last, hidden_states, attentions = self.encoder(embeddings, output_hidden_states, chosen, rotary)
        sequence = self.layernorm(last)
        cls_token, register_tokens, patch_tokens = self.split_tokens(sequence)
        return ViTRegistersModelOutput(
            last_hidden_state=sequence,
            pooler_output=self.pooler(cls_token, patch_tokens, self.fc_norm),
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


@dataclass
class ViTRegistersBackboneOutput(BackboneOutput):
    """[`BackboneOutput`] + `cls_tokens`: the CLS token `(batch, hidden)` of every returned stage, when
    `return_class_token` (DINOv3's `get_intermediate_layers(..., return_class_token=True)`)."""

    cls_tokens: tuple[torch.FloatTensor, ...] | None = None


class ViTRegistersBackbone(BackboneMixin, ViTRegistersPreTrainedModel):
    """Feature maps of chosen stages (`out_features` / `out_indices`), CLS and registers removed, NCHW by default.
    `reshape_hidden_states=False`: sequences, every token; with `remove_register_tokens` `[CLS] + patches`, what the
    necks of transformers' DPT and Depth Anything take (they drop one token and reshape the rest)."""

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
        return_class_token: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ViTRegistersBackboneOutput:
        model, config = self.vit_registers, self.config
        if return_class_token is None:
            return_class_token = config.return_class_token
        if return_class_token and not config.use_cls_token:
            raise ValueError("return_class_token=True needs a model with a CLS token (use_cls_token=True).")
        outputs = model(pixel_values, output_hidden_states=True, output_attentions=output_attentions)
        batch_size, _, height, width = pixel_values.shape
        patch = config.patch_size
        feature_maps, cls_tokens = (), ()
        for stage, hidden_state in zip(self.stage_names, outputs.hidden_states):
            if stage not in self.out_features:
                continue
            if config.apply_layernorm:
                hidden_state = model.layernorm(hidden_state)
            cls_token, _, patches = model.split_tokens(hidden_state)
            cls_tokens += (cls_token,)
            if config.reshape_hidden_states:
                hidden_state = patches.reshape(batch_size, height // patch, width // patch, -1)
                hidden_state = hidden_state.permute(0, 3, 1, 2).contiguous()
            elif config.remove_register_tokens:
                hidden_state = patches if cls_token is None else torch.cat([cls_token[:, None], patches], dim=1)
            feature_maps += (hidden_state,)
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        return ViTRegistersBackboneOutput(
            feature_maps=feature_maps,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=outputs.attentions,
            cls_tokens=cls_tokens if return_class_token else None,
        )


__all__ = [
    "ViTRegistersModelOutput",
    "ViTRegistersPreTrainedModel",
    "ViTRegistersModel",
    "ViTRegistersForImageClassification",
    "ViTRegistersBackbone",
    "ViTRegistersBackboneOutput",
    "apply_test_time_registers",
    "resolve_layer_indices",
]
