"""Each data format trains through the command line, `python -m jaxft.train`, on the quickstart model."""

import json
import subprocess
import sys

import pytest

from tests.conftest import QUICKSTART, ROOT

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _rows(fmt):
    """The quickstart's question/answer pairs, in `fmt`."""
    pairs = [json.loads(line) for line in (QUICKSTART / "train.jsonl").read_text().splitlines()[:64]]
    for i, p in enumerate(pairs):
        question = p["prompt"].split("\n")[1]
        if fmt == "text":
            yield {"text": p["prompt"] + p["completion"]}
        elif fmt == "prompt_completion":
            yield p
        elif fmt == "messages":
            yield {"messages": [{"role": "user", "content": question},
                                {"role": "assistant", "content": p["completion"]}]}
        else:
            yield {"text": question, "label": ["colour", "other"][int("colour" not in question)]}


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "messages", "classification"])
def test_format_trains_through_the_cli(tmp_path, fmt):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _rows(fmt)))
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    overrides = {"model.path": QUICKSTART / "model", "data.train": train, "data.eval": "", "data.eval_fraction": 0.25,
                 "data.chat_template": tmp_path / "chat.jinja", "train.steps": 6, "train.batch_size": 4,
                 "train.seq_len": 64, "train.log_every_steps": 2, "train.progress_bar": False,
                 "eval.every_steps": 0, "checkpoint.async_save": False, "optim.warmup_steps": 0}
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "jaxft.train", "--config", str(ROOT / "configs/quickstart.py"),
                             "--workdir", str(workdir), *(f"--config.{k}={v}" for k, v in overrides.items())],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((workdir / "data_report.json").read_text())
    assert report["train"]["format"] == fmt and report["train"]["rows_read"] == 64
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0] and evals[-1] < evals[0]
    if fmt == "classification":
        labels = json.loads((workdir / "labels.json").read_text())
        assert labels == {"labels": ["colour", "other"], "label_to_id": {"colour": 0, "other": 1}}
