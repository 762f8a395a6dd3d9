"""Model families against transformers, and the HF checkpoint loader/exporter."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxft.errors import ConfigError, ModelLoadError
from jaxft.models import (
    FAMILIES,
    DecoderConfig,
    DecoderForCausalLM,
    Linear,
    RMSNorm,
    config_from_hf,
    load_pretrained,
    load_tokenizer,
    read_config,
    to_hf_state_dict,
)
from tests.tiny_hf import load_torch_model, padded_batch, save_tiny_model, torch_logits

TOL = 1e-4

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so the 12-token test sequences reach the rescaled frequencies.
    "original_max_position_embeddings": 16,
}

# name -> (model_type, transformers config overrides)
VARIANTS = {
    "llama": ("llama", {}),  # GQA: 4 query heads over 2 kv heads
    "llama_mha_bias_tied": (
        "llama",
        dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    ),
    "llama3_rope": ("llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "mistral_sliding": ("mistral", dict(sliding_window=4)),
    "qwen2": ("qwen2", {}),  # q/k/v bias
    "qwen2_sliding_top_layer": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),
    ),
    "qwen3": ("qwen3", {}),  # q/k norm, head_dim 16 != hidden/heads
    "qwen3_tied": ("qwen3", dict(tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Saved tiny checkpoints, built once per variant for the whole module."""
    cache = {}

    def get(name):
        if name not in cache:
            model_type, overrides = VARIANTS[name]
            cache[name] = save_tiny_model(model_type, tmp_path_factory.mktemp(name), **overrides)
        return cache[name]

    return get


@nnx.jit
def _forward(model, ids, mask, positions, segment_ids):
    return model(ids, attention_mask=mask, positions=positions, segment_ids=segment_ids)


def _jax_logits(model, ids, mask=None, positions=None, segment_ids=None):
    # Jitted: one compile per shape beats op-by-op dispatch of every primitive.
    as_jnp = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
    out = _forward(
        model,
        as_jnp(ids),
        as_jnp(mask),
        as_jnp(positions),
        as_jnp(segment_ids),
    )
    assert out.dtype == jnp.float32
    return np.asarray(out)


def _assert_parity(model, torch_model):
    ids, mask, positions = padded_batch(model.config.vocab_size)
    ours = _jax_logits(model, ids, mask, positions)
    ref = torch_logits(torch_model, ids, mask, positions)
    assert np.isfinite(ours).all(), "padding rows must not produce NaN/Inf"
    real = mask == 1
    err = np.abs(ours - ref)[real].max()
    assert err <= TOL, f"max abs logit error {err} at real tokens (logit scale {np.abs(ref).max()})"
    return ours


# ---------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, model_dir):
    d = model_dir(variant)
    model = load_pretrained(d)
    _assert_parity(model, load_torch_model(d))

    cfg = model.config
    attn = model.model.layers[0].self_attn
    assert (model.lm_head is None) == cfg.tie_word_embeddings
    has_qkv_bias = variant in ("qwen2", "qwen2_sliding_top_layer", "llama_mha_bias_tied")
    assert (attn.q_proj.bias is not None) == has_qkv_bias
    assert isinstance(attn.q_norm, RMSNorm) == variant.startswith("qwen3")
    if variant.startswith("qwen3"):
        assert cfg.head_dim == 16 and attn.q_proj.out_features == 4 * 16


@pytest.mark.parametrize("variant", ["mistral_sliding", "qwen2_sliding_top_layer", "llama3_rope"])
def test_variant_switches_change_the_output(variant, model_dir):
    """The parity tests above are only meaningful if the switch is exercised at length 12."""
    d = model_dir(variant)
    ids, mask, positions = padded_batch(128)
    off = dict(rope_scaling=None) if variant == "llama3_rope" else dict(sliding_window=None)
    a = _jax_logits(load_pretrained(d), ids, mask, positions)
    b = _jax_logits(load_pretrained(d, **off), ids, mask, positions)
    assert np.abs(a - b).max() > 1e-2


