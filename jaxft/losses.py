"""Token cross-entropy with hand-written backward passes, with and without the full logits.

The logits `[B, T, vocab]` are the largest tensor of a fine-tuning step: 262 MB in float32 for
2048 tokens of a 32k vocabulary, 2.1 GB for 4096 tokens of a 128k vocabulary (Llama 3), per
sequence, before their gradient, which is as large again.

`token_cross_entropy(logits, targets)` takes logits that already exist. Autodiff of
`logsumexp(logits) - logits[target]` materialises a masked copy of them in the forward pass and
makes several passes over them in the backward pass; here the forward pass reads them once (the
log-normaliser) plus one element per token (the target), and the backward pass writes
`softmax - one_hot` in one fused pass.

`chunked_cross_entropy_sum(head_apply, head_params, x, targets, weights, chunk_size=...)` never
holds them: it takes the final hidden states `x` `[B, T, D]` and the output head, and runs the
head on `chunk_size` sequence positions at a time under `lax.scan`, so at most `[B, chunk, vocab]`
logits exist at once. XLA keeps about three logits-sized float32 buffers (the logits, dlogits
and, on CPU, a transposed dlogits for the weight gradient): with B=2, T=1024, V=32000, D=64 on CPU
the temporary memory of value and gradient drops from 786 MB to 99 MB at chunk 128
(tests/test_losses.py asserts a drop of at least the 262 MB of float32 logits).

Its custom VJP does all the work in the forward pass, as Liger-Kernel's fused linear
cross-entropy does: per chunk it computes the logits, their loss, `dlogits = (softmax - one_hot)
* weights` and, through `jax.vjp` of the head, the chunk's gradient for `x` and its contribution
to the head parameters' gradient. The residuals are only those gradients (`[B, T, D]` and the
size of the head) and the backward pass scales them by the incoming cotangent of the loss: three
head matmuls per chunk and no recomputation of the logits, where autodiff of a chunked loss would
either keep every chunk's logits (no memory saved) or compute them twice. Inputs that are not
differentiated get no gradient work: through JAX's symbolic zeros the forward rule sees which
inputs carry a tangent, so a frozen head (the lm_head under LoRA) costs two matmuls per chunk,
not three. Without differentiation (evaluation) only the loss is computed, chunk by chunk.

`chunked_loss_sums` is the same machinery with the per-token term as an argument and an optional
frozen teacher head run on the same chunks: knowledge distillation (jaxft/distill.py) mixes a KL
term to the teacher's logits into the cross-entropy without either model's logits existing whole.
"""

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero


@jax.custom_vjp
def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """`-log softmax(logits)[target]` per token, float32; logits `[..., vocab]`, targets `[...]` ints."""
    return _forward(logits, targets)[0]


def _forward(logits, targets):
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return log_z - target_logits, log_z


def _fwd(logits, targets):
    loss, log_z = _forward(logits, targets)
    return loss, (logits, targets, log_z)


def _bwd(residuals, g):
    logits, targets, log_z = residuals
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
    probs = jnp.exp(logits.astype(jnp.float32) - log_z[..., None])
    grad = (probs - is_target.astype(jnp.float32)) * g[..., None]
    # Integer targets have no tangent space: their cotangent is float0.
    return grad.astype(logits.dtype), jnp.zeros(targets.shape, jax.dtypes.float0)


token_cross_entropy.defvjp(_fwd, _bwd)


def chunked_cross_entropy_sum(head_apply, head_params, x, targets, weights, *, chunk_size: int) -> jax.Array:
    """Sum over tokens of `weights * CE(head_apply(head_params, x), targets)`, a float32 scalar,
    computed over chunks of `chunk_size` sequence positions so that neither the forward nor the
    backward pass ever holds `[B, T, vocab]` logits.

    Args:
      head_apply: `head_apply(head_params, x_chunk)` maps `[B, c, D]` hidden states to `[B, c, V]`
        logits of any float dtype (an untied or tied, LoRA-wrapped or quantised head; e.g.
        `lambda state, h: nnx.merge(graphdef, state)(h)`). It must not close over traced arrays
        (JAX raises UnexpectedTracerError for a differentiated one, and its next custom_vjp for
        any): whatever is traced belongs in `head_params`.
      head_params: any pytree of arrays (an `nnx.State` too); integer leaves (quantised weights)
        are never differentiated.
      x: `[B, T, D]` final hidden states, any float dtype.
      targets: `[B, T]` integer token ids; an id outside `[0, V)` (e.g. -100) gets a finite but
        meaningless loss and no one-hot term, so give it weight 0.
      weights: `[B, T]` per-token weights, 0 where a position has no loss (and for padding).
      chunk_size: sequence positions per chunk. With `T <= chunk_size` the loss runs as one
        chunk, without a loop, and compiles to the same program as the full-logits loss;
        otherwise T is padded to a multiple of it (padding has weight 0). About three
        `[B, chunk_size, V]` float32 buffers are live at once. On a mesh the batch axis keeps its
        split and a vocabulary split works (the log-normaliser is all-reduced per chunk), but a
        trained head's gradient is all-reduced over the data axes once per chunk rather than once
        per step: with a trained head prefer few, large chunks.

    Under differentiation the gradients are computed in the forward pass (see the module
    docstring): `x`'s gradient `[B, T, D]` and the head's are kept, the logits are not.
    Gradients flow to `x`, to `head_params` and (as the per-token losses) to `weights`.
    """
    return chunked_loss_sums(head_apply, head_params, x, targets, weights, chunk_size=chunk_size)[0]


