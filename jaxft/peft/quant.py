"""Quantised frozen base weights for QLoRA (Dettmers et al. 2023).

`quantize_model` replaces a model's `Linear` layers with `QuantizedLinear`,
which keeps the kernel as 4-bit NormalFloat (NF4) or int8 codes plus float32
scales and dequantises to the compute dtype inside the forward pass. LoRA then
wraps a `QuantizedLinear` exactly as it wraps a `Linear`: only `base_layer(x)`,
`in_features` and `out_features` are read. With `QuantSpec(embeddings=True)`
(`peft.quant_embeddings`) the token embeddings become a `QuantizedEmbed` and the
output head is quantised too. `QuantSpec.on_param` quantises each layer as
`models.hf.load_pretrained` reads it, so the float model never exists whole.

The matmul (`quantized_matmul`) dequantises again in the backward pass rather
than keeping every layer's float kernel from the forward pass.

The codes and scales are `QuantizedWeight` variables, not `nnx.Param`: the one
trainable filter only ever trains `nnx.Param`, so they get no gradient and no
optimizer state by construction, whatever the filter's patterns say.

NF4 follows bitsandbytes bit for bit in layout: the kernel is flattened
row-major, cut into blocks of `block_size` consecutive values, each block
scaled by its absmax (float32), each value mapped to the nearest of the 16 NF4
codes, two codes per byte with the first in the high nibble.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.errors import ConfigError
from jaxft.models import stack
from jaxft.models.layers import Embed, Linear
from jaxft.peft.select import get_module, path_str, set_module
from jaxft.sharding import constrain

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


def dequantize_nf4_rows(packed: jax.Array, absmax: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Rows of the 2-D NF4 layout (blocks tiling each row): packed `[..., n/2]`, absmax `[..., n/block]`
    -> `[..., n]`. An embedding lookup dequantises only the rows it gathered this way."""
    codes = unpack_nf4(packed).reshape(*packed.shape[:-1], -1).astype(jnp.int32)
    values = jnp.take(jnp.asarray(NF4_CODE), codes)
    blocks = values.reshape(*absmax.shape, -1) * absmax[..., None]
    return blocks.reshape(*packed.shape[:-1], -1).astype(dtype)


# ---------------------------------------------------------------------------
# int8


@jax.jit
def quantize_int8(w) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-output-channel int8: codes [..., in, out] in [-127, 127], scale = absmax / 127 per column
    [..., out] (leading axes: stacked layers, each quantised on its own)."""
    w = jnp.asarray(w).astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=-2) / 127.0
    # A zero column keeps scale 0 (it dequantises to exact zeros); divide by 1 to avoid NaN codes.
    codes = jnp.round(w / jnp.where(scale == 0, 1.0, scale)[..., None, :])
    return jnp.clip(codes, -127, 127).astype(jnp.int8), scale


def dequantize_int8(codes: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Invert `quantize_int8`: `codes * scale` per column in float32, cast to `dtype`."""
    return (codes.astype(jnp.float32) * scale[..., None, :]).astype(dtype)


# ---------------------------------------------------------------------------
# The matmul


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def quantized_matmul(x: jax.Array, codes: jax.Array, scales: jax.Array, dequantize) -> jax.Array:
    """`x @ dequantize(codes, scales)`, whose backward pass dequantises the kernel again.

    Plain autodiff would keep the dequantised float kernel of every layer alive
    from the forward to the backward pass, which is exactly the memory QLoRA
    exists to save; here the residuals are the codes and scales. The quantised
    weights are constants: they get no gradient (None, i.e. zero).
    """
    return _dequantized_matmul(x, codes, scales, dequantize)


def _dequantized_matmul(x, codes, scales, dequantize, transpose=False):
    # The barrier ties the dequantisation to the activation it multiplies: without it XLA may
    # hoist every layer's dequantisation to the start of the pass (they depend on arguments alone),
    # or merge the backward pass's with the forward's, and hold all the float kernels at once.
    x, codes, scales = jax.lax.optimization_barrier((x, codes, scales))
    kernel = dequantize(codes, scales)
    return x @ (kernel.T if transpose else kernel)


