"""Knowledge distillation: a frozen teacher's softened next-token distribution as a training target.

With `train.distill.teacher` set, each target token's loss is (Hinton et al., 2015, "Distilling the
Knowledge in a Neural Network"; the forward KL, which TRL's GKDTrainer approximates at beta=0)

    alpha * T^2 * KL(softmax(teacher_logits / T) || softmax(student_logits / T)) + (1 - alpha) * CE(data)

averaged over the tokens the data loss counts (a completion's tokens where the data masks the prompt).
`alpha` is the KL's share: 1 learns from the teacher alone, 0 from the data alone. T^2 keeps the KL's
gradient, `alpha * T * (softmax(s/T) - softmax(t/T))`, on the data loss's scale whatever T.

The teacher is a Hugging Face checkpoint (optionally with a PEFT LoRA adapter, merged into it), loaded
onto the run's mesh in its parameter dtype. It is passed to the step as an argument of its own, never
among the trained parameters, so it gets no gradient, no optimizer state and no place in checkpoints.
Both heads and the KL run over chunks of positions (jaxft/losses.py, `chunked_loss_sums`): the teacher
adds its `[B, T, hidden]` final hidden states, and neither model's `[B, T, vocab]` logits exist whole.
"""

import dataclasses
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxft import sharding
from jaxft.errors import ModelLoadError
from jaxft.losses import chunked_loss_sums, token_loss_and_dlogits
from jaxft.models import hf, stack
from jaxft.peft.lora import merge_lora
from jaxft.peft.peft_format import load_lora_adapter

log = logging.getLogger("jaxft")

# Files that hold a tokenizer's vocabulary; a teacher directory with none of them is compared by vocab_size alone.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclasses.dataclass(frozen=True)
class DistillSpec:
    """What a step needs to distil, all static: the temperature, the KL's share, the teacher's graph."""

    temperature: float
    alpha: float
    teacher_graphdef: Any = None


@dataclasses.dataclass
class Teacher:
    """A loaded teacher: its spec, its weights laid out on the mesh, and their shardings (for the step's jit)."""

    spec: DistillSpec
    state: Any
    shardings: Any
    model: nnx.Module


# ----------------------------------------------------------------------------- the loss


def softened_kl(student_logits, teacher_logits, temperature: float, *, with_grad: bool):
    """Per-token `KL(softmax(teacher/T) || softmax(student/T))` `[...]`, float32, and (if `with_grad`) its
    gradient with respect to the student logits, `(softmax(student/T) - softmax(teacher/T)) / T`, else None.
    Logits `[..., vocab]`, any float dtype."""
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    p = jnp.exp(log_p)
    # log_p is finite wherever p underflows to 0, so those terms are 0, not 0 * -inf.
    kl = jnp.sum(p * (log_p - log_q), axis=-1)
    if not with_grad:
        return kl, None
    return kl, (jnp.exp(log_q) - p) / temperature


def token_terms(temperature: float, alpha: float):
    """The per-token distillation term for `losses.chunked_loss_sums`: objective
    `alpha * T^2 * KL + (1 - alpha) * CE`, its weighted dlogits, and both parts as metrics
    (`data_loss`: the cross-entropy, `distill_kl`: the KL at temperature T, unscaled)."""
    kl_scale = alpha * temperature**2

    def terms(logits, targets, weights, teacher_logits, *, with_grad):
        # With alpha = 1 the data loss is only watched: its [B, c, vocab] gradient is not built.
        ce, d_ce = token_loss_and_dlogits(logits, targets, weights, with_grad=with_grad and alpha < 1)
        kl, d_kl = softened_kl(logits, teacher_logits, temperature, with_grad=with_grad)
        objective = (1.0 - alpha) * ce + kl_scale * kl
        dlogits = None
        if with_grad:
            dlogits = kl_scale * d_kl * weights[..., None]
            if d_ce is not None:
                dlogits = dlogits + (1.0 - alpha) * d_ce
        return objective, dlogits, {"data_loss": ce, "distill_kl": kl}

    return terms


def chunked_sums(student_head, teacher_head, hidden, teacher_hidden, targets, weights, spec: DistillSpec, *,
                 chunk_size: int) -> tuple[jax.Array, dict]:
    """`(sum of the distillation objective, {"data_loss": sum, "distill_kl": sum})` over the tokens, each
    weighted by `weights`, from both models' final hidden states and `(apply, params)` output heads, chunk by
    chunk. Gradients reach the student's hidden states and head; the teacher is a constant."""
    head, head_params = student_head
    teacher_apply, teacher_params = teacher_head
    return chunked_loss_sums(head, head_params, hidden, targets, weights, chunk_size=chunk_size,
                             token_terms=token_terms(spec.temperature, spec.alpha),
                             teacher=(teacher_apply, teacher_params, jax.lax.stop_gradient(teacher_hidden)))


# ----------------------------------------------------------------------------- the teacher


