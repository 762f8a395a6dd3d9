"""Evaluators. Loss and perplexity over target tokens; generation and
classification metrics come with the tasks that need them."""

import math

import jax


def loss_and_perplexity(loss_sums_fn, batches) -> dict:
    """Token-weighted mean loss over all `batches` and its perplexity.

    `loss_sums_fn(batch)` returns (sum of token losses, number of target tokens); summing
    both before dividing weights every token equally, however the tokens fall into batches.
    """
    sums = [loss_sums_fn(batch) for batch in batches]  # dispatch all before reading any back
    total, count = (float(sum(x)) for x in zip(*jax.device_get(sums)))
    loss = total / max(count, 1.0)
    return dict(eval_loss=loss, eval_perplexity=math.exp(min(loss, 700.0)), eval_tokens=int(count))
