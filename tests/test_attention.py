"""Attention backends (jaxft/models/attention.py) against the XLA reference, on fresh random inputs.

The splash kernel runs in Pallas' interpreter on CPU and lowers for TPU; cuDNN cannot run here,
so its argument translation runs through jax's own XLA version of the same call, and its lowering
for CUDA is checked with the cuDNN version probe answered (see `test_cudnn_lowers_for_cuda`).
Outputs of padding queries are unspecified (each backend gives some finite value) and carry no
gradient in a model (their loss is masked and no real token sees them), so only real query rows
are compared and the output cotangent is zero on padding rows.

The kernel is interpreted plainly (interpret=True), not as a simulated TPU with poisoned memory as
tests/test_lora_kernel.py does: jax 0.10's TPU interpreter fails on a vmapped pallas_call (the grid gains
the batch dimension, its dimension semantics do not), and splash runs vmapped over the batch.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.errors import ConfigError
from jaxft.models import attention as attention_module
from jaxft.models.attention import BACKENDS, attention, explain_backend, resolve_backend, visibility_mask
from tests.conftest import ROOT

D = 32
SCALE = D**-0.5
# The tests are bound by XLA's CPU compile time (the interpreted kernels are large programs), not by running;
# XLA's cheaper optimisation halves it and changes no result beyond float rounding.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(autouse=True)
def small_splash_blocks(monkeypatch):
    """128-wide splash blocks (its smallest) so that a test's 300 tokens make a 3 x 3 grid of blocks: the
    kernel's block skipping (causal, window) and the padding to 384 are exercised."""
    monkeypatch.setattr(attention_module, "_SPLASH_MAX_BLOCK", 128)


def _segments(b, t, seed):
    """Packed rows: random segment lengths, 1, 2, ..., then a tail of padding (0) in some rows."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    for row in range(b):
        end = t - (rng.integers(5, 40) if row % 2 == 0 else 0)
        cuts = np.sort(rng.choice(np.arange(1, end), size=3, replace=False))
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, end])):
            seg[row, lo:hi] = i + 1
    return jnp.asarray(seg)


def _padding(b, s, seed):
    """kv_mask rows alternately right- and left-padded (each keeps at least half its keys)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((b, s), np.int32)
    for row in range(b):
        n = rng.integers(1, s // 2)
        if row % 2 == 0:
            mask[row, s - n:] = 0
        else:
            mask[row, :n] = 0
    return jnp.asarray(mask)


# name: (batch, T, S, heads, kv_heads, attention kwargs builder). Splash pads 300 and 320 to 384, 3 blocks of
# 128; the chunked backend skips blocks above the diagonal where T is a multiple of its 64-query chunks.
CASES = {
    "causal": (2, 320, 320, 2, 2, lambda b, t, s: {}),
    "causal-gqa-padding": (2, 256, 256, 4, 2, lambda b, t, s: {"kv_mask": _padding(b, s, 1)}),
    "packed-gqa": (2, 320, 320, 4, 2, lambda b, t, s: {"segment_ids": _segments(b, t, 2)}),
    "packed-window-padding": (2, 300, 300, 4, 2, lambda b, t, s: {
        "segment_ids": _segments(b, t, 3), "kv_mask": _padding(b, s, 4), "window": 100}),
    "cross-padding": (2, 100, 200, 4, 1, lambda b, t, s: {"causal": False, "kv_mask": _padding(b, s, 5)}),
    # For the cuDNN translation (not a splash case: the window is covered above).
    "window-gqa": (2, 64, 64, 4, 2, lambda b, t, s: {"window": 9}),
}
SPLASH_CASES = [name for name in CASES if name != "window-gqa"]


def _case(name, dtype=jnp.float32, seed=0):
    """(q, k, v, dy), the attention kwargs, and which query rows are real `[B, T, 1, 1]`. Drawn with numpy: eager
    jax.random would compile a program per shape, which costs more here than the tests themselves."""
    b, t, s, h, kh, kwargs = CASES[name]
    kwargs = kwargs(b, t, s)
    rng = np.random.default_rng(seed + sum(map(ord, name)))
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)  # noqa: E731
    q, k, v, dy = draw(b, t, h, D), draw(b, s, kh, D), draw(b, s, kh, D), draw(b, t, h, D)
    real = np.ones((b, t), bool)
    if "segment_ids" in kwargs:
        real &= np.asarray(kwargs["segment_ids"]) != 0
    if "kv_mask" in kwargs and kwargs.get("causal", True):  # self-attention: a padding key is a padding query
        real &= np.asarray(kwargs["kv_mask"]) != 0
    return (q, k, v, dy), kwargs, jnp.asarray(real[:, :, None, None])


def _forward_and_grads(backend, q, k, v, dy, real, **kwargs):
    """(y on real rows, dq, dk, dv), the cotangent zero on padding rows; jitted as a model would run it."""
    def run(q, k, v):
        y, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, scale=SCALE, backend=backend, **kwargs), q, k, v)
        return (jnp.where(real, y, 0), *vjp(jnp.where(real, dy, 0)))
    return jax.jit(run, compiler_options=FAST_COMPILE)(q, k, v)


def _close(ours, reference, tol, what):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (what, ours.shape, reference.shape)
    assert np.isfinite(ours).all(), f"{what}: non-finite values"
    err = np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-6)
    assert err <= tol, f"{what}: max error {err:.2e} of the largest value (tolerance {tol})"


# ----------------------------------------------------------------------------- numerics


@functools.cache
def _reference(case):
    (q, k, v, dy), kwargs, real = _case(case)
    return _forward_and_grads("xla", q, k, v, dy, real, **kwargs)


@pytest.mark.parametrize("backend", ["chunked", "splash"])
@pytest.mark.parametrize("case", SPLASH_CASES)
def test_backend_matches_reference(case, backend):
    """Forward and dq, dk, dv in float32 against "xla", for each masking case."""
    (q, k, v, dy), kwargs, real = _case(case)
    ours = _forward_and_grads(backend, q, k, v, dy, real, **kwargs)
    reference = _reference(case)
    for name, o, r in zip(("y", "dq", "dk", "dv"), ours, reference):
        assert o.dtype == r.dtype == jnp.float32
        _close(o, r, 1e-5, f"{case} {backend} {name}")


@pytest.mark.parametrize("backend", ["chunked", "splash"])
def test_bfloat16_close_to_float32_reference(backend):
    """bfloat16 inputs: the result in bfloat16, within bfloat16 rounding of the float32 reference."""
    (q, k, v, dy), kwargs, real = _case("packed-window-padding", jnp.bfloat16)
    ours = _forward_and_grads(backend, q, k, v, dy, real, **kwargs)
    as_f32 = [x.astype(jnp.float32) for x in (q, k, v, dy)]
    reference = _forward_and_grads("xla", *as_f32, real, **kwargs)
    for name, o, r in zip(("y", "dq", "dk", "dv"), ours, reference):
        assert o.dtype == jnp.bfloat16
        _close(o, r, 3e-2, f"bf16 {backend} {name}")


def test_reference_is_softmax_attention_in_float64():
    """The reference itself, against the formula written out in numpy (GQA: head h reads kv head h // G)."""
    (q, k, v, _), kwargs, real = _case("packed-window-padding")
    mask = np.asarray(visibility_mask(q.shape[0], q.shape[1], k.shape[1], **kwargs))[:, 0]  # [B, T, S]
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k64, v64 = np.repeat(k64, groups, axis=2), np.repeat(v64, groups, axis=2)  # HF's repeat_kv
    scores = np.einsum("bthd,bshd->bhts", q64, k64) * SCALE
    scores = np.where(mask[:, None], scores, -np.inf)
    with np.errstate(invalid="ignore"):  # padding rows: every score -inf, NaN, zeroed below
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs = np.nan_to_num(probs / probs.sum(-1, keepdims=True))
    expected = np.einsum("bhts,bshd->bthd", probs, v64) * np.asarray(real)
    _close(_reference("packed-window-padding")[0], expected, 1e-5, "reference")


def test_kv_lengths_is_right_padding():
    b, t = 2, 50
    lengths = jnp.array([30, 50])
    assert (visibility_mask(b, t, t, kv_lengths=lengths)
            == visibility_mask(b, t, t, kv_mask=(jnp.arange(t)[None] < lengths[:, None]))).all()


def test_dense_mask_overrides_and_runs_on_the_xla_backends():
    """A dense mask (prompt tuning's): xla and chunked give what the reference gives for that pattern."""
    (q, k, v, dy), kwargs, real = _case("packed-gqa")
    q, k, v, dy, real, kwargs = q[:, :128], k[:, :128], v[:, :128], dy[:, :128], real[:, :128], {
        "segment_ids": kwargs["segment_ids"][:, :128]}
    b, t = q.shape[:2]
    mask = visibility_mask(b, t, t, **kwargs) | (jnp.arange(t) < 5)[None, None, None, :]  # 5 "virtual tokens"
    reference = _xla_with(mask, q, k, v, dy, real)
    for backend in ("xla", "chunked"):
        ours = _forward_and_grads(backend, q, k, v, dy, real, dense_mask=mask, causal=True,
                                  segment_ids=kwargs["segment_ids"])  # ignored: the dense mask decides
        for name, o, r in zip(("y", "dq", "dk", "dv"), ours, reference):
            _close(o, r, 1e-5, f"dense {backend} {name}")


def _xla_with(mask, q, k, v, dy, real):
    def run(q, k, v):
        y, vjp = jax.vjp(lambda q, k, v: attention_module._xla(q, k, v, mask, scale=SCALE), q, k, v)
        return (jnp.where(real, y, 0), *vjp(jnp.where(real, dy, 0)))
    return jax.jit(run, compiler_options=FAST_COMPILE)(q, k, v)


# ----------------------------------------------------------------------------- cuDNN


@pytest.mark.parametrize("case,lengths", [("window-gqa", None), ("window-gqa", (64, 37)),
                                          ("cross-padding", (200, 120))])
def test_cudnn_arguments_mean_what_ours_mean(case, lengths):
    """Our call of jax.nn.dot_product_attention for cuDNN (window, causal, kv_lengths, GQA), run through that
    function's XLA implementation, which jax keeps equal to the cuDNN one: equals our reference."""
    (q, k, v, dy), kwargs, real = _case(case)
    kwargs.pop("kv_mask", None)
    if lengths is not None:
        kwargs["kv_lengths"] = jnp.array(lengths, jnp.int32)
        if kwargs.get("causal", True):
            real = real & (jnp.arange(q.shape[1])[None, :] < kwargs["kv_lengths"][:, None])[:, :, None, None]

    def run(fn):
        def grads(q, k, v):
            y, vjp = jax.vjp(fn, q, k, v)
            return (jnp.where(real, y, 0), *vjp(jnp.where(real, dy, 0)))
        return jax.jit(grads, compiler_options=FAST_COMPILE)(q, k, v)
    causal, window, kv_lengths = kwargs.get("causal", True), kwargs.get("window"), kwargs.get("kv_lengths")
    ours = run(lambda q, k, v: attention_module._cudnn(q, k, v, scale=SCALE, causal=causal, window=window,
                                                         kv_lengths=kv_lengths, implementation="xla"))
    reference = run(lambda q, k, v: attention(q, k, v, scale=SCALE, backend="xla", **kwargs))
    for name, o, r in zip(("y", "dq", "dk", "dv"), ours, reference):
        _close(o, r, 1e-5, f"{case} {name}")


def _answer_cudnn_version_probe(monkeypatch):
    # jax asks the CUDA plugin for cuDNN's version before it builds the custom call; this CPU-only jax has no
    # plugin, so the probe is answered with a version jax supports (9.8, its minimum). Nothing else is replaced:
    # the lowering is jax's own.
    from jax._src.cudnn import fused_attention_stablehlo
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)


