"""Generation (jaxft/generate.py): greedy output token for token against transformers' `generate` (with PEFT
adapters on the torch side), every method through the KV cache against full forward passes without one,
sampling against transformers' logits warpers, stops, and no recompilation per call."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from jaxft.errors import ConfigError
from jaxft.generate import Generation, GenerationConfig, generate, left_pad
from jaxft.generate.decode import _pick, warp
from jaxft.models import hf, stack
from jaxft.models.hf import load_pretrained
from jaxft.peft.lora import lora_modules, merge
from tests.conftest import QUICKSTART
from tests.tiny_hf import load_torch_model, save_tiny_model

PROMPTS = [[5, 17, 90, 33, 8], [77, 3, 41, 12, 99, 64, 20, 15, 7], [42], [11, 22, 33, 44, 55, 66, 77]]
NEW = 12


def _torch_greedy(model, prompts, new=NEW, eos=None, **generate_kwargs) -> list[list[int]]:
    """transformers' greedy `generate` on left-padded prompts: each row's new tokens through its EOS."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             eos_token_id=eos, pad_token_id=0, **generate_kwargs)
    rows = out[:, width:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in rows]


def _greedy_without_cache(model, prompts, new=NEW) -> list[list[int]]:
    """Greedy decoding by a whole forward pass per token (the training forward, no KV cache)."""
    rows = [list(p) for p in prompts]
    for _ in range(new):
        ids, mask = left_pad(rows, 0)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        logits = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions))
        for r, token in enumerate(np.asarray(jnp.argmax(logits[:, -1], axis=-1))):
            rows[r].append(int(token))
    return [row[len(p):] for row, p in zip(rows, prompts)]


