"""The exported adapter loads in the real `peft` and gives jaxft's logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from peft import PeftModel

from jaxft.models.hf import load_pretrained
from jaxft.peft.lora import LoRAConfig, apply_lora, lora_modules
from jaxft.peft.peft_format import save_lora_adapter
from tests.tiny_hf import load_torch_model, padded_batch, save_tiny_model, torch_logits


@pytest.mark.parametrize("model_type,lora", [
    ("llama", LoRAConfig(rank=4, alpha=8)),
    ("qwen2", LoRAConfig(rank=2, alpha=16, targets="q_proj,v_proj,down_proj", use_rslora=True)),
    ("qwen3", LoRAConfig(rank=4, alpha=4, targets=r"re:model\.layers\.\d+\.self_attn\.(q|k|o)_proj")),
    ("llama", LoRAConfig(rank=4, alpha=8, use_dora=True)),
    ("qwen2", LoRAConfig(rank=2, alpha=16, targets="q_proj,v_proj,down_proj", use_dora=True)),  # with biases
    # Some layers only: the stacked blocks are split into groups (jaxft/models/stack.py) before wrapping.
    ("llama", LoRAConfig(rank=4, alpha=8, targets=r"re:model\.layers\.1\.(self_attn\.q_proj|mlp\.up_proj)")),
])
def test_peft_loads_adapter_with_same_logits(tmp_path, model_type, lora):
    base_dir = save_tiny_model(model_type, tmp_path / "base")
    model = load_pretrained(base_dir)
    wrapped = apply_lora(model, lora, rngs=nnx.Rngs(0))
    key = jax.random.key(7)
    for i, m in enumerate(lora_modules(model).values()):  # a trained-looking, non-zero B
        m.lora_b.set_value(0.1 * jax.random.normal(jax.random.fold_in(key, i), m.lora_b.get_value().shape))
        if m.lora_magnitude is not None:  # DoRA: magnitudes moved away from the base weight's norms
            noise = jax.random.uniform(jax.random.fold_in(key, 1000 + i), m.lora_magnitude.get_value().shape)
            m.lora_magnitude.set_value(m.lora_magnitude.get_value() * (0.8 + 0.4 * noise))
    adapter_dir = save_lora_adapter(model, tmp_path / "adapter", lora, wrapped, base_model=str(base_dir))

    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == lora.rank and saved["bias"] == "none"
    assert saved["use_dora"] == lora.use_dora

    ids, mask, positions = padded_batch(128)
    peft_model = PeftModel.from_pretrained(load_torch_model(base_dir), str(adapter_dir)).eval()
    assert len([n for n, _ in peft_model.named_parameters() if "lora_A" in n]) == len(wrapped)
    expected = torch_logits(peft_model, ids, mask, positions)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions)))
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - expected[valid]).max() <= 1e-4
    base_logits = torch_logits(load_torch_model(base_dir), ids, mask, positions)
    assert np.abs(base_logits[valid] - expected[valid]).max() > 1e-2  # the adapter really changed something


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_made_by_peft_loads_with_same_logits(tmp_path, use_dora):
    # The reference adapter comes from the real library, not from jaxft's exporter.
    import peft
    import torch

    from jaxft.peft.peft_format import load_lora_adapter
    base_dir = save_tiny_model("qwen2", tmp_path / "base")
    torch_model = peft.get_peft_model(load_torch_model(base_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], use_dora=use_dora))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.mul_(1.0).add_(0.1 * torch.randn_like(p))
    torch_model.save_pretrained(str(tmp_path / "adapter"))
    ids, mask, positions = padded_batch(128)
    expected = torch_logits(torch_model.eval(), ids, mask, positions)

    model = load_pretrained(base_dir)
    config, wrapped = load_lora_adapter(model, tmp_path / "adapter")
    assert config.use_dora == use_dora and len(wrapped) == 3 * 2  # three module kinds in two layers
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions)))
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - expected[valid]).max() <= 1e-4


def test_adapter_for_another_base_is_refused(tmp_path):
    from jaxft.errors import AdapterError
    from jaxft.peft.peft_format import load_lora_adapter
    small = load_pretrained(save_tiny_model("llama", tmp_path / "small"))
    wrapped = apply_lora(small, LoRAConfig(rank=4), rngs=nnx.Rngs(0))
    save_lora_adapter(small, tmp_path / "adapter", LoRAConfig(rank=4), wrapped)
    wider = load_pretrained(save_tiny_model("llama", tmp_path / "wide", hidden_size=48, intermediate_size=96))
    with pytest.raises(AdapterError, match=r"does not fit this base model .*lora_A.weight: shape \[4, 32\]"):
        load_lora_adapter(wider, tmp_path / "adapter")
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        load_lora_adapter(wider, tmp_path)


def test_a_merged_export_keeps_a_bfloat16_base_in_bfloat16(tmp_path):
    """export.merged_dtype=auto writes the base's dtype (here bfloat16), though the run held float32 weights;
    float32 when asked. transformers loads either."""
    import torch
    import transformers
    from safetensors import safe_open

    from jaxft.export import save_hf_model
    from jaxft.models import to_hf_state_dict
    from jaxft.peft.lora import merge_lora
    base_dir = save_tiny_model("llama", tmp_path / "base", dtype=torch.bfloat16)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=_tiny_tokenizer())
    model = load_pretrained(base_dir, param_dtype=jnp.float32)
    apply_lora(model, LoRAConfig(rank=4, alpha=8), rngs=nnx.Rngs(0))
    for i, m in enumerate(lora_modules(model).values()):
        m.lora_b.set_value(0.1 * jax.random.normal(jax.random.key(i), m.lora_b.get_value().shape))
    merged = to_hf_state_dict(merge_lora(model))
    for dtype, stored, torch_dtype in [("auto", "BF16", torch.bfloat16), ("float32", "F32", torch.float32)]:
        out = save_hf_model(model, tmp_path / dtype, base_dir, tokenizer, dtype=dtype)
        with safe_open(out / "model.safetensors", framework="numpy") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {stored}
            name = "model.layers.0.self_attn.q_proj.weight"
            np.testing.assert_array_equal(f.get_tensor(name).astype(np.float32),
                                          merged[name].astype(f.get_tensor(name).dtype).astype(np.float32))
        assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch_dtype


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models
    return Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
