"""Every fine-tuning method on the same Llama-shaped model and batch: what it trains, holds and costs.

    python bench/methods.py                       # hidden 512, 4 layers, vocab 8000, batch 4 x 256
    python bench/methods.py --methods lora,qlora  # a subset

Per method, one JSON line: trainable parameters, optimizer-state bytes, bytes of
the frozen weights (QLoRA: also its quantised kernels against the same in
bfloat16), XLA's compiled memory figure for the training step (arguments +
temporaries: the peak the step needs on the device),
and the median seconds per step over a few steps after compilation. Random
weights, float32 storage and compute, AdamW, LoRA rank 16 on all linear layers.
"""

import argparse
import functools
import json
import statistics
import sys
import time

from shapes import add_model_args  # bench/shapes.py: python puts bench/ on the path

METHODS = {
    "full": dict(method="full"),
    "lora": dict(method="lora"),
    "dora": dict(method="lora", use_dora=True),
    "qlora": dict(method="qlora", quant="nf4"),
    "qlora_int8": dict(method="qlora", quant="int8"),
    "qlora_embeddings": dict(method="qlora", quant="nf4", quant_embeddings=True),
    "adapter": dict(method="adapter", adapter_kind="houlsby", adapter_size=64),
    "prompt_tuning": dict(method="prompt_tuning", num_virtual_tokens=20),
    "partial": dict(method="partial", train_top_blocks=1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    return p.parse_args(argv)


def build_model(a):
    from flax import nnx

    from jaxft.models import get_family
    family = get_family("llama")
    config = family.config_cls.from_hf(dict(
        model_type="llama", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
        max_position_embeddings=a.seq, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False))
    return family.model_cls(config, rngs=nnx.Rngs(0))


def nbytes(tree) -> int:
    import jax
    return int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))


def bench_method(a, name, overrides, batch):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxft import peft
    from jaxft.config import base_config
    from jaxft.optim import build_optimizer
    from jaxft.peft.select import split_model
    from jaxft.trainer import train_step

    cfg = base_config()
    cfg.peft.rank, cfg.peft.alpha = a.rank, 2.0 * a.rank
    for k, v in overrides.items():
        cfg.peft[k] = v
    model = build_model(a)
    method = peft.prepare(model, cfg.peft, rngs=nnx.Rngs(1))
    graphdef, params, frozen = split_model(model, method.trainable)
    tx = build_optimizer(cfg.optim, 100)
    state = dict(step=jnp.int32(0), params=params, opt_state=tx.init(params), nonfinite_step=jnp.int32(-1))
    step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=lambda s: 1e-4,
                                        accum_steps=1, dropout_key=jax.random.key(0)), donate_argnums=0)
    compiled = step_fn.lower(state, frozen, batch).compile()
    memory = compiled.memory_analysis()
    step_bytes = None
    if memory is not None:
        step_bytes = int(memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
                         - memory.alias_size_in_bytes)
    record = dict(bench="methods", method=name, trainable_params=int(sum(x.size for x in jax.tree.leaves(params))),
                  optimizer_state_bytes=nbytes(state["opt_state"]), trainable_bytes=nbytes(params),
                  frozen_bytes=nbytes(frozen), step_memory_bytes=step_bytes)
    if method.name == "qlora":  # the quantised kernels alone, against the same kernels in bfloat16
        from jaxft.peft.quant import weight_bytes
        sizes = weight_bytes(model)
        record.update(quantized_kernel_bytes=sizes["quantized_bytes"], same_kernels_bf16_bytes=sizes["bf16_bytes"])
    times = []
    for i in range(a.steps + 1):
        start = time.perf_counter()
        state, metrics = step_fn(state, frozen, batch)
        jax.block_until_ready(metrics["loss"])
        if i:  # the first call includes the transfer of donated buffers
            times.append(time.perf_counter() - start)
    record["seconds_per_step"] = round(statistics.median(times), 3)
    return record


def main(argv=None):
    a = parse_args(argv)
    from jaxft.host import tune_malloc
    tune_malloc()  # as python -m jaxft.train runs the step
    import jax.numpy as jnp
    import numpy as np

    ids = np.random.default_rng(0).integers(0, a.vocab, size=(a.batch, a.seq)).astype(np.int32)
    batch = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.ones_like(ids), loss_mask=jnp.ones_like(ids))
    records = {}
    for name in a.methods.split(","):
        records[name] = bench_method(a, name, METHODS[name], batch)
        print(json.dumps(records[name]), flush=True)
    if "full" in records and "lora" in records:
        ratios = dict(lora_state_over_full=records["lora"]["optimizer_state_bytes"]
                      / records["full"]["optimizer_state_bytes"])
        if "qlora" in records:
            q = records["qlora"]
            ratios["qlora_frozen_over_lora"] = q["frozen_bytes"] / records["lora"]["frozen_bytes"]
            ratios["qlora_kernels_over_bf16"] = q["quantized_kernel_bytes"] / q["same_kernels_bf16_bytes"]
            ratios["qlora_kernels_over_lora_float32"] = q["quantized_kernel_bytes"] / (2 * q["same_kernels_bf16_bytes"])
        if "qlora_embeddings" in records:
            ratios["qlora_embeddings_frozen_over_lora"] = (records["qlora_embeddings"]["frozen_bytes"]
                                                           / records["lora"]["frozen_bytes"])
        print(json.dumps(dict(bench="methods", **{k: round(v, 4) for k, v in ratios.items()})), flush=True)


if __name__ == "__main__":
    sys.exit(main())
