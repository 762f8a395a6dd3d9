"""Attention with a choice of backend: one call, the same answer, the fastest kernel the device has.

    out = attention(q, k, v, scale=d**-0.5, causal=True, window=w, segment_ids=seg)

q `[B, T, H, D]`, k/v `[B, S, K, D]` with H a multiple of K (grouped-query attention: query
head h reads kv head `h // (H // K)`, Hugging Face's `repeat_kv` order). Softmax in float32;
the result is `[B, T, H, D]` in q's dtype. What a query may see is described, not passed as
a `[T, S]` matrix, so that a kernel can skip what no query sees:

- `causal`: key j visible to query i only if j <= i (self-attention: T == S).
- `window`: only keys with j > i - window (HF's sliding-window rule).
- `segment_ids` `[B, T]`: packed rows (self-attention); a token sees its own segment only,
  and 0 marks padding, never visible to a real token.
- `kv_mask` `[B, S]`: 1 = real key, 0 = padding, anywhere (left or right padding).
- `kv_lengths` `[B]`: right padding, keys `j >= kv_lengths[b]` are padding. The same as the
  kv_mask `arange(S) < kv_lengths`, but cuDNN can take only this form (a traced kv_mask
  cannot be proved right-padded), so pass it where the data guarantees right padding.
- `dense_mask` `[B, 1, T, S]` boolean: any pattern at all (prompt tuning over packed rows);
  it replaces all of the above. Only the XLA backends take it.

Backends (`backend=`):

- "xla": the reference. The dense mask built, one einsum per side, softmax in float32.
- "chunked": XLA too, queries in 64-row chunks whose keys past the diagonal are skipped, as
  4-D products (faster on CPU).
- "splash": TPU. The Pallas splash-attention kernel (jax.experimental.pallas.ops.tpu.
  splash_attention): causal/sliding-window block sparsity, grouped-query heads natively,
  packed rows and padding as segment ids, its own backward kernels. T and S are padded to
  multiples of 128 (its smallest block). On a mesh it runs per device under `jax.shard_map`,
  batch over 'data'/'fsdp', heads over 'tensor' where they divide. Interpreted on CPU.
- "cudnn": NVIDIA GPUs. `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's
  flash attention: causal, sliding window, right padding (`kv_lengths`), grouped-query heads,
  bfloat16/float16, head_dim a multiple of 8 up to 128 (256 on Hopper and later).
- "auto": TPU -> splash; NVIDIA GPU -> cudnn; CPU -> chunked; anywhere else -> xla; and
  xla wherever the platform's kernel cannot take the case. Auto never raises.

Which cases fall back (`explain_backend` says which backend runs and why):

- splash cannot take `dense_mask`: auto runs xla; an explicit "splash" raises ConfigError,
  as it does on a GPU (the kernel is Mosaic, TPU only).
- cudnn falls back to xla (auto and explicit alike) for: float32 inputs, `segment_ids`
  (cuDNN's packed layout is private API, Hopper-only, and jax 0.10 scales its kv offsets
  by the query heads, wrong for grouped-query attention),
  `kv_mask` (use `kv_lengths` for right padding), `dense_mask`, a window without causal
  order, and head dims it does not take. An explicit "cudnn" on CPU runs xla too (a GPU
  config's CPU smoke test still runs); on a TPU it raises ConfigError.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from jaxft import sharding
from jaxft.errors import ConfigError

log = logging.getLogger("jaxft")

BACKENDS = ATTENTION_BACKENDS = ("auto", "xla", "chunked", "splash", "cudnn")

# Masked scores get this instead of -inf, so a query that may see no key at all (a padding
# row) softmaxes to a uniform row instead of NaN.
MASK_VALUE = float(np.finfo(np.float32).min)

_SPLASH_MIN_BLOCK = 128  # splash needs block_q and block_kv multiples of 128 (the lane width)
_SPLASH_MAX_BLOCK = 512  # MaxText's default; larger blocks amortise the per-step overhead
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def attention(q, k, v, *, scale: float, backend: str = "auto", causal: bool = True, window: int | None = None,
              segment_ids=None, kv_mask=None, kv_lengths=None, dense_mask=None, softcap: float | None = None,
              platform: str | None = None, interpret: bool | None = None) -> jax.Array:
    """Softmax(q k^T * scale) v for q `[B, T, H, D]`, k/v `[B, S, K, D]`; `[B, T, H, D]` in q's dtype.
    `softcap`: the scores become `softcap * tanh(scores / softcap)` before masking (Gemma 2).

    The masking arguments and backends are described in the module docstring. `platform`
    ("cpu", "tpu", "cuda"; default: JAX's default backend) is where the call will run, for
    lowering to another platform than this one; `interpret` (default: on CPU) runs the splash
    kernel in Pallas' interpreter. Rows of padding queries (segment 0, or padded positions)
    get some finite value that differs between backends: their outputs must not be used.
    Differentiable in q, k, v with every backend; works under jit, scan, checkpoint, switch.
    """
    b, t, _, d = q.shape
    s = k.shape[1]
    _check_shapes(q, k, v, causal, window, segment_ids, kv_mask, kv_lengths, dense_mask)
    if window is not None and window >= t:
        window = None  # j > i - window holds for every key when i < window: no window (cheaper in kernels)
    platform = _platform(platform)
    chosen, reason = explain_backend(
        backend, platform, dtype=q.dtype, head_dim=d, causal=causal, window=window,
        has_segment_ids=segment_ids is not None, has_kv_mask=kv_mask is not None,
        has_dense_mask=dense_mask is not None, has_softcap=softcap is not None)
    if reason.startswith(("splash ", "cudnn ")):  # a kernel asked for (or auto's choice) cannot take this case
        _log_fallback(backend, chosen, reason)

    if chosen == "splash":
        interpret = (platform == "cpu") if interpret is None else interpret
        return _splash(q, k, v, scale=scale, causal=causal, window=window, segment_ids=segment_ids,
                       kv_mask=kv_mask, kv_lengths=kv_lengths, softcap=softcap, interpret=interpret)
    if chosen == "cudnn":
        return _cudnn(q, k, v, scale=scale, causal=causal, window=window, kv_lengths=kv_lengths)
    mask = dense_mask if dense_mask is not None else visibility_mask(
        b, t, s, causal=causal, window=window, segment_ids=segment_ids, kv_mask=kv_mask, kv_lengths=kv_lengths)
    if chosen == "chunked":
        return _chunked(q, k, v, mask, scale=scale, causal=causal, softcap=softcap)
    return _xla(q, k, v, mask, scale=scale, softcap=softcap)


@dataclasses.dataclass(frozen=True)
class Visibility:
    """What the tokens of one batch may attend to, in every layer: built once per forward pass, then asked by
    each layer (`attend`). Layers may differ in their sliding window (Qwen2/3 `layer_types`): `windows` holds
    the distinct ones, and a layer passes the index of its own, a traced value under a scan over layers
    (one `lax.switch` branch per window, each a kernel with its window built in)."""

    windows: tuple = (None,)
    backend: str = "auto"
    segment_ids: jax.Array | None = None
    kv_mask: jax.Array | None = None
    kv_lengths: jax.Array | None = None
    dense_masks: tuple | None = None  # one [B, 1, T, S] mask per window: patterns no argument above expresses

    def attend(self, q, k, v, *, scale: float, window_index=None, softcap: float | None = None) -> jax.Array:
        """Causal self-attention of q `[B, T, H, D]` over k, v `[B, T, K, D]` with this batch's visibility and
        the window `windows[window_index]` (the only one when there is one)."""
        def with_window(i):
            return functools.partial(attention, scale=scale, softcap=softcap, backend=self.backend,
                                     window=self.windows[i],
                                     segment_ids=self.segment_ids, kv_mask=self.kv_mask, kv_lengths=self.kv_lengths,
                                     dense_mask=None if self.dense_masks is None else self.dense_masks[i])
        if len(self.windows) == 1:
            return with_window(0)(q, k, v)
        return jax.lax.switch(window_index, [with_window(i) for i in range(len(self.windows))], q, k, v)


    def attend_cache(self, q, keys, values, *, scale: float, window_index=None,
                     softcap: float | None = None) -> jax.Array:
        """q `[B, T, H, D]` against a KV cache's keys and values `[B, K, slots, D]` (jaxft/models/kv_cache.py),
        what each query sees given by `dense_masks` (one per window)."""
        def with_window(i):
            return functools.partial(cached_attention, mask=self.dense_masks[i], scale=scale, softcap=softcap)
        if len(self.windows) == 1:
            return with_window(0)(q, keys, values)
        return jax.lax.switch(window_index, [with_window(i) for i in range(len(self.windows))], q, keys, values)


# ----------------------------------------------------------------------------- choosing


def explain_backend(backend: str = "auto", platform: str | None = None, *, dtype=jnp.bfloat16, head_dim: int = 128,
                    causal: bool = True, window: int | None = None, has_segment_ids: bool = False,
                    has_kv_mask: bool = False, has_dense_mask: bool = False,
                    has_softcap: bool = False) -> tuple[str, str]:
    """(the backend that computes this case, why), for `backend` asked on `platform` (default: JAX's).

    The case is what `attention` would be called with: q's dtype, the head dim, and which
    masking arguments are given (kv_lengths needs no flag: every backend takes it). Raises
    ConfigError for a name not in `BACKENDS` or an explicit backend that cannot run the case
    where falling back would hide a mistake (splash with a dense mask or off TPU, cudnn on TPU).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"attention backend {backend!r} is not one of {', '.join(map(repr, BACKENDS))}.")
    platform = _platform(platform)
    if backend in ("xla", "chunked"):
        return backend, "asked for"
    if backend == "splash" or (backend == "auto" and platform == "tpu"):
        why_not = _splash_refuses(platform, has_dense_mask)
        if why_not is None:
            return "splash", "asked for" if backend == "splash" else "auto on TPU"
        if backend == "splash":
            raise ConfigError(f"attention backend 'splash' {why_not}; use backend 'auto' (or 'xla').")
        return "xla", f"splash {why_not}"
    if backend == "cudnn" or (backend == "auto" and platform == "cuda"):
        if backend == "cudnn" and platform == "tpu":
            raise ConfigError("attention backend 'cudnn' runs on NVIDIA GPUs, not on a TPU; use 'auto' (or 'splash').")
        why_not = _cudnn_refuses(platform, dtype, head_dim, causal, window, has_segment_ids, has_kv_mask,
                                 has_dense_mask, has_softcap)
        if why_not is None:
            return "cudnn", "asked for" if backend == "cudnn" else "auto on an NVIDIA GPU"
        return "xla", f"cudnn {why_not}"
    if platform == "cpu":
        return "chunked", "auto on CPU"
    return "xla", f"auto on {platform}: no fused kernel here"


def resolve_backend(backend: str = "auto", platform: str | None = None, **case) -> str:
    """The backend `attention` runs for `backend` on `platform` and this case (see `explain_backend`)."""
    return explain_backend(backend, platform, **case)[0]


def _splash_refuses(platform: str, has_dense_mask: bool) -> str | None:
    if platform not in ("tpu", "cpu"):
        return f"is a TPU kernel (interpreted on CPU) and cannot run on {platform}"
    if has_dense_mask:
        return ("cannot take a dense mask (prompt tuning over packed rows): its masks are block patterns "
                "plus segment ids")
    return None


def _cudnn_refuses(platform, dtype, head_dim, causal, window, has_segment_ids, has_kv_mask,
                   has_dense_mask, has_softcap=False) -> str | None:
    if platform != "cuda":
        return f"needs an NVIDIA GPU (this is {platform})"
    if jnp.dtype(dtype) not in map(jnp.dtype, _CUDNN_DTYPES):
        return f"takes bfloat16 or float16, not {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > _cudnn_max_head_dim():
        return f"takes head dims that are multiples of 8 up to {_cudnn_max_head_dim()}, not {head_dim}"
    if has_dense_mask:
        return "takes no dense mask"
    if has_softcap:
        return "takes no score soft-capping (Gemma 2)"
    if has_segment_ids:
        return "takes no segment ids (packed rows)"
    if has_kv_mask:
        return "takes padding only as kv_lengths (right padding), not as a kv_mask"
    if window is not None and not causal:
        return "takes a sliding window only with causal order"
    return None


@functools.cache
def _cudnn_max_head_dim() -> int:
    """256 on Hopper and later, else 128 (as jax's check_is_flash_attention); 128 without a GPU to ask."""
    try:
        capability = jax.devices("gpu")[0].compute_capability
    except (RuntimeError, AttributeError, IndexError):
        return 128
    return 256 if tuple(int(x) for x in str(capability).split(".")) >= (9, 0) else 128


def _platform(platform: str | None) -> str:
    """'cpu', 'tpu', 'cuda' or another name; JAX says 'gpu' for CUDA and ROCm alike."""
    platform = platform or jax.default_backend()
    if platform == "gpu":
        version = getattr(jax.devices()[0].client, "platform_version", "") or ""
        return "rocm" if "rocm" in version.lower() else "cuda"
    return platform


@functools.cache
def _log_fallback(asked: str, chosen: str, reason: str) -> None:
    # Once per distinct case: attention is traced once per layer kind, and often retraced.
    log.info("attention backend %r: %s; running %r instead", asked, reason, chosen)


def _check_shapes(q, k, v, causal, window, segment_ids, kv_mask, kv_lengths, dense_mask) -> None:
    b, t, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or h % kv_heads:
        raise ValueError(f"attention needs q [B, T, H, D] and k, v [B, S, K, D] with H a multiple of K; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of tokens, got {window}")
    if (causal or segment_ids is not None) and t != s:
        raise ValueError(f"causal order and segment ids are for self-attention (T == S); got T={t}, S={s}")
    for name, x, shape in (("segment_ids", segment_ids, (b, t)), ("kv_mask", kv_mask, (b, s)),
                           ("kv_lengths", kv_lengths, (b,)), ("dense_mask", dense_mask, (b, 1, t, s))):
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")


# ----------------------------------------------------------------------------- XLA


def visibility_mask(batch: int, q_len: int, kv_len: int, *, causal: bool = True, window: int | None = None,
                    segment_ids=None, kv_mask=None, kv_lengths=None) -> jax.Array:
    """Boolean `[B, 1, T, S]` (True = query i may see key j), the dense form of `attention`'s arguments.

    Causal order, padding keys, packed segments (a token sees only its own segment; segment 0
    is padding) and the sliding window (key within `window - 1` tokens back, as HF's
    `kv_idx > q_idx - sliding_window`), all combined.
    """
    q_idx = jnp.arange(q_len)[:, None]
    k_idx = jnp.arange(kv_len)[None, :]
    allowed = jnp.ones((q_len, kv_len), bool)
    if causal:
        allowed = allowed & (k_idx <= q_idx)
    if window is not None:
        allowed = allowed & (k_idx > q_idx - window)
    mask = jnp.broadcast_to(allowed, (batch, q_len, kv_len))
    if kv_mask is not None:
        mask = mask & (kv_mask[:, None, :] != 0)
    if kv_lengths is not None:
        mask = mask & (k_idx[None] < kv_lengths[:, None, None])
    if segment_ids is not None:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask & same & (segment_ids[:, None, :] != 0)
    return mask[:, None]


def _xla(q, k, v, mask, *, scale, softcap=None):
    """The reference: scores for every (query, key) pair in float32, masked, softmaxed, one einsum a side."""
    return _softmax_attention(q, k, v, mask, scale, kv_layout="bskd", softcap=softcap)


def cached_attention(q, keys, values, *, mask, scale, softcap=None):
    """`_xla`'s computation for keys and values laid out `[B, K, S, D]`, as a KV cache holds them (decoding):
    the dots read that layout as it is, where `[B, S, K, D]` made XLA copy every layer's cache every token."""
    return _softmax_attention(q, keys, values, mask, scale, kv_layout="bksd", softcap=softcap)


def _softmax_attention(q, k, v, mask, scale, *, kv_layout: str, softcap=None):
    """q `[B, T, H, D]`, k/v laid out as `kv_layout` says (einsum letters: b batch, s keys, k kv heads, d)."""
    b, t, h, d = q.shape
    kv_heads = k.shape[kv_layout.index("k")]
    # The query heads sharing a kv head are an axis of their own, so k/v are read, never repeated.
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = _capped(jnp.einsum(f"btkgd,{kv_layout}->bkgts", q, k, preferred_element_type=jnp.float32) * scale,
                     softcap)
    scores = jnp.where(mask[:, :, None], scores, MASK_VALUE)  # [B, 1, T, S] -> [B, 1, 1, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{kv_layout}->btkgd", probs, v)
    return out.reshape(b, t, h, d).astype(q.dtype)


def _chunked(q, k, v, mask, *, scale, causal, softcap=None):
    """Grouped-query attention as 4-D products, in query chunks whose keys above the causal diagonal are
    skipped instead of computed and masked (`causal` promises the mask never shows a later key).

    XLA's CPU dots are ~3x faster forward (~1.3x with backward) as plain 4-D [batch, heads,
    rows, D] products than as 5-D einsums with interleaved batch axes (measured; bench/README.md).
    So the query heads sharing a kv head are folded into the rows: [B, K, G*T, D] against
    [B, K, S, D], and K/V are never copied H/K times.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    groups = h // kv_heads
    q = q.reshape(b, t, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    chunk = _causal_chunk(t, k.shape[2]) if causal else t
    outs = []
    for start in range(0, t, chunk):
        # Queries [start, start + chunk) can only see keys before start + chunk.
        end = start + chunk if causal else k.shape[2]
        outs.append(_attend_chunk(q[:, :, :, start:start + chunk], k[:, :, :end], v[:, :, :end],
                                  mask[:, :, start:start + chunk, :end], scale, softcap))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def _causal_chunk(t: int, s: int, target: int = 64) -> int:
    """Query-block size for causal block skipping: `target` when it tiles a square T x T, else T."""
    return target if t == s and t % target == 0 and t >= 2 * target else t


def _attend_chunk(q, k, v, mask, scale, softcap=None):
    """q `[B, K, G, C, D]`, k/v `[B, K, S, D]`, mask `[B, 1, C, S]` -> `[B, K, G, C, D]`."""
    b, kv_heads, groups, c, d = q.shape
    rows = q.reshape(b, kv_heads, groups * c, d)
    scores = _capped(jnp.einsum("bkrd,bksd->bkrs", rows, k, preferred_element_type=jnp.float32) * scale, softcap)
    row_mask = jnp.tile(mask, (1, 1, groups, 1))  # [B, 1, G*C, S]: row g*C + i is query i
    scores = jnp.where(row_mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkrs,bksd->bkrd", probs, v).reshape(b, kv_heads, groups, c, d)


def _capped(scores, softcap):
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


# ----------------------------------------------------------------------------- cuDNN


def _cudnn(q, k, v, *, scale, causal, window, kv_lengths, implementation="cudnn"):
    """cuDNN flash attention through jax.nn. `implementation="xla"` runs the same arguments through
    jax's XLA version of that function: tests check this translation of our arguments on CPU."""
    lengths = None
    if kv_lengths is not None:
        lengths = kv_lengths.astype(jnp.int32)
    out = jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), scale=scale, is_causal=causal,
        # Our rule j > i - window is jax's left window of window - 1 (cuDNN: sliding_window_length = window).
        local_window_size=None if window is None else (window - 1, 0),
        # Causal is self-attention: query rows past the length are padding too (cuDNN zeroes them). Without
        # causal order the queries may be another sequence, all real: jax then gives them their full length.
        query_seq_lengths=lengths if causal else None,
        key_value_seq_lengths=lengths, implementation=implementation)
    return out.astype(q.dtype)


