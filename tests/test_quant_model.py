"""QLoRA beyond the number formats (tests/test_quant.py): the backward pass that dequantises again,
quantised embeddings and head (`peft.quant_embeddings`), and quantising while loading."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.errors import ConfigError
from jaxft.models.hf import load_pretrained
from jaxft.models.layers import Embed, Linear
from jaxft.peft.lora import LoRAConfig, LoRALinear, apply_lora
from jaxft.peft.quant import (
    NF4_CODE,
    QuantizedEmbed,
    QuantizedLinear,
    QuantSpec,
    dequantize_model,
    quantize_model,
    quantized_modules,
    weight_bytes,
)
from jaxft.peft.select import path_str
from tests.conftest import QUICKSTART

NF4_HALF_GAP = float(np.max(np.diff(NF4_CODE.astype(np.float64))) / 2)


def _linear(n_in, n_out, seed=0):
    return Linear(n_in, n_out, use_bias=True, axes=("embed", "mlp"), rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_backward_keeps_codes_not_the_float_kernel(kind):
    """The vjp's residuals are the quantised codes and scales; autodiff of the same maths would keep
    the dequantised [in, out] float kernel. The gradient is the same either way."""
    q = QuantizedLinear.from_linear(_linear(128, 192), kind=kind)
    x = jax.random.normal(jax.random.key(0), (4, 128))
    dy = jax.random.normal(jax.random.key(1), (4, 192))

    y, vjp = jax.vjp(q, x)
    residual_shapes = {(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(vjp)}
    assert ((128, 192), jnp.float32) not in residual_shapes
    assert any(dtype in (jnp.uint8, jnp.int8) for _, dtype in residual_shapes)

    kernel = q.dequantized_kernel()
    plain = lambda x: x @ kernel + q.bias.get_value()  # noqa: E731
    y_ref, vjp_ref = jax.vjp(plain, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(vjp(dy)[0]), np.asarray(vjp_ref(dy)[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(vjp(dy)[0]), np.asarray(dy) @ np.asarray(kernel).T, atol=1e-4)
    # Each dequantisation sits behind a barrier tying it to its activation, so TPU/GPU XLA can neither
    # merge the backward's with the forward's nor hoist them. (XLA CPU drops such barriers before its
    # CSE pass, so on CPU the compiled step keeps the float kernels anyway: bench/README.md.)
    step = jax.jit(jax.grad(lambda x: jnp.sum(q(x) ** 2)))
    for platform in ("tpu", "cuda"):
        assert step.trace(x).lower(lowering_platforms=(platform,)).as_text().count("optimization_barrier") == 2


def _embed(vocab=96, dim=128, seed=0):
    embed = Embed(vocab, dim, rngs=nnx.Rngs(seed))
    embed.embedding.set_value(0.5 * jax.random.normal(jax.random.key(seed + 7), (vocab, dim)))
    return embed


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_embed_lookup_and_tied_head(kind):
    embed = _embed()
    q = QuantizedEmbed.from_embed(embed, kind=kind, block_size=64)
    table = np.asarray(q.dequantized_table(), np.float64)
    w = np.asarray(embed.embedding.get_value(), np.float64)
    absmax_rows = np.abs(w).reshape(96, -1, 64).max(-1) if kind == "nf4" else np.abs(w).max(-1, keepdims=True)
    step = np.repeat(absmax_rows, 64 if kind == "nf4" else 128, axis=1)
    bound = step * (NF4_HALF_GAP if kind == "nf4" else 0.5 / 127)  # half a code step, per value
    assert np.all(np.abs(table - w) <= bound * (1 + 1e-5) + 1e-9)

    ids = jnp.asarray([[3, 0, 95], [7, 7, 41]])
    np.testing.assert_allclose(np.asarray(q(ids)), table[np.asarray(ids)], rtol=1e-6, atol=1e-7)
    x = jax.random.normal(jax.random.key(2), (2, 3, 128))
    np.testing.assert_allclose(np.asarray(q.attend(x)), np.asarray(x) @ table.T, rtol=1e-4, atol=1e-4)
    grad = jax.grad(lambda x: jnp.sum(q.attend(x) ** 2))(x)  # through the custom backward
    expected = 2 * (np.asarray(x, np.float64) @ table.T) @ table
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-3, atol=1e-3)

    back = q.to_embed()
    assert type(back) is Embed and np.array_equal(np.asarray(back.embedding.get_value()), table.astype(np.float32))


def test_quantized_embed_needs_a_block_that_divides_the_width():
    with pytest.raises(ConfigError, match="quant_block_size=48 must divide the embedding width 128"):
        QuantizedEmbed.from_embed(_embed(), kind="nf4", block_size=48)


def _quickstart_ids():
    return jnp.asarray(np.random.default_rng(0).integers(3, 1024, size=(2, 12)), jnp.int32)


@pytest.mark.parametrize("embeddings", [False, True])
def test_quantising_while_loading_equals_quantising_after(embeddings):
    """`load_pretrained(on_param=spec.on_param)` never holds the float model whole and gives the very
    codes, scales and logits of loading in float and quantising afterwards."""
    spec = QuantSpec("nf4", 64, skip=() if embeddings else ("lm_head",), embeddings=embeddings)
    after = load_pretrained(QUICKSTART / "model")
    quantize_model(after, spec)
    float_weights_held = []

    def on_param(model, path):
        spec.on_param(model, path)
        # Float layers the spec quantises that hold a real (read) weight: none may outlive its read.
        # (The quickstart model ties its head to the embedding: every Linear is quantised.)
        float_weights_held.append(sum(1 for _, m in nnx.iter_modules(model) if _is_read(m) and (
            type(m) is Linear or (type(m) is Embed and embeddings))))

    during = load_pretrained(QUICKSTART / "model", on_param=on_param)
    assert max(float_weights_held) == 0
    assert sorted(quantized_modules(during)) == sorted(quantized_modules(after))
    assert len(quantized_modules(during)) == 7 + embeddings  # 7 stacked linears (3 layers each); the head is tied
    flat = lambda m: {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m))}  # noqa
    a, b = flat(after), flat(during)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(np.asarray(during(_quickstart_ids())), np.asarray(after(_quickstart_ids())))


def test_loading_quantised_never_holds_more_than_one_float_kernel():
    """Live device memory while loading stays within the final model plus the largest kernel: each float
    weight is freed as soon as its layer is quantised, not whenever Python's cyclic collector runs."""
    live = lambda: sum(a.nbytes for a in jax.live_arrays())  # noqa: E731
    before, sizes = live(), []
    gc.disable()
    try:
        model = load_pretrained(QUICKSTART / "model", on_param=lambda m, p: (QuantSpec("nf4").on_param(m, p),
                                                                             sizes.append(live())))
    finally:
        gc.enable()
    largest_kernel = 4 * 128 * 352
    assert max(sizes) - before <= sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(model))) \
        + largest_kernel


