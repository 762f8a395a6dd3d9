"""Tokens/s of one LoRA training step: jaxft against transformers + peft, same shapes, same run.

    python bench/train_step.py                 # the issue's shapes (about 5 minutes on 2 CPU cores)
    python bench/train_step.py --rounds 2 --layers 2 --vocab 8000   # a quicker look
    python bench/train_step.py --peer-malloc jaxft  # the peer with jaxft's allocator settings too
    python bench/train_step.py --preset smollm2-135m  # a real model's shape (SmolLM2-135M), batch 8 x 128, rank 8
    python bench/train_step.py --jaxft-only --layer-loop scan  # jaxft alone: a quick A/B of its options

Both sides: a Llama-shaped model with random weights (float32), LoRA rank 16 on
every linear layer but the head, AdamW, next-token loss over all tokens of a
random batch. Each side runs in its own process, as each library's users run
it: jaxft here, with the host allocator settings `python -m jaxft.train`
applies (`jaxft.host.tune_malloc`); the peer in a child process with glibc's
defaults, or with jaxft's settings under `--peer-malloc jaxft`. Both are built
and warmed up (compilation, allocator) first; then the sides take turns in
`--rounds` blocks of `--steps` steps each (ABAB...), with a pause before each
block so the other side's spinning worker threads are idle. Each side's figure
is the median of its blocks, so a burst of load from other tenants of the
machine moves one block, not the result. Prints one JSON line: both figures,
jaxft/peer, and the per-block times.
"""

import argparse
import functools
import json
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
from shapes import add_model_args  # bench/shapes.py: python puts bench/ on the path

from jaxft.host import tune_malloc

REPLY = "@@peer "  # marks the worker's protocol lines on its stdout

# SmolLM2-135M(-Instruct)'s shape: a real model's proportions (many thin layers, tied 49k vocabulary).
PRESETS = {"smollm2-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, ffn=1536, vocab=49152,
                                tie_embeddings=True, batch=8, seq=128, rank=8)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, layers=8, vocab=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=5, help="timed blocks per side, taken in turns")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pause", type=float, default=2.0, help="seconds of idle before each block")
    p.add_argument("--peer-malloc", choices=("default", "jaxft"), default="default",
                   help="the peer process's allocator: glibc's defaults, or jaxft's settings")
    p.add_argument("--layer-loop", choices=("auto", "scan", "unroll"), default="auto",
                   help="model.layer_loop (auto: what jaxft.train picks on this backend)")
    p.add_argument("--loss-chunk", type=int, default=1024, help="model.loss_chunk (positions per head+loss chunk)")
    p.add_argument("--attention", default="auto", help="model.attention (auto on CPU: chunked)")
    p.add_argument("--jaxft-only", action="store_true", help="time jaxft alone (no peer): a quick A/B of options")
    p.add_argument("--peer-only", action="store_true", help="time the peer alone, in this process (no jaxft)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    p.add_argument("--tie-embeddings", action="store_true", help="the head is the embedding matrix")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named shape; explicit options still override it")
    p.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.preset:
        explicit = {arg.split("=")[0].lstrip("-").replace("-", "_") for arg in argv or ()}
        for key, value in PRESETS[a.preset].items():
            if key not in explicit:
                setattr(a, key, value)
    a.kv_heads = a.kv_heads or a.heads
    return a


def hf_config(a):
    import transformers
    return transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=a.seq,
        tie_word_embeddings=a.tie_embeddings)


def time_block(step, steps, pause):
    """Mean seconds per step over one block of `steps` steps, after `pause` seconds idle."""
    time.sleep(pause)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def bench_jaxft(a, ids):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxft.models import get_family, stack
    from jaxft.peft.lora import LoRAConfig, apply_lora, trainable_filter
    from jaxft.peft.select import split_model
    from jaxft.trainer import layer_loop, train_step

    family = get_family("llama")
    config = family.config_cls.from_hf(hf_config(a).to_dict(), layer_loop=layer_loop(a.layer_loop),
                                       attention=a.attention)
    model = family.model_cls(config, rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=a.rank, alpha=2 * a.rank), rngs=nnx.Rngs(1))
    stack.layout_for_loop(model)  # as jaxft.train lays the blocks out
    graphdef, params, frozen = split_model(model, trainable_filter())
    tx = optax.adamw(1e-4)
    state = {"step": jnp.int32(0), "params": params, "opt_state": tx.init(params), "nonfinite_step": jnp.int32(-1)}
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones(ids.shape, jnp.int32),
                 "loss_mask": jnp.ones(ids.shape, jnp.int32)}
    step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=lambda s: 1e-4,
                                        accum_steps=1, dropout_key=jax.random.key(0), loss_chunk=a.loss_chunk),
                     donate_argnums=0)
    holder = {"state": state}

    def step():
        holder["state"], metrics = step_fn(holder["state"], frozen, batch)
        jax.block_until_ready(metrics["loss"])

    return step, jax.__version__


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

    return step, torch.__version__, torch.get_num_threads()