# ----------------------------------------------------------------------------- splash (TPU)


def _splash(q, k, v, *, scale, causal, window, segment_ids, kv_mask, kv_lengths, interpret, softcap=None):
    """The splash kernel over the batch, per device on a mesh (see the module docstring)."""
    b, t, h, _ = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    seg_q, seg_kv = _splash_segments(b, t, s, causal, segment_ids, kv_mask, kv_lengths)
    # splash does not scale the scores: scaling q is the same product, and its gradient flows back.
    q = (q * jnp.asarray(scale, jnp.float32)).astype(q.dtype)
    local = functools.partial(_splash_local, causal=causal, window=window, interpret=interpret, softcap=softcap)
    mesh = sharding.active_mesh()
    if mesh is None:
        return local(q, k, v, seg_q, seg_kv)
    P = jax.sharding.PartitionSpec
    batch = sharding.spec_for(("batch",), (b,), mesh)[0]
    tensor = mesh.shape.get("tensor", 1)
    # Heads split over 'tensor' only where both q's and k's do, so each device keeps whole groups.
    heads = "tensor" if tensor > 1 and h % tensor == 0 and kv_heads % tensor == 0 else None
    qkv = P(batch, None, heads, None)
    if seg_q is None:
        fn = lambda q, k, v: local(q, k, v, None, None)  # noqa: E731
        return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv), out_specs=qkv, check_vma=False)(q, k, v)
    rows = P(batch, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, rows, rows), out_specs=qkv,
                         check_vma=False)(q, k, v, seg_q, seg_kv)


