"""Prompt tuning (jaxft/peft/prompt.py) against the real `peft` library."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from peft import PeftModel, PromptTuningConfig, get_peft_model
from peft.tuners.prompt_tuning import PromptEmbedding
from transformers import AutoTokenizer

from jaxft.errors import AdapterError, ConfigError
from jaxft.models.hf import load_pretrained
from jaxft.peft.prompt import (
    apply_prompt_tuning,
    load_prompt_adapter,
    save_prompt_adapter,
    trainable_filter,
)
from jaxft.peft.select import parameter_table, split_model
from jaxft.trainer import loss_sums
from tests.conftest import QUICKSTART
from tests.tiny_hf import load_torch_model, padded_batch, save_tiny_model

N = 5  # virtual tokens
QUICKSTART_MODEL = QUICKSTART / "model"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {t: save_tiny_model(t, tmp_path_factory.mktemp(t)) for t in ("llama", "qwen2")}


def _prompted(directory, n=N, seed=1, **overrides):
    """The jaxft model of `directory` with n virtual tokens set to fresh random values."""
    model = load_pretrained(directory, **overrides)
    encoder = apply_prompt_tuning(model, n, rngs=nnx.Rngs(0))
    encoder.embeddings.set_value(jax.random.normal(jax.random.key(seed), encoder.embeddings.get_value().shape))
    return model


def _logits(model, ids, mask, **kw):
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), **kw))


def _peft_logits(peft_model, ids, mask):
    with torch.no_grad():
        out = peft_model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                         attention_mask=torch.as_tensor(mask, dtype=torch.long))
    return out.logits.float().numpy()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_peft_loads_exported_prompt_with_same_logits(tmp_path, tiny_dirs, model_type):
    ids, mask, _ = padded_batch(128)  # a full, a right-padded and a left-padded row
    model = _prompted(tiny_dirs[model_type])
    ours = _logits(model, ids, mask)
    assert ours.shape == (*ids.shape, 128)
    save_prompt_adapter(model, tmp_path / "adapter", base_model=str(tiny_dirs[model_type]))
    peft_model = PeftModel.from_pretrained(load_torch_model(tiny_dirs[model_type]), str(tmp_path / "adapter")).eval()
    theirs = _peft_logits(peft_model, ids, mask)
    assert theirs.shape == (ids.shape[0], N + ids.shape[1], 128)  # PEFT keeps the virtual positions
    real = mask == 1
    assert np.abs(ours[real] - theirs[:, N:][real]).max() <= 1e-4
    # The prompt changes the logits: a wrong prefix (or none) could not pass the check above by accident.
    assert np.abs(ours[real] - _logits(load_pretrained(tiny_dirs[model_type]), ids, mask)[real]).max() > 1e-2


def test_prompt_made_by_peft_loads_with_same_logits(tmp_path, tiny_dirs):
    ids, mask, _ = padded_batch(128)
    torch.manual_seed(3)
    peft_model = get_peft_model(load_torch_model(tiny_dirs["llama"]),
                                PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    model = load_pretrained(tiny_dirs["llama"])
    encoder = load_prompt_adapter(model, tmp_path / "adapter")
    np.testing.assert_array_equal(np.asarray(encoder.embeddings.get_value()),
                                  peft_model.prompt_encoder["default"].embedding.weight.detach().numpy())
    real = mask == 1
    assert np.abs(_logits(model, ids, mask)[real] - _peft_logits(peft_model, ids, mask)[:, N:][real]).max() <= 1e-4


def test_random_init_is_torch_embedding_default(tiny_dirs):
    model = load_pretrained(tiny_dirs["llama"], dtype=jnp.bfloat16)
    values = np.asarray(apply_prompt_tuning(model, 20, rngs=nnx.Rngs(0)).embeddings.get_value())
    assert values.shape == (20, 32) and values.dtype == np.float32  # float32 even under a bfloat16 model
    assert abs(values.mean()) < 0.1 and abs(values.std() - 1.0) < 0.1  # N(0, 1), as torch.nn.Embedding
    ids, mask, _ = padded_batch(128)
    assert np.isfinite(_logits(model, ids, mask)).all()


@pytest.mark.parametrize("n", [8, 3])  # the text's 6 ids repeated, and cut
def test_text_init_copies_the_texts_embedding_rows_as_peft_does(tmp_path, n):
    text = "the cat sat"
    tokenizer = AutoTokenizer.from_pretrained(str(QUICKSTART_MODEL))
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == 6
    model = load_pretrained(QUICKSTART_MODEL)
    encoder = apply_prompt_tuning(model, n, init="text", init_text=text, tokenizer=str(QUICKSTART_MODEL),
                                  rngs=nnx.Rngs(0))
    table = np.asarray(model.model.embed_tokens.embedding.get_value())
    np.testing.assert_array_equal(np.asarray(encoder.embeddings.get_value()), table[(ids * 2)[:n]])

    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, token_dim=128,
                                num_transformer_submodules=1, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text=text, tokenizer_name_or_path=str(QUICKSTART_MODEL))
    torch_model = load_torch_model(QUICKSTART_MODEL)
    reference = PromptEmbedding(config, torch_model.get_input_embeddings()).embedding.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(encoder.embeddings.get_value()), reference)

    # Exported as TEXT, the base model path standing in as the tokenizer PEFT's config insists on.
    save_prompt_adapter(model, tmp_path / "adapter", base_model=str(QUICKSTART_MODEL), init_text=text)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["prompt_tuning_init"] == "TEXT" and written["tokenizer_name_or_path"] == str(QUICKSTART_MODEL)
    peft_model = PeftModel.from_pretrained(torch_model, str(tmp_path / "adapter")).eval()
    tokens, mask, _ = padded_batch(1024)
    real = mask == 1
    assert np.abs(_logits(model, tokens, mask)[real] - _peft_logits(peft_model, tokens, mask)[:, n:][real]).max() \
        <= 1e-4


@pytest.mark.parametrize("model_type,window", [("llama", None), ("mistral", 4)])
def test_packed_segments_each_see_the_prompt_as_alone_in_a_row(tmp_path, model_type, window):
    directory = save_tiny_model(model_type, tmp_path / "m", sliding_window=window) if window \
        else save_tiny_model(model_type, tmp_path / "m")
    model = _prompted(directory)
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, 128, 5), rng.integers(1, 128, 4)
    packed = np.concatenate([a, b, [0]])[None].astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 4 + [0]], np.int32)
    positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0]], np.int32)
    together = _logits(model, packed, segments != 0, positions=jnp.asarray(positions),
                       segment_ids=jnp.asarray(segments))
    alone_a = _logits(model, a[None], np.ones((1, 5), np.int32))
    alone_b = _logits(model, b[None], np.ones((1, 4), np.int32))
    np.testing.assert_allclose(together[0, :5], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(together[0, 5:9], alone_b[0], atol=1e-5)


def test_only_the_prompt_trains_and_gets_gradients(tiny_dirs):
    model = _prompted(tiny_dirs["llama"])
    rows = parameter_table(model, trainable_filter())
    assert [r["params"] for r in rows if r["trainable"]] == [N * 32]
    graphdef, params, frozen = split_model(model, trainable_filter())
    assert [path for path, _ in nnx.to_flat_state(params)] == [("prompt_encoder", "embeddings")]
    base_params = nnx.state(load_pretrained(tiny_dirs["llama"]), nnx.Param)
    assert len(nnx.to_flat_state(nnx.state(frozen, nnx.Param))) == len(nnx.to_flat_state(base_params))

    ids, mask, _ = padded_batch(128)
    batch = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), loss_mask=jnp.asarray(mask))

    @jax.jit
    def grads(params):
        return jax.grad(lambda p: loss_sums(nnx.merge(graphdef, p, frozen), batch)[0])(params)

    (_, g), = nnx.to_flat_state(grads(params))
    g = np.asarray(g.get_value())
    assert g.shape == (N, 32) and np.isfinite(g).all() and np.abs(g).min(axis=1).max() > 0


def test_loss_falls_with_adam(tiny_dirs):
    model = _prompted(tiny_dirs["qwen2"])
    graphdef, params, frozen = split_model(model, trainable_filter())
    ids, mask, _ = padded_batch(128, batch=4, length=16, seed=1)
    batch = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), loss_mask=jnp.asarray(mask))
    tx = optax.adam(0.1)
    opt_state = tx.init(params)

    def loss(p):
        total, count = loss_sums(nnx.merge(graphdef, p, frozen), batch)
        return total / count

    @jax.jit
    def step(params, opt_state):
        value, g = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses = []
    for _ in range(15):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    assert losses[-1] < 0.9 * losses[0], losses


def test_bad_arguments_are_named(tmp_path, tiny_dirs):
    for n in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="num_virtual_tokens"):
            apply_prompt_tuning(load_pretrained(tiny_dirs["llama"]), n, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="'vocab' is not supported; supported: random, text"):
        apply_prompt_tuning(load_pretrained(tiny_dirs["llama"]), N, init="vocab", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="needs init_text"):
        apply_prompt_tuning(load_pretrained(tiny_dirs["llama"]), N, init="text", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="needs the model's tokenizer"):
        apply_prompt_tuning(load_pretrained(tiny_dirs["llama"]), N, init="text", init_text="hi", rngs=nnx.Rngs(0))
    with pytest.raises(AdapterError, match="outside the model's vocabulary of 128"):
        apply_prompt_tuning(load_pretrained(tiny_dirs["llama"]), N, init="text", init_text="the cat sat",
                            tokenizer=str(QUICKSTART_MODEL), rngs=nnx.Rngs(0))

    model = _prompted(tiny_dirs["llama"])
    with pytest.raises(AdapterError, match="already has a prompt encoder"):
        apply_prompt_tuning(model, N, rngs=nnx.Rngs(0))
    with pytest.raises(AdapterError, match="pass base_model or tokenizer_name_or_path"):
        save_prompt_adapter(model, tmp_path / "a", init_text="hi")
    with pytest.raises(AdapterError, match="no prompt encoder"):
        save_prompt_adapter(load_pretrained(tiny_dirs["llama"]), tmp_path / "a")

    save_prompt_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterError, match=r"has shape \(5, 32\); this model needs \(5, 128\)"):
        load_prompt_adapter(load_pretrained(QUICKSTART_MODEL), tmp_path / "a")
    with pytest.raises(AdapterError, match="cannot read a PEFT adapter"):
        load_prompt_adapter(load_pretrained(tiny_dirs["llama"]), tmp_path / "missing")
