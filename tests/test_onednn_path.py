"""The oneDNN CPU kernel of `ViTRegistersLayer` (`vit_registers.onednn`: `kernelize`, `can_use_onednn`,
`onednn_block_forward`).

It must give the regular path's outputs on every token and the regular path's gradients on every parameter (float32
rounding only), keep every output group intact, and step aside wherever it could change behaviour: hooks, replaced
forwards, other dtypes, autocast, oneDNN switched off.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from test_modeling import FAMILIES
from test_modeling import tiny_model as reference_model

from vit_registers import ViTRegistersForImageClassification, ViTRegistersModel, onednn
from vit_registers.modeling_vit_registers import ViTRegistersLayer
from vit_registers.onednn import _ONEDNN_LINEAR, OneDNNPolicy

pytestmark = pytest.mark.skipif(
    _ONEDNN_LINEAR is None or not torch.backends.mkldnn.is_available(),
    reason="this torch build has no oneDNN linear op; the regular path is the only one",
)
# max abs difference allowed between the oneDNN and the regular path (float32 outputs of magnitude ~1-10)
TOLERANCE = 2e-5
EVERY_PART = OneDNNPolicy(inference=True, fused_activation=True, training=True)


def tiny_model(*args, **kwargs):
    """The tests' tiny model with its blocks kernelized (`onednn.kernelize`)."""
    model = reference_model(*args, **kwargs)
    assert onednn.kernelize(model) == model.config.num_hidden_layers
    return model


@pytest.fixture(autouse=True)
def every_onednn_part(monkeypatch):
    """Every part of the oneDNN path on, whatever this CPU's policy, so that each is tested on every machine."""
    monkeypatch.setattr(onednn, "onednn_policy", lambda: EVERY_PART)


def count_onednn_calls(monkeypatch) -> list[int]:
    calls = [0]
    original = onednn.onednn_block_forward

    def counting(layer, *args, **kwargs):
        calls[0] += 1
        return original(layer, *args, **kwargs)

    monkeypatch.setattr(onednn, "onednn_block_forward", counting)
    return calls


