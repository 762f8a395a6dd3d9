"""Bottleneck adapters (Houlsby, Pfeiffer) and BitFit on tiny Llama and Qwen2 models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxft.errors import AdapterError, ConfigError
from jaxft.models import stack
from jaxft.models.hf import load_pretrained
from jaxft.peft.adapters import (
    ACTIVATIONS,
    AdaptedOutput,
    BottleneckAdapter,
    adapter_modules,
    apply_adapters,
    trainable_filter,
)
from jaxft.peft.bitfit import bias_parameters, bitfit_filter
from jaxft.peft.select import get_module, parameter_table, path_str
from jaxft.trainer import loss_sums
from tests.tiny_hf import padded_batch, save_tiny_model

BOTTLENECK = 8


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {t: save_tiny_model(t, tmp_path_factory.mktemp(t)) for t in ("llama", "qwen2")}


def _batch():
    ids, mask, positions = padded_batch(128)
    return dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions),
                loss_mask=jnp.asarray(mask))


def _logits(model, batch):
    return np.asarray(model(batch["input_ids"], attention_mask=batch["attention_mask"],
                            positions=batch["positions"]))


def _trainable_counts(model, trainable):
    rows = parameter_table(model, trainable)
    return sum(r["tensors"] for r in rows if r["trainable"]), sum(r["params"] for r in rows if r["trainable"])


def _flat(state):
    return {path_str(p): np.array(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _train(model, trainable, batch, steps=8, lr=1e-2):
    """Adam on the trainable state only, as jaxft/trainer.py splits it. Returns (model after, losses, frozen
    before, frozen after, optimizer-state leaf count)."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    frozen_before = _flat(frozen)
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, frozen):
        def loss(p):
            total, count = loss_sums(nnx.merge(graphdef, p, frozen), batch)
            return total / count
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses = []
    for _ in range(steps):
        params, opt_state, value = step(params, opt_state, frozen)
        losses.append(float(value))
    trained = nnx.merge(graphdef, params, frozen)
    frozen_after = _flat(nnx.split(trained, trainable, ...)[2])
    return trained, losses, frozen_before, frozen_after, len(jax.tree.leaves(opt_state))


# ----------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("kind,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_step0_identity_placement_and_counts(model_dirs, model_type, kind, per_layer):
    batch = _batch()
    base = load_pretrained(model_dirs[model_type])
    model = load_pretrained(model_dirs[model_type])
    wrapped = apply_adapters(model, kind, BOTTLENECK, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(_logits(base, batch), _logits(model, batch))

    cfg = model.config
    outputs = ["self_attn.o_proj", "mlp.down_proj"][2 - per_layer:]
    assert sorted(wrapped) == sorted(f"model.layers.{i}.{o}" for i in range(cfg.num_layers) for o in outputs)
    # One module per output projection, holding every layer's adapter stacked (jaxft/models/stack.py).
    assert sorted(adapter_modules(model)) == sorted(f"model.layers.0.{o}" for o in outputs)
    hidden = cfg.hidden_size
    tensors, params = _trainable_counts(model, trainable_filter())
    assert tensors == 4 * per_layer * cfg.num_layers
    assert params == per_layer * cfg.num_layers * (2 * hidden * BOTTLENECK + BOTTLENECK + hidden)


@pytest.mark.parametrize("model_type,kind", [("llama", "houlsby"), ("qwen2", "pfeiffer")])
def test_training_moves_only_adapters(model_dirs, model_type, kind):
    batch = _batch()
    base_logits = _logits(load_pretrained(model_dirs[model_type]), batch)
    model = load_pretrained(model_dirs[model_type])
    apply_adapters(model, kind, BOTTLENECK, activation="gelu", rngs=nnx.Rngs(0))
    trained, losses, frozen_before, frozen_after, opt_leaves = _train(model, trainable_filter(), batch)

    assert losses[-1] < 0.95 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert frozen_before.keys() == frozen_after.keys()
    for name, value in frozen_before.items():
        np.testing.assert_array_equal(frozen_after[name], value, err_msg=name)
    # Adam's two moments for the adapter tensors only (4 stacked ones per wrapped projection), plus its step
    # count: frozen weights hold no state.
    assert opt_leaves == 2 * 4 * len(adapter_modules(model)) + 1

    h = jax.random.normal(jax.random.key(1), (4, model.config.hidden_size))
    for i in range(model.config.num_layers):
        for name in ("self_attn.o_proj", "mlp.down_proj")[2 - len(adapter_modules(trained)):]:
            module = get_module(stack.layer_module(trained, i), name)
            assert not np.allclose(module.adapter(h), h), (i, name)
    assert not np.allclose(_logits(trained, batch), base_logits)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_adapter_formula(activation):
    adapter = BottleneckAdapter(16, 4, activation=activation, rngs=nnx.Rngs(0))
    adapter.up_kernel.set_value(jax.random.normal(jax.random.key(1), (4, 16)))
    adapter.up_bias.set_value(jax.random.normal(jax.random.key(2), (16,)))
    adapter.down_bias.set_value(jax.random.normal(jax.random.key(3), (4,)))
    h = np.asarray(jax.random.normal(jax.random.key(4), (2, 3, 16)))
    act = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh, "silu": lambda z: z / (1 + np.exp(-z)),
           "gelu": lambda z: np.asarray(jax.scipy.stats.norm.cdf(z)) * z}[activation]
    down = h @ np.asarray(adapter.down_kernel.get_value()) + np.asarray(adapter.down_bias.get_value())
    expected = h + act(down) @ np.asarray(adapter.up_kernel.get_value()) + np.asarray(adapter.up_bias.get_value())
    np.testing.assert_allclose(adapter(jnp.asarray(h)), expected, rtol=1e-5, atol=1e-5)


