"""Text generation: a prefill pass over the prompts, then a jitted decode loop over a KV cache.

    out = generate(model, [[1, 15, 27], [1, 9]], GenerationConfig(max_new_tokens=32, eos_token_ids=(2,)))
    out.tokens  # the new tokens of each row, up to and including the one that stopped it

The model is any jaxft causal LM with any fine-tuning method applied (LoRA/DoRA merged or not,
QLoRA, adapters, prompt tuning, partial or full): decoding runs the model's own blocks
(`DecoderForCausalLM.cached_hidden_states`), so training and generation share one attention and
RoPE. Prompts are left-padded into one batch; their padding is never attended to and does
not shift positions. The cache is allocated once for prompt + `max_new_tokens`, the loop is a
`lax.while_loop` that stops when every row has stopped, and nothing recompiles per token.
Greedy decoding (temperature 0) picks the most likely token, as transformers' `generate` does;
sampling applies temperature, then top-k, then top-p, with a key from `seed`, so a seed gives
the same tokens every time. Stop strings are matched on the decoded text between chunks of
`stop_check_every` tokens, and the tokens after the match are dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import sharding
from jaxft.errors import ConfigError
from jaxft.models.kv_cache import KVCache

PROMPT_LENGTH_MULTIPLE = 16  # prompts are padded up to this, so batches of similar lengths share a program


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()  # stop a row after any of these (kept in its output, as transformers does)
    stop_token_ids: tuple[int, ...] = ()  # more token ids that stop a row, kept likewise
    stop_strings: tuple[str, ...] = ()  # stop once the decoded text contains one; the text is cut before it
    pad_token_id: int = 0  # what stopped rows are filled with inside the loop (never returned)
    stop_check_every: int = 16  # tokens per chunk between stop-string checks and streamed output

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.stop_check_every < 1:
            raise ConfigError(f"stop_check_every must be at least 1, got {self.stop_check_every}")

    @property
    def stops(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.eos_token_ids) | set(self.stop_token_ids)))


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # per row: the new tokens, through the stopping token
    finish_reasons: list[str]  # per row: "stop_token", "stop_string" or "length"
    texts: list[str] | None = None  # per row, decoded without special tokens (with a tokenizer)


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, tokenizer=None,
             on_chunk: Callable[[list[list[int]]], None] | None = None, mesh=None) -> Generation:
    """Continue each prompt (a list of token ids) by up to `config.max_new_tokens` tokens.

    `tokenizer` decodes the outputs into `Generation.texts` and is needed for `stop_strings`.
    `on_chunk(tokens)` is called with every row's tokens so far after each chunk (streaming).
    `mesh`: the mesh the model's parameters are laid out on (jaxft/sharding.py), if any: the cache
    is split like the activations (rows over data and fsdp, kv heads over tensor where they divide).
    """
    with sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return _generate(model, prompts, config, tokenizer, on_chunk, mesh)


def _generate(model, prompts, config: GenerationConfig, tokenizer, on_chunk, mesh) -> Generation:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("generate needs at least one prompt, and every prompt at least one token")
    if config.stop_strings and tokenizer is None:
        raise ConfigError("stop_strings need a tokenizer to read the generated text")
    ids, mask = left_pad(prompts, config.pad_token_id)
    place = functools.partial(_place, mesh=mesh)
    graphdef, state = nnx.split(model)
    virtual = getattr(model.prompt_encoder, "num_virtual_tokens", 0) if model.prompt_encoder is not None else 0
    slots = virtual + ids.shape[1] + config.max_new_tokens - 1
    # Only what shapes the program is static: another seed or stop string compiles nothing new.
    program = dataclasses.replace(config, seed=0, stop_strings=(), stop_check_every=1)
    carry = _prefill(graphdef, state, place(ids), place(mask), jax.random.key(config.seed), slots, program)

    chunk = config.stop_check_every if (config.stop_strings or on_chunk) else config.max_new_tokens
    cut_at: dict[int, int] = {}  # row -> tokens kept, for rows a stop string ended
    while True:
        # Every process reads the whole of each (on a multi-host mesh, its rows live on other hosts too).
        tokens, done, step = (np.array(x) for x in sharding.gather((carry["tokens"], carry["done"], carry["step"])))
        rows = _rows(tokens, done, int(step), config)
        if config.stop_strings:
            for r, row in enumerate(rows):
                if r not in cut_at and (keep := _stop_string_end(row, tokenizer, config.stop_strings)) is not None:
                    cut_at[r] = keep
                    done[r] = True
            carry["done"] = place(done)
        if on_chunk is not None:
            on_chunk([row[:cut_at.get(r, len(row))] for r, row in enumerate(rows)])
        if int(step) >= config.max_new_tokens or bool(np.all(done)):
            break
        carry = _decode(graphdef, state, carry, min(int(step) + chunk, config.max_new_tokens), program)

    out, reasons = [], []
    for r, row in enumerate(rows):
        if r in cut_at:
            out.append(row[:cut_at[r]])
            reasons.append("stop_string")
        else:
            out.append(row)
            reasons.append("stop_token" if row and row[-1] in config.stops else "length")
    texts = None
    if tokenizer is not None:
        texts = [_cut_text(tokenizer.decode(row, skip_special_tokens=True), config.stop_strings) for row in out]
    return Generation(out, reasons, texts)


def generate_in_batches(model, prompts: Sequence[Sequence[int]], config: GenerationConfig, batch_size: int, *,
                        tokenizer=None, mesh=None) -> Iterator[tuple[int, Generation]]:
    """`(start, Generation)` for each batch of `batch_size` prompts in order. A short last batch is filled up with
    copies of its first prompt (their answers dropped), so one compiled program serves every batch."""
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        filled = batch + [batch[0]] * (min(batch_size, len(prompts)) - len(batch))
        out = generate(model, filled, config, tokenizer=tokenizer, mesh=mesh)
        n = len(batch)
        yield start, Generation(out.tokens[:n], out.finish_reasons[:n], None if out.texts is None else out.texts[:n])


def _place(rows: np.ndarray, mesh=None):
    """Host rows `[B, ...]` as the step takes them: on a mesh split over its batch axes where B divides (as
    training splits a batch, so the program's layouts are training's), else whole on every device."""
    if mesh is None:
        return jnp.asarray(rows)
    split = rows.shape[0] % sharding.batch_ways(mesh) == 0
    target = sharding.batch_sharding(mesh) if split else sharding.replicated(mesh)
    return jax.make_array_from_callback(rows.shape, target, lambda index: rows[index])


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids, mask)` `[B, P]`, each prompt at the right end of its row, P the longest rounded up to
    `PROMPT_LENGTH_MULTIPLE`; mask 1 on real tokens."""
    longest = max(len(p) for p in prompts)
    width = -(-longest // PROMPT_LENGTH_MULTIPLE) * PROMPT_LENGTH_MULTIPLE
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    return ids, mask


# ----------------------------------------------------------------------------- the compiled passes


@functools.partial(jax.jit, static_argnames=("graphdef", "slots", "config"))
def _prefill(graphdef, state, ids, mask, key, slots: int, config: GenerationConfig) -> dict:
    """Run the prompts, pick each row's first new token; the loop's carry."""
    model = nnx.merge(graphdef, state)
    b = ids.shape[0]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = KVCache.empty(model, b, slots)
    hidden, cache = model.cached_hidden_states(ids, cache, attention_mask=mask, positions=positions, prompt=True)
    token = _pick(model.logits(hidden[:, -1:])[:, 0], jax.random.fold_in(key, 0), config)
    tokens = jnp.full((b, config.max_new_tokens), config.pad_token_id, jnp.int32).at[:, 0].set(token)
    return dict(cache=cache, tokens=tokens, position=positions[:, -1] + 1, done=_is_stop(token, config),
                step=jnp.ones((), jnp.int32), key=key)


@functools.partial(jax.jit, static_argnames=("graphdef", "config"), donate_argnames=("carry",))
def _decode(graphdef, state, carry: dict, limit, config: GenerationConfig) -> dict:
    """Decode one token per row per iteration until step `limit` or until every row has stopped."""
    model = nnx.merge(graphdef, state)

    def running(c):
        return (c["step"] < limit) & ~jnp.all(c["done"])

    def one_token(c):
        last = jax.lax.dynamic_slice_in_dim(c["tokens"], c["step"] - 1, 1, axis=1)
        hidden, cache = model.cached_hidden_states(last, c["cache"], attention_mask=jnp.ones_like(last),
                                                   positions=c["position"][:, None])
        token = _pick(model.logits(hidden)[:, 0], jax.random.fold_in(c["key"], c["step"]), config)
        token = jnp.where(c["done"], config.pad_token_id, token)
        tokens = jax.lax.dynamic_update_slice_in_dim(c["tokens"], token[:, None], c["step"], axis=1)
        return dict(cache=cache, tokens=tokens, position=c["position"] + 1, done=c["done"] | _is_stop(token, config),
                    step=c["step"] + 1, key=c["key"])

    return jax.lax.while_loop(running, one_token, carry)


def _is_stop(token, config: GenerationConfig):
    if not config.stops:
        return jnp.zeros(token.shape, bool)
    return jnp.isin(token, jnp.asarray(config.stops, token.dtype))


def _pick(logits, key, config: GenerationConfig):
    """The next token `[B]` from float32 logits `[B, vocab]`: argmax, or a sample from `warp`'s logits."""
    if config.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, warp(logits, config), axis=-1).astype(jnp.int32)