def regular_and_onednn(model, pixels, **kwargs):
    with torch.no_grad():
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(onednn, "_onednn_path_available", lambda hidden_states: False)
            regular = model(pixels, **kwargs)
        fused = model(pixels, **kwargs)
    return regular, fused


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(layerscale_value=None),  # residual fused into the product's epilogue
        dict(qkv_bias=False, num_register_tokens=0),
        dict(mlp_type="swiglu"),
        dict(hidden_act="gelu_pytorch_tanh"),
        dict(hidden_act="relu"),
        dict(hidden_act="silu"),
        dict(hidden_act="quick_gelu"),  # no oneDNN post-op: activation after the product
        dict(use_cls_token=False, cls_token_has_position_embedding=False, pooling="mean", use_fc_norm=True),
        FAMILIES["dinov3"],  # the rotary (sin, cos) threaded through the oneDNN block
        FAMILIES["map"],
    ],
    ids=[
        "layerscale",
        "no-layerscale",
        "no-qkv-bias",
        "swiglu",
        "gelu-tanh",
        "relu",
        "silu",
        "quick-gelu",
        "gap",
        "dinov3-rope",
        "map",
    ],
)
@pytest.mark.parametrize("fused_activation", [True, False], ids=["activation-fused", "activation-in-place"])
def test_fused_path_matches_regular_path_on_every_token(overrides, fused_activation, monkeypatch):
    policy = OneDNNPolicy(inference=True, fused_activation=fused_activation, training=True)
    monkeypatch.setattr(onednn, "onednn_policy", lambda: policy)
    model = tiny_model(num_register_tokens=overrides.pop("num_register_tokens", 4), **overrides)
    calls = count_onednn_calls(monkeypatch)
    pixels = torch.randn(2, 3, 28, 42)
    regular, fused = regular_and_onednn(model, pixels, output_hidden_states=True)
    assert calls[0] == model.config.num_hidden_layers  # every block took the fused path, once
    torch.testing.assert_close(fused.last_hidden_state, regular.last_hidden_state, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(fused.pooler_output, regular.pooler_output, atol=TOLERANCE, rtol=0)
    for fused_layer, regular_layer in zip(fused.hidden_states, regular.hidden_states, strict=True):
        torch.testing.assert_close(fused_layer, regular_layer, atol=TOLERANCE, rtol=0)
    # hidden states are distinct tensors (nothing written in place) and change from layer to layer
    assert len({t.data_ptr() for t in fused.hidden_states}) == len(fused.hidden_states)
    assert not torch.allclose(fused.hidden_states[1], fused.hidden_states[2])


def test_fused_path_returns_attention_weights_and_test_time_registers(monkeypatch):
    model = tiny_model(num_register_tokens=2)
    model.set_test_time_registers({1: [0, 3, 5], 2: [7]}, num_tokens=1)
    calls = count_onednn_calls(monkeypatch)
    pixels = torch.randn(2, 3, 28, 28)
    regular, fused = regular_and_onednn(model, pixels, attention_layers=[0, -1])
    assert calls[0] == 3
    assert len(fused.attentions) == 2
    for fused_weights, regular_weights in zip(fused.attentions, regular.attentions, strict=True):
        torch.testing.assert_close(fused_weights, regular_weights, atol=1e-6, rtol=0)
        torch.testing.assert_close(fused_weights.sum(-1), torch.ones_like(fused_weights[..., 0]))
    torch.testing.assert_close(fused.last_hidden_state, regular.last_hidden_state, atol=TOLERANCE, rtol=0)
    # the test-time register edit really happened on the fused path: without it the output differs
    model.set_test_time_registers(None)
    with torch.no_grad():
        plain = model(pixels).patch_tokens
    assert (plain - fused.patch_tokens).abs().max() > 1e-3


def test_classifier_logits_match_under_inference_mode(monkeypatch):
    model = tiny_model(ViTRegistersForImageClassification, num_labels=5)
    calls = count_onednn_calls(monkeypatch)
    pixels = torch.randn(3, 3, 28, 28)
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(onednn, "_onednn_path_available", lambda hidden_states: False)
        regular = model(pixels).logits
    with torch.inference_mode():
        fused = model(pixels).logits
    assert calls[0] == model.config.num_hidden_layers
    torch.testing.assert_close(fused, regular, atol=TOLERANCE, rtol=0)


def loss_and_gradients(model, pixels, labels, create_graph=False):
    model.zero_grad(set_to_none=True)
    loss = model(pixels, labels=labels).loss
    if create_graph:  # a gradient penalty on the input: needs the backward itself to be differentiable
        pixels = pixels.requires_grad_()
        loss = model(pixels, labels=labels).loss
        (grad_pixels,) = torch.autograd.grad(loss, pixels, create_graph=True)
        loss = loss + grad_pixels.square().sum()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(layerscale_value=None, qkv_bias=False),
        dict(mlp_type="swiglu"),
        dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, drop_path_rate=0.2),
        FAMILIES["dinov3"],  # train mode: RoPE coordinates rescaled, drawn after the same seed on both paths
    ],
    ids=["layerscale", "no-layerscale", "swiglu", "dropout-droppath", "dinov3-rope"],
)
def test_training_gradients_match_regular_path_on_every_parameter(overrides, monkeypatch):
    model = tiny_model(ViTRegistersForImageClassification, num_labels=5, pooling="cls_mean", **overrides).train()
    calls = count_onednn_calls(monkeypatch)
    pixels, labels = torch.randn(3, 3, 28, 42), torch.tensor([0, 3, 4])
    torch.manual_seed(1)  # dropout and drop path draw their masks in the same order on both paths
    loss, grads = loss_and_gradients(model, pixels, labels)
    assert calls[0] == model.config.num_hidden_layers
    with monkeypatch.context() as patch:
        patch.setattr(onednn, "_onednn_path_available", lambda hidden_states: False)
        torch.manual_seed(1)
        regular_loss, regular_grads = loss_and_gradients(model, pixels, labels)
    assert calls[0] == model.config.num_hidden_layers
    torch.testing.assert_close(loss, regular_loss, atol=1e-5, rtol=0)
    assert grads.keys() == regular_grads.keys()
    assert "vit_registers.encoder.layer.0.attention.qkv.weight" in grads
    for name, grad in grads.items():  # relative to each gradient's scale
        scale = regular_grads[name].abs().max().clamp_min(1e-8)
        assert (grad - regular_grads[name]).abs().max() / scale < 1e-4, name


