"""BitFit (Ben Zaken et al. 2021): train only the bias terms of a pretrained model, freeze every weight.

No module is added: BitFit is a `TrainableFilter` (select.py) over the model as loaded. Norm scales are
weights, not biases, and stay frozen (their paths end in `.scale`, never `.bias`).

Most Llama-family models have no biases at all (Llama, Mistral, Qwen3); Qwen2 has them on the q, k and
v projections. A model without biases would train nothing, so that is refused with a clear error
instead of running a silent no-op.
"""

from flax import nnx

from jaxft.errors import AdapterError
from jaxft.models import stack
from jaxft.peft.select import TrainableFilter

_BIAS = r".*\.bias"


def bias_parameters(model: nnx.Module) -> list[str]:
    """The dotted paths of every bias parameter in the model ('model.layers.0.self_attn.q_proj.bias')."""
    return [name for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)) if path[-1] == "bias"
            for name in stack.layer_names(path, variable)]


def bitfit_filter(model: nnx.Module) -> TrainableFilter:
    """The filter that trains every bias and nothing else; AdapterError if the model has no bias."""
    if not bias_parameters(model):
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise AdapterError(f"BitFit trains biases; this model ({model_type}, no biases in any layer) has none. "
                           f"Use LoRA, or a model with biases such as Qwen2.")
    return TrainableFilter(((_BIAS, True), (r".*", False)))