def test_sharded_checkpoint_loads(tmp_path):
    d = save_tiny_model("llama", tmp_path / "m", max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 1
    assert not (d / "model.safetensors").exists()
    _assert_parity(load_pretrained(d), load_torch_model(d))


def test_bf16_checkpoint_loads(tmp_path):
    d = save_tiny_model("qwen2", tmp_path / "m", dtype=torch.bfloat16)
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    # Upcast to float32 on load: exactly the torch model upcast the same way.
    model = load_pretrained(d)
    assert model.model.embed_tokens.embedding[...].dtype == jnp.float32
    _assert_parity(model, load_torch_model(d, dtype=torch.float32))
    # Kept in bfloat16: bit-identical to the file.
    model16 = load_pretrained(d, param_dtype=jnp.bfloat16)
    exported = to_hf_state_dict(model16)
    for name, tensor in load_file(d / "model.safetensors").items():
        assert exported[name].dtype == tensor.dtype == jnp.bfloat16
        np.testing.assert_array_equal(exported[name], tensor)


@pytest.mark.parametrize("variant", ["llama", "llama_mha_bias_tied", "qwen3"])
def test_hf_state_dict_round_trip(variant, model_dir):
    d = model_dir(variant)
    on_disk = load_file(d / "model.safetensors")
    exported = to_hf_state_dict(load_pretrained(d))
    assert sorted(exported) == sorted(on_disk)
    for name, tensor in on_disk.items():
        assert exported[name].shape == tensor.shape, name
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)


# ---------------------------------------------------------------------------
# Load errors


def _rewrite_weights(d, edit):
    path = d / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    d = save_tiny_model("llama", tmp_path / "m")
    _rewrite_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(d)


def test_unexpected_tensor_is_named(tmp_path):
    d = save_tiny_model("llama", tmp_path / "m")
    name = "model.layers.0.self_attn.q_proj.bias"
    _rewrite_weights(d, lambda t: t.update({name: np.zeros(32, np.float32)}))
    with pytest.raises(ModelLoadError, match=r"unexpected tensors.*" + re.escape(name)):
        load_pretrained(d)


def test_misshaped_tensor_is_named(tmp_path):
    d = save_tiny_model("llama", tmp_path / "m")
    _rewrite_weights(d, lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight: expected \(32,\), found \(31,\)"):
        load_pretrained(d)


def test_rope_buffer_in_old_checkpoints_is_ignored(tmp_path):
    d = save_tiny_model("llama", tmp_path / "m")
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _rewrite_weights(d, lambda t: t.update({name: np.ones(4, np.float32)}))
    load_pretrained(d)


@pytest.mark.parametrize("same", [True, False])
def test_tied_model_with_lm_head_in_file(tmp_path, caplog, same):
    """Like transformers: tied if the file's `lm_head.weight` equals the embedding, else untied."""
    d = save_tiny_model("llama", tmp_path / "m", tie_word_embeddings=True)
    head = lambda t: t["model.embed_tokens.weight"] * (1.0 if same else 2.0)  # noqa: E731
    _rewrite_weights(d, lambda t: t.update({"lm_head.weight": head(t)}))
    model = load_pretrained(d)
    assert (model.lm_head is None) == same
    assert ("lm_head.weight differs" in caplog.text) != same
    _assert_parity(model, load_torch_model(d))


def test_unsupported_model_type(tmp_path):
    d = save_tiny_model("llama", tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(config))
    supported = "supported: " + ", ".join(sorted(FAMILIES))
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"} <= set(FAMILIES)
    with pytest.raises(ModelLoadError, match=r"'mamba' is not supported; " + supported):
        read_config(d)
    with pytest.raises(ModelLoadError, match="mamba"):
        load_pretrained(d)


def test_unsupported_rope_type():
    hf = json.loads(json.dumps(_HF_4X))
    hf["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ModelLoadError, match=r"'yarn'.*supported: default, linear, llama3, longrope"):
        config_from_hf(hf)


def test_missing_directory_and_config(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_pretrained(tmp_path)

    import huggingface_hub

    def offline(**kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelLoadError, match=r"'someorg/some-model'.*Hugging Face Hub.*offline"):
        load_pretrained("someorg/some-model")


def test_load_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    with pytest.raises(ModelLoadError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path)("hello world")["input_ids"] == [1, 2]


def test_no_safetensors(tmp_path):
    d = save_tiny_model("llama", tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="only safetensors"):
        load_pretrained(d)


# ---------------------------------------------------------------------------
# Config


_HF_4X = {  # a transformers 4.x Llama 3.2 style config.json
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": True,
}


def test_config_from_4x_and_5x_layouts_agree():
    hf5 = {k: v for k, v in _HF_4X.items() if k not in ("rope_theta", "rope_scaling")}
    hf5["rope_parameters"] = {**_HF_4X["rope_scaling"], "rope_theta": 500000.0}
    a, b = config_from_hf(_HF_4X), config_from_hf(hf5)
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling["factor"] == 32.0
    assert a.head_dim == 8 and a.tie_word_embeddings and a.num_kv_heads == 2
    hash(a)  # static under jit


def test_config_overrides():
    cfg = config_from_hf(_HF_4X, dtype="bfloat16", remat=True)
    assert cfg.dtype == jnp.bfloat16 and cfg.remat
    with pytest.raises(ConfigError, match="unknown DecoderConfig override"):
        config_from_hf(_HF_4X, dtpye="bfloat16")


# ---------------------------------------------------------------------------
# Masking, precision, remat, replaceable projections


def test_packed_segments_equal_separate_sequences(model_dir):
    model = load_pretrained(model_dir("qwen3"))
    rng = np.random.default_rng(1)
    a, b = rng.integers(1, 128, 5), rng.integers(1, 128, 4)
    ids = np.zeros((1, 12), np.int32)
    ids[0, :5], ids[0, 5:9] = a, b
    segment_ids = np.array([[1] * 5 + [2] * 4 + [0] * 3], np.int32)
    positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]], np.int32)
    packed = _jax_logits(model, ids, positions=positions, segment_ids=segment_ids)
    alone_a = _jax_logits(model, a[None].astype(np.int32))
    alone_b = _jax_logits(model, b[None].astype(np.int32))
    assert np.isfinite(packed).all()
    np.testing.assert_allclose(packed[0, :5], alone_a[0], atol=TOL)
    np.testing.assert_allclose(packed[0, 5:9], alone_b[0], atol=TOL)


