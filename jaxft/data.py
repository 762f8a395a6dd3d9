"""JSONL rows -> tokens -> loss masks -> padded batches, in a resumable order.

Two row formats: `{"text": ...}` trains on every token (continued pretraining);
`{"prompt": ..., "completion": ...}` trains on the completion only. Rows are
tokenised once up front. The training order is a permutation drawn from
`(seed, epoch)`, so the batch for any step can be rebuilt from the step number
alone: that is what makes a resumed run see exactly the batches an
uninterrupted one would.
"""

import dataclasses
import json
import math
import pathlib

import numpy as np

from jaxft.errors import DataError


@dataclasses.dataclass
class Examples:
    """Tokenised rows: `tokens[i]` int32 ids, `targets[i]` 1 where token i is trained on."""

    tokens: list[np.ndarray]
    targets: list[np.ndarray]
    report: dict

    def __len__(self):
        return len(self.tokens)

    def subset(self, indices) -> "Examples":
        return Examples([self.tokens[i] for i in indices], [self.targets[i] for i in indices], dict(self.report))


def read_jsonl(path) -> list[dict]:
    """Every row of a JSONL file; DataError naming file and line for anything unreadable."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"Data file {str(path)!r} does not exist.")
    rows = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start}).") from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno}).") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: a row must be a JSON object, got {type(row).__name__}.")
            rows.append((line_no, row))
    if not rows:
        raise DataError(f"Data file {str(path)!r} has no rows.")
    return [dict(row, _line=line_no, _file=str(path)) for line_no, row in rows]


def detect_format(row: dict, cfg) -> str:
    """'text' or 'prompt_completion', from `data.format` or the first row's fields."""
    if cfg.format != "auto":
        return cfg.format
    if cfg.text_field in row:
        return "text"
    if cfg.prompt_field in row and cfg.completion_field in row:
        return "prompt_completion"
    fields = sorted(k for k in row if not k.startswith("_"))
    raise DataError(f"{row['_file']}:{row['_line']}: cannot tell the data format from fields {fields}; expected "
                    f"'{cfg.text_field}' or '{cfg.prompt_field}'+'{cfg.completion_field}' (or set data.format).")


def _field(row, name) -> str:
    if name not in row:
        fields = sorted(k for k in row if not k.startswith("_"))
        raise DataError(f"{row['_file']}:{row['_line']}: missing field '{name}' (row has {fields}).")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{row['_file']}:{row['_line']}: field '{name}' must be a string, "
                        f"got {type(value).__name__}.")
    return value


def tokenize(rows: list[dict], tokenizer, cfg, seq_len: int) -> Examples:
    """Tokens and target masks for every row, truncated to `seq_len`; counts what it changed."""
    fmt = detect_format(rows[0], cfg)
    bos = [tokenizer.bos_token_id] if cfg.add_bos and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
    if fmt == "text":
        prompts = [""] * len(rows)
        completions = [_field(r, cfg.text_field) for r in rows]
    else:
        prompts = [_field(r, cfg.prompt_field) for r in rows]
        completions = [_field(r, cfg.completion_field) for r in rows]
    encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_ids, completion_ids = encode(prompts), encode(completions)

    tokens, targets = [], []
    report = dict(format=fmt, rows=len(rows), truncated=0, skipped_no_target=0, target_tokens=0, tokens=0)
    for row, p, c in zip(rows, prompt_ids, completion_ids):
        ids = bos + p + c + eos
        mask = [0] * (len(bos) + len(p)) + [1] * (len(c) + len(eos))
        if fmt == "text":
            mask[: len(bos)] = [0] * len(bos)
        if len(ids) > seq_len:
            report["truncated"] += 1
            ids, mask = ids[:seq_len], mask[:seq_len]
        if not any(mask[1:]):
            # Nothing left to learn from this row (empty completion, or the prompt filled seq_len).
            report["skipped_no_target"] += 1
            continue
        tokens.append(np.asarray(ids, np.int32))
        targets.append(np.asarray(mask, np.int32))
        report["tokens"] += len(ids)
        report["target_tokens"] += sum(mask[1:])
    if not tokens:
        raise DataError(f"No usable rows in {rows[0]['_file']}: all {len(rows)} had nothing to train on "
                        f"after truncation to train.seq_len={seq_len}.")
    return Examples(tokens, targets, report)


def pad_batch(examples: Examples, indices, seq_len: int, pad_id: int, batch_size: int | None = None) -> dict:
    """A [batch, seq_len] batch: input_ids, attention_mask, loss_mask (1 where the token is a target).

    Rows past `len(indices)` (a short final eval batch) are all padding and carry no loss.
    """
    batch_size = batch_size or len(indices)
    input_ids = np.full((batch_size, seq_len), pad_id, np.int32)
    attention = np.zeros((batch_size, seq_len), np.int32)
    loss_mask = np.zeros((batch_size, seq_len), np.int32)
    for row, i in enumerate(indices):
        ids, mask = examples.tokens[i], examples.targets[i]
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
        loss_mask[row, : len(ids)] = mask
    return dict(input_ids=input_ids, attention_mask=attention, loss_mask=loss_mask)


class TrainOrder:
    """Which examples make up the batch of each step: a fresh permutation per epoch, from (seed, epoch).

    The last partial batch of an epoch is dropped so every step sees a full batch.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples < batch_size:
            raise DataError(f"The training set has {num_examples} usable rows, fewer than "
                            f"train.batch_size={batch_size}.")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = num_examples // batch_size

    def indices(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return perm[within * self.batch_size: (within + 1) * self.batch_size]


def split_off_eval(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """(train, eval): a held-out fraction of the rows, chosen by a fixed seed."""
    n_eval = max(1, math.floor(len(examples) * fraction))
    perm = np.random.default_rng([seed, 2**31 - 1]).permutation(len(examples))
    return examples.subset(sorted(perm[n_eval:])), examples.subset(sorted(perm[:n_eval]))


def eval_batches(examples: Examples, batch_size: int, seq_len: int, pad_id: int, max_batches=None):
    """The eval set in file order, in full-size batches (the last one padded with loss-free rows)."""
    n_batches = math.ceil(len(examples) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        indices = range(b * batch_size, min((b + 1) * batch_size, len(examples)))
        yield pad_batch(examples, indices, seq_len, pad_id, batch_size)


def load_datasets(cfg, tokenizer, seq_len: int, seed: int) -> tuple[Examples, Examples | None]:
    """Train and eval `Examples` from `config.data`: an eval file, a held-out fraction, or none."""
    train = tokenize(read_jsonl(cfg.train), tokenizer, cfg, seq_len)
    if cfg.eval:
        return train, tokenize(read_jsonl(cfg.eval), tokenizer, cfg, seq_len)
    if cfg.eval_fraction > 0:
        return split_off_eval(train, cfg.eval_fraction, seed)
    return train, None


def pad_token_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else EOS, else 0 (padding is masked anyway)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0
