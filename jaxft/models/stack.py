"""Decoder blocks held stacked: one module per group of consecutive layers, every variable with a leading
layer axis, run under one `jax.lax.scan` per group.

Why: unrolled in Python, the program, its compile time and XLA's scheduling problem grow with depth
(32 blocks for an 8B Llama, 80 for a 70B); scanned, one block is compiled once whatever the depth.

The model keeps its blocks in `model.layers`, a list of groups. Usually there is one group holding every
layer. A method that treats layers differently (LoRA on some layers only, training the top N blocks,
gradual unfreezing) splits the groups where the treatment changes (`regroup`), so that within a group
every layer is the same module with the same trainable parameters, and each group can still be scanned.

A stacked variable carries two pieces of metadata: `logical_axes` starting with "layers" (never split
over the mesh), and `layer_ids`, the model layers its leading axis holds. From them `layer_names` gives
the per-layer names everything user-facing speaks in (Hugging Face tensor names, PEFT files, trainable
patterns): the group's variable `model.layers.0.mlp.up_proj.kernel` with `layer_ids=(0, ..., 31)` is
`model.layers.0.mlp.up_proj.kernel` ... `model.layers.31.mlp.up_proj.kernel`. The group's index is the
first integer in a stacked variable's path; it is replaced by the layer's index.
"""

from __future__ import annotations

import functools
import zlib
from typing import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.models import layout

LAYER_AXIS = "layers"  # the logical name of the leading axis (jaxft/sharding.py RULES: never split)
LOOPS = ("scan", "unroll")

# jax.checkpoint policies by the names `model.remat` takes ("none": keep every activation).
REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute all of it in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": None,  # built in `remat_policy`: needs the names of the memories
}
REMAT_NAMES = ("none",) + tuple(REMAT_POLICIES)


# ----------------------------------------------------------------------------- variables


def layer_ids(variable: nnx.Variable) -> tuple[int, ...] | None:
    """The model layers held along a stacked variable's leading axis, or None for a variable that is not stacked."""
    ids = variable.get_metadata().get("layer_ids")
    return None if ids is None else tuple(ids)


def stack_shape(variable: nnx.Variable) -> tuple[int, ...]:
    """`(layers,)` for a stacked variable, `()` otherwise: the leading shape its per-layer slices lack."""
    ids = layer_ids(variable)
    return () if ids is None else (len(ids),)


def layer_ndim(variable: nnx.Variable) -> int:
    """The rank of one layer's slice of the variable (its whole rank when it is not stacked)."""
    return np.ndim(variable.get_value()) - len(stack_shape(variable))


def stacked_like(variable: nnx.Variable) -> dict:
    """Metadata that makes a new variable stacked like `variable` (empty when it is not): pass as keyword
    arguments next to the new variable's own `logical_axes` through `with_layer_axis`."""
    ids = layer_ids(variable)
    return {} if ids is None else {"layer_ids": ids}


def with_layer_axis(logical_axes: tuple, stacked: dict) -> dict:
    """The metadata of a new variable: its per-layer `logical_axes`, with the layer axis in front when
    `stacked` (from `stacked_like`) says the variable is stacked."""
    if not stacked:
        return {"logical_axes": tuple(logical_axes)}
    return {"logical_axes": (LAYER_AXIS, *logical_axes), **stacked}


def layer_names(path: Sequence, variable: nnx.Variable | None = None) -> list[str]:
    """The per-layer dotted names of the variable (or module, with `variable` giving its layer ids) at
    `path`: one name for an unstacked one, one per layer for a stacked one (module doc)."""
    parts = [str(p) for p in path]
    ids = None if variable is None else layer_ids(variable)
    if ids is None:
        return [".".join(parts)]
    at = next(i for i, p in enumerate(parts) if p.isdigit())
    return [".".join(parts[:at] + [str(i)] + parts[at + 1:]) for i in ids]


def flat_layers(state) -> dict[str, jax.Array]:
    """Every variable of an `nnx.State` by per-layer name, a stacked one cut into its layers' slices."""
    out = {}
    for path, variable in nnx.to_flat_state(state):
        value = variable.get_value()
        stacked = layer_ids(variable) is not None
        for j, name in enumerate(layer_names(path, variable)):
            out[name] = value[j] if stacked else value
    return out


