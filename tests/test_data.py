"""Formats, encoding, cleaning and the report, order, splits and the cache (jaxft/data/)."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxft.config import base_config
from jaxft.data import TrainOrder, eval_batches, load, pad_batch, split_off_eval
from jaxft.data.encode import Encoder, encode_all, tokenizer_adds_bos
from jaxft.data.sources import load as load_source
from jaxft.data.sources import resolve
from jaxft.errors import DataError
from tests.conftest import QUICKSTART

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(QUICKSTART / "model"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def data_cfg(**kw):
    c = base_config().data
    for k, v in kw.items():
        c[k] = v
    return c


def encode(path, tokenizer, seq_len=64, fmt=None, label_names=None, **kw):
    cfg = data_cfg(**kw)
    source = resolve(path)
    parts = load_source(source, split="train", hub_config=None, streaming=False)
    from jaxft.data.formats import detect_format
    fmt = fmt or detect_format(parts[0].column_names, cfg)
    return encode_all(parts, Encoder(source, fmt, tokenizer, cfg, seq_len, label_names))


def trained_text(tokenizer, examples, i) -> str:
    ids, mask = examples.get(i)
    return tokenizer.decode(ids[mask == 1])


# ----------------------------------------------------------------------------- formats


def test_prompt_completion_trains_on_completion_and_eos(tmp_path, tokenizer):
    ex = encode(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: red?", "completion": " blue"}]), tokenizer)
    ids, mask = ex.get(0)
    n_prompt = len(tokenizer("Q: red?", add_special_tokens=False)["input_ids"])
    completion = tokenizer(" blue", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert ids[1 + n_prompt:-1].tolist() == completion
    assert mask.tolist() == [0] * (1 + n_prompt) + [1] * (len(completion) + 1)
    assert ex.report["format"] == "prompt_completion"


def test_text_trains_on_every_token_but_the_first_and_truncates(tmp_path, tokenizer):
    ex = encode(write_jsonl(tmp_path / "d.jsonl", [{"text": "one two three " * 40}, {"text": "short"}]),
                tokenizer, seq_len=16)
    assert len(ex.get(0)[0]) == 16 and ex.report["truncated"] == 1
    assert ex.get(1)[1].tolist() == [0] + [1] * (len(ex.get(1)[0]) - 1)


def test_too_long_rows_can_be_dropped_and_are_counted(tmp_path, tokenizer):
    ex = encode(write_jsonl(tmp_path / "d.jsonl", [{"text": "one two three " * 40}, {"text": "short"}]),
                tokenizer, seq_len=16, too_long="drop")
    assert len(ex) == 1 and ex.report["dropped"] == {"over_seq_len": 1}


def test_messages_train_on_assistant_turns_only(tmp_path, tokenizer):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Colour of the sky?"},
            {"role": "assistant", "content": "Blue."}]
    ex = encode(write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}]), tokenizer, seq_len=256,
                chat_template=CHAT_TEMPLATE)
    ids, mask = ex.get(0)
    full = tokenizer.apply_chat_template(chat, chat_template=CHAT_TEMPLATE, tokenize=False)
    assert tokenizer.decode(ids) == full  # the template's own text, no BOS/EOS added around it
    trained_runs, run = [], []
    for token, m in zip(ids, mask):
        if m:
            run.append(token)
        elif run:
            trained_runs.append(tokenizer.decode(run))
            run = []
    trained_runs += [tokenizer.decode(run)] if run else []
    assert trained_runs == ["Hello!</s>\n", "Blue.</s>\n"]
    assert ex.report["format"] == "messages"


def test_messages_use_the_tokenizers_template_by_default(tmp_path, tokenizer):
    tok = AutoTokenizer.from_pretrained(str(QUICKSTART / "model"))
    tok.chat_template = CHAT_TEMPLATE
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    ex = encode(write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}]), tok)
    assert trained_text(tok, ex, 0) == "Yo</s>\n"
    with pytest.raises(DataError, match="no chat template"):
        encode(write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}]), tokenizer)


def test_classification_trains_on_the_label_name_and_keeps_its_id(tmp_path, tokenizer):
    rows = [{"text": "great film", "label": "pos"}, {"text": "dull", "label": "neg"}]
    ex = encode(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer, label_names=["neg", "pos"])
    assert ex.labels.tolist() == [1, 0]
    assert trained_text(tokenizer, ex, 0) == " pos</s>"
    assert ex.report["format"] == "classification"


def test_format_is_detected_from_columns(tmp_path, tokenizer):
    for rows, fmt in (([{"text": "a"}], "text"), ([{"prompt": "p", "completion": "c"}], "prompt_completion"),
                      ([{"text": "a", "label": 1}], "classification")):
        src = resolve(write_jsonl(tmp_path / f"{fmt}.jsonl", rows))
        parts = load_source(src, split="train", hub_config=None, streaming=False)
        from jaxft.data.formats import detect_format
        assert detect_format(parts[0].column_names, data_cfg()) == fmt


def test_custom_field_names(tmp_path, tokenizer):
    ex = encode(write_jsonl(tmp_path / "d.jsonl", [{"q": "2+2=", "a": " 4"}]), tokenizer,
                prompt_field="q", completion_field="a")
    assert trained_text(tokenizer, ex, 0) == " 4</s>"


def test_bos_follows_the_tokenizer_unless_set(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}])
    assert tokenizer_adds_bos(tokenizer)
    assert encode(path, tokenizer).get(0)[0][0] == tokenizer.bos_token_id
    assert encode(path, tokenizer, add_bos=False).get(0)[0][0] != tokenizer.bos_token_id


# ----------------------------------------------------------------------------- cleaning and report


def test_cleaning_counts_every_drop(tmp_path, tokenizer):
    rows = [{"text": "  kept one  "}, {"text": "kept one"}, {"text": "   "}, {"text": "a"},
            {"text": "long " * 30}, {"text": "kept two"}]
    ex = encode(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, min_tokens=4, max_tokens=20)
    r = ex.report
    assert len(ex) == 2 and r["rows_read"] == 6 and r["rows_kept"] == 2
    assert r["dropped"] == {"duplicate": 1, "empty": 1, "too_long": 1, "too_short": 1}
    assert r["rows_read"] == r["rows_kept"] + sum(r["dropped"].values())
    assert sum(r["length_histogram"].values()) == 4  # rows tokenised: not the empty one or the duplicate
    assert 0 < r["loss_token_fraction"] <= 1 and r["loss_tokens"] == int(ex.loss_mask.sum())
    assert tokenizer.decode(ex.get(0)[0][1:-1]) == "kept one"  # stripped


def test_rows_without_targets_are_counted(tmp_path, tokenizer):
    rows = [{"prompt": "long prompt " * 20, "completion": "x"}, {"prompt": "p", "completion": "c"}]
    ex = encode(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, seq_len=8)
    assert len(ex) == 1 and ex.report["dropped"] == {"no_target": 1}


def test_cleaning_switches_off(tmp_path, tokenizer):
    rows = [{"text": "same"}, {"text": "same"}]
    assert len(encode(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, dedup=False)) == 2


# ----------------------------------------------------------------------------- load: splits, labels, cache


def run_config(tmp_path, rows, eval_rows=None, **data):
    c = base_config()
    c.model.path = str(QUICKSTART / "model")
    c.data.train = write_jsonl(tmp_path / "train.jsonl", rows)
    if eval_rows is not None:
        c.data.eval = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    c.train.steps, c.train.batch_size, c.train.seq_len = 2, 2, 32
    for k, v in data.items():
        c.data[k] = v
    return c


def test_held_out_fraction_is_fixed_and_disjoint(tmp_path, tokenizer):
    c = run_config(tmp_path, [{"text": f"row {i}"} for i in range(20)], eval_fraction=0.25)
    data = load(c, tokenizer)
    assert len(data.train.examples) == 15 and len(data.eval) == 5
    assert data.report["eval_examples_also_in_train"] == 0
    again = load(c, tokenizer)
    np.testing.assert_array_equal(again.eval.tokens, data.eval.tokens)


def test_eval_file_and_overlap_report(tmp_path, tokenizer):
    c = run_config(tmp_path, [{"text": f"row {i}"} for i in range(4)],
                   eval_rows=[{"text": "row 1"}] + [{"text": f"eval {i}"} for i in range(4)])
    data = load(c, tokenizer)
    assert data.report["eval_examples_also_in_train"] == 1
    batches = list(eval_batches(data.eval, 2, 32, pad_id=0))
    assert len(batches) == 3 and batches[-1]["loss_mask"][1].sum() == 0


def test_label_set_from_data_or_config(tmp_path, tokenizer):
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate(["b", "a", "c", "a"])]
    assert load(run_config(tmp_path, rows), tokenizer).label_names == ["a", "b", "c"]
    c = run_config(tmp_path, rows, labels="c,b,a")
    data = load(c, tokenizer)
    assert data.label_names == ["c", "b", "a"] and data.train.examples.labels.tolist() == [1, 2, 0, 2]
    with pytest.raises(DataError, match=r"train.jsonl:2: label 'a' is not in the label set"):
        load(run_config(tmp_path, rows, labels="b,c"), tokenizer)


def test_cache_is_used_and_keyed_by_settings(tmp_path, tokenizer, caplog):
    c = run_config(tmp_path, [{"text": f"row {i}"} for i in range(6)])
    first = load(c, tokenizer, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    with caplog.at_level("INFO", logger="jaxft"):
        second = load(c, tokenizer, cache_dir=tmp_path / "cache")
    assert "read from cache" in caplog.text
    np.testing.assert_array_equal(first.train.examples.tokens, second.train.examples.tokens)
    assert second.report == first.report
    c.train.seq_len = 16
    load(c, tokenizer, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "changed"}) + "\n" * 1 + json.dumps({"text": "x"}))
    changed = load(c, tokenizer, cache_dir=tmp_path / "cache")
    assert len(changed.train.examples) == 2


def test_two_writers_of_one_cache_both_succeed(tmp_path, tokenizer, monkeypatch):
    """The processes of a multi-host job share the workdir: a second writer that saves and renames while
    the first is between its save and its rename must not take the first one's file away (it did, with
    one temporary name for all: FileNotFoundError in the two-process training test)."""
    from jaxft.data import pipeline
    examples = load(run_config(tmp_path, [{"text": f"row {i}"} for i in range(6)]), tokenizer).train.examples
    path, real_savez, nested = tmp_path / "cache" / "key.npz", np.savez, []

    def savez_then_the_other_writer(file, **arrays):
        real_savez(file, **arrays)
        if not nested:  # between the first writer's save and its rename, the second writes the same cache
            nested.append(file)
            pipeline._write_cache(path, examples)

    monkeypatch.setattr(pipeline.np, "savez", savez_then_the_other_writer)
    pipeline._write_cache(path, examples)
    monkeypatch.undo()
    assert nested and [p.name for p in path.parent.iterdir()] == ["key.npz"]
    np.testing.assert_array_equal(pipeline._read_cache(path).tokens, examples.tokens)


# ----------------------------------------------------------------------------- order


def test_order_is_a_function_of_seed_and_step():
    order = TrainOrder(10, 3, seed=0)
    assert order.steps_per_epoch == 3
    epoch0 = np.concatenate([order.indices(s) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9  # no repeats within an epoch
    assert not np.array_equal(order.indices(0), order.indices(3))  # reshuffled next epoch
    np.testing.assert_array_equal(order.indices(4), TrainOrder(10, 3, seed=0).indices(4))
    assert not np.array_equal(order.indices(0), TrainOrder(10, 3, seed=1).indices(0))
    assert order.position(7) == dict(epoch=2, batch_in_epoch=1)


def test_padding_and_masks(tmp_path, tokenizer):
    ex = encode(write_jsonl(tmp_path / "d.jsonl", [{"text": "a b c"}, {"text": "a"}]), tokenizer, seq_len=12)
    batch = pad_batch(ex, [0, 1], 12, pad_id=0)
    assert batch["input_ids"].shape == (2, 12)
    assert batch["attention_mask"].sum(1).tolist() == ex.lengths.tolist()
    assert (batch["loss_mask"] <= batch["attention_mask"]).all()


def test_split_needs_training_rows_left(tmp_path, tokenizer):
    ex = encode(write_jsonl(tmp_path / "d.jsonl", [{"text": "only"}]), tokenizer)
    with pytest.raises(DataError, match="leaves no training examples"):
        split_off_eval(ex, 0.5, seed=0)
