"""GPT-2 (jaxft/models/gpt2.py) against transformers and peft: logits, the original checkpoints' layout, LoRA
adapters peft loads, merged exports transformers loads (Conv1D weights stay `[in, out]`), every method
training, greedy generation, and the sequence classifier."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from peft import PeftModel
from safetensors.numpy import load_file, save_file

from jaxft import peft, trainer
from jaxft.config import base_config
from jaxft.errors import ConfigError
from jaxft.export import save_hf_model
from jaxft.generate import GenerationConfig, generate
from jaxft.models import stack
from jaxft.models.hf import load_pretrained
from jaxft.peft.lora import LoRAConfig, apply_lora, lora_modules, merge_lora
from jaxft.peft.peft_format import load_lora_adapter, save_lora_adapter
from jaxft.peft.prompt import apply_prompt_tuning, save_prompt_adapter
from jaxft.peft.select import parameter_table, split_model
from tests.test_generate import PROMPTS, _torch_greedy
from tests.tiny_hf import build_tiny_model, load_torch_model, padded_batch, torch_logits

TOL = 1e-4
VOCAB, HIDDEN, FFN, LAYERS, POSITIONS = 128, 32, 64, 2, 128  # tests/tiny_hf.py's sizes


def save_gpt2(directory, **overrides):
    """A tiny random GPT-2 saved with `save_pretrained`. tiny_hf randomises the biases; the LayerNorm weights
    (`ln_1`, `ln_2`, `ln_f`, not named "*norm.weight") are randomised here, so a misplaced norm cannot pass."""
    model = build_tiny_model("gpt2", **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny GPT-2 most tests share (tied head, as GPT-2's own checkpoints)."""
    return save_gpt2(tmp_path_factory.mktemp("gpt2"))


def _logits(model, ids, mask, positions):
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions)))


def _assert_close(ours, expected, mask):
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - expected[valid]).max() <= TOL


def _with_random_lora_b(model, seed=7):
    """LoRA B matrices as training would leave them: non-zero, so the adapter changes the logits."""
    key = jax.random.key(seed)
    for i, m in enumerate(lora_modules(model).values()):
        m.lora_b.set_value(0.1 * jax.random.normal(jax.random.fold_in(key, i), m.lora_b.get_value().shape))
    return model


