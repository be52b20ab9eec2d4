"""Configuration of a Vision Transformer with register tokens.

One config expresses every family in the register literature: official DINOv2 (with and without registers, plain or
SwiGLU MLP), DINOv3 (storage tokens, axial RoPE), DeiT-III, and timm's register models: ``vit_*_reg{1,4}_gap_*``
without a CLS token, the EVA RoPE ones, ``so150m`` with position embeddings over the registers, and the attention-pool
(MAP) head.

This file is copied next to the weights by ``save_pretrained`` so that ``trust_remote_code=True`` works without the
package: it may import only torch, transformers and the standard library.
"""

from __future__ import annotations

from transformers import PretrainedConfig

try:  # transformers >= 5 keeps the mixin in `backbone_utils`
    from transformers.backbone_utils import BackboneConfigMixin
except ImportError:  # transformers 4.x
    from transformers.utils.backbone_utils import BackboneConfigMixin


POOLING_CHOICES = ("cls", "mean", "cls_mean", "map")
POSITION_ENCODINGS = ("learned", "rope")
ROPE_TYPES = ("dinov3", "eva")
ROPE_COORDINATE_NORMALIZATIONS = ("separate", "min", "max")
# Written into every config.json so that each Auto class loads through `trust_remote_code` without the package.
AUTO_MAP = {
    "AutoConfig": "configuration_vit_registers.ViTRegistersConfig",
    "AutoModel": "modeling_vit_registers.ViTRegistersModel",
    "AutoModelForImageClassification": "modeling_vit_registers.ViTRegistersForImageClassification",
    "AutoBackbone": "modeling_vit_registers.ViTRegistersBackbone",
}
MLP_CHOICES = ("mlp", "swiglu")
# Test-time registers (Jiang et al. 2025): how the edit fills the test-time tokens, and what the other tokens get.
# "reference": the authors' code (one signed maximum per layer, CLS kept); "per_neuron": each neuron's own maximum.
TEST_TIME_REGISTER_MODES = ("reference", "per_neuron")
TEST_TIME_REGISTER_NORMAL_VALUES = ("zero", "mean", "only_outliers", "same")
DEFAULT_TEST_TIME_REGISTER_MODE = "reference"
# Sizes a model needs to be at least 1 (0 is accepted by the config alone, see `ViTRegistersConfig.validate_values`).
SIZE_FIELDS = ("patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads")


def _fail(message: str) -> None:
    raise ValueError(f"ViTRegistersConfig: {message}")


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def make_test_time_register_spec(
    neurons: dict | None,
    num_tokens: int = 1,
    mode: str = DEFAULT_TEST_TIME_REGISTER_MODE,
    normal_values: str = "zero",
    scale: float | list[float] = 1.0,
) -> dict | None:
    """The `test_time_registers` config value for register neurons `{layer: [unit, ...]}` (see the config's Args);
    `None` (test-time registers off) for `neurons=None` or `num_tokens=0`."""
    if neurons is None or num_tokens == 0:
        return None
    if not _is_integer(num_tokens) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an integer >= 1, got {num_tokens!r}.")
    scale = [float(value) for value in scale] if isinstance(scale, (list, tuple)) else float(scale)
    return {
        "num_tokens": num_tokens,
        "neurons": {str(int(layer)): sorted({int(unit) for unit in units}) for layer, units in neurons.items()},
        "mode": mode,
        "normal_values": normal_values,
        "scale": scale,
    }


