"""The hand-written cross-entropy against optax's, value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft.losses import token_cross_entropy


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
