"""Gemma 1/2/3 and Phi-3 (jaxft/models/gemma.py, phi3.py on the shared decoder) against transformers and peft:
logits, what each family's switches do, every method training, LoRA exports peft and transformers load,
generation. The Llama family's own tests are in test_models.py and the method/export files."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from peft import PeftModel

from jaxft import peft, trainer
from jaxft.config import base_config
from jaxft.generate import GenerationConfig, generate
from jaxft.models import stack, to_hf_state_dict
from jaxft.models.hf import load_pretrained
from jaxft.peft.lora import LoRAConfig, apply_lora, lora_modules, merge_lora
from jaxft.peft.peft_format import save_lora_adapter
from jaxft.peft.select import split_model
from tests.test_generate import PROMPTS, _torch_greedy
from tests.tiny_hf import load_torch_model, padded_batch, save_tiny_model, torch_logits

TOL = 1e-4

# Phi-3 128k's LongRoPE, shrunk: past 8 positions the long factors apply. With half of each head rotated (as
# Phi-4-mini does), the 8-wide heads rotate 4 dimensions: 2 frequencies, 2 factors a set.
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8,
            "short_factor": [1.3, 3.5], "long_factor": [2.5, 9.0], "partial_rotary_factor": 0.5}

# name -> (model_type, transformers config overrides); tests/tiny_hf.py holds each family's tiny defaults.
VARIANTS = {
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3_text", {}),
    "phi3": ("phi3", {}),
    "phi3_longrope": ("phi3", dict(max_position_embeddings=64, rope_parameters=LONGROPE)),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Saved tiny checkpoints by variant name, each built once for the module."""
    cache = {}

    def get(name):
        if name not in cache:
            model_type, overrides = VARIANTS[name]
            cache[name] = save_tiny_model(model_type, tmp_path_factory.mktemp(name), **overrides)
        return cache[name]
    return get


def _logits(model, ids, mask, positions):
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions)))


def _max_error(ours, reference, mask):
    return np.abs(ours - reference)[mask == 1].max()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tiny, variant):
    d = tiny(variant)
    model, reference = load_pretrained(d), load_torch_model(d)
    for length in (12, 6):  # Phi-3 LongRoPE: past its 8 original positions (long factors), then within (short)
        ids, mask, positions = padded_batch(128, length=length)
        err = _max_error(_logits(model, ids, mask, positions), torch_logits(reference, ids, mask, positions), mask)
        assert err <= TOL, f"{variant} at length {length}: max abs logit error {err}"


# variant -> a config override that turns the family's distinctive switch off: the parity test above only means
# something if each switch changes the logits at these lengths.
SWITCHES = {
    "gemma": dict(norm_offset=0.0, embed_scale=False),
    "gemma2": dict(attn_logit_softcap=None, final_logit_softcap=None),
    "gemma3": dict(local_rope_theta=None),
    "phi3_longrope": dict(rope_scaling=None),
}


@pytest.mark.parametrize("variant", list(SWITCHES))
def test_family_switches_change_the_logits(tiny, variant):
    ids, mask, positions = padded_batch(128)
    on = _logits(load_pretrained(tiny(variant)), ids, mask, positions)
    off = _logits(load_pretrained(tiny(variant), **SWITCHES[variant]), ids, mask, positions)
    assert _max_error(on, off, mask) > 1e-2


def test_gemma_configs_read_as_transformers_writes_them(tiny):
    cfg = load_pretrained(tiny("gemma2")).config
    assert cfg.layer_types == ("sliding_attention", "full_attention") and cfg.sliding_window == 4
    assert cfg.attention_scale == 12 ** -0.5 and cfg.tie_word_embeddings and cfg.embed_scale
    cfg3 = load_pretrained(tiny("gemma3")).config
    assert cfg3.local_rope_theta == 50.0 and cfg3.rope_scaling["factor"] == 4.0 and cfg3.qk_norm
    phi = load_pretrained(tiny("phi3_longrope"))
    assert phi.config.partial_rotary_factor == 0.5 and phi.config.rope_scaling["rope_type"] == "longrope"
    assert phi.model.layers[0].self_attn.qkv_proj.out_features == (4 + 2 * 2) * 8  # q, k, v fused


# ----------------------------------------------------------------------------- LoRA exports