@pytest.mark.parametrize("overrides", [
    {},
    # What GPT-2's descendants switch: an untied head, exact gelu, scores unscaled by head_dim but divided by
    # i + 1 in block i (Stanford CRFM's), float32 scores asked for (which jaxft always computes).
    {"tie_word_embeddings": False, "activation_function": "gelu", "scale_attn_weights": False,
     "scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True},
], ids=["gpt2", "descendants"])
def test_logits_equal_transformers(tmp_path, overrides):
    directory = save_gpt2(tmp_path, **overrides)
    ids, mask, positions = padded_batch(VOCAB)
    expected = torch_logits(load_torch_model(directory), ids, mask, positions)
    _assert_close(_logits(load_pretrained(directory), ids, mask, positions), expected, mask)


def test_rows_longer_than_the_learned_positions_are_refused(base_dir):
    with pytest.raises(ConfigError, match=f"rows of {POSITIONS + 1} positions, but this GPT-2 learned {POSITIONS}"):
        load_pretrained(base_dir)(jnp.zeros((1, POSITIONS + 1), jnp.int32))


def test_an_original_gpt2_checkpoint_loads(base_dir, tmp_path):
    """The original GPT-2 files were saved from the base `GPT2Model` (no `transformer.` prefix, no head) with
    the causal-mask buffers `attn.bias` and `attn.masked_bias`; transformers loads them into the LM head model."""
    tensors = {name.removeprefix("transformer."): t for name, t in load_file(base_dir / "model.safetensors").items()}
    for layer in range(LAYERS):
        tensors[f"h.{layer}.attn.bias"] = np.tril(np.ones((POSITIONS, POSITIONS), np.float32))[None, None]
        tensors[f"h.{layer}.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    directory = tmp_path / "original"
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base_dir / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2Model"]}))
    ids, mask, positions = padded_batch(VOCAB)
    expected = torch_logits(load_torch_model(directory), ids, mask, positions)
    _assert_close(_logits(load_pretrained(directory), ids, mask, positions), expected, mask)


@pytest.mark.parametrize("lora", [
    LoRAConfig(rank=4, alpha=8),  # all-linear: c_attn, both c_proj, c_fc
    LoRAConfig(rank=4, alpha=16, targets="c_attn,c_fc", use_dora=True),  # rank 4 too: its A's init is compiled
], ids=["all_linear", "named_dora"])
def test_peft_loads_the_lora_adapter_with_the_same_logits(base_dir, tmp_path, lora):
    model = load_pretrained(base_dir)
    wrapped = apply_lora(model, lora, rngs=nnx.Rngs(0))
    _with_random_lora_b(model)
    for m in lora_modules(model).values():
        if m.lora_magnitude is not None:  # DoRA: magnitudes moved away from the base weight's norms
            m.lora_magnitude.set_value(m.lora_magnitude.get_value() * 1.2)
    adapter_dir = save_lora_adapter(model, tmp_path / "adapter", lora, wrapped, base_model=str(base_dir))
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is True  # Conv1D targets, as PEFT records them
    expected_targets = ["c_attn", "c_fc", "c_proj"] if lora.targets == "all-linear" else ["c_attn", "c_fc"]
    assert saved["target_modules"] == expected_targets

    ids, mask, positions = padded_batch(VOCAB)
    peft_model = PeftModel.from_pretrained(load_torch_model(base_dir), str(adapter_dir)).eval()
    assert len([n for n, _ in peft_model.named_parameters() if "lora_A" in n]) == len(wrapped)
    expected = torch_logits(peft_model, ids, mask, positions)
    ours = _logits(model, ids, mask, positions)
    _assert_close(ours, expected, mask)
    base = torch_logits(load_torch_model(base_dir), ids, mask, positions)
    assert np.abs(base - expected)[mask.astype(bool)].max() > 1e-2  # the adapter really changed something

    reloaded = load_pretrained(base_dir)
    load_lora_adapter(reloaded, adapter_dir)  # and back into jaxft
    _assert_close(_logits(reloaded, ids, mask, positions), expected, mask)


def test_a_merged_export_loads_in_transformers_with_the_adapted_logits(base_dir, tmp_path):
    model = load_pretrained(base_dir)
    apply_lora(model, LoRAConfig(rank=4, alpha=8), rngs=nnx.Rngs(0))
    _with_random_lora_b(model)
    ids, mask, positions = padded_batch(VOCAB)
    adapted = _logits(model, ids, mask, positions)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=_tiny_tokenizer())
    out = save_hf_model(merge_lora(model), tmp_path / "merged", base_dir, tokenizer, dtype="float32")
    tensors = load_file(out / "model.safetensors")
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (HIDDEN, FFN)  # Conv1D: [in, out]
    assert "lm_head.weight" not in tensors  # tied, as GPT-2's own files
    _assert_close(adapted, torch_logits(load_torch_model(out), ids, mask, positions), mask)


def test_peft_loads_the_prompt_with_the_same_logits(base_dir, tmp_path):
    """PEFT feeds the virtual tokens to transformers as input embeddings, to which GPT-2 adds the position
    embeddings of the whole row: the virtual tokens take positions 0..n-1 and the text moves up by n, as in
    jaxft."""
    virtual = 3
    model = load_pretrained(base_dir)
    apply_prompt_tuning(model, virtual, rngs=nnx.Rngs(0))
    save_prompt_adapter(model, tmp_path / "prompt", base_model=str(base_dir))
    peft_model = PeftModel.from_pretrained(load_torch_model(base_dir), str(tmp_path / "prompt")).eval()
    ids, mask, _ = padded_batch(VOCAB)  # positions as transformers counts them: 0, 1, ... over every row
    with torch.no_grad():
        expected = peft_model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                              attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()[:, virtual:]
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    _assert_close(ours, expected, mask)
    base = torch_logits(load_torch_model(base_dir), ids, mask)
    assert np.abs(base - expected)[mask.astype(bool)].max() > 1e-2  # the prompt really changed something


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models
    return Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))


def _lora_count(rank):
    shapes = [(HIDDEN, 3 * HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, FFN), (FFN, HIDDEN)]
    return LAYERS * sum(rank * (i + o) for i, o in shapes)


_BLOCK = 4 * HIDDEN + (HIDDEN + 1) * 3 * HIDDEN + (HIDDEN + 1) * HIDDEN + (HIDDEN + 1) * FFN + (FFN + 1) * HIDDEN