def test_fully_padded_row_is_finite(model_dir):
    model = load_pretrained(model_dir("llama"))
    ids = np.zeros((2, 6), np.int32)
    mask = np.array([[1] * 6, [0] * 6], np.int32)
    assert np.isfinite(_jax_logits(model, ids, mask)).all()


def test_bfloat16_compute_is_close_to_float32(model_dir):
    d = model_dir("llama")
    ids, mask, positions = padded_batch(128)
    ref = _jax_logits(load_pretrained(d), ids, mask, positions)
    model = load_pretrained(d, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert model.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    out = _jax_logits(model, ids, mask, positions)
    real = mask == 1
    err = np.abs(out - ref)[real]
    assert err.max() < 0.1 * np.abs(ref).max(), (err.max(), np.abs(ref).max())
    assert err.mean() < 0.02 * np.abs(ref).max()


def _tiny_config(**overrides):
    fields = dict(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=8,
    )  # fmt: skip
    return DecoderConfig(**{**fields, **overrides})


def test_remat_gives_same_loss_and_grads_under_jit():
    ids, mask, positions = (jnp.asarray(x) for x in padded_batch(64, length=8))

    @nnx.jit
    def loss_and_grads(model):
        def loss_fn(model):
            logits = model(ids, attention_mask=mask, positions=positions)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

        return nnx.value_and_grad(loss_fn)(model)

    cfg = _tiny_config(qk_norm=True)
    loss, grads = loss_and_grads(DecoderForCausalLM(cfg, rngs=nnx.Rngs(0)))
    remat_model = DecoderForCausalLM(dataclasses.replace(cfg, remat=True), rngs=nnx.Rngs(0))
    loss_r, grads_r = loss_and_grads(remat_model)
    np.testing.assert_allclose(loss, loss_r, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, grads_r)


def test_remat_in_the_training_step_pattern():
    # trainer.train_step differentiates a model merged from traced parameters (nnx.split/merge
    # inside jax.value_and_grad); nnx.remat failed there with a TraceContextError.
    ids, mask, positions = (jnp.asarray(x) for x in padded_batch(64, length=8))
    cfg = _tiny_config()

    def grads_of(model):
        from jaxft.peft.lora import LoRAConfig, apply_lora, trainable_filter
        apply_lora(model, LoRAConfig(rank=2), rngs=nnx.Rngs(1))  # traced LoRA Params beside constant frozen ones
        graphdef, params, rest = nnx.split(model, trainable_filter(), ...)

        @jax.jit
        def step(params):
            def loss(params):
                logits = nnx.merge(graphdef, params, rest)(ids, attention_mask=mask, positions=positions)
                return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])
            return jax.value_and_grad(loss)(params)
        return step(params)

    loss, grads = grads_of(DecoderForCausalLM(cfg, rngs=nnx.Rngs(0)))
    loss_r, grads_r = grads_of(DecoderForCausalLM(dataclasses.replace(cfg, remat=True), rngs=nnx.Rngs(0)))
    np.testing.assert_allclose(loss, loss_r, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, grads_r)


