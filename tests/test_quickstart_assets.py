"""The quickstart assets that ship in the package: present, loadable offline, and sane.

They are made by scripts/make_quickstart.py; these tests hold the promises the quickstart
config relies on (a Llama checkpoint with a fast tokenizer, prompt/completion rows that
fit seq_len 128, eval disjoint from train).
"""

import json
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parent.parent / "jaxft" / "assets" / "quickstart"
MODEL = ASSETS / "model"
SEQ_LEN = 128
PROMPT_START, PROMPT_END = "### Instruction:\n", "\n\n### Response:\n"


def read_rows(name):
    with open(ASSETS / name) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def rows():
    return {"train": read_rows("train.jsonl"), "eval": read_rows("eval.jsonl")}


def test_files_exist():
    for name in ["README.md", "train.jsonl", "eval.jsonl", "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json", "model/tokenizer_config.json"]:
        assert (ASSETS / name).is_file(), name
    # Small enough to ship inside the package.
    assert (MODEL / "model.safetensors").stat().st_size <= 3_200_000


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.is_fast
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer("The capital of")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids  # like Llama


@pytest.mark.parametrize("text", [
    "### Instruction:\nWhat is three plus four?\n\n### Response:\nThree plus four is seven.",
    "  leading spaces, tabs\tand Ünïcödé 🙂 survive byte-level BPE",
])
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_model_loads_as_llama(tokenizer):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    assert model.config.model_type == "llama"
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer("The capital of")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_rows_are_prompt_completion(rows):
    assert 2000 <= len(rows["train"]) <= 4000
    assert 200 <= len(rows["eval"]) <= 300
    for row in rows["train"] + rows["eval"]:
        assert set(row) == {"prompt", "completion"}
        assert row["prompt"].startswith(PROMPT_START) and row["prompt"].endswith(PROMPT_END)
        assert row["prompt"][len(PROMPT_START):-len(PROMPT_END)].strip()
        assert row["completion"].strip()


def test_eval_disjoint_from_train(rows):
    train_prompts = {r["prompt"] for r in rows["train"]}
    assert len(train_prompts) == len(rows["train"])
    assert not train_prompts & {r["prompt"] for r in rows["eval"]}


def test_rows_fit_seq_len(tokenizer, rows):
    all_rows = rows["train"] + rows["eval"]
    encoded = tokenizer([r["prompt"] + r["completion"] for r in all_rows])["input_ids"]
    # The tokenizer adds BOS; the trainer appends EOS.
    longest = max(len(ids) + 1 for ids in encoded)
    assert longest <= SEQ_LEN
