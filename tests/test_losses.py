"""The hand-written cross-entropy against optax's; the chunked loss against the full-logits one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft.losses import chunked_cross_entropy_sum, token_cross_entropy


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_value_and_gradient_match_optax(dtype):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((3, 5, 97)) * 4, dtype)
    targets = jnp.asarray(rng.integers(0, 97, (3, 5)))
    weights = jnp.asarray(rng.random((3, 5)), jnp.float32)

    def ours(x):
        return jnp.sum(token_cross_entropy(x, targets) * weights)

    def reference(x):
        per_token = optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), targets)
        return jnp.sum(per_token * weights)

    value, grad = jax.value_and_grad(ours)(logits)
    ref_value, ref_grad = jax.value_and_grad(reference)(logits)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert grad.dtype == logits.dtype
    np.testing.assert_allclose(value, ref_value, rtol=tol)
    np.testing.assert_allclose(np.float32(grad), np.float32(ref_grad), atol=tol)


def test_jit_and_large_logits_are_stable():
    logits = jnp.array([[1e4, 0.0, -1e4]], jnp.float32)
    loss = jax.jit(token_cross_entropy)(logits, jnp.array([1]))
    np.testing.assert_allclose(loss, [1e4], rtol=1e-6)
    grad = jax.grad(lambda x: token_cross_entropy(x, jnp.array([0])).sum())(logits)
    assert np.all(np.isfinite(grad))


# chunked_cross_entropy_sum: the loss from hidden states and an output head, chunk by chunk. Its
# reference is the full-logits loss, `sum(token_cross_entropy(head_apply(p, x), targets) * weights)`,
# differentiated by JAX. Functions are jitted on both sides: eager dispatch compiles op by op.

# JAX's custom_vjp today, and its next implementation (`jax_custom_vjp3`) with today's and with the
# next jax.checkpoint (`jax_remat3`): the custom VJP uses symbolic zeros in the first and the last.
JAX_MODES = {
    "vjp": {"jax_custom_vjp3": False},
    "vjp3": {"jax_custom_vjp3": True, "jax_remat3": False},
    "vjp3+remat3": {"jax_custom_vjp3": True, "jax_remat3": True},
}


@pytest.fixture
def jax_mode(request):
    """Runs a test with the JAX flags of `JAX_MODES[request.param]`, restoring them after."""
    flags = JAX_MODES[request.param]
    try:
        previous = {name: getattr(jax.config, name) for name in flags}
    except AttributeError as missing:
        pytest.skip(f"this JAX no longer has the flag: {missing}")
    for name, value in flags.items():
        jax.config.update(name, value)
    yield request.param
    for name, value in previous.items():
        jax.config.update(name, value)


def in_every_jax_mode(test):
    return pytest.mark.parametrize("jax_mode", list(JAX_MODES), indirect=True)(test)


def _untied_head(params, h):
    return h @ params["w"]


def _reference(head_apply, params, x, targets, weights):
    return jnp.sum(token_cross_entropy(head_apply(params, x), targets) * weights)


def _problem(batch=2, length=37, dim=8, vocab=50, x_dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((dim, vocab)), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((batch, length, dim)), x_dtype)
    targets = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
    weights = jnp.asarray(rng.random((batch, length)), jnp.float32)
    return params, x, targets, weights


def _jit_both(ours, reference, *args):
    """Both sides in one jitted program: XLA's compile time, not the work, dominates these tests."""
    return jax.jit(lambda *args: (ours(*args), reference(*args)))(*args)


def _assert_tree_close(actual, expected, rtol=1e-5):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.float32(a), np.float32(e)
        assert a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.abs(e).max())


@pytest.mark.parametrize(
    "length, chunk_size, masked, x_dtype",
    [
        (37, 8, False, jnp.float32),  # T not a multiple of the chunk: padded with weight 0
        (32, 8, True, jnp.float32),  # zero weights, among them a whole chunk
        (37, 64, False, jnp.float32),  # T <= chunk: one chunk, no scan
        (37, 8, False, jnp.bfloat16),  # bf16 hidden states, float32 head
    ],
    ids=["ragged", "masked", "one-chunk", "bf16-x"],
)
def test_chunked_matches_full_logits(length, chunk_size, masked, x_dtype):
    params, x, targets, weights = _problem(length=length, x_dtype=x_dtype)
    if masked:
        weights = weights.at[0, :8].set(0.0).at[1, ::3].set(0.0)

    def ours(p, x, w):
        return chunked_cross_entropy_sum(_untied_head, p, x, targets, w, chunk_size=chunk_size)

    def reference(p, x, w):
        return _reference(_untied_head, p, x, targets, w)

    def with_gradients(loss):
        # Gradients for the head, x and (as the per-token losses) the weights; and the primal alone
        # (evaluation), which runs the loss without any gradient work.
        return lambda *args: (jax.value_and_grad(loss, argnums=(0, 1, 2))(*args), loss(*args))

    ((value, grads), primal), ((ref_value, ref_grads), _) = _jit_both(
        with_gradients(ours), with_gradients(reference), params, x, weights
    )
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(primal, ref_value, rtol=1e-5)
    assert value.dtype == jnp.float32 and grads[1].dtype == x_dtype
    _assert_tree_close((grads[0], grads[2]), (ref_grads[0], ref_grads[2]))
    # x's gradient has x's dtype: bf16 is compared at bf16 precision.
    _assert_tree_close(grads[1], ref_grads[1], rtol=1e-5 if x_dtype == jnp.float32 else 1e-2)


