"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): small trained MLPs inside a frozen model.

An adapter maps a sublayer's output h to h + up(act(down(h))), with down [hidden, bottleneck] and
up [bottleneck, hidden]. Houlsby puts one after the attention sublayer and one after the MLP sublayer
of every block, before the residual add; Pfeiffer keeps only the one after the MLP, half the parameters
for about the same quality (Pfeiffer et al. 2020, section 2).

`apply_adapters` wraps the last projection of each sublayer (`self_attn.o_proj`, `mlp.down_proj`) in an
`AdaptedOutput`, as LoRA wraps its targets, so the model code never knows about adapters: a sublayer's
output *is* its last projection's output, so adapting that output is adapting the sublayer.

The up projection starts at zero (weights and bias), so every adapter is exactly the identity at step 0
and the adapted model's logits equal the base model's bitwise. Houlsby's "near-identity" init draws both
projections with a small std; zeroing the up one makes step 0 exact and still lets training start, since
the up projection's gradient act(down(h)) is non-zero while the down one is random.

Adapters are non-linear, so unlike LoRA they cannot be merged into the base weights.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxft.errors import AdapterError, ConfigError
from jaxft.models import layout, stack
from jaxft.peft.select import TrainableFilter, path_str, set_module

# The sublayers each kind adapts (their output projections are named by the model's layout).
KINDS = {"houlsby": ("attention", "mlp"), "pfeiffer": ("mlp",)}

# GELU is the exact (erf) form, as torch's nn.GELU() and AdapterHub's "gelu" compute it.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}

# Houlsby et al. draw adapter weights with std 1e-2 ("near-identity initialisation").
_DOWN_INIT_STD = 1e-2


class BottleneckAdapter(nnx.Module):
    """h + up(act(down(h))): parameters float32, computed in h's dtype.

    down_kernel [hidden, bottleneck] random with a small std, up_kernel [bottleneck, hidden] and both
    biases zero, so the adapter is exactly the identity until the up projection trains.
    """

    def __init__(self, hidden: int, bottleneck: int, *, activation: str = "relu", rngs: nnx.Rngs,
                 stacked: dict | None = None, names: list[str] | None = None):
        """`stacked` (`stack.stacked_like` of the wrapped layer's weight): one adapter per layer of stacked
        decoder blocks, with a leading layer axis; layer i's down projection is drawn from `names[i]`."""
        _check_activation(activation)
        stacked = stacked or {}
        self.activation = activation
        lead = (len(stacked["layer_ids"]),) if stacked else ()
        names = names or [str(i) for i in range(lead[0] if lead else 1)]
        normal = lambda key, shape, dtype: _DOWN_INIT_STD * jax.random.normal(key, shape, dtype)  # noqa: E731
        init = stack.init_per_layer(normal, rngs.params(), names, (hidden, bottleneck), jnp.float32, stacked)
        meta = functools.partial(stack.with_layer_axis, stacked=stacked)
        self.down_kernel = nnx.Param(init, **meta(("embed", None)))
        self.down_bias = nnx.Param(jnp.zeros(lead + (bottleneck,), jnp.float32), **meta((None,)))
        self.up_kernel = nnx.Param(jnp.zeros(lead + (bottleneck, hidden), jnp.float32), **meta((None, "embed")))
        self.up_bias = nnx.Param(jnp.zeros(lead + (hidden,), jnp.float32), **meta(("embed",)))

    def __call__(self, h):
        dtype = h.dtype
        z = h @ self.down_kernel[...].astype(dtype) + self.down_bias[...].astype(dtype)
        z = ACTIVATIONS[self.activation](z)
        return h + (z @ self.up_kernel[...].astype(dtype) + self.up_bias[...].astype(dtype))


class AdaptedOutput(nnx.Module):
    """A projection whose output goes through a bottleneck adapter: y = adapter(base_layer(x))."""

    def __init__(self, base_layer: nnx.Module, *, hidden: int, bottleneck: int, activation: str, rngs: nnx.Rngs,
                 names: list[str] | None = None):
        self.base_layer = base_layer
        weight = base_layer.kernel if hasattr(base_layer, "kernel") else base_layer.codes
        self.adapter = BottleneckAdapter(hidden, bottleneck, activation=activation, rngs=rngs,
                                         stacked=stack.stacked_like(weight), names=names)

    def __call__(self, x):
        return self.adapter(self.base_layer(x))


def apply_adapters(model: nnx.Module, kind: str = "houlsby", bottleneck: int = 64, activation: str = "relu", *,
                   rngs: nnx.Rngs) -> list[str]:
    """Wrap each block's attention and/or MLP output projection in an adapter, in place.

    `kind` "houlsby": after attention and after the MLP in every block; "pfeiffer": after the MLP only.
    Returns the wrapped module paths ('model.layers.0.self_attn.o_proj', ...). Everything is checked
    before the model is touched, so an error leaves it as it was.
    """
    if kind not in KINDS:
        raise ConfigError(f"peft.adapter_kind={kind!r} is not an adapter kind; valid: {', '.join(KINDS)}.")
    _check_activation(activation)
    hidden = model.config.hidden_size
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or not 1 <= bottleneck <= hidden:
        raise AdapterError(f"peft.adapter_size={bottleneck!r} must be an integer from 1 to the model's hidden size "
                           f"({hidden}); an adapter narrows the hidden state, it does not widen it.")
    if adapter_modules(model):
        raise AdapterError("This model already has adapters; apply_adapters adds them to a plain model only.")
    names = layout.of(model)
    outputs = [{"attention": names.attention_output, "mlp": names.mlp_output}[part] for part in KINDS[kind]]
    chosen = [(name, module) for name, module in _named_modules(model)
              if (names.block_of(name) or (0, None))[1] in outputs]
    if not chosen:
        raise AdapterError(f"{kind} adapters go after {' and '.join(outputs)} in each block; "
                           f"this model has no such module.")
    key, names = rngs.params(), []
    for name, module in chosen:
        layer_names = _layer_names(name, module)
        wrapped = AdaptedOutput(module, hidden=hidden, bottleneck=bottleneck, activation=activation,
                                rngs=nnx.Rngs(params=key), names=layer_names)
        set_module(model, name, wrapped)
        names.extend(layer_names)
    return names