def test_projections_are_replaceable_modules():
    """LoRA swaps `q_proj` & co. for wrappers; the model must only call them."""
    model = DecoderForCausalLM(_tiny_config(), rngs=nnx.Rngs(0))
    ids = np.arange(8, dtype=np.int32)[None]
    before = _jax_logits(model, ids)

    class Doubler(nnx.Module):
        def __init__(self, base_layer):
            self.base_layer = base_layer

        def __call__(self, x):
            return 2 * self.base_layer(x)

    attn = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert isinstance(getattr(attn, name), Linear)
    attn.v_proj = Doubler(attn.v_proj)
    assert not np.allclose(_jax_logits(model, ids), before)
    attn.v_proj = attn.v_proj.base_layer
    np.testing.assert_array_equal(_jax_logits(model, ids), before)


@pytest.mark.parametrize("window", [None, 100])
def test_causal_block_skipping_equals_full_attention(window):
    # T=256 takes the chunked path (64-query blocks); it must equal attending to every key under the same mask.
    from jaxft.models.attention import _causal_chunk, _chunked, visibility_mask

    b, t, heads, kv_heads, d = 2, 256, 4, 2, 16
    assert _causal_chunk(t, t) < t
    kq, kk, kv = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(kq, (b, t, heads, d))
    k = jax.random.normal(kk, (b, t, kv_heads, d))
    v = jax.random.normal(kv, (b, t, kv_heads, d))
    attention_mask = jnp.ones((b, t), jnp.int32).at[1, 200:].set(0)
    segment_ids = jnp.concatenate([jnp.ones((b, 90), jnp.int32), jnp.full((b, t - 90), 2, jnp.int32)], axis=1)
    mask = visibility_mask(b, t, t, window=window, segment_ids=segment_ids, kv_mask=attention_mask)
    chunked = _chunked(q, k, v, mask, scale=d**-0.5, causal=True)
    full = _chunked(q, k, v, mask, scale=d**-0.5, causal=False)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), atol=1e-6, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_sequence_classifier_checkpoint_gives_transformers_logits(tmp_path, model_type):
    """A transformers *ForSequenceClassification checkpoint loads as a classifier (a `score` head, no vocabulary
    head): its label logits equal transformers' on right-padded rows, and it writes back the same tensor names."""
    import torch
    import transformers

    from jaxft.errors import ConfigError
    from jaxft.models import to_hf_state_dict
    from tests.tiny_hf import padded_batch, tiny_config
    config = tiny_config(model_type, num_labels=3, pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    reference.save_pretrained(tmp_path / "clf")
    ids, mask, _ = padded_batch(128)
    ids, mask = ids[:2], mask[:2]  # a full row and a right-padded one
    ids = np.where(mask == 1, np.maximum(ids, 1), 0)  # padding is pad_token_id, real tokens are not
    with torch.no_grad():
        expected = reference(input_ids=torch.as_tensor(ids, dtype=torch.long),
                             attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()
    model = load_pretrained(tmp_path / "clf")
    assert model.config.num_labels == 3 and model.lm_head is None
    ours = np.asarray(model.classify(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert ours.shape == (2, 3)
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    assert set(to_hf_state_dict(model)) == set(reference.state_dict())
    with pytest.raises(ConfigError, match="sequence classifier"):
        model.logits(jnp.zeros((1, 2, config.hidden_size)))
