"""FLOPs per token of a training step (jaxft/flops.py): counted by hand for full fine-tuning, LoRA, QLoRA,
training the top block and prompt tuning, and against XLA's own cost analysis of the compiled forward
pass and gradient; and the peak table against the device names JAX reports."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxft.flops import PEAK_FLOPS, peak_flops, train_flops_per_token
from jaxft.models.decoder import DecoderConfig, DecoderForCausalLM
from jaxft.peft import partial, prompt
from jaxft.peft.lora import LoRAConfig, apply_lora
from jaxft.peft.lora import trainable_filter as lora_filter
from jaxft.peft.quant import quantize_model
from jaxft.peft.select import TrainableFilter, split_model, uniform_groups

_TINY = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
T = 16
FULL = TrainableFilter(((r".*", True),))

# _TINY's matmul weights, per layer: q and o 32x32, k and v 32x16 (2 kv heads of 8), gate, up 32x64, down 64x32.
QKV = 32 * 32 + 2 * 32 * 16
BLOCK = QKV + 32 * 32 + 3 * 32 * 64
HEAD = 32 * 64
N = 2 * BLOCK + HEAD
# Causal attention forward per layer and input token: (T^2 / 2 visible pairs) x 2 products x 2 FLOPs x head_dim
# x heads, over T tokens.
ATTENTION = (T * T / 2) * 2 * 2 * 8 * 4 / T


def _top_blocks(n):
    cfg = ml_collections.ConfigDict(dict(patterns="", train_top_blocks=n, train_embeddings=False,
                                         train_lm_head=False))
    return partial.partial_filter(cfg, _TINY.num_layers)


def _lora(model, rank=4):
    apply_lora(model, LoRAConfig(rank=rank), rngs=nnx.Rngs(1))
    return model


def test_full_fine_tuning_is_6n_plus_causal_attention():
    count = train_flops_per_token(DecoderForCausalLM(_TINY, rngs=nnx.Rngs(0)), FULL, T)
    assert count.computed == count.model_6n == 6 * N + 3 * 2 * ATTENTION
    assert count.forward == 2 * N + 2 * ATTENTION
    assert count.breakdown == dict(matmul_forward=2 * N, attention_forward=2 * ATTENTION, input_grad=2 * N,
                                   weight_grad=2 * N, attention_backward=2 * 2 * ATTENTION)
    # PaLM's appendix B counts every query against every key: the attention terms double.
    palm = train_flops_per_token(DecoderForCausalLM(_TINY, rngs=nnx.Rngs(0)), FULL, T, halve_causal=False)
    assert palm.computed == 6 * N + 3 * 2 * 2 * ATTENTION and not palm.halve_causal


def test_lora_counts_frozen_weights_4p_except_below_the_first_adapter():
    """LoRA rank 4 on every linear but the head: adapters 6P, frozen weights 4P (the gradient flows down
    through them to the adapters below), except the layer-0 q/k/v kernels and their A matrices, which
    read the embeddings (nothing below them trains): those are forward only, 2P."""
    model = _lora(DecoderForCausalLM(_TINY, rngs=nnx.Rngs(0)))
    # Per layer, A [in, 4] and B [4, out] for q, k, v, o, gate, up, down.
    a = 4 * (32 * 6 + 64)
    b = 4 * (32 + 16 + 16 + 32 + 64 + 64 + 32)
    lora = 2 * (a + b)
    qkv_a = 4 * 32 * 3  # layer 0's A for q, k and v
    count = train_flops_per_token(model, lora_filter(), T)
    assert count.computed == 4 * N + 6 * lora - 2 * QKV - 2 * qkv_a + 3 * 2 * ATTENTION
    assert count.breakdown["weight_grad"] == 2 * lora
    # 6N + attention counts every weight as trained: the frozen ones' weight gradients are never computed.
    assert count.model_6n == 6 * (N + lora) + 3 * 2 * ATTENTION
    assert count.model_6n / count.computed == pytest.approx(1.43, abs=0.01)


def test_qlora_codes_count_as_their_float_shape():
    """Quantised bases do the same matmuls (dequantised to the compute dtype): the count is LoRA's."""
    lora = train_flops_per_token(_lora(DecoderForCausalLM(_TINY, rngs=nnx.Rngs(0))), lora_filter(), T)
    qmodel = _lora(DecoderForCausalLM(_TINY, rngs=nnx.Rngs(0)))
    quantize_model(qmodel, "int8")
    assert train_flops_per_token(qmodel, lora_filter(), T) == lora


def test_training_the_top_block_runs_the_backward_pass_through_it_and_the_head_only():
    model = DecoderForCausalLM(_TINY, rngs=nnx.Rngs(0))
    trainable = _top_blocks(1)
    uniform_groups(model, trainable)
    count = train_flops_per_token(model, trainable, T)
    # Block 1 trains (6P, attention backward); the frozen head passes the gradient down (4P); block 0 only
    # runs forward (2P, no attention backward).
    assert count.computed == 6 * BLOCK + 4 * HEAD + 2 * BLOCK + 2 * ATTENTION + 2 * ATTENTION
    assert count.model_6n == 6 * N + 3 * 2 * ATTENTION