def per_layer_keys(key: jax.Array, names: Sequence[str]) -> jax.Array:
    """One PRNG key per name, `key` folded with a hash of the name: a layer's random initialisation depends
    on its name only, not on how the layers are grouped (so scanned and unrolled models start equal)."""
    return jnp.stack([jax.random.fold_in(key, zlib.crc32(n.encode()) & 0x7FFFFFFF) for n in names])


def init_per_layer(init: Callable, key: jax.Array, names: Sequence[str], shape: tuple, dtype, stacked: dict):
    """`init(key, shape, dtype)` for each layer: stacked `[layers, *shape]` when `stacked`, else one array."""
    keys = per_layer_keys(key, names)
    if not stacked:
        return init(keys[0], shape, dtype)
    return jax.vmap(lambda k: init(k, shape, dtype))(keys)


# ----------------------------------------------------------------------------- building


def build_group(make_layer: Callable[[jax.Array], nnx.Module], ids: Sequence[int], key: jax.Array) -> nnx.Module:
    """The layers `ids` as one stacked module: `make_layer(key)` builds one layer; layer i is built from
    `fold_in(key, i)`, so its initial values do not depend on the grouping either."""
    ids = tuple(int(i) for i in ids)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_layer(jax.random.key(0))))
    keys = jnp.stack([jax.random.fold_in(key, i) for i in ids])
    state = jax.vmap(lambda k: nnx.state(make_layer(k)))(keys)
    return nnx.merge(graphdef, _mark_stacked(state, ids))


