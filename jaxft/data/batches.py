"""Examples -> the batch of each step: order, padding, this process's shard, prefetch.

The training order is a permutation of the training units (examples, or packed
rows) drawn from `(seed, epoch)`, so the batch of any step is a function of the
step alone: a resumed run sees exactly the batches an uninterrupted one would.
On several hosts each process builds only its own slice of every global batch
and `jax.make_array_from_process_local_data` joins the slices into one array
sharded over the mesh's batch axis.
"""

import functools
import math
import queue
import threading
import time

import jax
import numpy as np

from jaxft.errors import DataError


class TrainOrder:
    """Which units make up the batch of each step: a fresh permutation per epoch, from (seed, epoch).

    The last partial batch of an epoch is dropped so every step sees a full batch.
    """

    def __init__(self, num_units: int, batch_size: int, seed: int):
        if num_units < batch_size:
            raise DataError(f"The training set has {num_units} usable rows, fewer than "
                            f"train.batch_size={batch_size}; lower train.batch_size or give more rows (the data "
                            f"report counts the rows cleaning dropped).")
        self.num_units, self.batch_size, self.seed = num_units, batch_size, seed
        self.steps_per_epoch = num_units // batch_size

    def position(self, step: int) -> dict:
        """Where `step` reads: its epoch and the batch within that epoch."""
        epoch, batch = divmod(step, self.steps_per_epoch)
        return dict(epoch=epoch, batch_in_epoch=batch)

    def indices(self, step: int) -> np.ndarray:
        pos = self.position(step)
        start = pos["batch_in_epoch"] * self.batch_size
        return self._permutation(pos["epoch"])[start:start + self.batch_size]

    @functools.lru_cache(maxsize=2)  # noqa: B019 (the order lives as long as the run)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_units)


def pad_batch(examples, indices, seq_len: int, pad_id: int, batch_size: int | None = None) -> dict:
    """A [batch, seq_len] batch, one example per row: input_ids, attention_mask, loss_mask, and for labelled
    examples (classification) their label ids, `labels` [batch].

    Rows past `len(indices)` (a short final eval batch) are all padding and carry no loss (label -1).
    """
    batch_size = batch_size or len(indices)
    input_ids = np.full((batch_size, seq_len), pad_id, np.int32)
    attention = np.zeros((batch_size, seq_len), np.int32)
    loss_mask = np.zeros((batch_size, seq_len), np.int32)
    for row, i in enumerate(indices):
        ids, mask = examples.get(i)
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
        loss_mask[row, : len(ids)] = mask
    batch = dict(input_ids=input_ids, attention_mask=attention, loss_mask=loss_mask)
    if getattr(examples, "labels", None) is not None:
        batch["labels"] = np.full((batch_size,), -1, np.int32)
        batch["labels"][: len(indices)] = examples.labels[np.asarray(indices, np.int64)]
    return batch


def eval_batches(examples, batch_size: int, seq_len: int, pad_id: int, max_batches=None):
    """The eval set in file order, in full-size batches (the last one padded with loss-free rows)."""
    n_batches = math.ceil(len(examples) / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        indices = range(b * batch_size, min((b + 1) * batch_size, len(examples)))
        yield pad_batch(examples, indices, seq_len, pad_id, batch_size)


# ----------------------------------------------------------------------------- hosts


def to_global(local_batch: dict, sharding: jax.sharding.NamedSharding, global_rows: int) -> dict:
    """This process's rows -> global arrays of `global_rows` rows sharded as `sharding` says.

    Which rows a process builds comes from the mesh (`jaxft.sharding.process_rows`).
    """
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_rows, *v.shape[1:]))
            for k, v in local_batch.items()}


# ----------------------------------------------------------------------------- prefetch


class Prefetcher:
    """Runs an iterator of batches `depth` items ahead in a background thread while the step runs.

    `wait_seconds` is the time the consumer spent blocked on input: the step's
    input-wait, which the run reports as a fraction of wall time.
    """

    _DONE = object()

    def __init__(self, items, depth: int = 2):
        self.wait_seconds = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(items,), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, items):
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failure(e))
            return
        self._put(self._DONE)

    def __iter__(self):
        while True:
            start = time.perf_counter()
            item = self._queue.get()
            self.wait_seconds += time.perf_counter() - start
            if item is self._DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error