def _is_read(module) -> bool:
    if type(module) not in (Linear, Embed):
        return False
    weight = module.kernel if isinstance(module, Linear) else module.embedding
    return not isinstance(weight.get_value(), jax.ShapeDtypeStruct)


def test_float_layers_are_gone_after_loading_quantised():
    """Counting only kernels: after the last tensor, no float Linear is left anywhere."""
    spec = QuantSpec("int8", embeddings=True, skip=())
    model = load_pretrained(QUICKSTART / "model", on_param=spec.on_param)
    assert not any(type(m) in (Linear, Embed) for _, m in nnx.iter_modules(model))
    assert isinstance(model.model.embed_tokens, QuantizedEmbed)


def test_lora_wraps_layers_quantised_at_load_and_dequantize_model_restores_floats():
    model = load_pretrained(QUICKSTART / "model", on_param=QuantSpec("nf4").on_param)
    wrapped = apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(0))
    assert len(wrapped) == 21
    assert all(isinstance(m.base_layer, QuantizedLinear) for _, m in nnx.iter_modules(model)
               if isinstance(m, LoRALinear))
    reference = np.asarray(model(_quickstart_ids()))
    dequantize_model(model)
    assert not quantized_modules(model)
    np.testing.assert_allclose(np.asarray(model(_quickstart_ids())), reference, atol=2e-5)


def test_quantised_embeddings_shrink_the_frozen_bytes():
    """On an untied model whose embeddings and head are 60% of it, quantising them is what takes the
    frozen weights under 0.3x their float32 size."""
    from jaxft.models.decoder import DecoderConfig, DecoderForCausalLM
    cfg = DecoderConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=32, tie_word_embeddings=False)
    float32 = _state_bytes(DecoderForCausalLM(cfg, rngs=nnx.Rngs(0)))

    def frozen(embeddings):
        model = DecoderForCausalLM(cfg, rngs=nnx.Rngs(0))
        quantize_model(model, QuantSpec("nf4", embeddings=embeddings, skip=() if embeddings else ("lm_head",)))
        return _state_bytes(model), weight_bytes(model)

    body_only, _ = frozen(False)
    everything, report = frozen(True)
    assert body_only / float32 > 0.5  # float embeddings and head dominate
    assert everything / float32 < 0.16 and report["layers"] == 2 * 7 + 2
    assert report["ratio"] == pytest.approx(0.28125)


def _state_bytes(model) -> int:
    return sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(model)))