def warp(logits, config: GenerationConfig):
    """The logits a token is sampled from: temperature, then top-k, then top-p (transformers' order); tokens cut
    away get -inf."""
    logits = logits / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.top_p < 1.0:
        logits = _nucleus(logits, config.top_p)
    return logits


def _nucleus(logits, top_p: float):
    """Keep the smallest set of most likely tokens whose probability reaches `top_p` (at least one)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly ahead of each token
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


# ----------------------------------------------------------------------------- host side


def _rows(tokens: np.ndarray, done: np.ndarray, step: int, config: GenerationConfig) -> list[list[int]]:
    """Each row's tokens so far, through its first stop token."""
    rows = []
    for row in tokens[:, :step].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in config.stops), len(row))
        rows.append(row[:end])
    return rows


def _stop_string_end(row: list[int], tokenizer, stop_strings) -> int | None:
    """The number of tokens to keep if the row's text contains a stop string: up to the token that
    completed the first match (the text is cut at the match itself); None if there is none."""
    text = tokenizer.decode(row, skip_special_tokens=True)
    if not any(s in text for s in stop_strings):
        return None
    for n in range(1, len(row) + 1):
        if any(s in tokenizer.decode(row[:n], skip_special_tokens=True) for s in stop_strings):
            return n
    return len(row)


def _cut_text(text: str, stop_strings) -> str:
    ends = [text.index(s) for s in stop_strings if s in text]
    return text[:min(ends)] if ends else text