def record_training_products(monkeypatch) -> list[tuple[bool, bool]]:
    """For every product of `_OneDNNLinearFunction`: (residual added in its epilogue, weight derived from the
    parameter, i.e. LayerScale folded in)."""
    seen = []
    original = onednn._OneDNNLinearFunction.forward

    def forward(ctx, inputs, weight, bias, residual=None):
        seen.append((residual is not None, not isinstance(weight, torch.nn.Parameter)))
        return original(ctx, inputs, weight, bias, residual)

    monkeypatch.setattr(onednn._OneDNNLinearFunction, "forward", staticmethod(forward))
    return seen


@pytest.mark.parametrize(
    "overrides, train, fused, folded",
    [
        (dict(), True, True, True),
        (dict(), False, True, True),  # eval mode with gradients (saliency, attacks): same shape
        (dict(layerscale_value=None), True, True, False),
        (dict(hidden_dropout_prob=0.1), True, False, True),  # dropout between the product and the residual
        (dict(drop_path_rate=0.2), True, "first block only", True),  # the rate grows from 0 in block 0
        (dict(drop_path_rate=0.2), False, True, True),  # drop path is off in eval mode
    ],
    ids=["layerscale", "eval-with-grad", "no-layerscale", "dropout", "drop-path", "drop-path-eval"],
)
def test_training_folds_layerscale_and_fuses_the_residual_where_nothing_stands_between(
    overrides, train, fused, folded, monkeypatch
):
    model = tiny_model(ViTRegistersForImageClassification, num_labels=5, pooling="cls_mean", **overrides).train(train)
    seen = record_training_products(monkeypatch)
    pixels, labels = torch.randn(2, 3, 28, 28), torch.tensor([0, 3])
    torch.manual_seed(1)
    loss, grads = loss_and_gradients(model, pixels, labels)
    depth = model.config.num_hidden_layers
    assert len(seen) == 4 * depth  # qkv, proj, fc1, fc2 per block
    outputs = [entry for index, entry in enumerate(seen) if index % 4 in (1, 3)]  # proj and fc2
    inputs = [entry for index, entry in enumerate(seen) if index % 4 in (0, 2)]  # qkv and fc1
    if fused == "first block only":
        assert outputs == [(True, folded)] * 2 + [(False, folded)] * 2 * (depth - 1)
    else:
        assert outputs == [(fused, folded)] * 2 * depth
    assert inputs == [(False, False)] * 2 * depth
    with monkeypatch.context() as patch:
        patch.setattr(onednn, "_onednn_path_available", lambda hidden_states: False)
        torch.manual_seed(1)
        regular_loss, regular_grads = loss_and_gradients(model, pixels, labels)
    torch.testing.assert_close(loss, regular_loss, atol=1e-5, rtol=0)
    assert grads.keys() == regular_grads.keys()
    assert ("vit_registers.encoder.layer.1.layer_scale2.gamma" in grads) == folded
    for name, grad in grads.items():  # relative to each gradient's scale
        scale = regular_grads[name].abs().max().clamp_min(1e-8)
        assert (grad - regular_grads[name]).abs().max() / scale < 1e-4, name