def _splash_segments(b, t, s, causal, segment_ids, kv_mask, kv_lengths):
    """Query and key segment ids `[B, T]`, `[B, S]` int32 expressing packing and padding, or (None, None).

    Padding keys get segment 0, which no real query has. In self-attention (causal, or packed)
    padding queries get 0 as well, so each sees at least itself and no row of the kernel's
    softmax is empty; across sequences (not causal, no packing) every query is real (1).
    """
    if segment_ids is None and kv_mask is None and kv_lengths is None:
        return None, None
    kv = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if kv_mask is not None:
        kv = jnp.where(kv_mask != 0, kv, 0)
    if kv_lengths is not None:
        kv = jnp.where(jnp.arange(s)[None, :] < kv_lengths[:, None], kv, 0)
    self_attention = causal or segment_ids is not None
    return (kv if self_attention else jnp.ones((b, t), jnp.int32)), kv


def _splash_local(q, k, v, seg_q, seg_kv, *, causal, window, interpret, softcap=None):
    """The kernel on one device's rows: q `[B, T, H, D]` (already scaled), k/v `[B, S, K, D]`."""
    b, t, h, d = q.shape
    s = k.shape[1]
    t_pad, s_pad = _round_up(t, _SPLASH_MIN_BLOCK), _round_up(s, _SPLASH_MIN_BLOCK)
    padded = (t_pad, s_pad) != (t, s)
    if padded and (seg_q is not None or not causal):
        # Padded keys must be invisible to real queries: under causal order in self-attention they come
        # after every real query already; otherwise segment 0 hides them (padded queries see them).
        if seg_q is None:
            seg_q, seg_kv = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32)
        seg_q = jnp.pad(seg_q, ((0, 0), (0, t_pad - t)))
        seg_kv = jnp.pad(seg_kv, ((0, 0), (0, s_pad - s)))
    # The kernel's layout is [heads, length, head_dim] per example.
    q = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, t_pad - t), (0, 0)))
    k = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, s_pad - s), (0, 0)))
    v = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, s_pad - s), (0, 0)))
    kernel = _splash_kernel(h, t_pad, s_pad, causal, window, interpret, softcap)
    if seg_q is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        out = jax.vmap(kernel)(q, k, v, splash.SegmentIds(q=seg_q, kv=seg_kv))
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)


