"""Every fine-tuning method through the same step: what trains is what the method implies, frozen weights
stay bitwise, the loss falls; and each runs end to end with its export."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from transformers import AutoTokenizer

from jaxft import peft, trainer
from jaxft.config import base_config
from jaxft.data import load
from jaxft.models.hf import load_pretrained
from jaxft.peft.select import parameter_table, split_model
from tests.conftest import QUICKSTART
from tests.test_trainer import small_config

HIDDEN, LAYERS, VOCAB, FFN, KV = 128, 3, 1024, 352, 64  # the quickstart model


def lora_count(rank, dora=False):
    shapes = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, FFN), (HIDDEN, FFN),
              (FFN, HIDDEN)]
    return LAYERS * sum(rank * (i + o) + (o if dora else 0) for i, o in shapes)


# method overrides -> expected trainable parameter count on the quickstart model
METHODS = {
    "lora": ({"method": "lora", "rank": 4}, lora_count(4)),
    "dora": ({"method": "lora", "rank": 4, "use_dora": True}, lora_count(4, dora=True)),
    "qlora_nf4": ({"method": "qlora", "rank": 4, "quant": "nf4"}, lora_count(4)),
    "qlora_nf4_embeddings": ({"method": "qlora", "rank": 4, "quant": "nf4", "quant_embeddings": True}, lora_count(4)),
    "qlora_int8_dora": ({"method": "qlora", "rank": 4, "quant": "int8", "use_dora": True}, lora_count(4, dora=True)),
    "prompt_tuning": ({"method": "prompt_tuning", "num_virtual_tokens": 6}, 6 * HIDDEN),
    "houlsby": ({"method": "adapter", "adapter_kind": "houlsby", "adapter_size": 16},
                LAYERS * 2 * (2 * HIDDEN * 16 + 16 + HIDDEN)),
    "pfeiffer": ({"method": "adapter", "adapter_kind": "pfeiffer", "adapter_size": 16},
                 LAYERS * (2 * HIDDEN * 16 + 16 + HIDDEN)),
    "partial": ({"method": "partial", "train_top_blocks": 1},
                HIDDEN * (2 * HIDDEN + 2 * KV) + 3 * HIDDEN * FFN + 2 * HIDDEN + HIDDEN),
    "full": ({"method": "full"}, VOCAB * HIDDEN + LAYERS * (HIDDEN * (2 * HIDDEN + 2 * KV) + 3 * HIDDEN * FFN
                                                             + 2 * HIDDEN) + HIDDEN),
}


@pytest.fixture(scope="module")
def batch():
    c = base_config()
    c.model.path, c.data.train = str(QUICKSTART / "model"), str(QUICKSTART / "train.jsonl")
    c.train.steps, c.train.batch_size, c.train.seq_len = 1, 8, 64
    return load(c, AutoTokenizer.from_pretrained(c.model.path)).train.batch(0)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_what_it_implies(name, batch):
    overrides, expected_count = METHODS[name]
    cfg = base_config().peft
    for k, v in overrides.items():
        cfg[k] = v
    model = load_pretrained(str(QUICKSTART / "model"))
    method = peft.prepare(model, cfg, rngs=nnx.Rngs(0))
    rows = parameter_table(model, method.trainable)
    assert sum(r["params"] for r in rows if r["trainable"]) == expected_count

    graphdef, params, frozen = split_model(model, method.trainable)
    frozen_before = jax.tree.map(np.array, frozen)
    lr = 0.1 if name == "prompt_tuning" else 3e-3  # a prompt's embeddings need a large step (PEFT's examples)
    tx = optax.adam(lr)
    step = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef, tx=tx, schedule=lambda s: lr,
                                     accum_steps=1, dropout_key=jax.random.key(0)))
    state = dict(step=jnp.int32(0), params=params, opt_state=tx.init(params), nonfinite_step=jnp.int32(-1))
    losses = []
    for _ in range(8):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.9 * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.array, frozen))


def test_prompt_tuning_run_exports_a_peft_prompt(tmp_path):
    trainer.run(small_config(**{"peft.method": "prompt_tuning", "peft.num_virtual_tokens": 4, "train.steps": 2}),
                tmp_path)
    saved = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PROMPT_TUNING" and saved["num_virtual_tokens"] == 4


def test_partial_run_exports_the_whole_model_with_frozen_blocks_unchanged(tmp_path):
    from safetensors.numpy import load_file
    trainer.run(small_config(**{"peft.method": "partial", "peft.train_top_blocks": 1, "train.steps": 2,
                                "optim.warmup_steps": 0}), tmp_path)
    exported = load_file(str(tmp_path / "export" / "model" / "model.safetensors"))
    base = load_file(str(QUICKSTART / "model" / "model.safetensors"))
    for name, value in base.items():
        if "layers.2." in name or name == "model.norm.weight":
            assert not np.array_equal(exported[name], value), name
        else:
            np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_adapter_run_exports_its_tensors(tmp_path):
    from safetensors.numpy import load_file
    trainer.run(small_config(**{"peft.method": "adapter", "peft.adapter_kind": "pfeiffer", "peft.adapter_size": 8,
                                "train.steps": 2, "optim.warmup_steps": 0}), tmp_path)
    saved = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "export" / "adapter" / "adapter_model.safetensors"))
    assert saved["kind"] == "pfeiffer" and len(saved["modules"]) == LAYERS and len(tensors) == 4 * LAYERS
    assert any(np.abs(v).max() > 0 for k, v in tensors.items() if k.endswith("up_kernel"))


def test_bitfit_on_a_model_without_biases_is_refused_before_training(tmp_path):
    from jaxft.errors import AdapterError
    with pytest.raises(AdapterError, match="BitFit trains biases; this model .* has none"):
        trainer.run(small_config(**{"peft.method": "bitfit"}), tmp_path)


@pytest.mark.parametrize("quant,embeddings", [("nf4", False), ("int8", True)])
def test_qlora_run_exports_a_merged_model_with_the_adapted_logits(tmp_path, caplog, quant, embeddings):
    """The merged HF export (float W' = dequantised W + s A B, embeddings dequantised too) gives in
    transformers the logits jaxft's QLoRA model gives with the exported adapter on its quantised base."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxft.peft.peft_format import load_lora_adapter
    from jaxft.peft.quant import QuantSpec
    with caplog.at_level("INFO", logger="jaxft"):
        trainer.run(small_config(**{"peft.method": "qlora", "peft.quant": quant, "peft.quant_embeddings": embeddings,
                                    "train.steps": 3, "optim.warmup_steps": 0, "export.merged": True}), tmp_path)
    ratio = float(caplog.text.split("in bfloat16 (")[1].split("x)")[0])
    assert ratio <= {"nf4": 0.3, "int8": 0.52}[quant]  # codes + scales vs bf16; int8: a scale per 128-wide row
    adapter = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"

    spec = QuantSpec(quant, embeddings=embeddings, skip=() if embeddings else ("lm_head",))
    model = load_pretrained(QUICKSTART / "model", on_param=spec.on_param)
    load_lora_adapter(model, tmp_path / "export" / "adapter")
    ids = np.array([[1, 77, 71, 82, 86, 2, 300, 41]])
    ours = np.asarray(model(jnp.asarray(ids)))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export" / "model")).eval()
    with torch.no_grad():
        theirs = merged(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert np.abs(ours - np.asarray(load_pretrained(QUICKSTART / "model")(jnp.asarray(ids)))).max() > 1e-3
