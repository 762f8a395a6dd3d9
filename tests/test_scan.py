"""Stacked decoder blocks under a scan (jaxft/models/stack.py): the same model as a Python loop over layers,
one compiled block whatever the depth, and groups split where a method treats layers differently."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.models import stack
from jaxft.models.decoder import DecoderConfig, DecoderForCausalLM
from jaxft.models.hf import load_pretrained
from jaxft.peft.lora import LoRAConfig, apply_lora, lora_modules, trainable_filter
from jaxft.peft.partial import partial_filter
from jaxft.peft.select import split_model, uniform_groups
from jaxft.trainer import loss_sums
from tests.tiny_hf import padded_batch, save_tiny_model


@pytest.fixture(scope="module")
def qwen2_mixed_windows(tmp_path_factory):
    """Qwen2 whose top layer slides a window of 3 and whose others attend fully: per-layer data in the scan."""
    return save_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2"), num_hidden_layers=3, use_sliding_window=True,
                           sliding_window=3, max_window_layers=2)


def _batch():
    ids, mask, positions = padded_batch(128)
    return dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions),
                loss_mask=jnp.asarray(mask))


def _with(model, **config):
    """The same model (the same arrays) run with other static settings (`layer_loop`, `remat`)."""
    model.config = dataclasses.replace(model.config, **config)
    return model


def _loss_and_grads(model, trainable):
    graphdef, params, frozen = split_model(model, trainable)
    batch = _batch()

    @jax.jit
    def f(params):
        total, count = loss_sums(nnx.merge(graphdef, params, frozen), batch)
        return total / count
    loss, grads = jax.value_and_grad(f)(params)
    return float(loss), stack.flat_layers(grads)


def _randomise_b(model):
    for i, m in enumerate(lora_modules(model).values()):
        m.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(i), m.lora_b.get_value().shape))


@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_scan_equals_unroll_logits_and_gradients(qwen2_mixed_windows, remat):
    model = load_pretrained(qwen2_mixed_windows)
    apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(0))
    _randomise_b(model)
    batch = _batch()
    logits = {}
    results = {}
    for loop in ("scan", "unroll"):
        _with(model, layer_loop=loop, remat=remat)
        logits[loop] = np.asarray(model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                        positions=batch["positions"]))
        results[loop] = _loss_and_grads(model, trainable_filter())
    np.testing.assert_allclose(logits["scan"], logits["unroll"], atol=1e-5)
    (loss_s, grads_s), (loss_u, grads_u) = results["scan"], results["unroll"]
    assert loss_s == pytest.approx(loss_u, rel=1e-6)
    assert grads_s.keys() == grads_u.keys() and len(grads_s) == 2 * 7 * 3  # A and B, 7 linears, 3 layers
    for name in grads_s:
        np.testing.assert_allclose(grads_s[name], grads_u[name], atol=1e-6, rtol=1e-5, err_msg=name)


def _dots_in_step(num_layers: int, loop: str) -> int:
    cfg = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=num_layers, num_heads=4,
                      num_kv_heads=2, head_dim=8, layer_loop=loop)
    model = DecoderForCausalLM(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    graphdef, params, frozen = split_model(model, trainable_filter())
    ids = jnp.zeros((2, 16), jnp.int32)
    batch = dict(input_ids=ids, attention_mask=jnp.ones_like(ids), loss_mask=jnp.ones_like(ids))
    grad = jax.grad(lambda p: loss_sums(nnx.merge(graphdef, p, frozen), batch)[0])
    return jax.jit(grad).lower(params).as_text().count("stablehlo.dot_general")


def test_a_scanned_program_does_not_grow_with_depth():
    """The compiled program holds one block however many layers run through it; unrolled, one per layer."""
    assert _dots_in_step(2, "scan") == _dots_in_step(6, "scan")
    assert _dots_in_step(6, "unroll") > 2 * _dots_in_step(2, "unroll")


def test_lora_on_some_layers_splits_the_stack(qwen2_mixed_windows):
    model = load_pretrained(qwen2_mixed_windows)
    reference = _with(load_pretrained(qwen2_mixed_windows), layer_loop="unroll")
    assert [stack.group_ids(g) for g in model.model.layers] == [(0, 1, 2)]
    wrapped = apply_lora(model, LoRAConfig(rank=4, targets=r"re:model\.layers\.1\.mlp\..*"), rngs=nnx.Rngs(0))
    assert wrapped == [f"model.layers.1.mlp.{n}" for n in ("down_proj", "gate_proj", "up_proj")]
    assert [stack.group_ids(g) for g in model.model.layers] == [(0,), (1,), (2,)]
    assert sorted(lora_modules(model)) == [f"model.layers.1.mlp.{n}" for n in ("down_proj", "gate_proj", "up_proj")]
    # B = 0: the split, adapted model still computes the base model (the groups are the same layers, in order).
    batch = _batch()
    run = lambda m: np.asarray(m(batch["input_ids"], attention_mask=batch["attention_mask"]))  # noqa: E731
    np.testing.assert_allclose(run(model), run(reference), atol=1e-5)


def test_partial_training_splits_frozen_from_trained_layers(qwen2_mixed_windows):
    from jaxft.config import base_config
    cfg = base_config().peft
    cfg.method, cfg.train_top_blocks = "partial", 1
    model = load_pretrained(qwen2_mixed_windows)
    trainable = partial_filter(cfg, 3)
    with pytest.raises(Exception, match="split its group first"):
        split_model(model, trainable)  # one group holding trained and frozen layers cannot be cut
    assert uniform_groups(model, trainable)
    assert [stack.group_ids(g) for g in model.model.layers] == [(0, 1), (2,)]
    assert not uniform_groups(model, trainable)  # already uniform: nothing to split
    _, params, _ = split_model(model, trainable)
    names = set(stack.flat_layers(params))
    assert names and all(n.startswith("model.layers.2.") or n.startswith("model.norm.") for n in names)


def test_layer_module_and_flat_layers_agree(qwen2_mixed_windows):
    model = load_pretrained(qwen2_mixed_windows)
    flat = stack.flat_layers(nnx.state(model, nnx.Param))
    layer = stack.layer_module(model, 2)
    np.testing.assert_array_equal(np.asarray(layer.mlp.up_proj.kernel.get_value()),
                                  np.asarray(flat["model.layers.2.mlp.up_proj.kernel"]))
    assert len([n for n in flat if n.startswith("model.layers.")]) == 3 * len(
        [n for n in flat if n.startswith("model.layers.0.")])


def test_a_training_run_scanned_equals_one_unrolled(tmp_path):
    """`model.layer_loop`: the same losses and the same trained adapter, scanned or unrolled (a packed
    full fine-tune: every parameter, segment ids and restarting positions go through the scan)."""
    import json

    from safetensors.numpy import load_file

    from jaxft import trainer
    from tests.test_trainer import small_config
    runs = {}
    for loop in ("scan", "unroll"):
        config = small_config(**{"model.layer_loop": loop, "train.steps": 3, "eval.every_steps": 0,
                                 "peft.method": "full", "data.packing": True})
        trainer.run(config, tmp_path / loop)
        records = [json.loads(line) for line in (tmp_path / loop / "metrics.jsonl").read_text().splitlines()]
        runs[loop] = ([r[k] for r in records for k in ("loss", "eval_loss") if k in r],
                      load_file(str(tmp_path / loop / "export" / "model" / "model.safetensors")))
    np.testing.assert_allclose(runs["scan"][0], runs["unroll"][0], rtol=1e-5)
    assert runs["scan"][1].keys() == runs["unroll"][1].keys()
    for name, value in runs["scan"][1].items():
        np.testing.assert_allclose(value, runs["unroll"][1][name], atol=1e-5, rtol=1e-4, err_msg=name)
