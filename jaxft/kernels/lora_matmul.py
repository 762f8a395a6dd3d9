"""Fused LoRA matmul: `y = x @ W + s * (x @ A) @ B` in one Pallas kernel, with a fused backward pass.

Unfused, XLA reads `x` twice (for `x @ W` and `x @ A`), writes `y` and reads it back
to add the low-rank term. Here each output tile accumulates `x @ W` and `x @ A` from
the same loaded `x` tiles in float32, adds `s * (x @ A) @ B` in its epilogue and is
written once. The backward pass is the same kernel on transposed operands:
`dx = dy @ W^T + s * (dy @ B^T) @ A^T`, whose low-rank accumulator is also what `dA`
needs (`g = s * dy @ B^T`, `dA = x^T @ g`); `dB = (s * x @ A)^T @ dy` reads `dy` once
more. `W` is frozen: it gets no gradient. QLoRA-int8: `W` int8 with a float scale per
output column (`w_scale`), dequantised tile by tile inside the kernel, so the float
weight never exists in memory.

    y = lora_matmul(x, w, a, b, scale, kernel="pallas")   # x [M, K], w [K, N], a [K, r], b [r, N]
    y = lora_matmul(x, codes, a, b, scale, w_scale=s_n)    # codes int8 [K, N], s_n [N]

`kernel`: "xla" (`lora_matmul_reference`, plain jnp), "pallas" (the kernel; interpreted
on CPU), "auto" (Pallas only on the backends listed in `PALLAS_WINS`, where a benchmark
showed it faster: bench/lora_kernel.py). Shapes that do not divide the blocks are padded
with zeros, which add nothing to any product, and the padding is cut from the results.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

KERNELS = ("auto", "pallas", "xla")

# Backends where bench/lora_kernel.py measured the fused kernel faster than XLA on training shapes.
# Empty until such a measurement is recorded in bench/README.md: "auto" then means XLA.
PALLAS_WINS: frozenset[str] = frozenset()

_MIN_RANK = 16  # GPU dots need every dimension >= 16; zero columns of A and rows of B add nothing


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes: output rows `m`, output columns `n`, contraction step `k` (TPU: multiples of 8 and 128)."""

    m: int = 128
    n: int = 128
    k: int = 128


def lora_matmul_reference(x, w, a, b, scale: float, w_scale=None):
    """The XLA reference: `x @ w + scale * (x @ a) @ b`, accumulated in float32, in `x`'s dtype
    (`w` = int8 codes x `w_scale` per column when given)."""
    f32 = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
    if w_scale is not None:
        w = w.astype(jnp.float32) * w_scale[None, :]
    low_rank = (scale * f32(x, a.astype(x.dtype))).astype(x.dtype)
    return (f32(x, w.astype(x.dtype)) + f32(low_rank, b.astype(x.dtype))).astype(x.dtype)


