"""Data sources through `datasets`, and the bad-input table: each error names file and row."""

import json

import datasets
import pytest
from transformers import AutoTokenizer

from jaxft.config import base_config
from jaxft.data import load
from jaxft.data.sources import resolve
from jaxft.errors import DataError
from tests.conftest import QUICKSTART

ROWS = [{"prompt": f"Q{i}?", "completion": f" A{i}."} for i in range(6)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(QUICKSTART / "model"))


def config(train, **data):
    c = base_config()
    c.model.path = str(QUICKSTART / "model")
    c.data.train = str(train)
    c.train.steps, c.train.batch_size, c.train.seq_len = 1, 2, 32
    for k, v in data.items():
        c.data[k] = v
    return c


def completions(data, tokenizer):
    ex = data.train.examples
    return [tokenizer.decode(ex.get(i)[0][ex.get(i)[1] == 1]) for i in range(len(ex))]


def write_each_kind(tmp_path):
    """The same rows as every local source kind datasets reads."""
    ds = datasets.Dataset.from_list(ROWS)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    (tmp_path / "d.arrow").write_bytes(arrow.read_bytes())
    for i in range(2):  # a glob of two shards, read in name order
        (tmp_path / f"shard-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[3 * i:3 * i + 3]))
    return ["d.jsonl", "d.json", "d.csv", "d.parquet", "d.arrow", "saved", "shard-*.jsonl"]


def test_every_local_source_kind_gives_the_same_examples(tmp_path, tokenizer):
    kinds = write_each_kind(tmp_path)
    expected = [f" A{i}.</s>" for i in range(6)]
    for name in kinds:
        data = load(config(tmp_path / name), tokenizer)
        assert completions(data, tokenizer) == expected, name
    assert resolve(str(tmp_path / "saved")).kind == "disk"
    assert len(resolve(str(tmp_path / "shard-*.jsonl")).files) == 2


def test_save_to_disk_dataset_dict_picks_the_split(tmp_path, tokenizer):
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:4]),
                         validation=datasets.Dataset.from_list(ROWS[4:])).save_to_disk(str(tmp_path / "dd"))
    c = config(tmp_path / "dd", eval=str(tmp_path / "dd"))
    data = load(c, tokenizer)
    assert len(data.train.examples) == 4 and len(data.eval) == 2
    with pytest.raises(DataError, match="not 'test'"):
        load(config(tmp_path / "dd", train_split="test"), tokenizer)


def test_unreachable_hub_id_is_a_clear_error(tmp_path, tokenizer, monkeypatch):
    # Offline as the libraries see it: they read the environment at import, so patch their flags
    # (without this the lookup waits on network timeouts, ~20 s here).
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="Cannot load hub dataset 'nobody/no-such-dataset'"):
        load(config("nobody/no-such-dataset"), tokenizer)


# ----------------------------------------------------------------------------- the bad-input table

BAD_FILES = [
    ("invalid_json.jsonl", b'{"text": "ok"}\n{"text": \n', r"invalid_json.jsonl:2: invalid JSON"),
    ("not_utf8.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"not_utf8.jsonl:2: not valid UTF-8"),
    ("not_object.jsonl", b'{"text": "ok"}\n[1, 2]\n', r"not_object.jsonl:2: a row must be a JSON object"),
    ("empty.jsonl", b"", r"empty.jsonl' is empty"),
    ("blank.jsonl", b"\n\n", r"blank.jsonl.* has no rows"),
    ("missing_field.jsonl", b'{"prompt": "p", "completion": "c"}\n\n{"prompt": "p2"}\n',
     r"missing_field.jsonl:3: missing field 'completion'"),
    ("wrong_type.jsonl", b'{"text": "ok"}\n{"text": 3}\n',
     r"wrong_type.jsonl:2: field 'text' must be a string, got int"),
    ("no_assistant.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n',
     r"no_assistant.jsonl:1: the chat has no assistant turn"),
    ("bad_message.jsonl", b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}\n',
     r"bad_message.jsonl:1: message 0 must be an object with string 'role' and 'content'"),
    ("unknown_label.csv", b"text,label\ngood,pos\nbad,neg\nmeh,maybe\n", r"unknown_label.csv row 3: label 'maybe'"),
    ("unknown_columns.jsonl", b'{"question": "x"}\n', r"Cannot tell the data format from columns \['question'\]"),
]
CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize("name,content,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_input_names_file_and_row(tmp_path, tokenizer, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        load(config(tmp_path / name, chat_template=CHAT, labels="pos,neg"), tokenizer)


def test_missing_file_and_empty_glob(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        load(config(tmp_path / "nope.jsonl"), tokenizer)
    with pytest.raises(DataError, match="matches no files"):
        load(config(tmp_path / "*.parquet"), tokenizer)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unknown data file type '.txt'"):
        load(config(tmp_path / "d.txt"), tokenizer)


def test_bad_rows_can_be_skipped_and_are_counted(tmp_path, tokenizer):
    rows = [{"text": "fine", "label": "pos"}, {"text": 3, "label": "pos"}, {"label": "neg"},
            {"text": "odd", "label": "maybe"}, {"text": "fine too", "label": "neg"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load(config(path, labels="pos,neg", on_bad_row="skip"), tokenizer)
    report = data.report["train"]
    assert len(data.train.examples) == 2
    assert report["skipped_bad_rows"] == {"missing_field": 1, "unknown_label": 1, "wrong_type": 1}
    assert report["rows_read"] == report["rows_kept"] + sum(report["skipped_bad_rows"].values())