def _splash_kernel(heads: int, t: int, s: int, causal: bool, window: int | None, interpret: bool,
                   softcap: float | None = None):
    """A splash MHA kernel for `heads` query heads over a `[t, s]` mask; grouped kv heads are mapped by the
    kernel itself (q head h reads kv head h // (H / K)). Built per trace (its mask tables are arrays of that
    trace); the costly part, the block analysis of the mask, is cached by splash on the mask's value."""
    if window is not None:
        # Keys with i - (window - 1) <= j, and j <= i when causal.
        mask = splash.LocalMask((t, s), window_size=(window - 1, 0 if causal else None), offset=0)
    elif causal:
        mask = splash.CausalMask((t, s))
    else:
        mask = splash.FullMask((t, s))
    block_q, block_kv = _splash_block(t), _splash_block(s)
    blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                               block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                               block_q_dq=block_q, block_kv_dq=block_kv)
    return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), block_sizes=blocks, head_shards=1,
                                  q_seq_shards=1, attn_logits_soft_cap=softcap, interpret=interpret)


def _splash_block(n: int) -> int:
    """The largest block up to `_SPLASH_MAX_BLOCK` that tiles `n` (a multiple of 128)."""
    block = _SPLASH_MAX_BLOCK
    while n % block:
        block //= 2
    return block


def _round_up(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple
