"""The fused LoRA Pallas kernel (jaxft/kernels/lora_matmul.py) against its XLA reference, run as a
simulated TPU (Pallas' TPU interpret mode, uninitialised memory poisoned with NaN: the TPU form, a grid
over the contraction) and interpreted plainly (the GPU form, a loop over it), and lowered for TPU and
CUDA from this CPU. Inputs are random and every output element nonzero, so a tile the kernel
failed to write cannot match (checked once by guarding the write of y with `pl.when(i == 0)`: y off
by 1.4x its largest value)."""

import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxft.kernels import lora_matmul as kernel_module
from jaxft.kernels.lora_matmul import Blocks, lora_matmul, lora_matmul_reference, use_pallas
from jaxft.peft.quant import quantize_int8

POISONED = pltpu.InterpretParams(uninitialized_memory="nan")
SMALL = Blocks(m=32, n=128, k=128)  # several tiles in every direction at test sizes


def _inputs(m, k, n, r, dtype, seed):
    """Fresh random operands scaled so every term of y is O(1)."""
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(keys[1], (k, n)) / np.sqrt(k)).astype(dtype)
    a = jax.random.normal(keys[2], (k, r)) / np.sqrt(k)
    b = jax.random.normal(keys[3], (r, n)) / np.sqrt(r)
    dy = jax.random.normal(keys[4], (m, n), jnp.float32).astype(dtype)
    return x, w, a, b, dy


def _forward_and_grads(kernel, x, w, a, b, dy, scale, **options):
    fn = lambda x, a, b: lora_matmul(x, w, a, b, scale, kernel=kernel, **options)  # noqa: E731
    y, vjp = jax.vjp(fn, x, a, b)
    return (y, *vjp(dy))


def _close(ours, reference, tol, what):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert np.isfinite(ours).all(), f"{what}: non-finite values (an unwritten tile?)"
    scale = max(np.abs(reference).max(), 1e-6)
    err = np.abs(ours - reference).max() / scale
    assert err <= tol, f"{what}: max error {err:.2e} of the largest value (tolerance {tol})"


# (m, k, n, r): whole tiles, and every dimension off the tile grid.
SHAPES = [(64, 256, 256, 16), (50, 300, 200, 4), (33, 129, 257, 64), (8, 128, 100, 8)]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_forward_and_gradients_match_xla(shape, dtype, tol):
    x, w, a, b, dy = _inputs(*shape, dtype, seed=sum(shape))
    ours = _forward_and_grads("pallas", x, w, a, b, dy, 2.0, blocks=SMALL, interpret=POISONED)
    reference = _forward_and_grads("xla", x, w, a, b, dy, 2.0)
    for name, o, r in zip(("y", "dx", "dA", "dB"), ours, reference):
        assert o.shape == r.shape and o.dtype == r.dtype, (name, o.shape, r.shape, o.dtype, r.dtype)
        _close(o, r, tol, name)


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_gpu_form_of_the_kernel_matches_xla(shape):
    """The form that loops over the contraction inside the kernel (Triton's; plain interpretation runs it)."""
    x, w, a, b, dy = _inputs(*shape, jnp.float32, seed=sum(shape) + 2)
    codes, w_scale = quantize_int8(w)
    for weight, scales in ((w, None), (codes, w_scale)):
        ours = _forward_and_grads("pallas", x, weight, a, b, dy, 2.0, w_scale=scales, blocks=SMALL, interpret=True)
        reference = _forward_and_grads("xla", x, weight, a, b, dy, 2.0, w_scale=scales)
        for name, o, r in zip(("y", "dx", "dA", "dB"), ours, reference):
            _close(o, r, 2e-5, name)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=["x".join(map(str, s)) for s in SHAPES[:2]])
def test_int8_base_dequantised_in_the_kernel_matches_xla(shape, dtype, tol):
    """QLoRA-int8: codes [K, N] and a scale per output column, dequantised tile by tile in the kernel."""
    x, w, a, b, dy = _inputs(*shape, dtype, seed=sum(shape) + 1)
    codes, w_scale = quantize_int8(w.astype(jnp.float32))
    ours = _forward_and_grads("pallas", x, codes, a, b, dy, 2.0, w_scale=w_scale, blocks=SMALL, interpret=POISONED)
    reference = _forward_and_grads("xla", x, codes, a, b, dy, 2.0, w_scale=w_scale)
    for name, o, r in zip(("y", "dx", "dA", "dB"), ours, reference):
        _close(o, r, tol, name)
    dequantised = codes.astype(jnp.float32) * w_scale  # and the reference is the dequantised float layer
    _close(reference[0], lora_matmul_reference(x, dequantised.astype(dtype), a, b, 2.0), tol, "y vs float")


def test_reference_is_the_lora_formula_in_float64():
    x, w, a, b, _ = _inputs(40, 96, 80, 8, jnp.float32, seed=3)
    expected = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + 0.5 * (
        np.asarray(x, np.float64) @ np.asarray(a, np.float64)) @ np.asarray(b, np.float64)
    _close(lora_matmul_reference(x, w, a, b, 0.5), expected, 1e-5, "reference")


def test_the_frozen_weight_gets_no_gradient():
    x, w, a, b, _ = _inputs(16, 128, 128, 4, jnp.float32, seed=4)
    dw = jax.grad(lambda w: jnp.sum(lora_matmul(x, w, a, b, 1.0, kernel="pallas", blocks=SMALL)))(w)
    assert not np.asarray(dw).any()


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernel_lowers_for_accelerators(platform, quantised):
    """Forward and backward lower to Mosaic (TPU) and Triton (CUDA) custom calls without the hardware."""
    x, w, a, b, _ = _inputs(256, 512, 384, 16, jnp.bfloat16, seed=5)
    w, w_scale = quantize_int8(w.astype(jnp.float32)) if quantised else (w, None)
    loss = lambda x, a, b: jnp.sum(lora_matmul(x, w, a, b, 2.0, kernel="pallas", w_scale=w_scale,  # noqa: E731
                                               platform=platform).astype(jnp.float32))
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, a, b).lower(lowering_platforms=(platform,))
    text = lowered.as_text()
    target = "custom_call @tpu_custom_call" if platform == "tpu" else "custom_call @__gpu"
    assert text.count(target) == 2, text[:2000]  # the forward kernel and the backward one


def _xla_dots(jaxpr) -> int:
    """dot_generals in a jaxpr outside Pallas kernels (inner jaxprs of jit/custom_vjp included)."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            continue
        count += eqn.primitive.name == "dot_general"
        for inner in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _xla_dots(inner)
    return count


def test_backward_leaves_only_da_to_xla():
    """dx, g and dB come out of the backward kernel, which loads each dy tile once: the one matmul XLA
    still does is dA = x^T g (x is not an operand of that kernel)."""
    x, w, a, b, dy = _inputs(64, 256, 256, 16, jnp.float32, seed=6)
    fn = lambda x, a, b: lora_matmul(x, w, a, b, 2.0, kernel="pallas", blocks=SMALL)  # noqa: E731
    _, vjp = jax.vjp(fn, x, a, b)
    assert _xla_dots(jax.make_jaxpr(vjp)(dy).jaxpr) == 1
    _, vjp = jax.vjp(lambda x, a, b: lora_matmul(x, w, a, b, 2.0, kernel="xla"), x, a, b)
    assert _xla_dots(jax.make_jaxpr(vjp)(dy).jaxpr) > 1  # the count sees XLA's matmuls where they are


@pytest.mark.parametrize("m,r", [(1, 24), (50, 48)])
def test_triton_gets_power_of_two_tiles(m, r):
    """Triton loads only power-of-two arrays and dots at least 16 wide: a decode batch of one row and a
    rank of 24 or 48 are padded to such tiles (lowering fails otherwise), and the result is unchanged."""
    x, w, a, b, dy = _inputs(m, 200, 130, r, jnp.float32, seed=m + r)
    loss = lambda x, a, b: jnp.sum(lora_matmul(x, w, a, b, 2.0, kernel="pallas", platform="cuda"))  # noqa: E731
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, a, b).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu") == 2
    ours = _forward_and_grads("pallas", x, w, a, b, dy, 2.0, platform="cuda", interpret=True)
    for name, o, ref in zip(("y", "dx", "dA", "dB"), ours, _forward_and_grads("xla", x, w, a, b, dy, 2.0)):
        _close(o, ref, 2e-5, name)


@pytest.mark.parametrize("platform,blocks,rule", [("cuda", Blocks(m=96), "powers of two"),
                                                  ("tpu", Blocks(n=64), "multiples of 8")])
def test_blocks_a_backend_cannot_tile_are_refused(platform, blocks, rule):
    x, w, a, b, _ = _inputs(64, 256, 256, 16, jnp.float32, seed=7)
    with pytest.raises(ValueError, match=rule):
        lora_matmul(x, w, a, b, 2.0, kernel="pallas", blocks=blocks, platform=platform, interpret=True)


def test_tpu_vmem_limit_follows_the_blocks():
    """Small blocks keep Mosaic's default scoped VMEM; larger ones raise the limit to what they need;
    more than a TPU core has is refused before compiling."""
    params = kernel_module._compiler_params
    assert params("tpu", 2 << 20).vmem_limit_bytes is None
    assert params("tpu", 40 << 20).vmem_limit_bytes == 44 << 20
    with pytest.raises(ValueError, match="VMEM"):
        params("tpu", 80 << 20)
    x, w, a, b, _ = _inputs(1024, 4096, 4096, 16, jnp.bfloat16, seed=8)
    with pytest.raises(ValueError, match="choose smaller Blocks"):
        jax.jit(lambda x: lora_matmul(x, w, a, b, 2.0, kernel="pallas", platform="tpu",
                                      blocks=Blocks(1024, 4096, 4096))).trace(x).lower(lowering_platforms=("tpu",))


def test_dispatch():
    assert use_pallas("pallas", "cpu") and not use_pallas("xla", "tpu")
    assert not use_pallas("auto", "cpu")  # XLA until a benchmark shows the kernel faster on a backend
    with pytest.raises(ValueError, match="kernel='triton'"):
        use_pallas("triton")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_training_with_the_kernel_matches_xla(tmp_path, method):
    """The quickstart model, LoRA on every linear layer (qlora: over an int8 base): three steps with
    peft.kernel=pallas (interpreted on CPU) give the losses and adapter of peft.kernel=xla. SGD with
    momentum, as in tests/test_sharding.py: Adam turns float noise in LoRA A's near-zero gradients into
    lr-sized differences."""
    from safetensors.numpy import load_file

    from jaxft import trainer
    from tests.test_trainer import small_config
    runs = {}
    for kernel in ("xla", "pallas"):
        trainer.run(small_config(**{"peft.kernel": kernel, "peft.method": method, "peft.quant": "int8",
                                    "train.steps": 3, "train.log_every_steps": 1,
                                    "eval.every_steps": 0, "eval.max_batches": 1, "optim.name": "sgd",
                                    "optim.momentum": 0.9, "optim.lr": 0.05}), tmp_path / kernel)
        lines = (tmp_path / kernel / "metrics.jsonl").read_text().splitlines()
        losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
        runs[kernel] = losses, load_file(str(tmp_path / kernel / "export" / "adapter" / "adapter_model.safetensors"))
    np.testing.assert_allclose(runs["pallas"][0], runs["xla"][0], rtol=1e-5)
    for name, value in runs["xla"][1].items():
        _close(runs["pallas"][1][name], value, 1e-5, name)


def test_the_kernel_is_used_where_asked(monkeypatch):
    """A LoRA layer with kernel=pallas calls the kernel, also over an int8 base; with dropout, or over an
    NF4 base, it keeps the XLA path."""
    from flax import nnx

    from jaxft.kernels import lora_matmul as module
    from jaxft.models.layers import Linear
    from jaxft.peft import lora
    calls = []
    monkeypatch.setattr(lora, "lora_matmul", lambda *args, **kw: calls.append(kw) or module.lora_matmul(*args, **kw))
    x = jnp.ones((2, 3, 16))
    plain = lora.LoRALinear(Linear(16, 8, rngs=nnx.Rngs(0)), rank=4, scale=1.0, dropout=0.0, rngs=nnx.Rngs(1),
                            kernel="pallas")
    assert plain(x).shape == (2, 3, 8) and [c["kernel"] for c in calls] == ["pallas"]
    with_dropout = lora.LoRALinear(Linear(16, 8, rngs=nnx.Rngs(0)), rank=4, scale=1.0, dropout=0.1,
                                   rngs=nnx.Rngs(1), kernel="pallas")
    with_dropout(x)
    assert len(calls) == 1
    from jaxft.peft.quant import QuantizedLinear
    for kind, used in (("int8", 2), ("nf4", 2)):
        base = QuantizedLinear.from_linear(Linear(16, 8, rngs=nnx.Rngs(0)), kind=kind, block_size=8)
        lora.LoRALinear(base, rank=4, scale=1.0, dropout=0.0, rngs=nnx.Rngs(1), kernel="pallas")(x)
        assert len(calls) == used, kind


def test_the_log_says_where_the_kernel_runs(caplog):
    """Asked for, the kernel's reach is logged: layers it cannot serve are counted and the reason named,
    and on CPU the user is told it runs interpreted."""
    from flax import nnx

    from jaxft.models.hf import load_pretrained
    from jaxft.peft import lora
    from tests.conftest import QUICKSTART
    caplog.set_level("INFO", logger="jaxft")
    model = lambda: load_pretrained(QUICKSTART / "model")  # noqa: E731
    lora.apply_lora(model(), lora.LoRAConfig(rank=4, kernel="pallas", targets="q_proj,v_proj"), rngs=nnx.Rngs(0))
    assert "the fused Pallas kernel computes 6 of 6 LoRA layers\n" in caplog.text + "\n"
    assert "runs the kernel interpreted" in caplog.text
    caplog.clear()
    lora.apply_lora(model(), lora.LoRAConfig(rank=4, dropout=0.1, kernel="pallas"), rngs=nnx.Rngs(0))
    assert "the fused Pallas kernel computes 0 of" in caplog.text and "LoRA dropout" in caplog.text
    caplog.clear()
    lora.apply_lora(model(), lora.LoRAConfig(rank=4, kernel="auto"), rngs=nnx.Rngs(0))
    assert "Pallas" not in caplog.text  # auto on CPU is XLA: nothing to say


def test_benchmark_runs_and_reports_both_sides():
    """bench/lora_kernel.py on a tiny shape (its CPU figures mean nothing; this keeps it runnable)."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "lora_kernel.py"), "--allow-cpu", "--shapes",
                          "64,256,128,8", "--iters", "1", "--warmup", "1", "--dtype", "float32", "--block",
                          "128,128,128;64,64,64,4,3"], capture_output=True, text=True, timeout=300, check=True).stdout
    records = [json.loads(line) for line in out.splitlines()]
    # decode's pass, and a training step: each block candidate, then the better of the two
    assert [(r["step"], r["blocks"], "best_of" in r) for r in records][:3] == [
        ("forward", "128,128,128", False), ("forward", "64,64,64,4,3", False), ("forward", records[2]["blocks"], True)]
    assert [r["step"] for r in records[3:]] == ["train"] * 3
    for record in records:
        assert record["shape"] == dict(m=64, k=256, n=128, r=8) and record["xla_ms"] > 0 and record["pallas_ms"] > 0
