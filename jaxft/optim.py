"""The optimizer: an optax chain built from `config.optim`.

Clipping, then the chosen optimizer, with weight decay masked off norms and
biases. The transformation only ever sees the trainable parameters, so frozen
weights hold no optimizer state. Gradient accumulation happens inside the
training step (micro-batches scanned in one compiled step), not here.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxft.models import stack


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `cfg.lr`, then cosine, linear decay, or constant."""
    warmup = min(cfg.warmup_steps, total_steps)
    end_lr = cfg.lr * cfg.end_lr_ratio
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=end_lr)
    after = {
        "linear": optax.linear_schedule(cfg.lr, end_lr, max(total_steps - warmup, 1)),
        "constant": optax.constant_schedule(cfg.lr),
    }[cfg.schedule]
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def decay_mask(params):
    """True for parameters weight decay applies to: matrices, not norm scales or biases (judged per layer:
    a stacked decoder block's parameter has one axis more than each layer's, jaxft/models/stack.py)."""
    def decays(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if isinstance(leaf, nnx.Variable):
            return leaf.replace(value=decays(path, leaf.get_value()) and stack.layer_ndim(leaf) >= 2)
        return leaf.ndim >= 2 and "norm" not in name and not name.endswith("bias")
    return jax.tree.map_with_path(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


class HoldState(NamedTuple):
    count: jax.Array


def hold_until(start_steps) -> optax.GradientTransformation:
    """Zero each parameter's update before its start step (`start_steps`: a tree of ints like the params).

    Gradual unfreezing: placed before clipping (so a held gradient neither counts in
    the norm nor feeds the moments) and after the optimizer (so weight decay does not
    move a held weight either).
    """
    def init(params):
        del params
        return HoldState(jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        held = jax.tree.map(lambda u, start: jnp.where(state.count >= start, u, jnp.zeros_like(u)),
                            updates, start_steps)
        return held, HoldState(state.count + 1)

    return optax.GradientTransformation(init, update)


def build_optimizer(cfg, total_steps: int, start_steps=None) -> optax.GradientTransformation:
    """The full update rule for `config.optim` over `total_steps` optimizer steps.

    `start_steps` (a tree of ints like the params, or None) holds parameters still until their step.
    """
    lr = learning_rate_schedule(cfg, total_steps)
    wd = cfg.weight_decay
    if cfg.name == "adamw":
        core = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=decay_mask)
    elif cfg.name == "lion":
        core = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=decay_mask)
    else:
        core = {
            "adam": lambda: optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
            "sgd": lambda: optax.sgd(lr, momentum=cfg.momentum or None),
            "adafactor": lambda: optax.adafactor(lr),
            "rmsprop": lambda: optax.rmsprop(lr, eps=cfg.eps, momentum=cfg.momentum),
            "adagrad": lambda: optax.adagrad(lr, eps=cfg.eps),
        }[cfg.name]()
        if wd:
            # Decay added to the gradient (L2), as torch's weight_decay does for these optimizers.
            core = optax.chain(optax.add_decayed_weights(wd, mask=decay_mask), core)
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    if start_steps is not None and any(s > 0 for s in jax.tree.leaves(start_steps)):
        return optax.chain(hold_until(start_steps), *parts, core, hold_until(start_steps))
    return optax.chain(*parts, core)
