"""Evaluators: loss and perplexity over target tokens, and task metrics over answers the model generates
for the eval rows (`eval.metrics`, jaxft/task_metrics.py)."""

import json
import math
import pathlib

import jax

from jaxft import task_metrics
from jaxft.generate import GenerationConfig, generate
from jaxft.generate.prompts import split_example


def loss_and_perplexity(loss_sums_fn, batches) -> dict:
    """Token-weighted mean loss over all `batches` and its perplexity.

    `loss_sums_fn(batch)` returns (sum of token losses, number of target tokens); summing
    both before dividing weights every token equally, however the tokens fall into batches.
    """
    sums = [loss_sums_fn(batch) for batch in batches]  # dispatch all before reading any back
    total, count = (float(sum(x)) for x in zip(*jax.device_get(sums)))
    loss = total / max(count, 1.0)
    return dict(eval_loss=loss, eval_perplexity=math.exp(min(loss, 700.0)), eval_tokens=int(count))


def answer_eval_rows(model, examples, tokenizer, *, rows: int | None, max_new_tokens: int, batch_size: int,
                     stop_ids, pad_id: int, mesh=None) -> list[dict]:
    """Greedy answers to the first `rows` eval examples (all by default). Each example's prompt is everything
    before its last trained span (the completion, the last assistant turn, the label), the reference that span.
    Returns one record per example: prompt, reference, prediction (texts), finish_reason, its source row."""
    n = len(examples) if rows is None else min(rows, len(examples))
    prompts, references = [], []
    for i in range(n):
        prompt, answer = split_example(*examples.get(i), stop_ids=stop_ids)
        prompts.append(prompt)
        references.append(tokenizer.decode(answer, skip_special_tokens=True).strip())
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=tuple(stop_ids), pad_token_id=pad_id)
    records = []
    for start in range(0, n, batch_size):
        batch = prompts[start:start + batch_size]
        filled = batch + [batch[0]] * (min(batch_size, n) - len(batch))  # one program for every batch
        out = generate(model, filled, config, tokenizer=tokenizer, mesh=mesh)
        for j, prompt in enumerate(batch):
            i = start + j
            records.append(dict(prompt=tokenizer.decode(prompt), reference=references[i],
                                prediction=out.texts[j].strip(), finish_reason=out.finish_reasons[j],
                                source=dict(file=int(examples.origin[i][0]), row=int(examples.origin[i][1]))))
    return records


def task_scores(records: list[dict], names, label_names=None) -> dict:
    """`eval_<score>` for every metric in `names` over the records' predictions and references."""
    scores = task_metrics.compute(names, [r["prediction"] for r in records], [r["reference"] for r in records],
                                  label_names)
    return {f"eval_{k}": v for k, v in scores.items()}


def write_answers(path, step: int, records: list[dict], scores: dict) -> pathlib.Path:
    """The answers of one evaluation as JSON lines, after a first line with the step and its scores."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write(json.dumps(dict(step=step, **scores)) + "\n")
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def read_answers(path) -> tuple[dict, list[dict]]:
    """`(scores, records)` of a file `write_answers` wrote."""
    lines = pathlib.Path(path).read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
