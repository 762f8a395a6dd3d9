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
    # Gemma: head_dim given (the family's default is 256), a query scale unlike head_dim, soft-caps small enough
    # to bite at these logit sizes, windows shorter than the test sequences, two kinds of layer.
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM,
              {"head_dim": 16, "tie_word_embeddings": True}),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               {"head_dim": 16, "query_pre_attn_scalar": 12, "sliding_window": 4, "attn_logit_softcapping": 2.0,
                "final_logit_softcapping": 3.0, "tie_word_embeddings": True}),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                    {"head_dim": 16, "query_pre_attn_scalar": 12, "sliding_window": 4, "tie_word_embeddings": True,
                     "layer_types": ["sliding_attention", "full_attention"],
                     "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                            "rope_theta": 10000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}}}),
    # Phi-3: fused qkv_proj and gate_up_proj; variants add LongRoPE and partial rotation.
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {"bos_token_id": 1, "eos_token_id": 2,
                                                                     "pad_token_id": 0}),
    # GPT-2 takes _BASE's sizes through its config's attribute_map (hidden_size -> n_embd, ...) except the MLP
    # width (n_inner); its real models tie the head; special tokens inside the tiny vocabulary.
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             {"n_inner": 64, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
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


# ----------------------------------------------------------------------------- encoders (BERT, RoBERTa)

# Tiny sequence classifiers: 3 labels; RoBERTa's padding index 1 shifts its positions, as in real checkpoints.
_ENCODER_BASE = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, num_labels=3, layer_norm_eps=1e-5, initializer_range=0.2,
)
# model_type -> (config class, {"classifier": the sequence classifier, "pretrained": what a pretraining run saves
# (BERT's MLM + next-sentence heads and pooler; RoBERTa's MLM head, no pooler)}, family-specific defaults)
TINY_ENCODERS = {
    "bert": (transformers.BertConfig, {"classifier": transformers.BertForSequenceClassification,
                                       "pretrained": transformers.BertForPreTraining}, {"pad_token_id": 0}),
    "roberta": (transformers.RobertaConfig, {"classifier": transformers.RobertaForSequenceClassification,
                                             "pretrained": transformers.RobertaForMaskedLM},
                {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "type_vocab_size": 1}),
}


def build_tiny_encoder(model_type: str, *, kind: str = "classifier", seed: int = 0, **config_overrides):
    """A random transformers encoder (eval mode, eager attention), a sequence classifier or (`kind="pretrained"`)
    a pretraining checkpoint, whose norms and biases are randomised too, so a wrongly mapped one cannot pass a
    parity test."""
    config_cls, classes, family = TINY_ENCODERS[model_type]
    model_cls = classes[kind]
    config = config_cls(**{**_ENCODER_BASE, **family, **config_overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_tiny_encoder(model_type: str, directory, *, kind: str = "classifier", seed: int = 0,
                      **config_overrides) -> pathlib.Path:
    """Build a tiny random encoder (`build_tiny_encoder`) and `save_pretrained` it (safetensors) into `directory`."""
    directory = pathlib.Path(directory)
    model = build_tiny_encoder(model_type, kind=kind, seed=seed, **config_overrides)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def load_torch_classifier(directory, **kwargs):
    """A saved sequence classifier back in transformers, float32, eager attention, eval mode (the reference)."""
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager", **kwargs).eval()


def torch_label_logits(model, input_ids, attention_mask=None, token_type_ids=None) -> np.ndarray:
    """Float32 numpy label logits `[B, labels]` of a transformers sequence classifier for numpy inputs `[B, T]`."""
    kwargs = {}
    for key, value in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if value is not None:
            kwargs[key] = torch.as_tensor(np.asarray(value), dtype=torch.long)
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(input_ids), dtype=torch.long), **kwargs).logits.float().numpy()


def save_wordpiece_tokenizer(directory, texts, kind: str = "bert") -> pathlib.Path:
    """A tiny WordPiece tokenizer over the lower-cased words of `texts` (and their characters, so no word is
    unknown), saved as transformers' BertTokenizerFast beside a model: [CLS] text [SEP] for `kind="bert"`,
    <s> text </s> with RoBERTa's special-token ids (<s> 0, <pad> 1, </s> 2) for `kind="roberta"`."""
    import re

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    pieces = sorted({c for w in words for c in w} | {"##" + c for w in words for c in w[1:]})
    specials = (["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if kind == "roberta"
                else ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    vocab = {token: i for i, token in enumerate(specials + words + [p for p in pieces if p not in words])}
    cls, sep, pad, unk, mask = ((0, 2, 1, 3, 4) if kind == "roberta" else (2, 3, 0, 1, 4))
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=specials[unk]))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{specials[cls]} $A {specials[sep]}", pair=f"{specials[cls]} $A {specials[sep]} $B:1 {specials[sep]}:1",
        special_tokens=[(specials[cls], cls), (specials[sep], sep)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, cls_token=specials[cls], sep_token=specials[sep], pad_token=specials[pad],
        unk_token=specials[unk], mask_token=specials[mask],
        **({"bos_token": "<s>", "eos_token": "</s>"} if kind == "roberta" else {}))
    fast.save_pretrained(str(directory))
    return pathlib.Path(directory)