@pytest.mark.parametrize("kwargs,mask_type,window", [
    ({}, "CAUSAL", None),
    ({"window": 16}, "CAUSAL", 16),
    ({"kv_lengths": jnp.array([100, 128], jnp.int32), "window": 16}, "PADDING_CAUSAL", 16),
    ({"kv_lengths": jnp.array([100, 128], jnp.int32), "causal": False}, "PADDING", None),
])
def test_cudnn_lowers_for_cuda(monkeypatch, kwargs, mask_type, window):
    """Forward and backward lower to cuDNN's flash-attention custom calls, with the mask and window meant."""
    _answer_cudnn_version_probe(monkeypatch)
    q = jnp.zeros((2, 128, 4, 64), jnp.bfloat16)
    kv = jnp.zeros((2, 128, 2, 64), jnp.bfloat16)
    loss = lambda q, k, v: attention(q, k, v, scale=0.125, backend="auto", platform="cuda",  # noqa: E731
                                     **kwargs).astype(jnp.float32).sum()
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__cudnn$fmhaSoftmax(") == 1
    assert text.count("custom_call @__cudnn$fmhaSoftmaxBackward(") == 1
    assert f'\\22mask_type\\22: \\22{mask_type}\\22' in text
    assert f"\\22sliding_window_length\\22: {window or 0}," in text


@pytest.mark.parametrize("kwargs", [{"segment_ids": jnp.ones((2, 128), jnp.int32)},
                                    {"kv_mask": jnp.ones((2, 128), jnp.int32)},
                                    {"dense_mask": jnp.ones((2, 1, 128, 128), bool)},
                                    {"dtype": jnp.float32}])
def test_cudnn_falls_back_to_xla_where_it_cannot(monkeypatch, kwargs):
    _answer_cudnn_version_probe(monkeypatch)
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", jnp.bfloat16)
    q, kv = jnp.zeros((2, 128, 4, 64), dtype), jnp.zeros((2, 128, 2, 64), dtype)
    fn = lambda q, k, v: attention(q, k, v, scale=0.125, backend="cudnn", platform="cuda", **kwargs)  # noqa: E731
    text = jax.jit(fn).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert "cudnn" not in text


def test_explicit_cudnn_on_cpu_runs_xla_and_says_so(caplog):
    caplog.set_level("INFO", logger="jaxft")
    (q, k, v, _), kwargs, _ = _case("window-gqa", jnp.bfloat16)
    attention_module._log_fallback.cache_clear()
    ours, reference = (jax.jit(functools.partial(attention, scale=SCALE, backend=backend, **kwargs),
                               compiler_options=FAST_COMPILE)(q, k, v) for backend in ("cudnn", "xla"))
    np.testing.assert_array_equal(ours, reference)
    assert "attention backend 'cudnn': cudnn needs an NVIDIA GPU (this is cpu); running 'xla' instead" in caplog.text


# ----------------------------------------------------------------------------- choosing


@pytest.mark.parametrize("backend,platform,case,expected", [
    ("auto", "cpu", {}, "chunked"),
    ("auto", "cpu", {"has_dense_mask": True}, "chunked"),
    ("auto", "tpu", {"has_segment_ids": True, "has_kv_mask": True, "window": 8}, "splash"),
    ("auto", "tpu", {"has_dense_mask": True}, "xla"),
    ("auto", "cuda", {"window": 8}, "cudnn"),
    ("auto", "cuda", {"dtype": jnp.float16, "head_dim": 64, "causal": False}, "cudnn"),
    ("auto", "cuda", {"dtype": jnp.float32}, "xla"),
    ("auto", "cuda", {"has_segment_ids": True}, "xla"),
    ("auto", "cuda", {"has_kv_mask": True}, "xla"),
    ("auto", "cuda", {"has_dense_mask": True}, "xla"),
    ("auto", "cuda", {"head_dim": 100}, "xla"),
    ("auto", "cuda", {"head_dim": 256}, "xla"),  # 256 needs Hopper, which only a GPU can say
    ("auto", "cuda", {"window": 8, "causal": False}, "xla"),
    ("auto", "rocm", {}, "xla"),
    ("cudnn", "cpu", {}, "xla"),
    ("cudnn", "cuda", {"has_segment_ids": True}, "xla"),
    ("splash", "cpu", {"has_segment_ids": True}, "splash"),
    ("xla", "tpu", {}, "xla"),
    ("chunked", "cuda", {}, "chunked"),
])
def test_which_backend_runs(backend, platform, case, expected):
    assert resolve_backend(backend, platform, **case) == expected


@pytest.mark.parametrize("backend,platform,case,message", [
    ("flash", "cpu", {}, "attention backend 'flash' is not one of 'auto', 'xla', 'chunked', 'splash', 'cudnn'"),
    ("splash", "tpu", {"has_dense_mask": True}, "'splash' cannot take a dense mask"),
    ("splash", "cuda", {}, "'splash' is a TPU kernel"),
    ("cudnn", "tpu", {}, "'cudnn' runs on NVIDIA GPUs, not on a TPU"),
])
def test_impossible_requests_are_config_errors(backend, platform, case, message):
    with pytest.raises(ConfigError, match=message):
        explain_backend(backend, platform, **case)
    assert set(BACKENDS) == {"auto", "xla", "chunked", "splash", "cudnn"}


@pytest.mark.parametrize("method,packing,expected", [
    ("lora", False, "attention chunked (auto on CPU)"),
    ("lora", True, "attention chunked (auto on CPU)"),
    ("prompt_tuning", True, "attention chunked (auto on CPU)"),
])
def test_run_log_names_the_step_choices(caplog, method, packing, expected):
    from jaxft import trainer
    from jaxft.config import base_config
    from jaxft.models import config_from_hf
    caplog.set_level("INFO", logger="jaxft")
    config = base_config()
    config.peft.method, config.data.packing, config.model.remat = method, packing, "full"
    model_config = config_from_hf(dict(model_type="mistral", vocab_size=64, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                            sliding_window=8), layer_loop="scan")
    trainer._log_step_choices(model_config, config)
    assert f"Decoder blocks: 3, layer loop scan, remat full; {expected}; head + loss in chunks of 1024" in caplog.text
    config.model.attention = "splash"  # an explicit kernel that cannot take the case stops the run
    if method == "prompt_tuning":
        with pytest.raises(ConfigError, match="cannot take a dense mask"):
            trainer._log_step_choices(model_config, config)


def test_attention_refuses_what_no_backend_means():
    q, kv = jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 6, 2, 4))
    with pytest.raises(ValueError, match="self-attention"):
        attention(q, kv, kv, scale=1.0)  # causal across different lengths
    with pytest.raises(ConfigError, match="cannot take a dense mask"):
        attention(q, q, q, scale=1.0, backend="splash", dense_mask=jnp.ones((1, 1, 8, 8), bool))


