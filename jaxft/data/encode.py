"""Rows -> token ids and loss masks, cleaned, with a report of everything dropped or changed.

Cleaning (strip, drop empty rows, exact duplicates, length filters) and the
`train.seq_len` cap each count what they drop under a reason in the report;
rows that are malformed (a missing field, a wrong type, a chat without an
assistant turn, an unknown label) stop the run naming file and row, or with
`data.on_bad_row='skip'` are counted as skipped. Nothing disappears silently.
"""

import collections
import dataclasses
import hashlib
import itertools
import json
import types

import numpy as np

from jaxft.data.formats import Rendered, RowError, make_renderer
from jaxft.data.sources import Source, unreadable
from jaxft.errors import DataError

BATCH_ROWS = 1000  # rows per tokenizer call: fast tokenizers parallelise within a call
CLEANING_REASONS = ("empty", "duplicate", "too_short", "too_long", "over_seq_len", "no_target")


@dataclasses.dataclass
class Examples:
    """Encoded examples in flat arrays: example i is `tokens[offsets[i]:offsets[i+1]]`.

    `loss_mask` is 1 where the token is a training target (predicted from the tokens before
    it); an example's first token never is. `origin[i]` is (file index, row) in its source.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray | None
    origin: np.ndarray
    report: dict

    def __len__(self):
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.tokens[lo:hi], self.loss_mask[lo:hi]

    def subset(self, indices) -> "Examples":
        indices = np.asarray(indices, np.int64)
        pieces = [self.get(i) for i in indices]
        lengths = np.array([len(t) for t, _ in pieces], np.int64)
        return Examples(
            tokens=np.concatenate([t for t, _ in pieces]) if pieces else self.tokens[:0],
            loss_mask=np.concatenate([m for _, m in pieces]) if pieces else self.loss_mask[:0],
            offsets=np.concatenate([[0], np.cumsum(lengths)]),
            labels=None if self.labels is None else self.labels[indices],
            origin=self.origin[indices],
            report=dict(self.report),
        )


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself prepends BOS when asked for special tokens (Llama yes, Qwen and GPT-2 no)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def _batch_encoder(tokenizer, special_tokens: bool = False):
    """texts -> token id lists, without special tokens unless `special_tokens` (then each text as
    `tokenizer(text)` gives it: BOS, or an encoder's [CLS] ... [SEP]); straight to the Rust tokenizer where there
    is one.

    `tokenizer(texts)` gives the same ids but builds a Python encoding object per text
    first, about a fifth of the encoding time on short rows.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=special_tokens)]
    return lambda texts: tokenizer(texts, add_special_tokens=special_tokens)["input_ids"]


