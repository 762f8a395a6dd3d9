"""FLOPs of a training step, counted from the model, and the peak FLOP/s of the chip running it: the
two halves of model FLOPs utilisation (MFU).

    count = train_flops_per_token(model, method.trainable, seq_len)
    peak = peak_flops(jax.devices()[0].device_kind)      # None on CPU and unknown chips
    mfu = tokens_per_sec * count.computed / jax.device_count() / peak

Two counts, both per *input* token of a training step (forward and backward):

- `computed`: the matrix multiplications the step actually has to do, given what trains. Every matmul
  weight W with P entries (a linear kernel, a quantised one as its float shape, LoRA's A and B, a
  bottleneck adapter's projections, the LM head or the tied embedding's `attend`) costs 2P per token
  forward. The backward pass adds 2P for the gradient with respect to the matmul's input wherever
  that input depends on a trainable parameter (JAX differentiates nothing below the lowest trainable
  one), and 2P for the gradient with respect to W where W trains. So a trained weight costs 6P, a
  frozen one above the lowest trained parameter 4P, a frozen one below it 2P: the classic 6N for full
  fine-tuning; about 4N for LoRA, adapters and prompt tuning (every layer sits above the first trained
  parameter); for the top k blocks, 6P for theirs, 4P for a frozen head and 2P for every block below.
  "Below" follows the forward pass within a block too: layer 0's q/k/v kernels, whose input is the
  frozen embedding, need no input gradient under LoRA. Attention's score and value products cost
  2 * 2 * head_dim * num_heads per visible (query, key) pair forward, and twice that backward where
  q, k and v depend on a trainable parameter.
- `model_6n`: PaLM's "model FLOPs" (Chowdhery et al. 2022, appendix B) as MaxText reports them: 6N
  plus attention forward and backward, every weight counted as if it trained, whatever trains.

`mfu` (jaxft/metrics.py) uses `computed`: the work the hardware has to do for this fine-tuning
method, so 100% means the chip did nothing but that method's matmuls at its peak. `model_6n` counts
the backward passes LoRA, adapters or prompt tuning never run (the weight gradients of frozen weights),
so an MFU from it can exceed what the chip did, by up to 1.5x for LoRA; it is reported as `mfu_6n`,
for comparison with published PaLM/MaxText figures.

Conventions (all documented choices, none of them measured):

- Causal attention counts the visible pairs only: T^2 / 2 per sequence (`halve_causal=True`), as
  MaxText does (maxtext_utils.calculate_tflops_training_per_device: causal = non-causal / 2) and as
  block-sparse causal kernels (splash, cuDNN flash attention) compute. PaLM's appendix B counts
  T^2 (its 12 * L * H * Q * T); pass `halve_causal=False` for that. A sliding window of w counts
  T * w - w^2 / 2 pairs (w < T). Rows are counted as one causal sequence of `seq_len` tokens:
  packed rows' per-segment attention is less work, which only a block-sparse kernel skips. The
  dense XLA backend computes all T^2 pairs whatever the mask: its work is the unhalved count.
- Model FLOPs, not hardware FLOPs: recomputation (`model.remat`), norms, RoPE, softmax, the loss and
  the optimizer update are not counted (elementwise work, small next to the matmuls at LLM widths).
  DoRA's per-step weight norms and the second base matmul DoRA runs with dropout are not counted.
- Prompt tuning's n virtual tokens lengthen every row to seq_len + n inside the decoder blocks (the
  head still reads seq_len positions), and the count is still per input token.
- Peaks are the dense (not 2:4 sparse) bfloat16 tensor-core peak. MFU of a float32 run is still
  relative to that bf16 peak, so it reads low by whatever float32 costs on the chip.
- Multiply by real tokens per second (padding excluded, as jaxft's `tokens_per_sec` counts them): the
  positions a padded row computes for nothing then show up as lost utilisation.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx

from jaxft.models import layout, stack
from jaxft.models.layers import Embed, Linear
from jaxft.models.layout import DECODER, Layout
from jaxft.peft.adapters import BottleneckAdapter
from jaxft.peft.lora import LoRALinear
from jaxft.peft.quant import QuantizedEmbed, QuantizedLinear
from jaxft.peft.select import TrainableFilter

# ----------------------------------------------------------------------------- peak FLOP/s per chip

_TPU_V4 = 275e12  # https://cloud.google.com/tpu/docs/v4: "Peak compute per chip (bf16) 275 TFLOPs"
_TPU_V5E = 197e12  # https://cloud.google.com/tpu/docs/v5e: "Peak compute per chip (bf16) 197 TFLOPs"
_TPU_V5P = 459e12  # https://cloud.google.com/tpu/docs/v5p: "Peak compute per chip (bf16) 459 TFLOPs"
_TPU_V6E = 918e12  # https://cloud.google.com/tpu/docs/v6e: "Peak compute per chip (bf16) 918 TFLOPs"
# NVIDIA's datasheets give tensor-core figures "with sparsity" (2:4 structured); dense is half.
# H100 datasheet (resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet):
# BFLOAT16 Tensor Core 1,979 TFLOPS (SXM), 1,671 (NVL); 1,513 (PCIe) in its first edition.
_H100_SXM, _H100_NVL, _H100_PCIE = 1979e12 / 2, 1671e12 / 2, 1513e12 / 2
# H200 datasheet (nvidia.com/en-us/data-center/h200): BFLOAT16 Tensor Core 1,979 TFLOPS (SXM), 1,671 (NVL).
_H200_SXM, _H200_NVL = 1979e12 / 2, 1671e12 / 2
# A100 datasheet (nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
# nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BFLOAT16 Tensor Core 312 TFLOPS | 624 TFLOPS
# with sparsity, the same for the 40 and 80 GB, SXM and PCIe boards.
_A100 = 312e12

PEAK_FLOPS: dict[str, float] = {
    # TPU: `device_kind` as jax reports it (jax/_src/pallas/mosaic/tpu_info.py chip_version_from_device_kind
    # takes both spellings: runtimes report "TPU v5 lite" for v5e, "TPU v5" for v5p, "TPU v6 lite" for v6e).
    # One jax device per chip from v4 on (megacore), so per-device is per-chip.
    "TPU v4": _TPU_V4,
    "TPU v5 lite": _TPU_V5E,
    "TPU v5e": _TPU_V5E,
    "TPU v5": _TPU_V5P,
    "TPU v5p": _TPU_V5P,
    "TPU v6 lite": _TPU_V6E,
    "TPU v6e": _TPU_V6E,
    # NVIDIA: `device_kind` is the CUDA device name, the product names of the driver's supported-GPU
    # table (NVIDIA/open-gpu-kernel-modules README, "Compatible GPUs").
    "NVIDIA H100 80GB HBM3": _H100_SXM,  # H100 SXM5
    "NVIDIA H100 PCIe": _H100_PCIE,
    "NVIDIA H100 NVL": _H100_NVL,
    "NVIDIA H200": _H200_SXM,  # H200 SXM (the NVL board may report this name too: then MFU reads low)
    "NVIDIA H200 NVL": _H200_NVL,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
}


def peak_flops(device_kind: str | None) -> float | None:
    """The dense bfloat16 peak FLOP/s of one device of this kind (`jax.devices()[0].device_kind`), or None
    for a CPU or a chip not in `PEAK_FLOPS`: no MFU is better than a made-up one."""
    if not device_kind:
        return None
    return PEAK_FLOPS.get(device_kind.strip())


# ----------------------------------------------------------------------------- where things sit in the forward pass

# Inside a decoder block, in forward order. Parts at the same stage are parallel branches (q, k and v
# read the same input), so one trainable part does not make its siblings' inputs differentiable.
_BLOCK_STAGES = (
    ("input_layernorm", 0),
    ("self_attn.q_proj", 1), ("self_attn.k_proj", 1), ("self_attn.v_proj", 1), ("self_attn.qkv_proj", 1),
    ("self_attn.q_norm", 2), ("self_attn.k_norm", 2),
    ("self_attn.o_proj", 4),
    ("post_attention_layernorm", 5), ("pre_feedforward_layernorm", 5),  # Gemma 2/3: post-attention, pre-MLP
    ("mlp.gate_proj", 6), ("mlp.up_proj", 6), ("mlp.gate_up_proj", 6),
    ("mlp.down_proj", 7),
    ("post_feedforward_layernorm", 8),
)
_ATTENTION_STAGE = 3  # the score and value products, between q/k/v (and their norms) and o_proj
# Inside one projection, in forward order: its own kernel and LoRA's A read the projection's input
# (0); B reads x A; the bias and DoRA's magnitude act on the output; an adapter reads the output.
_PROJECTION_PARTS = (
    (".lora_b", 2), (".adapter.down_kernel", 5), (".adapter.down_bias", 6), (".adapter.up_kernel", 7),
    (".adapter.up_bias", 8), (".lora_magnitude", 4), (".bias", 3),
)


def _part(rest: str) -> int:
    for suffix, part in _PROJECTION_PARTS:
        if rest.endswith(suffix):
            return part
    return 0


def _position(name: str, num_layers: int, names: Layout = DECODER) -> tuple[int, int, int]:
    """(level, stage, part) of the parameter called `name` in the forward pass: level -1 is the input
    (embeddings, virtual tokens), 0 .. L-1 the blocks, L the final norm and the head."""
    block = names.block_of(name)
    if block:
        layer, rest = block
        for prefix, stage in _BLOCK_STAGES:
            if rest.startswith(prefix + "."):
                return layer, stage, _part(rest[len(prefix):])
        return layer, 0, 0  # a part this table does not know: at the block's input, so nothing is missed
    if names.final_norm and name.startswith(names.final_norm + "."):
        return num_layers, 0, 0
    if name.startswith(names.lm_head + "."):
        return num_layers, 1, _part(name[len(names.lm_head):])
    if name.startswith(names.classifier + "."):  # a classifier's head, on top like a language model's
        return num_layers, 1, 0
    return -1, 0, 0  # embeddings, the prompt encoder, anything else: the input


# ----------------------------------------------------------------------------- the count


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs per input token of one training step (module doc): `computed` (what this method's step
    does, what `mfu` uses) and `model_6n` (PaLM/MaxText model FLOPs: 6N + attention, all weights as if
    trained). `breakdown` splits `computed`: matmul_forward, attention_forward, input_grad (gradients
    flowing down through frozen and trained matmuls), weight_grad (trained weights), attention_backward."""

    computed: float
    model_6n: float
    breakdown: dict[str, float]
    seq_len: int
    virtual_tokens: int = 0
    halve_causal: bool = True

    @property
    def forward(self) -> float:
        """FLOPs per input token of the forward pass alone."""
        return self.breakdown["matmul_forward"] + self.breakdown["attention_forward"]

    def summary(self) -> str:
        """One line for the run log."""
        parts = ", ".join(f"{k} {v:.3g}" for k, v in self.breakdown.items())
        return (f"{self.computed:.4g} FLOPs per token as computed ({parts}); 6N + attention {self.model_6n:.4g}; "
                f"seq_len {self.seq_len}{f' + {self.virtual_tokens} virtual' if self.virtual_tokens else ''}, "
                f"causal attention {'halved' if self.halve_causal else 'unhalved (PaLM)'}")