def test_large_logits_are_stable_and_unjitted_calls_work():
    params, x, targets, weights = _problem(length=12)
    params = {"w": params["w"] * 1e3}  # logits ~1e3-1e4: exp overflows without the log-sum-exp shift

    def ours(p, x):
        return chunked_cross_entropy_sum(_untied_head, p, x, targets, weights, chunk_size=5)

    # Unjitted: the custom VJP's rules run op by op.
    value, grads = jax.value_and_grad(ours, argnums=(0, 1))(params, x)
    reference = jax.jit(jax.value_and_grad(_reference, argnums=(1, 2)), static_argnums=0)
    ref_value, ref_grads = reference(_untied_head, params, x, targets, weights)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    _assert_tree_close(grads, ref_grads)
    np.testing.assert_allclose(ours(params, x), ref_value, rtol=1e-5)


def test_tied_head_gradient_sums_both_uses():
    # The embedding table is also the output head: its gradient is the lookup's plus the head's.
    rng = np.random.default_rng(1)
    vocab, dim, batch, length = 40, 8, 2, 19
    params = {
        "embed": jnp.asarray(rng.standard_normal((vocab, dim)), jnp.float32),
        "mix": jnp.asarray(rng.standard_normal((dim, dim)) / 3, jnp.float32),
    }
    ids = jnp.asarray(rng.integers(0, vocab, (batch, length)))
    targets = jnp.roll(ids, -1, axis=1)
    weights = jnp.ones((batch, length), jnp.float32).at[:, -1].set(0.0)

    def tied_head(embed, h):
        return h @ embed.T

    def hidden(p):
        return jnp.tanh(p["embed"][ids] @ p["mix"])

    def ours(p):
        return chunked_cross_entropy_sum(tied_head, p["embed"], hidden(p), targets, weights, chunk_size=4)

    def reference(p):
        return _reference(tied_head, p["embed"], hidden(p), targets, weights)

    def head_use_only(p):
        return _reference(tied_head, p["embed"], jax.lax.stop_gradient(hidden(p)), targets, weights)

    (value, grads), (ref_value, ref_grads), head_use_grads = jax.jit(
        lambda p: (jax.value_and_grad(ours)(p), jax.value_and_grad(reference)(p), jax.grad(head_use_only)(p))
    )(params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    _assert_tree_close(grads, ref_grads)
    # Both uses contribute: the head's part alone is not the whole gradient.
    assert not np.allclose(head_use_grads["embed"], grads["embed"], atol=1e-3)


@in_every_jax_mode
def test_gradient_accumulation_scan_and_checkpoint(jax_mode):
    # Micro-batches under lax.scan, each one's hidden states from a rematerialised layer.
    rng = np.random.default_rng(2)
    micro, batch, length, dim, vocab = 3, 2, 21, 8, 30
    params = {
        "w": jnp.asarray(rng.standard_normal((dim, vocab)), jnp.float32),
        "layer": jnp.asarray(rng.standard_normal((dim, dim)) / 3, jnp.float32),
    }
    inputs = jnp.asarray(rng.standard_normal((micro, batch, length, dim)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (micro, batch, length)))
    weights = jnp.asarray(rng.random((micro, batch, length)) > 0.2, jnp.float32)

    def accumulated(loss_fn):
        def run(p):
            def step(total, micro_batch):
                inp, t, w = micro_batch

                @jax.checkpoint
                def micro_loss(p):
                    return loss_fn(p, jnp.tanh(inp @ p["layer"]), t, w)

                value, grads = jax.value_and_grad(micro_loss)(p)
                return jax.tree.map(jnp.add, total, (value, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, p))
            return jax.lax.scan(step, zeros, (inputs, targets, weights))[0]

        return run

    def ours(p, x, t, w):
        return chunked_cross_entropy_sum(_untied_head, {"w": p["w"]}, x, t, w, chunk_size=8)

    def reference(p, x, t, w):
        return _reference(_untied_head, {"w": p["w"]}, x, t, w)

    (value, grads), (ref_value, ref_grads) = _jit_both(accumulated(ours), accumulated(reference), params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    _assert_tree_close(grads, ref_grads)


def _count_dots(fn, *args):
    """dot_general ops in the program jit hands to XLA (a scan body counts once)."""
    return jax.jit(fn).lower(*args).as_text().count("stablehlo.dot_general")


@in_every_jax_mode
@pytest.mark.parametrize("length", [16, 64], ids=["one-chunk", "scanned"])
def test_frozen_head_skips_its_gradient(jax_mode, length):
    # Under LoRA the lm_head is frozen: differentiating x alone must not compute the head's gradient.
    params, x, targets, weights = _problem(length=length)

    def ours(p, x):
        return chunked_cross_entropy_sum(_untied_head, p, x, targets, weights, chunk_size=16)

    def reference(p, x):
        return _reference(_untied_head, p, x, targets, weights)

    # Per chunk: logits, dx and dW; logits and dx; logits and dW; logits alone.
    counts = [_count_dots(fn, params, x) for fn in (jax.grad(ours, (0, 1)), jax.grad(ours, 1), jax.grad(ours), ours)]
    assert counts == [3, 2, 2, 1]
    if jax_mode != "vjp3":
        # With symbolic zeros the skipped matmul is never traced, not just removed by jit's DCE.
        assert str(jax.make_jaxpr(jax.grad(ours, 1))(params, x)).count("dot_general") == 2

    def separate_gradients(loss):
        return lambda p, x: (jax.grad(loss, 1)(p, x), jax.grad(loss, 0)(p, x))

    grads, ref_grads = _jit_both(separate_gradients(ours), separate_gradients(reference), params, x)
    _assert_tree_close(grads, ref_grads)


def test_quantised_head_with_integer_leaves():
    # An int8 weight with a float scale: the integer leaf gets a float0 cotangent, the scale trains.
    rng = np.random.default_rng(3)
    params = {
        "q": jnp.asarray(rng.integers(-127, 128, (8, 30)), jnp.int8),
        "scale": jnp.asarray(rng.random(30) / 50, jnp.float32),
    }
    _, x, targets, weights = _problem(length=13, vocab=30)

    def head(p, h):
        return (h @ p["q"].astype(jnp.float32)) * p["scale"]

    def ours(p, x):
        return chunked_cross_entropy_sum(head, p, x, targets, weights, chunk_size=4)

    def reference(p, x):
        return _reference(head, p, x, targets, weights)

    grads, ref_grads = _jit_both(
        jax.grad(ours, argnums=(0, 1), allow_int=True), jax.grad(reference, argnums=(0, 1), allow_int=True), params, x
    )
    assert grads[0]["q"].dtype == jax.dtypes.float0
    _assert_tree_close((grads[0]["scale"], grads[1]), (ref_grads[0]["scale"], ref_grads[1]))


def test_nnx_head_state():
    # The model side passes an nnx.State (of nnx.Variables) and merges it back into the module.
    from flax import nnx

    graphdef, state = nnx.split(nnx.Linear(8, 50, rngs=nnx.Rngs(0)))

    def head_apply(state, h):
        return nnx.merge(graphdef, state)(h)

    _, x, targets, weights = _problem(length=23)

    def ours(state, x):
        return chunked_cross_entropy_sum(head_apply, state, x, targets, weights, chunk_size=8)

    def reference(state, x):
        return _reference(head_apply, state, x, targets, weights)

    (value, grads), (ref_value, ref_grads) = _jit_both(
        jax.value_and_grad(ours, argnums=(0, 1)), jax.value_and_grad(reference, argnums=(0, 1)), state, x
    )
    assert isinstance(grads[0], nnx.State)
    assert jax.tree.structure(grads[0]) == jax.tree.structure(state)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    _assert_tree_close(grads, ref_grads)
    assert np.abs(np.asarray(grads[0]["kernel"][...])).max() > 0


def test_chunking_lowers_temporary_memory_by_the_logits():
    # The acceptance criterion: the step's temporary memory drops by at least the float32 logits.
    batch, length, vocab, dim = 2, 1024, 32000, 64
    spec = jax.ShapeDtypeStruct
    args = (
        spec((dim, vocab), jnp.float32),
        spec((batch, length, dim), jnp.float32),
        spec((batch, length), jnp.int32),
        spec((batch, length), jnp.float32),
    )

    def head(w, h):
        return h @ w

    def full(w, x, t, weights):
        return _reference(head, w, x, t, weights)

    def chunked(w, x, t, weights):
        return chunked_cross_entropy_sum(head, w, x, t, weights, chunk_size=128)

    def temp_bytes(loss_fn):
        compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = batch * length * vocab * 4
    full_bytes, chunked_bytes = temp_bytes(full), temp_bytes(chunked)
    assert chunked_bytes < logits_bytes < full_bytes
    assert full_bytes - chunked_bytes >= logits_bytes, (full_bytes, chunked_bytes)


def test_rejects_bad_arguments():
    params, x, targets, weights = _problem(length=10)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy_sum(_untied_head, params, x, targets, weights, chunk_size=0)
    with pytest.raises(ValueError, match="agree on B and T"):
        chunked_cross_entropy_sum(_untied_head, params, x, targets[:, :5], weights, chunk_size=4)