# ----------------------------------------------------------------------------- in a model's program


def test_inside_scan_switch_checkpoint_and_grad():
    """Two layers scanned, each picking its window with lax.switch (as the model does per layer), the body
    rematerialised, differentiated: splash (a custom_vjp around Pallas calls) gives what the reference gives.
    (The chunked backend is plain jnp, and runs under the model's scan in tests/test_models.py.)"""
    backend = "splash"
    b, t, h, kh = 1, 130, 2, 1
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((b, t, h, D), np.float32))
    kv = jnp.asarray(rng.standard_normal((b, t, kh, D), np.float32))
    seg = jnp.asarray(np.repeat([[1, 2]], [70, t - 70], axis=1).astype(np.int32))

    def loss(backend, x, kv):
        branches = [lambda x, w=w: attention(x, kv, kv, scale=SCALE, backend=backend, window=w, segment_ids=seg)
                    for w in (None, 20)]

        @jax.checkpoint
        def layer(x, which):
            return jax.lax.switch(which, branches, x), None
        y, _ = jax.lax.scan(layer, x, jnp.array([1, 0]))
        return jnp.sum(y * jnp.cos(y))

    ours, reference = (jax.jit(jax.value_and_grad(functools.partial(loss, name), argnums=(0, 1)),
                               compiler_options=FAST_COMPILE)(x, kv) for name in (backend, "xla"))
    for name, o, r in zip(("loss", "dx", "dkv"), jax.tree.leaves(ours), jax.tree.leaves(reference)):
        _close(o, r, 1e-5, f"{backend} {name}")