@dataclasses.dataclass(frozen=True)
class _Matmul:
    name: str  # the weight's per-layer name, as the trainable filter judges it
    size: int  # entries of one layer's weight: 2 * size FLOPs per token forward
    position: tuple[int, int, int]
    trains: bool
    tokens: int  # rows it multiplies per sequence (seq_len + virtual tokens in the blocks)


def train_flops_per_token(model: nnx.Module, trainable: TrainableFilter, seq_len: int, *,
                          halve_causal: bool = True) -> FlopCount:
    """Count the FLOPs per input token of a training step of `model` (a prepared `DecoderForCausalLM`: after
    `peft.prepare`) on rows of `seq_len` tokens, with `trainable` saying what trains (module doc).

    Only shapes are read, so an abstract model (`nnx.eval_shape`) works too. `halve_causal=False` counts
    causal attention as PaLM's appendix B does (every query against every key)."""
    cfg = model.config
    num_layers = cfg.num_layers
    encoder = getattr(model, "prompt_encoder", None)
    virtual = int(encoder.num_virtual_tokens) if encoder is not None else 0
    block_tokens = seq_len + virtual
    matmuls = _matmuls(model, trainable, num_layers, seq_len, block_tokens)
    lowest = _lowest_trainable(model, trainable, num_layers)

    parts = dict(matmul_forward=0.0, attention_forward=0.0, input_grad=0.0, weight_grad=0.0, attention_backward=0.0)
    six_n = 0.0
    for m in matmuls:
        flops = 2.0 * m.size * m.tokens  # per sequence
        parts["matmul_forward"] += flops
        if lowest is not None and lowest < m.position:  # its input depends on a trainable parameter
            parts["input_grad"] += flops
        if m.trains:
            parts["weight_grad"] += flops
        six_n += 3 * flops
    for layer in range(num_layers):
        pairs = _visible_pairs(block_tokens, cfg.layer_window(layer), halve_causal)
        flops = 4.0 * pairs * cfg.head_dim * cfg.num_heads  # q k^T and p v: 2 * head_dim per pair and head each
        parts["attention_forward"] += flops
        if lowest is not None and lowest < (layer, _ATTENTION_STAGE, 0):
            parts["attention_backward"] += 2 * flops  # dq, dk from the scores' gradient; dp, dv from the output's
        six_n += 3 * flops
    per_token = {k: v / seq_len for k, v in parts.items()}
    return FlopCount(computed=sum(per_token.values()), model_6n=six_n / seq_len, breakdown=per_token,
                     seq_len=seq_len, virtual_tokens=virtual, halve_causal=halve_causal)


