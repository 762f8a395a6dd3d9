import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.errors import AdapterError
from jaxft.models.hf import load_pretrained
from jaxft.peft.lora import LoRAConfig, LoRALinear, apply_lora, lora_layers, lora_modules, merge_lora, trainable_filter
from jaxft.peft.select import parameter_table
from tests.tiny_hf import padded_batch, save_tiny_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def _logits(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


def _randomise_b(model, seed=1):
    key = jax.random.key(seed)
    for i, m in enumerate(lora_modules(model).values()):
        m.lora_b.set_value(0.05 * jax.random.normal(jax.random.fold_in(key, i), m.lora_b.get_value().shape))


def test_step0_logits_equal_base_exactly(llama_dir):
    ids, mask, _ = padded_batch(128)
    base = load_pretrained(llama_dir)
    adapted = load_pretrained(llama_dir)
    apply_lora(adapted, LoRAConfig(rank=4, targets="all-linear"), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(_logits(base, ids, mask), _logits(adapted, ids, mask))


def test_all_linear_skips_lm_head_and_names_select(llama_dir):
    model = load_pretrained(llama_dir)
    wrapped = apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(0))
    assert len(wrapped) == 2 * 7 and not any("lm_head" in w for w in wrapped)
    model = load_pretrained(llama_dir)
    wrapped = apply_lora(model, LoRAConfig(rank=4, targets="q_proj,v_proj"), rngs=nnx.Rngs(0))
    assert sorted(w.split(".")[-1] for w in wrapped) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    model = load_pretrained(llama_dir)
    wrapped = apply_lora(model, LoRAConfig(rank=4, targets=r"re:model\.layers\.1\.mlp\..*"), rngs=nnx.Rngs(0))
    assert sorted(wrapped) == [f"model.layers.1.mlp.{n}" for n in ("down_proj", "gate_proj", "up_proj")]


@pytest.mark.parametrize("targets,fragment", [
    ("q_proj,qkv", r"names \['qkv'\], which the model does not have; its linear modules are \['down_proj'"),
    ("re:.*attention.*", "matches no linear module"),
])
def test_targets_that_match_nothing_list_modules(llama_dir, targets, fragment):
    with pytest.raises(AdapterError, match=fragment):
        apply_lora(load_pretrained(llama_dir), LoRAConfig(targets=targets), rngs=nnx.Rngs(0))


def test_rank_larger_than_layer(llama_dir):
    with pytest.raises(AdapterError, match="peft.rank=64 exceeds layer"):
        apply_lora(load_pretrained(llama_dir), LoRAConfig(rank=64), rngs=nnx.Rngs(0))


def test_scale_and_rslora():
    assert LoRAConfig(rank=16, alpha=32).scale == 2.0
    assert LoRAConfig(rank=16, alpha=32, use_rslora=True).scale == 8.0


def test_update_is_scaled_low_rank_product(llama_dir):
    model = load_pretrained(llama_dir)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets="q_proj"), rngs=nnx.Rngs(0))
    _randomise_b(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear)
    x = jax.random.normal(jax.random.key(3), (5, layer.base_layer.in_features))
    expected = x @ layer.base_layer.kernel.get_value() + 2.0 * (x @ layer.lora_a.get_value()) @ layer.lora_b.get_value()
    np.testing.assert_allclose(layer(x), expected, atol=1e-5)


def test_merge_matches_adapted_logits(llama_dir):
    ids, mask, _ = padded_batch(128)
    model = load_pretrained(llama_dir)
    apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(0))
    _randomise_b(model)
    adapted = _logits(model, ids, mask)
    merge_lora(model)
    assert not lora_modules(model)
    np.testing.assert_allclose(_logits(model, ids, mask), adapted, atol=1e-4)