def test_double_backward_and_gradient_checkpointing_match_regular_path(monkeypatch):
    model = tiny_model(ViTRegistersForImageClassification, num_labels=5)
    model.config._attn_implementation = "eager"  # PyTorch's SDPA kernels have no double backward
    pixels, labels = torch.randn(2, 3, 28, 28), torch.tensor([1, 2])
    loss, grads = loss_and_gradients(model, pixels.clone(), labels, create_graph=True)
    with monkeypatch.context() as patch:
        patch.setattr(onednn, "_onednn_path_available", lambda hidden_states: False)
        regular_loss, regular_grads = loss_and_gradients(model, pixels.clone(), labels, create_graph=True)
    torch.testing.assert_close(loss, regular_loss, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        scale = regular_grads[name].abs().max().clamp_min(1e-8)
        assert (grad - regular_grads[name]).abs().max() / scale < 1e-4, name

    model.activation_checkpointing_enable()
    model.train()
    calls = count_onednn_calls(monkeypatch)
    checkpointed_loss, checkpointed = loss_and_gradients(model, pixels.clone(), labels)
    assert calls[0] == 2 * model.config.num_hidden_layers  # forward, then the recomputation in backward
    model.activation_checkpointing_disable()
    plain_loss, plain = loss_and_gradients(model, pixels.clone(), labels)
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    for name, grad in checkpointed.items():
        torch.testing.assert_close(grad, plain[name])


def test_regular_path_wherever_the_onednn_one_could_change_behaviour(monkeypatch):
    model = tiny_model()
    calls = count_onednn_calls(monkeypatch)
    pixels = torch.randn(1, 3, 28, 28)

    with torch.no_grad():
        model.double()(pixels.double())  # float64
        model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(pixels)  # autocast decides the products' dtype
        with torch.backends.mkldnn.flags(enabled=False):
            model(pixels)  # oneDNN switched off by the user
    assert calls[0] == 0

    # a hook on a submodule the oneDNN path would skip (fc1) must fire, so that block goes the regular way
    seen = []
    handle = model.encoder.layer[1].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        model(pixels)
    handle.remove()
    assert seen == [(1, 1 + 4 + 4, 64)]
    assert calls[0] == model.config.num_hidden_layers - 1  # the two other blocks keep the oneDNN path

    # a replaced activation module (a kernel, a different function) is respected: that block goes the regular way
    mlp = model.encoder.layer[2].mlp
    mlp.activation = torch.nn.Tanh()
    with torch.no_grad():
        replaced = model(pixels).last_hidden_state
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(onednn, "_onednn_path_available", lambda hidden_states: False)
            expected = model(pixels).last_hidden_state
    torch.testing.assert_close(replaced, expected, atol=TOLERANCE, rtol=0)
    assert calls[0] == 2 * model.config.num_hidden_layers - 2
    mlp.activation = onednn.ACT2FN[model.config.hidden_act]
    calls[0] = model.config.num_hidden_layers - 1

    # a replaced forward (as accelerate's offloading hooks do) is respected too
    attention = model.encoder.layer[0].attention
    attention.forward = lambda *a, original=attention.forward, **k: original(*a, **k)
    with torch.no_grad():
        model(pixels)
    assert calls[0] == 2 * model.config.num_hidden_layers - 2


def test_pretrained_default_model_agrees_between_paths():
    from vit_registers.pretrained import default_model_path

    model = ViTRegistersModel.from_pretrained(default_model_path(4))
    onednn.kernelize(model)
    pixels = torch.randn(2, 3, *(g * model.config.patch_size for g in model.config.image_grid))
    regular, fused = regular_and_onednn(model.eval(), pixels)
    torch.testing.assert_close(fused.last_hidden_state, regular.last_hidden_state, atol=1e-4, rtol=0)


def test_compiled_inference_keeps_the_onednn_products_as_opaque_ops():
    """Under torch.compile without gradients the products stay oneDNN custom ops (Inductor fuses the rest); compiled
    training and torch.export keep the plain ATen graph."""
    model = tiny_model(num_register_tokens=2)
    pixels = torch.randn(2, 3, 28, 42)
    graphs = []

    def recording_backend(gm, example_inputs):
        ops = (torch._ops.OpOverloadPacket, torch._ops.OpOverload)
        graphs.append(
            {
                str(n.target) if isinstance(n.target, ops) else getattr(n.target, "__name__", str(n.target))
                for n in gm.graph.nodes
                if n.op == "call_function"
            }
        )
        return gm.forward

    with torch.no_grad():
        expected = model(pixels).last_hidden_state
        compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
        torch.testing.assert_close(compiled(pixels).last_hidden_state, expected, atol=TOLERANCE, rtol=0)
    targets = graphs[-1]
    assert "vit_registers.onednn_linear" in targets  # LayerScale on: no residual inside the product
    assert "vit_registers.onednn_linear_add" not in targets and "linear" not in targets

    torch._dynamo.reset()
    graphs.clear()
    compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
    compiled(pixels).last_hidden_state.sum().backward()  # gradients enabled: plain ops
    assert not any("vit_registers" in target for target in graphs[-1])

    with torch.no_grad():
        exported = torch.export.export(model, (pixels,))
    assert not any("vit_registers" in str(node.target) for node in exported.graph.nodes)
    torch._dynamo.reset()


@pytest.mark.parametrize("layerscale", [True, False], ids=["layerscale", "no-layerscale"])
def test_compiled_train_mode_without_gradients_keeps_the_opaque_ops(layerscale):
    """A validation loop that forgot `model.eval()`: train mode without gradients takes the training shape (folded
    LayerScale, residual in the epilogue) and still compiles to a full graph of the opaque oneDNN ops."""
    model = tiny_model(layerscale_value=1e-1 if layerscale else None).train()
    pixels = torch.randn(2, 3, 28, 42)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    with torch.no_grad():
        expected = model(pixels).last_hidden_state
        compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
        torch.testing.assert_close(compiled(pixels).last_hidden_state, expected, atol=TOLERANCE, rtol=0)
    assert "vit_registers.onednn_linear_add" in graphs[-1]  # proj and fc2: the residual in the epilogue
    assert not any("mkldnn" in target for target in graphs[-1])
    torch._dynamo.reset()


@pytest.mark.parametrize("grad", [True, False], ids=["with-grad", "no-grad"])
def test_monte_carlo_dropout_in_eval_mode_draws_the_regular_masks(grad, monkeypatch):
    """Dropout modules switched back to train mode in an eval-mode model (MC dropout) draw their masks on the oneDNN
    path exactly as on the regular one."""
    model = tiny_model(ViTRegistersForImageClassification, num_labels=5, hidden_dropout_prob=0.3).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.train()
    calls = count_onednn_calls(monkeypatch)
    pixels = torch.randn(2, 3, 28, 28)

    def logits():
        torch.manual_seed(3)
        with torch.set_grad_enabled(grad):
            return model(pixels).logits.detach()

    fused = logits()
    assert calls[0] == model.config.num_hidden_layers
    with monkeypatch.context() as patch:
        patch.setattr(onednn, "_onednn_path_available", lambda hidden_states: False)
        regular = logits()
        torch.manual_seed(4)
        assert not torch.allclose(model(pixels).logits, regular)  # the masks do change the output
    torch.testing.assert_close(fused, regular, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("grad", [True, False], ids=["with-grad", "no-grad"])
@pytest.mark.parametrize("replaced", ["layer_scale2", "drop_path", "attention.proj_dropout"])
def test_replaced_layerscale_dropout_or_drop_path_modules_take_the_regular_path(replaced, grad, monkeypatch):
    class Halve(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states * 0.5

    model = tiny_model(ViTRegistersForImageClassification, num_labels=5).train(grad)
    block = model.vit_registers.encoder.layer[1]
    parent, _, name = ("." + replaced).rpartition(".")
    setattr(block.get_submodule(parent.lstrip(".")) if parent else block, name, Halve())
    calls = count_onednn_calls(monkeypatch)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.set_grad_enabled(grad):
        replaced_logits = model(pixels).logits.detach()
    assert calls[0] == model.config.num_hidden_layers - 1  # the block with the replaced module went the regular way
    with monkeypatch.context() as patch:
        patch.setattr(onednn, "_onednn_path_available", lambda hidden_states: False)
        with torch.set_grad_enabled(grad):
            expected = model(pixels).logits.detach()
    torch.testing.assert_close(replaced_logits, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("fused_activation", [True, False], ids=["activation-fused", "activation-in-place"])
def test_compiled_inference_with_inductor_matches_eager_without_layerscale(fused_activation, monkeypatch):
    policy = OneDNNPolicy(inference=True, fused_activation=fused_activation, training=True)
    monkeypatch.setattr(onednn, "onednn_policy", lambda: policy)
    model = tiny_model(layerscale_value=None)  # the residual joins the product: the opaque linear_add op
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = model(pixels).last_hidden_state
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(pixels).last_hidden_state, expected, atol=TOLERANCE, rtol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ("AVX512", EVERY_PART),
        ("AVX2", OneDNNPolicy(inference=True, fused_activation=False, training=False, min_inference_work=196608)),
        ("DEFAULT", OneDNNPolicy(inference=False, fused_activation=False, training=False)),
        ("SVE256", OneDNNPolicy(inference=False, fused_activation=False, training=False)),
    ],
)
def test_policy_follows_the_cpu_capability(capability, expected, monkeypatch):
    monkeypatch.undo()  # the real policy function, not the fixture's
    monkeypatch.setattr(onednn, "_CPU_CAPABILITY", capability)
    assert onednn.onednn_policy() == expected


def record_products(monkeypatch) -> list[str]:
    """The post-op of every oneDNN product (`onednn_linear` calls), in call order."""
    post_ops = []
    original = onednn.onednn_linear

    def recording(inputs, linear, post_op="none", algorithm="", **kwargs):
        post_ops.append(post_op)
        return original(inputs, linear, post_op, algorithm, **kwargs)

    monkeypatch.setattr(onednn, "onednn_linear", recording)
    return post_ops


@pytest.mark.parametrize(
    "policy",
    [OneDNNPolicy(True, False, False), OneDNNPolicy(False, False, False), OneDNNPolicy(True, True, False)],
    ids=["products-only", "off", "no-training"],
)
def test_each_policy_uses_only_its_parts_and_keeps_the_outputs(policy, monkeypatch):
    model = tiny_model(ViTRegistersForImageClassification, num_labels=5, pooling="cls_mean")
    pixels, labels = torch.randn(2, 3, 28, 42), torch.tensor([1, 4])
    with torch.no_grad():
        regular = model(pixels).logits  # every part on (the fixture's policy)
    monkeypatch.setattr(onednn, "onednn_policy", lambda: policy)
    calls = count_onednn_calls(monkeypatch)
    post_ops = record_products(monkeypatch)
    with torch.no_grad():
        logits = model(pixels).logits
    layers = model.config.num_hidden_layers
    assert calls[0] == (layers if policy.inference else 0)
    # fc1 carries the GELU post-op only where the policy fuses it; the other products never do
    fused = [op for op in post_ops if op != "none"]
    assert fused == (["gelu"] * layers if policy.inference and policy.fused_activation else [])
    assert len(post_ops) == (4 * layers if policy.inference else 0)  # qkv, proj, fc1, fc2 (LayerScale on)
    torch.testing.assert_close(logits, regular, atol=TOLERANCE, rtol=0)

    model.train()
    calls[0] = 0
    model(pixels, labels=labels).loss.backward()
    assert calls[0] == (layers if policy.training else 0)
    calls[0] = 0
    with torch.no_grad():  # train mode without gradients (a reentrant checkpoint's first pass) counts as training
        model(pixels)
    assert calls[0] == (layers if policy.training else 0)
    assert model.vit_registers.encoder.layer[0].mlp.fc1.weight.grad is not None


# ----------------------------------------------------------------------------------------------------------------------
# Prepacked weights (`prepack_weights`)
# ----------------------------------------------------------------------------------------------------------------------
def block_linears(model) -> list[torch.nn.Linear]:
    blocks = [module for module in model.modules() if isinstance(module, ViTRegistersLayer)]
    return [linear for block in blocks for linear in onednn.products(block)]


def record_weights(monkeypatch) -> list[bool]:
    """For every oneDNN product without gradients, whether its weight was a packed (opaque oneDNN) tensor."""
    packed = []
    original = onednn._ONEDNN_LINEAR

    class Recording:
        def __call__(self, inputs, weight, *args):
            packed.append(weight.is_mkldnn)
            return original(inputs, weight, *args)

        def binary(self, inputs, other, weight, *args):
            packed.append(weight.is_mkldnn)
            return original.binary(inputs, other, weight, *args)

    monkeypatch.setattr(onednn, "_ONEDNN_LINEAR", Recording())
    return packed


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(layerscale_value=None), dict(mlp_type="swiglu"), dict(hidden_act="quick_gelu")],
    ids=["layerscale", "residual-in-epilogue", "swiglu", "activation-after-product"],
)
@pytest.mark.parametrize("fused_activation", [True, False], ids=["activation-fused", "activation-in-place"])
def test_prepacked_weights_give_the_plain_outputs_on_every_token(overrides, fused_activation, monkeypatch):
    policy = OneDNNPolicy(inference=True, fused_activation=fused_activation, training=True)
    monkeypatch.setattr(onednn, "onednn_policy", lambda: policy)
    model = tiny_model(**overrides)
    pixels = torch.randn(2, 3, 28, 42)
    regular, plain = regular_and_onednn(model, pixels, output_hidden_states=True)
    assert onednn.prepack_weights(model) == 4 * model.config.num_hidden_layers
    weights = record_weights(monkeypatch)
    with torch.inference_mode():
        packed = model(pixels, output_hidden_states=True)
    assert weights and all(weights)  # every product read its packed weight
    assert len(weights) == 4 * model.config.num_hidden_layers
    for expected in (plain, regular):
        torch.testing.assert_close(packed.last_hidden_state, expected.last_hidden_state, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(packed.register_tokens, expected.register_tokens, atol=TOLERANCE, rtol=0)
        for got, want in zip(packed.hidden_states, expected.hidden_states, strict=True):
            torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)