def _visible_pairs(length: int, window: int | None, halve_causal: bool) -> float:
    """(query, key) pairs attention computes per sequence: T^2 / 2 for causal attention (T w - w^2 / 2 with a
    sliding window w < T), twice that with `halve_causal=False`."""
    if window is None or window >= length:
        pairs = length * length / 2
    else:
        pairs = length * window - window * window / 2
    return pairs if halve_causal else 2 * pairs


def _lowest_trainable(model, trainable: TrainableFilter, num_layers: int):
    """The earliest position in the forward pass of a parameter that trains; None when nothing does."""
    positions = [_position(name, num_layers, layout.of(model))
                 for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
                 for name in stack.layer_names(path, variable) if trainable.is_trainable(name)]
    return min(positions, default=None)


def _matmuls(model, trainable: TrainableFilter, num_layers: int, seq_len: int, block_tokens: int) -> list[_Matmul]:
    """Every matrix multiplication by a weight in the forward pass, one per layer of a stacked weight."""
    out = []

    def add(path, module, attr, size, position=None, tokens=None):
        variable = getattr(module, attr)
        for name in stack.layer_names(tuple(path) + (attr,), variable):
            pos = _position(name, num_layers, layout.of(model)) if position is None else position
            rows = tokens if tokens is not None else block_tokens if 0 <= pos[0] < num_layers else seq_len
            trains = isinstance(variable, nnx.Param) and trainable.is_trainable(name)
            out.append(_Matmul(name, size, pos, trains, rows))

    # Tied: the embedding is also the vocabulary head (a sequence classifier has neither head, only `score`).
    tied = getattr(model, "lm_head", "untied") is None and not getattr(model.config, "num_labels", 0)
    for path, module in nnx.iter_modules(model):
        if type(module) is Linear:
            add(path, module, "kernel", module.in_features * module.out_features)
        elif isinstance(module, QuantizedLinear):  # the codes stand for a float [in, out] kernel
            add(path, module, "codes", module.in_features * module.out_features)
        elif isinstance(module, LoRALinear):
            if module.merged_gain is not None:  # merged: the update is inside the base kernel
                continue
            n_in, rank = module.lora_a.get_value().shape[-2:]
            add(path, module, "lora_a", n_in * rank)
            add(path, module, "lora_b", rank * module.lora_b.get_value().shape[-1])
        elif isinstance(module, BottleneckAdapter):
            add(path, module, "down_kernel", math.prod(module.down_kernel.get_value().shape[-2:]))
            add(path, module, "up_kernel", math.prod(module.up_kernel.get_value().shape[-2:]))
        elif (isinstance(module, (Embed, QuantizedEmbed)) and tied
              and ".".join(map(str, path)) == layout.of(model).embeddings[0]):
            # The lookup is a gather (no FLOPs); tied, the same table is also the head: x @ table^T.
            weight = "embedding" if isinstance(module, Embed) else "codes"
            add(path, module, weight, module.num_embeddings * module.features, position=(num_layers, 1, 0),
                tokens=seq_len)
    return out
