"""Compile the real training step for a large model on many fake CPU devices, with nothing allocated.

    python bench/scale.py --preset llama3-8b-lora-v5e16     # the README's pod recipe: does it fit a v5e chip?
    python bench/scale.py --preset llama3-8b-lora-v5e16 --layers 8 --layer-loop unroll --loss-chunk 0
    python bench/scale.py --shape llama3-8b --method qlora --devices 1 --batch 4 --seq 4096 --remat full

The model, its fine-tuning method and the optimizer state are built abstractly (`nnx.eval_shape`:
shapes and shardings only), and `trainer.train_step` is traced, lowered and compiled by XLA for
`--devices` fake CPU devices on the `--mesh` jaxft would build (`jaxft/sharding.py`), exactly as
`jaxft.train` compiles it. One JSON line per run: trace / lower / compile seconds and XLA's
per-device memory figures (arguments, temporaries, outputs; `peak_bytes` = arguments + temporaries +
outputs - donated aliases, what the step needs resident on one device).

What a CPU compile can and cannot say about an accelerator: the sharding, the weights' and
optimizer state's bytes per device, and the activations the step keeps for the backward pass are
XLA's own decisions for this program, and transfer. Attention runs XLA's chunked form here unless
`--attention splash` (the TPU kernel, interpreted: its blocks, not a [T, T] matrix, live in
memory); and XLA's CPU and TPU schedulers differ, so temporaries are an estimate.
"""

import argparse
import functools
import json
import sys
import time

from shapes import fake_cpu_devices  # bench/shapes.py: python puts bench/ on the path

# Llama-family shapes (the HF config.json fields jaxft reads).
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}

