"""The key/value cache a decoder fills while it generates (jaxft/generate/decode.py).

Every layer's keys and values for `slots` positions per row, allocated once, laid out like the
model's stacked blocks (one `[layers, B, kv_heads, slots, head_dim]` array per group of
`model.model.layers`, so a scan over a group reads and rewrites its layers' slices). A forward
pass writes its tokens at slots `[index, index + T)` and attends over every slot written so far
that holds a real token: prompts are left-padded, so their padding slots stay invisible, and
causal order is slot order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxft.models import stack
from jaxft.sharding import constrain

# [layers, batch, kv_heads, slots, head_dim] (names in jaxft/sharding.py RULES): heads before slots, the layout
# attention's dots read (attention.cached_attention); with slots before heads XLA copied every layer's cache to
# transpose it, every token.
CACHE_AXES = ("layers", "batch", "kv_heads", None, None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    keys: list  # per group of layers: [layers, B, K, slots, D]
    values: list
    valid: jax.Array  # [B, slots] bool: the slot holds a token that may be attended to
    index: jax.Array  # int32 scalar: the next slot to write

    @classmethod
    def empty(cls, model, batch: int, slots: int) -> "KVCache":
        """Zeroed keys and values for `model`'s layer groups, in its compute dtype; no slot valid."""
        cfg = model.config
        keys = []
        for group in stack.block_groups(model):
            shape = (len(stack.group_ids(group)), batch, cfg.num_kv_heads, slots, cfg.head_dim)
            keys.append(constrain(jnp.zeros(shape, cfg.dtype), CACHE_AXES))
        return cls(keys=keys, values=[jnp.zeros_like(k) for k in keys], valid=jnp.zeros((batch, slots), bool),
                   index=jnp.zeros((), jnp.int32))

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    def admit(self, new_valid) -> "KVCache":
        """The cache with the next `T` slots marked by `new_valid` `[B, T]` (True: a real token)."""
        valid = jax.lax.dynamic_update_slice(self.valid, new_valid.astype(bool), (0, self.index))
        return dataclasses.replace(self, valid=valid)

    def advanced(self, t: int, keys: list, values: list) -> "KVCache":
        """The cache after a pass wrote `t` tokens into `keys`/`values`."""
        return dataclasses.replace(self, keys=keys, values=values, index=self.index + t)

    def visibility_masks(self, t: int, windows: tuple) -> tuple:
        """One boolean `[B, 1, t, slots]` mask per sliding window in `windows` (None: full attention) for
        queries at slots `[index, index + t)`: earlier or same slots that hold a token, within the window
        (key slot > query slot - window, as HF counts it)."""
        queries = self.index + jnp.arange(t)[:, None]
        keys = jnp.arange(self.slots)[None, :]
        seen = (keys <= queries)[None] & self.valid[:, None, :]
        return tuple((seen if w is None else seen & (keys > queries - w)[None])[:, None] for w in windows)


def write(keys, values, k, v, index):
    """One layer's cache `[B, K, slots, D]` with `k`, `v` `[B, T, K, D]` written at slots `[index, index+T)`."""
    start = (0, 0, index, 0)
    return (jax.lax.dynamic_update_slice(keys, jnp.swapaxes(k, 1, 2).astype(keys.dtype), start),
            jax.lax.dynamic_update_slice(values, jnp.swapaxes(v, 1, 2).astype(values.dtype), start))