def use_pallas(kernel: str, platform: str | None = None) -> bool:
    """Whether `kernel` ("auto" | "pallas" | "xla") runs the Pallas kernel on `platform` (default: JAX's)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; choose one of {KERNELS}")
    return kernel == "pallas" or (kernel == "auto" and (platform or jax.default_backend()) in PALLAS_WINS)


def lora_matmul(x, w, a, b, scale: float, *, w_scale=None, kernel: str = "auto", blocks: Blocks = Blocks(),
                platform: str | None = None, interpret=None):
    """`x @ w + scale * (x @ a) @ b` for `x` `[M, K]`; Pallas or XLA as `kernel` says (see the module doc).

    `platform` ("cpu", "tpu", "cuda"; default: JAX's default backend) picks the Pallas
    backend: interpreted on CPU, Mosaic on TPU, Triton on NVIDIA GPUs. `interpret`
    overrides how (e.g. `pltpu.InterpretParams(uninitialized_memory="nan")` simulates a
    TPU with unwritten memory poisoned). Differentiable in `x`, `a` and `b`; `w` is
    treated as frozen (zero gradient), and so is `w_scale`.
    """
    if not use_pallas(kernel, platform):
        return lora_matmul_reference(x, w, a, b, scale, w_scale)
    platform = platform or jax.default_backend()
    interpret = (platform == "cpu") if interpret is None else interpret
    if w_scale is None:  # float W: a unit scale keeps one kernel for both (one multiply per tile)
        w_scale = jnp.ones((w.shape[1],), jnp.float32)
    return _fused(x, w, w_scale.astype(jnp.float32), a, b, float(scale), blocks, (platform, interpret))


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused(x, w, w_scale, a, b, scale, blocks, platform):
    return _fused_fwd(x, w, w_scale, a, b, scale, blocks, platform)[0]


def _fused_fwd(x, w, w_scale, a, b, scale, blocks, platform):  # platform: (name, interpret)
    a, b = a.astype(x.dtype), b.astype(x.dtype)
    y, xa = _low_rank_matmul(x, w, w_scale, a, b, scale, transposed=False, blocks=blocks, platform=platform)
    return y, (x, w, w_scale, a, b, xa)


def _fused_bwd(scale, blocks, platform, residuals, dy):
    x, w, w_scale, a, b, xa = residuals  # xa = scale * x @ a, float32 [M, r]
    dy = dy.astype(x.dtype)
    # dx = dy @ w^T + scale * (dy @ b^T) @ a^T: the forward kernel with every operand transposed;
    # its low-rank accumulator g = scale * dy @ b^T is dA's other factor.
    dx, g = _low_rank_matmul(dy, w, w_scale, b, a, scale, transposed=True, blocks=blocks, platform=platform)
    f32 = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
    da = f32(x.T, g.astype(x.dtype))
    db = f32(xa.astype(x.dtype).T, dy)
    return dx, None, None, da, db


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------- the kernel


def _dot(transposed: bool):
    """Row-block @ tile, float32 accumulation; `transposed`: the right operand is stored [out, contraction]."""
    dims = (((1,), (1 if transposed else 0,)), ((), ()))
    return functools.partial(jax.lax.dot_general, dimension_numbers=dims, preferred_element_type=jnp.float32)


def _dequantised(w_tile, scale_tile, dtype):
    """A W tile times its scales (per output column; along the contraction when transposed), in `dtype`."""
    return (w_tile.astype(jnp.float32) * scale_tile).astype(dtype)


def _epilogue(acc, low, b, scale, y_ref, xa_ref, transposed):
    """y = x W + (scale * x A) B, written once; `scale * x A` kept for the backward pass."""
    low = low * scale
    y_ref[...] = (acc + _dot(transposed)(low.astype(b.dtype), b)).astype(y_ref.dtype)
    xa_ref[...] = low  # every column tile writes the same rows: identical values, no race to lose


def _loop_kernel(x_ref, w_ref, ws_ref, a_ref, b_ref, y_ref, xa_ref, *, scale, block_k, steps, transposed):
    """GPU (Triton) and plain interpretation: one [block_m, block_n] tile of y, looping over the
    contraction inside the kernel (Triton has no accumulator that outlives a grid step).

    Not transposed: x [bm, K], w [K, bn], w_scale [1, bn], a [K, r], b [r, bn].
    Transposed (backward): x [bm, K], w [bn, K], w_scale [1, K], a [r, K], b [bn, r]:
    y = x (w diag(w_scale))^T + s (x a^T) b^T.
    """
    dot = _dot(transposed)

    def step(k, carry):
        acc, low = carry
        cut = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        xs = x_ref[:, cut]
        if transposed:  # W's columns are the contraction here: its scales are sliced with it
            ws, as_ = _dequantised(w_ref[:, cut], ws_ref[:, cut], xs.dtype), a_ref[:, cut]
        else:
            ws, as_ = _dequantised(w_ref[cut, :], ws_ref[...], xs.dtype), a_ref[cut, :]
        return acc + dot(xs, ws), low + dot(xs, as_)

    acc = jnp.zeros((x_ref.shape[0], y_ref.shape[1]), jnp.float32)
    low = jnp.zeros((x_ref.shape[0], xa_ref.shape[1]), jnp.float32)
    acc, low = jax.lax.fori_loop(0, steps, step, (acc, low))
    _epilogue(acc, low, b_ref[...], scale, y_ref, xa_ref, transposed)


def _grid_kernel(x_ref, w_ref, ws_ref, a_ref, b_ref, y_ref, xa_ref, acc_ref, low_ref, *, scale, transposed):
    """TPU (Mosaic): the contraction is the grid's last axis, the accumulators live in VMEM scratch, so
    only [block_m, block_k] and [block_k, block_n] tiles are resident, whatever K is."""
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        low_ref[...] = jnp.zeros_like(low_ref)

    xs = x_ref[...]
    dot = _dot(transposed)
    acc_ref[...] += dot(xs, _dequantised(w_ref[...], ws_ref[...], xs.dtype))
    low_ref[...] += dot(xs, a_ref[...])

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        _epilogue(acc_ref[...], low_ref[...], b_ref[...], scale, y_ref, xa_ref, transposed)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _low_rank_matmul(x, w, w_scale, a, b, scale, *, transposed, blocks: Blocks, platform):
    """Pads to whole tiles, runs the kernel, cuts the padding: (y [M, N], scale * x @ a [M, r] float32).

    Not transposed: w [K, N], w_scale [N], a [K, r], b [r, N].
    Transposed: w [N, K], w_scale [K] (W's columns), a [r, K], b [N, r].
    `platform`: (name, interpret); TPU, or interpretation as a TPU, runs `_grid_kernel`, the rest `_loop_kernel`.
    """
    m, k = x.shape
    n = w.shape[0] if transposed else w.shape[1]
    r = a.shape[0] if transposed else a.shape[1]
    bm, bn, bk = min(blocks.m, _round_up(m, 8)), min(blocks.n, _round_up(n, 128)), min(blocks.k, _round_up(k, 128))
    mp, np_, kp, rp = _round_up(m, bm), _round_up(n, bn), _round_up(k, bk), _round_up(max(r, _MIN_RANK), 8)
    x = jnp.pad(x, ((0, mp - m), (0, kp - k)))
    if transposed:
        w, a, b = (jnp.pad(w, ((0, np_ - n), (0, kp - k))), jnp.pad(a, ((0, rp - r), (0, kp - k))),
                   jnp.pad(b, ((0, np_ - n), (0, rp - r))))
        w_scale = jnp.pad(w_scale, (0, kp - k))[None, :]
    else:
        w, a, b = (jnp.pad(w, ((0, kp - k), (0, np_ - n))), jnp.pad(a, ((0, kp - k), (0, rp - r))),
                   jnp.pad(b, ((0, rp - r), (0, np_ - n))))
        w_scale = jnp.pad(w_scale, (0, np_ - n))[None, :]
    name, interpret = platform
    tpu = name == "tpu" or _is_tpu_interpretation(interpret)
    tiles = ((mp, bm), (np_, bn), (kp, bk), rp)
    grid, in_specs, out_specs, extra = (_grid_specs if tpu else _loop_specs)(tiles, transposed)
    kernel = (functools.partial(_grid_kernel, scale=scale, transposed=transposed) if tpu else
              functools.partial(_loop_kernel, scale=scale, block_k=bk, steps=kp // bk, transposed=transposed))
    y, xa = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((mp, np_), x.dtype), jax.ShapeDtypeStruct((mp, rp), jnp.float32)],
        interpret=interpret, compiler_params=None if interpret else _compiler_params(name),
        name="lora_matmul_bwd" if transposed else "lora_matmul", **extra,
    )(x, w, w_scale, a, b)
    return y[:m, :n], xa[:m, :r]


def _loop_specs(tiles, transposed):
    """Grid (rows, columns); x, W and A whole along the contraction (`_loop_kernel` walks it)."""
    (mp, bm), (np_, bn), (kp, _), rp = tiles
    if transposed:
        w, ws, a, b = (((bn, kp), lambda i, j: (j, 0)), ((1, kp), lambda i, j: (0, 0)),
                       ((rp, kp), lambda i, j: (0, 0)), ((bn, rp), lambda i, j: (j, 0)))
    else:
        w, ws, a, b = (((kp, bn), lambda i, j: (0, j)), ((1, bn), lambda i, j: (0, j)),
                       ((kp, rp), lambda i, j: (0, 0)), ((rp, bn), lambda i, j: (0, j)))
    in_specs = [pl.BlockSpec((bm, kp), lambda i, j: (i, 0))] + [pl.BlockSpec(*spec) for spec in (w, ws, a, b)]
    out_specs = [pl.BlockSpec((bm, bn), lambda i, j: (i, j)), pl.BlockSpec((bm, rp), lambda i, j: (i, 0))]
    return (mp // bm, np_ // bn), in_specs, out_specs, {}


def _grid_specs(tiles, transposed):
    """Grid (rows, columns, contraction), tiles of everything, float32 accumulators in VMEM."""
    from jax.experimental.pallas import tpu as pltpu

    (mp, bm), (np_, bn), (kp, bk), rp = tiles
    if transposed:
        w, ws, a, b = (((bn, bk), lambda i, j, k: (j, k)), ((1, bk), lambda i, j, k: (0, k)),
                       ((rp, bk), lambda i, j, k: (0, k)), ((bn, rp), lambda i, j, k: (j, 0)))
    else:
        w, ws, a, b = (((bk, bn), lambda i, j, k: (k, j)), ((1, bn), lambda i, j, k: (0, j)),
                       ((bk, rp), lambda i, j, k: (k, 0)), ((rp, bn), lambda i, j, k: (0, j)))
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, k: (i, k))] + [pl.BlockSpec(*spec) for spec in (w, ws, a, b)]
    out_specs = [pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)), pl.BlockSpec((bm, rp), lambda i, j, k: (i, 0))]
    scratch = [pltpu.VMEM((bm, bn), jnp.float32), pltpu.VMEM((bm, rp), jnp.float32)]
    return (mp // bm, np_ // bn, kp // bk), in_specs, out_specs, dict(scratch_shapes=scratch)


def _is_tpu_interpretation(interpret) -> bool:
    """Whether `interpret` asks Pallas to simulate a TPU (pltpu.InterpretParams), not to run plain jnp."""
    from jax.experimental.pallas import tpu as pltpu

    return isinstance(interpret, pltpu.InterpretParams)

def _compiler_params(platform: str):
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        # Columns "arbitrary": every column tile rewrites the same rows of xa, so they must not be split
        # over the two TensorCores of a chip; rows are independent; the contraction accumulates.
        return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary"))
    if platform in ("cuda", "gpu"):
        from jax.experimental.pallas import triton as pltriton
        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    return None
