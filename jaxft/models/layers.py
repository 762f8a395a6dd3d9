"""Building blocks shared by the model families.

Every parameter is stored in `param_dtype` and every matmul runs in the
compute `dtype` (e.g. bfloat16); norms, softmax and rotary angles run in
float32, as in Hugging Face `transformers`, because that is where low
precision loses the most.

Parameters carry their logical axis names as `logical_axes` metadata
("embed", "mlp", "heads", "kv_heads", "vocab", "norm"), for the sharding
rules to map onto mesh axes. (Not flax's `out_sharding`: that one shards
eagerly at creation and so needs a mesh even on a laptop.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.sharding import constrain

Dtype = Any

class Linear(nnx.Module):
    """`y = x @ kernel + bias` with kernel `[in, out]` (HF stores `[out, in]`).

    LoRA and quantisation wrap or replace instances of this class, so model
    code calls it and never reads `kernel` itself.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        kernel_init=nnx.initializers.normal(0.02),  # HF's initializer_range default
        axes: tuple[str | None, str | None] = (None, None),
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.kernel = nnx.Param(
            kernel_init(rngs.params(), (in_features, out_features), param_dtype),
            logical_axes=tuple(axes),
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding `[vocab, dim]`; `attend` is the tied language-model head."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        embedding_init=nnx.initializers.normal(0.02),
        rngs: nnx.Rngs,
    ):
        self.num_embeddings = num_embeddings
        self.features = features
        self.dtype = dtype
        self.embedding = nnx.Param(
            embedding_init(rngs.params(), (num_embeddings, features), param_dtype),
            logical_axes=("vocab", "embed"),
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        # On a mesh: the table whole along the vocabulary (rows cannot be gathered across its
        # split), the token ids on every device (they are small), the rows then split by width as
        # the table is, then by batch over the same 'fsdp' devices (one all-to-all), and the caller
        # adds 'data'. Asked to go from width to batch split in one step XLA found no direct way and
        # replicated the rows ("involuntary full rematerialization"); with the ids split by batch
        # it did the same to the rows' gradient, to scatter it into the table's (full fine-tuning).
        table = constrain(self.embedding[...], (None, "embed"))
        rows = constrain(jnp.take(table, constrain(ids, (None, None)), axis=0), (None, None, "embed"))
        return constrain(rows, ("batch_fsdp", None, None)).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the embedding matrix: `x @ embedding.T`."""
        return x.astype(self.dtype) @ self.embedding[...].astype(self.dtype).T


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis, computed in float32 like HF.

    `offset`: the output is scaled by `offset + weight`. Gemma stores its norm weights centred on 0 and
    scales by `1 + weight` (offset 1, weights initialised to 0); everyone else scales by the weight itself.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        offset: float = 0.0,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs  # constant-initialised; the argument keeps the constructor uniform
        self.dim = dim
        self.eps = eps
        self.offset = offset
        self.dtype = dtype
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - offset, param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        return (y * (self.offset + self.scale[...].astype(jnp.float32))).astype(self.dtype)


class LayerNorm(nnx.Module):
    """Layer norm over the last axis (GPT-2, BERT), computed in float32; `scale` and `bias` are HF's
    `weight` and `bias`."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # constant-initialised
        self.dim = dim
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


# HF `hidden_act` names -> functions. "gelu_pytorch_tanh" and "gelu_new" are the same tanh approximation.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
}


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """`cap * tanh(x / cap)` (Gemma 2's logit soft-capping), or `x` when `cap` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


# ---------------------------------------------------------------------------
# Rotary position embedding, HF "rotate_half" layout: the two rotated halves of
# a head are its first and second half (not interleaved pairs), so HF q/k
# weights load without a permutation.

ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None
) -> np.ndarray:
    """Inverse frequencies `[head_dim // 2]` (float32), with HF's RoPE scaling (longrope: the short factors;
    `Rope` picks the long ones).

    Computed in numpy at trace time: a constant, no parameter, no device work.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "longrope":
        return _longrope_inv_freq(head_dim, theta, scaling["short_factor"])
    if rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend between.
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")


def _longrope_inv_freq(dim: int, theta: float, factors) -> np.ndarray:
    # LongRoPE (Phi-3): each frequency divided by its own searched factor. As transformers computes it, in
    # float32 with the exponent from int64 steps.
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.asarray(factors, np.float32) * np.float32(theta) ** exponent)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Rope:
    """The rotary embedding of one kind of layer: how many of a head's dimensions rotate (`dim`: all of them,
    or Phi's `partial_rotary_factor` of them), their base `theta` and HF scaling dict.

    LongRoPE (Phi-3 128k) has two sets of frequencies: the short ones for sequences within
    `original_max_position_embeddings`, the long ones beyond, chosen per call by the largest position
    (transformers chooses the same way), and scales cos and sin by `attention_factor`.
    """

    dim: int
    theta: float
    scaling: Mapping[str, Any] | None = None
    max_position_embeddings: int | None = None

    def cos_sin(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin `[B, T, dim]` (float32) for integer `positions` `[B, T]`."""
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.dim, self.theta, self.scaling))
        if self._type() != "longrope":
            return cos, sin
        s = self.scaling
        original = s["original_max_position_embeddings"]
        long_cos, long_sin = rope_cos_sin(positions, _longrope_inv_freq(self.dim, self.theta, s["long_factor"]))
        use_long = jnp.max(positions) + 1 > original
        factor = self._attention_factor()
        return (jnp.where(use_long, long_cos, cos) * factor, jnp.where(use_long, long_sin, sin) * factor)

    def _type(self) -> str:
        s = self.scaling or {}
        return s.get("rope_type", s.get("type", "default"))

    def _attention_factor(self) -> float:
        s = self.scaling
        if s.get("attention_factor") is not None:
            return float(s["attention_factor"])
        original = s["original_max_position_embeddings"]
        factor = s.get("factor") or self.max_position_embeddings / original
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape `[B, T, 2 * len(inv_freq)]` (float32) for integer `positions` `[B, T]`."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x` `[B, T, heads, head_dim]` in float32; returns x's dtype. cos and sin `[B, T, dim]` may
    cover only the first `dim` of each head's dimensions (partial rotary): the rest pass unrotated."""
    x32 = x.astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    dim = cos.shape[-1]
    rotated = x32[..., :dim] * cos + rotate_half(x32[..., :dim]) * sin
    if dim < x.shape[-1]:
        rotated = jnp.concatenate([rotated, x32[..., dim:]], axis=-1)
    return rotated.astype(x.dtype)