# method overrides -> the trainable parameter count the method implies on the tiny GPT-2. (QLoRA differs from
# LoRA only in the frozen base's storage, which nothing GPT-2-specific touches; tests/test_methods.py trains it.)
METHODS = {
    "lora": ({"method": "lora", "rank": 4}, _lora_count(4)),
    "full": ({"method": "full"}, (VOCAB + POSITIONS) * HIDDEN + LAYERS * _BLOCK + 2 * HIDDEN),
    # Every bias: both LayerNorms', the projections', the final norm's.
    "bitfit": ({"method": "bitfit"}, LAYERS * (2 * HIDDEN + 3 * HIDDEN + HIDDEN + FFN + HIDDEN) + HIDDEN),
    "partial": ({"method": "partial", "train_top_blocks": 1}, _BLOCK + 2 * HIDDEN),  # the top block, ln_f
    "prompt_tuning": ({"method": "prompt_tuning", "num_virtual_tokens": 4}, 4 * HIDDEN),
    "houlsby": ({"method": "adapter", "adapter_kind": "houlsby", "adapter_size": 8},
                LAYERS * 2 * (2 * HIDDEN * 8 + 8 + HIDDEN)),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_what_it_implies(base_dir, name):
    overrides, expected_count = METHODS[name]
    cfg = base_config().peft
    for k, v in overrides.items():
        cfg[k] = v
    model = load_pretrained(base_dir, layer_loop="unroll")  # two blocks compile faster unrolled than scanned
    method = peft.prepare(model, cfg, rngs=nnx.Rngs(0))
    stack.layout_for_loop(model)
    assert sum(r["params"] for r in parameter_table(model, method.trainable) if r["trainable"]) == expected_count

    graphdef, params, frozen = split_model(model, method.trainable)
    frozen_before = jax.tree.map(np.array, frozen)
    lr = 0.1 if name == "prompt_tuning" else 1e-2
    tx = optax.adam(lr)
    # The step's numbers are under test, not its speed: XLA's CPU optimisations off halve the compile time.
    step = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef, tx=tx, schedule=lambda s: lr,
                                     accum_steps=1, dropout_key=jax.random.key(0)),
                   compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
    state = dict(step=jnp.int32(0), params=params, opt_state=tx.init(params), nonfinite_step=jnp.int32(-1))
    losses = []
    for _ in range(6):
        state, metrics = step(state, frozen, _batch())
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.9 * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.array, frozen))


def _batch(rows=4, length=16):
    """Rows of a repeating pattern, which any method can learn in a few steps; the last row right-padded."""
    ids = np.tile((np.arange(length) * 7 + 3) % VOCAB, (rows, 1)).astype(np.int32)
    mask = np.ones((rows, length), np.int32)
    mask[-1, length // 2:] = 0
    return dict(input_ids=jnp.asarray(ids * mask), attention_mask=jnp.asarray(mask), loss_mask=jnp.asarray(mask))


def test_greedy_generation_equals_transformers(base_dir):
    reference = load_torch_model(base_dir)
    expected = _torch_greedy(reference, PROMPTS)
    eos = expected[1][4]  # a token one row really produces: that row stops there, in both
    expected = _torch_greedy(reference, PROMPTS, eos=eos)
    out = generate(load_pretrained(base_dir), PROMPTS, GenerationConfig(max_new_tokens=12, eos_token_ids=(eos,)))
    assert out.tokens == expected
    assert out.finish_reasons[1] == "stop_token"


def test_sequence_classifier_logits_equal_transformers(base_dir, tmp_path):
    """GPT2ForSequenceClassification (the base's blocks, a new `score` head) pools each row's last token that
    is not padding, as jaxft pools the last real token."""
    reference = transformers.GPT2ForSequenceClassification.from_pretrained(base_dir, num_labels=3)
    reference.save_pretrained(tmp_path / "classifier")
    reference = reference.eval()
    ids, mask, positions = padded_batch(VOCAB)
    ids = np.where(mask == 1, np.maximum(ids, 1), 0)  # transformers finds padding by its id (0): real ids differ
    with torch.no_grad():
        expected = reference(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                             position_ids=torch.as_tensor(positions, dtype=torch.long)).logits.numpy()
    model = load_pretrained(tmp_path / "classifier")
    assert model.config.num_labels == 3
    ours = np.asarray(model.classify(jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                     positions=jnp.asarray(positions)))
    assert np.abs(ours - expected).max() <= TOL