# ----------------------------------------------------------------------------- lowering


@pytest.mark.parametrize("kwargs", [{}, {"segment_ids": jnp.ones((2, 256), jnp.int32), "window": 64}])
def test_splash_lowers_for_tpu(monkeypatch, kwargs):
    """Forward and backward lower to Mosaic kernels: one forward, dq and dkv backward (at MaxText's 512 blocks)."""
    monkeypatch.setattr(attention_module, "_SPLASH_MAX_BLOCK", 512)
    q = jnp.zeros((2, 256, 8, 128), jnp.bfloat16)
    kv = jnp.zeros((2, 256, 2, 128), jnp.bfloat16)
    loss = lambda q, k, v: attention(q, k, v, scale=0.1, platform="tpu", **kwargs).astype(jnp.float32).sum()  # noqa: E731
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("custom_call @tpu_custom_call") == 3, text[:2000]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("backend", ["xla", "chunked"])
def test_xla_backends_lower_for_accelerators(backend, platform):
    (q, k, v, _), kwargs, _ = _case("packed-window-padding", jnp.bfloat16)
    loss = lambda q, k, v: attention(q, k, v, scale=SCALE, backend=backend, platform=platform,  # noqa: E731
                                     **kwargs).astype(jnp.float32).sum()
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=(platform,))
    assert "custom_call" not in lowered.as_text()


# ----------------------------------------------------------------------------- on a mesh


def test_splash_on_a_mesh_matches_reference():
    """8 fake CPU devices, mesh data=2 x fsdp=2 x tensor=2: splash runs per device under shard_map (batch over
    data and fsdp, heads over tensor) and gives the reference's output and gradients (`_mesh_worker`)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.test_attention"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["shard_map"] and report["devices"] == 8, report
    for name, err in report["errors"].items():
        assert err <= 1e-5, (name, err)


def _mesh_worker():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxft import sharding
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), sharding.MESH_AXES)
    (q, k, v, dy), kwargs, real = _case("packed-window-padding")
    # 128 tokens (the kernel on one block: the blocks were tested above), 4 rows (one per batch shard).
    rows = lambda x: jnp.concatenate([x[:, :128], x[::-1, :128]])  # noqa: E731
    q, k, v, dy, real = (rows(x) for x in (q, k, v, dy, real))
    kwargs = {name: x if isinstance(x, int) else rows(x) for name, x in kwargs.items()}
    reference = _forward_and_grads("xla", q, k, v, dy, real, **kwargs)
    with sharding.use_mesh(mesh):
        place = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES)))  # noqa: E731
        args = [place(x) for x in (q, k, v, dy, real)]
        ours = _forward_and_grads("splash", *args, **{n: place(x) if not isinstance(x, int) else x
                                                        for n, x in kwargs.items()})
        jaxpr = str(jax.make_jaxpr(lambda q: attention(q, k, v, scale=SCALE, backend="splash", **kwargs))(q))
    errors = {name: float(np.abs(np.asarray(o) - np.asarray(r)).max() / np.abs(np.asarray(r)).max())
              for name, o, r in zip(("y", "dq", "dk", "dv"), ours, reference)}
    print(json.dumps({"devices": jax.device_count(), "errors": errors,
                      "shard_map": "shard_map" in jaxpr and "P(('data', 'fsdp'), None, 'tensor', None)" in jaxpr}))


if __name__ == "__main__":
    _mesh_worker()
