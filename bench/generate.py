"""Decode tokens/s: jaxft's `generate` against transformers' `generate`, same checkpoint, same prompts.

    python bench/generate.py                       # SmolLM2-135M's shape, random weights, batch 1 and 16
    python bench/generate.py --model /path/to/hf_dir --batches 1,4
    python bench/generate.py --layers 4 --new 32   # a quicker look

Both sides decode greedily, float32, exactly `--new` tokens per row (no EOS: the random model's
text would stop at random places), from the same random prompts of `--prompt-len` tokens. Each
side runs in its own process (transformers in a child, so torch's OpenMP threads and XLA's never
share the cores), warms up once (jaxft compiles there), then times `--rounds` calls per batch size;
the figure is the median call. tokens/s counts new tokens: batch x new / seconds, the prompt's
prefill included. Prints one JSON line per batch size with both figures, their ratio, and whether
the two sides produced the same tokens.
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a HF model directory (default: SmolLM2-135M's shape, random weights)")
    p.add_argument("--layers", type=int, help="depth of the random model (default 30)")
    p.add_argument("--batches", default="1,16", help="batch sizes, comma-separated")
    p.add_argument("--new", type=int, default=128, help="new tokens per row")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layer-loop", default="auto", choices=("auto", "scan", "unroll"))
    p.add_argument("--side", choices=("jaxft", "transformers"), help=argparse.SUPPRESS)  # a child's side
    return p.parse_args(argv)


def random_checkpoint(directory: pathlib.Path, layers: int | None) -> pathlib.Path:
    import torch
    import transformers
    config = transformers.LlamaConfig(**{**SMOLLM2, **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    return np.random.default_rng(batch).integers(3, vocab, size=(batch, length)).tolist()


def time_jaxft(a, model_dir, batches):
    import jax

    from jaxft.generate import GenerationConfig, generate
    from jaxft.models import stack
    from jaxft.models.hf import load_pretrained, read_config
    from jaxft.trainer import layer_loop
    model = load_pretrained(model_dir, layer_loop=layer_loop(a.layer_loop))
    stack.layout_for_loop(model)
    config = GenerationConfig(max_new_tokens=a.new)
    vocab = read_config(model_dir)["vocab_size"]
    out = {}
    for batch in batches:
        rows = prompts(batch, a.prompt_len, vocab)
        tokens = generate(model, rows, config).tokens  # compiles
        seconds = []
        for _ in range(a.rounds):
            start = time.perf_counter()
            generate(model, rows, config)
            seconds.append(time.perf_counter() - start)
        out[batch] = dict(seconds=seconds, tokens=tokens)
    return out, dict(jax=jax.__version__, layer_loop=model.config.layer_loop)


def time_transformers(a, model_dir, batches):
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    out = {}
    for batch in batches:
        ids = torch.tensor(prompts(batch, a.prompt_len, vocab))

        def run():
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new,
                                      min_new_tokens=a.new, do_sample=False, pad_token_id=0)
        tokens = run()[:, a.prompt_len:].tolist()  # warm-up
        seconds = []
        for _ in range(a.rounds):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        out[batch] = dict(seconds=seconds, tokens=tokens)
    return out, dict(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                     attention=model.config._attn_implementation)


def child(a, model_dir, batches):
    """Run one side in this process and print its figures as JSON."""
    timed, versions = (time_jaxft if a.side == "jaxft" else time_transformers)(a, model_dir, batches)
    print(json.dumps(dict(timed={str(b): v for b, v in timed.items()}, versions=versions)), flush=True)


def run_side(side: str, argv: list[str], model_dir) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv, "--side", side, "--model", str(model_dir)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"the {side} side failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _without_model(argv: list[str]) -> list[str]:
    """The command line minus `--model X` / `--model=X` (the children get the directory explicitly)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--model":
            skip = True
        elif not x.startswith("--model="):
            out.append(x)
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    if a.side:
        return child(a, a.model, batches)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model or random_checkpoint(pathlib.Path(tmp) / "model", a.layers)
        passthrough = _without_model(argv)
        ours, theirs = run_side("jaxft", passthrough, model_dir), run_side("transformers", passthrough, model_dir)
    for batch in batches:
        j, t = ours["timed"][str(batch)], theirs["timed"][str(batch)]
        j_tps = batch * a.new / statistics.median(j["seconds"])
        t_tps = batch * a.new / statistics.median(t["seconds"])
        print(json.dumps(dict(
            bench="generate", model=a.model or f"random SmolLM2-135M shape, {a.layers or 30} layers", batch=batch,
            prompt_len=a.prompt_len, new_tokens=a.new, jaxft_tokens_per_sec=round(j_tps, 1),
            transformers_tokens_per_sec=round(t_tps, 1), ratio_jaxft_over_transformers=round(j_tps / t_tps, 3),
            same_tokens=j["tokens"] == t["tokens"], jaxft_s=[round(s, 3) for s in j["seconds"]],
            transformers_s=[round(s, 3) for s in t["seconds"]], **ours["versions"], **theirs["versions"])))


if __name__ == "__main__":
    sys.exit(main())
