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
