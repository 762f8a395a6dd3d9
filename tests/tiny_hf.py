"""Tiny random Hugging Face models for tests (no downloads).

    from tests.tiny_hf import save_tiny_model, load_torch_model, torch_logits
    d = save_tiny_model("qwen3", tmp_path / "m")                # build + save_pretrained
    ref = load_torch_model(d)                                   # transformers model, float32, eager
    logits = torch_logits(ref, ids, attention_mask, positions)  # numpy float32 reference logits

`model_type` is one of TINY_CONFIGS' keys ("llama", "mistral", "qwen2",
"qwen3"); keyword overrides go into the transformers config (e.g.
`tie_word_embeddings=True`, `num_key_value_heads=4`,
`rope_scaling={"rope_type": "llama3", ...}`, `sliding_window=4`).
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers

# Small enough that a forward pass is milliseconds, big enough to exercise
# GQA (4 query heads over 2 kv heads) and multi-layer stacking.
_BASE = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    # Larger than HF's 0.02 so logits are O(1) and a 1e-4 parity bound means something.
    initializer_range=0.2,
)

# model_type -> (config class, causal-LM class, family-specific defaults)
TINY_CONFIGS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    # An explicit head_dim (16) unlike hidden/heads (8), as real Qwen3 models have.
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
}


def tiny_config(model_type: str, **overrides) -> transformers.PretrainedConfig:
    """The tiny transformers config for `model_type`, with `overrides` applied."""
    config_cls, _, family = TINY_CONFIGS[model_type]
    return config_cls(**{**_BASE, **family, **overrides})


def build_tiny_model(model_type: str, *, seed: int = 0, dtype=torch.float32, **config_overrides):
    """A random transformers causal LM (eval mode, eager attention)."""
    _, model_cls, _ = TINY_CONFIGS[model_type]
    config = tiny_config(model_type, **config_overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Norm weights start at exactly 1 and biases at 0; randomise them so a
    # wrongly mapped norm or bias cannot pass a parity test.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def save_tiny_model(
    model_type: str,
    directory,
    *,
    seed: int = 0,
    max_shard_size=None,
    dtype=torch.float32,
    **config_overrides,
) -> pathlib.Path:
    """Build a tiny random HF model and `save_pretrained` it (safetensors) into `directory`.

    `max_shard_size` (e.g. "20KB") writes a sharded checkpoint with an index.
    `dtype` is the dtype of the saved weights (e.g. torch.bfloat16).
    Returns the directory.
    """
    directory = pathlib.Path(directory)
    model = build_tiny_model(model_type, seed=seed, dtype=dtype, **config_overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    return directory


def load_torch_model(directory, dtype=torch.float32):
    """The saved model back in transformers, eager attention, eval mode (the reference)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation="eager"
    ).eval()


def torch_logits(model, input_ids, attention_mask=None, positions=None) -> np.ndarray:
    """Float32 numpy logits of a transformers model for numpy inputs `[B, T]`."""
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(positions), dtype=torch.long)
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(input_ids), dtype=torch.long), **kwargs)
    return out.logits.float().numpy()


def padded_batch(vocab_size: int, batch: int = 3, length: int = 12, seed: int = 0):
    """Random ids with padding: row 0 full, row 1 right-padded, row 2 left-padded.

    Returns (input_ids, attention_mask, positions) as int32 numpy arrays;
    positions count real tokens only (0 for pads), as a data pipeline would.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, length), dtype=np.int32)
    mask = np.ones((batch, length), np.int32)
    if batch > 1:
        mask[1, length - length // 3 :] = 0
    if batch > 2:
        mask[2, : length // 4] = 0
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, mask, positions