def check_teacher(config, student_tokenizer) -> pathlib.Path:
    """The teacher's local directory, checked against the student before any weights load: it exists and is
    a model jaxft reads, the two vocabularies have one size, and where the teacher has tokenizer files, the
    same tokens under the same ids. ModelLoadError naming `train.distill.teacher` otherwise."""
    path = config.train.distill.teacher
    directory = _teacher_dir(path)
    try:
        teacher_vocab = hf.config_from_hf(directory).vocab_size
    except ModelLoadError as e:
        raise ModelLoadError(f"train.distill.teacher={path!r} is not a model jaxft can load: {e}") from None
    student_vocab = hf.config_from_hf(hf.resolve_model_dir(config.model.path)).vocab_size
    if teacher_vocab != student_vocab:
        raise ModelLoadError(f"train.distill.teacher={path!r} has vocab_size {teacher_vocab}, the student "
                             f"(model.path={config.model.path!r}) {student_vocab}: distillation compares the two "
                             f"models' distributions token by token, so they need one vocabulary. Use a teacher "
                             f"of the student's family (the same tokenizer).")
    if any((directory / name).is_file() for name in _TOKENIZER_FILES):
        _check_same_tokens(hf.load_tokenizer(directory), student_tokenizer, teacher_vocab, path)
    else:
        log.warning("train.distill.teacher=%r has no tokenizer files; only its vocab_size (%d) was checked "
                    "against the student's.", path, teacher_vocab)
    return directory


def _teacher_dir(path: str) -> pathlib.Path:
    if os.path.isdir(path):
        return pathlib.Path(path)
    if os.path.exists(path) or hf._looks_like_local_path(path):
        what = "is a file" if os.path.exists(path) else "does not exist"
        raise ModelLoadError(f"train.distill.teacher={path!r} {what}; give the teacher's Hugging Face model "
                             f"directory (config.json, safetensors weights, tokenizer files) or a hub id.")
    try:
        return hf.resolve_model_dir(path)
    except ModelLoadError as e:
        raise ModelLoadError(f"train.distill.teacher={path!r}: {e}") from None


def _check_same_tokens(teacher_tokenizer, student_tokenizer, vocab_size: int, path: str) -> None:
    """ModelLoadError naming the first ids below `vocab_size` whose tokens differ between the tokenizers."""
    # Only the ids the models have logits for matter: a tokenizer class may add tokens past the embedding
    # (transformers' Qwen2 tokenizer adds <|endoftext|> to a vocabulary without it), which neither model emits.
    def by_id(tokenizer):
        return {i: token for token, i in tokenizer.get_vocab().items() if i < vocab_size}

    teacher, student = by_id(teacher_tokenizer), by_id(student_tokenizer)
    differing = sorted(i for i in teacher.keys() | student.keys() if teacher.get(i) != student.get(i))
    if not differing:
        return
    examples = "; ".join(f"id {i}: teacher {teacher.get(i)!r}, student {student.get(i)!r}" for i in differing[:3])
    raise ModelLoadError(f"train.distill.teacher={path!r} has another tokenizer than the student: of the "
                         f"{vocab_size} ids the models predict, {len(differing)} stand for other tokens ({examples}). "
                         f"Distillation compares the models token by token; use a teacher with the student's "
                         f"tokenizer.")


def load_teacher(config, directory, mesh, *, dtype, param_dtype, layer_loop: str) -> Teacher:
    """The teacher in `directory` (from `check_teacher`) with `train.distill.teacher_adapter` merged in, laid
    out on `mesh` by its logical axes, in the student's compute and parameter dtypes."""
    distill = config.train.distill
    # Nothing of the teacher is differentiated, so its blocks keep no activations to recompute: no remat.
    model = hf.load_pretrained(directory, mesh=mesh, dtype=dtype, param_dtype=param_dtype, remat="none",
                               layer_loop=layer_loop, attention=config.model.attention)
    if distill.teacher_adapter:
        adapter, wrapped = load_lora_adapter(model, distill.teacher_adapter)
        # A and B go onto the mesh beside the kernels they fold into, so the merge adds arrays of one layout
        # (on several hosts, global arrays); the teacher then runs as one plain model, no adapter matmuls.
        _place_on_mesh(model, mesh)
        merge_lora(model)
        log.info("Teacher adapter %s merged: rank %d over %d layers", distill.teacher_adapter, adapter.rank,
                 len(wrapped))
    stack.layout_for_loop(model)
    graphdef, state, shardings = _place_on_mesh(model, mesh)
    log.info("Distilling from %s (%s, %d layers, vocab %d): temperature %g, alpha %g (the KL's share)",
             distill.teacher, type(model).__name__, model.config.num_layers, model.config.vocab_size,
             distill.temperature, distill.alpha)
    spec = DistillSpec(float(distill.temperature), float(distill.alpha), graphdef)
    return Teacher(spec, state, shardings, model)


def _place_on_mesh(model, mesh):
    """Lay `model`'s arrays out on `mesh` by their logical axes, in place; returns (graphdef, state, shardings)."""
    graphdef, state = nnx.split(model)
    shardings = sharding.tree_shardings(state, mesh)
    state = sharding.place(state, shardings)
    nnx.update(model, state)
    return graphdef, state, shardings
