"""Tokens/s of one LoRA training step: jaxft against transformers + peft, same shapes, same run.

    python bench/train_step.py                 # the issue's shapes (about 3 minutes on 2 CPU cores)
    python bench/train_step.py --steps 3 --layers 2 --vocab 8000   # a quicker look

Both sides: a Llama-shaped model with random weights (float32), LoRA rank 16 on
every linear layer but the head, AdamW, next-token loss over all tokens of a
random batch. Each side is warmed up (compilation for jaxft, allocator for
torch) and then timed over `--steps` steps, forcing the results each step.
Prints one JSON line: both figures and jaxft/peer.
"""

import argparse
import functools
import json
import platform
import time

import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args()


def hf_config(a):
    import transformers
    return transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.heads, max_position_embeddings=a.seq,
        tie_word_embeddings=False)


def timed(step, warmup, steps):
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def bench_jaxft(a, ids):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxft.models import get_family
    from jaxft.peft.lora import LoRAConfig, apply_lora, trainable_filter
    from jaxft.peft.select import split_model
    from jaxft.trainer import train_step

    family = get_family("llama")
    model = family.model_cls(family.config_cls.from_hf(hf_config(a).to_dict()), rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=a.rank, alpha=2 * a.rank), rngs=nnx.Rngs(1))
    graphdef, params, frozen = split_model(model, trainable_filter())
    tx = optax.adamw(1e-4)
    state = dict(step=jnp.int32(0), params=params, opt_state=tx.init(params), nonfinite_step=jnp.int32(-1))
    batch = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.ones(ids.shape, jnp.int32),
                 loss_mask=jnp.ones(ids.shape, jnp.int32))
    step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=lambda s: 1e-4,
                                        accum_steps=1, dropout_key=jax.random.key(0)), donate_argnums=0)
    holder = {"state": state}

    def step():
        holder["state"], metrics = step_fn(holder["state"], frozen, batch)
        jax.block_until_ready(metrics["loss"])

    return timed(step, a.warmup, a.steps), jax.__version__


def bench_peft(a, ids):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config(a))
    model = peft.get_peft_model(model, peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules="all-linear"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.as_tensor(ids, dtype=torch.long)

    def step():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return timed(step, a.warmup, a.steps), torch.__version__, torch.get_num_threads()


def main():
    a = parse_args()
    ids = np.random.default_rng(0).integers(0, a.vocab, size=(a.batch, a.seq), dtype=np.int32)
    tokens = a.batch * a.seq
    jax_s, jax_version = bench_jaxft(a, ids)
    torch_s, torch_version, threads = bench_peft(a, ids)
    print(json.dumps({
        "bench": "lora_train_step",
        "shape": {k: getattr(a, k) for k in ("hidden", "layers", "heads", "ffn", "vocab", "batch", "seq", "rank")},
        "steps_timed": a.steps,
        "jaxft_tokens_per_sec": round(tokens / jax_s, 1),
        "peft_tokens_per_sec": round(tokens / torch_s, 1),
        "ratio_jaxft_over_peft": round(torch_s / jax_s, 3),
        "jax": jax_version, "torch": torch_version, "torch_threads": threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }))


if __name__ == "__main__":
    main()