def test_prepacked_weights_follow_weight_changes(monkeypatch):
    """A pack never outlives its weight: in-place updates, optimizer steps, load_state_dict and replaced tensors are
    each seen on the next forward pass, whose outputs match the plain path of the updated model."""
    model = tiny_model(ViTRegistersForImageClassification, num_labels=5)
    pixels, labels = torch.randn(2, 3, 28, 42), torch.tensor([1, 4])
    onednn.prepack_weights(model)
    first = model.vit_registers.encoder.layer[0]

    def check():
        regular, packed = regular_and_onednn(model, pixels)
        torch.testing.assert_close(packed.logits, regular.logits, atol=TOLERANCE, rtol=0)
        return packed.logits

    before = check()
    with torch.no_grad():
        first.mlp.fc1.weight.mul_(-1.0)  # in place: bumps the version counter
    assert not torch.allclose(check(), before, atol=1e-3)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(pixels, labels=labels).loss.backward()  # gradients take the plain weights
    optimizer.step()
    model.eval()
    after_step = check()

    other = tiny_model(ViTRegistersForImageClassification, seed=1, num_labels=5)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(check(), other(pixels).logits, atol=TOLERANCE, rtol=0)
    assert not torch.allclose(after_step, other(pixels).logits, atol=1e-3)

    first.attention.qkv.weight = torch.nn.Parameter(torch.randn_like(first.attention.qkv.weight))  # a new tensor
    check()


