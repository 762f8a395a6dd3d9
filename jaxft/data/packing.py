"""Packing: several examples per `train.seq_len` row, so short examples do not train on padding.

Each example in a row gets its own segment id (1, 2, ...; 0 is padding) and
positions that restart at 0, and the model's attention mask lets a token see only
earlier tokens of its own segment, so a packed row computes exactly what the
examples would compute one per row (tests/test_data_packing.py checks the loss).
Rows are packed once, best-fit decreasing, which is deterministic and typically
fills >95% of each row; the training order then shuffles whole rows per epoch.
"""

import bisect

import numpy as np


def pack(lengths: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Example indices of each packed row; every example lands in exactly one row."""
    if len(lengths) and lengths.max() > seq_len:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit train.seq_len={seq_len}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row index), sorted: best fit = first with room
    for i in np.argsort(-lengths, kind="stable"):
        need = int(lengths[i])
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            left, row = free.pop(at)
        else:
            left, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(int(i))
        if left - need > 0:
            bisect.insort(free, (left - need, row))
    return [np.sort(np.asarray(r, np.int64)) for r in rows]


def packed_batch(examples, rows: list[np.ndarray], seq_len: int, pad_id: int, batch_size: int) -> dict:
    """A [batch_size, seq_len] batch of packed rows, with segment_ids and restarting positions."""
    input_ids = np.full((batch_size, seq_len), pad_id, np.int32)
    attention = np.zeros((batch_size, seq_len), np.int32)
    loss_mask = np.zeros((batch_size, seq_len), np.int32)
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    positions = np.zeros((batch_size, seq_len), np.int32)
    for r, members in enumerate(rows):
        at = 0
        for segment, i in enumerate(members, start=1):
            ids, mask = examples.get(i)
            n = len(ids)
            input_ids[r, at:at + n] = ids
            loss_mask[r, at:at + n] = mask
            segment_ids[r, at:at + n] = segment
            positions[r, at:at + n] = np.arange(n)
            at += n
        attention[r, :at] = 1
    return dict(input_ids=input_ids, attention_mask=attention, loss_mask=loss_mask,
                segment_ids=segment_ids, positions=positions)


def fill_fraction(examples, rows: list[np.ndarray], seq_len: int) -> float:
    """Share of the packed rows' token slots that hold real tokens."""
    return float(examples.lengths.sum() / max(len(rows) * seq_len, 1))