class Encoder:
    """Encodes batches of rows for one source, keeping the cleaning state (seen rows) and the report."""

    def __init__(self, source: Source, fmt: str, tokenizer, cfg, seq_len: int, label_names=None, head=False):
        cfg = types.SimpleNamespace(**cfg.to_dict())  # read per row: plain attributes, not ConfigDict lookups
        self.source, self.tokenizer, self.cfg, self.seq_len = source, tokenizer, cfg, seq_len
        self.render = make_renderer(fmt, cfg, tokenizer, label_names, head)
        # A classification head reads each row as the tokenizer gives it at inference, special tokens and all
        # (an encoder's [CLS] text [SEP]; a decoder's BOS where its tokenizer adds one).
        self.token_ids = _batch_encoder(tokenizer, special_tokens=head)
        add_bos = tokenizer_adds_bos(tokenizer) if cfg.add_bos is None else cfg.add_bos
        self.bos = [tokenizer.bos_token_id] if add_bos and not head and tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
        self.seen: set[bytes] = set()
        self.dropped = collections.Counter()
        self.skipped = collections.Counter()
        self.rows_read = self.truncated = self.tokens = self.loss_tokens = 0
        self.raw_lengths: list[int] = []
        self.format = fmt

    def encode_rows(self, rows: list[dict]) -> list[tuple[list[int], list[int], int | None, tuple[int, int]]]:
        """(ids, loss mask, label id, origin) for each usable row of `rows`, in order."""
        self.rows_read += len(rows)
        rendered = [(row, r) for row in rows if (r := self._render(row)) is not None]
        texts = [text for _, r in rendered for text, _ in r.segments]
        ids = iter(self.token_ids(texts)) if texts else iter(())
        out = []
        for row, r in rendered:
            example = self._assemble(r, [next(ids) for _ in r.segments])
            if example is not None:
                out.append((*example, r.label, (row["_file"], row["_row"])))
        return out

    def _render(self, row) -> Rendered | None:
        try:
            rendered = self.render(row)
        except RowError as e:
            if e.reason in CLEANING_REASONS:
                self.dropped[e.reason] += 1
                return None
            if self.cfg.on_bad_row == "skip":
                self.skipped[e.reason] += 1
                return None
            raise DataError(f"{self.source.where(row['_file'], row['_row'])}: {e} "
                            f"(set data.on_bad_row=skip to count and skip such rows).") from None
        if self.cfg.dedup:
            key = hashlib.blake2b(json.dumps([rendered.segments, rendered.label]).encode(), digest_size=16).digest()
            if key in self.seen:
                self.dropped["duplicate"] += 1
                return None
            self.seen.add(key)
        return rendered

    def _assemble(self, r: Rendered, segment_ids: list[list[int]]):
        ids, mask = (list(self.bos), [0] * len(self.bos)) if r.bos_eos else ([], [])
        for (_, trained), seg in zip(r.segments, segment_ids):
            ids += seg
            mask += [int(trained)] * len(seg)
        if r.bos_eos and self.eos and not r.head:  # a classifier reads the text as given at inference
            ids += self.eos
            mask += [int(r.segments[-1][1])]
        if mask:
            mask[0] = 0  # nothing predicts an example's first token (and packing must not either)
        n = len(ids)
        self.raw_lengths.append(n)
        cfg = self.cfg
        if n < cfg.min_tokens:
            return self._drop("too_short")
        if cfg.max_tokens and n > cfg.max_tokens:
            return self._drop("too_long")
        if n > self.seq_len:
            if cfg.too_long == "drop":
                return self._drop("over_seq_len")
            ids, mask = ids[: self.seq_len], mask[: self.seq_len]
            self.truncated += 1
        if not any(mask) and not r.head:
            return self._drop("no_target")  # e.g. the prompt filled train.seq_len
        self.tokens += len(ids)
        self.loss_tokens += sum(mask)
        return ids, mask

    def _drop(self, reason):
        self.dropped[reason] += 1
        return None

    def report(self, kept: int) -> dict:
        """What was read, kept, dropped (by reason), skipped and truncated; token lengths before the cap."""
        lengths = np.asarray(self.raw_lengths or [0])
        edges = [2**k for k in range(3, max(4, int(np.ceil(np.log2(max(lengths.max(), 8)))) + 1))]
        bins = np.searchsorted(edges, lengths)  # bin i: edges[i-1] < length <= edges[i]
        return dict(
            source=self.source.spec, format=self.format, rows_read=self.rows_read, rows_kept=kept,
            dropped=dict(sorted(self.dropped.items())), skipped_bad_rows=dict(sorted(self.skipped.items())),
            truncated=self.truncated, tokens=self.tokens, loss_tokens=self.loss_tokens,
            loss_token_fraction=round(self.loss_tokens / max(self.tokens, 1), 4),
            length_percentiles={p: int(np.percentile(lengths, q)) for p, q in
                                (("min", 0), ("p50", 50), ("p95", 95), ("max", 100))},
            length_histogram={f"<={e}": int(c) for e, c in zip(edges, np.bincount(bins, minlength=len(edges)))},
        )


def encode_all(parts, encoder: Encoder) -> Examples:
    """Every usable row of the datasets in `parts` (in order) as Examples."""
    ids, masks, labels, origins = [], [], [], []
    for file_index, ds in enumerate(parts):
        for rows in row_batches(ds, encoder.source, file_index):
            for example_ids, mask, label, origin in encoder.encode_rows(rows):
                ids.append(example_ids)
                masks.append(mask)
                labels.append(label)
                origins.append(origin)
    if not ids:
        raise DataError(f"No usable rows in {encoder.source.spec}: cleaning dropped or skipped every row (the "
                        f"report below counts them by reason); fix the data or relax the data.* cleaning settings "
                        f"(min_tokens, max_tokens, too_long, drop_empty). " + json.dumps(encoder.report(0)))
    lengths = np.array([len(x) for x in ids], np.int64)
    total = int(lengths.sum())
    return Examples(
        tokens=np.fromiter(itertools.chain.from_iterable(ids), np.int32, total),
        loss_mask=np.fromiter(itertools.chain.from_iterable(masks), np.int8, total),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        labels=None if labels[0] is None else np.asarray(labels, np.int32),
        origin=np.asarray(origins, np.int64).reshape(-1, 2),
        report=encoder.report(len(ids)),
    )


def row_batches(ds, source: Source, file_index: int):
    """Lists of row dicts from one part, each row tagged `_file` and `_row` (its 0-based row in the file).

    A file that fails while being read (pyarrow decodes lazily) is diagnosed like one that fails to load.
    """
    it = ds.iter(batch_size=BATCH_ROWS)
    row = 0
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (DataError, RowError):
            raise
        except Exception as e:
            raise unreadable(source, file_index, e) from e
        names = list(batch)
        rows = [dict(zip(names, values), _file=file_index, _row=row + k)
                for k, values in enumerate(zip(*batch.values()))]
        row += len(rows)
        yield rows