def test_adapter_params_float32_compute_in_input_dtype():
    adapter = BottleneckAdapter(16, 4, rngs=nnx.Rngs(0))
    assert all(v.get_value().dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(adapter, nnx.Param)))
    h = jnp.ones((2, 16), jnp.bfloat16)
    assert adapter(h).dtype == jnp.bfloat16
    assert not adapter.up_kernel.get_value().any() and not adapter.up_bias.get_value().any()
    assert 0 < adapter.down_kernel.get_value().std() < 0.05


def test_adapted_output_wraps_the_base_layer(model_dirs):
    model = load_pretrained(model_dirs["llama"])
    base = model.model.layers[0].mlp.down_proj
    apply_adapters(model, "pfeiffer", BOTTLENECK, rngs=nnx.Rngs(0))
    wrapped = model.model.layers[0].mlp.down_proj
    assert isinstance(wrapped, AdaptedOutput) and wrapped.base_layer is base
    assert isinstance(model.model.layers[0].self_attn.o_proj, type(base))  # pfeiffer leaves attention alone


@pytest.mark.parametrize("kwargs,error,fragment", [
    (dict(bottleneck=0), AdapterError, r"peft.adapter_size=0 must be an integer from 1 to the model's hidden size "
                                       r"\(32\)"),
    (dict(bottleneck=33), AdapterError, r"peft.adapter_size=33 .* \(32\)"),
    (dict(bottleneck=8.0), AdapterError, r"peft.adapter_size=8.0 must be an integer"),
    (dict(activation="swish"), ConfigError, r"peft.adapter_activation='swish' is not supported; "
                                            r"valid: relu, gelu, silu, tanh"),
    (dict(kind="lora"), ConfigError, r"peft.adapter_kind='lora' is not an adapter kind; valid: houlsby, pfeiffer"),
])
def test_bad_configs_are_refused_and_leave_the_model_alone(model_dirs, kwargs, error, fragment):
    model = load_pretrained(model_dirs["llama"])
    with pytest.raises(error, match=fragment):
        apply_adapters(model, **kwargs, rngs=nnx.Rngs(0))
    assert adapter_modules(model) == {}


def test_adapters_twice_and_direct_bad_activation(model_dirs):
    model = load_pretrained(model_dirs["llama"])
    apply_adapters(model, "houlsby", BOTTLENECK, rngs=nnx.Rngs(0))
    with pytest.raises(AdapterError, match="already has adapters"):
        apply_adapters(model, "houlsby", BOTTLENECK, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="peft.adapter_activation='elu'"):
        BottleneckAdapter(16, 4, activation="elu", rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- BitFit


def test_bitfit_trains_qkv_biases_of_qwen2(model_dirs):
    batch = _batch()
    model = load_pretrained(model_dirs["qwen2"])
    cfg = model.config
    expected = [f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(cfg.num_layers) for p in "qkv"]
    assert sorted(bias_parameters(model)) == sorted(expected)
    trainable = bitfit_filter(model)
    tensors, params = _trainable_counts(model, trainable)
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    assert (tensors, params) == (3 * cfg.num_layers, cfg.num_layers * (q_dim + 2 * kv_dim))

    trained, losses, frozen_before, frozen_after, _ = _train(model, trainable, batch, lr=5e-2)
    assert losses[-1] < 0.95 * losses[0], losses
    for name, value in frozen_before.items():
        np.testing.assert_array_equal(frozen_after[name], value, err_msg=name)
    assert not any(n.endswith(".bias") for n in frozen_before)
    assert any(n.endswith("norm.scale") for n in frozen_before)  # norm weights are not biases


def test_bitfit_on_llama_names_the_problem(model_dirs):
    model = load_pretrained(model_dirs["llama"])
    with pytest.raises(AdapterError) as e:
        bitfit_filter(model)
    assert str(e.value) == ("BitFit trains biases; this model (llama, no biases in any layer) has none. "
                            "Use LoRA, or a model with biases such as Qwen2.")
