"""`config.data` -> the training and eval sets a run uses, tokenised once and cached.

    sources.py  files / globs / save_to_disk / hub -> datasets, rows tagged with file and row
    formats.py  row -> text segments marked trained or not (text, prompt_completion, messages, classification)
    encode.py   segments -> token ids + loss masks, cleaning, the report
    packing.py  examples -> packed rows with segment ids and positions
    batches.py  order per (seed, epoch), padding, per-process slices, global arrays, prefetch
"""

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import uuid

import numpy as np

from jaxft.data import sources
from jaxft.data.batches import TrainOrder, pad_batch
from jaxft.data.encode import Encoder, Examples, encode_all
from jaxft.data.formats import classification_head, configured_labels, detect_format, label_name
from jaxft.data.packing import fill_fraction, pack, packed_batch
from jaxft.data.stream import StreamingTrainSet
from jaxft.errors import ConfigError, DataError

log = logging.getLogger("jaxft")
CACHE_VERSION = 1  # bump when encoding changes what it produces


@dataclasses.dataclass
class TrainSet:
    """The training examples and how steps read them."""

    examples: Examples
    rows: list[np.ndarray] | None  # packed rows (example indices), or None: one example per row
    order: TrainOrder
    seq_len: int
    pad_id: int

    def batch(self, step: int, part: slice = slice(None)) -> dict:
        """Rows `part` (this process's share) of the global batch of `step`."""
        units = self.order.indices(step)[part]
        if self.rows is None:
            return pad_batch(self.examples, units, self.seq_len, self.pad_id)
        return packed_batch(self.examples, [self.rows[u] for u in units], self.seq_len, self.pad_id, len(units))

    def batches(self, start_step: int, stop_step: int, part: slice = slice(None)):
        """(step, this process's rows of its batch, the position the next step reads) for steps [start, stop)."""
        for step in range(start_step, stop_step):
            yield step, self.batch(step, part), self.order.position(step + 1)

    def report(self) -> dict:
        return self.examples.report

    def fingerprint(self) -> str:
        """Identifies the encoded data and its packing: a resumed run must see the same."""
        h = hashlib.blake2b(digest_size=16)
        for array in (self.examples.tokens, self.examples.loss_mask, self.examples.offsets):
            h.update(np.ascontiguousarray(array).tobytes())
        h.update(str(self.rows is not None).encode())
        return h.hexdigest()


@dataclasses.dataclass
class Data:
    train: TrainSet
    eval: Examples | None
    label_names: list[str] | None
    report: dict


def load(config, tokenizer, cache_dir=None) -> Data:
    """Train and eval sets as `config.data` says; `cache_dir` holds tokenised sets between runs."""
    cfg, seq_len = config.data, config.train.seq_len
    if cfg.streaming:
        return _load_streaming(config, tokenizer, cache_dir)
    train_source = sources.resolve(cfg.train)
    train_parts = sources.load(train_source, split=cfg.train_split, hub_config=cfg.hub_config,
                               streaming=False)
    fmt = detect_format(train_parts[0].column_names, cfg)
    head = classification_head(config, fmt)
    label_names = _label_names(cfg, train_parts) if fmt == "classification" else None
    train = _encoded(train_source, train_parts, fmt, tokenizer, cfg, seq_len, label_names, cache_dir, head)

    if cfg.eval:
        eval_source = sources.resolve(cfg.eval)
        eval_parts = sources.load(eval_source, split=cfg.eval_split, hub_config=cfg.hub_config, streaming=False)
        eval_set = _encoded(eval_source, eval_parts, fmt, tokenizer, cfg, seq_len, label_names, cache_dir, head)
    elif cfg.eval_fraction > 0:
        train, eval_set = split_off_eval(train, cfg.eval_fraction, config.seed)
    else:
        eval_set = None

    rows = pack(train.lengths, seq_len) if cfg.packing else None
    order = TrainOrder(len(rows) if rows is not None else len(train), config.train.batch_size, config.seed)
    report = dict(train=train.report, eval=eval_set.report if eval_set is not None else None)
    if eval_set is not None:
        report["eval_examples_also_in_train"] = _overlap(train, eval_set)
    if rows is not None:
        report["packing"] = dict(examples=len(train), rows=len(rows),
                                 fill_fraction=round(fill_fraction(train, rows, seq_len), 4))
    if label_names is not None:
        report["labels"] = label_names
    return Data(TrainSet(train, rows, order, seq_len, pad_token_id(tokenizer)), eval_set, label_names, report)


def _load_streaming(config, tokenizer, cache_dir) -> Data:
    """A training stream (read while training) and an in-memory eval set."""
    cfg = config.data
    train = StreamingTrainSet(config, tokenizer, pad_token_id(tokenizer))
    eval_set = None
    if cfg.eval:
        eval_source = sources.resolve(cfg.eval)
        eval_parts = sources.load(eval_source, split=cfg.eval_split, hub_config=cfg.hub_config, streaming=False)
        eval_set = _encoded(eval_source, eval_parts, train.fmt, tokenizer, cfg, config.train.seq_len,
                            train.label_names, cache_dir, train.head)
    report = dict(train=train.report(), eval=eval_set.report if eval_set is not None else None)
    return Data(train, eval_set, train.label_names, report)