@pytest.mark.parametrize("variant", ["gemma2", "gemma3", "phi3_longrope"])
def test_lora_exports_load_in_peft_and_merged_in_transformers(tiny, tmp_path, variant):
    """All-linear LoRA (Phi-3: on the fused qkv_proj and gate_up_proj, as PEFT names them) with trained-looking B:
    peft loads the adapter onto the transformers base with jaxft's logits; the merged weights load alone."""
    import transformers
    d = tiny(variant)
    model = load_pretrained(d)
    lora = LoRAConfig(rank=4, alpha=8)
    wrapped = apply_lora(model, lora, rngs=nnx.Rngs(0))
    for i, m in enumerate(lora_modules(model).values()):
        m.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(i), m.lora_b.get_value().shape))
    if variant.startswith("phi3"):
        assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    adapter = save_lora_adapter(model, tmp_path / "adapter", lora, wrapped, base_model=str(d))

    ids, mask, positions = padded_batch(128)
    ours = _logits(model, ids, mask, positions)
    peft_model = PeftModel.from_pretrained(load_torch_model(d), str(adapter)).eval()
    assert _max_error(ours, torch_logits(peft_model, ids, mask, positions), mask) <= TOL
    assert _max_error(ours, torch_logits(load_torch_model(d), ids, mask, positions), mask) > 1e-2

    merged = to_hf_state_dict(merge_lora(model))
    reference = load_torch_model(d)
    reference.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in merged.items()}, strict=False)
    assert _max_error(ours, torch_logits(reference, ids, mask, positions), mask) <= TOL
    assert isinstance(reference, transformers.PreTrainedModel)


def test_prompt_tuning_matches_peft_where_gemma_scales_embeddings(tiny, tmp_path):
    """Gemma scales token embeddings inside its embedding module, so PEFT's virtual tokens (passed as input
    embeddings) go in unscaled; the exported prompt gives jaxft's logits in PEFT on transformers."""
    from jaxft.peft.prompt import apply_prompt_tuning, save_prompt_adapter
    ids, mask, _ = padded_batch(128)
    for variant in ("gemma", "gemma3"):
        model = load_pretrained(tiny(variant))
        encoder = apply_prompt_tuning(model, 3, rngs=nnx.Rngs(0))
        encoder.embeddings.set_value(jax.random.normal(jax.random.key(1), encoder.embeddings.get_value().shape))
        ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
        saved = save_prompt_adapter(model, tmp_path / variant, base_model=str(tiny(variant)))
        peft_model = PeftModel.from_pretrained(load_torch_model(tiny(variant)), str(saved)).eval()
        with torch.no_grad():
            theirs = peft_model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                                attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()
        assert _max_error(ours, theirs[:, 3:], mask) <= TOL, variant


# ----------------------------------------------------------------------------- training


def _batch(vocab=128, rows=4, length=16, seed=0):
    ids = np.random.default_rng(seed).integers(3, vocab, size=(rows, length), dtype=np.int32)
    ids[:, length // 2:] = ids[:, :length - length // 2]  # a repeat to learn, so the loss can fall fast
    ones = np.ones_like(ids)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(ones), "loss_mask": jnp.asarray(ones)}


# (variant, peft overrides): the methods each family's own parts meet (fused and GeGLU linears under LoRA and
# QLoRA, scaled embeddings under prompt tuning, Gemma's extra norms under partial, every weight under full).
METHODS = [
    ("gemma2", {"method": "lora", "rank": 4}),
    ("gemma2", {"method": "prompt_tuning", "num_virtual_tokens": 4}),
    ("gemma3", {"method": "partial", "train_top_blocks": 1}),
    ("gemma3", {"method": "qlora", "rank": 4, "quant": "nf4", "quant_block_size": 16}),
    ("phi3_longrope", {"method": "lora", "rank": 4, "use_dora": True}),
    ("phi3_longrope", {"method": "adapter", "adapter_kind": "houlsby", "adapter_size": 8}),
    ("phi3", {"method": "full"}),
]


@pytest.mark.parametrize("variant,overrides", METHODS, ids=[f"{v}-{o['method']}" for v, o in METHODS])
def test_every_method_trains(tiny, variant, overrides):
    cfg = base_config().peft
    for k, v in overrides.items():
        cfg[k] = v
    model = load_pretrained(tiny(variant), layer_loop="unroll")  # two blocks compile faster unrolled than scanned
    method = peft.prepare(model, cfg, rngs=nnx.Rngs(0))
    stack.layout_for_loop(model)
    graphdef, params, frozen = split_model(model, method.trainable)
    frozen_before = jax.tree.map(np.array, frozen)
    lr = 0.1 if cfg.method == "prompt_tuning" else 1e-2
    tx = optax.adam(lr)
    # The step's numbers are under test, not its speed: XLA's CPU optimisations off halve the compile time.
    step = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef, tx=tx, schedule=lambda s: lr,
                                     accum_steps=1, dropout_key=jax.random.key(0)),
                   compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})
    state = dict(step=jnp.int32(0), params=params, opt_state=tx.init(params), nonfinite_step=jnp.int32(-1))
    batch, losses = _batch(), []
    for _ in range(6):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    # A prompt steers a frozen model through a few vectors: its loss falls, but more slowly.
    assert losses[-1] < (0.95 if cfg.method == "prompt_tuning" else 0.9) * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.array, frozen))


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("variant", ["gemma2", "gemma3", "phi3"])
def test_greedy_generation_equals_transformers(tiny, variant):
    """Decoding with the KV cache: Gemma 2's soft-capped scores and sliding layers, Gemma 3's two RoPEs."""
    expected = _torch_greedy(load_torch_model(tiny(variant)), PROMPTS, new=8)
    out = generate(load_pretrained(tiny(variant)), PROMPTS, GenerationConfig(max_new_tokens=8))
    assert out.tokens == expected