def cross_entropy_terms(logits, targets, weights, teacher_logits=None, *, with_grad):
    """The default `token_terms` of `chunked_loss_sums`: per-token cross-entropy, its weighted dlogits, no
    metrics of its own (there is no teacher to read)."""
    token_loss, dlogits = token_loss_and_dlogits(logits, targets, weights, with_grad=with_grad)
    return token_loss, dlogits, {}


def chunked_loss_sums(head_apply, head_params, x, targets, weights, *, chunk_size: int,
                      token_terms=cross_entropy_terms, teacher=None) -> tuple[jax.Array, dict]:
    """`(sum over tokens of weights * objective, {name: sum over tokens of weights * metric})`, float32,
    chunk by chunk as `chunked_cross_entropy_sum` (arguments as there), with the per-token term given.

    token_terms: `token_terms(logits, targets, weights, teacher_logits, *, with_grad)` for one chunk
      (`[B, c, V]` logits of any float dtype, `[B, c]` targets and weights, the teacher's `[B, c, V]` logits
      or None) returns `(objective [B, c] float32, dlogits, metrics)`: `dlogits` the gradient of
      `sum(weights * objective)` with respect to the logits, float32 (None when `with_grad` is False), and
      `metrics` a dict of `[B, c]` per-token values to sum alongside. The default is the cross-entropy.
    teacher: None, or `(teacher_apply, teacher_params, teacher_x)`: a second head and its own final hidden
      states `[B, T, D']`, run over the same chunks so its logits reach `token_terms` without existing
      whole. The teacher is a constant here: it gets no gradient, as if behind `lax.stop_gradient`.

    Gradients flow from the objective sum only; the metric sums are values to log (their gradient is
    zero, as for `has_aux` outputs).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of sequence positions, got {chunk_size}")
    teacher_apply, teacher_params, teacher_x = teacher if teacher is not None else (None, (), None)
    if x.shape[:2] != targets.shape or targets.shape != weights.shape or (
            teacher_x is not None and teacher_x.shape[:2] != targets.shape):
        raise ValueError(
            f"x [B, T, D], targets [B, T], weights [B, T] (and a teacher's x [B, T, D']) must agree on B and T, got "
            f"x {x.shape}, targets {targets.shape}, weights {weights.shape}"
            + (f", teacher x {teacher_x.shape}" if teacher_x is not None else "")
        )
    leaves, treedef = jax.tree.flatten(head_params)
    teacher_leaves, teacher_treedef = jax.tree.flatten(teacher_params)
    # The custom VJP sees one flat argument per array rather than `head_params` itself: symbolic-zero
    # mode hands the forward rule a record per leaf, which pytree nodes such as nnx.Variable
    # would have to accept in their unflattening; and JAX's next custom_vjp under today's
    # jax.checkpoint miscounts the inputs of a rule whose arguments are not each one array.
    loss_fn = _chunked_loss_fn(head_apply, treedef, chunk_size, token_terms, teacher_apply, teacher_treedef)
    teacher_xs = () if teacher_x is None else (teacher_x,)
    return loss_fn(*leaves, x, targets, weights.astype(jnp.float32), *teacher_leaves, *teacher_xs)


def _chunked_loss_fn(head_apply, treedef, chunk_size, token_terms, teacher_apply, teacher_treedef):
    """The custom-VJP loss over the flat arguments (*param leaves, x, targets, weights, *teacher leaves,
    *teacher xs) for one head, per-token term, teacher head and chunk size; teacher xs are none or one.

    Built per call as a closure over the static pieces (the head functions, the parameter tree
    structures, the chunk size) rather than passed as `nondiff_argnums`, which newer JAX hashes.
    """
    n_leaves, n_teacher = treedef.num_leaves, teacher_treedef.num_leaves

    def split_args(args):
        """(leaves, x, targets, weights, teacher leaves, teacher xs) of the flat arguments."""
        rest = args[n_leaves + 3:]
        return (list(args[:n_leaves]), *args[n_leaves:n_leaves + 3], list(rest[:n_teacher]),
                tuple(rest[n_teacher:]))

    def head(leaves, x_chunk):
        return head_apply(jax.tree.unflatten(treedef, leaves), x_chunk)

    def teacher_logits(teacher_leaves, teacher_chunks):
        if teacher_apply is None:
            return None
        return teacher_apply(jax.tree.unflatten(teacher_treedef, teacher_leaves), *teacher_chunks)

    @jax.custom_vjp
    def loss_fn(*args):
        # The primal, for evaluation: the sums alone, chunk by chunk.
        leaves, x, targets, weights, teacher_leaves, teacher_xs = split_args(args)
        def step(loss, chunk):
            x_c, t_c, w_c, *teacher_c = chunk
            objective, _, metrics = token_terms(head(leaves, x_c), t_c, w_c,
                                                teacher_logits(teacher_leaves, teacher_c), with_grad=False)
            return loss + jnp.sum(objective * w_c), _weighted(metrics, w_c)

        loss, metrics = _over_chunks(step, jnp.zeros((), jnp.float32), (x, targets, weights, *teacher_xs),
                                     chunk_size)
        return loss, _summed(metrics)

    def loss_fwd(*args):
        leaves, x, targets, weights, teacher_leaves, teacher_xs = split_args(args)
        # With symbolic zeros each argument arrives as CustomVJPPrimal(value, perturbed). A float
        # input that is not perturbed (a frozen head, or x when only the head trains) gets no
        # gradient work; integer ones (quantised weights, targets) never have any; the teacher never.
        leaves, perturbed = zip(*map(_unwrap, leaves)) if leaves else ((), ())
        diff_idx = [i for i, (leaf, p) in enumerate(zip(leaves, perturbed)) if p and _is_float(leaf)]
        x, x_diff = _unwrap(x)
        weights, weights_diff = _unwrap(weights)
        targets, _ = _unwrap(targets)
        teacher_leaves = [_unwrap(leaf)[0] for leaf in teacher_leaves]
        teacher_xs = tuple(_unwrap(a)[0] for a in teacher_xs)

        def logits_of(diff_leaves, x_c):
            full = list(leaves)
            for i, leaf in zip(diff_idx, diff_leaves):
                full[i] = leaf
            return head(full, x_c)

        def step(carry, chunk):
            loss, d_leaves = carry
            x_c, t_c, w_c, *teacher_c = chunk
            # jax.vjp only in what is differentiated: for a frozen head it emits no [D, vocab]
            # weight-gradient matmul, for a frozen x no dx matmul.
            diff_leaves = [leaves[i] for i in diff_idx]
            if x_diff:
                logits, vjp = jax.vjp(logits_of, diff_leaves, x_c)
            else:
                logits, vjp = jax.vjp(lambda d: logits_of(d, x_c), diff_leaves)
            objective, dlogits, metrics = token_terms(logits, t_c, w_c, teacher_logits(teacher_leaves, teacher_c),
                                                      with_grad=True)
            cts = vjp(dlogits.astype(logits.dtype))
            d_leaves = [acc + ct.astype(jnp.float32) for acc, ct in zip(d_leaves, cts[0])]
            per_token = {"metrics": _weighted(metrics, w_c)}
            if x_diff:
                per_token["dx"] = cts[1]
            if weights_diff:
                per_token["token_loss"] = objective
            return (loss + jnp.sum(objective * w_c), d_leaves), per_token

        # Head gradients accumulate in float32 across chunks.
        init = (jnp.zeros((), jnp.float32), [jnp.zeros(leaves[i].shape, jnp.float32) for i in diff_idx])
        (loss, d_leaves), per_token = _over_chunks(step, init, (x, targets, weights, *teacher_xs), chunk_size)
        # Residuals: the finished gradients in their inputs' dtypes, None for the undifferentiated.
        d_all = [None] * len(leaves)
        for i, d in zip(diff_idx, d_leaves):
            d_all[i] = d.astype(leaves[i].dtype)
        return (loss, _summed(per_token["metrics"])), (d_all, per_token.get("dx"), per_token.get("token_loss"))

    def loss_bwd(residuals, g):
        d_leaves, dx, token_losses = residuals
        g = g[0]  # the metric sums are values only: their cotangent is dropped
        # Targets are integers (float0 cotangent) and the teacher is a constant: None stands for the zero
        # JAX expects.
        no_teacher = (None,) * (n_teacher + (teacher_apply is not None))
        if type(g) is SymbolicZero:
            return (None,) * (len(d_leaves) + 3) + no_teacher

        def scale(d):
            return None if d is None else (g * d.astype(jnp.float32)).astype(d.dtype)

        return (*map(scale, d_leaves), scale(dx), None, scale(token_losses), *no_teacher)

    loss_fn.defvjp(loss_fwd, loss_bwd, symbolic_zeros=_symbolic_zeros_usable())
    return loss_fn


def _symbolic_zeros_usable() -> bool:
    """Whether this JAX can differentiate a symbolic-zeros custom VJP everywhere we need it.

    JAX's next custom_vjp (`jax_custom_vjp3`) has no forward-mode rule for a symbolic-zeros VJP,
    which today's `jax.checkpoint` asks for; its next checkpoint (`jax_remat3`) does not. In that
    one combination the rule goes without symbolic zeros: every input then looks differentiated,
    and under jit JAX's dead-code elimination still drops the gradient work for inputs whose
    gradient nobody reads (tests/test_losses.py counts the dots in every mode). A flag that JAX
    has removed is taken as turned on for good.
    """
    return not getattr(jax.config, "jax_custom_vjp3", True) or getattr(jax.config, "jax_remat3", True)


def _unwrap(arg):
    """(value, whether it may carry a tangent) of a forward-rule argument, in either VJP mode."""
    if isinstance(arg, CustomVJPPrimal):
        return arg.value, arg.perturbed
    return arg, True


def _is_float(a):
    return jnp.issubdtype(a.dtype, jnp.inexact)


def _weighted(metrics: dict, weights) -> dict:
    return {name: value * weights for name, value in metrics.items()}


def _summed(metrics: dict) -> dict:
    return {name: jnp.sum(value) for name, value in metrics.items()}


def token_loss_and_dlogits(logits, targets, weights, *, with_grad):
    """Per-token cross-entropy `[B, c]` in float32 and, if asked, `(softmax - one_hot) * weights`."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    # A gather of one logit per token, not a masked sum over the vocabulary: the masked sum costs
    # XLA on CPU a further [B, c, vocab] pass. Clipping keeps an out-of-range target (weight 0)
    # finite, where the default fill would give NaN, and NaN * 0 is NaN.
    targets = targets.astype(jnp.int32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1, mode="clip")[..., 0]
    token_loss = log_z - target_logits
    if not with_grad:
        return token_loss, None
    is_target = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
    probs = jnp.exp(logits - log_z[..., None])
    dlogits = (probs - is_target.astype(jnp.float32)) * weights[..., None]
    return token_loss, dlogits