def _quantized_matmul_fwd(x, codes, scales, dequantize):
    return _dequantized_matmul(x, codes, scales, dequantize), (codes, scales)


def _quantized_matmul_bwd(dequantize, residuals, dy):
    codes, scales = residuals
    return _dequantized_matmul(dy, codes, scales, dequantize, transpose=True), None, None


quantized_matmul.defvjp(_quantized_matmul_fwd, _quantized_matmul_bwd)


# ---------------------------------------------------------------------------
# The layers


class QuantizedLinear(nnx.Module):
    """A frozen `Linear` whose kernel is held quantised (NF4 or int8) and dequantised per call.

    Same interface as `Linear` (`in_features`, `out_features`, `dtype`, `bias`,
    `__call__`), so LoRA wraps it unchanged. `codes` and `scales` are
    `QuantizedWeight`s; the bias stays the `nnx.Param` it was. In stacked decoder
    blocks (jaxft/models/stack.py) they have a leading layer axis, and each layer
    is quantised on its own, exactly as it would be unstacked.
    """

    def __init__(self, codes: QuantizedWeight, scales: QuantizedWeight, *, kind: str, in_features: int,
                 out_features: int, dtype, bias: nnx.Param | None, block_size: int | None = None,
                 kernel_axes: tuple = (None, None)):
        self.kind = kind
        self.kernel_axes = tuple(kernel_axes)  # the float kernel's logical axes (LoRA shards A, B by them)
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
        stacked = stack.stacked_like(linear.kernel)
        axes = tuple(linear.kernel.get_metadata().get("logical_axes") or (None, None))[-2:]  # one layer's
        if kind == "nf4":
            codes, scales, block_size = _nf4_storage(kernel, block_size, axes, stacked)
        else:
            q, scale = _per_layer(quantize_int8, kernel)
            codes = QuantizedWeight(q, **stack.with_layer_axis(axes, stacked))
            scales = QuantizedWeight(scale, **stack.with_layer_axis((axes[1],), stacked))
            block_size = None
        return cls(codes, scales, kind=kind, in_features=linear.in_features, out_features=linear.out_features,
                   dtype=linear.dtype, bias=linear.bias, block_size=block_size, kernel_axes=axes)

    def dequantized_kernel(self, dtype=jnp.float32) -> jax.Array:
        """The kernel `[..., in, out]` the codes stand for (leading axes: stacked layers), in `dtype` (float32
        by default; for merge, export and DoRA's norms)."""
        codes, scales = self.codes.get_value(), self.scales.get_value()
        dequantize = functools.partial(_dequantize_kernel, kind=self.kind, shape=(self.in_features, self.out_features),
                                       dtype=dtype)
        for _ in range(codes.ndim - self._layer_ndim()):  # one layer at a time: flat NF4 pads each layer
            dequantize = jax.vmap(dequantize)
        return dequantize(codes, scales)

    def _layer_ndim(self) -> int:
        """The rank of one layer's codes: 1 for NF4 stored flat, 2 otherwise ([in, out] or [in, out / 2])."""
        return 1 if self.kind == "nf4" and self.out_features % self.block_size else 2

    def to_linear(self, kernel=None) -> Linear:
        """A float `Linear` with this layer's bias and `kernel` (default: the dequantised one), for
        merged export: the merged weight W + s A B is no longer on the quantisation grid."""
        kernel = self.dequantized_kernel() if kernel is None else kernel
        linear = Linear(self.in_features, self.out_features, use_bias=self.bias is not None, dtype=self.dtype,
                        param_dtype=kernel.dtype, axes=self.kernel_axes, rngs=nnx.Rngs(0))
        linear.kernel = nnx.Param(kernel, **stack.with_layer_axis(self.kernel_axes, stack.stacked_like(self.codes)))
        if self.bias is not None:
            linear.bias = self.bias.replace(value=self.bias.get_value())  # a copy, stacked as it is
        return linear

    def __call__(self, x: jax.Array) -> jax.Array:
        # Dequantised on the fly, in the forward and again in the backward pass: the float
        # kernel exists only transiently inside the step.
        dequantize = functools.partial(_dequantize_kernel, kind=self.kind, shape=(self.in_features, self.out_features),
                                       dtype=self.dtype)
        y = quantized_matmul(x.astype(self.dtype), self.codes.get_value(), self.scales.get_value(), dequantize)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(self.dtype)
        return y


