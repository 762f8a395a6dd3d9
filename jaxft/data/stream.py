"""Streaming training data (`data.streaming=True`): corpora larger than memory, read as they are trained on.

Rows are read file by file through `datasets`' streaming mode, encoded in batches
(the same cleaning and report as in-memory sets, duplicates judged within each
pass), shuffled through a buffer of `data.shuffle_buffer` examples whose random
state comes from `(seed, epoch)`, and packed greedily (next fit) when
`data.packing` is on. A pass that ends starts the next epoch.

Everything here is a deterministic function of the data, the config and the
step, so a resumed run replays the pipeline (encoding, not training) up to its
step and continues with exactly the batches an uninterrupted run would have
seen; the replay costs about as much as reading that data the first time.
"""

import hashlib
import json

import numpy as np

from jaxft.data import sources
from jaxft.data.batches import pad_batch
from jaxft.data.encode import Encoder, row_batches
from jaxft.data.formats import classification_head, configured_labels
from jaxft.data.packing import packed_batch
from jaxft.errors import DataError


class _Examples:
    """Just enough of `Examples` (`get`, `labels`) for pad_batch and packed_batch over a list of (ids, mask, label)."""

    def __init__(self, items):
        self.items = items
        self.labels = np.array([item[2] for item in items], np.int32) if items and items[0][2] is not None else None

    def get(self, i):
        return self.items[i][:2]


class StreamingTrainSet:
    """The training stream: batches in order, positions to checkpoint, the report so far."""

    def __init__(self, config, tokenizer, pad_id: int):
        cfg = config.data
        self.cfg, self.tokenizer, self.pad_id, self.seed = cfg, tokenizer, pad_id, config.seed
        self.batch_size, self.seq_len = config.train.batch_size, config.train.seq_len
        self.source = sources.resolve(cfg.train)
        self.fmt = self._detect_format()
        self.label_names = None
        if self.fmt == "classification":
            if not cfg.labels:
                raise DataError("Streaming classification data needs data.labels (the label set, comma-separated): "
                                "it cannot be read off a stream before training.")
            self.label_names = configured_labels(cfg)
        self.head = classification_head(config, self.fmt)
        self.encoder = None  # the current pass's, for the report
        self._encode_first_rows()

    def _encode_first_rows(self) -> None:
        """Encode the first rows now: bad data fails before training starts, and the tokenizer's
        thread pool starts before `tune_malloc` (jaxft/host.py says why that matters)."""
        encoder = Encoder(self.source, self.fmt, self.tokenizer, self.cfg, self.seq_len, self.label_names, self.head)
        first = next(row_batches(self._parts()[0], self.source, 0), [])
        encoder.encode_rows(first)

    def _parts(self):
        return sources.load(self.source, split=self.cfg.train_split, hub_config=self.cfg.hub_config, streaming=True)

    def _detect_format(self) -> str:
        from jaxft.data.formats import detect_format
        first = next(iter(self._parts()[0]), None)
        if first is None:
            raise DataError(f"Data source {self.source.spec!r} has no rows.")
        return detect_format(first.keys(), self.cfg)

    def examples(self, epoch: int):
        """One pass over the data, encoded and buffer-shuffled: (ids, mask) arrays and the label id (or None)."""
        self.encoder = Encoder(self.source, self.fmt, self.tokenizer, self.cfg, self.seq_len, self.label_names,
                               self.head)
        rng = np.random.default_rng([self.seed, epoch])
        buffer = []
        for file_index, ds in enumerate(self._parts()):
            for rows in row_batches(ds, self.source, file_index):
                for ids, mask, label, _ in self.encoder.encode_rows(rows):
                    item = (np.asarray(ids, np.int32), np.asarray(mask, np.int32), label)
                    if len(buffer) < self.cfg.shuffle_buffer:
                        buffer.append(item)
                        continue
                    j = int(rng.integers(len(buffer)))
                    buffer[j], item = item, buffer[j]
                    yield item
        rng.shuffle(buffer)
        yield from buffer

    def units(self, epoch: int):
        """Training rows of one pass: single examples, or next-fit packs of them."""
        if not self.cfg.packing:
            for item in self.examples(epoch):
                yield [item]
            return
        row, used = [], 0
        for item in self.examples(epoch):
            if used + len(item[0]) > self.seq_len and row:
                yield row
                row, used = [], 0
            row.append(item)
            used += len(item[0])
        if row:
            yield row

    def batches(self, start_step: int, stop_step: int, part: slice = slice(None)):
        """(step, this process's rows of the step's batch, position after it) for steps [start, stop).

        Steps before `start_step` are replayed without building arrays: that is the resume.
        """
        step, epoch = 0, 0
        while step < stop_step:
            pending, units_in_epoch = [], 0
            for unit in self.units(epoch):
                pending.append(unit)
                units_in_epoch += 1
                if len(pending) < self.batch_size:
                    continue
                if step >= start_step:
                    yield step, self._batch(pending[part]), dict(epoch=epoch, units_in_epoch=units_in_epoch)
                pending, step = [], step + 1
                if step >= stop_step:
                    return
            if units_in_epoch < self.batch_size:
                raise DataError(f"The training stream has {units_in_epoch} usable rows, fewer than "
                                f"train.batch_size={self.batch_size}; lower train.batch_size or give more rows.")
            epoch += 1  # the partial last batch of a pass is dropped, as in-memory

    def _batch(self, units) -> dict:
        if not self.cfg.packing:
            items = _Examples([u[0] for u in units])
            return pad_batch(items, range(len(units)), self.seq_len, self.pad_id)
        flat = [item for unit in units for item in unit]
        rows, at = [], 0
        for unit in units:
            rows.append(np.arange(at, at + len(unit)))
            at += len(unit)
        return packed_batch(_Examples(flat), rows, self.seq_len, self.pad_id, len(units))

    def report(self) -> dict:
        """The counts of the pass being read (complete once a pass has ended)."""
        if self.encoder is None:
            return dict(source=self.source.spec, format=self.fmt, streaming=True)
        return dict(self.encoder.report(self.encoder.rows_read - sum(self.encoder.dropped.values())
                                        - sum(self.encoder.skipped.values())), streaming=True)

    def fingerprint(self) -> str:
        """The source's files and the data settings: a stream cannot be hashed without reading it."""
        stamp = json.dumps([self.source.stamp(), self.cfg.to_dict(), self.seq_len, self.batch_size, self.seed,
                            self.head],
                           sort_keys=True, default=str)
        return hashlib.blake2b(stamp.encode(), digest_size=16).hexdigest()
