"""Per-device memory of full fine-tuning and LoRA, replicated (pure data parallelism) against FSDP.

    python bench/sharding.py                 # 8 fake CPU devices, hidden 512, 4 layers, vocab 8000
    python bench/sharding.py --devices 4

For each method and mesh: the bytes device 0 holds of the trainable parameters,
the optimizer state and the frozen weights (laid out by `trainer.init_state`,
as `jaxft.train` does), and XLA's compiled per-device memory of the training step.
Then the ratio replicated / FSDP for each. Random weights, float32, AdamW, LoRA
rank 16 on all linear layers; batch 8 x 256.
"""

import argparse
import json
import os
import sys

from shapes import add_model_args, fake_cpu_devices  # bench/shapes.py: python puts bench/ on the path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8)
    add_model_args(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    return p.parse_args(argv)


def device0_bytes(tree) -> int:
    """What device 0 holds of the arrays in `tree`."""
    import jax
    device = jax.devices()[0]
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)
               for shard in leaf.addressable_shards if shard.device == device)


def measure(a, method: str, mesh_sizes: tuple[int, int, int]) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from ml_collections import ConfigDict

    from jaxft import peft, sharding, trainer
    from jaxft.config import base_config
    from jaxft.data import to_global
    from jaxft.optim import build_optimizer
    from jaxft.peft.select import split_model
    sys.path.insert(0, os.path.dirname(__file__))
    from methods import build_model

    cfg = base_config()
    cfg.peft.method, cfg.peft.rank, cfg.peft.alpha = method, 16, 32.0
    model = build_model(a)
    chosen = peft.prepare(model, cfg.peft, rngs=nnx.Rngs(1))
    graphdef, params, frozen = split_model(model, chosen.trainable)
    mesh = sharding.make_mesh(ConfigDict(dict(zip(("data", "fsdp", "tensor"), mesh_sizes), dcn_data=1)))
    tx = build_optimizer(cfg.optim, 100)
    state, frozen, state_shardings, frozen_shardings = trainer.init_state(params, frozen, tx, mesh)
    ids = np.random.default_rng(0).integers(0, a.vocab, size=(a.batch, a.seq)).astype(np.int32)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = to_global(dict(input_ids=ids, attention_mask=np.ones_like(ids), loss_mask=np.ones_like(ids)),
                               batch_sharding, a.batch)
    step = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef, tx=tx, schedule=lambda s: 1e-4,
                                     accum_steps=1, dropout_key=jax.random.key(0), mesh=mesh),
                   in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    memory = step.lower(state, frozen, batch).compile().memory_analysis()
    step_bytes = None if memory is None else int(memory.argument_size_in_bytes + memory.temp_size_in_bytes
                                                 + memory.output_size_in_bytes - memory.alias_size_in_bytes)
    del jnp
    return dict(bench="sharding", method=method, mesh=dict(zip(("data", "fsdp", "tensor"), mesh_sizes)),
                params_bytes=device0_bytes(state["params"]), optimizer_state_bytes=device0_bytes(state["opt_state"]),
                frozen_bytes=device0_bytes(frozen), step_memory_bytes=step_bytes)


def main(argv=None):
    a = parse_args(argv)
    fake_cpu_devices(a.devices)
    meshes = {"replicated": (a.devices, 1, 1), "fsdp": (1, a.devices, 1)}
    for method in ("full", "lora"):
        records = {name: measure(a, method, sizes) for name, sizes in meshes.items()}
        for record in records.values():
            print(json.dumps(record), flush=True)
        ratios = {f"{key}_replicated_over_fsdp": round(records["replicated"][key] / records["fsdp"][key], 2)
                  for key in ("params_bytes", "optimizer_state_bytes", "frozen_bytes", "step_memory_bytes")
                  if records["fsdp"][key]}
        print(json.dumps(dict(bench="sharding", method=method, devices=a.devices, **ratios)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