def _greedy(model, prompts=PROMPTS, new=NEW, eos=None) -> list[list[int]]:
    return generate(model, prompts, GenerationConfig(max_new_tokens=new, eos_token_ids=(eos,) if eos else ())).tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Checkpoint directories by name: every family, with sliding windows where they have them."""
    root = tmp_path_factory.mktemp("gen")
    return {
        "llama": save_tiny_model("llama", root / "llama"),
        "mistral": save_tiny_model("mistral", root / "mistral", sliding_window=3),
        # Qwen2 with layer_types: layer 0 full attention, layer 1 a window of 4 (two kinds of block in one scan).
        "qwen2": save_tiny_model("qwen2", root / "qwen2", use_sliding_window=True, sliding_window=4,
                                 max_window_layers=1),
        "qwen3": save_tiny_model("qwen3", root / "qwen3", tie_word_embeddings=True),
    }


@pytest.mark.parametrize("name,loop", [("llama", "scan"), ("llama", "unroll"), ("mistral", "scan"),
                                       ("qwen2", "scan"), ("qwen3", "scan")])
def test_greedy_equals_transformers(tiny, name, loop):
    reference = load_torch_model(tiny[name])
    expected = _torch_greedy(reference, PROMPTS)
    eos = expected[1][4]  # a token one row really produces: that row stops there, in both
    expected = _torch_greedy(reference, PROMPTS, eos=eos)
    model = load_pretrained(tiny[name], layer_loop=loop)
    stack.layout_for_loop(model)
    out = generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW, eos_token_ids=(eos,)))
    assert out.tokens == expected
    assert out.finish_reasons[1] == "stop_token" and len(out.tokens[1]) <= 5
    assert "length" in out.finish_reasons


def _peft_lora(base_dir, use_dora):
    import peft
    model = peft.get_peft_model(load_torch_model(base_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], use_dora=use_dora))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_made_by_peft_generates_as_peft_does_unmerged_and_merged(tiny, tmp_path, use_dora):
    from jaxft.peft.peft_format import load_lora_adapter
    torch_model = _peft_lora(tiny["qwen2"], use_dora)
    torch_model.save_pretrained(str(tmp_path / "adapter"))
    expected = _torch_greedy(torch_model, PROMPTS)
    assert expected != _torch_greedy(load_torch_model(tiny["qwen2"]), PROMPTS)  # the adapter changes the answers
    model = load_pretrained(tiny["qwen2"])
    load_lora_adapter(model, tmp_path / "adapter")
    assert _greedy(model) == expected
    merge(model)
    assert _greedy(model) == expected


def _randomise_lora(model, scale=0.3):
    for i, m in enumerate(lora_modules(model).values()):
        m.lora_b.set_value(scale * jax.random.normal(jax.random.key(i), m.lora_b.get_value().shape))


def _prepared(directory, **peft_keys):
    from jaxft import peft
    from jaxft.config import base_config
    c = base_config()
    for key, value in peft_keys.items():
        setattr(c.peft, key, value)
    model = load_pretrained(directory)
    method = peft.prepare(model, c.peft, rngs=nnx.Rngs(0))
    stack.layout_for_loop(model)
    return model, method


def test_qlora_generates_as_transformers_on_its_merged_weights(tiny, tmp_path):
    from jaxft.peft.lora import merge_lora
    model, _ = _prepared(tiny["llama"], method="qlora", rank=4, quant="nf4", quant_block_size=16)
    _randomise_lora(model)
    ours = _greedy(model)
    merge_lora(model)  # dequantised base + the LoRA update, as float layers: what the merged export writes
    (tmp_path / "merged").mkdir()
    save_file(hf.to_hf_state_dict(model), str(tmp_path / "merged" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "merged" / "config.json").write_text(json.dumps(hf.read_config(tiny["llama"])))
    assert ours == _torch_greedy(load_torch_model(tmp_path / "merged"), PROMPTS)


def test_prompt_tuning_generates_as_peft_does(tiny, tmp_path):
    from peft import PeftModel, PromptTuningConfig, get_peft_model

    from jaxft.peft.prompt import load_prompt_adapter
    torch.manual_seed(3)
    peft_model = get_peft_model(load_torch_model(tiny["llama"]),
                                PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.mul_(3.0)
    peft_model.save_pretrained(str(tmp_path / "prompt"))
    assert isinstance(peft_model, PeftModel)
    # PEFT counts a left-padded row's padding into its positions; jaxft does not (as in training). Rows of one
    # length have no padding, so both mean the same thing there.
    prompts = [p[:5] for p in PROMPTS if len(p) >= 5]
    model = load_pretrained(tiny["llama"])
    load_prompt_adapter(model, tmp_path / "prompt")
    # PEFT's cached generate (peft 0.21, transformers 5.24) leaves its own forward passes after a few tokens (here it
    # repeats one token): the reference is PEFT's generate without a cache, which equals its forward pass per token.
    expected = _torch_greedy(peft_model, prompts, use_cache=False)
    assert expected != _torch_greedy(load_torch_model(tiny["llama"]), prompts)
    assert _greedy(model, prompts) == expected


@pytest.mark.parametrize("peft_keys", [
    dict(method="lora", rank=4, use_dora=True),
    dict(method="adapter", adapter_kind="houlsby", adapter_size=8),
    dict(method="prompt_tuning", num_virtual_tokens=3),
    dict(method="partial", train_top_blocks=1),
], ids=lambda keys: keys["method"])
def test_every_method_decodes_as_full_forward_passes_do(tiny, peft_keys):
    """Through the cache, left padding and all, generation equals re-running the whole sequence per token."""
    model, _ = _prepared(tiny["mistral"], **peft_keys)
    params = nnx.state(model, nnx.Param)
    # Move every parameter off its initial value (zero-initialised adapters would otherwise be identities).
    nnx.update(model, jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape, p.dtype)
                                   if jnp.issubdtype(p.dtype, jnp.floating) else p, params))
    assert _greedy(model) == _greedy_without_cache(model, PROMPTS)


def test_sampling_is_reproducible_from_its_seed(tiny):
    model = load_pretrained(tiny["llama"])
    sample = lambda seed, **kw: generate(model, PROMPTS, GenerationConfig(  # noqa: E731
        max_new_tokens=NEW, temperature=1.5, seed=seed, **kw)).tokens
    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert sample(7, top_k=1) == _greedy(model)  # the one most likely token is the greedy one


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.6), (0.9, 10, 0.8)])
def test_sampling_distribution_matches_transformers_warpers(temperature, top_k, top_p):
    """The logits a token is drawn from equal what transformers' warpers (temperature, top-k, top-p, in its
    order) leave, on fresh random logits: the same tokens survive, with the same log-probabilities."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    logits = np.random.default_rng(top_k).normal(size=(4, 50)).astype(np.float32) * 3
    warped = torch.as_tensor(logits)
    for warper in ([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                   + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])):
        warped = warper(None, warped)
    expected = torch.log_softmax(warped, -1).numpy()
    config = GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = np.asarray(jax.nn.log_softmax(warp(jnp.asarray(logits), config), -1))
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))
    np.testing.assert_allclose(ours[np.isfinite(ours)], expected[np.isfinite(expected)], atol=1e-5)
    # And _pick only ever draws from the surviving tokens.
    drawn = np.stack([np.asarray(_pick(jnp.asarray(logits), jax.random.key(i), config)) for i in range(30)])
    assert np.isfinite(expected[np.arange(4)[None, :], drawn]).all()