def test_prompt_tuning_lengthens_the_blocks_rows_and_counts_per_input_token():
    """8 virtual tokens before 16 input tokens: the blocks run on 24 rows and attend over 24 positions, the
    head reads 16; all per input token. The prompt sits under everything, so every weight is 4P."""
    model = DecoderForCausalLM(_TINY, rngs=nnx.Rngs(0))
    prompt.apply_prompt_tuning(model, 8, rngs=nnx.Rngs(1))
    count = train_flops_per_token(model, prompt.trainable_filter(), T)
    rows = (T + 8) / T
    attention = ((T + 8) ** 2 / 2) * 2 * 2 * 8 * 4 / T
    assert count.computed == pytest.approx(4 * 2 * BLOCK * rows + 4 * HEAD + 3 * 2 * attention)
    assert count.virtual_tokens == 8 and count.breakdown["weight_grad"] == 0


def test_sliding_window_counts_the_pairs_it_sees_and_an_abstract_model_counts_the_same():
    cfg = dataclasses.replace(_TINY, sliding_window=4)
    count = train_flops_per_token(nnx.eval_shape(lambda: DecoderForCausalLM(cfg, rngs=nnx.Rngs(0))), FULL, T)
    pairs = T * 4 - 4 * 4 / 2  # each query sees min(position + 1, 4) keys
    assert count.breakdown["attention_forward"] == 2 * pairs * 2 * 2 * 8 * 4 / T
    concrete = train_flops_per_token(DecoderForCausalLM(cfg, rngs=nnx.Rngs(0)), FULL, T)
    assert concrete == count


# ----------------------------------------------------------------------------- against XLA

# Wide enough that the matmuls dominate XLA's count (norms, RoPE, softmax, the loss add 1-2% at this width);
# unrolled, because XLA's cost analysis counts a while loop's (scan's) body once; the dense XLA attention,
# which computes every (query, key) pair: the unhalved count.
_WIDE = DecoderConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                    num_kv_heads=4, head_dim=32, layer_loop="unroll", attention="xla")
_ROWS = 32


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # a list of one dict on older jax
    return cost["flops"]


@pytest.mark.parametrize("method", ["full", "lora", "top1"])
def test_counts_match_xla_cost_analysis_of_the_compiled_step(method):
    """XLA's FLOPs for the forward pass and for the gradient of the trainable parameters are our matmul
    and attention count plus 0-5% of elementwise work: never less (we would be counting matmuls XLA does
    not run, e.g. input gradients below the lowest trained parameter) and never much more (we would be
    missing matmuls)."""
    model = DecoderForCausalLM(_WIDE, rngs=nnx.Rngs(0))
    trainable = {"full": FULL, "lora": lora_filter(), "top1": _top_blocks(1)}[method]
    if method == "lora":
        _lora(model, rank=8)
    uniform_groups(model, trainable)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, _WIDE.vocab_size, (1, _ROWS)), jnp.int32)
    graphdef, params, rest = split_model(model, trainable)
    loss = lambda p, r: jnp.mean(jnp.square(nnx.merge(graphdef, p, r)(ids)))  # noqa: E731
    count = train_flops_per_token(model, trainable, _ROWS, halve_causal=False)
    step = _xla_flops(jax.grad(loss), params, rest) / _ROWS
    assert 1.0 <= step / count.computed < 1.05, (step, count.computed)
    if method == "full":
        forward = _xla_flops(loss, params, rest) / _ROWS
        assert 1.0 <= forward / count.forward < 1.03, (forward, count.forward)


# ----------------------------------------------------------------------------- peaks


def test_peak_flops_of_the_device_names_jax_reports():
    # TPU names as jax/_src/pallas/mosaic/tpu_info.py matches them; NVIDIA's as the driver names the boards.
    assert peak_flops("TPU v4") == 275e12
    assert peak_flops("TPU v5 lite") == peak_flops("TPU v5e") == 197e12
    assert peak_flops("TPU v5") == peak_flops("TPU v5p") == 459e12
    assert peak_flops("TPU v6 lite") == peak_flops("TPU v6e") == 918e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == peak_flops("NVIDIA H200") == 989.5e12
    assert peak_flops("NVIDIA H100 PCIe") == 756.5e12
    for a100 in ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"):
        assert peak_flops(a100) == 312e12
    # No number is better than a made-up one: CPUs, older or unknown chips, MIG slices.
    for unknown in ("cpu", "", None, "TPU v3", "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "NVIDIA GeForce RTX 4090"):
        assert peak_flops(unknown) is None
    assert peak_flops(jax.devices()[0].device_kind) is None  # the tests run on CPU
    assert all(1e14 < v < 1e15 for v in PEAK_FLOPS.values())  # dense bf16, not sparse or fp8
