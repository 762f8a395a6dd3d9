"""QLoRA's quantised base weights (jaxft/peft/quant.py), checked against the published NF4 table,
an independent numpy float64 nearest-code reference, and the float model they replace."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.stats import norm
from tokenizers import Tokenizer

from jaxft.errors import ConfigError
from jaxft.models import stack
from jaxft.models.decoder import DecoderConfig, DecoderForCausalLM
from jaxft.models.hf import load_pretrained
from jaxft.models.layers import Linear
from jaxft.peft.lora import LoRAConfig, LoRALinear, apply_lora, lora_modules, trainable_filter
from jaxft.peft.quant import (
    NF4_CODE,
    QuantizedLinear,
    QuantizedWeight,
    dequantize_int8,
    dequantize_nf4,
    quantize_int8,
    quantize_model,
    quantize_nf4,
    unpack_nf4,
    weight_bytes,
)
from jaxft.peft.select import path_str, split_model
from tests.conftest import QUICKSTART

# The NF4 data type as published: QLoRA (Dettmers et al. 2023) appendix E, and bitsandbytes'
# `get_4bit_type("nf4")` / the constants in its CUDA dQuantizeNF4 / dDequantizeNF4.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
CODE64 = np.array(PUBLISHED_NF4, dtype=np.float64)
# Nearest-code rounding is off by at most half the widest gap between codes (that between 0.72 and 1).
NF4_HALF_GAP = np.max(np.diff(CODE64)) / 2


def test_nf4_code_table_is_the_published_one():
    np.testing.assert_array_equal(NF4_CODE, np.array(PUBLISHED_NF4, dtype=np.float32))


def test_nf4_code_table_is_normal_quantiles():
    """The table's construction (bitsandbytes `create_normal_map`): 8 positive and 7 negative quantiles of
    N(0, 1) between offset 0.9677083 and the median, an exact 0, normalised by the largest."""
    offset = 0.9677083
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(NF4_CODE, values / values.max(), rtol=0, atol=1e-6)


def _nf4_reference(w, block_size):
    """Block absmax and nearest-code indices in numpy float64, plus where float32 rounding could flip the choice."""
    flat = np.asarray(w, np.float64).reshape(-1)
    flat = np.pad(flat, (0, -flat.size % block_size)).reshape(-1, block_size)
    absmax = np.abs(flat).max(axis=1)
    normed = flat / np.where(absmax == 0, 1.0, absmax)[:, None]
    idx = np.argmin(np.abs(normed[..., None] - CODE64), axis=-1)
    midpoints = (CODE64[1:] + CODE64[:-1]) / 2
    ambiguous = np.min(np.abs(normed[..., None] - midpoints), axis=-1) < 1e-6
    return absmax, idx, ambiguous


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nf4_round_trip_matches_float64_reference(dtype):
    rng = np.random.default_rng(0)
    w = (0.02 * rng.standard_normal((96, 160))).astype(dtype)
    packed, absmax, shape = quantize_nf4(w)
    assert packed.dtype == jnp.uint8 and packed.size == w.size // 2 and absmax.dtype == jnp.float32
    assert shape == w.shape

    ref_absmax, ref_idx, ambiguous = _nf4_reference(w, 64)
    np.testing.assert_allclose(np.asarray(absmax), ref_absmax, rtol=1e-7)
    idx = np.asarray(unpack_nf4(packed)).reshape(ref_idx.shape)
    assert ambiguous.sum() <= 2  # values within float32 rounding of a decision boundary: rare
    assert np.all((idx == ref_idx) | (ambiguous & (np.abs(idx.astype(int) - ref_idx) == 1)))
    np.testing.assert_array_equal(idx[~ambiguous], ref_idx[~ambiguous])

    deq = np.asarray(dequantize_nf4(packed, absmax, shape)).reshape(ref_idx.shape)
    # Each value is absmax * code up to float32 rounding of absmax and of the product.
    np.testing.assert_allclose(deq, ref_absmax[:, None] * CODE64[idx], rtol=2.5e-7, atol=0)
    err = np.abs(deq - np.asarray(w, np.float64).reshape(ref_idx.shape))
    assert np.all(err <= ref_absmax[:, None] * NF4_HALF_GAP * (1 + 1e-6))


def test_nf4_packs_two_codes_per_byte_high_nibble_first():
    """bitsandbytes' layout: the first of a pair of values in the high nibble."""
    packed, absmax, _ = quantize_nf4(np.array([-1.0, 1.0, 0.0, 0.6]), block_size=4)
    assert np.asarray(absmax).tolist() == [1.0]
    assert np.asarray(packed).tolist() == [0x0F, (7 << 4) | 13]  # codes 0 (-1), 15 (1), 7 (0), 13 (0.5626)