class ViTRegistersConfig(BackboneConfigMixin, PretrainedConfig):
    r"""
    Configuration of [`ViTRegistersModel`]: a pre-norm ViT with a CLS token (optional), `num_register_tokens` learnable
    register tokens appended after it (Darcet et al., "Vision Transformers Need Registers", ICLR 2024, §2.2), and
    patch tokens. Registers carry no position embedding (except in timm's so150m models,
    `register_tokens_have_position_embedding`), take part in every layer and are returned separately.

    Token order in every hidden state: `[CLS] + registers + patches` (no `[CLS]` when `use_cls_token=False`).

    Args:
        image_size (`int` or `tuple[int, int]`, defaults to 224):
            Training resolution (height, width). Sets the grid of stored position embeddings; other sizes are
            handled by interpolating them (see `interpolate_antialias`, `interpolate_offset`).
        patch_size (`int`, defaults to 16):
            Side of the square patches. Input height and width must be multiples of it.
        num_channels (`int`, defaults to 3):
            Channels of the input images.
        hidden_size (`int`, defaults to 768):
            Width of the token embeddings.
        num_hidden_layers (`int`, defaults to 12):
            Number of transformer blocks.
        num_attention_heads (`int`, defaults to 12):
            Attention heads per block; must divide `hidden_size` (checked when a model is built, see
            `check_consistency`).
        mlp_ratio (`float`, defaults to 4.0):
            MLP width as a multiple of `hidden_size`, used when `intermediate_size` is not given. For SwiGLU the
            official DINOv2 / DINOv3 rule applies: `d = int(hidden_size * mlp_ratio * 2 / 3)` rounded up to a multiple
            of `mlp_align_to`.
        intermediate_size (`int`, *optional*):
            Explicit MLP hidden width (for SwiGLU: the width of the gated hidden layer). Overrides `mlp_ratio`.
        hidden_act (`str`, defaults to `"gelu"`):
            Activation of the plain MLP (any key of `transformers.activations.ACT2FN`). SwiGLU always uses SiLU.
        mlp_type (`str`, defaults to `"mlp"`):
            `"mlp"` (fc1 → act → fc2) or `"swiglu"` (DINOv2-g: fc1 packs gate and value, silu(gate) * value → fc2).
        mlp_align_to (`int`, defaults to 8):
            SwiGLU only: the gated width derived from `mlp_ratio` is rounded up to a multiple of this (DINOv2 and
            DINOv3 `swiglu`: 8; DINOv3-7B `swiglu64`: 64).
        layerscale_value (`float`, *optional*, defaults to 1.0):
            Initial value of LayerScale (Touvron et al., CaiT). `None` removes LayerScale from the blocks.
        qkv_bias (`bool`, defaults to `True`):
            Bias in the fused query/key/value projection.
        layer_norm_eps (`float`, defaults to 1e-6):
            Epsilon of every LayerNorm.
        drop_path_rate (`float`, defaults to 0.0):
            Stochastic depth at the last block; block `i` uses `drop_path_rate * i / (num_hidden_layers - 1)` (the
            linear decay of timm and official DINOv2).
        hidden_dropout_prob (`float`, defaults to 0.0):
            Dropout after the embeddings, the attention projection and the MLP.
        attention_probs_dropout_prob (`float`, defaults to 0.0):
            Dropout on the attention probabilities.
        initializer_range (`float`, defaults to 0.02):
            Std of the truncated normal used to initialise weights and tokens.
        num_register_tokens (`int`, defaults to 4):
            Number of register tokens; 0 gives a plain ViT.
        use_cls_token (`bool`, defaults to `True`):
            Whether the sequence starts with a learnable CLS token. timm's `*_gap_*` register models have none.
        cls_token_has_position_embedding (`bool`, defaults to `True`):
            `True`: 1 + N position embeddings are stored and the CLS token gets the first (official DINOv2,
            transformers). `False`: N are stored, only patches get one (timm `no_embed_class`, DeiT-III).
        register_tokens_have_position_embedding (`bool`, defaults to `False`):
            `True`: the stored position embeddings also cover the registers (timm's `vit_so150m*_reg*` models: one
            embedding per prefix token, then the patches). With a CLS token this needs
            `cls_token_has_position_embedding=True` (the prefix tokens are covered together, as in timm).
        position_encoding (`str`, defaults to `"learned"`):
            `"learned"`: learned absolute position embeddings added to the patch embeddings (DINOv2, DeiT-III, timm
            ViTs). `"rope"`: no position embeddings; rotary position encoding (2D, axial) of the queries and keys of
            the patch tokens in every attention layer (DINOv3, timm's `*_rope_*` EVA models). CLS, registers and
            test-time registers are never rotated.
        rope_type (`str`, defaults to `"dinov3"`):
            `"dinov3"`: patch-centre coordinates normalised to [-1, 1] (`rope_normalize_coords`), angles
            `2π · coordinate / period` with periods `rope_theta ** (i / (head_dim / 4))`, rotation of the two
            halves of each head (DINOv3, transformers `DINOv3ViTModel`). `"eva"`: timm's `RotaryEmbeddingCat` —
            integer patch indices (scaled to `rope_reference_grid` when set), frequencies
            `rope_theta ** (-i / (head_dim / 4))`, rotation of interleaved pairs.
        rope_theta (`float`, defaults to 100.0):
            Base of the rotary frequencies: DINOv3 100, timm EVA 10000.
        rope_min_period / rope_max_period (`float`, *optional*):
            DINOv3 only: periods spaced geometrically from min to max instead of from `rope_theta`.
        rope_normalize_coords (`str`, defaults to `"separate"`):
            DINOv3 only: divide each axis by its own size (`"separate"`), by the smaller (`"min"`) or the larger
            (`"max"`) side.
        rope_shift_coords / rope_jitter_coords / rope_rescale_coords (`float`, *optional*):
            DINOv3's train-time coordinate augmentation, in train mode only (eval is deterministic): a uniform shift
            in [-s, s] per axis, a log-uniform factor in [1/j, j] per axis, one log-uniform factor in [1/r, r]
            (DINOv3 trains with `rescale=2`). Drawn from torch's global generator (`torch.manual_seed` repeats them).
        rope_reference_grid (`tuple[int, int]`, *optional*):
            `"eva"` only: the grid the model was trained at (timm `ref_feat_shape`); other grids are scaled to it.
        interpolate_antialias (`bool`, defaults to `True`):
            Antialiasing of the bicubic position-embedding resampling. Official register models: on; official
            models without registers: off.
        interpolate_offset (`float`, defaults to 0.0):
            Official DINOv2's offset: with `o > 0` the grid is resampled with `scale_factor = (n + o) / M` instead of
            an output size (models without registers: 0.1). With 0 the output size is given directly.
        use_mask_token (`bool`, defaults to `True`):
            Whether the model owns a mask token that replaces patch embeddings where `bool_masked_pos` is set.
        use_final_norm (`bool`, defaults to `True`):
            LayerNorm on every output token. timm's `*_gap_*` models normalise after pooling instead.
        use_fc_norm (`bool`, defaults to `False`):
            LayerNorm after mean pooling (timm `fc_norm`). Applies to the `"mean"` part of `pooling`.
        pooling (`str`, defaults to `"cls"`):
            What `pooler_output` and the classifier see: `"cls"` (the CLS token), `"mean"` (mean of the patch
            tokens), `"cls_mean"` (both concatenated, as in DINOv2's linear head) or `"map"` (timm's attention pool:
            one learned latent query attends to the patch tokens, then a residual MLP; it has weights, `pooler.*`).
            Registers are never pooled.
        test_time_registers (`dict`, *optional*):
            Test-time registers (Jiang et al. 2025): `{"num_tokens": int, "neurons": {layer: [unit, ...]}, "mode":
            str, "normal_values": str, "scale": float or list}` (built by `make_test_time_register_spec`). `num_tokens`
            extra tokens (zeros, no position embedding) follow the patches; in each listed MLP unit they receive the
            outliers' activation and the other tokens get `normal_values` (`"zero"`, `"mean"`, `"only_outliers"`,
            `"same"`). `mode="reference"`: the authors' edit, one signed maximum per layer written into every listed
            unit, CLS left as it is; `"per_neuron"`: each unit's own maximum, CLS included in the zeroed tokens (the
            meaning of a spec without `mode`). `scale`: one factor, or one per test-time token. They are returned in
            `register_tokens` after the trained registers. See `modeling_vit_registers.apply_test_time_registers`.
        apply_layernorm (`bool`, defaults to `True`):
            Backbone only: apply the final LayerNorm to the returned feature maps.
        reshape_hidden_states (`bool`, defaults to `True`):
            Backbone only: return NCHW maps of the patches (`True`) or `(batch, tokens, hidden)` sequences of every
            token, `[CLS] + registers + patches` (`False`).
        remove_register_tokens (`bool`, defaults to `False`):
            Backbone only, with `reshape_hidden_states=False`: the sequences leave the registers (and test-time
            registers) out, `[CLS] + patches`: what the necks of transformers' DPT and Depth Anything expect from a
            ViT backbone (they drop the first token and reshape the rest to the patch grid).
        return_class_token (`bool`, defaults to `False`):
            Backbone only: also return the CLS token of every returned stage (`cls_tokens`, `(batch, hidden)` each,
            normalised like the maps), as DINOv3's `get_intermediate_layers(..., return_class_token=True)` and
            transformers' `DINOv3ViTBackbone`. Also a `forward` argument.
        out_features / out_indices (*optional*):
            Backbone only: which stages (`"stem"`, `"stage1"` … `"stageL"`) to return.

    Example:

    ```python
    >>> from vit_registers import ViTRegistersConfig, ViTRegistersModel
    >>> config = ViTRegistersConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
    ...                             image_size=518, num_register_tokens=4)
    >>> model = ViTRegistersModel(config)
    ```
    """

    model_type = "vit_registers"

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        mlp_ratio: float = 4.0,
        intermediate_size: int | None = None,
        hidden_act: str = "gelu",
        mlp_type: str = "mlp",
        mlp_align_to: int = 8,
        layerscale_value: float | None = 1.0,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        num_register_tokens: int = 4,
        use_cls_token: bool = True,
        cls_token_has_position_embedding: bool = True,
        register_tokens_have_position_embedding: bool = False,
        position_encoding: str = "learned",
        rope_type: str = "dinov3",
        rope_theta: float = 100.0,
        rope_min_period: float | None = None,
        rope_max_period: float | None = None,
        rope_normalize_coords: str = "separate",
        rope_shift_coords: float | None = None,
        rope_jitter_coords: float | None = None,
        rope_rescale_coords: float | None = None,
        rope_reference_grid: list[int] | None = None,
        interpolate_antialias: bool = True,
        interpolate_offset: float = 0.0,
        use_mask_token: bool = True,
        use_final_norm: bool = True,
        use_fc_norm: bool = False,
        pooling: str = "cls",
        test_time_registers: dict | None = None,
        apply_layernorm: bool = True,
        reshape_hidden_states: bool = True,
        remove_register_tokens: bool = False,
        return_class_token: bool = False,
        out_features: list[str] | None = None,
        out_indices: list[int] | None = None,
        **kwargs,
    ):
        self.image_size = list(image_size) if isinstance(image_size, (list, tuple)) else image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.mlp_type = mlp_type
        self.mlp_align_to = mlp_align_to
        self.layerscale_value = layerscale_value
        self.qkv_bias = qkv_bias
        self.layer_norm_eps = layer_norm_eps
        self.drop_path_rate = drop_path_rate
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.num_register_tokens = num_register_tokens
        self.use_cls_token = use_cls_token
        self.cls_token_has_position_embedding = cls_token_has_position_embedding
        self.register_tokens_have_position_embedding = register_tokens_have_position_embedding
        self.position_encoding = position_encoding
        self.rope_type = rope_type
        self.rope_theta = rope_theta
        self.rope_min_period = rope_min_period
        self.rope_max_period = rope_max_period
        self.rope_normalize_coords = rope_normalize_coords
        self.rope_shift_coords = rope_shift_coords
        self.rope_jitter_coords = rope_jitter_coords
        self.rope_rescale_coords = rope_rescale_coords
        self.rope_reference_grid = list(rope_reference_grid) if rope_reference_grid is not None else None
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.use_mask_token = use_mask_token
        self.use_final_norm = use_final_norm
        self.use_fc_norm = use_fc_norm
        self.pooling = pooling
        self.test_time_registers = test_time_registers
        self.apply_layernorm = apply_layernorm
        self.reshape_hidden_states = reshape_hidden_states
        self.remove_register_tokens = remove_register_tokens
        self.return_class_token = return_class_token
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(**kwargs)
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, num_hidden_layers + 1)]
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        self.validate()

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def image_grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of the stored position embeddings."""
        height, width = self.image_size if isinstance(self.image_size, (list, tuple)) else (self.image_size,) * 2
        return height // self.patch_size, width // self.patch_size

    @property
    def mlp_hidden_size(self) -> int:
        """Hidden width of the MLP (for SwiGLU: of the gated layer, i.e. half of `fc1`'s output)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.mlp_type == "swiglu":
            hidden = int(hidden * 2 / 3)
            hidden += -hidden % self.mlp_align_to
        return hidden

    @property
    def num_position_prefix(self) -> int:
        """Prefix tokens (CLS, registers) that have a stored position embedding, stored before the patches' ones."""
        if self.position_encoding != "learned":
            return 0
        cls = int(self.use_cls_token and self.cls_token_has_position_embedding)
        return cls + (self.num_register_tokens if self.register_tokens_have_position_embedding else 0)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: CLS (if any) and the trained registers."""
        return int(self.use_cls_token) + self.num_register_tokens

    @property
    def num_test_time_registers(self) -> int:
        return int((self.test_time_registers or {}).get("num_tokens", 0))

    def test_time_register_edit(self, layer_index: int) -> dict:
        """The test-time-register edit of block `layer_index` as keyword arguments of `apply_test_time_registers`:
        `neurons` (sorted, unique), `num_registers` (0: no edit in this block), `mode`, `normal_values`, `scale` and
        `first_normal` (the first token the edit may change: 1 keeps CLS in the reference mode)."""
        spec = self.test_time_registers or {}
        neurons = spec.get("neurons") or {}
        units = sorted({int(unit) for unit in neurons.get(str(layer_index), neurons.get(layer_index, []))})
        mode = spec.get("mode", "per_neuron")  # specs written before modes existed hold the per-neuron edit
        return {
            "neurons": tuple(units),
            "num_registers": int(spec.get("num_tokens", 0)) if units else 0,
            "mode": mode,
            "normal_values": spec.get("normal_values", "zero"),
            "scale": spec.get("scale", 1.0),
            "first_normal": int(self.use_cls_token) if mode == "reference" else 0,
        }

    def use_test_time_registers(self, spec: dict | None) -> None:
        """Set `test_time_registers` to `spec` (see `make_test_time_register_spec`; `None`: off) if the model can take
        it (`check_consistency`); otherwise keep the previous value and raise `ValueError`."""
        previous, self.test_time_registers = self.test_time_registers, spec
        try:
            self.check_consistency()
        except ValueError:
            self.test_time_registers = previous
            raise

    def token_slices(self, num_tokens: int) -> dict[str, tuple[slice, ...]]:
        """Where each token group sits in a sequence of `num_tokens`, laid out as
        `[CLS] + registers + patches + test-time registers`: `{"cls", "registers", "patches"}` → slices (the
        registers' second slice holds the test-time registers). The one place that layout is written down; plain
        slices, so that symbolic sizes (torch.export with dynamic height and width) stay symbolic. The CLS and
        trained-register slices do not depend on `num_tokens`."""
        start, registers_end = int(self.use_cls_token), self.num_prefix_tokens
        end = num_tokens - self.num_test_time_registers
        return {
            "cls": (slice(0, start),),
            "registers": (slice(start, registers_end), slice(end, num_tokens)),
            "patches": (slice(registers_end, end),),
        }

    # ----------------------------------------------------------------------------------------------------------------
    # Checks. transformers 5 validates a config through `validate()` (its `@strict` configs run it at the end of
    # `__init__`, and `save_pretrained` runs it on every config): each `validate_*` method checks one field at a time.
    # Checks that relate two fields run when a model is built (`check_consistency`), so that a config can be written
    # field by field, as with every transformers config (`ViTRegistersConfig(hidden_size=32)` keeps 12 heads until
    # `num_attention_heads` is set too).

    def validate(self) -> None:
        """Run every `validate_*` method of this config (transformers' own and `validate_values`), resolved on this
        class, so that overrides such as `validate_output_attentions` count (transformers' `validate()` calls the
        base class's versions). Called at the end of `__init__` and by `save_pretrained`."""
        for name in dir(type(self)):
            if name.startswith("validate_"):
                getattr(self, name)()

    def validate_values(self) -> None:
        """Per-field checks: types, choices and ranges that do not depend on another field. Sizes may be 0 here, as
        in transformers' configs (its `positive_int` validator, its ConfigTester's `hidden_size=0`);
        `check_consistency` asks for at least 1 where a model needs it."""
        for name in SIZE_FIELDS + ("num_register_tokens",):
            value = getattr(self, name)
            if not _is_integer(value) or value < 0:
                _fail(f"`{name}` must be an integer >= 0, got {value!r}.")
        intermediate = self.intermediate_size
        if intermediate is not None and (not _is_integer(intermediate) or intermediate < 0):
            _fail(f"`intermediate_size` must be None or an integer >= 0, got {intermediate!r}.")
        sizes = self.image_size if isinstance(self.image_size, list) else [self.image_size]
        if len(sizes) not in (1, 2) or any(not _is_integer(size) or size < 0 for size in sizes):
            _fail(f"`image_size` must be one or two integers >= 0, got {self.image_size!r}.")
        if self.mlp_type not in MLP_CHOICES:
            _fail(f"`mlp_type` must be one of {MLP_CHOICES}, got {self.mlp_type!r}.")
        if self.pooling not in POOLING_CHOICES:
            _fail(f"`pooling` must be one of {POOLING_CHOICES}, got {self.pooling!r}.")
        for name, value, choices in (
            ("position_encoding", self.position_encoding, POSITION_ENCODINGS),
            ("rope_type", self.rope_type, ROPE_TYPES),
            ("rope_normalize_coords", self.rope_normalize_coords, ROPE_COORDINATE_NORMALIZATIONS),
        ):
            if value not in choices:
                _fail(f"`{name}` must be one of {choices}, got {value!r}.")
        for name in ("rope_theta", "rope_min_period", "rope_max_period", "rope_jitter_coords", "rope_rescale_coords"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value <= 0):
                _fail(f"`{name}` must be a number > 0{'' if name == 'rope_theta' else ' or None'}, got {value!r}.")
        if self.rope_shift_coords is not None and (
            not _is_number(self.rope_shift_coords) or self.rope_shift_coords < 0
        ):
            _fail(f"`rope_shift_coords` must be a number >= 0 or None, got {self.rope_shift_coords!r}.")
        grid = self.rope_reference_grid
        if grid is not None and (len(grid) != 2 or any(not _is_number(side) or side <= 0 for side in grid)):
            _fail(f"`rope_reference_grid` must be None or two sizes > 0 (rows, columns), got {grid!r}.")
        if not _is_integer(self.mlp_align_to) or self.mlp_align_to < 1:
            _fail(f"`mlp_align_to` must be an integer >= 1, got {self.mlp_align_to!r}.")
        if self.mlp_ratio is not None and self.mlp_ratio <= 0:
            _fail(f"`mlp_ratio` must be > 0, got {self.mlp_ratio!r}.")
        for name in ("drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                _fail(f"`{name}` must be in [0, 1), got {value!r}.")
        if self.interpolate_offset < 0:
            _fail(f"`interpolate_offset` must be >= 0, got {self.interpolate_offset!r}.")
        if self.layer_norm_eps <= 0:
            _fail(f"`layer_norm_eps` must be > 0, got {self.layer_norm_eps!r}.")
        spec = self.test_time_registers
        if spec is not None and (
            not isinstance(spec, dict)
            or not _is_integer(spec.get("num_tokens", 0))
            or spec.get("num_tokens", 0) < 0
            or not isinstance(spec.get("neurons") or {}, dict)
        ):
            _fail("`test_time_registers` must be a dict with `num_tokens` >= 0 and `neurons` {layer: [units]}.")
        if spec is not None:
            mode, normal_values = spec.get("mode", "per_neuron"), spec.get("normal_values", "zero")
            if mode not in TEST_TIME_REGISTER_MODES:
                _fail(f"`test_time_registers['mode']` must be one of {TEST_TIME_REGISTER_MODES}, got {mode!r}.")
            if normal_values not in TEST_TIME_REGISTER_NORMAL_VALUES:
                _fail(
                    f"`test_time_registers['normal_values']` must be one of {TEST_TIME_REGISTER_NORMAL_VALUES}, got "
                    f"{normal_values!r}."
                )
            scale = spec.get("scale", 1.0)
            if not (
                _is_number(scale)
                or isinstance(scale, list)
                and len(scale) == spec.get("num_tokens", 0)
                and all(_is_number(value) for value in scale)
            ):
                _fail(f"`test_time_registers['scale']` must be a number or one number per token, got {scale!r}.")

    def check_consistency(self) -> None:
        """Every check a model needs before it is built: `validate()` (one field at a time), sizes of at least 1,
        and the relations between fields (`hidden_size` divisible by `num_attention_heads`, images of at least one
        patch, CLS-dependent options, test-time register neurons inside the model). Raises `ValueError` naming the
        fields. Called by the model's constructor and by `set_test_time_registers`."""
        self.validate()
        for name in SIZE_FIELDS:
            if getattr(self, name) < 1:
                _fail(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        if self.intermediate_size == 0:
            _fail("`intermediate_size` must be a positive integer (or None to use `mlp_ratio`), got 0.")
        if self.hidden_size % self.num_attention_heads:
            _fail(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        sizes = self.image_size if isinstance(self.image_size, list) else [self.image_size]
        if any(size < self.patch_size for size in sizes):
            _fail(f"`image_size` {self.image_size!r} must be at least `patch_size` ({self.patch_size}) on each side.")
        if not self.use_cls_token and self.pooling not in ("mean", "map"):
            _fail(
                f"`pooling={self.pooling!r}` needs a CLS token; models without one (use_cls_token=False) pool 'mean' "
                "or 'map'."
            )
        if not self.use_cls_token and self.cls_token_has_position_embedding:
            _fail("`cls_token_has_position_embedding=True` needs `use_cls_token=True`.")
        if self.register_tokens_have_position_embedding:
            if self.position_encoding != "learned":
                _fail("`register_tokens_have_position_embedding=True` needs `position_encoding='learned'`.")
            if self.use_cls_token and not self.cls_token_has_position_embedding:
                _fail(
                    "`register_tokens_have_position_embedding=True` with a CLS token needs "
                    "`cls_token_has_position_embedding=True` (the prefix tokens share the stored embeddings)."
                )
        if self.position_encoding == "rope":
            head_dim = self.hidden_size // self.num_attention_heads
            if head_dim % 4:
                _fail(f"`position_encoding='rope'` needs a head size divisible by 4, got {head_dim}.")
            if (self.rope_min_period is None) != (self.rope_max_period is None):
                _fail("`rope_min_period` and `rope_max_period` are given together (or neither).")
        for layer, units in ((self.test_time_registers or {}).get("neurons") or {}).items():
            if not 0 <= int(layer) < self.num_hidden_layers:
                _fail(f"test-time register neurons name layer {layer}, the model has {self.num_hidden_layers}.")
            if any(not 0 <= int(unit) < self.mlp_hidden_size for unit in units):
                _fail(f"test-time register neurons of layer {layer} must lie in [0, {self.mlp_hidden_size}).")

    _check_values = check_consistency  # the earlier name, still called by `set_test_time_registers`

    def validate_output_attentions(self):
        """Every attention backend of this model can return attention weights, so nothing to refuse."""


__all__ = ["ViTRegistersConfig", "make_test_time_register_spec"]
