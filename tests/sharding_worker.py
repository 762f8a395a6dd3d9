"""Runs in a process of 8 fake CPU devices (tests/test_sharding.py starts it, with XLA_FLAGS set).

    python -m tests.sharding_worker OUT_DIR CASES_JSON

Each case {"name", "method", "mesh": [data, fsdp, tensor]} trains the quickstart model
through `trainer.run` in OUT_DIR/<name>; then the worker lays the same state out with
`trainer.init_state` and records where each array went, and restores the first case's last
checkpoint onto every other mesh. It prints one JSON object: per case, the shardings; per
mesh, the restored trainable parameters' shardings and whether their values equal the saved ones.
"""

import json
import os
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

from jaxft import checkpoint as ckpt_lib
from jaxft import peft, sharding, trainer
from jaxft.models import stack
from jaxft.models.hf import load_pretrained
from jaxft.optim import build_optimizer
from jaxft.peft.select import split_model
from tests.test_sharding import case_config


def layout(tree) -> dict:
    """Dotted path -> (PartitionSpec as a list, shape of this process's first shard) of every array."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and leaf.ndim:
            name = jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value")
            spec = [list(a) if isinstance(a, tuple) else a for a in leaf.sharding.spec]
            out[name] = (spec, list(leaf.addressable_shards[0].data.shape))
    return out


def init_state(config, loaded_layout=None):
    """The run's state and frozen weights laid out on its mesh, as `trainer.run` builds them; the
    layout the weights had straight from the file goes into `loaded_layout`."""
    mesh = sharding.make_mesh(config.mesh)
    model = load_pretrained(config.model.path, mesh=mesh, layer_loop=trainer.layer_loop(config.model.layer_loop))
    if loaded_layout is not None:
        loaded_layout.update(layout(nnx.state(model)))
    method = peft.prepare(model, config.peft, rngs=nnx.Rngs(params=config.seed))
    stack.layout_for_loop(model)
    _, params, frozen = split_model(model, method.trainable)
    tx = build_optimizer(config.optim, config.train.steps)
    state, frozen, _, _ = trainer.init_state(params, frozen, tx, mesh)
    return state, frozen


def main(out_dir: str, cases_json: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    out_dir, cases, report = pathlib.Path(out_dir), json.loads(cases_json), {"cases": {}, "restores": {}}
    for case in cases:
        config = case_config(case)
        trainer.run(config, out_dir / case["name"])
        loaded = {}
        state, frozen = init_state(config, loaded)
        report["cases"][case["name"]] = dict(params=layout(state["params"]), opt_state=layout(state["opt_state"]),
                                             frozen=layout(frozen), loaded=loaded)

    # Resharding restore: the first case's last checkpoint onto every case's mesh.
    first = cases[0]
    source = ckpt_lib.Checkpointer(out_dir / first["name"], every_steps=1, keep=1, async_save=False)
    step = source.latest_step()
    saved = None
    for case in cases:
        if case["method"] != first["method"]:
            continue
        like, _ = init_state(case_config({**case, "method": first["method"], "layer_loop": first["layer_loop"]}))
        restored, _ = source.restore(step, like, ckpt_lib.fingerprint(like["params"]))
        values = {k: np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(restored["params"])[0]
                  for k in [jax.tree_util.keystr(k, simple=True, separator=".")]}
        saved = saved or values
        report["restores"][case["name"]] = dict(
            params=layout(restored["params"]), same_values=all(np.array_equal(values[k], saved[k]) for k in saved),
            step=int(restored["step"]))
    source.close()
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main(*sys.argv[1:])