def test_stop_strings_cut_the_text_and_the_tokens():
    from jaxft.models.hf import load_tokenizer
    model, tokenizer = load_pretrained(QUICKSTART / "model"), load_tokenizer(QUICKSTART / "model")
    prompt = [tokenizer("Question: what is the capital of France?\nAnswer:")["input_ids"]]
    free = generate(model, prompt, GenerationConfig(max_new_tokens=24), tokenizer=tokenizer)
    stop = free.texts[0].strip()[3:6]  # three characters the model really writes, after its first few
    out = generate(model, prompt, GenerationConfig(max_new_tokens=24, stop_strings=(stop,), stop_check_every=4),
                   tokenizer=tokenizer)
    assert out.finish_reasons == ["stop_string"]
    assert out.texts[0] == free.texts[0][:free.texts[0].index(stop)]
    assert out.tokens[0] == free.tokens[0][:len(out.tokens[0])] and len(out.tokens[0]) < len(free.tokens[0])
    assert stop in tokenizer.decode(out.tokens[0]) and stop not in tokenizer.decode(out.tokens[0][:-1])


def test_streaming_sees_every_chunk(tiny):
    model = load_pretrained(tiny["llama"])
    seen = []
    out = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10, stop_check_every=3), on_chunk=seen.append)
    assert [len(chunk[0]) for chunk in seen] == [1, 4, 7, 10]  # the prefill's token, then 3 per chunk
    assert seen[-1] == out.tokens


def test_nothing_recompiles_for_another_seed_or_prompt_of_similar_length(tiny):
    from jaxft.generate import decode as generate_module
    model = load_pretrained(tiny["qwen3"])
    generate(model, PROMPTS, GenerationConfig(max_new_tokens=6, temperature=1.0, seed=1))
    compiled = generate_module._prefill._cache_size(), generate_module._decode._cache_size()
    generate(model, [p[::-1] + [3] for p in PROMPTS], GenerationConfig(max_new_tokens=6, temperature=1.0, seed=2))
    assert (generate_module._prefill._cache_size(), generate_module._decode._cache_size()) == compiled


def test_bad_requests_are_named(tiny):
    model = load_pretrained(tiny["llama"])
    with pytest.raises(ConfigError, match="every prompt at least one token"):
        generate(model, [[1, 2], []], GenerationConfig())
    with pytest.raises(ConfigError, match="stop_strings need a tokenizer"):
        generate(model, PROMPTS, GenerationConfig(stop_strings=("\n",)))
    for bad, message in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1), "temperature"),
                         (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k")]:
        with pytest.raises(ConfigError, match=message):
            GenerationConfig(**bad)
    assert isinstance(generate(model, [[1]], GenerationConfig(max_new_tokens=1)), Generation)


MESH_WORKER = """
import json, sys
import jax
from flax import nnx
from jaxft import sharding
from jaxft.config import base_config
from jaxft.generate import GenerationConfig, generate
from jaxft.models.hf import load_pretrained
from jaxft.peft.lora import LoRAConfig, apply_lora, lora_modules
path, prompts = sys.argv[1], json.loads(sys.argv[2])
c = base_config()
c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
out = {}
for name, mesh in (("one_device", None), ("mesh", sharding.make_mesh(c.mesh))):
    model = load_pretrained(path, mesh=mesh)
    apply_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(0))
    for i, m in enumerate(lora_modules(model).values()):
        m.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(i), m.lora_b.get_value().shape))
    if mesh is not None:
        nnx.update(model, jax.device_put(nnx.state(model), sharding.tree_shardings(nnx.state(model), mesh)))
    out[name] = generate(model, prompts, GenerationConfig(max_new_tokens=8), mesh=mesh).tokens
    out[name + "_kernel_sharding"] = str(model.model.layers[0].mlp.up_proj.base_layer.kernel.get_value().sharding)
print(json.dumps(out))
"""


def test_generation_on_a_mesh_equals_one_device(tiny):
    """2 x 2 x 2 fake devices (data, fsdp, tensor), the weights split as training splits them."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", MESH_WORKER, str(tiny["qwen2"]), json.dumps(PROMPTS)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mesh"] == out["one_device"]
    assert "fsdp" in out["mesh_kernel_sharding"] and "tensor" in out["mesh_kernel_sharding"]
