"""LoRA: a frozen linear layer plus a trainable low-rank update, y = x W + s (x A) B.

`apply_lora` replaces the targeted `Linear` modules of a model with `LoRALinear`
wrappers (as PEFT wraps `base_layer`), so the model code never knows about LoRA.
A starts random and B at zero, so step-0 outputs equal the base model's exactly.
"""

import dataclasses
import functools
import logging
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import sharding
from jaxft.errors import AdapterError
from jaxft.kernels.lora_matmul import lora_matmul, use_pallas
from jaxft.models import layout, stack
from jaxft.models.layers import Linear
from jaxft.peft.quant import QuantizedLinear
from jaxft.peft.select import TrainableFilter, path_str, set_module

log = logging.getLogger("jaxft")

# Module names never adapted by "all-linear", as in PEFT: the output head, and a classifier's head (which
# trains whole, PEFT's modules_to_save; `lora_candidates` keeps every part of one out, whatever it is called).
_OUTPUT_LAYERS = ("lm_head", "score")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "all-linear"  # "all-linear" | "q_proj,v_proj" | "re:<regex over module paths>"
    use_rslora: bool = False
    use_dora: bool = False  # weight-decomposed LoRA: a trained magnitude per output feature
    kernel: str = "auto"  # the fused Pallas matmul (jaxft/kernels/lora_matmul.py): "auto" | "pallas" | "xla"

    @property
    def scale(self) -> float:
        """alpha/rank, or alpha/sqrt(rank) for rank-stabilised LoRA (rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class DropoutKey(nnx.Variable):
    """The PRNG key an adapter's dropout draws from. The training step writes a fresh one per
    step into the state before merging (`with_dropout_keys`), so nothing mutates RNG state
    inside the traced step (NNX forbids that under `lax.scan` + `grad`)."""


def with_dropout_keys(state, key):
    """`state` with every DropoutKey replaced by its own key folded from `key` (one per layer of a stacked one)."""
    flat = dict(nnx.to_flat_state(state))
    keyed = [p for p, v in flat.items() if isinstance(v, DropoutKey)]
    for i, path in enumerate(keyed):
        own = jax.random.fold_in(key, i)
        layers = stack.stack_shape(flat[path])
        flat[path] = flat[path].replace(value=jax.random.split(own, layers) if layers else own)
    return nnx.from_flat_state(flat) if keyed else state


class LoRALinear(nnx.Module):
    """A `Linear` with a low-rank update: lora_a [in, r], lora_b [r, out], both float32.

    With `use_dora` (DoRA, Liu et al. 2024, as PEFT computes it) the adapted weight
    W + s A B is also renormalised per output feature to a trained magnitude m,
    initialised to the base weight's norms so step 0 is still the base model:
    y = m / ||W + s A B|| * (x W + s x A B) + bias, the norm held constant in the
    backward pass (the paper's section 4.3).
    """

    def __init__(self, base_layer: Linear, *, rank: int, scale: float, dropout: float, rngs: nnx.Rngs,
                 use_dora: bool = False, kernel: str = "auto", names: list[str] | None = None):
        # `rngs` only initialises A; dropout keys come from the training step. A base inside stacked
        # decoder blocks (jaxft/models/stack.py) has a leading layer axis; so do A, B and the rest here,
        # and layer i's A is drawn from `rngs` and `names[i]` (its module name) alone.
        self.base_layer = base_layer
        self.scale = scale
        self.matmul = kernel  # "auto" | "pallas" | "xla": see `_fused`
        stacked = stack.stacked_like(_weight_variable(base_layer))
        layers = len(stacked.get("layer_ids", ()))
        names = names or [str(i) for i in range(max(layers, 1))]
        # PEFT's default: kaiming-uniform(a=sqrt(5)) for A, which is U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(base_layer.in_features)
        uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
        # A and B are sharded like the base kernel on the dimension they share with it; the rank
        # dimension is small and stays whole.
        in_axis, out_axis = kernel_axes(base_layer)
        lead = (layers,) if stacked else ()
        self.lora_a = nnx.Param(
            stack.init_per_layer(uniform, rngs.params(), names, (base_layer.in_features, rank), jnp.float32, stacked),
            **stack.with_layer_axis((in_axis, None), stacked))
        self.lora_b = nnx.Param(jnp.zeros(lead + (rank, base_layer.out_features), jnp.float32),
                                **stack.with_layer_axis((None, out_axis), stacked))
        self.lora_magnitude = (nnx.Param(column_norms(base_kernel(base_layer)),
                                         **stack.with_layer_axis((out_axis,), stacked)) if use_dora else None)
        self.dropout = nnx.Dropout(dropout) if dropout > 0 else None
        key = jax.random.key(0)
        self.dropout_key = (DropoutKey(jax.random.split(key, layers) if stacked else key, **stacked)
                            if dropout > 0 else None)
        self.merged_gain = nnx.data(None)  # set while merged (see merge): what unmerge divides DoRA's weight by

    def __call__(self, x):
        if self.merged_gain is None and self._fused():
            return self._fused_call(x)
        y = self.base_layer(x)
        if self.merged_gain is not None:  # the update is inside the base kernel
            return y
        h = x if self.dropout is None else self.dropout(x, rngs=self.dropout_key.get_value())
        dtype = y.dtype
        # On 2-D rows: XLA's CPU backward of the skinny [.., in] @ [in, r] products is
        # ~1.7x slower with the batch and sequence axes kept apart (bench/README.md).
        rows = h.reshape(-1, h.shape[-1]).astype(dtype)
        update = (rows @ self.lora_a.get_value().astype(dtype)) @ self.lora_b.get_value().astype(dtype)
        update = (self.scale * update).astype(dtype).reshape(y.shape)
        if self.lora_magnitude is None:
            return y + update
        # PEFT's form: base(x) + (g - 1) * (h W) + g * s (h A B), with g = m / ||W + s A B||.
        g = self.dora_gain().astype(dtype)
        h_w = y if self.dropout is None else self.base_layer(h)
        if self.base_layer.bias is not None:
            h_w = h_w - self.base_layer.bias.get_value().astype(dtype)
        return y + (g - 1) * h_w + g * update

    def _fused(self) -> bool:
        """Whether the Pallas kernel computes x W + s x A B here: plain LoRA (no DoRA, no dropout: the
        kernel reads one x for both terms) on a float base or an int8 one (dequantised in the kernel)."""
        base = self.base_layer
        int8 = isinstance(base, QuantizedLinear) and base.kind == "int8"
        plain = self.lora_magnitude is None and self.dropout is None and (type(base) is Linear or int8)
        return plain and use_pallas(self.matmul)

    def _fused_call(self, x):
        base, dtype = self.base_layer, self.base_layer.dtype
        rows = x.reshape(-1, x.shape[-1]).astype(dtype)
        if isinstance(base, QuantizedLinear):
            kernel, w_scale = base.codes.get_value(), base.scales.get_value()
        else:
            kernel, w_scale = base.kernel.get_value().astype(dtype), None
        fused = functools.partial(lora_matmul, scale=self.scale, kernel=self.matmul)
        mesh = sharding.active_mesh()
        if mesh is None:
            y = fused(rows, kernel, self.lora_a.get_value(), self.lora_b.get_value(), w_scale=w_scale)
        else:
            y = _fused_on_mesh(fused, mesh, rows, kernel, w_scale, self.lora_a.get_value(), self.lora_b.get_value(),
                               kernel_axes(base))
        if base.bias is not None:
            y = y + base.bias.get_value().astype(dtype)
        return y.reshape(*x.shape[:-1], base.out_features)

    def delta(self):
        """s A B, float32 [in, out]."""
        return self.scale * (self.lora_a.get_value() @ self.lora_b.get_value())

    def dora_gain(self):
        """m / ||W + s A B|| per output feature, the norm a constant for gradients (DoRA section 4.3)."""
        norm = column_norms(base_kernel(self.base_layer).astype(jnp.float32) + self.delta())
        return self.lora_magnitude.get_value() / jax.lax.stop_gradient(norm)  # [..., out]

    def merged_kernel(self):
        """The adapted weight in the base kernel's dtype: W + s A B, or for DoRA g (W + s A B)."""
        kernel = base_kernel(self.base_layer)
        merged = kernel.astype(jnp.float32) + self.delta()
        if self.lora_magnitude is not None:
            merged = merged * self.dora_gain()[..., None, :]
        return merged.astype(kernel.dtype)


    def merge(self) -> None:
        """Write the adapted weight into the base kernel; the forward pass then skips the update."""
        if self.merged_gain is not None:
            raise AdapterError("This LoRA layer is already merged; unmerge it first.")
        if not hasattr(self.base_layer, "kernel"):
            raise AdapterError("A quantised base (QLoRA) cannot hold the merged weight in place; merge_lora "
                               "builds float layers for export.")
        kernel = self.merged_kernel()
        gain = (self.dora_gain() if self.lora_magnitude is not None
                else jnp.ones(kernel.shape[:-2] + (self.base_layer.out_features,)))
        self.base_layer.kernel.set_value(kernel)
        self.merged_gain = nnx.data(MergedGain(gain, **stack.stacked_like(self.base_layer.kernel)))

    def unmerge(self) -> None:
        """Restore the base kernel: W = W' / g - s A B (g = 1 for LoRA); exact up to rounding."""
        if self.merged_gain is None:
            raise AdapterError("This LoRA layer is not merged.")
        kernel = self.base_layer.kernel.get_value()
        restored = kernel.astype(jnp.float32) / self.merged_gain.get_value()[..., None, :] - self.delta()
        self.base_layer.kernel.set_value(restored.astype(kernel.dtype))
        self.merged_gain = nnx.data(None)


def _fused_on_mesh(fused, mesh, rows, kernel, w_scale, a, b, axes):
    """The kernel on each device's local blocks (shard_map), the layout chosen by where the rules put
    'tensor' on the kernel: column-parallel (output split) needs no reduction; row-parallel (input split)
    sums the partial y = x_l W_l + s (x_l A_l) B over 'tensor', which is exact because the low-rank term
    is linear in x A. FSDP's split of the weights is gathered before the call, as FSDP does anyway."""
    spec = sharding.spec_for(axes, kernel.shape, mesh)
    split = lambda entry: "tensor" if entry == "tensor" or (isinstance(entry, tuple) and "tensor" in entry) else None  # noqa: E731
    rows_axis, in_split, out_split = sharding.BATCH_AXES, split(spec[0]), split(spec[1])
    P = jax.sharding.PartitionSpec

    def local(x, w, a, b, *w_scale):
        y = fused(x, w, a, b, w_scale=w_scale[0] if w_scale else None)
        return jax.lax.psum(y, "tensor") if in_split else y

    operands = (rows, kernel, a, b) + (() if w_scale is None else (w_scale,))
    specs = (P(rows_axis, in_split), P(in_split, out_split), P(in_split, None), P(None, out_split), P(out_split))
    return jax.shard_map(local, mesh=mesh, check_vma=False, in_specs=specs[:len(operands)],
                         out_specs=P(rows_axis, out_split))(*operands)


class MergedGain(nnx.Variable):
    """DoRA's per-feature gain at merge time (1 for LoRA): not trained, kept for unmerge."""


def base_kernel(layer):
    """The float kernel [in, out] of a Linear, or of a quantised one (dequantised)."""
    if hasattr(layer, "dequantized_kernel"):
        return layer.dequantized_kernel()
    return layer.kernel.get_value()


def kernel_axes(layer) -> tuple:
    """The logical axes (in, out) of one layer's kernel of a Linear, or of the float kernel a quantised one
    stands for (without the layer axis of stacked blocks)."""
    if not hasattr(layer, "kernel"):
        return tuple(layer.kernel_axes)
    axes = tuple(layer.kernel.get_metadata().get("logical_axes") or (None, None))
    return axes[-2:]


def _weight_variable(layer) -> nnx.Variable:
    """The variable holding a (possibly quantised) linear layer's weight: its stacking is the layer's."""
    return layer.kernel if hasattr(layer, "kernel") else layer.codes


def column_norms(kernel):
    """L2 norm of each output feature's weights: columns of an [..., in, out] kernel (rows of HF's [out, in])."""
    return jnp.linalg.norm(kernel.astype(jnp.float32), axis=-2)


def linear_modules(model: nnx.Module) -> dict[str, Linear | QuantizedLinear]:
    """Every plain or quantised (QLoRA) `Linear` in the model by dotted path ('model.layers.0.self_attn.q_proj';
    a module of stacked blocks is listed once, under its group's path)."""
    return {path_str(path): m for path, m in nnx.iter_modules(model) if type(m) in (Linear, QuantizedLinear)}


def per_layer_modules(model: nnx.Module) -> dict[str, tuple[str, int | None]]:
    """Per-layer module name ('model.layers.3.self_attn.q_proj') -> (the module's dotted path, the layer's
    position along its stacked axis, or None), for every linear module."""
    out = {}
    for path, module in linear_modules(model).items():
        for name, j in _layers_of(path, _weight_variable(module)):
            out[name] = (path, j)
    return out


def _layers_of(path: str, weight: nnx.Variable) -> list[tuple[str, int | None]]:
    """(per-layer module name, position along the stacked axis or None) of the module at `path`."""
    stacked = stack.layer_ids(weight) is not None
    return [(name, j if stacked else None) for j, name in enumerate(stack.layer_names(path.split("."), weight))]


def lora_candidates(model: nnx.Module) -> list[str]:
    """The per-layer linear module names LoRA may wrap: all but a sequence classifier's head (the layout's
    `classifier`: `score`, BERT's `classifier`, RoBERTa's `classifier.dense` and `classifier.out_proj`), which
    trains whole. PEFT leaves it alone too, even where "all-linear" lists its layers: a `modules_to_save` module
    gets no LoRA layer."""
    head = layout.of(model).classifier
    return [n for n in per_layer_modules(model) if n != head and not n.startswith(head + ".")]


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
    """Wrap the targeted linears in place; returns the wrapped per-layer module names.

    Targets are chosen among per-layer names ('model.layers.3.self_attn.q_proj'); where they cover some
    layers of a stacked group and not others, the group is split first (`stack.regroup`). Layer i's A
    depends only on `rngs` and its name, however the layers are grouped.
    """
    names = lora_candidates(model)
    chosen = set(select_targets(names, config.targets))
    chosen_in_block: dict[int, set[str]] = {}  # block index -> the chosen names within the block
    for block in filter(None, map(layout.of(model).block_of, chosen)):
        chosen_in_block.setdefault(block[0], set()).add(block[1])
    stack.regroup_model(model, lambda i: frozenset(chosen_in_block.get(i, ())))
    key = rngs.params()
    by_module: dict[str, list[str]] = {}
    for name, (module_path, _) in per_layer_modules(model).items():
        by_module.setdefault(module_path, []).append(name)
    modules, layers = linear_modules(model), []
    for module_path, layer_names in by_module.items():
        if not any(n in chosen for n in layer_names):
            continue
        base = modules[module_path]
        if config.rank > min(base.in_features, base.out_features):
            raise AdapterError(f"peft.rank={config.rank} exceeds layer '{layer_names[0]}' "
                               f"({base.in_features} -> {base.out_features}); use a rank <= "
                               f"{min(base.in_features, base.out_features)}.")
        wrapped = LoRALinear(base, rank=config.rank, scale=config.scale, dropout=config.dropout,
                             rngs=nnx.Rngs(params=key), use_dora=config.use_dora, kernel=config.kernel,
                             names=layer_names)
        set_module(model, module_path, wrapped)
        layers.append(wrapped)
    _report_kernel(layers, config.kernel)
    return [n for n in names if n in chosen]


def _report_kernel(layers: list, kernel: str) -> None:
    """Where the fused kernel runs, when it was asked for or chosen, and why not on the other layers."""
    if not use_pallas(kernel):
        return
    count = lambda layer: math.prod(stack.stack_shape(layer.lora_a))  # noqa: E731  (per layer of stacked blocks)
    fused, total = sum(count(layer) for layer in layers if layer._fused()), sum(count(layer) for layer in layers)
    log.info("peft.kernel=%s: the fused Pallas kernel computes %d of %d LoRA layers%s", kernel, fused, total,
             "" if fused == total else " (DoRA, LoRA dropout and NF4 bases keep XLA's ops)")
    if jax.default_backend() == "cpu":
        log.warning("peft.kernel=%s on CPU runs the kernel interpreted: right, but far slower than XLA (it is "
                    "there for tests). Use peft.kernel=auto (XLA on CPU).", kernel)


def lora_modules(model: nnx.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` by dotted path (a stacked one once, under its group's path)."""
    return {path_str(path): m for path, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)}


def lora_layers(model: nnx.Module) -> list[tuple[str, LoRALinear, int | None]]:
    """(per-layer module name, its `LoRALinear`, the layer's position along the stacked axis or None) for every
    adapted layer: the units PEFT files speak of ('model.layers.3.self_attn.q_proj')."""
    return [(name, module, j) for path, module in lora_modules(model).items()
            for name, j in _layers_of(path, module.lora_a)]


def trainable_filter() -> TrainableFilter:
    """LoRA trains its A and B matrices (and DoRA's magnitudes) and nothing else."""
    return TrainableFilter(((r".*\.lora_(a|b|magnitude)", True), (r".*", False)))


def merge(model: nnx.Module) -> nnx.Module:
    """Fold every LoRA/DoRA update into its base kernel in place, keeping the layers so `unmerge` can undo it."""
    for module in lora_modules(model).values():
        module.merge()
    return model


def unmerge(model: nnx.Module) -> nnx.Module:
    """Undo `merge`: the base kernels as they were, the updates applied in the forward pass again."""
    for module in lora_modules(model).values():
        module.unmerge()
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel and unwrap it, in place: a plain model for export."""
    for name, module in lora_modules(model).items():
        if hasattr(module.base_layer, "to_linear"):  # quantised base: a float layer with the merged weight
            set_module(model, name, module.base_layer.to_linear(module.merged_kernel()))
            continue
        if module.merged_gain is None:
            module.merge()
        set_module(model, name, module.base_layer)
    return model


def remove_lora(model: nnx.Module) -> nnx.Module:
    """Unwrap every LoRA/DoRA layer, in place, leaving the base as it was loaded (a merged update is taken back
    out first): the model another adapter can be applied to."""
    for name, module in lora_modules(model).items():
        if module.merged_gain is not None:
            module.unmerge()
        set_module(model, name, module.base_layer)
    return model
