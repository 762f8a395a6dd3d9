"""The one trainable filter.

A list of `(regex, trainable)` rules over parameter paths, first match wins, and
every parameter must match one. It is the only source for what is
differentiated, what the optimizer holds state for, what a checkpoint saves and
what export writes. Only `nnx.Param` variables can be trainable; RNG state and
other variables never are.

Rules match per-layer names ('model.layers.3.mlp.up_proj.kernel'), also for the
decoder blocks' stacked parameters (jaxft/models/stack.py), which hold every layer
of a group in one array: a group must be uniform (all its layers trainable or all
frozen), which `uniform_groups` arranges by splitting groups where a rule changes.
"""

import dataclasses
import re

import numpy as np
from flax import nnx

from jaxft.errors import ConfigError
from jaxft.models import layout, stack


def path_str(path) -> str:
    """An NNX state path as a dotted, HF-style name: ('model', 'layers', 0, 'mlp') -> 'model.layers.0.mlp'."""
    return ".".join(str(p) for p in path)


def get_module(model, dotted: str):
    """The submodule at a dotted path ('model.layers.0.mlp.down_proj'; '' is the model itself)."""
    node = model
    for p in filter(None, dotted.split(".")):
        node = node[int(p)] if p.isdigit() else getattr(node, p)
    return node


def set_module(model, dotted: str, new) -> None:
    """Replace the submodule at a dotted path ('model.layers.0.mlp.down_proj') with `new`, in place."""
    parent, _, last = dotted.rpartition(".")
    node = get_module(model, parent)
    if last.isdigit():
        node[int(last)] = new
    else:
        setattr(node, last, new)


@dataclasses.dataclass(frozen=True)
class TrainableFilter:
    """Ordered `(regex, trainable)` rules, matched with `re.fullmatch` against dotted parameter paths."""

    rules: tuple[tuple[str, bool], ...]

    def __post_init__(self):
        for pattern, _ in self.rules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"Trainable-parameter pattern {pattern!r} is not a valid regex: {e}") from e

    def rule_for(self, name: str) -> int:
        """Index of the first rule matching `name`; ConfigError if none does."""
        for i, (pattern, _) in enumerate(self.rules):
            if re.fullmatch(pattern, name):
                return i
        raise ConfigError(
            f"Parameter '{name}' matches none of the trainable/frozen patterns "
            f"{[p for p, _ in self.rules]}; every parameter must be covered (end with '.*')."
        )

    def is_trainable(self, name: str) -> bool:
        return self.rules[self.rule_for(name)][1]

    def __call__(self, path, variable) -> bool:
        """The NNX filter: True for parameters that train (a stacked one: all its layers, or none of them)."""
        if not isinstance(variable, nnx.Param):
            return False
        names = stack.layer_names(path, variable)
        verdicts = {self.is_trainable(n) for n in names}
        if len(verdicts) > 1:
            raise ConfigError(f"The trainable patterns train some layers of the stacked parameter "
                              f"{path_str(path)} and freeze others ({names[0]} ... {names[-1]}); split its group "
                              f"first (jaxft.peft.select.uniform_groups).")
        return verdicts.pop()


def split_model(model: nnx.Module, trainable: TrainableFilter):
    """`graphdef, trainable_params, rest`: the model cut along the filter."""
    return nnx.split(model, trainable, ...)


def uniform_groups(model: nnx.Module, trainable: TrainableFilter, start_step=None) -> bool:
    """Split the model's stacked decoder blocks wherever a layer's parameters train differently from its
    neighbour's (or, with gradual unfreezing, start training at another step): afterwards the filter (and
    `start_step(name)`) give one answer per stacked parameter. True if a group was split."""
    per_layer: dict[int, list] = {}
    names = layout.of(model)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        ids = stack.layer_ids(variable)
        if ids is None:
            continue
        for i, name in zip(ids, stack.layer_names(path, variable)):
            rest = names.block_of(name)[1]  # the name within the block: the same in every block
            per_layer.setdefault(i, []).append((rest, trainable.is_trainable(name),
                                                start_step(name) if start_step else 0))
    return stack.regroup_model(model, lambda i: tuple(sorted(per_layer.get(i, []))))


def parameter_table(model: nnx.Module, trainable: TrainableFilter) -> list[dict]:
    """One row per rule: pattern, whether it trains, tensors and parameters it matched (per layer, also in
    stacked decoder blocks)."""
    rows = [dict(pattern=p, trainable=t, tensors=0, params=0) for p, t in trainable.rules]
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = stack.layer_names(path, variable)
        size = int(np.prod(variable.get_value().shape)) // len(names)
        for name in names:
            row = rows[trainable.rule_for(name)]
            row["tensors"] += 1
            row["params"] += size
    return rows


def parameter_summary(method: str, rows: list[dict], state: dict, frozen, quantized_params: int = 0) -> dict:
    """What a run trains and what it holds (`<workdir>/parameters.json`): parameter counts from the table plus
    `quantized_params`, the weights a QLoRA base keeps quantised (they are not `nnx.Param`s, so the table has
    none of them), and the bytes of the trained parameters, their optimizer state and the frozen weights as
    stored (a quantised base counts its codes and scales), over all devices."""
    import jax
    nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))  # noqa: E731
    total = sum(r["params"] for r in rows) + quantized_params
    trained = sum(r["params"] for r in rows if r["trainable"])
    return dict(method=method, trainable=trained, total=total, trainable_fraction=trained / max(total, 1),
                bytes=dict(trainable=nbytes(state["params"]), optimizer_state=nbytes(state["opt_state"]),
                           frozen=nbytes(frozen)),
                rules=rows)


def format_parameter_table(rows: list[dict]) -> str:
    """The table the run logs, with trainable/total counts at the bottom."""
    width = max(len(r["pattern"]) for r in rows)
    lines = [f"{'pattern':<{width}}  {'trains':>6}  {'tensors':>7}  {'params':>12}"]
    for r in rows:
        lines.append(f"{r['pattern']:<{width}}  {'yes' if r['trainable'] else 'no':>6}  "
                     f"{r['tensors']:>7}  {r['params']:>12,}")
    total = sum(r["params"] for r in rows)
    trained = sum(r["params"] for r in rows if r["trainable"])
    lines.append(f"trainable {trained:,} of {total:,} parameters ({100 * trained / max(total, 1):.4f}%)")
    return "\n".join(lines)