def _layer_names(name: str, module) -> list[str]:
    """The per-layer names of the (possibly stacked) module at dotted path `name`."""
    weight = module.kernel if hasattr(module, "kernel") else module.codes
    return stack.layer_names(name.split("."), weight)


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ConfigError(f"peft.adapter_activation={activation!r} is not supported; "
                          f"valid: {', '.join(ACTIVATIONS)}.")


def _named_modules(model):
    # Listed before any wrapping: the graph must not change while NNX walks it.
    return [(path_str(path), m) for path, m in nnx.iter_modules(model)]


def adapter_modules(model: nnx.Module) -> dict[str, AdaptedOutput]:
    """Every `AdaptedOutput` by dotted path ('model.layers.0.mlp.down_proj')."""
    return {path_str(path): m for path, m in nnx.iter_modules(model) if isinstance(m, AdaptedOutput)}


def trainable_filter() -> TrainableFilter:
    """Adapters train their own projections and nothing else; the base model stays frozen."""
    return TrainableFilter(((r".*\.adapter\.(down|up)_(kernel|bias)", True), (r".*", False)))


def save_adapters(model: nnx.Module, directory, *, kind: str, bottleneck: int, activation: str,
                  base_model: str | None = None) -> pathlib.Path:
    """Write the adapters as `adapter_model.safetensors` + `adapter_config.json` under `directory`.

    PEFT has no bottleneck adapters, so the format is jaxft's own, in PEFT's file layout:
    tensors named `<module path>.adapter.<down|up>_<kernel|bias>` in jaxft's [in, out]
    layout, float32, and a config naming the kind, size, activation and modules.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, modules = {}, []
    for name, module in adapter_modules(model).items():
        layer_names = _layer_names(name, module.base_layer)
        modules.extend(layer_names)
        for part in ("down_kernel", "down_bias", "up_kernel", "up_bias"):
            value = np.asarray(getattr(module.adapter, part)[...], np.float32)
            stacked = stack.layer_ids(getattr(module.adapter, part)) is not None
            for j, layer_name in enumerate(layer_names):  # each layer's slice under its own name
                tensors[f"{layer_name}.adapter.{part}"] = np.ascontiguousarray(value[j] if stacked else value)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "jaxft"})
    config = dict(adapter_type="BOTTLENECK", library="jaxft", kind=kind, bottleneck=bottleneck,
                  activation=activation, base_model_name_or_path=base_model, modules=sorted(modules))
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_adapters(model: nnx.Module, directory) -> list[str]:
    """Give `model` the bottleneck adapters `save_adapters` wrote to `directory`, in place; returns the wrapped
    per-layer module names. AdapterError names what does not fit (another base, another kind, missing tensors)."""
    directory = pathlib.Path(directory)
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
        tensors = load_file(str(directory / "adapter_model.safetensors"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{directory} holds no readable jaxft adapter (adapter_config.json + "
                           f"adapter_model.safetensors): {e}") from None
    if config.get("adapter_type") != "BOTTLENECK":
        raise AdapterError(f"{directory} holds a {config.get('peft_type') or config.get('adapter_type')!r} adapter, "
                           "not jaxft's bottleneck adapters.")
    names = apply_adapters(model, config["kind"], config["bottleneck"], config["activation"], rngs=nnx.Rngs(0))
    if sorted(names) != sorted(config["modules"]):
        raise AdapterError(f"{directory}: the adapters are for modules {sorted(config['modules'])[:4]}..., this model "
                           f"has {sorted(names)[:4]}... ({len(config['modules'])} against {len(names)}): another base.")
    for name, module in adapter_modules(model).items():
        layer_names = _layer_names(name, module.base_layer)
        for part in ("down_kernel", "down_bias", "up_kernel", "up_bias"):
            variable = getattr(module.adapter, part)
            slices = [tensors.get(f"{layer_name}.adapter.{part}") for layer_name in layer_names]
            if any(s is None for s in slices):
                raise AdapterError(f"{directory}: no tensor for {layer_names[0]}.adapter.{part}")
            value = np.stack(slices) if stack.layer_ids(variable) is not None else slices[0]
            if value.shape != variable.get_value().shape:
                raise AdapterError(f"{directory}: {layer_names[0]}.adapter.{part} has shape {value.shape[-2:]}, "
                                   f"this model needs {variable.get_value().shape[-2:]}: another base.")
            variable.set_value(jnp.asarray(value, variable.get_value().dtype))
    return names