# The README's recipes. v5e: 16 GB per chip; v5p: 95 GB; an H100/A100: 80 GB.
PRESETS = {
    "llama3-8b-lora-v5e16": dict(shape="llama3-8b", method="lora", devices=16, mesh="1,16,1", batch=16, seq=4096,
                                 remat="full"),
    "llama3-8b-qlora-1gpu": dict(shape="llama3-8b", method="qlora", devices=1, mesh="1,1,1", batch=4, seq=4096,
                                 remat="full"),
    "llama3-70b-lora-64": dict(shape="llama3-70b", method="lora", devices=64, mesh="1,64,1", batch=64, seq=4096,
                               remat="full"),
    "llama3.2-1b-lora-1gpu": dict(shape="llama3.2-1b", method="lora", devices=1, mesh="1,1,1", batch=8, seq=2048,
                                  remat="full"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--layers", type=int, help="override the shape's depth (e.g. to time compiles by depth)")
    p.add_argument("--method", default="lora", help="peft.method: lora, qlora, full, ...")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--devices", type=int, default=16)
    p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (one may be -1)")
    p.add_argument("--batch", type=int, default=16, help="global batch (rows)")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", help="compute and frozen-weight dtype")
    p.add_argument("--remat", default="full", help="model.remat policy")
    p.add_argument("--layer-loop", default="scan", choices=("scan", "unroll"))
    p.add_argument("--attention", default="auto", help="model.attention (auto on CPU: chunked)")
    p.add_argument("--loss-chunk", type=int, default=1024, help="model.loss_chunk (0: whole rows)")
    a = p.parse_args(argv)
    if a.preset:  # a preset sets these unless given explicitly after it on the command line
        explicit = {arg.split("=")[0].lstrip("-").replace("-", "_") for arg in (argv or sys.argv[1:])}
        for key, value in PRESETS[a.preset].items():
            if key not in explicit:
                setattr(a, key, value)
    return a


def config_for(a):
    """The jaxft config a user would run, minus data and model path."""
    from jaxft.config import base_config
    c = base_config()
    c.peft.method, c.peft.rank, c.peft.alpha = a.method, a.rank, 2.0 * a.rank
    c.model.dtype = c.model.param_dtype = a.dtype
    c.model.remat, c.model.layer_loop, c.model.attention, c.model.loss_chunk = (a.remat, a.layer_loop, a.attention,
                                                                               a.loss_chunk)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (int(x) for x in a.mesh.split(","))
    c.train.batch_size, c.train.seq_len = a.batch, a.seq
    return c


def abstract_model(a, c):
    """(model, method): the model with its method applied, every array a ShapeDtypeStruct."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxft import peft
    from jaxft.models import get_family
    family = get_family("llama")
    hf = dict(model_type="llama", max_position_embeddings=max(a.seq, 8192), rope_theta=500000.0,
              **SHAPES[a.shape])
    if a.layers:
        hf["num_hidden_layers"] = a.layers
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[a.dtype]
    config = family.config_cls.from_hf(hf, dtype=dtype, param_dtype=dtype, remat=c.model.remat,
                                       layer_loop=c.model.layer_loop, attention=c.model.attention)
    holder = {}

    def build():
        model = family.model_cls(config, rngs=nnx.Rngs(0))
        holder["method"] = peft.prepare(model, c.peft, rngs=nnx.Rngs(1))
        return model

    model = nnx.eval_shape(build)
    return model, holder["method"]


def compile_step(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxft import sharding, trainer
    from jaxft.optim import build_optimizer, learning_rate_schedule
    from jaxft.peft.select import parameter_table, split_model

    c = config_for(a)
    mesh = sharding.make_mesh(c.mesh)
    sharding.check_batch(a.batch, 1, mesh)
    model, method = abstract_model(a, c)
    rows = parameter_table(model, method.trainable)
    graphdef, params, frozen = split_model(model, method.trainable)
    tx = build_optimizer(c.optim, 1000)
    state = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=jax.eval_shape(tx.init, params),
                 nonfinite_step=jax.ShapeDtypeStruct((), jnp.int32))
    state_shardings = sharding.tree_shardings(state, mesh)
    frozen_shardings = sharding.tree_shardings(frozen, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((a.batch, a.seq), jnp.int32, sharding=batch_sharding)
             for k in ("input_ids", "attention_mask", "loss_mask")}
    step = jax.jit(functools.partial(
        trainer.train_step, graphdef=graphdef, tx=tx, schedule=learning_rate_schedule(c.optim, 1000), accum_steps=1,
        dropout_key=jax.random.key(0), mesh=mesh, loss_chunk=c.model.loss_chunk),
        in_shardings=(state_shardings, frozen_shardings, batch_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)

    t0 = time.perf_counter()
    traced = step.trace(state, frozen, batch)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    memory = compiled.memory_analysis()
    gib = lambda n: round(n / 2**30, 3)  # noqa: E731
    per_device = dict(arguments_gib=gib(memory.argument_size_in_bytes), temporaries_gib=gib(memory.temp_size_in_bytes),
                      outputs_gib=gib(memory.output_size_in_bytes), aliased_gib=gib(memory.alias_size_in_bytes),
                      peak_gib=gib(memory.argument_size_in_bytes + memory.temp_size_in_bytes
                                 + memory.output_size_in_bytes - memory.alias_size_in_bytes))
    n_params = sum(r["params"] for r in rows)
    trained = sum(r["params"] for r in rows if r["trainable"])
    cfg = model.config
    logits_gib = gib(a.batch // (mesh.shape["data"] * mesh.shape["fsdp"]) * a.seq * cfg.vocab_size * 4)
    return dict(bench="scale", preset=a.preset, shape=a.shape, layers=cfg.num_layers, method=a.method, rank=a.rank,
                devices=a.devices, mesh=dict(mesh.shape), batch=a.batch, seq=a.seq, dtype=a.dtype, remat=a.remat,
                layer_loop=cfg.layer_loop, attention=a.attention, loss_chunk=a.loss_chunk, params=n_params,
                trainable_params=trained, trace_s=round(t1 - t0, 2), lower_s=round(t2 - t1, 2),
                compile_s=round(t3 - t2, 2), per_device=per_device, float32_logits_per_device_gib=logits_gib,
                jax=jax.__version__, platform=np.asarray(jax.devices()[0].platform).item())


def main(argv=None):
    a = parse_args(argv)
    fake_cpu_devices(a.devices)
    print(json.dumps(compile_step(a)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
