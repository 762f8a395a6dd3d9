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
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of sequence positions, got {chunk_size}")
    if x.shape[:2] != targets.shape or targets.shape != weights.shape:
        raise ValueError(
            f"x [B, T, D], targets [B, T] and weights [B, T] must agree on B and T, got x {x.shape}, "
            f"targets {targets.shape}, weights {weights.shape}"
        )
    leaves, treedef = jax.tree.flatten(head_params)
    # The custom VJP sees a flat list of arrays rather than `head_params` itself: symbolic-zero
    # mode hands the forward rule a record per leaf, which pytree nodes such as nnx.Variable
    # would have to accept in their unflattening.
    loss_fn = _chunked_loss_fn(head_apply, treedef, chunk_size)
    return loss_fn(leaves, x, targets, weights.astype(jnp.float32))


def _chunked_loss_fn(head_apply, treedef, chunk_size):
    """The custom-VJP loss over (param leaves, x, targets, weights) for one head and chunk size.

    Built per call as a closure over the static pieces (the head function, the parameter tree
    structure, the chunk size) rather than passed as `nondiff_argnums`, which newer JAX hashes.
    """

    def head(leaves, x_chunk):
        return head_apply(jax.tree.unflatten(treedef, leaves), x_chunk)

    @jax.custom_vjp
    def loss_fn(leaves, x, targets, weights):
        # The primal, for evaluation: the loss alone, chunk by chunk.
        def step(loss, chunk):
            x_c, t_c, w_c = chunk
            token_loss, _ = _token_loss_and_dlogits(head(leaves, x_c), t_c, w_c, with_grad=False)
            return loss + jnp.sum(token_loss * w_c), ()

        return _over_chunks(step, jnp.zeros((), jnp.float32), x, targets, weights, chunk_size)[0]

    def loss_fwd(leaves, x, targets, weights):
        # With symbolic zeros each argument arrives as CustomVJPPrimal(value, perturbed). A float
        # input that is not perturbed (a frozen head, or x when only the head trains) gets no
        # gradient work; integer ones (quantised weights, targets) never have any.
        leaves, perturbed = zip(*map(_unwrap, leaves)) if leaves else ((), ())
        diff_idx = [i for i, (leaf, p) in enumerate(zip(leaves, perturbed)) if p and _is_float(leaf)]
        x, x_diff = _unwrap(x)
        weights, weights_diff = _unwrap(weights)
        targets, _ = _unwrap(targets)

        def logits_of(diff_leaves, x_c):
            full = list(leaves)
            for i, leaf in zip(diff_idx, diff_leaves):
                full[i] = leaf
            return head(full, x_c)

        def step(carry, chunk):
            loss, d_leaves = carry
            x_c, t_c, w_c = chunk
            # jax.vjp only in what is differentiated: for a frozen head it emits no [D, vocab]
            # weight-gradient matmul, for a frozen x no dx matmul.
            diff_leaves = [leaves[i] for i in diff_idx]
            if x_diff:
                logits, vjp = jax.vjp(logits_of, diff_leaves, x_c)
            else:
                logits, vjp = jax.vjp(lambda d: logits_of(d, x_c), diff_leaves)
            token_loss, dlogits = _token_loss_and_dlogits(logits, t_c, w_c, with_grad=True)
            cts = vjp(dlogits.astype(logits.dtype))
            d_leaves = [acc + ct.astype(jnp.float32) for acc, ct in zip(d_leaves, cts[0])]
            per_token = {}
            if x_diff:
                per_token["dx"] = cts[1]
            if weights_diff:
                per_token["token_loss"] = token_loss
            return (loss + jnp.sum(token_loss * w_c), d_leaves), per_token

        # Head gradients accumulate in float32 across chunks.
        init = (jnp.zeros((), jnp.float32), [jnp.zeros(leaves[i].shape, jnp.float32) for i in diff_idx])
        (loss, d_leaves), per_token = _over_chunks(step, init, x, targets, weights, chunk_size)
        # Residuals: the finished gradients in their inputs' dtypes, None for the undifferentiated.
        d_all = [None] * len(leaves)
        for i, d in zip(diff_idx, d_leaves):
            d_all[i] = d.astype(leaves[i].dtype)
        return loss, (d_all, per_token.get("dx"), per_token.get("token_loss"))

    def loss_bwd(residuals, g):
        d_leaves, dx, token_losses = residuals
        if type(g) is SymbolicZero:
            return [None] * len(d_leaves), None, None, None

        def scale(d):
            return None if d is None else (g * d.astype(jnp.float32)).astype(d.dtype)

        # Targets are integers (float0 cotangent): None stands for the zero JAX expects.
        return [scale(d) for d in d_leaves], scale(dx), None, scale(token_losses)

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


def _token_loss_and_dlogits(logits, targets, weights, *, with_grad):
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


def _over_chunks(step, init, x, targets, weights, chunk_size):
    """`lax.scan(step, init, chunks)` over sequence chunks of (x, targets, weights).

    `step(carry, (x_c, t_c, w_c)) -> (carry, per_token)` sees `[B, c, ...]` chunks; returns the
    final carry and `per_token` (a pytree of `[B, c, ...]` arrays) reassembled to `[B, T, ...]`.
    """
    batch, length = targets.shape
    if length <= chunk_size:
        # One chunk, no loop: the same program as the full-logits loss where the logits fit anyway.
        return step(init, (x, targets, weights))

    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length
    if pad:
        # Padded positions have weight 0: no loss and a zero dlogits row, so no gradient.
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        targets = jnp.pad(targets, [(0, 0), (0, pad)])
        weights = jnp.pad(weights, [(0, 0), (0, pad)])

    def to_chunks(a):
        # [B, T, ...] -> [n, B, c, ...]: the scanned axis leads, and the batch axis (split over
        # the mesh's data axes) stays whole within each chunk.
        return jnp.moveaxis(a.reshape(batch, num_chunks, chunk_size, *a.shape[2:]), 1, 0)

    def from_chunks(a):
        return jnp.moveaxis(a, 0, 1).reshape(batch, num_chunks * chunk_size, *a.shape[3:])[:, :length]

    carry, per_token = jax.lax.scan(step, init, (to_chunks(x), to_chunks(targets), to_chunks(weights)))
    return carry, jax.tree.map(from_chunks, per_token)
