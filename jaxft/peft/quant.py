"""Quantised frozen base weights for QLoRA (Dettmers et al. 2023).

`quantize_model` replaces a model's `Linear` layers with `QuantizedLinear`,
which keeps the kernel as 4-bit NormalFloat (NF4) or int8 codes plus float32
scales and dequantises to the compute dtype inside the forward pass. LoRA then
wraps a `QuantizedLinear` exactly as it wraps a `Linear`: only `base_layer(x)`,
`in_features` and `out_features` are read.

The codes and scales are `QuantizedWeight` variables, not `nnx.Param`: the one
trainable filter only ever trains `nnx.Param`, so they get no gradient and no
optimizer state by construction, whatever the filter's patterns say.

NF4 follows bitsandbytes bit for bit in layout: the kernel is flattened
row-major, cut into blocks of `block_size` consecutive values, each block
scaled by its absmax (float32), each value mapped to the nearest of the 16 NF4
codes, two codes per byte with the first in the high nibble.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.errors import ConfigError
from jaxft.models.layers import Linear
from jaxft.peft.select import path_str, set_module

KINDS = ("nf4", "int8")

# The NF4 data type: quantiles of N(0, 1) normalised to [-1, 1] with an exact zero, 8 positive
# and 7 negative values (QLoRA appendix E; bitsandbytes `get_4bit_type("nf4")`, the same floats
# its CUDA kernels hard-code). Hard-coded rather than recomputed so no scipy/float rounding
# detail can move a code; tests/test_quant.py checks them against the quantile construction.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

# Decision boundaries of nearest-code rounding: the midpoints between neighbouring codes
# (bitsandbytes' dQuantizeNF4 compares against these same midpoints).
_NF4_MIDPOINTS = ((NF4_CODE[1:].astype(np.float64) + NF4_CODE[:-1]) / 2).astype(np.float32)


class QuantizedWeight(nnx.Variable):
    """Quantised codes or their scales: frozen base weights, never an `nnx.Param`, so never trained."""


# ---------------------------------------------------------------------------
# NF4


def _check_block_size(block_size: int) -> None:
    # Two codes share a byte, so a block must hold an even number of them.
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ConfigError(f"NF4 block_size={block_size!r} must be an even integer >= 2 (QLoRA uses 64).")


def quantize_nf4(w, block_size: int = 64) -> tuple[jax.Array, jax.Array, tuple[int, ...]]:
    """Block-wise NF4: `(packed uint8 [ceil(n / block) * block / 2], absmax float32 [blocks], w.shape)`.

    A size that is not a multiple of `block_size` is zero-padded at the end; the
    padding cannot raise the last block's absmax and `dequantize_nf4` cuts it off.
    """
    _check_block_size(block_size)
    shape = tuple(int(d) for d in np.shape(w))
    flat = jnp.asarray(w).astype(jnp.float32).reshape(-1)
    pad = -flat.size % block_size
    packed, absmax = _quantize_nf4_blocks(jnp.pad(flat, (0, pad)).reshape(-1, block_size))
    return packed, absmax, shape


@jax.jit
def _quantize_nf4_blocks(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`[blocks, block_size]` float32 -> packed codes, absmax per block."""
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    # An all-zero block has absmax 0: divide by 1 instead, so its values map to code 0.0, not NaN.
    normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[:, None]
    # side="left" counts the midpoints strictly below x: nearest code, a tie going to the lower one.
    codes = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), normed.reshape(-1), side="left").astype(jnp.uint8)
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1], absmax


def unpack_nf4(packed: jax.Array) -> jax.Array:
    """The 4-bit code indices (0..15) in storage order, two per byte, high nibble first."""
    packed = packed.reshape(-1)
    return jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)


# Jitted on its own so an eager forward pass runs one compiled computation per layer shape instead of
# dispatching its ops one by one; inside an outer jit it is inlined.
@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def dequantize_nf4(packed: jax.Array, absmax: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Invert `quantize_nf4`: `absmax * code` in float32, cast to `dtype`, padding dropped.

    The block size is implied by the array sizes (values / blocks), so the
    packed codes and scales may be stored in any shape. Jit-able with `shape`
    static; this runs inside every forward pass of a quantised layer.
    """
    absmax = absmax.reshape(-1)
    values = jnp.take(jnp.asarray(NF4_CODE), unpack_nf4(packed).astype(jnp.int32))
    values = (values.reshape(absmax.size, -1) * absmax[:, None]).reshape(-1)
    return values[:math.prod(shape)].reshape(shape).astype(dtype)


# ---------------------------------------------------------------------------
# int8


@jax.jit
def quantize_int8(w) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-output-channel int8: codes [in, out] in [-127, 127], scale = absmax / 127 per column."""
    w = jnp.asarray(w).astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=0) / 127.0
    # A zero column keeps scale 0 (it dequantises to exact zeros); divide by 1 to avoid NaN codes.
    codes = jnp.round(w / jnp.where(scale == 0, 1.0, scale)[None, :])
    return jnp.clip(codes, -127, 127).astype(jnp.int8), scale