@pytest.mark.parametrize("shape,block_size", [((7, 13), 64), ((5, 3), 4), ((33,), 64)])
def test_nf4_shape_not_a_multiple_of_the_block(shape, block_size):
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    packed, absmax, out_shape = quantize_nf4(w, block_size)
    blocks = -(-w.size // block_size)
    assert absmax.shape == (blocks,) and packed.size == blocks * block_size // 2  # padded, not cut
    ref_absmax, ref_idx, ambiguous = _nf4_reference(w, block_size)
    np.testing.assert_allclose(np.asarray(absmax), ref_absmax, rtol=1e-7)  # the padding never sets absmax
    assert not ambiguous.any()
    deq = np.asarray(dequantize_nf4(packed, absmax, out_shape))
    assert deq.shape == shape
    expected = (ref_absmax[:, None] * CODE64[ref_idx]).reshape(-1)[:w.size].reshape(shape)
    np.testing.assert_allclose(deq, expected, rtol=2.5e-7, atol=0)


def test_zero_weights_quantise_to_exact_zeros():
    for deq in (dequantize_nf4(*quantize_nf4(np.zeros((4, 64)))), dequantize_int8(*quantize_int8(np.zeros((4, 8))))):
        np.testing.assert_array_equal(np.asarray(deq), 0.0)


def test_int8_round_trip_within_half_a_step():
    rng = np.random.default_rng(2)
    w = (0.05 * rng.standard_normal((80, 48))).astype(np.float32)
    codes, scale = quantize_int8(w)
    assert codes.dtype == jnp.int8 and codes.shape == w.shape and scale.shape == (48,)
    np.testing.assert_allclose(np.asarray(scale), np.abs(w).max(axis=0).astype(np.float64) / 127, rtol=1e-6)
    codes = np.asarray(codes)
    assert np.abs(codes).max() == 127 and np.all(np.abs(codes).max(axis=0) == 127)  # each column's range used
    err = np.abs(np.asarray(dequantize_int8(codes, scale)) - w)
    assert np.all(err <= np.asarray(scale)[None, :] / 2 * (1 + 1e-5))


def _linear(n_in, n_out, *, bias, dtype=jnp.float32, seed=0):
    layer = Linear(n_in, n_out, use_bias=bias, dtype=dtype, axes=("embed", "mlp"), rngs=nnx.Rngs(seed))
    if bias:
        layer.bias.set_value(0.1 * jax.random.normal(jax.random.key(seed + 1), (n_out,)))
    return layer


def _error_bound(q: QuantizedLinear) -> np.ndarray:
    """Per-element bound on |dequantised - original| kernel: half a code step, scaled."""
    scales = np.asarray(q.scales.get_value(), np.float64)
    if q.kind == "int8":
        return np.broadcast_to(scales[None, :] / 2, (q.in_features, q.out_features))
    per_value = np.repeat(scales.reshape(-1), q.block_size)[:q.in_features * q.out_features]
    return per_value.reshape(q.in_features, q.out_features) * NF4_HALF_GAP


@pytest.mark.parametrize("kind,n_out", [("nf4", 192), ("nf4", 100), ("int8", 100)])
def test_quantized_linear_matches_dequantized_and_original(kind, n_out):
    linear = _linear(128, n_out, bias=True)
    q = QuantizedLinear.from_linear(linear, kind=kind)
    assert (q.in_features, q.out_features, q.dtype) == (128, n_out, jnp.float32)
    assert q.bias is linear.bias  # the bias stays the Param it was
    x = jax.random.normal(jax.random.key(3), (2, 5, 128))
    y = np.asarray(q(x))
    kernel = np.asarray(q.dequantized_kernel())
    np.testing.assert_allclose(y, np.asarray(x) @ kernel + np.asarray(linear.bias.get_value()), atol=1e-5)

    bound = _error_bound(q)
    w = np.asarray(linear.kernel.get_value())
    assert np.all(np.abs(kernel - w) <= bound * (1 + 1e-5) + 1e-9)
    # |x (W' - W)| <= |x| |W' - W| <= |x| bound, elementwise.
    assert np.all(np.abs(y - np.asarray(linear(x))) <= np.abs(np.asarray(x)) @ bound + 1e-5)


def test_quantized_linear_keeps_logical_axes_when_blocks_tile_rows():
    q = QuantizedLinear.from_linear(_linear(128, 192, bias=False), kind="nf4")
    assert q.codes.get_value().shape == (128, 96) and q.scales.get_value().shape == (128, 3)
    assert q.codes.get_metadata()["logical_axes"] == ("embed", "mlp")
    q8 = QuantizedLinear.from_linear(_linear(128, 192, bias=False), kind="int8")
    assert q8.codes.get_metadata()["logical_axes"] == ("embed", "mlp")
    assert q8.scales.get_metadata()["logical_axes"] == ("mlp",)


def test_quantized_linear_computes_in_its_dtype():
    q = QuantizedLinear.from_linear(_linear(64, 64, bias=True, dtype=jnp.bfloat16), kind="nf4")
    assert q(jnp.ones((3, 64), jnp.float32)).dtype == jnp.bfloat16


class _Holder(nnx.Module):
    def __init__(self, layer):
        self.layer = layer


@pytest.mark.parametrize("kind,max_ratio", [("nf4", 0.3), ("int8", 0.55)])
def test_weight_bytes_against_bfloat16(kind, max_ratio):
    holder = _Holder(_linear(1024, 1024, bias=False))
    quantize_model(holder, kind)
    report = weight_bytes(holder)
    assert report["layers"] == 1 and report["bf16_bytes"] == 1024 * 1024 * 2
    # NF4: 0.5 byte/value + 4 bytes per 64 values = 0.5625 of bf16's 2 -> 0.28125; int8: 1 + 4/1024 -> 0.502.
    expected = {"nf4": 1024 * 512 + 4 * 1024 * 1024 // 64, "int8": 1024 * 1024 + 4 * 1024}[kind]
    assert report["quantized_bytes"] == expected
    assert report["ratio"] <= max_ratio


def test_lora_on_a_quantized_base_trains_only_lora():
    base = QuantizedLinear.from_linear(_linear(64, 96, bias=True), kind="nf4")
    model = _Holder(LoRALinear(base, rank=4, scale=2.0, dropout=0.0, rngs=nnx.Rngs(5)))
    x = jax.random.normal(jax.random.key(6), (3, 64))
    np.testing.assert_array_equal(np.asarray(model.layer(x)), np.asarray(base(x)))  # B = 0: the base exactly
    # A nonzero B, as after a step: with B = 0 the gradient of A is zero by construction.
    model.layer.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(7), (4, 96)))

    graphdef, trainable, rest = split_model(model, trainable_filter())
    assert sorted(path_str(p) for p, _ in nnx.to_flat_state(trainable)) == ["layer.lora_a", "layer.lora_b"]
    quantized = {path_str(p) for p, v in nnx.to_flat_state(rest) if isinstance(v, QuantizedWeight)}
    assert quantized == {"layer.base_layer.codes", "layer.base_layer.scales"}
    params = {path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert params == {"layer.lora_a", "layer.lora_b", "layer.base_layer.bias"}  # no code or scale is a Param

    def loss(params):
        return jnp.mean(jnp.square(nnx.merge(graphdef, params, rest).layer(x)))

    grads = jax.jit(jax.grad(loss))(trainable)
    for path, g in nnx.to_flat_state(grads):
        g = np.asarray(g.get_value())
        assert np.all(np.isfinite(g)) and np.any(g != 0), path_str(path)


def test_dora_initialises_from_the_dequantized_kernel():
    base = QuantizedLinear.from_linear(_linear(64, 96, bias=False), kind="int8")
    dora = LoRALinear(base, rank=4, scale=2.0, dropout=0.0, rngs=nnx.Rngs(5), use_dora=True)
    norms = np.linalg.norm(np.asarray(base.dequantized_kernel()), axis=0)
    np.testing.assert_allclose(np.asarray(dora.lora_magnitude.get_value()), norms, rtol=1e-6)


_TINY = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, tie_word_embeddings=False)