def test_prepack_weights_off_copies_and_saving(tmp_path, monkeypatch):
    model = tiny_model()
    linears = block_linears(model)
    assert onednn.prepack_weights(model) == len(linears)
    assert all(linear in onednn._PACKED_WEIGHTS for linear in linears)
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = model(pixels).last_hidden_state
    # the packs stay outside the module: state dict, save/load and deep copies see only the plain weights
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    model.save_pretrained(tmp_path)
    reloaded = ViTRegistersModel.from_pretrained(tmp_path)
    clone = copy.deepcopy(model)
    for other in (reloaded, clone):
        assert not any(linear in onednn._PACKED_WEIGHTS for linear in block_linears(other))
        with torch.no_grad():
            torch.testing.assert_close(other(pixels).last_hidden_state, expected, atol=TOLERANCE, rtol=0)

    assert onednn.prepack_weights(model, enable=False) == 0
    assert not any(linear in onednn._PACKED_WEIGHTS for linear in linears)
    weights = record_weights(monkeypatch)
    with torch.no_grad():
        model(pixels)
    assert weights and not any(weights)

    onednn.prepack_weights(model)
    gc.collect()  # earlier tests' kernelized models (a bound forward is a reference cycle) go with the cyclic collector
    count = len(onednn._PACKED_WEIGHTS)
    del model, linears
    gc.collect()
    assert len(onednn._PACKED_WEIGHTS) == count - len(block_linears(clone))  # dropped with the model