def dequantize_int8(codes: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Invert `quantize_int8`: `codes * scale` per column in float32, cast to `dtype`."""
    return (codes.astype(jnp.float32) * scale[None, :]).astype(dtype)


# ---------------------------------------------------------------------------
# The layer


class QuantizedLinear(nnx.Module):
    """A frozen `Linear` whose kernel is held quantised (NF4 or int8) and dequantised per call.

    Same interface as `Linear` (`in_features`, `out_features`, `dtype`, `bias`,
    `__call__`), so LoRA wraps it unchanged. `codes` and `scales` are
    `QuantizedWeight`s; the bias stays the `nnx.Param` it was.
    """

    def __init__(self, codes: QuantizedWeight, scales: QuantizedWeight, *, kind: str, in_features: int,
                 out_features: int, dtype, bias: nnx.Param | None, block_size: int | None = None):
        self.kind = kind
        self.block_size = block_size
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.codes = codes
        self.scales = scales
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: Linear, kind: str = "nf4", block_size: int = 64) -> QuantizedLinear:
        """Quantise `linear`'s kernel; `block_size` applies to NF4 only."""
        if kind not in KINDS:
            raise ConfigError(f"quantisation kind {kind!r} is not supported; use one of {list(KINDS)}.")
        kernel = linear.kernel.get_value()
        axes = tuple(linear.kernel.get_metadata().get("logical_axes", (None, None)))
        if kind == "nf4":
            codes, scales, block_size = _nf4_storage(kernel, block_size, axes)
        else:
            q, scale = quantize_int8(kernel)
            codes = QuantizedWeight(q, logical_axes=axes)
            scales = QuantizedWeight(scale, logical_axes=(axes[1],))
            block_size = None
        return cls(codes, scales, kind=kind, in_features=linear.in_features, out_features=linear.out_features,
                   dtype=linear.dtype, bias=linear.bias, block_size=block_size)

    def dequantized_kernel(self, dtype=jnp.float32) -> jax.Array:
        """The kernel `[in, out]` the codes stand for, in `dtype` (float32 by default; for merge and export)."""
        if self.kind == "nf4":
            return dequantize_nf4(self.codes.get_value(), self.scales.get_value(),
                                  (self.in_features, self.out_features), dtype)
        return dequantize_int8(self.codes.get_value(), self.scales.get_value(), dtype)

    def to_linear(self, kernel=None) -> Linear:
        """A float `Linear` with this layer's bias and `kernel` (default: the dequantised one), for
        merged export: the merged weight W + s A B is no longer on the quantisation grid."""
        kernel = self.dequantized_kernel() if kernel is None else kernel
        linear = Linear(self.in_features, self.out_features, use_bias=self.bias is not None, dtype=self.dtype,
                        param_dtype=kernel.dtype, rngs=nnx.Rngs(0))
        linear.kernel.set_value(kernel)
        if self.bias is not None:
            linear.bias.set_value(self.bias.get_value())
        return linear

    def __call__(self, x: jax.Array) -> jax.Array:
        # Dequantised on the fly: the float kernel exists only transiently inside the step.
        y = x.astype(self.dtype) @ self.dequantized_kernel(self.dtype)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(self.dtype)
        return y


def _nf4_storage(kernel, block_size, axes):
    """NF4 codes and absmax as QuantizedWeights, laid out `[in, out/2]` and `[in, out/block]` where blocks
    tile the rows (out % block_size == 0, the usual case), so both keep the kernel's logical axes and a
    shard along either axis holds whole blocks; flat with no axis names otherwise."""
    packed, absmax, (n_in, n_out) = quantize_nf4(kernel, block_size)
    if n_out % block_size == 0:
        return (QuantizedWeight(packed.reshape(n_in, n_out // 2), logical_axes=axes),
                QuantizedWeight(absmax.reshape(n_in, n_out // block_size), logical_axes=axes), block_size)
    return (QuantizedWeight(packed, logical_axes=(None,)),
            QuantizedWeight(absmax, logical_axes=(None,)), block_size)


# ---------------------------------------------------------------------------
# Whole models


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """True when the dotted `name` ends in one of `skip`, matched on whole path components."""
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model(model: nnx.Module, kind: str, block_size: int = 64,
                   skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace every plain `Linear` (also one already wrapped as a LoRA `base_layer`) with a
    `QuantizedLinear` in place, except those whose path ends in `skip`; returns the replaced paths.

    The output head is skipped by default, as in QLoRA: it is small next to the
    body and its error goes straight into the logits.
    """
    if kind not in KINDS:
        raise ConfigError(f"quantisation kind {kind!r} is not supported; use one of {list(KINDS)}.")
    if kind == "nf4":
        _check_block_size(block_size)
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    chosen = {path_str(p): m for p, m in nnx.iter_modules(model) if type(m) is Linear}
    chosen = {name: m for name, m in chosen.items() if not _skipped(name, skip)}
    for name, linear in chosen.items():
        set_module(model, name, QuantizedLinear.from_linear(linear, kind=kind, block_size=block_size))
    return list(chosen)


def quantized_modules(model: nnx.Module) -> dict[str, QuantizedLinear]:
    """Every `QuantizedLinear` by dotted path."""
    return {path_str(p): m for p, m in nnx.iter_modules(model) if isinstance(m, QuantizedLinear)}


def weight_bytes(model: nnx.Module) -> dict:
    """What the quantised kernels take (codes + scales) against the same kernels in bfloat16, for the run log."""
    layers = quantized_modules(model).values()
    quantized = sum(_nbytes(m.codes) + _nbytes(m.scales) for m in layers)
    bf16 = sum(2 * m.in_features * m.out_features for m in layers)
    return dict(layers=len(layers), quantized_bytes=quantized, bf16_bytes=bf16,
                ratio=quantized / bf16 if bf16 else float("nan"))


def _nbytes(variable: nnx.Variable) -> int:
    value = variable.get_value()
    return int(value.size) * np.dtype(value.dtype).itemsize