def test_quantize_model_skips_lm_head_by_name():
    model = DecoderForCausalLM(_TINY, rngs=nnx.Rngs(0))
    replaced = quantize_model(model, "nf4", block_size=32)
    assert len(replaced) == 2 * 7 and "lm_head" not in replaced
    assert type(model.lm_head) is Linear and isinstance(model.model.layers[0].mlp.down_proj, QuantizedLinear)
    model = DecoderForCausalLM(_TINY, rngs=nnx.Rngs(0))
    replaced = quantize_model(model, "int8", skip=("lm_head", "mlp.down_proj"))
    assert len(replaced) == 2 * 6 and not any(n.endswith("down_proj") for n in replaced)


def test_quantize_model_reaches_linears_inside_lora_and_trains_them():
    """QLoRA as a whole: LoRA on every linear, their base layers quantised, gradients for the adapters only.

    Quantising after `apply_lora` replaces each wrapper's `base_layer` (`apply_lora` only wraps plain
    `Linear`s, so it must run first)."""
    model = DecoderForCausalLM(_TINY, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 64, size=(2, 8)), jnp.int32)
    wrapped = apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    replaced = quantize_model(model, "nf4", block_size=32)
    assert replaced == [f"{name}.base_layer" for name in wrapped if not name.endswith("lm_head")]
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, QuantizedLinear)

    graphdef, trainable, rest = split_model(model, trainable_filter())
    grads = jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(nnx.merge(graphdef, p, rest)(ids)))))(trainable)
    flat = {path_str(p): np.asarray(g.get_value()) for p, g in nnx.to_flat_state(grads)}
    # One A and one B per wrapped module (the decoder blocks stacked: one module for all their layers).
    assert len(flat) == 2 * len(lora_modules(model)) and all(np.isfinite(g).all() for g in flat.values())
    # B starts at zero, so at step 0 only B has a gradient (A's is x^T (dy B^T) = 0).
    assert all(np.any(g != 0) for name, g in flat.items() if name.endswith("lora_b"))