def _mark_stacked(state, ids: tuple[int, ...]):
    def mark(variable):
        axes = variable.get_metadata().get("logical_axes")
        extra = {"layer_ids": ids}
        if axes is not None:
            extra["logical_axes"] = (LAYER_AXIS, *axes)
        return variable.replace(**extra)
    return jax.tree.map(mark, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def group_ids(group: nnx.Module) -> tuple[int, ...]:
    """The model layers a stacked group holds."""
    for _, variable in nnx.to_flat_state(nnx.state(group)):
        ids = layer_ids(variable)
        if ids is not None:
            return ids
    raise ValueError(f"{type(group).__name__} holds no stacked variable")


def slice_group(group: nnx.Module, start: int, stop: int) -> nnx.Module:
    """A new group holding layers `[start, stop)` of `group` (positions along its leading axis)."""
    graphdef, state = nnx.split(group)

    def cut(variable):
        ids = layer_ids(variable)
        value = variable.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):  # an abstract model (loading): shapes only
            value = jax.ShapeDtypeStruct((stop - start, *value.shape[1:]), value.dtype,
                                         sharding=getattr(value, "sharding", None))
        else:
            value = value[start:stop]
        return variable.replace(value=value, layer_ids=ids[start:stop])
    return nnx.merge(graphdef, jax.tree.map(cut, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def regroup(groups: nnx.List, signature: Callable[[int], Hashable]) -> nnx.List | None:
    """Split the groups wherever `signature(layer)` changes between neighbouring layers of a group; None when
    every group is already uniform. A split copies the affected arrays once (before training)."""
    out, changed = [], False
    for group in groups:
        ids = group_ids(group)
        cuts = [0] + [j for j in range(1, len(ids)) if signature(ids[j]) != signature(ids[j - 1])] + [len(ids)]
        if len(cuts) == 2:
            out.append(group)
            continue
        changed = True
        out.extend(slice_group(group, a, b) for a, b in zip(cuts[:-1], cuts[1:]))
    return nnx.List(out) if changed else None


def block_groups(model: nnx.Module) -> nnx.List | None:
    """The model's groups of blocks (at its layout's `blocks` path, `model.layers` in a decoder), or None."""
    owner, attr = _blocks_owner(model)
    return getattr(owner, attr, None)


def _blocks_owner(model: nnx.Module):
    *parents, attr = layout.of(model).blocks.split(".")
    owner = model
    for part in parents:
        owner = getattr(owner, part, None)
    return owner, attr


def regroup_model(model: nnx.Module, signature: Callable[[int], Hashable]) -> bool:
    """`regroup` a model's blocks (`block_groups`) in place; True if any group was split."""
    groups = block_groups(model)
    regrouped = None if groups is None else regroup(groups, signature)
    if regrouped is not None:
        owner, attr = _blocks_owner(model)
        setattr(owner, attr, regrouped)
    return regrouped is not None


def layout_for_loop(model: nnx.Module) -> None:
    """Lay the blocks out for the model's `layer_loop`, in place: unrolled, one group per layer, so each layer's
    arrays are its own (a slice of a stacked parameter costs XLA a copy of it every step: +3.5% of the bytes
    a SmolLM2-135M LoRA step moves on CPU); scanned, as they are."""
    if model.config.layer_loop == "unroll":
        regroup_model(model, lambda layer: layer)


def layer_module(model: nnx.Module, layer: int) -> nnx.Module:
    """Decoder layer `layer` of `model` as a module of its own (a copy of its slice of the stacked arrays)."""
    for group in block_groups(model):
        ids = group_ids(group)
        if layer in ids:
            graphdef, state = nnx.split(group)
            j = ids.index(layer)
            return nnx.merge(graphdef, jax.tree.map(lambda a: a[j], state))
    raise IndexError(f"the model has no decoder layer {layer}")


# ----------------------------------------------------------------------------- running


def remat_policy(name: str):
    """`(wrap, policy)`: whether to wrap a block in `jax.checkpoint`, and the policy for `model.remat=name`."""
    if name == "none":
        return False, None
    if name == "offload":
        return True, jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return True, REMAT_POLICIES[name]


def run(groups, x, block: Callable, per_layer: dict[str, np.ndarray] | None = None, *, loop: str = "scan",
        remat: str = "none", caches: list | None = None):
    """Thread `x` through every layer of every group: `x = block(layer, x, inputs)`, where `layer` is one
    layer's module (its slice of the group) and `inputs` its row of `per_layer` (arrays indexed by layer).

    `loop="scan"`: each group under one `jax.lax.scan` (one layer compiled, whatever the depth);
    `"unroll"`: a Python loop over the layers (a longer program XLA may schedule better on CPU).
    `remat`: a `model.remat` policy name applied to each layer (`REMAT_NAMES`).
    `caches`: state each layer reads and rewrites (a KV cache), one pytree per group with the group's layer
    axis in front; then `block(layer, x, inputs, cache) -> (x, cache)` gets its layer's slice, and `run`
    returns `(x, caches)` with the rewritten ones.
    """
    per_layer = per_layer or {}
    wrap, policy = remat_policy(remat)
    new_caches = []
    for g, group in enumerate(groups):
        graphdef, state = nnx.split(group)
        ids = np.asarray(group_ids(group))
        rows = {k: jnp.asarray(np.asarray(v)[ids]) for k, v in per_layer.items()}
        cache = None if caches is None else caches[g]

        def step(x, xs, graphdef=graphdef):
            layer_state, inputs, layer_cache = xs
            layer = nnx.merge(graphdef, layer_state)
            if layer_cache is None:
                return block(layer, x, inputs), None
            return block(layer, x, inputs, layer_cache)

        if wrap:
            step = jax.checkpoint(step, policy=policy, prevent_cse=loop != "scan")
        if loop == "scan" and len(ids) > 1:
            x, cache = jax.lax.scan(step, x, (state, rows, cache))
        else:
            written = []
            for j in range(len(ids)):
                x, layer_cache = step(x, jax.tree.map(functools.partial(_take, j=j), (state, rows, cache)))
                written.append(layer_cache)
            cache = None if cache is None else jax.tree.map(_stack, *written)
        new_caches.append(cache)
    return x if caches is None else (x, new_caches)


def _take(a, j):
    # A group of one layer (the unrolled layout) gives its only slice as a reshape, which XLA makes a bitcast;
    # indexing made a copy, and decoding copied every layer's KV cache that way every token.
    return a.reshape(a.shape[1:]) if a.shape[0] == 1 else a[j]


def _stack(*slices):
    return slices[0][None] if len(slices) == 1 else jnp.stack(slices)