def _over_chunks(step, init, arrays, chunk_size):
    """`lax.scan(step, init, chunks)` over sequence chunks of `arrays`, a tuple of `[B, T, ...]` arrays
    (x, targets, weights, and a teacher's x where there is one).

    `step(carry, chunk) -> (carry, per_token)` sees the tuple as `[B, c, ...]` chunks; returns the final carry
    and `per_token` (a pytree of `[B, c, ...]` arrays) reassembled to `[B, T, ...]`.
    """
    batch, length = arrays[1].shape  # the targets
    if length <= chunk_size:
        # One chunk, no loop: the same program as the full-logits loss where the logits fit anyway.
        return step(init, arrays)

    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length
    if pad:
        # Padded positions have weight 0: no loss and a zero dlogits row, so no gradient.
        arrays = tuple(jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in arrays)

    def to_chunks(a):
        # [B, T, ...] -> [n, B, c, ...]: the scanned axis leads, and the batch axis (split over
        # the mesh's data axes) stays whole within each chunk.
        return jnp.moveaxis(a.reshape(batch, num_chunks, chunk_size, *a.shape[2:]), 1, 0)

    def from_chunks(a):
        return jnp.moveaxis(a, 0, 1).reshape(batch, num_chunks * chunk_size, *a.shape[3:])[:, :length]

    carry, per_token = jax.lax.scan(step, init, tuple(map(to_chunks, arrays)))
    return carry, jax.tree.map(from_chunks, per_token)