def _dequantize_kernel(codes, scales, *, kind, shape, dtype):
    """A `[in, out]` kernel from its NF4 or int8 storage."""
    if kind == "nf4":
        return dequantize_nf4(codes, scales, shape, dtype)
    return dequantize_int8(codes, scales, dtype)


def _per_layer(quantize, kernel):
    """`quantize(w)` for a kernel `[in, out]`, or for each layer of a stacked `[..., in, out]` in turn under
    one `lax.map`: quantising the whole stack at once would hold float temporaries (padded, normalised,
    code indices) the size of every layer's kernel together, which is the load peak QLoRA exists to avoid."""
    *lead, n_in, n_out = kernel.shape
    if not lead:
        return quantize(kernel)
    out = jax.jit(lambda k: jax.lax.map(quantize, k))(kernel.reshape(-1, n_in, n_out))
    return jax.tree.map(lambda o: o.reshape(*lead, *o.shape[1:]), out)


def _nf4_storage(kernel, block_size, axes, stacked):
    """NF4 codes and absmax as QuantizedWeights, laid out `[in, out/2]` and `[in, out/block]` where blocks
    tile the rows (out % block_size == 0, the usual case), so both keep the kernel's logical axes and a
    shard along either axis holds whole blocks; flat with no axis names otherwise. A stacked kernel
    `[layers, in, out]` keeps its layer axis in front, each layer quantised (and padded) on its own."""
    *lead, n_in, n_out = kernel.shape
    packed, absmax = _per_layer(lambda w: quantize_nf4(w, block_size)[:2], kernel)
    if n_out % block_size == 0:  # blocks tile the rows
        return (QuantizedWeight(packed.reshape(*lead, n_in, n_out // 2), **stack.with_layer_axis(axes, stacked)),
                QuantizedWeight(absmax.reshape(*lead, n_in, n_out // block_size),
                                **stack.with_layer_axis(axes, stacked)), block_size)
    return (QuantizedWeight(packed, **stack.with_layer_axis((None,), stacked)),
            QuantizedWeight(absmax, **stack.with_layer_axis((None,), stacked)), block_size)


class QuantizedEmbed(nnx.Module):
    """A frozen `Embed` whose table `[vocab, dim]` is held quantised; a lookup dequantises only the rows it
    gathers, `attend` (the tied head) the whole table per call, as `QuantizedLinear` does.

    NF4 blocks tile each row (one absmax per `block_size` values of a token's vector);
    int8 has one scale per row, i.e. per token. Used with `peft.quant_embeddings`:
    QLoRA itself leaves embeddings in float, MLX-style 4-bit models do not.
    """

    def __init__(self, codes: QuantizedWeight, scales: QuantizedWeight, *, kind: str, num_embeddings: int,
                 features: int, dtype, block_size: int | None = None):
        self.kind = kind
        self.block_size = block_size
        self.num_embeddings = num_embeddings
        self.features = features
        self.dtype = dtype
        self.codes = codes
        self.scales = scales

    @classmethod
    def from_embed(cls, embed, kind: str = "nf4", block_size: int = 64) -> QuantizedEmbed:
        """Quantise `embed`'s table; NF4 needs `block_size` to divide the embedding width."""
        table = embed.embedding.get_value()
        axes = tuple(embed.embedding.get_metadata().get("logical_axes", (None, None)))
        vocab, dim = table.shape
        if kind == "nf4":
            _check_block_size(block_size)
            if dim % block_size:
                raise ConfigError(f"peft.quant_block_size={block_size} must divide the embedding width {dim} "
                                  f"to quantise the embeddings as NF4; use a divisor of {dim} or quant=int8.")
            packed, absmax, _ = quantize_nf4(table, block_size)
            codes = QuantizedWeight(packed.reshape(vocab, dim // 2), logical_axes=axes)
            scales = QuantizedWeight(absmax.reshape(vocab, dim // block_size), logical_axes=axes)
        elif kind == "int8":
            q, scale = quantize_int8(jnp.asarray(table).T)  # per column of the transpose: per token
            codes, scales, block_size = QuantizedWeight(q.T, logical_axes=axes), QuantizedWeight(
                scale, logical_axes=(axes[0],)), None
        else:
            raise ConfigError(f"quantisation kind {kind!r} is not supported; use one of {list(KINDS)}.")
        return cls(codes, scales, kind=kind, num_embeddings=vocab, features=dim, dtype=embed.dtype,
                   block_size=block_size)

    def _rows(self, codes, scales, dtype):
        if self.kind == "nf4":
            return dequantize_nf4_rows(codes, scales, dtype)
        return (codes.astype(jnp.float32) * scales[..., None]).astype(dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        # On a mesh, laid out step by step as Embed's lookup is (jaxft/models/layers.py says why): in one
        # step XLA replicated the gathered int8 rows ("involuntary full rematerialization").
        codes, scales = self.codes.get_value(), self.scales.get_value()
        ids = constrain(ids, (None, None))
        codes = jnp.take(constrain(codes, (None, "embed")), ids, axis=0)
        scales = jnp.take(constrain(scales, (None, "embed")[:scales.ndim]), ids, axis=0)
        rows = constrain(self._rows(codes, scales, self.dtype), (None, None, "embed"))
        return constrain(rows, ("batch_fsdp", None, None))

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the table, `x @ table.T`, dequantised per call (and again for the backward pass)."""
        transposed = lambda codes, scales: self._rows(codes, scales, self.dtype).T  # noqa: E731
        return quantized_matmul(x.astype(self.dtype), self.codes.get_value(), self.scales.get_value(), transposed)

    def dequantized_table(self, dtype=jnp.float32) -> jax.Array:
        """The table `[vocab, dim]` the codes stand for, in `dtype` (for export)."""
        return self._rows(self.codes.get_value(), self.scales.get_value(), dtype)

    def to_embed(self) -> Embed:
        """A float `Embed` holding the dequantised table, for a merged export."""
        table = self.dequantized_table()
        embed = Embed(self.num_embeddings, self.features, dtype=self.dtype, param_dtype=table.dtype,
                      rngs=nnx.Rngs(0))
        embed.embedding.set_value(table)
        return embed


# ---------------------------------------------------------------------------
# Whole models


# A classifier's head trains (in float) with every method, so it is never stored quantised: a decoder's `score`,
# an encoder's `classifier` (RoBERTa's holds two layers, `classifier.dense` and `classifier.out_proj`).
_TRAINED_HEADS = ("score", "classifier")


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """True when the dotted `name` ends in one of `skip` or lies inside one, matched on whole path components."""
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Which frozen layers are stored quantised, and how.

    Every plain `Linear` except those whose path ends in `skip` (QLoRA skips the
    output head: it is small next to the body and its error goes straight into
    the logits); with `embeddings`, also every `Embed` (and the head is then
    usually not skipped: see `from_config`).
    """

    kind: str = "nf4"
    block_size: int = 64
    skip: tuple[str, ...] = ("lm_head",)
    embeddings: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"quantisation kind {self.kind!r} is not supported; use one of {list(KINDS)}.")
        if self.kind == "nf4":
            _check_block_size(self.block_size)

    @classmethod
    def from_config(cls, peft_cfg) -> QuantSpec:
        """`peft.quant`, `peft.quant_block_size`; `peft.quant_embeddings` quantises the embeddings and the head."""
        embeddings = bool(peft_cfg.quant_embeddings)
        return cls(peft_cfg.quant, peft_cfg.quant_block_size, skip=() if embeddings else ("lm_head",),
                   embeddings=embeddings)

    def replacement(self, name: str, module) -> nnx.Module | None:
        """The quantised module to put at dotted path `name` in place of `module`, or None to keep it."""
        if type(module) is Linear and not _skipped(name, self.skip + _TRAINED_HEADS):
            return QuantizedLinear.from_linear(module, kind=self.kind, block_size=self.block_size)
        if type(module) is Embed and self.embeddings:
            return QuantizedEmbed.from_embed(module, kind=self.kind, block_size=self.block_size)
        return None

    def on_param(self, model: nnx.Module, path: tuple) -> None:
        """`models.hf.load_pretrained`'s hook: quantise a layer as soon as its weight is read, so the float
        model never exists whole (peak memory: the quantised model plus one float tensor). A bias read later
        still lands: the quantised layer holds the same bias variable."""
        if path[-1] not in ("kernel", "embedding"):
            return
        name = ".".join(map(str, path[:-1]))
        module = get_module(model, name)
        replacement = self.replacement(name, module)
        if replacement is not None:
            set_module(model, name, replacement)
            # Free the float weight now: the replaced layer sits in a reference cycle that only
            # Python's cyclic collector would break, long after the next tensors are read.
            weight = getattr(module, path[-1])
            weight.set_value(jax.ShapeDtypeStruct(weight.get_value().shape, weight.get_value().dtype))


def quantize_model(model: nnx.Module, kind: str | QuantSpec, block_size: int = 64,
                   skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace the layers `QuantSpec(kind, block_size, skip)` (or a given spec) names with quantised ones,
    in place, also a `Linear` already wrapped as a LoRA `base_layer`; returns the replaced per-layer names.

    Layers already quantised are left as they are, so a model quantised while
    loading passes through unchanged.
    """
    spec = kind if isinstance(kind, QuantSpec) else QuantSpec(kind, block_size, (skip,) if isinstance(skip, str)
                                                              else tuple(skip))
    replaced = []
    for name, module in [(path_str(p), m) for p, m in nnx.iter_modules(model)]:
        replacement = spec.replacement(name, module)
        if replacement is not None:
            set_module(model, name, replacement)
            replaced.extend(stack.layer_names(name.split("."), replacement.codes))  # per layer of stacked blocks
    return replaced


def dequantize_model(model: nnx.Module) -> nnx.Module:
    """Replace every quantised layer with a float one holding its dequantised weight, in place (for export)."""
    for name, module in quantized_modules(model).items():
        set_module(model, name, module.to_linear() if isinstance(module, QuantizedLinear) else module.to_embed())
    return model


def quantized_modules(model: nnx.Module) -> dict[str, QuantizedLinear | QuantizedEmbed]:
    """Every `QuantizedLinear` and `QuantizedEmbed` by dotted path."""
    return {path_str(p): m for p, m in nnx.iter_modules(model) if isinstance(m, (QuantizedLinear, QuantizedEmbed))}


def weight_bytes(model: nnx.Module) -> dict:
    """What the quantised weights take (codes + scales) against the same weights in bfloat16, for the run log."""
    layers = quantized_modules(model).values()
    quantized = sum(_nbytes(m.codes) + _nbytes(m.scales) for m in layers)
    bf16 = sum(2 * _weight_count(m) for m in layers)
    count = sum(math.prod(stack.stack_shape(m.codes)) for m in layers)  # a stacked module: one per layer
    return dict(layers=count, quantized_bytes=quantized, bf16_bytes=bf16,
                ratio=quantized / bf16 if bf16 else float("nan"))


def _weight_count(layer) -> int:
    if isinstance(layer, QuantizedLinear):
        return layer.in_features * layer.out_features * math.prod(stack.stack_shape(layer.codes))
    return layer.num_embeddings * layer.features


def _nbytes(variable: nnx.Variable) -> int:
    value = variable.get_value()
    return int(value.size) * np.dtype(value.dtype).itemsize