@pytest.mark.parametrize(
    "policy", [OneDNNPolicy(False, False, False), OneDNNPolicy(False, False, True)], ids=["off", "training-only"]
)
def test_prepack_weights_is_a_no_op_where_onednn_inference_is_off(policy, monkeypatch):
    monkeypatch.setattr(onednn, "onednn_policy", lambda: policy)
    model = tiny_model()
    assert onednn.prepack_weights(model) == 0
    assert not any(linear in onednn._PACKED_WEIGHTS for linear in block_linears(model))


def test_prepack_weights_leaves_other_dtypes_to_the_plain_path():
    model = tiny_model().to(torch.float64)
    assert onednn.prepack_weights(model) == 0
    with torch.no_grad():
        assert model(torch.randn(1, 3, 28, 28, dtype=torch.float64)).last_hidden_state.dtype == torch.float64


def test_small_inputs_take_aten_products_unless_the_weights_are_prepacked(monkeypatch):
    """`min_inference_work`: below it a block keeps its fused path (activation in place, residual and LayerScale in
    one pass) around ATen's products (oneDNN's per-call weight reorder would cost more than it gains); at and above
    it, or with prepacked weights, the products are oneDNN's. Outputs agree with the regular path either way."""
    pixels = {"small": torch.randn(1, 3, 28, 28), "large": torch.randn(4, 3, 28, 28)}
    for overrides in (dict(), dict(layerscale_value=None)):
        model = tiny_model(**overrides)
        tokens = 1 + model.config.num_register_tokens + 4
        policy = OneDNNPolicy(True, False, False, min_inference_work=2 * tokens * model.config.hidden_size)
        layers = model.config.num_hidden_layers
        for size, prepacked, products in (
            ("small", False, 0),
            ("large", False, 4 * layers),
            ("small", True, 4 * layers),
        ):
            onednn.prepack_weights(model, prepacked)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(onednn, "onednn_policy", lambda policy=policy: policy)
                calls = count_onednn_calls(patch)
                in_place = []

                def counting_gelu_(hidden, seen=in_place, gelu_=torch.ops.aten.gelu_):
                    seen.append(1)
                    return gelu_(hidden)

                patch.setitem(onednn._INPLACE_ACTIVATIONS, "gelu", counting_gelu_)
                weights = record_weights(patch)
                regular, fused = regular_and_onednn(model, pixels[size])
            assert calls[0] == layers and len(in_place) == layers  # the block's fused path, activation in place
            assert len(weights) == products  # oneDNN products (none below the threshold without packs)
            assert all(weight == prepacked for weight in weights)
            torch.testing.assert_close(fused.last_hidden_state, regular.last_hidden_state, atol=TOLERANCE, rtol=0)
    monkeypatch.setattr(onednn, "onednn_policy", lambda: policy)
    model.train()  # the threshold is for inference only: training follows `policy.training` (off here)
    calls = count_onednn_calls(monkeypatch)
    model(pixels["large"])
    assert calls[0] == 0