def _encoded(source, parts, fmt, tokenizer, cfg, seq_len, label_names, cache_dir, head=False) -> Examples:
    """encode_all, through a cache keyed by the source's files, the data config, the task and the tokenizer."""
    path = None
    if cache_dir is not None and source.kind != "hub":
        key = _cache_key(source, fmt, tokenizer, cfg, seq_len, label_names, head)
        path = pathlib.Path(cache_dir) / f"{key}.npz"
        if path.exists():
            cached = _read_cache(path)
            if cached is not None:
                log.info("Tokenised %s read from cache %s", source.spec, path)
                return cached
    examples = encode_all(parts, Encoder(source, fmt, tokenizer, cfg, seq_len, label_names, head))
    if path is not None:
        _write_cache(path, examples)
    return examples


def _cache_key(source, fmt, tokenizer, cfg, seq_len, label_names, head) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [CACHE_VERSION, source.stamp(), fmt, cfg.to_dict(), seq_len, label_names, head,
             hashlib.sha256(vocab.encode()).hexdigest(), getattr(tokenizer, "chat_template", None),
             tokenizer.bos_token_id, tokenizer.eos_token_id]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _write_cache(path: pathlib.Path, ex: Examples) -> None:
    try:
        _write_cache_file(path, ex)
    except OSError as e:  # a file where the cache directory belongs, no permission, a full disk
        raise ConfigError(f"The data cache {path.parent} cannot be written ({e.strerror or e}); make it a writable "
                          f"directory (move aside a file of that name), or set data.cache=False.") from None


def _write_cache_file(path: pathlib.Path, ex: Examples) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per writer: the processes of a multi-host job share the workdir and write the
    # same cache at once; with one shared temporary name one's rename took the other's file away.
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npz")
    arrays = dict(tokens=ex.tokens, loss_mask=ex.loss_mask, offsets=ex.offsets, origin=ex.origin,
                  report=np.frombuffer(json.dumps(ex.report).encode(), np.uint8))
    if ex.labels is not None:
        arrays["labels"] = ex.labels
    np.savez(tmp, **arrays)
    tmp.replace(path)  # atomic: a concurrent reader sees the old file or the whole new one


def _read_cache(path: pathlib.Path) -> Examples | None:
    try:
        with np.load(path) as f:
            return Examples(tokens=f["tokens"], loss_mask=f["loss_mask"], offsets=f["offsets"],
                            labels=f["labels"] if "labels" in f else None, origin=f["origin"],
                            report=json.loads(f["report"].tobytes()))
    except Exception as e:  # a damaged cache is rebuilt, not trusted
        log.warning("Ignoring unreadable data cache %s (%s)", path, e)
        return None


def _label_names(cfg, parts) -> list[str]:
    """`data.labels` (comma-separated, in id order), else the sorted distinct labels of the training set."""
    if cfg.labels:
        return configured_labels(cfg)
    found = {label_name(v) for part in parts if cfg.label_field in part.column_names
             for v in part.unique(cfg.label_field)} - {None}
    if not found:
        raise DataError(f"No labels found in field '{cfg.label_field}' of {cfg.train}; set data.label_field to the "
                        f"column that holds them.")
    return sorted(found)


def split_off_eval(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """(train, eval): a held-out fraction of the examples, chosen by a fixed seed."""
    n_eval = max(1, int(len(examples) * fraction))
    if n_eval >= len(examples):
        raise DataError(f"data.eval_fraction={fraction} leaves no training examples out of {len(examples)}; lower "
                        f"data.eval_fraction, or give a separate eval set in data.eval.")
    perm = np.random.default_rng([seed, 2**31 - 1]).permutation(len(examples))
    train, held = examples.subset(np.sort(perm[n_eval:])), examples.subset(np.sort(perm[:n_eval]))
    train.report = dict(train.report, rows_kept=len(train), held_out_for_eval=len(held))
    held.report = dict(source=examples.report["source"], held_out_fraction=fraction, rows_kept=len(held))
    return train, held


def _overlap(train: Examples, eval_set: Examples) -> int:
    """How many eval examples are token-for-token identical to a training example."""
    seen = {train.get(i)[0].tobytes() for i in range(len(train))}
    return sum(eval_set.get(i)[0].tobytes() in seen for i in range(len(eval_set)))


def pad_token_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else EOS, else 0 (padding is masked anyway)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def eval_column(config, examples: Examples, field: str) -> list:
    """The value of `field` in each eval example's source row (e.g. `eval.group_field`): read from the eval
    files, or from the training files where the eval set was held out of them (`data.eval_fraction`)."""
    cfg = config.data
    spec, split = (cfg.eval, cfg.eval_split) if cfg.eval else (cfg.train, cfg.train_split)
    source = sources.resolve(spec)
    parts = sources.load(source, split=split, hub_config=cfg.hub_config, streaming=False)
    for i, part in enumerate(parts):
        if field not in part.column_names:
            name = source.files[i] if source.files else source.spec
            raise DataError(f"eval.group_field={field!r} is not a column of the eval data {name} "
                            f"(columns: {sorted(part.column_names)}).")
    columns = [part[field] for part in parts]
    return [columns[int(f)][int(r)] for f, r in examples.origin]
