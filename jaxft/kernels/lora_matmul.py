"""Fused LoRA matmul: `y = x @ W + s * (x @ A) @ B` in one Pallas kernel, with a fused backward pass.

Unfused, XLA reads `x` twice (for `x @ W` and `x @ A`), writes `y` and reads it back
to add the low-rank term. Here each output tile accumulates `x @ W` and `x @ A` from
the same loaded `x` tiles in float32, adds `s * (x @ A) @ B` in its epilogue and is
written once. The backward pass is the same kernel on transposed operands:
`dx = dy @ W^T + s * (dy @ B^T) @ A^T`, whose low-rank accumulator is also what `dA`
needs (`g = s * dy @ B^T`, `dA = x^T @ g`), and which also takes `dB = (s * x @ A)^T @ dy`
from the `dy` tiles it loads anyway (the first column of tiles does it, one partial sum
per row block, summed after), so the backward pass reads `dy` from memory once. `W` is
frozen: it gets no gradient. QLoRA-int8: `W` int8 with a float scale per
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

from jaxft.errors import ConfigError

KERNELS = ("auto", "pallas", "xla")

# Backends where bench/lora_kernel.py measured the fused kernel faster than XLA on training shapes.
# Empty until such a measurement is recorded in bench/README.md: "auto" then means XLA.
PALLAS_WINS: frozenset[str] = frozenset()

_MIN_DOT = 16  # GPU dots need every dimension >= 16; zero rows and columns of padding add nothing
# Mosaic's default scoped VMEM is 16 MiB on some TPUs (32 MiB on newer ones); the limit is raised to
# what the blocks need beyond that, up to the 64 MiB every current TPU core has.
_VMEM_DEFAULT, _VMEM_MAX = 16 << 20, 64 << 20


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes: output rows `m`, output columns `n`, contraction step `k` (TPU: multiples of 8 and 128;
    GPU: powers of two >= 16). Each is cut down to the padded extent where that is smaller. GPU only:
    Triton's `warps` per program and pipeline `stages` of the contraction loop."""

    m: int = 128
    n: int = 128
    k: int = 128
    warps: int = 4
    stages: int = 2


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
        raise ConfigError(f"kernel={kernel!r} is not a LoRA kernel; choose one of {KERNELS}")
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
    w_scale = None if w_scale is None else w_scale.astype(jnp.float32)
    return _fused(x, w, w_scale, a, b, float(scale), blocks, (platform, interpret))


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused(x, w, w_scale, a, b, scale, blocks, platform):
    return _fused_fwd(x, w, w_scale, a, b, scale, blocks, platform)[0]


def _fused_fwd(x, w, w_scale, a, b, scale, blocks, platform):  # platform: (name, interpret)
    a, b = a.astype(x.dtype), b.astype(x.dtype)
    y, xa, _ = _low_rank_matmul(x, w, w_scale, a, b, scale, blocks=blocks, platform=platform)
    return y, (x, w, w_scale, a, b, xa)


def _fused_bwd(scale, blocks, platform, residuals, dy):
    x, w, w_scale, a, b, xa = residuals  # xa = scale * x @ a, float32 [M, r]
    dy = dy.astype(x.dtype)
    # dx = dy @ w^T + scale * (dy @ b^T) @ a^T: the forward kernel with every operand transposed;
    # its low-rank accumulator g = scale * dy @ b^T is dA's other factor, and dB = xa^T dy is summed
    # from the same dy tiles.
    dx, g, db = _low_rank_matmul(dy, w, w_scale, b, a, scale, xa=xa.astype(x.dtype), blocks=blocks,
                                 platform=platform)
    da = jnp.matmul(x.T, g.astype(x.dtype), preferred_element_type=jnp.float32)
    return dx, None, None, da, db


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------- the kernel


