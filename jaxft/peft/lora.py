"""LoRA: a frozen linear layer plus a trainable low-rank update, y = x W + s (x A) B.

`apply_lora` replaces the targeted `Linear` modules of a model with `LoRALinear`
wrappers (as PEFT wraps `base_layer`), so the model code never knows about LoRA.
A starts random and B at zero, so step-0 outputs equal the base model's exactly.
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft.errors import AdapterError
from jaxft.models.layers import Linear
from jaxft.peft.select import TrainableFilter, path_str

# Module names never adapted by "all-linear", as in PEFT: the output head.
_OUTPUT_LAYERS = ("lm_head",)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "all-linear"  # "all-linear" | "q_proj,v_proj" | "re:<regex over module paths>"
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        """alpha/rank, or alpha/sqrt(rank) for rank-stabilised LoRA (rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class DropoutKey(nnx.Variable):
    """The PRNG key an adapter's dropout draws from. The training step writes a fresh one per
    step into the state before merging (`with_dropout_keys`), so nothing mutates RNG state
    inside the traced step (NNX forbids that under `lax.scan` + `grad`)."""


def with_dropout_keys(state, key):
    """`state` with every DropoutKey replaced by its own key folded from `key`."""
    flat = dict(nnx.to_flat_state(state))
    keyed = [p for p, v in flat.items() if isinstance(v, DropoutKey)]
    for i, path in enumerate(keyed):
        flat[path] = flat[path].replace(value=jax.random.fold_in(key, i))
    return nnx.from_flat_state(flat) if keyed else state


class LoRALinear(nnx.Module):
    """A `Linear` with a low-rank update: lora_a [in, r], lora_b [r, out], both float32."""

    def __init__(self, base_layer: Linear, *, rank: int, scale: float, dropout: float, rngs: nnx.Rngs):
        # `rngs` only initialises A; dropout keys come from the training step.
        self.base_layer = base_layer
        self.scale = scale
        # PEFT's default: kaiming-uniform(a=sqrt(5)) for A, which is U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(base_layer.in_features)
        self.lora_a = nnx.Param(
            jax.random.uniform(rngs.params(), (base_layer.in_features, rank), jnp.float32, -bound, bound))
        self.lora_b = nnx.Param(jnp.zeros((rank, base_layer.out_features), jnp.float32))
        self.dropout = nnx.Dropout(dropout) if dropout > 0 else None
        self.dropout_key = DropoutKey(jax.random.key(0)) if dropout > 0 else None

    def __call__(self, x):
        y = self.base_layer(x)
        h = x if self.dropout is None else self.dropout(x, rngs=self.dropout_key.get_value())
        dtype = y.dtype
        # On 2-D rows: XLA's CPU backward of the skinny [.., in] @ [in, r] products is
        # ~1.7x slower with the batch and sequence axes kept apart (bench/README.md).
        rows = h.reshape(-1, h.shape[-1]).astype(dtype)
        update = (rows @ self.lora_a.get_value().astype(dtype)) @ self.lora_b.get_value().astype(dtype)
        return y + (self.scale * update).astype(dtype).reshape(y.shape)

    def merged_kernel(self):
        """W + s A B in the base kernel's dtype: what `merge` writes and merged export saves."""
        kernel = self.base_layer.kernel.get_value()
        delta = self.scale * (self.lora_a.get_value() @ self.lora_b.get_value())
        return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def linear_modules(model: nnx.Module) -> dict[str, Linear]:
    """Every plain `Linear` in the model by dotted path ('model.layers.0.self_attn.q_proj')."""
    return {path_str(path): m for path, m in nnx.iter_modules(model) if type(m) is Linear}


def select_targets(names: list[str], targets: str) -> list[str]:
    """The module paths that `targets` names, in PEFT's sense; AdapterError if none."""
    if targets == "all-linear":
        chosen = [n for n in names if n.split(".")[-1] not in _OUTPUT_LAYERS]
    elif targets.startswith("re:"):
        try:
            pattern = re.compile(targets[3:])
        except re.error as e:
            raise AdapterError(f"peft.targets regex {targets[3:]!r} is invalid: {e}") from e
        chosen = [n for n in names if pattern.fullmatch(n)]
    else:
        wanted = {t.strip() for t in targets.split(",") if t.strip()}
        chosen = [n for n in names if n.split(".")[-1] in wanted]
        missing = wanted - {n.split(".")[-1] for n in chosen}
        if missing:
            raise AdapterError(f"peft.targets names {sorted(missing)}, which the model does not have; "
                               f"its linear modules are {_leaf_names(names)}.")
    if not chosen:
        raise AdapterError(f"peft.targets={targets!r} matches no linear module; the model's linear modules are "
                           f"{_leaf_names(names)} (e.g. '{names[0] if names else ''}').")
    return chosen


def _leaf_names(names):
    return sorted({n.split(".")[-1] for n in names})


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Wrap the targeted linears in place; returns the wrapped module paths."""
    modules = linear_modules(model)
    chosen = select_targets(list(modules), config.targets)
    for name in chosen:
        base = modules[name]
        if config.rank > min(base.in_features, base.out_features):
            raise AdapterError(f"peft.rank={config.rank} exceeds layer '{name}' "
                               f"({base.in_features} -> {base.out_features}); use a rank <= "
                               f"{min(base.in_features, base.out_features)}.")
        wrapped = LoRALinear(base, rank=config.rank, scale=config.scale, dropout=config.dropout, rngs=rngs)
        _set_module(model, name, wrapped)
    return chosen


def _set_module(model, dotted: str, new):
    *parents, last = dotted.split(".")
    node = model
    for p in parents:
        node = node[int(p)] if p.isdigit() else getattr(node, p)
    if last.isdigit():
        node[int(last)] = new
    else:
        setattr(node, last, new)


def lora_modules(model: nnx.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` by dotted path."""
    return {path_str(path): m for path, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)}


def trainable_filter() -> TrainableFilter:
    """LoRA trains its A and B matrices and nothing else."""
    return TrainableFilter(((r".*\.lora_[ab]", True), (r".*", False)))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel (W + s A B) and unwrap it, in place."""
    for name, module in lora_modules(model).items():
        base = module.base_layer
        base.kernel.set_value(module.merged_kernel())
        _set_module(model, name, base)
    return model