# ----------------------------------------------------------------------------------------------------------------------
# The hook: `kernelize`, `apply_cpu_kernels`, the kernel layer's shape
# ----------------------------------------------------------------------------------------------------------------------
def test_kernelize_binds_the_kernel_per_instance_and_reverts(monkeypatch):
    model = reference_model(ViTRegistersForImageClassification, num_labels=5)
    other = reference_model()
    calls = count_onednn_calls(monkeypatch)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        reference = model(pixels).logits
    assert calls[0] == 0  # not kernelized: the reference forward
    blocks = list(model.vit_registers.encoder.layer)
    assert onednn.kernelize(model) == len(blocks)
    assert all(onednn.is_kernelized(block) for block in blocks)
    assert not any(onednn.is_kernelized(block) for block in other.encoder.layer)  # per instance, not per class
    with torch.no_grad():
        kernelized = model(pixels).logits
    assert calls[0] == len(blocks)
    torch.testing.assert_close(kernelized, reference, atol=TOLERANCE, rtol=0)
    clone = copy.deepcopy(model)  # the bound forward follows the copy, not the original
    assert all(block.forward.__self__ is block for block in clone.vit_registers.encoder.layer)
    assert onednn.kernelize(model, enable=False) == len(blocks)
    assert not any(onednn.is_kernelized(block) for block in blocks)
    with torch.no_grad():
        model(pixels)
    assert calls[0] == len(blocks)  # back to the reference forward
    onednn.kernelize(model)  # nothing of the kernel is state: the same keys as a model never kernelized
    assert set(model.state_dict()) == set(
        reference_model(ViTRegistersForImageClassification, num_labels=5).state_dict()
    )


@pytest.mark.parametrize("setting, expected", [("", True), ("off", False), ("0", False), ("on", True)])
def test_apply_cpu_kernels_follows_the_environment_and_the_device(setting, expected, monkeypatch):
    monkeypatch.setenv("VIT_REGISTERS_CPU_KERNELS", setting)
    model = reference_model()
    layers = model.config.num_hidden_layers
    assert onednn.apply_cpu_kernels(model) == (layers if expected else 0)
    assert all(onednn.is_kernelized(block) == expected for block in model.encoder.layer)
    monkeypatch.setattr(onednn, "onednn_policy", lambda: OneDNNPolicy(False, False, False))
    assert onednn.apply_cpu_kernels(reference_model()) == 0  # a CPU without a measured gain keeps the reference
    assert onednn.apply_cpu_kernels(reference_model().to("meta")) == 0  # not on the CPU


def test_kernel_layer_has_the_shape_of_a_kernels_layer():
    """What the `kernels` package checks before it swaps a layer's forward: the kernel layer keeps no state (no
    constructor, no members beyond nn.Module's and the two capability flags) and its forward has the reference
    signature; the block class carries transformers' kernel mark where `kernels` is installed."""
    import inspect

    layer = onednn.OneDNNViTRegistersLayer
    assert layer.__init__ is torch.nn.Module.__init__
    members = {name for name, _ in inspect.getmembers(layer)} - {
        name for name, _ in inspect.getmembers(torch.nn.Module)
    }
    assert members == {"can_torch_compile", "has_backward"}
    kernel, reference = (inspect.signature(cls.forward).parameters for cls in (layer, ViTRegistersLayer))
    assert [(p.name, p.kind, p.default) for p in kernel.values()] == [
        (p.name, p.kind, p.default) for p in reference.values()
    ]