@dataclasses.dataclass(frozen=True)
class _Refs:
    """The kernel's operands by name. Forward: x, w, [w_scale], a, b -> y, low. Backward (`xa` given):
    dy, w, [w_scale], b^T, a^T, xa -> dx, g, db (partial sums of dB, one per row block)."""

    x: object
    w: object
    w_scale: object | None
    a: object
    b: object
    xa: object | None
    y: object
    low: object
    db: object | None
    scratch: tuple = ()

    @classmethod
    def name(cls, refs, quantised: bool, backward: bool, scratch: int = 0):
        refs = list(refs)
        take = lambda present: refs.pop(0) if present else None  # noqa: E731
        x, w, w_scale, a, b, xa = take(True), take(True), take(quantised), take(True), take(True), take(backward)
        y, low, db = take(True), take(True), take(backward)
        return cls(x, w, w_scale, a, b, xa, y, low, db, tuple(refs[:scratch]))


def _dot(transposed: bool):
    """Row-block @ tile, float32 accumulation; `transposed`: the right operand is stored [out, contraction]."""
    dims = (((1,), (1 if transposed else 0,)), ((), ()))
    return functools.partial(jax.lax.dot_general, dimension_numbers=dims, preferred_element_type=jnp.float32)


def _rows_dot(p, q):
    """p^T q over their shared rows, float32: [bm, r] x [bm, n] -> [r, n] (dB's partial sum)."""
    return jax.lax.dot_general(p, q, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _weight_tile(w_tile, scale_tile, dtype):
    """A W tile in `dtype`; an int8 one times its scales (per output column; along the contraction when
    transposed). A float W has no scales: nothing to multiply."""
    if scale_tile is None:
        return w_tile.astype(dtype)
    return (w_tile.astype(jnp.float32) * scale_tile).astype(dtype)


def _epilogue(acc, low, refs: _Refs, scale, transposed):
    """y = x W + (scale * x A) B, written once; `scale * x A` kept for the backward pass."""
    low = low * scale
    b = refs.b[...]
    refs.y[...] = (acc + _dot(transposed)(low.astype(b.dtype), b)).astype(refs.y.dtype)
    refs.low[...] = low  # every column tile writes the same rows: identical values, no race to lose


def _loop_kernel(*refs, scale, block_k, steps, quantised, transposed):
    """GPU (Triton) and plain interpretation: one [block_m, block_n] tile of y, looping over the
    contraction inside the kernel (Triton has no accumulator that outlives a grid step).

    Forward: x [bm, K], w [K, bn], w_scale [1, bn], a [K, r], b [r, bn].
    Backward: dy [bm, K], w [bn, K], w_scale [1, K], a [r, K], b [bn, r], xa [bm, r], db [1, r, K]:
    y = dy (w diag(w_scale))^T + s (dy a^T) b^T, and the first column of tiles sums db = xa^T dy.
    """
    refs = _Refs.name(refs, quantised, backward=transposed)
    dot, first_column = _dot(transposed), pl.program_id(1) == 0
    xa = refs.xa[...] if transposed else None

    def step(k, carry):
        acc, low = carry
        cut = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
        xs = refs.x[:, cut]
        if transposed:  # W's columns are the contraction here: its scales are sliced with it
            scales = None if refs.w_scale is None else refs.w_scale[:, cut]
            ws, as_ = _weight_tile(refs.w[:, cut], scales, xs.dtype), refs.a[:, cut]

            @pl.when(first_column)
            def _():
                refs.db[0, :, cut] = _rows_dot(xa, xs)
        else:
            scales = None if refs.w_scale is None else refs.w_scale[...]
            ws, as_ = _weight_tile(refs.w[cut, :], scales, xs.dtype), refs.a[cut, :]
        return acc + dot(xs, ws), low + dot(xs, as_)

    acc = jnp.zeros((refs.x.shape[0], refs.y.shape[1]), jnp.float32)
    low = jnp.zeros((refs.x.shape[0], refs.low.shape[1]), jnp.float32)
    acc, low = jax.lax.fori_loop(0, steps, step, (acc, low))
    _epilogue(acc, low, refs, scale, transposed)


def _grid_kernel(*refs, scale, block_k, quantised, transposed):
    """TPU (Mosaic): the contraction is the grid's last axis, the accumulators live in VMEM scratch, so
    only [block_m, block_k] and [block_k, block_n] tiles are resident, whatever K is (and, backward,
    the row block's [r, K] partial sum of dB)."""
    refs = _Refs.name(refs, quantised, backward=transposed, scratch=2)
    acc_ref, low_ref = refs.scratch
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        low_ref[...] = jnp.zeros_like(low_ref)

    xs = refs.x[...]
    dot = _dot(transposed)
    acc_ref[...] += dot(xs, _weight_tile(refs.w[...], None if refs.w_scale is None else refs.w_scale[...], xs.dtype))
    low_ref[...] += dot(xs, refs.a[...])
    if transposed:
        @pl.when(pl.program_id(1) == 0)
        def _():
            refs.db[0, :, pl.ds(pl.multiple_of(k * block_k, block_k), block_k)] = _rows_dot(refs.xa[...], xs)

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        _epilogue(acc_ref[...], low_ref[...], refs, scale, transposed)


# ----------------------------------------------------------------------------- tiling and the call


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """Padded extents and block sizes: rows m, output columns n, contraction k, rank r (padded whole)."""

    m: int
    bm: int
    n: int
    bn: int
    k: int
    bk: int
    r: int

    @classmethod
    def choose(cls, m, n, k, r, blocks: Blocks, tpu: bool):
        if tpu:  # Mosaic: a block's last two dims are multiples of (8, 128), or the whole padded array
            _check_blocks(blocks, lambda v, lane: v > 0 and v % (128 if lane else 8) == 0,
                          "positive multiples of 8 (m) and 128 (n, k)")
            bm, r = min(blocks.m, _round_up(m, 8)), _round_up(max(r, _MIN_DOT), 8)
            bn, bk = min(blocks.n, _round_up(n, 128)), min(blocks.k, _round_up(k, 128))
        else:  # Triton: every loaded array a power of two in each dimension, and dots at least 16 wide
            _check_blocks(blocks, lambda v, lane: v >= _MIN_DOT and v & (v - 1) == 0, "powers of two >= 16")
            _check_triton_options(blocks)
            bm, r = min(blocks.m, _next_pow2(m, _MIN_DOT)), _next_pow2(r, _MIN_DOT)
            bn, bk = min(blocks.n, _next_pow2(n, _MIN_DOT)), min(blocks.k, _next_pow2(k, _MIN_DOT))
        return cls(_round_up(m, bm), bm, _round_up(n, bn), bn, _round_up(k, bk), bk, r)


def _check_blocks(blocks: Blocks, ok, rule: str):
    if not all(ok(v, lane) for v, lane in ((blocks.m, False), (blocks.n, True), (blocks.k, True))):
        raise ConfigError(f"{blocks} do not fit this backend: block sizes must be {rule}; choose Blocks(m, n, k) "
                          f"that are.")


def _check_triton_options(blocks: Blocks):
    """Triton runs a power-of-two number of warps per program and at least one pipeline stage."""
    if blocks.warps < 1 or blocks.warps & (blocks.warps - 1) or blocks.stages < 1:
        raise ConfigError(f"{blocks}: Triton needs warps a power of two (1, 2, 4, 8, ...) and stages >= 1; choose "
                          f"Blocks(warps=..., stages=...) that are.")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _next_pow2(n: int, at_least: int) -> int:
    return max(at_least, 1 << (n - 1).bit_length())


def _low_rank_matmul(x, w, w_scale, a, b, scale, *, xa=None, blocks: Blocks, platform):
    """Pads to whole tiles, runs the kernel, cuts the padding: (y [M, N], scale * x @ a [M, r] float32,
    dB float32 [r, K] or None).

    Forward (`xa` None): w [K, N], w_scale [N] or None, a [K, r], b [r, N].
    Backward (`xa` = the forward's scale * x @ a [M, r]): x = dy, w [N, K], w_scale [K] (W's columns)
    or None, a = b^T [r, K], b = a^T [N, r]; also returns dB = xa^T dy.
    `platform`: (name, interpret); TPU, or interpretation as a TPU, runs `_grid_kernel`, the rest `_loop_kernel`.
    """
    transposed, quantised = xa is not None, w_scale is not None
    m, k = x.shape
    n = w.shape[0] if transposed else w.shape[1]
    r = a.shape[0] if transposed else a.shape[1]
    name, interpret = platform
    tpu = name == "tpu" or _is_tpu_interpretation(interpret)
    t = _Tiling.choose(m, n, k, r, blocks, tpu)
    operands = [_pad(x, t.m, t.k)]
    if transposed:
        operands += [_pad(w, t.n, t.k)] + ([_pad(w_scale[None, :], 1, t.k)] if quantised else [])
        operands += [_pad(a, t.r, t.k), _pad(b, t.n, t.r), _pad(xa, t.m, t.r)]
    else:
        operands += [_pad(w, t.k, t.n)] + ([_pad(w_scale[None, :], 1, t.n)] if quantised else [])
        operands += [_pad(a, t.k, t.r), _pad(b, t.r, t.n)]
    out_shape = [jax.ShapeDtypeStruct((t.m, t.n), x.dtype), jax.ShapeDtypeStruct((t.m, t.r), jnp.float32)]
    if transposed:
        out_shape.append(jax.ShapeDtypeStruct((t.m // t.bm, t.r, t.k), jnp.float32))
    grid, in_specs, out_specs, extra = (_grid_specs if tpu else _loop_specs)(t, transposed, quantised)
    options = dict(scale=scale, block_k=t.bk, quantised=quantised, transposed=transposed)
    kernel = functools.partial(_grid_kernel, **options) if tpu else functools.partial(
        _loop_kernel, steps=t.k // t.bk, **options)
    params = None if interpret else _compiler_params(name, _vmem_bytes(t, x.dtype, w.dtype, transposed), blocks)
    outs = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, interpret=interpret,
        compiler_params=params, name="lora_matmul_bwd" if transposed else "lora_matmul", **extra,
    )(*operands)
    db = outs[2].sum(axis=0)[:r, :k] if transposed else None
    return outs[0][:m, :n], outs[1][:m, :r], db


def _pad(array, rows: int, cols: int):
    return jnp.pad(array, ((0, rows - array.shape[0]), (0, cols - array.shape[1])))


def _loop_specs(t: _Tiling, transposed: bool, quantised: bool):
    """Grid (rows, columns); x, W and A whole along the contraction (`_loop_kernel` walks it)."""
    if transposed:
        w, ws, a, b = (((t.bn, t.k), lambda i, j: (j, 0)), ((1, t.k), lambda i, j: (0, 0)),
                       ((t.r, t.k), lambda i, j: (0, 0)), ((t.bn, t.r), lambda i, j: (j, 0)))
    else:
        w, ws, a, b = (((t.k, t.bn), lambda i, j: (0, j)), ((1, t.bn), lambda i, j: (0, j)),
                       ((t.k, t.r), lambda i, j: (0, 0)), ((t.r, t.bn), lambda i, j: (0, j)))
    inputs = [((t.bm, t.k), lambda i, j: (i, 0)), w] + ([ws] if quantised else []) + [a, b]
    outputs = [((t.bm, t.bn), lambda i, j: (i, j)), ((t.bm, t.r), lambda i, j: (i, 0))]
    if transposed:
        inputs.append(((t.bm, t.r), lambda i, j: (i, 0)))
        outputs.append(((1, t.r, t.k), lambda i, j: (i, 0, 0)))
    specs = lambda pairs: [pl.BlockSpec(*pair) for pair in pairs]  # noqa: E731
    return (t.m // t.bm, t.n // t.bn), specs(inputs), specs(outputs), {}


def _grid_specs(t: _Tiling, transposed: bool, quantised: bool):
    """Grid (rows, columns, contraction), tiles of everything, float32 accumulators in VMEM."""
    from jax.experimental.pallas import tpu as pltpu

    if transposed:
        w, ws, a, b = (((t.bn, t.bk), lambda i, j, k: (j, k)), ((1, t.bk), lambda i, j, k: (0, k)),
                       ((t.r, t.bk), lambda i, j, k: (0, k)), ((t.bn, t.r), lambda i, j, k: (j, 0)))
    else:
        w, ws, a, b = (((t.bk, t.bn), lambda i, j, k: (k, j)), ((1, t.bn), lambda i, j, k: (0, j)),
                       ((t.bk, t.r), lambda i, j, k: (k, 0)), ((t.r, t.bn), lambda i, j, k: (0, j)))
    inputs = [((t.bm, t.bk), lambda i, j, k: (i, k)), w] + ([ws] if quantised else []) + [a, b]
    outputs = [((t.bm, t.bn), lambda i, j, k: (i, j)), ((t.bm, t.r), lambda i, j, k: (i, 0))]
    if transposed:  # dB's partial sum for the row block stays resident over its columns and contraction
        inputs.append(((t.bm, t.r), lambda i, j, k: (i, 0)))
        outputs.append(((1, t.r, t.k), lambda i, j, k: (i, 0, 0)))
    specs = lambda pairs: [pl.BlockSpec(*pair) for pair in pairs]  # noqa: E731
    scratch = [pltpu.VMEM((t.bm, t.bn), jnp.float32), pltpu.VMEM((t.bm, t.r), jnp.float32)]
    return (t.m // t.bm, t.n // t.bn, t.k // t.bk), specs(inputs), specs(outputs), dict(scratch_shapes=scratch)


def _vmem_bytes(t: _Tiling, x_dtype, w_dtype, transposed: bool) -> int:
    """What the TPU form keeps in VMEM: two buffers of each operand's and output's block, and the scratch."""
    blocks = [(t.bm * t.bk, x_dtype), (t.bk * t.bn, w_dtype), (t.bk * t.r, x_dtype), (t.bn * t.r, x_dtype),
              (t.bn, jnp.float32), (t.bm * t.bn, x_dtype), (t.bm * t.r, jnp.float32)]
    if transposed:
        blocks += [(t.bm * t.r, x_dtype), (t.r * t.k, jnp.float32)]
    resident = 2 * sum(size * jnp.dtype(dtype).itemsize for size, dtype in blocks)
    return resident + 4 * (t.bm * t.bn + t.bm * t.r)


def _is_tpu_interpretation(interpret) -> bool:
    """Whether `interpret` asks Pallas to simulate a TPU (pltpu.InterpretParams), not to run plain jnp."""
    from jax.experimental.pallas import tpu as pltpu

    return isinstance(interpret, pltpu.InterpretParams)


def _compiler_params(platform: str, vmem_bytes: int, blocks: Blocks = Blocks()):
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        if vmem_bytes > _VMEM_MAX:
            raise ConfigError(f"The LoRA kernel's blocks need {vmem_bytes / 2**20:.0f} MiB of VMEM, more than a "
                             f"TPU core has ({_VMEM_MAX >> 20} MiB): choose smaller Blocks.")
        # Columns "arbitrary": every column tile rewrites the same rows of xa (and the first one writes dB's
        # partial sums), so they must not be split over the two TensorCores of a chip; rows are independent;
        # the contraction accumulates.
        return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary"),
                                    vmem_limit_bytes=min(_VMEM_MAX, vmem_bytes + (4 << 20))
                                    if vmem_bytes > _VMEM_DEFAULT // 2 else None)
    if platform in ("cuda", "gpu"):
        from jax.experimental.pallas import triton as pltriton
        return pltriton.CompilerParams(num_warps=blocks.warps, num_stages=blocks.stages)
    return None
