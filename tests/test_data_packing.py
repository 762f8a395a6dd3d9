"""Packing: every example placed once, rows within seq_len, and the same loss as unpacked."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxft import trainer
from jaxft.config import base_config
from jaxft.data import load, pad_batch
from jaxft.data.packing import pack, packed_batch
from jaxft.models.hf import load_pretrained
from tests.conftest import QUICKSTART


def test_pack_places_every_example_once_within_seq_len():
    lengths = np.random.default_rng(0).integers(1, 65, size=500) // 2 + 1  # 1..32 tokens in 64-token rows
    rows = pack(lengths, 64)
    placed = np.concatenate(rows)
    assert sorted(placed.tolist()) == list(range(500))
    assert all(lengths[r].sum() <= 64 for r in rows)
    assert lengths.sum() / (len(rows) * 64) > 0.95  # best-fit decreasing fills the rows
    assert [r.tolist() for r in rows] == [r.tolist() for r in pack(lengths, 64)]  # deterministic


def test_pack_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="does not fit"):
        pack(np.array([3, 70]), 64)


@pytest.fixture(scope="module")
def quickstart_data(tmp_path_factory):
    rows = [json.loads(line) for line in (QUICKSTART / "train.jsonl").read_text().splitlines()[:24]]
    path = tmp_path_factory.mktemp("d") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = base_config()
    c.model.path, c.data.train, c.data.packing = str(QUICKSTART / "model"), str(path), True
    c.train.steps, c.train.batch_size, c.train.seq_len = 1, 2, 128
    return load(c, AutoTokenizer.from_pretrained(c.model.path))


def test_packed_batch_segments_and_positions(quickstart_data):
    train = quickstart_data.train
    members = train.rows[0]
    batch = packed_batch(train.examples, [members], 128, pad_id=0, batch_size=1)
    lengths = train.examples.lengths[members]
    expected_segments = np.concatenate([np.full(n, s + 1) for s, n in enumerate(lengths)])
    n = lengths.sum()
    np.testing.assert_array_equal(batch["segment_ids"][0, :n], expected_segments)
    np.testing.assert_array_equal(batch["positions"][0, :n], np.concatenate([np.arange(k) for k in lengths]))
    assert batch["segment_ids"][0, n:].sum() == 0 and batch["attention_mask"][0].sum() == n
    assert quickstart_data.report["packing"]["rows"] == len(train.rows)


def test_packed_loss_equals_unpacked_loss(quickstart_data):
    train = quickstart_data.train
    model = load_pretrained(str(QUICKSTART / "model"))
    packed = packed_batch(train.examples, train.rows, 128, train.pad_id, len(train.rows))
    unpacked = pad_batch(train.examples, range(len(train.examples)), 128, train.pad_id)
    packed_sum, packed_count = trainer.loss_sums(model, packed)
    plain_sum, plain_count = trainer.loss_sums(model, unpacked)
    assert len(train.rows) < len(train.examples)  # several examples per row
    assert float(packed_count) == float(plain_count) == train.examples.loss_mask.sum()
    np.testing.assert_allclose(float(packed_sum), float(plain_sum), rtol=1e-5)