@pytest.mark.parametrize("kind,block_size,fragment", [
    ("nf3", 64, r"kind 'nf3' is not supported; use one of \['nf4', 'int8'\]"),
    ("nf4", 63, "block_size=63 must be an even integer"),
    ("nf4", 0, "block_size=0 must be an even integer"),
])
def test_bad_kind_or_block_size_is_a_config_error(kind, block_size, fragment):
    with pytest.raises(ConfigError, match=fragment):
        quantize_model(_Holder(_linear(8, 8, bias=False)), kind, block_size=block_size)


def _quickstart_ids():
    """The first four eval rows (prompt + completion), cut to the shortest (20 tokens): text the model knows.

    Tokenised by the `tokenizers` library directly (the same ids as `load_tokenizer`), sparing the
    seconds that importing `transformers` takes."""
    tokenizer = Tokenizer.from_file(str(QUICKSTART / "model" / "tokenizer.json"))
    with open(QUICKSTART / "eval.jsonl") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(4))]
    encoded = [tokenizer.encode(r["prompt"] + r["completion"]).ids for r in rows]
    length = min(len(e) for e in encoded)
    return jnp.asarray([e[:length] for e in encoded], jnp.int32)


def _nll(logits, ids):
    logp = jax.nn.log_softmax(jnp.asarray(logits[:, :-1]), axis=-1)
    return float(-jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)))


# Measured on these 80 tokens (logits' standard deviation 4.26, float next-token loss 4.312):
#   nf4:  max |logits - float| 1.27, mean 0.193, argmax agreement 0.90, loss 4.294
#   int8: max 0.091, mean 0.013, argmax agreement 1.00, loss 4.311
# Expected sizes: NF4 leaves each kernel ~9% (relative RMS) off, a 16-level grid per 64 values; 21 such
# kernels move the logits by ~5% of their spread, while int8's 255 levels per column are ~15x finer.
# The loss shift is what QLoRA claims to be small and is the bound that matters; the logit bounds are
# ~1.5x the measurements, tight enough that a wrong block scale or nibble order (errors of the order of
# the logits themselves) fails.
_TOL = {"nf4": dict(max=2.0, mean=0.3, agree=0.8, loss=0.06), "int8": dict(max=0.15, mean=0.02, agree=1.0, loss=0.01)}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quickstart_model_quantized_logits_and_jit(kind):
    ids = _quickstart_ids()
    reference = np.asarray(load_pretrained(QUICKSTART / "model")(ids))
    model = load_pretrained(QUICKSTART / "model")
    replaced = quantize_model(model, kind)
    assert len(replaced) == 3 * 7  # every linear; the head is the tied embedding, which is no Linear
    assert not any(type(m) is Linear for _, m in nnx.iter_modules(model))
    assert not any(isinstance(v, nnx.Param) and stack.layer_ndim(v) == 2 and "embed_tokens" not in path_str(p)
                   for p, v in nnx.to_flat_state(nnx.state(model)))  # no float kernel left behind

    logits = np.asarray(model(ids))
    err, tol = np.abs(logits - reference), _TOL[kind]
    assert err.max() <= tol["max"] and err.mean() <= tol["mean"], (err.max(), err.mean())
    assert np.mean(logits.argmax(-1) == reference.argmax(-1)) >= tol["agree"]
    assert abs(_nll(logits, ids) - _nll(reference, ids)) <= tol["loss"]

    jitted = nnx.jit(lambda m, i: m(i))(model, ids)
    np.testing.assert_allclose(np.asarray(jitted), logits, atol=1e-4)
