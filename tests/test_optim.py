import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft.config import base_config
from jaxft.optim import build_optimizer, decay_mask, learning_rate_schedule


def _optim(**overrides):
    c = base_config().optim
    for k, v in overrides.items():
        c[k] = v
    return c


def test_warmup_cosine_shape():
    s = learning_rate_schedule(_optim(lr=1.0, warmup_steps=10, end_lr_ratio=0.1), 110)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, abs=1e-6)  # halfway down the cosine to 0.1
    assert float(s(110)) == pytest.approx(0.1)


@pytest.mark.parametrize("schedule,mid", [("linear", 0.5), ("constant", 1.0)])
def test_linear_and_constant(schedule, mid):
    s = learning_rate_schedule(_optim(lr=1.0, warmup_steps=10, schedule=schedule), 110)
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(60)) == pytest.approx(mid)


def test_decay_mask_skips_norms_and_biases():
    params = {"q_proj": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
              "input_layernorm": {"scale": jnp.ones(2)}, "lora_a": jnp.ones((2, 1))}
    mask = decay_mask(params)
    assert mask == {"q_proj": {"kernel": True, "bias": False}, "input_layernorm": {"scale": False}, "lora_a": True}


def test_adamw_decays_only_masked_params():
    params = {"w": jnp.ones((2, 2)), "norm": {"scale": jnp.ones(2)}}
    tx = build_optimizer(_optim(lr=0.1, weight_decay=0.5, schedule="constant", clip_norm=0.0), 10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.05 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["norm"]["scale"], np.zeros(2))


def test_clipping_bounds_the_update():
    params = {"w": jnp.zeros(4)}
    tx = build_optimizer(_optim(name="sgd", lr=1.0, schedule="constant", clip_norm=1.0), 10)
    updates, _ = tx.update({"w": jnp.full(4, 10.0)}, tx.init(params), params)
    assert float(jnp.linalg.norm(updates["w"])) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "adafactor", "lion", "rmsprop", "adagrad"])
def test_every_optimizer_descends(name):
    params = {"w": jnp.array([3.0, -2.0])}
    tx = build_optimizer(_optim(name=name, lr=0.05, schedule="constant", weight_decay=0.01), 100)
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
    for _ in range(20):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 13.0