def peer_worker(a):
    """Child process: build the peer, then time blocks of steps on request ("run N" -> seconds per step)."""
    if a.peer_malloc == "jaxft":
        tune_malloc()
    step, torch_version, threads = bench_peft(a, random_ids(a))
    for _ in range(a.warmup):
        step()
    print(REPLY, json.dumps({"torch": torch_version, "torch_threads": threads}), flush=True)
    for line in sys.stdin:
        n = int(line.split()[1])
        start = time.perf_counter()
        for _ in range(n):
            step()
        print(REPLY, (time.perf_counter() - start) / n, flush=True)


class Peer:
    """The peer's worker process, driven over its stdin/stdout."""

    def __init__(self, argv):
        self.proc = subprocess.Popen([sys.executable, __file__, *argv, "--peer-worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self._reply())

    def _reply(self) -> str:
        for line in self.proc.stdout:  # libraries may print; protocol lines carry the marker
            if line.startswith(REPLY):
                return line[len(REPLY):].strip()
        raise RuntimeError(f"peer worker exited with status {self.proc.wait()}")

    def time_block(self, steps, pause) -> float:
        time.sleep(pause)
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return float(self._reply())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def random_ids(a):
    return np.random.default_rng(0).integers(0, a.vocab, size=(a.batch, a.seq), dtype=np.int32)


def shape(a) -> dict:
    return {k: getattr(a, k) for k in ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab", "tie_embeddings",
                                       "batch", "seq", "rank")}


def time_jaxft_alone(a):
    """jaxft's median seconds per step over the rounds, no peer (compare jaxft's own options)."""
    jax_step, jax_version = bench_jaxft(a, random_ids(a))
    for _ in range(a.warmup):
        jax_step()
    jax_s = [time_block(jax_step, a.steps, a.pause) for _ in range(a.rounds)]
    median = statistics.median(jax_s)
    print(json.dumps({"bench": "lora_train_step_jaxft", "shape": shape(a), "layer_loop": a.layer_loop,
                      "loss_chunk": a.loss_chunk, "attention": a.attention,
                      "jaxft_tokens_per_sec": round(a.batch * a.seq / median, 1),
                      "jaxft_s_per_step": [round(x, 3) for x in jax_s], "jax": jax_version}))


def time_peer_alone(a):
    """The peer's median seconds per step over the rounds, alone in this process (glibc's allocator defaults
    unless --peer-malloc jaxft): with --jaxft-only in another run, each side with the machine to itself."""
    if a.peer_malloc == "jaxft":
        tune_malloc()
    step, torch_version, threads = bench_peft(a, random_ids(a))
    for _ in range(a.warmup):
        step()
    peer_s = [time_block(step, a.steps, a.pause) for _ in range(a.rounds)]
    print(json.dumps({"bench": "lora_train_step_peer", "shape": shape(a), "peer_malloc": a.peer_malloc,
                      "peft_tokens_per_sec": round(a.batch * a.seq / statistics.median(peer_s), 1),
                      "peft_s_per_step": [round(x, 3) for x in peer_s], "torch": torch_version,
                      "torch_threads": threads}))


def main(argv):
    a = parse_args(argv)
    if a.peer_worker:
        return peer_worker(a)
    if a.peer_only:
        return time_peer_alone(a)
    tune_malloc()  # before any JAX thread exists, as python -m jaxft.train does
    if a.jaxft_only:
        return time_jaxft_alone(a)
    peer = Peer(argv)
    jax_step, jax_version = bench_jaxft(a, random_ids(a))
    for _ in range(a.warmup):
        jax_step()
    jax_s, torch_s = [], []
    for _ in range(a.rounds):
        jax_s.append(time_block(jax_step, a.steps, a.pause))
        torch_s.append(peer.time_block(a.steps, a.pause))
    peer.close()
    jax_med, torch_med = statistics.median(jax_s), statistics.median(torch_s)
    tokens = a.batch * a.seq
    print(json.dumps({
        "bench": "lora_train_step",
        "shape": shape(a), "layer_loop": a.layer_loop, "loss_chunk": a.loss_chunk,
        "steps_per_block": a.steps, "rounds": a.rounds, "peer_malloc": a.peer_malloc,
        "jaxft_tokens_per_sec": round(tokens / jax_med, 1),
        "peft_tokens_per_sec": round(tokens / torch_med, 1),
        "ratio_jaxft_over_peft": round(torch_med / jax_med, 3),
        "ratio_per_round": [round(t / j, 3) for j, t in zip(jax_s, torch_s)],
        "jaxft_s_per_step": [round(x, 3) for x in jax_s], "peft_s_per_step": [round(x, 3) for x in torch_s],
        "jax": jax_version, **peer.info,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
