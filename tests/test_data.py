import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxft.config import base_config
from jaxft.data import (TrainOrder, eval_batches, load_datasets, pad_batch, read_jsonl, split_off_eval,
                        tokenize)
from jaxft.errors import DataError
from tests.conftest import QUICKSTART


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(QUICKSTART / "model"))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(**kw):
    c = base_config().data
    for k, v in kw.items():
        c[k] = v
    return c


def test_prompt_completion_masks_prompt(tmp_path, tokenizer):
    rows = read_jsonl(_write(tmp_path / "d.jsonl", [{"prompt": "Q: red?", "completion": " blue"}]))
    ex = tokenize(rows, tokenizer, _cfg(), seq_len=64)
    ids, mask = ex.tokens[0], ex.targets[0]
    n_prompt = len(tokenizer("Q: red?", add_special_tokens=False)["input_ids"])
    completion = tokenizer(" blue", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert list(ids[1 + n_prompt:-1]) == completion
    assert mask.tolist() == [0] * (1 + n_prompt) + [1] * (len(completion) + 1)
    assert ex.report["format"] == "prompt_completion"


def test_text_trains_on_all_tokens_and_truncates(tmp_path, tokenizer):
    rows = read_jsonl(_write(tmp_path / "d.jsonl", [{"text": "one two three " * 40}, {"text": "short"}]))
    ex = tokenize(rows, tokenizer, _cfg(), seq_len=16)
    assert len(ex.tokens[0]) == 16 and ex.report["truncated"] == 1
    assert ex.targets[1].tolist() == [0] + [1] * (len(ex.tokens[1]) - 1)


def test_padding_and_masks(tmp_path, tokenizer):
    rows = read_jsonl(_write(tmp_path / "d.jsonl", [{"text": "a b c"}, {"text": "a"}]))
    ex = tokenize(rows, tokenizer, _cfg(), seq_len=12)
    batch = pad_batch(ex, [0, 1], 12, pad_id=0)
    assert batch["input_ids"].shape == (2, 12)
    assert batch["attention_mask"].sum(1).tolist() == [len(ex.tokens[0]), len(ex.tokens[1])]
    assert (batch["loss_mask"] <= batch["attention_mask"]).all()


@pytest.mark.parametrize("content,fragment", [
    (b'{"text": "ok"}\n{"text": \n', ":2: invalid JSON"),
    (b'{"text": "ok"}\n\xff\xfe\n', ":2: not valid UTF-8"),
    (b'[1, 2]\n', ":1: a row must be a JSON object"),
    (b'', "has no rows"),
])
def test_unreadable_rows_name_file_and_line(tmp_path, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=fragment):
        read_jsonl(path)


@pytest.mark.parametrize("rows,fragment", [
    ([{"prompt": "p", "completion": "c"}, {"prompt": "p"}], ":2: missing field 'completion'"),
    ([{"text": 3}], ":1: field 'text' must be a string"),
    ([{"question": "x"}], "cannot tell the data format"),
])
def test_bad_fields_name_the_row(tmp_path, tokenizer, rows, fragment):
    rows = read_jsonl(_write(tmp_path / "d.jsonl", rows))
    with pytest.raises(DataError, match=fragment):
        tokenize(rows, tokenizer, _cfg(), seq_len=32)


def test_missing_file():
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl("/nonexistent/train.jsonl")


def test_rows_without_targets_are_counted_not_hidden(tmp_path, tokenizer):
    rows = read_jsonl(_write(tmp_path / "d.jsonl", [{"prompt": "long prompt " * 20, "completion": "x"},
                                                   {"prompt": "p", "completion": "c"}]))
    ex = tokenize(rows, tokenizer, _cfg(), seq_len=8)
    assert len(ex) == 1 and ex.report["skipped_no_target"] == 1


def test_order_is_a_function_of_seed_and_step():
    order = TrainOrder(10, 3, seed=0)
    assert order.steps_per_epoch == 3
    epoch0 = np.concatenate([order.indices(s) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9  # no repeats within an epoch
    assert not np.array_equal(order.indices(0), order.indices(3))  # reshuffled next epoch
    np.testing.assert_array_equal(order.indices(4), TrainOrder(10, 3, seed=0).indices(4))
    assert not np.array_equal(order.indices(0), TrainOrder(10, 3, seed=1).indices(0))


def test_held_out_fraction_is_fixed_and_disjoint(tmp_path, tokenizer):
    rows = read_jsonl(_write(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(20)]))
    ex = tokenize(rows, tokenizer, _cfg(), seq_len=16)
    train, held = split_off_eval(ex, 0.25, seed=0)
    assert len(train) == 15 and len(held) == 5
    seen = {tuple(t) for t in train.tokens}
    assert not any(tuple(t) in seen for t in held.tokens)
    again = split_off_eval(ex, 0.25, seed=0)[1]
    assert [t.tolist() for t in again.tokens] == [t.tolist() for t in held.tokens]


def test_eval_file_and_batches(tmp_path, tokenizer):
    train = _write(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(4)])
    ev = _write(tmp_path / "e.jsonl", [{"text": f"eval {i}"} for i in range(5)])
    tr, es = load_datasets(_cfg(train=str(train), eval=str(ev)), tokenizer, 16, seed=0)
    batches = list(eval_batches(es, 2, 16, pad_id=0))
    assert len(batches) == 3 and batches[-1]["loss_mask"][1].sum() == 0