def test_filter_counts_only_lora(llama_dir):
    model = load_pretrained(llama_dir)
    wrapped = apply_lora(model, LoRAConfig(rank=4, targets="q_proj,v_proj"), rngs=nnx.Rngs(0))
    rows = parameter_table(model, trainable_filter())
    trainable = sum(r["params"] for r in rows if r["trainable"])
    expected = sum(4 * (m.base_layer.in_features + m.base_layer.out_features) for _, m, _ in lora_layers(model))
    assert trainable == expected and rows[0]["tensors"] == 2 * len(wrapped)


def test_dropout_draws_from_the_step_key_and_is_off_in_eval(llama_dir):
    from jaxft.peft.lora import with_dropout_keys
    from jaxft.peft.select import split_model
    ids, mask, _ = padded_batch(128)
    model = load_pretrained(llama_dir)
    apply_lora(model, LoRAConfig(rank=4, dropout=0.5), rngs=nnx.Rngs(0))
    _randomise_b(model)
    graphdef, params, frozen = split_model(model, trainable_filter())
    logits = lambda k: _logits(nnx.merge(graphdef, params, with_dropout_keys(frozen, jax.random.key(k))), ids, mask)  # noqa: E731
    np.testing.assert_array_equal(logits(1), logits(1))
    assert np.abs(logits(1) - logits(2)).max() > 1e-3
    eval_model = nnx.view(nnx.merge(graphdef, params, frozen), deterministic=True)
    no_dropout = load_pretrained(llama_dir)
    apply_lora(no_dropout, LoRAConfig(rank=4), rngs=nnx.Rngs(0))
    _randomise_b(no_dropout)
    np.testing.assert_allclose(_logits(eval_model, ids, mask), _logits(no_dropout, ids, mask), atol=1e-6)


def _randomise_dora(model, seed=2):
    _randomise_b(model, seed)
    key = jax.random.key(seed)
    for i, m in enumerate(lora_modules(model).values()):
        noise = jax.random.uniform(jax.random.fold_in(key, i), m.lora_magnitude.get_value().shape)
        m.lora_magnitude.set_value(m.lora_magnitude.get_value() * (0.8 + 0.4 * noise))


def test_dora_step0_is_the_base_and_magnitudes_train(llama_dir):
    ids, mask, _ = padded_batch(128)
    base = _logits(load_pretrained(llama_dir), ids, mask)
    model = load_pretrained(llama_dir)
    apply_lora(model, LoRAConfig(rank=4, use_dora=True), rngs=nnx.Rngs(0))
    # The gain m / ||W|| is 1 up to rounding: the scanned blocks compute ||W|| in compiled code, whose reduction
    # may round differently from the eager one that initialised m.
    np.testing.assert_allclose(_logits(model, ids, mask), base, atol=2e-5)
    rows = parameter_table(model, trainable_filter())
    expected = sum(4 * (m.base_layer.in_features + m.base_layer.out_features) + m.base_layer.out_features
                   for _, m, _ in lora_layers(model))
    assert sum(r["params"] for r in rows if r["trainable"]) == expected


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_and_unmerge_in_place(llama_dir, use_dora):
    from jaxft.peft.lora import merge, unmerge
    ids, mask, _ = padded_batch(128)
    model = load_pretrained(llama_dir)
    apply_lora(model, LoRAConfig(rank=4, use_dora=use_dora), rngs=nnx.Rngs(0))
    (_randomise_dora if use_dora else _randomise_b)(model)
    kernels = {n: np.asarray(m.base_layer.kernel.get_value()) for n, m in lora_modules(model).items()}
    adapted = _logits(model, ids, mask)
    merge(model)
    np.testing.assert_allclose(_logits(model, ids, mask), adapted, atol=1e-4)
    with pytest.raises(AdapterError, match="already merged"):
        merge(model)
    unmerge(model)
    for name, m in lora_modules(model).items():
        np.testing.assert_allclose(np.asarray(m.base_layer.kernel.get_value()), kernels[name], atol=1e-6)
    np.testing.assert_allclose(_logits(model, ids, mask), adapted, atol=1e-5)
    merge_lora(model)
    assert not lora_modules(model)
    np.testing.assert_allclose(_logits(model, ids, mask), adapted, atol=1e-4)
